"""Fuzz targets against a live daemon, one module per input path (see README.md).

A package so that this folder's ``conftest.py`` and ``harness.py`` import as ``fuzz.*`` and never
shadow the suite's top-level ``conftest`` module, which the harness imports (``Daemon``).
"""
