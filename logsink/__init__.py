"""logsink: a high-rate logging sink for Linux. Producers hand whole pages of log lines to the daemon without copying."""

from typing import TYPE_CHECKING, Any

from logsink._version import __version__

if TYPE_CHECKING:
    from logsink.aio import AsyncClient
    from logsink.client import Client

__all__ = ["AsyncClient", "Client", "__version__"]


def __getattr__(name: str) -> Any:
    # Client and AsyncClient load the compiled core: only on first use, so that logsink.protocol and
    # logsink.config (which a daemon's tools and tests import) work without it.
    if name == "Client":
        from logsink.client import Client

        return Client
    if name == "AsyncClient":
        from logsink.aio import AsyncClient

        return AsyncClient
    raise AttributeError(f"module 'logsink' has no attribute {name!r}")
