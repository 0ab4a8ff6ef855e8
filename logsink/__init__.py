"""logsink: a high-rate logging sink for Linux. Producers hand whole pages of log lines to the daemon without copying."""

import importlib as _importlib

from logsink._version import __version__
from logsink.client import Client
from logsink.aio import AsyncClient

__all__ = ["AsyncClient", "Client", "__version__"]

# Public submodules, reachable as ``logsink.<name>`` after a bare ``import logsink`` (PEP 562): each is
# imported on first use, so ``import logsink`` does not pull in structlog, the daemon or the CLI.
_SUBMODULES = frozenset({"access", "aio", "bench", "cli", "client", "config", "daemon", "files", "forward",
                         "logging", "pipe", "protocol", "structlog"})


def __getattr__(name: str):
    if name in _SUBMODULES:
        return _importlib.import_module(f"{__name__}.{name}")  # also binds it here: later lookups skip this
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | _SUBMODULES)
