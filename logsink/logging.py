"""stdlib ``logging`` integration: ``LogsinkHandler`` renders records as JSON lines and appends them to a Client."""

from __future__ import annotations

import errno
import json
import logging
import time
from typing import Any

from logsink.client import Client

try:
    from logsink import _fastlog  # type: ignore[attr-defined]
except ImportError:  # a build without the extension: handle() stays in Python
    _fastlog = None

__all__ = ["FastLogger", "JsonFormatter", "LogsinkHandler", "use_fast_loggers"]

_encode = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, default=str).encode
# Level names as the JSON shows them; logger names' bytes (a service has tens, not thousands).
_LEVELS: dict[str, bytes] = {}
NAME_CACHE = 4096


class JsonFormatter(logging.Formatter):
    """One JSON object per record: timestamp (ISO 8601, UTC), level, logger, message, exception text.

    ``extra_fields`` names LogRecord attributes to add as well (e.g. ``("process", "threadName")``).
    """

    def __init__(self, extra_fields: tuple[str, ...] = ()):
        super().__init__()
        self.extra_fields = tuple(extra_fields)
        self._sec = (-1, "")  # (second, its text): one attribute, so threads never pair them wrongly

    def _timestamp(self, created: float) -> str:
        # strftime per second, not per record: it costs more than the rest of the formatting.
        sec = int(created)
        cached = self._sec
        if cached[0] != sec:
            cached = self._sec = (sec, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec)))
        return f"{cached[1]}.{int((created - sec) * 1000):03d}Z"

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "timestamp": self._timestamp(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            if not record.exc_text:
                record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            doc["exception"] = record.exc_text
        if record.stack_info:
            doc["stack"] = self.formatStack(record.stack_info)
        for name in self.extra_fields:
            doc[name] = getattr(record, name, None)
        return _encode(doc)


class LogsinkHandler(logging.Handler):
    """A logging handler that appends each formatted record to logsink stream ``stream``.

    It formats outside any lock and holds none of its own while appending (the Client is
    thread-safe), so a slow formatter in one thread never stalls logging in another.
    ``logging.config.dictConfig`` can create it: ``{"()": "logsink.logging.LogsinkHandler", "stream": "app"}``
    or ``"class": "logsink.logging.LogsinkHandler"``.

    With ``fast_loggers`` (the default) creating it calls ``use_fast_loggers()``: loggers of the
    plain ``logging.Logger`` class become ``FastLogger``, which renders a record in C without
    making the LogRecord when this handler, with the default formatter and no filters, is the only
    one the record would reach. Pass ``fast_loggers=False`` to leave the logger classes alone.
    """

    def __init__(
        self,
        stream: str = "app",
        formatter: logging.Formatter | None = None,
        level: int | str = logging.NOTSET,
        flush_timeout: float | None = 5.0,
        fast_loggers: bool = True,
        **client_options: Any,
    ):
        super().__init__(level)
        self.setFormatter(formatter or JsonFormatter())
        # flush()/close() run at interpreter exit (logging.shutdown): never hang it on a stopped daemon.
        self.flush_timeout = flush_timeout
        self.client = Client(stream, **client_options)
        self._names: dict[str, bytes] = {}  # logger name -> its UTF-8 bytes
        if fast_loggers:
            # Half of a record's cost is the LogRecord (findCaller, __init__): FastLogger skips it
            # when this handler would be the record's only reader, with the same output.
            use_fast_loggers()

    def _handle_slow(self, record: logging.LogRecord) -> bool | logging.LogRecord:
        # Handler.handle would hold self.lock around emit(); the Client serialises appends itself.
        if self.filters:
            rv = self.filter(record)
            if not rv:
                return rv
            if isinstance(rv, logging.LogRecord):
                record = rv
        self.emit(record)
        return True

    # handle(): in C (logsink._fastlog.handler_handle) for a plain LogRecord, the default
    # JsonFormatter, no filters and no exception or stack text: the record's fields go straight to
    # the JSON line in the arena, the bytes format() would give. Everything else: _handle_slow.
    handle = _fastlog.handler_handle if _fastlog is not None else _handle_slow  # type: ignore[assignment]

    def __init_subclass__(cls, **kw: Any) -> None:
        # A subclass with its own emit/format/filter gets them called: the C path bypasses them.
        super().__init_subclass__(**kw)
        if any(name in cls.__dict__ for name in ("emit", "format", "filter", "_handle_slow")) and "handle" not in cls.__dict__:
            cls.handle = LogsinkHandler._handle_slow  # type: ignore[method-assign,assignment]

    def emit(self, record: logging.LogRecord) -> None:
        try:
            fmt = self.formatter
            if type(fmt) is JsonFormatter and not fmt.extra_fields and not record.stack_info:
                # The default format, rendered in C straight into the arena (same bytes as format()).
                if record.exc_info and not record.exc_text:
                    record.exc_text = fmt.formatException(record.exc_info)
                exc = record.exc_text
                level = _LEVELS.get(record.levelname)
                if level is None:
                    level = _LEVELS[record.levelname] = record.levelname.lower().encode()
                name = self._names.get(record.name)
                if name is None:
                    name = record.name.encode("utf-8", "backslashreplace")
                    if len(self._names) < NAME_CACHE:
                        self._names[record.name] = name
                if self.client.write_log_json(
                    record.created, level, name,
                    record.getMessage().encode("utf-8", "backslashreplace"),
                    exc.encode("utf-8", "backslashreplace") if exc else None,
                ):
                    return
            data = self.format(record).encode("utf-8", "backslashreplace")
            if b"\n" in data:  # a multi-line message stays one record (a custom formatter's output)
                data = data.replace(b"\n", b"\\n")
            self.client.write(data + b"\n")
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)

    def flush(self) -> None:
        """Return once every record emitted so far is in the stream's file."""
        try:
            self.client.flush(timeout=self.flush_timeout)
        except (ConnectionError, TimeoutError, OSError):
            pass  # Handler.flush must not raise; the records' fate shows in client.stats()

    def close(self) -> None:
        try:
            self.client.close(timeout=self.flush_timeout)
        except (ConnectionError, TimeoutError, OSError):
            pass
        finally:
            super().close()


def _resolve(client: Client) -> int:
    """The address of the client's C producer (0: closed); the C path caches it per connection."""
    from logsink._native import ffi

    if client._closed or client._p == ffi.NULL:
        return 0
    return int(ffi.cast("uintptr_t", client._p))


def _write_failed(client: Client, ret: int, data: bytes) -> None:
    """A write the C path could not complete: reconnect in a forked child, else the Client's error
    (handle() then passes the record to emit(), whose handleError reports it)."""
    if ret == -errno.ECHILD:
        client._reopen_after_fork()
        client.write(data)
    elif ret == -errno.EBADF or (ret == -errno.ESHUTDOWN and client._closed):
        client.write(data)  # closed (the C path may still hold its address): the Client's own ValueError
    else:
        raise client._error(ret, "write")


def _logger_log(logger: logging.Logger, level: int, msg: object, args: Any) -> bool:
    return False  # without logsink._fastlog: always the stdlib path (replaced below)


class FastLogger(logging.Logger):
    """A ``logging.Logger`` that skips making a LogRecord nobody would see.

    When the record would reach exactly one handler, a ``LogsinkHandler`` with the default
    ``JsonFormatter`` and no filters, the logger has no filters, the record factory is
    ``logging.LogRecord`` and the call has no ``exc_info``, ``extra`` or ``stack_info``, the line
    is rendered in C from the call's arguments: the same bytes, without ``findCaller`` and
    ``LogRecord.__init__``. Otherwise it is ``logging.Logger``. See ``use_fast_loggers``.
    """

    def _log(self, level: int, msg: object, args: Any, exc_info: Any = None, extra: Any = None, stack_info: bool = False, stacklevel: int = 1) -> None:
        if exc_info is None and extra is None and not stack_info and _logger_log(self, level, msg, args):
            return
        super()._log(level, msg, args, exc_info, extra, stack_info, stacklevel + 1)


class _FastRootLogger(FastLogger, logging.RootLogger):
    """The root logger, as a FastLogger (``logging.info()`` and friends)."""


def use_fast_loggers() -> None:
    """Make every ``logging.Logger`` a ``FastLogger``: those that exist (their class is changed in
    place; their handlers, filters and levels stay) and those made later (``logging.setLoggerClass``).

    Loggers of another class (a library's own subclass) are left alone. Opt-in: it changes a
    process-wide setting, and ``findCaller`` no longer runs for the records that skip LogRecord,
    which only a custom record factory or a handler could observe, and those turn the skip off.
    """
    if _fastlog is None:
        return
    if logging.getLoggerClass() is logging.Logger:
        logging.setLoggerClass(FastLogger)
    for lg in list(logging.Logger.manager.loggerDict.values()):
        if type(lg) is logging.Logger:
            lg.__class__ = FastLogger
    if type(logging.root) is logging.RootLogger:
        logging.root.__class__ = _FastRootLogger


if _fastlog is not None:
    from logsink._native import ffi as _ffi
    from logsink._native import lib as _lib

    _logger_log = _fastlog.logger_log  # noqa: F811
    _fastlog.handler_setup(LogsinkHandler, JsonFormatter, logging.LogRecord, logging, _resolve, _write_failed,
                           int(_ffi.cast("uintptr_t", _ffi.addressof(_lib, "ls_producer_try_write"))),
                           int(_ffi.cast("uintptr_t", _ffi.addressof(_lib, "ls_producer_write"))))
