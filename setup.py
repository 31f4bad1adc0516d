"""Builds the C core into the CPython binding modules (metadata lives in pyproject.toml)."""
from glob import glob

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class build_ext_always(build_ext):
    """Compiles every time: objects left in build/ by another interpreter of the same minor
    version (3.11.2 after 3.11.7) look up to date, and _gilhook refuses to run on a Python it was
    not compiled for."""

    def finalize_options(self):
        super().finalize_options()
        self.force = True

CFLAGS = ["-std=gnu11", "-O2", "-Wall", "-Wextra", "-Wno-unused-parameter", "-Wno-missing-field-initializers"]


def core(*parts):
    """The pure-C core sources of the named parts (folders under core/)."""
    return sorted(src for part in parts for src in glob(f"core/{part}/*.c"))


setup(
    cmdclass={"build_ext": build_ext_always},
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
