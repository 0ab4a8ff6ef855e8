"""logsink: a high-rate logging sink for Linux. Producers hand whole pages of log lines to the daemon without copying."""

from logsink._version import __version__
from logsink.client import Client
from logsink.aio import AsyncClient

__all__ = ["AsyncClient", "Client", "__version__"]
