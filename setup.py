# cffi has no pyproject key for its builder; this one line wires it (see native/build_engine.py).
# logsink._fastlog is a plain CPython extension (it walks Python objects): structlog's default
# pipeline in C (native/ls_fastlog.c; it reaches the producer through logsink._core's pointers).
from setuptools import Extension, setup

FASTLOG = Extension(
    "logsink._fastlog",
    sources=["native/ls_fastlog.c"],
    include_dirs=["native"],
    extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Werror", "-Wno-missing-field-initializers"],
)

setup(cffi_modules=["native/build_engine.py:ffi"], ext_modules=[FASTLOG])
