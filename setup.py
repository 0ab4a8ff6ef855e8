# cffi has no pyproject key for its builder; this one line wires it (see native/build_engine.py).
from setuptools import setup

setup(cffi_modules=["native/build_engine.py:ffi"])
