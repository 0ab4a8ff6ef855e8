"""One error policy: C -errno and protocol ERROR codes become exceptions here, and every bad setting is a ConfigError.

Used by the Client, the AsyncClient, the daemon and the forwarder (through ``_native.check``). It
imports nothing of logsink's but the protocol's code names, and never the compiled core: config.py
and protocol users load it without the core.
"""

from __future__ import annotations

import errno
import os

from logsink import protocol


class ConfigError(ValueError):
    """A setting that cannot be used (config file, command line, forward or access rules); the
    message names the setting and says what to write instead."""


# What kind of failure an errno is, for an API caller. Everything else stays a plain OSError
# (Python picks its subclass by errno: FileNotFoundError, ...).
_KIND: dict[int, type[Exception]] = {
    errno.ETIMEDOUT: TimeoutError,
    errno.ESHUTDOWN: ConnectionError,    # the daemon is stopping
    errno.ECONNRESET: ConnectionError,   # the producer is broken: the daemon's ERROR, or it went away
    errno.EPIPE: ConnectionError,
    errno.ECONNREFUSED: ConnectionError,
    errno.EPERM: PermissionError,        # an impostor daemon (SO_PEERCRED)
    errno.EACCES: PermissionError,       # the access rules said no
    errno.EINVAL: ValueError,            # a bad argument: the caller's to fix
    errno.EMSGSIZE: ValueError,          # a record larger than a segment
}


def error_for(err: int, what: str, why: str | None = None, filename: str | None = None,
              *, kind: type[Exception] | None = None) -> Exception:
    """The exception for ``err`` (an errno, or a C function's -errno) from ``what``.

    With ``why`` - a sentence for the user that says what went wrong and what to do (the C
    producer's last_error, or the caller's) - the class says what kind of failure it is (``kind``,
    else TimeoutError, ConnectionError, PermissionError or ValueError by errno) and ``str()`` is
    exactly ``why``; an errno of no such kind gives ``OSError(err, "<what>: <why>")``. Without
    ``why`` (an internal call failed): ``OSError(err, "<what>: <strerror>", filename)``.
    """
    err = abs(err)
    if not why:
        return OSError(err, f"{what}: {os.strerror(err)}", filename)
    cls = kind or _KIND.get(err)
    if cls is None:
        return OSError(err, f"{what}: {why}", filename)
    exc = cls(why)
    if isinstance(exc, OSError):
        exc.errno = err  # for callers that switch on it (strerror stays unset, so str() is exactly why)
    return exc


def exception_for_code(code: str, message: str) -> OSError:
    """The exception for a daemon's ERROR ``code`` (protocol.E_*), as the C producer maps it:
    forbidden (the access rules) is a PermissionError; every other refusal a ConnectionError."""
    if code == protocol.E_FORBIDDEN:
        return _with_errno(PermissionError(message), errno.EACCES)
    return _with_errno(ConnectionError(message), errno.ECONNREFUSED)


def _with_errno(exc: OSError, err: int) -> OSError:
    exc.errno = err
    return exc
