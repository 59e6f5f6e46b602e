"""The package list, discovered: entreg's packages and the top-level ``configs/`` folder installed as
``entreg.configs`` (``package-dir`` in pyproject.toml), each config group folder as a sub-package so that its yaml
files are package data. ``[tool.setuptools.packages.find]`` cannot do this: it names packages by their folders."""

from setuptools import find_namespace_packages, find_packages, setup

CONFIGS = find_namespace_packages(include=["configs", "configs.*"])  # config groups have no __init__.py
setup(packages=[*find_packages(include=["entreg", "entreg.*"]), *(f"entreg.{name}" for name in CONFIGS)])
