"""The producer: ``logsink.Client`` hands whole pages of records to the daemon; a thin layer over the C producer.

The segment arena, the control protocol, pinning until RELEASE and the background thread live in
``native/ls_producer.c`` - the same code ``clients/c`` (liblogsink) is built from. This module maps
Python arguments and errors onto it, and handles what only Python knows: fork (reconnect lazily
in the child) and process exit (flush what is left: at interpreter exit, and when a multiprocessing
worker leaves through os._exit).
"""

from __future__ import annotations

import atexit
import errno
import os
import sys
import weakref
from typing import Any

from logsink import protocol
from logsink._native import ffi, lib
from logsink.errors import error_for

# The C producer's defaults (native/ls_producer.h), repeated for documentation and the benchmark:
# 4 segments of 1 MiB on huge pages; a half-full segment goes out after 0.2 s.
DEFAULT_SEGMENT_SIZE = 1 << 20
DEFAULT_SEGMENTS = 4
DEFAULT_FLUSH_INTERVAL = 0.2
PAGE = 4096

_TRANSPORT_IDS = {
    "vmsplice": lib.LS_TRANSPORT_VMSPLICE,
    "copy": lib.LS_TRANSPORT_COPY,
    "zerocopy": lib.LS_TRANSPORT_ZEROCOPY,
    "shm": lib.LS_TRANSPORT_SHM,
}

# Every open Client: flushed and closed at interpreter exit, reconnected lazily in a forked child.
_live: weakref.WeakSet[Client] = weakref.WeakSet()
# At exit, a stopped daemon must not hang the interpreter: flush at most this long per client.
EXIT_FLUSH_TIMEOUT = 5.0


def _close_all_at_exit() -> None:
    for client in list(_live):
        try:
            client.close(timeout=EXIT_FLUSH_TIMEOUT)
        except Exception:
            pass


atexit.register(_close_all_at_exit)

# multiprocessing children (Pool workers, Process targets) under fork and forkserver end with
# os._exit: atexit never runs there, only multiprocessing.util's finalizers. So a process that
# opens a Client with multiprocessing loaded also registers _close_all_at_exit as a finalizer.
# A child's bootstrap clears that registry after a fork (and forkserver imports the main module,
# opening its module-level Clients, before that), so an after-fork hook registers it again there.
# Priority: after every other finalizer (they may still log), the order atexit would give.
_EXIT_FINALIZER_PRIORITY = -100
_exit_finalizer: Any = None
_after_fork_hooked = False


class _AfterForkAnchor:
    """multiprocessing keeps after-fork hooks in a WeakValueDictionary: this object keeps ours."""


_after_fork_anchor = _AfterForkAnchor()


def _register_exit_finalizer() -> None:
    global _exit_finalizer, _after_fork_hooked
    if "multiprocessing" not in sys.modules:
        return  # its children import it before anything else: this is no multiprocessing child
    from multiprocessing import util

    if not _after_fork_hooked:
        util.register_after_fork(_after_fork_anchor, lambda _anchor: _register_exit_finalizer())
        _after_fork_hooked = True
    if _exit_finalizer is None or not _exit_finalizer.still_active():
        _exit_finalizer = util.Finalize(None, _close_all_at_exit, exitpriority=_EXIT_FINALIZER_PRIORITY)


def _ms(timeout: float | None) -> int:
    return -1 if timeout is None else max(0, int(timeout * 1000))


class Client:
    """A producer for one stream. Thread-safe; use as a context manager or call ``close()``.

    ``write(data)`` takes one or more whole records (each ending in ``\\n``) and returns once they
    are in the arena; ``flush()`` returns once every byte written before it is in the stream's file.

    Before it sends anything, the client checks with SO_PEERCRED that the daemon runs as
    ``expected_uid`` (default: this process's uid) or root, and raises PermissionError if not: a
    socket path in a world-writable directory can be squatted by another user. The same
    PermissionError comes when the daemon's access rules do not let this uid write ``stream``.

    ``transport``: locally ``"vmsplice"`` (``"auto"``: lend the arena's pages through the data pipe),
    ``"shm"`` (the arena is a sealed memfd the daemon maps; the pipe carries only 32-byte
    descriptors, so batches are not capped by its size) or ``"copy"``; over TCP ``"zerocopy"``
    (``"auto"``) or ``"copy"``.

    Over TCP with ``transport="zerocopy"``, ``zc_copied_switch`` completions in a row that the kernel
    reports as copied anyway (always so on loopback) turn MSG_ZEROCOPY off for the connection
    (default 32; 0 = never).
    With ``reconnect=True`` (the default) a daemon that goes away (restarted, killed, stopping)
    does not end the client: it reconnects by itself with backoff (50 ms doubling to 2 s) and
    resends every batch the daemon had not released, in order. Records written meanwhile wait in
    the arena (``on_full`` applies once it is full); ``flush()`` waits, up to its timeout, for
    the reconnect and the releases. Delivery is at-least-once: see docs/architecture.md,
    "Reconnect and delivery guarantees". ``reconnect=False`` fails fast instead: ConnectionError
    on every call once the daemon is gone.
    """

    def __init__(
        self,
        stream: str,
        *,
        socket: str | None = None,
        address: str | None = None,
        transport: str = "auto",
        segment_size: int | None = None,
        segments: int | None = None,
        on_full: str = "block",
        timeout: float | None = None,
        flush_interval: float | None = DEFAULT_FLUSH_INTERVAL,
        expected_uid: int | None = None,
        zc_copied_switch: int | None = None,
        reconnect: bool = True,
    ):
        try:
            protocol.validate_stream_name(stream)
        except protocol.ProtocolError as exc:
            raise ValueError(exc.reason) from None
        if address is not None and not address.startswith("tcp://"):
            raise ValueError(f"address {address!r} must look like tcp://HOST:PORT")
        auto = transport == "auto"
        if auto:  # locally shm (measured ahead of vmsplice: docs/performance.md), stepping down if refused
            transport = "zerocopy" if address else "shm"
        allowed = protocol.TCP_TRANSPORTS if address else protocol.LOCAL_TRANSPORTS
        if transport not in allowed:
            where = ("over TCP (shm and vmsplice are for the local socket)" if address
                     else "on the local socket (zerocopy is for address='tcp://...')")
            raise ValueError(f"transport {transport!r} is not one of 'auto', {', '.join(map(repr, allowed))} {where}")
        if on_full not in ("block", "drop"):
            raise ValueError(f"on_full {on_full!r} is not 'block' or 'drop'")
        seg = DEFAULT_SEGMENT_SIZE if segment_size is None else segment_size
        nseg = DEFAULT_SEGMENTS if segments is None else segments
        if seg < PAGE or seg % PAGE or seg > protocol.MAX_BATCH_PAYLOAD:
            raise ValueError(f"segment_size {seg} must be a multiple of {PAGE} between {PAGE} and {protocol.MAX_BATCH_PAYLOAD}")
        if nseg < 1:
            raise ValueError(f"segments must be >= 1, got {nseg}")
        if expected_uid is not None and (not isinstance(expected_uid, int) or not 0 <= expected_uid < 2**32 - 1):
            raise ValueError(f"expected_uid must be a uid (0 .. 4294967294) or None (your own), got {expected_uid!r}")
        if zc_copied_switch is not None and (type(zc_copied_switch) is not int or not 0 <= zc_copied_switch < 2**32):
            raise ValueError(f"zc_copied_switch must be an int in 0 .. 4294967295 (0 = never switch) or None (default "
                             f"{lib.LS_DEFAULT_ZC_COPIED_SWITCH}), got {zc_copied_switch!r}")
        self.stream = stream
        self.transport = transport
        self.segment_size = seg
        self.segments = nseg
        self.on_full = on_full
        self.timeout = timeout
        self.flush_interval = flush_interval
        self.address = address
        self._socket = address or socket
        self._opts = ffi.new("struct ls_producer_opts *")
        lib.ls_producer_opts_init(self._opts)
        self._opts.transport = _TRANSPORT_IDS[transport]
        self._opts.segment_size = seg
        self._opts.segments = nseg
        self._opts.on_full = lib.LS_ON_FULL_DROP if on_full == "drop" else lib.LS_ON_FULL_BLOCK
        self._opts.timeout_ms = _ms(timeout)
        self._opts.flush_interval_ms = 0 if not flush_interval else max(1, int(flush_interval * 1000))
        # The daemon must run as this uid or root (SO_PEERCRED, checked in C before HELLO).
        self._opts.expected_uid = -1 if expected_uid is None else expected_uid
        if zc_copied_switch is not None:  # TCP zerocopy: COPIED completions in a row that turn it off
            self._opts.zc_copied_switch = zc_copied_switch
        self.reconnect = bool(reconnect)
        self._opts.reconnect = 1 if reconnect else 0
        self._p = ffi.NULL
        self._closed = False
        try:
            self._open()
        except ConnectionError as exc:
            # auto on a daemon that refuses the shm arena (an older daemon: bad-message; an arena over its
            # max_arena: bad-frame): step down to vmsplice, as the engines step down their ladder.
            if not (auto and transport == "shm" and any(c in str(exc) for c in (protocol.E_BAD_MESSAGE, protocol.E_BAD_FRAME))):
                raise
            self.transport = "vmsplice"
            self._opts.transport = _TRANSPORT_IDS["vmsplice"]
            self._open()
        _live.add(self)

    # -- connection -------------------------------------------------------------------------------
    def _open(self) -> None:
        out = ffi.new("struct ls_producer **")
        path = self._socket.encode() if self._socket else ffi.NULL
        ret = lib.ls_producer_open(self.stream.encode(), path, self._opts, out)
        if ret < 0:
            why = ffi.string(lib.ls_producer_last_error(ffi.NULL)).decode(errors="replace")  # says what to do
            if ret in (-errno.EPERM, -errno.EACCES):  # an impostor daemon, or the access rules said no
                raise error_for(ret, "connect", why or os.strerror(-ret))
            # Any other failure to connect (a timeout too) is a ConnectionError: there is no daemon to talk to.
            raise error_for(ret, "connect", why or f"cannot connect to the logsink daemon: {os.strerror(-ret)}", kind=ConnectionError)
        self._p = out[0]
        engine = ffi.new("char[32]")
        self.producer_id = lib.ls_producer_info(self._p, engine, 32)
        self.engine = ffi.string(engine).decode()
        st = ffi.new("struct ls_producer_stats *")
        lib.ls_producer_stats(self._p, st)
        self.pipe_size = st.pipe_size
        _register_exit_finalizer()

    def _reopen_after_fork(self) -> None:
        """In a forked child: release our copies of the parent's connection (its arena is not
        mapped here: MADV_DONTFORK) and connect anew. The parent's unsent records stay the parent's."""
        lib.ls_producer_close(self._p)  # -ECHILD: frees only the child's copies
        self._p = ffi.NULL
        self._open()

    def _error(self, ret: int, what: str) -> Exception:
        """The Python exception for a -errno from the C producer (errors.error_for), with the C side's
        last_error as its message, or a sentence of ours where it has none."""
        err = -ret
        why = ffi.string(lib.ls_producer_last_error(self._p)).decode(errors="replace") if self._p != ffi.NULL else ""
        if not why:
            why = {
                errno.ETIMEDOUT: f"{what} of stream {self.stream!r} timed out after {self.timeout} s",
                errno.ESHUTDOWN: f"the logsink daemon is shutting down; stream {self.stream!r} takes no more records",
                errno.ECONNRESET: f"the logsink daemon is gone ({what})",
                errno.EPIPE: f"the logsink daemon is gone ({what})",
                errno.ECONNREFUSED: f"the logsink daemon is gone ({what})",
                errno.EINVAL: os.strerror(err),
                errno.EMSGSIZE: os.strerror(err),
            }.get(err, "")
        return error_for(err, what, why)

    def _handle(self) -> Any:
        if self._closed:
            raise ValueError(f"I/O on a closed logsink.Client (stream {self.stream!r})")
        return self._p

    # -- public API -------------------------------------------------------------------------------
    def write(self, data: bytes) -> None:
        """Append one or more whole records (each ending in ``\\n``). Blocks or drops per ``on_full``."""
        p = self._handle()
        ret = lib.ls_producer_write(p, data if type(data) is bytes else ffi.from_buffer(data), len(data))
        if ret < 0:
            if ret == -errno.ECHILD:
                self._reopen_after_fork()
                return self.write(data)
            if ret == -errno.EINVAL and len(data) == 0:
                return None
            raise self._error(ret, "write")
        return None

    def write_log_json(self, created: float, level: bytes, logger: bytes, message: bytes, exception: bytes | None = None) -> bool:
        """Render one log record as a JSON line (the format of logsink.logging.JsonFormatter, the
        timestamp from ``created``) straight into the arena. False if it may not fit one segment
        (render it yourself and use write())."""
        ret = lib.ls_producer_write_log_json(
            self._handle(), created, level, len(level), logger, len(logger), message, len(message),
            exception if exception is not None else ffi.NULL, len(exception) if exception is not None else 0,
        )
        if ret == 0:
            return True
        if ret == -errno.EMSGSIZE:
            return False
        if ret == -errno.ECHILD:
            self._reopen_after_fork()
            return self.write_log_json(created, level, logger, message, exception)
        raise self._error(ret, "write")

    def splice_from(self, fd: int, nbytes: int, records: int) -> None:
        """Move ``nbytes`` (whole records, ``records`` of them, waiting in the pipe ``fd``) to the
        daemon with splice(2): no copy through user space. Used by ``logsink pipe``. With
        ``transport="shm"`` they are read into an arena segment instead (one copy) and handed over
        as a batch: at most ``max_batch`` bytes (ValueError, nothing read)."""
        ret = lib.ls_producer_splice_from(self._handle(), fd, nbytes, records)
        if ret < 0:
            raise self._error(ret, "splice")

    def flush(self, timeout: float | None = None) -> None:
        """Return once every record written before this call is in the stream's file.

        Raises TimeoutError after ``timeout`` seconds, ConnectionError if the daemon went away, and
        OSError if the daemon reported batches it could not write (e.g. disk full).
        """
        if self._closed:
            return
        ret = lib.ls_producer_flush(self._p, _ms(timeout))
        if ret == -errno.ECHILD:
            return  # nothing written in this process yet
        if ret == -errno.EIO:
            why = ffi.string(lib.ls_producer_last_error(self._p)).decode(errors="replace")
            raise OSError(errno.EIO, f"the logsink daemon could not write part of stream {self.stream!r}: {why}")
        if ret == -errno.ETIMEDOUT:
            raise error_for(ret, "flush", f"flush of stream {self.stream!r} not confirmed within {timeout} s")
        if ret < 0:
            raise self._error(ret, "flush")

    def close(self, timeout: float | None = None) -> None:
        """Flush (waiting up to ``timeout`` seconds, default: the client's ``timeout``), then end
        the connection. Idempotent. Another thread blocked in ``write()`` or ``flush()`` meanwhile
        (even one waiting for pipe room) is cut short within the same bound and gets an error; the
        producer's memory is freed when the Client is."""
        if self._closed:
            return
        self._closed = True
        _live.discard(self)
        # Shut down now, free in __del__: another thread may be inside a call on _p right now (a
        # daemon thread logging while the interpreter exits, a racing connected/stats); it gets
        # ESHUTDOWN from the shut-down producer instead of touching freed memory, because the
        # Client (and so _p) outlives every call made through it.
        p = self._p
        ret = lib.ls_producer_shutdown(p, _ms(timeout))
        if ret == -errno.ECHILD:
            self._p = ffi.NULL
            lib.ls_producer_close(p)  # a forked child: frees only its copies
        if ret < 0 and ret not in (-errno.ECHILD, -errno.ESHUTDOWN, -errno.ECONNRESET, -errno.ETIMEDOUT):
            raise error_for(ret, f"closing stream {self.stream!r}")

    def stats(self) -> dict[str, Any]:
        st = ffi.new("struct ls_producer_stats *")
        if self._closed or lib.ls_producer_stats(self._p, st) < 0:
            return {"stream": self.stream, "transport": self.transport, "closed": True}
        tid = lib.ls_producer_transport(self._p)
        return {
            "stream": self.stream,
            "transport": next((name for name, i in _TRANSPORT_IDS.items() if i == tid), self.transport),
            **{name: getattr(st, name) for name in (
                "segment_size", "segments", "pipe_size", "released_through", "handed_over_through", "pinned_segments",
                "batches", "records", "bytes", "dropped_records", "failed_batches", "suppressed_batches", "suppressed_records", "waits_for_release",
                "zc_sends", "zc_completed", "zc_copied", "zc_enobufs", "copied_sends", "zc_switched_to_copy",
                "reconnects", "resent_batches", "resent_bytes", "lost_batches",
            )},
            "disconnected_seconds": st.disconnected_us / 1e6,
            "connected": bool(st.connected),
        }

    @property
    def max_batch(self) -> int:
        """The largest batch payload this connection takes, in bytes (a longer record cannot be sent):
        ``segment_size - 32``, cut by the daemon's max_batch and, for vmsplice and copy, by the data
        pipe's size. A reconnect may change it."""
        ret = lib.ls_producer_capacity(self._handle())
        if ret < 0:
            raise self._error(ret, "max_batch")
        return ret

    @property
    def connected(self) -> bool:
        """True while the daemon takes our batches: False while reconnecting (``reconnect=True``), and
        for good once it refused us, or went away or announced its shutdown (``reconnect=False``)."""
        if self._closed:
            return False
        st = ffi.new("struct ls_producer_stats *")
        ret = lib.ls_producer_stats(self._p, st)
        return ret == -errno.ECHILD or (ret == 0 and bool(st.connected))

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            if not self._closed and self._p != ffi.NULL:
                self.close(timeout=EXIT_FLUSH_TIMEOUT)  # pragma: no cover - best effort when dropped unclosed
        except Exception:
            pass
        try:
            p = getattr(self, "_p", ffi.NULL)  # (absent if __init__ raised early)
            if getattr(self, "_closed", False) and p != ffi.NULL:
                self._p = ffi.NULL
                lib.ls_producer_close(p)  # shut down already: only frees (nobody can be inside a call now)
        except Exception:  # pragma: no cover - late interpreter teardown (module globals already gone)
            pass
