"""Installing sightstream claims only its own name in site-packages."""

from __future__ import annotations

import tomllib
from pathlib import Path

from setuptools import find_packages

ROOT = Path(__file__).parent.parent.parent


def test_only_the_sightstream_package_is_installed():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    packages = find_packages(str(ROOT), include=config["include"])
    assert packages and all(p == "sightstream" or p.startswith("sightstream.") for p in packages)
