"""logsink: a high-rate logging sink for Linux. Producers hand whole pages of log lines to the daemon without copying."""

__version__ = "0.1.0"

from logsink.client import Client  # noqa: E402
from logsink.aio import AsyncClient  # noqa: E402

__all__ = ["AsyncClient", "Client", "__version__"]
