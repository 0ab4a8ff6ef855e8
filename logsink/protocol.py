"""The logsink wire protocol, sans-io: control messages and batch frame headers as pure functions over bytes.

Everything that defines a byte on the wire lives in this module (``docs/protocol.md`` describes
the same bytes for humans). It imports neither ``socket`` nor ``asyncio``: the daemon, the clients
and the fuzz tests all drive it with plain ``bytes``.

Control messages travel on the control socket (AF_UNIX SOCK_STREAM, later also TCP) as frames:
a 4-byte big-endian length, then that many bytes of one msgpack map whose key ``"t"`` names the
message type. Batches travel on the data pipe: a 32-byte frame header, then ``payload_len`` bytes
of whole records (lines ending in ``\\n``).
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from enum import Enum
from typing import Any

import msgpack

PROTOCOL_VERSION = 1

# -- limits ---------------------------------------------------------------------------------------
# A control message is small (HELLO, RELEASE, a STATUS reply with a few hundred producers);
# 1 MiB leaves room for big status replies while a garbage length prefix cannot make us buffer GBs.
MAX_CONTROL_MESSAGE = 1 << 20
# Largest control message a client may send: HELLO and STATUS are a few hundred bytes. This bounds
# what one connection makes the daemon buffer (the 1 MiB above is for the daemon's answers).
MAX_CLIENT_MESSAGE = 64 << 10
# A batch is one arena segment. 64 MiB is far above any sane segment (the default is 1 MiB)
# and far below what would let one bad header make the daemon splice gigabytes into a file.
MAX_BATCH_PAYLOAD = 64 << 20
# Stream names become file names: keep them portable and unable to escape the output directory.
MAX_STREAM_NAME = 64
STREAM_NAME_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-"
_STREAM_NAME_RE = re.compile(f"[{re.escape(STREAM_NAME_CHARS)}]{{1,{MAX_STREAM_NAME}}}")

# -- frame header ---------------------------------------------------------------------------------
FRAME_MAGIC = b"LSK1"
FRAME_HEADER_SIZE = 32
# magic, version, flags, header_len, payload_len, record_count, seq, reserved (little-endian)
_FRAME = struct.Struct("<4sBBHIIQQ")
assert _FRAME.size == FRAME_HEADER_SIZE

_LEN = struct.Struct(">I")

# -- message types --------------------------------------------------------------------------------
HELLO = "hello"          # client -> daemon, carries the pipe's read end with SCM_RIGHTS
WELCOME = "welcome"      # daemon -> client, HELLO accepted
RELEASE = "release"      # daemon -> client, every batch with seq <= through is in the file
ERROR = "error"          # daemon -> client, the connection is refused or being closed, with a reason
SHUTDOWN = "shutdown"    # daemon -> client, hand over what you hold and close: the daemon is stopping
STATUS = "status"        # client -> daemon asks, daemon -> client answers with the same type

LOCAL_TRANSPORTS = ("vmsplice", "copy", "shm")  # over the unix socket + data pipe (shm: + a memfd arena)
TCP_TRANSPORTS = ("zerocopy", "copy")      # over TCP: frames follow HELLO on the same connection
TRANSPORTS = ("vmsplice", "zerocopy", "copy", "shm")
# transport "shm": HELLO carries two fds, the data pipe's read end and then the arena (a memfd sealed
# with F_SEAL_SHRINK). Batches stay in the arena; the pipe carries 32-byte descriptors: frame headers
# with FRAME_FLAG_SHM set and the payload's byte offset in the arena in the last 8 bytes.
FRAME_FLAG_SHM = 1
HELLO_FDS_SHM = 2

# Error codes carried in ERROR messages (and counted by the daemon under the same names).
E_BAD_MESSAGE = "bad-message"      # undecodable frame or unknown/ill-typed message
E_BAD_VERSION = "bad-version"      # protocol version we do not speak
E_BAD_STREAM = "bad-stream"        # stream name empty, too long, or outside [A-Za-z0-9._-]
E_BAD_FD = "bad-fd"                # HELLO without exactly one fd, or the fd is not a pipe's read end
E_BAD_FRAME = "bad-frame"          # a batch header with bad magic/version or an absurd length
E_PRODUCER_DIED = "producer-died"  # the pipe closed mid-batch: the partial batch was discarded
E_WRITE_FAILED = "write-failed"    # the output file refused the batch (e.g. disk full)
E_SHUTTING_DOWN = "shutting-down"  # the daemon no longer accepts producers
E_TOO_MANY = "too-many-producers"  # the engine has no free producer slot
E_AUTH = "auth"                    # TCP HELLO without the daemon's token
E_FORBIDDEN = "forbidden"          # the access rules do not let this peer write the stream / read status
E_INTERNAL = "internal"            # the daemon could not set the producer up (its file, its disk)
E_TOO_MANY_FDS = "too-many-fds"    # fds beyond the one HELLO carries (or more than a read can hold)
E_FILE_REFUSED = "file-refused"    # the stream's file is a symlink, FIFO, directory, hard link, ...
E_FD_LIMIT = "fd-limit"            # (counter only) accept failed: the daemon (or the system) is out of fds

# ERROR codes after which a producer reconnects (the daemon is stopping, full, or failed on its
# side). Every other code ends the producer: the answer will not change (forbidden, bad-stream,
# auth), it is the producer's bug (bad-frame, bad-message, ...), or the operator must act
# (file-refused); so does a code the producer does not know.
RETRIABLE_CODES = (E_SHUTTING_DOWN, E_TOO_MANY, E_INTERNAL, E_PRODUCER_DIED)


class ProtocolError(ValueError):
    """Bytes or a message that break the protocol; ``code`` is one of the ``E_*`` strings."""

    def __init__(self, code: str, reason: str):
        super().__init__(reason)
        self.code = code
        self.reason = reason


# -- stream names ---------------------------------------------------------------------------------
def validate_stream_name(name: Any) -> str:
    """Return ``name`` if it is a valid stream name, else raise ProtocolError(E_BAD_STREAM)."""
    if not isinstance(name, str) or not _STREAM_NAME_RE.fullmatch(name) or name.startswith(".") or ".." in name:
        raise ProtocolError(
            E_BAD_STREAM,
            f"stream name {name!r} is invalid: use 1 to {MAX_STREAM_NAME} characters of [A-Za-z0-9._-], "
            "not starting with '.' and without '..'",
        )
    return name


# -- frame headers --------------------------------------------------------------------------------
@dataclass(frozen=True)
class FrameHeader:
    payload_len: int
    record_count: int
    seq: int
    flags: int = 0


def pack_frame_header(payload_len: int, record_count: int, seq: int, flags: int = 0) -> bytes:
    """The 32 bytes that precede a batch of ``payload_len`` bytes on the data pipe."""
    return _FRAME.pack(FRAME_MAGIC, PROTOCOL_VERSION, flags, FRAME_HEADER_SIZE, payload_len, record_count, seq, 0)


def pack_shm_descriptor(payload_len: int, record_count: int, seq: int, offset: int) -> bytes:
    """The 32 bytes that announce a batch of ``payload_len`` bytes at ``offset`` in a shm producer's arena."""
    return _FRAME.pack(FRAME_MAGIC, PROTOCOL_VERSION, FRAME_FLAG_SHM, FRAME_HEADER_SIZE, payload_len, record_count, seq, offset)


def unpack_frame_header(data: bytes, max_payload: int = MAX_BATCH_PAYLOAD) -> FrameHeader:
    """Parse and validate a frame header; raise ProtocolError(E_BAD_FRAME) saying what is wrong.

    The C engine applies exactly these checks (native/ls_frame.h); this is the reference.
    """
    if len(data) != FRAME_HEADER_SIZE:
        raise ProtocolError(E_BAD_FRAME, f"frame header is {len(data)} bytes, expected {FRAME_HEADER_SIZE}")
    magic, version, flags, header_len, payload_len, records, seq, _reserved = _FRAME.unpack(data)
    if magic != FRAME_MAGIC:
        raise ProtocolError(E_BAD_FRAME, f"frame header has bad magic {magic!r}, expected {FRAME_MAGIC!r}")
    if version != PROTOCOL_VERSION or header_len != FRAME_HEADER_SIZE:
        raise ProtocolError(E_BAD_FRAME, f"frame header version {version}/length {header_len} is not supported")
    if payload_len == 0 or payload_len > max_payload:
        raise ProtocolError(E_BAD_FRAME, f"frame payload length {payload_len} is outside 1..{max_payload}")
    if records == 0 or records > payload_len:
        raise ProtocolError(E_BAD_FRAME, f"frame record count {records} is impossible for {payload_len} bytes")
    return FrameHeader(payload_len, records, seq, flags)


# -- control messages -----------------------------------------------------------------------------
# Required keys and their types, per message type. Unknown extra keys are ignored (forward compat).
# native/gen_protocol.py turns this table (and the constants above) into native/ls_protocol_gen.h,
# which the C producer checks messages with: keep it a plain literal of int and str.
_SCHEMA: dict[str, dict[str, type | tuple[type, ...]]] = {
    HELLO: {"v": int, "stream": str, "pid": int, "transport": str},
    WELCOME: {"v": int, "producer": int, "engine": str},
    RELEASE: {"through": int},
    ERROR: {"code": str, "reason": str},
    SHUTDOWN: {},
    STATUS: {},
}


def _is_int(val: Any) -> bool:
    """A msgpack integer: bool is a separate msgpack type, although Python makes it an int."""
    return isinstance(val, int) and not isinstance(val, bool)


def encode(msg: dict[str, Any]) -> bytes:
    """One control frame: 4-byte big-endian length, then the msgpack map."""
    body = msgpack.packb(msg, use_bin_type=True)
    if len(body) > MAX_CONTROL_MESSAGE:
        raise ProtocolError(E_BAD_MESSAGE, f"control message of {len(body)} bytes exceeds {MAX_CONTROL_MESSAGE}")
    return _LEN.pack(len(body)) + body


def check_message(msg: Any) -> dict[str, Any]:
    """Validate a decoded control message's shape; raise ProtocolError(E_BAD_MESSAGE) if wrong."""
    if not isinstance(msg, dict):
        raise ProtocolError(E_BAD_MESSAGE, f"control message is a {type(msg).__name__}, expected a map")
    kind = msg.get("t")
    schema = _SCHEMA.get(kind) if isinstance(kind, str) else None
    if schema is None:
        raise ProtocolError(E_BAD_MESSAGE, f"unknown control message type {kind!r}")
    for key, typ in schema.items():
        val = msg.get(key)
        if not (_is_int(val) if typ is int else isinstance(val, typ)):
            name = typ.__name__ if isinstance(typ, type) else " or ".join(t.__name__ for t in typ)
            raise ProtocolError(E_BAD_MESSAGE, f"{kind} message needs {key!r} of type {name}, got {val!r}")
    if kind == RELEASE:
        if msg["through"] < 0:
            raise ProtocolError(E_BAD_MESSAGE, f"release 'through' must be >= 0, got {msg['through']}")
        failed = msg.get("failed", [])
        if not isinstance(failed, list) or not all(
            isinstance(f, list) and len(f) == 3 and _is_int(f[0]) and isinstance(f[1], str) and isinstance(f[2], str)
            for f in failed
        ):
            raise ProtocolError(E_BAD_MESSAGE, "release 'failed' must be a list of [seq, code, reason]")
        suppressed = msg.get("suppressed", [])
        if not isinstance(suppressed, list) or not all(
            isinstance(f, list) and len(f) == 2 and _is_int(f[0]) and _is_int(f[1]) for f in suppressed
        ):
            raise ProtocolError(E_BAD_MESSAGE, "release 'suppressed' must be a list of [seq, records]")
    if kind == HELLO:
        if msg["v"] != PROTOCOL_VERSION:
            raise ProtocolError(E_BAD_VERSION, f"protocol version {msg['v']} is not supported (this daemon speaks {PROTOCOL_VERSION})")
        validate_stream_name(msg["stream"])
        if msg["transport"] not in TRANSPORTS:
            raise ProtocolError(E_BAD_MESSAGE, f"transport {msg['transport']!r} is not one of {TRANSPORTS}")
    return msg


class ControlDecoder:
    """Bytes in, messages out. ``feed(data)`` returns the complete messages now available.

    A ProtocolError leaves the decoder in an error state (every later feed raises again): the
    connection it belongs to must be closed, as nothing after garbage can be trusted.
    """

    def __init__(self, max_message: int = MAX_CONTROL_MESSAGE):
        self._buf = bytearray()
        self._max = max_message
        self._error: ProtocolError | None = None

    def feed(self, data: bytes, limit: int | None = None) -> list[dict[str, Any]]:
        """Buffer ``data``; return the complete messages (at most ``limit``: the rest stays
        buffered undecoded, e.g. a TCP producer's batch bytes that follow its HELLO too early)."""
        if self._error is not None:
            raise self._error
        self._buf += data
        out: list[dict[str, Any]] = []
        try:
            while len(self._buf) >= 4 and (limit is None or len(out) < limit):
                (n,) = _LEN.unpack_from(self._buf)
                if n == 0 or n > self._max:
                    raise ProtocolError(E_BAD_MESSAGE, f"control frame length {n} is outside 1..{self._max}")
                if len(self._buf) < 4 + n:
                    break
                body = bytes(self._buf[4 : 4 + n])
                del self._buf[: 4 + n]
                try:
                    msg = msgpack.unpackb(body, raw=False, strict_map_key=True)
                except Exception as exc:  # msgpack raises several types for garbage
                    raise ProtocolError(E_BAD_MESSAGE, f"control frame is not valid msgpack: {exc}") from None
                out.append(check_message(msg))
        except ProtocolError as exc:
            self._error = exc
            raise
        return out

    @property
    def buffered(self) -> int:
        """Bytes of an incomplete frame held back (a peer that closes with this > 0 sent half a frame)."""
        return len(self._buf)


def hello(stream: str, pid: int, transport: str, **extra: Any) -> dict[str, Any]:
    return {"t": HELLO, "v": PROTOCOL_VERSION, "stream": stream, "pid": pid, "transport": transport, **extra}


def welcome(producer: int, engine: str, **extra: Any) -> dict[str, Any]:
    return {"t": WELCOME, "v": PROTOCOL_VERSION, "producer": producer, "engine": engine, **extra}


def release(through: int, failed: list[list[Any]] | None = None, suppressed: list[list[int]] | None = None) -> dict[str, Any]:
    msg: dict[str, Any] = {"t": RELEASE, "through": through}
    if failed:
        msg["failed"] = failed  # [[seq, code, reason], ...]: batches that were NOT written
    if suppressed:
        msg["suppressed"] = suppressed  # [[seq, records], ...]: batches dropped over a rate limit
    return msg


def error(code: str, reason: str) -> dict[str, Any]:
    return {"t": ERROR, "code": code, "reason": reason}


# -- addresses ------------------------------------------------------------------------------------
def parse_tcp_address(address: str, listen: bool = False) -> tuple[str, int]:
    """``tcp://HOST:PORT`` (``[v6]:PORT`` for IPv6; no host = loopback) -> (host, port); ValueError says what is wrong.

    ``listen``: an address to bind, where port 0 means "any free port" (the daemon logs and shows the
    one it got); an address to connect to needs a real port."""
    if not address.startswith("tcp://"):
        raise ValueError(f"address {address!r} must look like tcp://HOST:PORT")
    rest = address[len("tcp://"):]
    host, sep, port = rest.rpartition(":")
    lowest = 0 if listen else 1
    if not sep or not port.isdigit() or not lowest <= int(port) < 65536:
        raise ValueError(f"address {address!r} must look like tcp://HOST:PORT with a port in {lowest}..65535")
    host = host.strip("[]") or "127.0.0.1"
    return host, int(port)


# -- a control connection's life, as one table ----------------------------------------------------
class ConnState(Enum):
    """Where a control connection is in its life (the daemon's view)."""

    AWAIT_HELLO = "await-hello"  # connected: STATUS any number of times, HELLO (with its fd, locally) once
    ADMITTING = "admitting"      # HELLO received and being checked: nothing else may arrive before WELCOME
    PRODUCING = "producing"      # local producer welcomed: batches flow in its data pipe; STATUS still answered
    FRAMES = "frames"            # TCP producer welcomed: the connection carries frames, the engine reads it
    ENDED = "ended"              # the local producer's pipe ended; the connection stays open for STATUS
    CLOSED = "closed"


class ConnEvent(Enum):
    """What happens to a control connection: from the peer (the first five) or from the daemon."""

    HELLO = "hello"              # a HELLO message arrived
    STATUS = "status"            # a STATUS request arrived
    OTHER = "other"              # a message only the daemon sends (welcome, release, error, shutdown)
    FD = "fd"                    # an fd arrived with SCM_RIGHTS
    DATA = "data"                # bytes after HELLO, before WELCOME (a TCP producer that did not wait)
    WELCOME = "welcome"          # the daemon admitted a local producer
    WELCOME_TCP = "welcome-tcp"  # the daemon admitted a TCP producer: the connection switches to frames
    PRODUCER_END = "producer-end"  # the engine ended the connection's producer
    CLOSE = "close"              # the daemon closes the connection (refusal, EOF, shutdown)


_S, _E = ConnState, ConnEvent
# Every legal (state, event) -> next state. Anything absent is illegal: conn_step raises.
CONN_TRANSITIONS: dict[tuple[ConnState, ConnEvent], ConnState] = {
    (_S.AWAIT_HELLO, _E.HELLO): _S.ADMITTING,
    (_S.AWAIT_HELLO, _E.STATUS): _S.AWAIT_HELLO,
    (_S.AWAIT_HELLO, _E.FD): _S.AWAIT_HELLO,  # held for the HELLO it came with
    (_S.ADMITTING, _E.WELCOME): _S.PRODUCING,
    (_S.ADMITTING, _E.WELCOME_TCP): _S.FRAMES,
    (_S.PRODUCING, _E.STATUS): _S.PRODUCING,
    (_S.PRODUCING, _E.PRODUCER_END): _S.ENDED,
    (_S.FRAMES, _E.PRODUCER_END): _S.CLOSED,  # a TCP connection is its producer's data stream
    (_S.ENDED, _E.STATUS): _S.ENDED,
}
for _state in ConnState:
    CONN_TRANSITIONS[(_state, _E.CLOSE)] = _S.CLOSED  # the daemon may close any connection, once or more

# Why an illegal transition is refused, where there is more to say than "not allowed here".
_AFTER_HELLO = (_S.ADMITTING, _S.PRODUCING, _S.FRAMES, _S.ENDED)
CONN_REFUSALS: dict[tuple[ConnState, ConnEvent], tuple[str, str]] = {
    **{(s, _E.HELLO): (E_BAD_MESSAGE, "HELLO sent twice on one connection") for s in _AFTER_HELLO},
    **{(s, _E.FD): (E_TOO_MANY_FDS, "an fd after HELLO: only HELLO carries one") for s in _AFTER_HELLO},
    **{(s, _E.OTHER): (E_BAD_MESSAGE, "{kind!r} is not a message a client may send") for s in ConnState},
    (_S.ADMITTING, _E.DATA): (E_BAD_MESSAGE, "data sent before WELCOME: wait for WELCOME, then send frames"),
    (_S.ADMITTING, _E.STATUS): (E_BAD_MESSAGE, "STATUS sent before WELCOME: wait for WELCOME"),
}
del _S, _E, _state


def conn_step(state: ConnState, event: ConnEvent, kind: str = "") -> ConnState:
    """The state after ``event`` in ``state``; ProtocolError (with the code the peer is told) if illegal.

    ``kind`` is the message type, for the reason given when a client sends a daemon-only message."""
    nxt = CONN_TRANSITIONS.get((state, event))
    if nxt is not None:
        return nxt
    code, reason = CONN_REFUSALS.get(
        (state, event), (E_BAD_MESSAGE, f"{event.value} is not allowed on a connection in state {state.value}"))
    raise ProtocolError(code, reason.format(kind=kind))
