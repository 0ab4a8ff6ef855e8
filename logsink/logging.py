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

__all__ = ["JsonFormatter", "LogsinkHandler"]

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
    """

    def __init__(
        self,
        stream: str = "app",
        formatter: logging.Formatter | None = None,
        level: int | str = logging.NOTSET,
        flush_timeout: float | None = 5.0,
        **client_options: Any,
    ):
        super().__init__(level)
        self.setFormatter(formatter or JsonFormatter())
        # flush()/close() run at interpreter exit (logging.shutdown): never hang it on a stopped daemon.
        self.flush_timeout = flush_timeout
        self.client = Client(stream, **client_options)
        self._names: dict[str, bytes] = {}  # logger name -> its UTF-8 bytes

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
    elif ret == -errno.EBADF:
        client.write(data)  # closed: the Client's own ValueError
    else:
        raise client._error(ret, "write")


if _fastlog is not None:
    from logsink._native import ffi as _ffi
    from logsink._native import lib as _lib

    _fastlog.handler_setup(JsonFormatter, logging.LogRecord, _resolve, _write_failed,
                           int(_ffi.cast("uintptr_t", _ffi.addressof(_lib, "ls_producer_try_write"))),
                           int(_ffi.cast("uintptr_t", _ffi.addressof(_lib, "ls_producer_write"))))
