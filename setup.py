"""Builds the optional compiled extension from ``csrc/``; metadata lives in pyproject.toml.

Each ``csrc/<name>.cpp`` becomes ``nai_fast._<name>``. A source earns its
place there only by beating the NumPy/torch/Triton path on a benchmark (see
``csrc/README.md``). Where no compiler is present, or a build fails, the
extension is skipped with a warning: the package works without it.
"""

from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class OptionalBuildExt(build_ext):
    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as error:  # a missing compiler surfaces as several distutils error types
            print(f"warning: skipping optional extension {ext.name}: {error}")


extensions = [Extension(f"nai_fast._{source.stem}", [str(source)]) for source in sorted(Path("csrc").glob("*.cpp"))]

setup(ext_modules=extensions, cmdclass={"build_ext": OptionalBuildExt})
