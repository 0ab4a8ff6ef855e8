"""structlog integration: a logger factory whose loggers append rendered records to a shared ``logsink.Client``."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from typing import Any

import structlog

from logsink.client import Client

__all__ = ["LogsinkLogger", "LogsinkLoggerFactory", "configure", "json_serializer"]


def json_serializer() -> Callable[..., str | bytes]:
    """The fastest JSON serializer available: orjson if installed (bytes out), else stdlib json."""
    try:
        import orjson  # type: ignore[import-not-found]
    except ImportError:
        return lambda obj, **kw: json.dumps(obj, separators=(",", ":"), default=str, ensure_ascii=False)
    return lambda obj, **kw: orjson.dumps(obj, default=str)


class LogsinkLogger:
    """A structlog logger whose every method appends the rendered event (str or bytes) as one record."""

    __slots__ = ("_client", "name")

    def __init__(self, client: Client, name: str | None = None):
        self._client = client
        self.name = name

    def msg(self, message: str | bytes) -> None:
        data = message.encode() if isinstance(message, str) else message
        # One record per event: a renderer's embedded newlines would split it, so escape them.
        if data.find(b"\n", 0, len(data) - 1) >= 0:
            data = data.rstrip(b"\n").replace(b"\n", b"\\n")
        self._client.write(data if data.endswith(b"\n") else data + b"\n")

    log = debug = info = warn = warning = msg
    fatal = failure = err = error = critical = exception = msg

    def flush(self) -> None:
        self._client.flush()


class LogsinkLoggerFactory:
    """``logger_factory`` for structlog: all loggers share one Client, created on first use.

    Pass ``client=`` to share an existing one, or Client options (``stream``, ``socket``, ...).
    """

    def __init__(self, stream: str = "app", *, client: Client | None = None, **client_options: Any):
        self.stream = stream
        self._client = client
        self._options = client_options
        self._lock = threading.Lock()

    @property
    def client(self) -> Client:
        if self._client is None:
            with self._lock:
                if self._client is None:
                    self._client = Client(self.stream, **self._options)
        return self._client

    def __call__(self, *args: Any) -> LogsinkLogger:
        return LogsinkLogger(self.client, name=args[0] if args and isinstance(args[0], str) else None)


def configure(stream: str = "app", *, level: int = logging.NOTSET, processors: list[Any] | None = None, **client_options: Any) -> LogsinkLoggerFactory:
    """Set up structlog to render JSON lines into logsink stream ``stream``; returns the factory.

    The default processors: contextvars, log level, ISO timestamp (UTC), stack info, exception
    text, JSON (stdlib json, or orjson if installed). Loggers are cached on first use.
    """
    factory = LogsinkLoggerFactory(stream, **client_options)
    if processors is None:
        processors = [
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(serializer=json_serializer()),
        ]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=factory,
        cache_logger_on_first_use=True,
    )
    return factory
