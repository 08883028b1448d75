"""Build script. The package metadata lives in pyproject.toml; this file exists to build the
compiled extension ``fastclip._C`` (C++ always, CUDA when a toolkit is found)."""

from setuptools import setup

setup()
