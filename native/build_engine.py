"""cffi builder for logsink._native: the engine (daemon) and the transport (producers), from native/*.c."""

import pathlib
import re
import runpy

from cffi import FFI

# setuptools refuses absolute source paths: name them relative to the project root (the build cwd).
HERE = pathlib.Path("native")
# The one version source (pyproject.toml reads it too); compiled in, and checked at import (logsink/_native.py).
_VERSION_LINE = re.compile(r'^__version__ = "([^"]+)"$', re.M)


def read_version(path: pathlib.Path = pathlib.Path("logsink/_version.py")) -> str:
    m = _VERSION_LINE.search(path.read_text())
    if not m:
        raise RuntimeError(f'{path} has no line __version__ = "X.Y.Z": the cffi build takes the version from it')
    return m.group(1)


VERSION = read_version()
# Warnings are errors in both C builds (here and clients/c/Makefile); see the set_source call.
CFLAGS = ["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Werror"]

# The Python-visible API is exactly what these headers declare: the cdef is generated from them
# (so a struct can never differ between C and Python), plus the frame constants and the version.
# The C side of the protocol (native/ls_protocol_gen.h) is generated from logsink/protocol.py:
# regenerate it before compiling, so this build never uses a stale table (gen_protocol.py says why
# the header is also committed; a tree without protocol.py builds with the committed one).
_GEN = runpy.run_path(str(HERE / "gen_protocol.py"))
if _GEN["PROTOCOL"].exists():
    _GEN["main"]([])
# Python sees the message kinds (enum ls_msg_kind) as the generated header declares them.
_MSG_KINDS = re.search(r"^enum ls_msg_kind \{.*?^\};", (HERE / "ls_protocol_gen.h").read_text(), re.M | re.S)
assert _MSG_KINDS, "native/ls_protocol_gen.h declares no enum ls_msg_kind: rerun native/gen_protocol.py"

HEADERS = ("ls_engine.h", "ls_transport.h", "ls_producer.h", "ls_forward.h", "ls_render.h", "ls_files.h")
EXTRA_CDEF = """
#define LS_EFRAME_MAGIC ...
#define LS_EFRAME_VERSION ...
#define LS_EFRAME_LENGTH ...
#define LS_EFRAME_RECORDS ...
#define LS_FRAME_HEADER_SIZE ...
#define LS_MAX_BATCH_PAYLOAD ...
#define LS_FRAME_VERDICT_BASE ...
const char *ls_native_version(void);
""" + _MSG_KINDS.group(0)
_DEFINE = re.compile(r"^#define\s+([A-Z][A-Z0-9_]*)\s+\S")


def cdef_from_header(text: str) -> str:
    """A header as cffi's cdef wants it: preprocessor lines dropped, except valued #defines, which
    become `#define NAME ...` (cffi then takes the value from the compiled C)."""
    out = []
    for line in text.splitlines():
        if line.lstrip().startswith("#"):
            m = _DEFINE.match(line.strip())
            if m:
                out.append(f"#define {m.group(1)} ...")
            continue
        out.append(line)
    return "\n".join(out)


CDEF = "\n".join(cdef_from_header((HERE / h).read_text()) for h in HEADERS) + EXTRA_CDEF

ffi = FFI()
ffi.cdef(CDEF)
ffi.set_source(
    "logsink._core",
    f'#include "ls_engine.h"\n#include "ls_frame.h"\n#include "ls_transport.h"\n#include "ls_producer.h"\n#include "ls_forward.h"\n#include "ls_render.h"\n#include "ls_files.h"\n'
    f'const char *ls_native_version(void) {{ return "{VERSION}"; }}\n',
    sources=[str(HERE / name) for name in ("ls_engine.c", "ls_engine_life.c", "ls_engine_uring.c", "ls_engine_epoll.c", "ls_ring.c", "ls_transport.c", "ls_producer.c", "ls_producer_send.c", "ls_producer_msg.c", "ls_producer_conn.c", "ls_msgpack.c", "ls_forward.c", "ls_forward_plan.c", "ls_forward_relp.c", "ls_forward_uring.c", "ls_render.c", "ls_zerocopy.c", "ls_files.c")],
    include_dirs=[str(HERE)],
    extra_compile_args=CFLAGS,
    # The producer keeps per-thread state whose destructor runs at thread exit: never unmap the code.
    extra_link_args=["-Wl,-z,nodelete"],
    libraries=["pthread"],
)

if __name__ == "__main__":
    ffi.compile(verbose=True)
