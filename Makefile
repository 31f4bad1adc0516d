# gilfree: `make demo` (the seeds' experiments beside our fixes) and `make test` (everything).
PYTHON       ?= python3
PYENV_ROOT   ?= $(shell pyenv root 2>/dev/null || echo $$HOME/.pyenv)
# The suite runs on every CPython the machine has of 3.11, 3.12 and 3.13.
TEST_PYTHONS ?= $(PYTHON) \
	$(firstword $(wildcard $(PYENV_ROOT)/versions/3.12*/bin/python3.12)) \
	$(firstword $(wildcard $(PYENV_ROOT)/versions/3.13*/bin/python3.13))
CC           ?= cc
SAN_FLAGS    := -fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer
CORE_SRC     := $(wildcard core/*/*.c)
CTEST_SRC    := $(wildcard tests/c/*.c)
PYTEST_ARGS  ?=

.PHONY: all build test ctest pytest demo bench clean

all: build

build:
	@tools/venv $(PYTHON) test >/dev/null

build/ctests: $(CORE_SRC) $(CTEST_SRC) $(wildcard core/include/gf/*.h) $(wildcard tests/c/*.h)
	@mkdir -p build
	$(CC) -std=gnu11 -g -O1 -Wall -Wextra -Wno-unused-parameter $(SAN_FLAGS) -Icore/include -Itests/c \
		$(CORE_SRC) $(CTEST_SRC) -o $@ -lpthread -ldl

# A stand-in libpython for the gilhook tests, whose PLT they rewrite.
build/libgf_gilhook_fixture.so: tests/c/fixtures/gilhook_fixture.c core/include/gf/gilhook.h
	@mkdir -p build
	$(CC) -std=gnu11 -g -O1 -fPIC -shared -Icore/include $< -o $@ -lpthread

ctest: build/ctests build/libgf_gilhook_fixture.so
	ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=print_stacktrace=1 build/ctests

pytest:
	@set -e; for py in $(TEST_PYTHONS); do \
		venv=$$(tools/venv $$py test); \
		echo "== pytest on $$($$venv/bin/python -V)"; \
		$$venv/bin/python -m pytest -q -p no:cacheprovider $(PYTEST_ARGS); \
	done

test: ctest pytest

# Each demo/NN_*.py step is one of the seeds' experiments run beside gilfree's fix.
demo:
	@set -e; venv=$$(tools/venv $(PYTHON) all); \
	for step in demo/[0-9]*.py; do $$venv/bin/python $$step; done

bench:
	@command -v wrk >/dev/null || (apt-get update -qq && apt-get install -y -qq wrk)
	@set -e; venv=$$(tools/venv $(PYTHON) test); $$venv/bin/python -m pip install -q -r bench/requirements.txt; \
	for b in bench/bench_*.py bench/beazley.py; do $$venv/bin/python $$b; done

clean:
	rm -rf build .venv src/*.egg-info src/gilfree/*.so
