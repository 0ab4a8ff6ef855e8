"""structlog integration: a logger factory whose loggers append rendered records to a shared ``logsink.Client``."""

from __future__ import annotations

import datetime
import enum
import errno
import json
import logging
import threading
import uuid
from collections.abc import Callable
from typing import Any

import structlog
from structlog._log_levels import NAME_TO_LEVEL
from structlog._native import _maybe_interpolate

from logsink.client import Client

try:
    from logsink import _fastlog  # type: ignore[attr-defined]
except ImportError:  # a build without the extension: everything takes structlog's Python path
    _fastlog = None

__all__ = ["LogsinkLogger", "LogsinkLoggerFactory", "configure", "json_serializer", "native_stats"]

try:
    import orjson  # type: ignore[import-not-found,unused-ignore]
except ImportError:
    orjson = None  # type: ignore[assignment,unused-ignore]

# The types the serializer writes itself, not through default=str: a value of one of these that is
# not exactly str/int/float/dict/list/tuple makes the fused stage hand the event to the serializer.
if orjson is not None:
    _NATIVE_TYPES: tuple[type, ...] = (str, int, float, dict, list, tuple, datetime.date, datetime.time, uuid.UUID, enum.Enum)
    if hasattr(orjson, "Fragment"):
        _NATIVE_TYPES += (orjson.Fragment,)
else:
    _NATIVE_TYPES = (str, int, float, dict, list, tuple)


def _serialize_json(obj: Any, **kw: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), default=str, ensure_ascii=False)


def _serialize_orjson(obj: Any, **kw: Any) -> bytes:
    return orjson.dumps(obj, default=str)  # type: ignore[no-any-return]


def json_serializer() -> Callable[..., str | bytes]:
    """The fastest JSON serializer available: orjson if installed (bytes out), else stdlib json.

    Both take ``default=str`` for values JSON has no type for (structlog's JSONRenderer passes its
    own ``default``; these ignore it)."""
    return _serialize_json if orjson is None else _serialize_orjson


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


# -- the fused default pipeline (native/ls_fastlog.c) ------------------------------------------

def native_stats() -> dict[str, int]:
    """Events the fused C stage rendered and wrote (``fused``), and events it handed to the Python
    renderer because a value was not one it renders exactly as the serializer does (``fallbacks``),
    since the process started (all ``configure()`` calls)."""
    if _fastlog is None:
        return {"fused": 0, "fallbacks": 0}
    return dict(_fastlog.structlog_stats())


def _resolve(client: Client) -> int:
    """The address of the client's C producer (0: closed); the stage caches it per connection."""
    from logsink._native import ffi

    if client._closed or client._p == ffi.NULL:
        return 0
    return int(ffi.cast("uintptr_t", client._p))


def _write_failed(client: Client, ret: int, data: bytes) -> None:
    """A write the stage could not complete: reconnect in a forked child, else the Client's error."""
    if ret == -errno.EBADF or (ret == -errno.ESHUTDOWN and client._closed):  # closed: the Client says so in its own words
        client.write(data)
    elif ret == -errno.ECHILD:
        client._reopen_after_fork()
        client.write(data)
    elif ret == -errno.EINVAL and not data:
        return
    else:
        raise client._error(ret, "write")


def _fused_wrapper(level: int, processors: list[Any], stage: Any) -> type:
    """make_filtering_bound_logger(level), with its enabled level methods going to the stage.

    Levels below ``level`` keep structlog's no-op methods; async methods, ``log()`` and loggers
    whose processors changed since take structlog's own path (the stage checks on each call)."""
    base = structlog.make_filtering_bound_logger(level)
    methods: dict[str, Any] = {}
    for name in ("debug", "info", "warning", "error", "critical"):
        if NAME_TO_LEVEL[name] >= level:
            # A C method descriptor: log.info(event, **kw) reaches the stage with no Python frame.
            methods[name] = stage.method(name)
    for alias, name in (("warn", "warning"), ("fatal", "critical"), ("msg", "info")):
        if name in methods:
            methods[alias] = methods[name]
    return type(base.__name__, (base,), methods)


def _default_processors() -> list[Any]:
    return [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
        structlog.processors.format_exc_info,
        structlog.processors.JSONRenderer(serializer=json_serializer()),
    ]


def _make_stage(processors: list[Any]) -> Any:
    from logsink._native import ffi, lib

    def address(fn: str) -> int:
        return int(ffi.cast("uintptr_t", ffi.addressof(lib, fn)))

    return _fastlog.Stage(
        processors=processors, logger_type=LogsinkLogger, default=str, native_types=_NATIVE_TYPES, stdlib=orjson is None,
        stack_proc=processors[3], exc_proc=processors[4], renderer=processors[5], interpolate=_maybe_interpolate,
        resolve=_resolve, failed=_write_failed, try_write=address("ls_producer_try_write"), write=address("ls_producer_write"),
    )


def configure(stream: str = "app", *, level: int = logging.NOTSET, processors: list[Any] | None = None, **client_options: Any) -> LogsinkLoggerFactory:
    """Set up structlog to render JSON lines into logsink stream ``stream``; returns the factory.

    The default processors: contextvars, log level, ISO timestamp (UTC), stack info, exception
    text, JSON (orjson if installed, else stdlib json, both with ``default=str``). Loggers are
    cached on first use. With the default processors the level methods run them fused in C
    (``native_stats()`` counts it), with the same output; a ``processors`` list of your own runs
    in structlog as usual.
    """
    factory = LogsinkLoggerFactory(stream, **client_options)
    wrapper: type = structlog.make_filtering_bound_logger(level)
    if processors is None:
        processors = _default_processors()
        if _fastlog is not None:
            stage = _make_stage(processors)
            wrapper = _fused_wrapper(level, processors, stage)
    structlog.configure(
        processors=processors,
        wrapper_class=wrapper,
        logger_factory=factory,
        cache_logger_on_first_use=True,
    )
    return factory
