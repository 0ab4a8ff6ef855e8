"""The one version source: pyproject.toml, native/build_engine.py and clients/c/Makefile read this line."""

__version__ = "0.1.0"
