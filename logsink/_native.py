"""The compiled core (native/, built by cffi at install) and the one helper that turns -errno into OSError."""

from __future__ import annotations

try:
    from logsink._core import ffi, lib  # type: ignore[import-not-found]
except ImportError as exc:  # pragma: no cover - only on a broken install
    raise ImportError(
        "logsink's native core is not built: install the package with pip (it compiles native/ with "
        "cffi; needs gcc and the Python headers)"
    ) from exc

from logsink._version import __version__
from logsink.errors import error_for

_built = ffi.string(lib.ls_native_version()).decode()
if _built != __version__:  # pragma: no cover
    raise ImportError(f"logsink native core is version {_built}, the Python package {__version__}: reinstall")

ENGINE_NAMES = {
    lib.LS_ENGINE_AUTO: "auto",
    lib.LS_ENGINE_IO_URING: "io_uring",
    lib.LS_ENGINE_SPLICE: "splice",
    lib.LS_ENGINE_READWRITE: "readwrite",
}
ENGINE_KINDS = {name: kind for kind, name in ENGINE_NAMES.items()}


def check(ret: int, what: str, filename: str | None = None) -> int:
    """Return ``ret`` if >= 0; else raise OSError(errno, "<what>: <strerror>") (errors.error_for)."""
    if ret < 0:
        raise error_for(ret, what, filename=filename)
    return ret
