"""Package discovery: every folder holding Python files under a root that pyproject's ``package-dir`` maps.

pyproject.toml stays the single place for metadata and the folder mapping; it cannot express "find the
subpackages of each mapped folder under its mapped name" (``packages.find`` would install ``kernels`` and
``pipelines`` as top-level packages), and a hand-kept list drops a new subpackage from the wheel without a
word. Data folders (``pipelines/weights``) hold no Python files and ship as package data instead.
"""

from __future__ import annotations

import sys
from pathlib import Path

from setuptools import find_namespace_packages, setup

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent


def discover_packages(package_dir: dict[str, str]) -> list[str]:
    """Each mapped package and every folder below it that holds a ``.py`` file, under the mapped name."""
    packages = []
    for name, folder in sorted(package_dir.items()):
        where = ROOT / folder
        subpackages = find_namespace_packages(where=str(where))
        packages.append(name)
        packages += [f"{name}.{sub}" for sub in subpackages
                     if any((where / sub.replace(".", "/")).glob("*.py"))]
    return sorted(packages)


PACKAGE_DIR = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]

setup(packages=discover_packages(PACKAGE_DIR))
