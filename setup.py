"""Package discovery for the `loralab` import package, whose folder is the repository root
(package-dir {"loralab": "."} in pyproject.toml): every package under it, as loralab.<name>.
Everything else about the project is in pyproject.toml."""
import os

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

NOT_SHIPPED = ["tests", "tests.*", "benchmarks", "benchmarks.*", "build", "build.*", "output", "output.*"]


class BuildPy(build_py):
    """This file sits in the package's folder too; it is not a module of loralab."""

    def find_package_modules(self, package, package_dir):
        return [entry for entry in super().find_package_modules(package, package_dir)
                if (entry[0], entry[1]) != ("loralab", "setup")]


# workflows/ and configs/ hold only JSON (package data); listed as packages so setuptools does
# not warn that data folders look like packages left out
DATA_FOLDERS = ["loralab.workflows", "loralab.configs"] + [
    "loralab." + folder.replace(os.sep, ".")  # the SD1.5/SDXL model configs single files load with
    for folder, _, _ in os.walk(os.path.join("core", "families", "unet", "configs"))]

setup(packages=["loralab"] + [f"loralab.{name}" for name in find_packages(".", exclude=NOT_SHIPPED)]
      + DATA_FOLDERS,
      cmdclass={"build_py": BuildPy})
