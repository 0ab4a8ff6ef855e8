"""Forwarding streams to downstream TCP collectors (rsyslog imtcp or imrelp, syslog-ng network()) from the daemon's own files.

Bytes go from the stream's file -- or, for a forward-only stream, its spool file under the state
directory -- to the socket with sendfile in C (native/ls_forward.c); this module connects,
reconnects with backoff, applies the spool bound, and persists cursors. Python never sees payload.
With RELP framing it also does the session's open handshake and close; the per-record commands
and the collector's responses are C's.

The daemon drives it through :class:`ForwardManager` (a handful of calls; see each method).
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import re
import socket
import stat
import time
from dataclasses import dataclass
from typing import Any

import structlog

from logsink import protocol
from logsink._native import check, ffi, lib
from logsink.errors import ConfigError
from logsink.files import FileRefused, dir_beneath, open_beneath, read_beneath

log = structlog.get_logger("logsink.forward")

FRAMINGS = {"newline": lib.LS_FWD_NEWLINE, "octet-counted": lib.LS_FWD_OCTET, "relp": lib.LS_FWD_RELP}
# RELP: commands awaiting their rsp (a collector killed mid-stream may get up to this many twice).
RELP_WINDOW_DEFAULT = lib.LS_RELP_WINDOW_DEFAULT
RELP_WINDOW_MAX = lib.LS_RELP_WINDOW_MAX
# RELP open/close handshakes: how long the collector gets to answer.
RELP_HANDSHAKE_TIMEOUT = 5.0
RELP_CLOSE_TIMEOUT = 1.0
# Our RELP offers (librelp's doc/relp.md): protocol version 0 as librelp speaks it, one command.
RELP_OFFERS = b"relp_version=0\nrelp_software=logsink,%s\ncommands=syslog"
POLICIES = ("block", "drop-oldest")
# Un-forwarded bytes a stream may hold before its policy applies: a few minutes of a busy service
# at ~1 MB/s, small enough for any state disk.
DEFAULT_SPOOL_MAX = 256 << 20
# Smallest bound we accept: below a few batches the block policy would stall on every batch.
MIN_SPOOL_MAX = 64 << 10
# Reconnect backoff: first retry after 0.1 s, doubling to 30 s; reset by a connection that lasted.
BACKOFF_FIRST = 0.1
BACKOFF_MAX = 30.0
CONNECT_TIMEOUT = 5.0
# A connection that lasted this long resets the backoff.
STABLE_CONNECTION = 1.0
# A downstream that stops ACKing for this long is declared dead (TCP_USER_TIMEOUT), so its data
# goes to the spool instead of sitting in a send queue forever.
USER_TIMEOUT_MS = 30_000
# Cursor files are rewritten at most this often (and on close).
SAVE_INTERVAL = 0.1
# close(): how long pending data gets to reach the downstream (and be ACKed) before we stop.
CLOSE_TIMEOUT = 5.0
_SIZE_RE = re.compile(r"^\s*(\d+)\s*([kKmMgG]?)i?[bB]?\s*$")
_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


class ForwardConfigError(ConfigError):
    """A forward setting that cannot be used; the message names the setting and what to write instead."""


class RelpError(ConnectionError):
    """The collector did not open a RELP session with us (the message says why); retried with backoff."""


# -- configuration --------------------------------------------------------------------------------
@dataclass(frozen=True)
class ForwardSpec:
    """One downstream of one stream."""

    stream: str
    address: str
    host: str
    port: int
    framing: str = "newline"
    file: bool = False          # also keep <dir>/<stream>.log (else the stream lands in a spool)
    spool_max: int = DEFAULT_SPOOL_MAX
    policy: str = "block"
    window: int = RELP_WINDOW_DEFAULT  # RELP only: commands awaiting their rsp

    @property
    def key(self) -> str:
        """``<stream>.<host>_<port>``: names the cursor file."""
        host = re.sub(r"[^A-Za-z0-9.-]", "_", self.host)
        return f"{self.stream}.{host}_{self.port}"


def parse_size(value: Any, what: str) -> int:
    """``268435456``, ``"256M"``, ``"64KiB"``, ``"1G"`` -> bytes."""
    if isinstance(value, bool):
        raise ForwardConfigError(f"{what} must be a size like 268435456 or \"256M\", got {value!r}")
    if isinstance(value, int):
        n = value
    elif isinstance(value, str) and (m := _SIZE_RE.match(value)):
        n = int(m.group(1)) * _SIZE_UNITS[m.group(2).lower()]
    else:
        raise ForwardConfigError(f"{what} must be a size like 268435456 or \"256M\" (units K, M, G), got {value!r}")
    if n < MIN_SPOOL_MAX:
        raise ForwardConfigError(f"{what} is {n} bytes; use at least {MIN_SPOOL_MAX} (64K)")
    return n


def parse_address(address: Any, what: str) -> tuple[str, int]:
    from logsink.daemon import parse_tcp_address

    if not isinstance(address, str):
        raise ForwardConfigError(f"{what} must be a string like \"tcp://collector:514\", got {address!r}")
    try:
        return parse_tcp_address(address)
    except ValueError as exc:
        raise ForwardConfigError(f"{what}: {exc}") from None


def _spec(stream: str, opts: dict[str, Any], where: str, default_framing: str) -> ForwardSpec:
    known = {"address", "framing", "file", "spool_max", "policy", "window"}
    for key in opts:
        if key not in known:
            raise ForwardConfigError(f"{where}: unknown key {key!r} (known: {', '.join(sorted(known))})")
    if "address" not in opts:
        raise ForwardConfigError(f"{where}: address is missing (e.g. address = \"tcp://collector:514\")")
    try:
        protocol.validate_stream_name(stream)
    except protocol.ProtocolError as exc:
        raise ForwardConfigError(f"{where}: {exc.reason}") from None
    host, port = parse_address(opts["address"], f"{where}: address")
    framing = opts.get("framing", default_framing)
    if framing not in FRAMINGS:
        raise ForwardConfigError(f"{where}: framing {framing!r} is not one of {', '.join(FRAMINGS)}")
    policy = opts.get("policy", "block")
    if policy not in POLICIES:
        raise ForwardConfigError(f"{where}: policy {policy!r} is not one of {', '.join(POLICIES)}")
    keep = opts.get("file", False)
    if not isinstance(keep, bool):
        raise ForwardConfigError(f"{where}: file must be true or false, got {keep!r}")
    spool_max = parse_size(opts.get("spool_max", DEFAULT_SPOOL_MAX), f"{where}: spool_max")
    window = _window(opts, framing, where)
    return ForwardSpec(stream, opts["address"], host, port, framing, keep, spool_max, policy, window)


def _window(opts: dict[str, Any], framing: str, where: str) -> int:
    if "window" not in opts:
        return RELP_WINDOW_DEFAULT
    if framing != "relp":
        raise ForwardConfigError(f"{where}: window applies to framing = \"relp\" only (this forward's framing is {framing!r})")
    value = opts["window"]
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= RELP_WINDOW_MAX:
        raise ForwardConfigError(f"{where}: window must be a number of records from 1 to {RELP_WINDOW_MAX}, got {opts['window']!r}")
    return value


def _parse_cli(item: str, default_framing: str) -> ForwardSpec:
    """``STREAM=tcp://HOST:PORT[,file][,framing=F | ,F][,window=N][,policy=P][,spool_max=N]``."""
    where = f"--forward {item!r}"
    stream, sep, rest = item.partition("=")
    if not sep or not stream or not rest:
        raise ForwardConfigError(f"{where}: expected STREAM=tcp://HOST:PORT, e.g. --forward app=tcp://127.0.0.1:514")
    address, *extras = rest.split(",")
    opts: dict[str, Any] = {"address": address}
    for extra in extras:
        key, has_value, value = extra.partition("=")
        key = key.strip().replace("-", "_")
        if key == "file" and not has_value:
            opts["file"] = True
        elif key == "file":
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ForwardConfigError(f"{where}: file={value!r} must be true or false")
            opts["file"] = value.lower() in ("true", "1", "yes")
        elif key in ("framing", "policy", "spool_max", "window") and has_value:
            opts[key] = value
        elif not has_value and extra.strip() in FRAMINGS:
            opts["framing"] = extra.strip()  # the bare framing name: ,relp
        else:
            raise ForwardConfigError(f"{where}: unknown option {extra!r} (known: file, relp, octet-counted, newline, "
                                     "framing=..., window=..., policy=..., spool_max=...)")
    return _spec(stream, opts, where, default_framing)


def forward_from_config(table: Any, cli: list[str] | None = None, framing: str | None = None) -> dict[str, list[ForwardSpec]]:
    """The forwards of a config, by stream.

    ``table`` is the TOML ``forward`` table: ``[forward.app]`` (one downstream) or ``[[forward.app]]``
    (several) with keys address, framing, file, spool_max, policy, window (RELP). ``cli`` holds ``--forward``
    values; ``framing`` (``--framing``) is the framing of entries that do not name one.
    """
    default_framing = framing or "newline"
    if default_framing not in FRAMINGS:
        raise ForwardConfigError(f"framing {default_framing!r} is not one of {', '.join(FRAMINGS)}")
    specs: list[ForwardSpec] = []
    if table:
        if not isinstance(table, dict):
            raise ForwardConfigError("forward must be a table of streams, e.g. [forward.app] with address = \"tcp://host:514\"")
        for stream, entry in table.items():
            entries = entry if isinstance(entry, list) else [entry]
            for i, opts in enumerate(entries):
                where = f"[forward.{stream}]" + (f" #{i + 1}" if isinstance(entry, list) else "")
                if not isinstance(opts, dict):
                    raise ForwardConfigError(f"{where} must be a table with address = \"tcp://HOST:PORT\", got {opts!r}")
                specs.append(_spec(stream, opts, where, default_framing))
    for item in cli or []:
        specs.append(_parse_cli(item, default_framing))
    out: dict[str, list[ForwardSpec]] = {}
    for s in specs:
        if any(o.host == s.host and o.port == s.port for o in out.get(s.stream, [])):
            raise ForwardConfigError(f"stream {s.stream!r} is forwarded to {s.address} twice")
        out.setdefault(s.stream, []).append(s)
    return out


def relp_frame(buf: bytes) -> tuple[int, bytes, bytes, bytes] | None:
    """The first whole RELP frame in ``buf`` as (txnr, command, data, the bytes after it), or None if
    it is incomplete. Only for the open handshake (a few hundred bytes); C parses the rest."""
    head = buf[:64].split(b" ", 3)
    if len(head) < 3:
        return None
    txnr, cmd, tail = head[0], head[1], b" ".join(head[2:])
    digits = len(tail) - len(tail.lstrip(b"0123456789"))
    if digits == len(tail):
        return None
    if not txnr.isdigit() or not cmd.isalpha() or digits == 0 or digits > 9:
        raise RelpError(f"the collector sent something that is not a RELP frame: {buf[:60]!r}")
    dlen = int(tail[:digits])
    start = len(txnr) + len(cmd) + 2 + digits
    if dlen == 0:
        if buf[start : start + 1] != b"\n":
            raise RelpError(f"the collector sent a RELP frame without its LF trailer: {buf[:60]!r}")
        return int(txnr), cmd, b"", buf[start + 1 :]
    if len(buf) < start + 1 + dlen + 1:
        return None
    if buf[start : start + 1] != b" " or buf[start + 1 + dlen : start + 2 + dlen] != b"\n":
        raise RelpError(f"the collector sent a malformed RELP frame: {buf[:60]!r}")
    return int(txnr), cmd, buf[start + 1 : start + 1 + dlen], buf[start + 2 + dlen :]


# -- cursor files ---------------------------------------------------------------------------------
def replace_durably(dirfd: int, name: str, data: bytes, mode: int, where: str) -> None:
    """Replace ``name`` beneath ``dirfd`` with ``data`` so that a crash (or power loss) at any point
    leaves the old or the new contents: write a temp file, fsync it, rename it over, fsync the directory.

    The spool is punched only behind what this wrote, so "on disk" has to mean it."""
    tmp = name + ".tmp"
    try:
        fd = open_beneath(dirfd, tmp, os.O_WRONLY | os.O_CREAT, mode, where=where + ".tmp")
    except FileRefused:
        # The temp name is ours alone: something planted there (a link, a FIFO) is removed, not followed.
        os.unlink(tmp, dir_fd=dirfd)
        fd = open_beneath(dirfd, tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode, where=where + ".tmp")
    try:
        os.ftruncate(fd, 0)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, name, src_dir_fd=dirfd, dst_dir_fd=dirfd)  # rename replaces a planted link, never follows it
    os.fsync(dirfd)


# -- one downstream -------------------------------------------------------------------------------
class Forwarder:
    """One (stream, downstream): a C forwarder (native/ls_forward.c) plus its connection and cursor file.

    ``on_advance(end)`` after records up to ``end`` landed; the rest runs on the event loop: a
    connector task with backoff, writability and EOF callbacks on the socket, a cursor save timer.
    """

    def __init__(self, spec: ForwardSpec, group: "_StreamGroup", cursor: int, cursor_path: str):
        self.spec = spec
        self.group = group
        self.cursor_path = cursor_path
        self.identity = group.identity  # the file this forwarder reads (it moves to a rotated file on its own)
        # The cursor the file on disk holds, with its file: the spool is never punched past it, so a
        # restart after a crash never resumes inside the punched prefix. ``cursor`` came from there.
        self.durable = (cursor, group.identity)
        self._skipped = 0
        self.address = f"tcp://{spec.host}:{spec.port}"
        out = ffi.new("struct ls_forward **")
        check(lib.ls_forward_new(group.fd, cursor, FRAMINGS[spec.framing], out), f"starting the forwarder to {self.address}")
        self.f = ffi.gc(out[0], lib.ls_forward_free)
        self.relp = spec.framing == "relp"
        if self.relp:
            check(lib.ls_forward_relp_window(self.f, spec.window), "setting the RELP window")
        self._counters = ffi.new("struct ls_forward_counters *")
        self.loop = asyncio.get_running_loop()
        self.sock: socket.socket | None = None
        self.state = "down"
        self.last_error = ""
        self.wants_pause = False
        self.closing = False
        self._writer = False
        self._up = asyncio.Event()
        self._lost = asyncio.Event()
        self._saved: tuple[int, int] | None = None
        self._save_handle: asyncio.TimerHandle | None = None
        self._pending_switch: tuple[int, int, tuple[int, int]] | None = None  # new fd, its offset, its identity
        self._switch_timer = False
        self._connector = self.loop.create_task(self._connect_loop(), name=f"forward {spec.key}")

    # -- progress ---------------------------------------------------------------------------------
    def counters(self) -> Any:
        lib.ls_forward_counters(self.f, self._counters)
        return self._counters

    def on_advance(self, end: int) -> None:
        """Records up to ``end`` are complete in the file: send them (or spool them)."""
        if self._pending_switch is not None:
            return  # still finishing the rotated-away file; the new one's offsets wait
        ret = lib.ls_forward_advance(self.f, end)
        if ret == -errno.ERANGE:  # the file shrank under us: copytruncate, or an admin's `: > file`
            lost = self.counters().end - self.counters().cursor
            log.error("forward_source_truncated", stream=self.spec.stream, downstream=self.address, unsent_bytes_lost=lost)
            check(lib.ls_forward_reset(self.f, -1, 0), "restarting the forwarder")
            ret = lib.ls_forward_advance(self.f, end)
        check(ret, "advancing the forwarder")
        self._apply_policy()
        self.pump()

    def pump(self) -> None:
        if self.sock is None:
            return
        r = lib.ls_forward_pump(self.f)
        if r == -errno.EAGAIN:
            if not self._writer:
                self.loop.add_writer(self.sock.fileno(), self.pump)
                self._writer = True
        elif r >= 0 or r == -errno.ENODATA or r == -errno.ENOBUFS:  # ENOBUFS: RELP window full, responses resume it
            if self._writer:
                self.loop.remove_writer(self.sock.fileno())
                self._writer = False
            if r == -errno.ENODATA:
                log.error("forward_source_short", stream=self.spec.stream, downstream=self.address,
                          reason="the file ended before the offsets the engine reported; waiting for the next batch")
        elif r != -errno.ENOTCONN:
            self._connection_lost(f"send failed: {os.strerror(-r)}", detached=True)
        self._progress()

    def _progress(self) -> None:
        self._note_skipped()
        if self.wants_pause:
            c = self.counters()
            if c.end - c.cursor < self.spec.spool_max // 2:
                self.wants_pause = False
                self.group.update_pause()
        self._maybe_switch()
        self._schedule_save()

    def skip_zeros(self) -> None:
        """Validate a resumed cursor: off any hole or NUL bytes (a cursor file lost, or left inside the
        punched prefix by an older version), onto the next whole record."""
        check(lib.ls_forward_skip_zeros(self.f), "checking the spool at the cursor")
        if self._note_skipped():
            self._schedule_save()

    def _note_skipped(self) -> bool:
        """Log bytes the C forwarder skipped instead of sending zeros; True if there were any."""
        c = self.counters()
        if c.skipped_bytes == self._skipped:
            return False
        log.warning("forward_skipped_hole", stream=self.spec.stream, downstream=self.address, file=self.group.path,
                    bytes=c.skipped_bytes - self._skipped, resume_at=c.cursor,
                    reason="the file reads as zeros there (a punched spool prefix or a hole); zeros are never sent")
        self._skipped = c.skipped_bytes
        return True

    def _apply_policy(self) -> None:
        c = self.counters()
        lag = c.end - c.cursor
        if lag <= self.spec.spool_max:
            return
        if self.spec.policy == "block":
            if not self.wants_pause:
                self.wants_pause = True
                log.warning("forward_spool_full", stream=self.spec.stream, downstream=self.address, lag_bytes=lag,
                            spool_max=self.spec.spool_max, policy="block", action="pausing the stream; producers block")
                self.group.update_pause()
        else:
            before = (c.dropped_bytes, c.dropped_records)
            lib.ls_forward_drop(self.f, c.end - self.spec.spool_max)
            c = self.counters()
            if c.dropped_bytes != before[0]:
                log.warning("forward_spool_dropped", stream=self.spec.stream, downstream=self.address,
                            bytes=c.dropped_bytes - before[0], records=c.dropped_records - before[1],
                            total_dropped_records=c.dropped_records, spool_max=self.spec.spool_max)

    # -- connection -------------------------------------------------------------------------------
    async def _connect_loop(self) -> None:
        delay = BACKOFF_FIRST
        while not self.closing:
            try:
                sock = await self._connect()
            except (OSError, asyncio.TimeoutError) as exc:
                reason = str(exc) or type(exc).__name__
                if reason != self.last_error:
                    log.warning("forward_connect_failed", stream=self.spec.stream, downstream=self.address, error=reason, retry_in=delay)
                self.last_error = reason
                await asyncio.sleep(delay)
                delay = min(delay * 2, BACKOFF_MAX)
                continue
            self._attach(sock)
            since = time.monotonic()
            await self._lost.wait()
            self._lost.clear()
            # A collector that accepts and drops us at once must not make us spin: the backoff
            # starts over only after a connection that lasted.
            if time.monotonic() - since >= STABLE_CONNECTION:
                delay = BACKOFF_FIRST
            if not self.closing:
                await asyncio.sleep(delay)
                delay = min(delay * 2, BACKOFF_MAX)

    async def _connect(self) -> socket.socket:
        infos = await self.loop.getaddrinfo(self.spec.host, self.spec.port, type=socket.SOCK_STREAM)
        family, type_, proto, _, addr = infos[0]
        sock = socket.socket(family, type_, proto)
        sock.setblocking(False)
        try:
            await asyncio.wait_for(self.loop.sock_connect(sock, addr), CONNECT_TIMEOUT)
        except BaseException:
            sock.close()
            raise
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # MSG_MORE does the batching
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, USER_TIMEOUT_MS)
        if self.relp:
            try:
                await asyncio.wait_for(self._relp_open(sock), RELP_HANDSHAKE_TIMEOUT)
            except BaseException:
                sock.close()
                raise
        return sock

    async def _relp_open(self, sock: socket.socket) -> None:
        """RELP's open (txnr 1): offer version 0 and the syslog command; the collector must accept both."""
        from logsink import __version__

        offers = RELP_OFFERS % __version__.encode()
        await self.loop.sock_sendall(sock, b"1 open %d %s\n" % (len(offers), offers))
        buf = b""
        while (frame := relp_frame(buf)) is None:
            data = await self.loop.sock_recv(sock, 4096)
            if not data:
                raise RelpError("the collector closed the connection instead of answering RELP open")
            buf += data
        txnr, cmd, data, rest = frame
        first, _, offers_back = data.partition(b"\n")
        if txnr != 1 or cmd != b"rsp":
            raise RelpError(f"the collector answered RELP open with {txnr} {cmd.decode(errors='replace')}, not 1 rsp")
        if not first.startswith(b"200"):
            raise RelpError(f"the collector refused the RELP session: {first.decode(errors='replace')[:100]}")
        got = dict(line.partition(b"=")[::2] for line in offers_back.split(b"\n") if line)
        if b"relp_version" not in got or b"syslog" not in got.get(b"commands", b"").split(b","):
            raise RelpError(f"the collector's RELP offers lack relp_version or commands=syslog: {offers_back[:200]!r}")
        if rest:
            raise RelpError(f"the collector sent {len(rest)} bytes after answering RELP open: {rest[:40]!r}")

    def _attach(self, sock: socket.socket) -> None:
        self.sock = sock
        if self.relp:  # open took txnr 1
            check(lib.ls_forward_relp_attach(self.f, sock.fileno(), 2), "attaching the RELP session")
        else:
            check(lib.ls_forward_set_socket(self.f, sock.fileno()), "attaching the downstream socket")
        self.state = "up"
        self.last_error = ""
        c = self.counters()
        log.info("forward_up", stream=self.spec.stream, downstream=self.address, framing=self.spec.framing,
                 cursor=c.cursor, backlog_bytes=c.end - c.cursor)
        self.loop.add_reader(sock.fileno(), self._on_readable)
        self._up.set()
        self.pump()

    def _on_readable(self) -> None:
        """Plain TCP collectors send nothing: readable means EOF or an error (the peer went away).
        A RELP collector sends responses: C applies them, and the window has room again."""
        if self.relp:
            r = lib.ls_forward_relp_read(self.f)
            if r > 0:
                self.pump()
            elif r < 0:
                self._connection_lost(self._relp_end(r), detached=True)
            return
        try:
            data = self.sock.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._connection_lost(f"connection error: {exc.strerror or exc}")
            return
        if not data:
            self._connection_lost("the downstream closed the connection")

    def _relp_end(self, r: int) -> str:
        """Why a RELP session ended, from ls_forward_relp_read's code."""
        buf = ffi.new("char[160]")
        lib.ls_forward_relp_error(self.f, buf, 160)
        text = ffi.string(buf).decode(errors="replace")
        return {
            -errno.ECONNABORTED: "the collector closed the RELP session (serverclose)",
            -errno.EPIPE: "the collector closed the connection",
            -errno.ESHUTDOWN: "the RELP session was closed",
            -errno.EREMOTEIO: f"the collector refused a record: rsp {text}; sending it again on the next session",
            -errno.EPROTO: f"RELP protocol error from the collector: {text}",
        }.get(r, f"connection error: {os.strerror(-r)}")

    def _connection_lost(self, why: str, detached: bool = False) -> None:
        sock, self.sock = self.sock, None
        if sock is None:
            return
        self.loop.remove_reader(sock.fileno())
        if self._writer:
            self.loop.remove_writer(sock.fileno())
            self._writer = False
        if not detached:
            lib.ls_forward_set_socket(self.f, -1)  # rewinds to what the peer ACKed; needs the fd open
        # Abortive close: the kernel must not deliver, behind our back, bytes we rewound to resend.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        sock.close()
        self.state = "down"
        self.last_error = why
        self._up.clear()
        c = self.counters()
        log.warning("forward_down", stream=self.spec.stream, downstream=self.address, reason=why,
                    resume_at=c.cursor, rewound_bytes=c.rewound_bytes)
        self._lost.set()
        self._schedule_save()

    # -- rotation -------------------------------------------------------------------------------
    def switch_file(self, old_end: int, new_fd: int, new_offset: int, identity: tuple[int, int]) -> None:
        """The stream moved to a new file (SIGHUP after logrotate): finish the old one, then switch."""
        lib.ls_forward_advance(self.f, old_end)
        self._pending_switch = (os.dup(new_fd), new_offset, identity)
        self.pump()
        self._maybe_switch()

    def _switch_retry(self) -> None:
        self._switch_timer = False
        self._maybe_switch()

    def _maybe_switch(self) -> None:
        if self._pending_switch is None:
            return
        c = self.counters()
        if c.cursor < c.end or (self.sock is not None and c.unacked_bytes):
            if self.sock is not None and c.cursor == c.end and not self._switch_timer:
                self._switch_timer = True  # waiting for the peer's ACKs: rewinds must still reach the old file
                self.loop.call_later(0.05, self._switch_retry)
            return
        fd, offset, identity = self._pending_switch
        self._pending_switch = None
        check(lib.ls_forward_reset(self.f, fd, offset), "switching the forwarder to the new file")
        os.close(fd)
        self.identity = self.group.identity = identity
        self._saved = None
        self._schedule_save()
        self.on_advance(self.group.end())

    # -- cursor file ----------------------------------------------------------------------------
    def _schedule_save(self) -> None:
        if self._save_handle is None and not self.closing:
            self._save_handle = self.loop.call_later(SAVE_INTERVAL, self._save_tick)

    def _save_tick(self) -> None:
        self._save_handle = None
        c = self.counters()
        self.save(c.acked_cursor)
        self.group.punch()  # behind the saved cursors only: ACKs that came in since wait for the next save
        if c.acked_cursor < c.cursor:  # ACKs may still come in while we are idle: look again
            self._schedule_save()

    def save(self, offset: int) -> None:
        """Persist ``offset`` (fsynced, atomically replaced); on success it becomes ``durable``."""
        state = (offset, self.identity)
        if state == self._saved:
            return
        data = json.dumps({"offset": offset, "dev": self.identity[0], "ino": self.identity[1],
                           "file": self.group.path, "downstream": self.address}).encode()
        mgr = self.group.mgr
        try:
            replace_durably(mgr.state_fd, os.path.basename(self.cursor_path), data, mgr.file_mode, self.cursor_path)
        except OSError as exc:  # the next save tries again; a restart then replays from the last saved cursor
            log.error("forward_cursor_save_failed", file=self.cursor_path, error=str(exc))
            return
        self._saved = state
        self.durable = state

    async def _relp_close(self, timeout: float) -> None:
        """RELP's close, when every command was answered: send it, wait for its rsp (or serverclose/EOF)."""
        self.loop.remove_reader(self.sock.fileno())
        r = lib.ls_forward_relp_close(self.f)
        if r < 0:
            return  # commands still unanswered (EBUSY) or the socket is full: the socket is just closed
        end = time.monotonic() + timeout
        while (r := lib.ls_forward_relp_read(self.f)) >= 0 and time.monotonic() < end:
            await asyncio.sleep(0.005)
        if r != -errno.ESHUTDOWN:
            log.warning("forward_relp_close_unanswered", stream=self.spec.stream, downstream=self.address,
                        reason=self._relp_end(r) if r < 0 else f"no rsp to close within {timeout:.1f}s")

    # -- status and close -----------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        c = self.counters()
        out = {
            "stream": self.spec.stream, "address": self.address, "framing": self.spec.framing, "state": self.state,
            "file": self.group.path, "spool": self.group.spool, "policy": self.spec.policy, "spool_max": self.spec.spool_max,
            "cursor": c.cursor, "end": c.end, "lag_bytes": c.end - c.cursor, "acked_cursor": c.acked_cursor,
            "paused": self.wants_pause, "last_error": self.last_error,
        }
        out["saved_cursor"] = self.durable[0] if self.durable[1] == self.identity else None
        for key in ("unacked_bytes", "bytes_sent", "payload_sent", "records_sent", "bytes_sendfile", "bytes_copied",
                    "framing_bytes", "connects", "disconnects", "rewound_bytes", "dropped_bytes", "dropped_records",
                    "skipped_bytes"):
            out[key] = getattr(c, key)
        out["reconnects"] = max(c.connects - 1, 0)
        if self.relp:
            out.update(window=self.spec.window, relp_acked=c.relp_acked, relp_inflight=c.relp_inflight, relp_refused=c.relp_refused)
        if self.spec.framing == "newline":
            out["records_sent"] = None  # newline framing never looks at records
        return out

    async def close(self, timeout: float = CLOSE_TIMEOUT) -> None:
        """Send what is pending (up to ``timeout`` seconds, until the peer ACKed it), save the cursor, disconnect.

        A downstream that is down is not waited for: the file or spool keeps the rest for the next run."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.sock is not None:
                self.pump()
                c = self.counters()
                if c.cursor == c.end and c.unacked_bytes == 0 and self._pending_switch is None:
                    break
            else:
                break  # down: what is pending stays in the file/spool for the next run
            await asyncio.sleep(0.02)
        self.closing = True
        self._connector.cancel()
        try:
            await self._connector
        except (asyncio.CancelledError, Exception):
            pass
        if self.relp and self.sock is not None:
            await self._relp_close(min(RELP_CLOSE_TIMEOUT, max(deadline - time.monotonic(), 0.1)))
        if self._save_handle is not None:
            self._save_handle.cancel()
            self._save_handle = None
        exact = lib.ls_forward_sync_acked(self.f)
        if self.sock is not None:
            sock, self.sock = self.sock, None
            self.loop.remove_reader(sock.fileno())
            if self._writer:
                self.loop.remove_writer(sock.fileno())
            clean = self.counters().unacked_bytes == 0
            lib.ls_forward_set_socket(self.f, -1)
            if not clean:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            sock.close()
        c = self.counters()
        self.save(c.acked_cursor if exact < 0 else min(exact, c.cursor))
        if self._pending_switch is not None:
            os.close(self._pending_switch[0])
        log.info("forward_closed", stream=self.spec.stream, downstream=self.address, cursor=c.cursor, end=c.end,
                 unsent_bytes=c.end - c.cursor)


# -- one stream's forwarders ----------------------------------------------------------------------
class _StreamGroup:
    """The forwarders of one stream, sharing its file: pausing, and punching the spool behind them all."""

    def __init__(self, mgr: "ForwardManager", name: str, sid: int, fd: int, path: str, spool: bool):
        self.mgr = mgr
        self.name = name
        self.sid = sid
        self.fd = os.dup(fd)  # ours: punching needs write access, and rotation closes the daemon's
        self.path = path
        self.spool = spool
        st = os.fstat(self.fd)
        self.identity = (st.st_dev, st.st_ino)
        self.fd_identity = self.identity  # the file self.fd is (rotation switches it before the forwarders)
        self.forwarders: list[Forwarder] = []
        self.paused = False
        self.punched = 0
        self.last_end = -1
        self._c = ffi.new("struct ls_counters *")

    def end(self) -> int:
        lib.ls_engine_stream_counters(self.mgr.engine, self.sid, self._c)
        return self._c.offset

    def update_pause(self) -> None:
        want = any(f.wants_pause for f in self.forwarders) and not self.mgr.no_blocking
        if want != self.paused:
            self.paused = want
            check(lib.ls_engine_pause_stream(self.mgr.engine, self.sid, 1 if want else 0), "pausing the stream")
            log.info("stream_paused" if want else "stream_resumed", stream=self.name, reason="forward spool bound")

    def punch(self) -> None:
        """Spools only: give back the disk blocks every downstream has been sent, ACKed, and has a cursor
        file past. Never past a cursor on disk: a crash then resumes there, and a hole reads as zeros."""
        if not self.spool or self.mgr.punch_unsupported:
            return
        if any(f.durable[1] != self.fd_identity for f in self.forwarders):
            return  # a forwarder has no saved cursor in this file yet (rotation)
        upto = min(f.durable[0] for f in self.forwarders)
        r = lib.ls_spool_punch(self.fd, self.punched, upto)
        if r == -errno.EOPNOTSUPP:
            self.mgr.punch_unsupported = True
            log.warning("spool_punch_unsupported", file=self.path, reason="the file system cannot punch holes; the spool only shrinks on restart")
        elif r >= 0:
            self.punched = r

    def close(self) -> None:
        os.close(self.fd)


class ForwardManager:
    """Everything forwarding needs from the daemon, in six calls (see docs in each)."""

    def __init__(self, forwards: dict[str, list[ForwardSpec]], state_dir: tuple[str, int], engine: Any, file_mode: int = 0o640,
                 dir_mode: int = 0o750):
        """``state_dir`` is (path, fd of it): cursors and spools are opened beneath that fd, never
        through a link (logsink/files.py); fd -1 when nothing is forwarded."""
        self.specs = forwards
        self.state_dir = os.path.abspath(state_dir[0])
        self.state_fd = state_dir[1]
        self.engine = engine
        self.file_mode = file_mode
        self.groups: dict[int, _StreamGroup] = {}
        self.no_blocking = False
        self.punch_unsupported = False
        self.spool_fd = -1
        if forwards:
            self.spool_fd = dir_beneath(self.state_fd, "spool", dir_mode, os.path.join(self.state_dir, "spool"))

    def stream_names(self) -> list[str]:
        """Streams to open at start-up, so a spool left by the last run is replayed without waiting for a producer."""
        return list(self.specs)

    def output_location(self, name: str, default: tuple[int, str, str]) -> tuple[int, str, str]:
        """Where the daemon writes stream ``name``, as (dir fd, file name, path for messages):
        ``default`` (<dir>/<name>.log), or its spool beneath the state dir."""
        specs = self.specs.get(name)
        if not specs or any(s.file for s in specs):
            return default
        filename = f"{name}.spool"
        path = os.path.join(self.state_dir, "spool", filename)
        self._compact_spool(filename, path, specs)
        return self.spool_fd, filename, path

    def _compact_spool(self, filename: str, path: str, specs: list[ForwardSpec]) -> None:
        """Before the daemon opens it: a spool every downstream has fully received starts over at 0."""
        try:
            st = os.stat(filename, dir_fd=self.spool_fd, follow_symlinks=False)
        except FileNotFoundError:
            return
        if not stat.S_ISREG(st.st_mode):
            return  # the daemon's open refuses it, with the reason
        for s in specs:
            saved = self._read_cursor(s)
            if saved is None or saved[0] != st.st_size or saved[1] != (st.st_dev, st.st_ino):
                return
        fd = open_beneath(self.spool_fd, filename, os.O_WRONLY, where=path)
        try:
            if (os.fstat(fd).st_dev, os.fstat(fd).st_ino) != (st.st_dev, st.st_ino):
                return  # replaced since the stat: leave it
            os.ftruncate(fd, 0)
        finally:
            os.close(fd)
        for s in specs:
            self._write_cursor_file(s, 0, (st.st_dev, st.st_ino), path)

    def stream_opened(self, name: str, sid: int, fd: int, size: int) -> None:
        """The daemon registered stream ``name`` as engine stream ``sid`` writing ``fd`` from ``size``."""
        specs = self.specs.get(name)
        if not specs:
            return
        spool = not any(s.file for s in specs)
        path = os.readlink(f"/proc/self/fd/{fd}")
        group = _StreamGroup(self, name, sid, fd, path, spool)
        for spec in specs:
            cursor = self._start_cursor(spec, group, size)
            fw = Forwarder(spec, group, cursor, self._cursor_path(spec))
            group.forwarders.append(fw)
            if cursor < size:
                log.info("forward_backlog", stream=name, downstream=fw.address, bytes=size - cursor, file=path)
            check(lib.ls_forward_advance(fw.f, size), "advancing the forwarder")
            fw.skip_zeros()  # never resume inside a hole
            fw.on_advance(size)
        group.last_end = size
        self.groups[sid] = group

    def _start_cursor(self, spec: ForwardSpec, group: _StreamGroup, size: int) -> int:
        saved = self._read_cursor(spec)
        if saved is not None and saved[1] == group.identity and saved[0] <= size:
            return saved[0]
        if saved is not None and saved[1] != group.identity:
            return 0  # a new file (rotated while we were down): all of it is new
        return 0 if group.spool else size  # first run: a spool is all backlog; an old .log is history

    def _cursor_path(self, spec: ForwardSpec) -> str:
        return os.path.join(self.state_dir, spec.key + ".cursor")

    def _read_cursor(self, spec: ForwardSpec) -> tuple[int, tuple[int, int]] | None:
        try:
            raw = read_beneath(self.state_fd, spec.key + ".cursor", self._cursor_path(spec))
            if raw is None:
                return None
            d = json.loads(raw)
            return int(d["offset"]), (int(d["dev"]), int(d["ino"]))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.error("forward_cursor_unreadable", file=self._cursor_path(spec), error=str(exc), action="starting from the file's start")
            return None

    def _write_cursor_file(self, spec: ForwardSpec, offset: int, identity: tuple[int, int], path: str) -> None:
        data = json.dumps({"offset": offset, "dev": identity[0], "ino": identity[1], "file": path}).encode()
        replace_durably(self.state_fd, spec.key + ".cursor", data, self.file_mode, self._cursor_path(spec))

    def poll(self) -> None:
        """After engine events were handled: tell each forwarded stream how far its file has whole batches."""
        for g in self.groups.values():
            end = g.end()
            if end != g.last_end:
                g.last_end = end
                for fw in g.forwarders:
                    fw.on_advance(end)

    def stream_reopened(self, sid: int, fd: int, size: int) -> None:
        """SIGHUP moved stream ``sid`` to a new ``fd`` (at ``size``); the old file is complete."""
        g = self.groups.get(sid)
        if g is None:
            return
        old_end = os.fstat(g.fd).st_size
        st = os.fstat(fd)
        os.close(g.fd)
        g.fd = os.dup(fd)
        g.fd_identity = (st.st_dev, st.st_ino)
        g.path = os.readlink(f"/proc/self/fd/{fd}")
        g.punched = 0
        g.last_end = size
        for fw in g.forwarders:
            fw.switch_file(old_end, fd, size, (st.st_dev, st.st_ino))

    def stop_blocking(self) -> None:
        """Shutdown: let paused streams take their pending batches (they land in the spool, not lost)."""
        self.no_blocking = True
        for g in self.groups.values():
            g.update_pause()

    def status(self) -> list[dict[str, Any]]:
        return [fw.status() for g in self.groups.values() for fw in g.forwarders]

    async def close(self, timeout: float = CLOSE_TIMEOUT) -> None:
        """After the engine drained: flush every downstream (bounded by ``timeout``), save cursors."""
        self.poll()
        await asyncio.gather(*(fw.close(timeout) for g in self.groups.values() for fw in g.forwarders))
        for g in self.groups.values():
            g.punch()
            g.close()
        self.groups.clear()
        for fd in (self.spool_fd, self.state_fd):
            if fd >= 0:
                os.close(fd)
        self.spool_fd = self.state_fd = -1
