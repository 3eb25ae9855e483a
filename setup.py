"""Which files the wheel holds; everything else is in pyproject.toml.

Packages are discovered (a new module or subpackage of schedsearch ships without a change here);
the built-in workloads, kept at the top of the repository where the README's commands name them
(workloads/level1/softmax.py), ship as the package data `schedsearch/workloads/`.
"""
from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["schedsearch", "schedsearch.*"]), "schedsearch.workloads"],
    package_dir={"schedsearch.workloads": "workloads"},
    package_data={"schedsearch.workloads": ["level*/*.py"]},
    exclude_package_data={"schedsearch.workloads": ["**/__pycache__/*"]},
)
