"""Builds the C core into the CPython binding modules (metadata lives in pyproject.toml)."""
from glob import glob

from setuptools import Extension, setup

CFLAGS = ["-std=gnu11", "-O2", "-Wall", "-Wextra", "-Wno-unused-parameter", "-Wno-missing-field-initializers"]


def core(*parts):
    """The pure-C core sources of the named parts (folders under core/)."""
    return sorted(src for part in parts for src in glob(f"core/{part}/*.c"))


setup(
    ext_modules=[
        Extension(
            "gilfree._engine",
            sources=["src/gilfree/_bindings/_engine.c", *core("transport", "workers")],
            include_dirs=["core/include"],
            depends=glob("core/include/gf/*.h"),
            extra_compile_args=CFLAGS,
        ),
        Extension(
            "gilfree._gilhook",
            sources=["src/gilfree/_bindings/_gilhook.c", *core("gilhook")],
            include_dirs=["core/include"],
            depends=glob("core/include/gf/*.h"),
            extra_compile_args=CFLAGS,
            libraries=["dl"],
        ),
    ],
)
