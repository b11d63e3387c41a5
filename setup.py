"""Packaging entry point; the metadata is in pyproject.toml ([project])."""

from setuptools import setup

setup()
