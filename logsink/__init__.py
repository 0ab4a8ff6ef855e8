"""logsink: a high-rate logging sink for Linux. Producers hand whole pages of log lines to the daemon without copying."""

import importlib as _importlib
from typing import TYPE_CHECKING, Any

from logsink._version import __version__

if TYPE_CHECKING:
    from logsink.aio import AsyncClient
    from logsink.client import Client

__all__ = ["AsyncClient", "Client", "__version__"]

# Public submodules, reachable as ``logsink.<name>`` after a bare ``import logsink`` (PEP 562): each is
# imported on first use, so ``import logsink`` does not pull in structlog, the daemon or the CLI.
_SUBMODULES = frozenset({"access", "aio", "bench", "cli", "client", "config", "daemon", "errors", "files", "forward",
                         "logging", "pipe", "protocol", "structlog"})


def __getattr__(name: str) -> Any:
    # Client and AsyncClient load the compiled core: only on first use, so that logsink.protocol and
    # logsink.config (which a daemon's tools and tests import) work without it.
    if name == "Client":
        from logsink.client import Client

        return Client
    if name == "AsyncClient":
        from logsink.aio import AsyncClient

        return AsyncClient
    if name in _SUBMODULES:
        return _importlib.import_module(f"{__name__}.{name}")  # also binds it here: later lookups skip this
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | _SUBMODULES | {"Client", "AsyncClient"})
