"""Hypothesis strategies for the fuzz targets: control frames, HELLO messages, frame headers and
data-pipe byte streams. Everything is built from ``logsink.protocol``'s constants, never copied."""

from __future__ import annotations

import struct
from typing import Any

import msgpack
from hypothesis import strategies as st
from lsk_helpers import protocol

U8, U16, U32, U64 = 2**8 - 1, 2**16 - 1, 2**32 - 1, 2**64 - 1
_FRAME = struct.Struct("<4sBBHIIQQ")  # the header layout of docs/protocol.md, field by field
MAX_BATCH = protocol.MAX_BATCH_PAYLOAD  # the daemon's default max_batch


def frame_header(magic: bytes = protocol.FRAME_MAGIC, version: int = protocol.PROTOCOL_VERSION, flags: int = 0,
                 header_len: int = protocol.FRAME_HEADER_SIZE, payload_len: int = 0, records: int = 0,
                 seq: int = 1, reserved: int = 0) -> bytes:
    """A 32-byte frame header with any field set to any value its width holds."""
    return _FRAME.pack(magic, version, flags, header_len, payload_len, records, seq, reserved)


# -- records ------------------------------------------------------------------------------------------
# A fuzzed producer's line: no NUL and no newline inside, so that a NUL in a file is a hole, not theirs.
line_body = st.binary(max_size=120).map(lambda b: b.replace(b"\n", b"~").replace(b"\0", b"0"))
whole_line = line_body.map(lambda b: b"fz " + b + b"\n")
whole_lines = st.lists(whole_line, min_size=1, max_size=8)
# Anything at all: a payload that may lack its final newline, hold NULs, or be empty.
any_payload = st.one_of(
    st.binary(max_size=300),
    st.builds(lambda lines, tail: b"".join(lines) + tail, whole_lines, line_body),  # a last line without '\n'
)


# -- frame headers ------------------------------------------------------------------------------------
def _bad_magic() -> st.SearchStrategy[bytes]:
    return st.one_of(st.sampled_from([b"LSK0", b"LSK2", b"lsk1", b"\0\0\0\0", b"1KSL"]),
                     st.binary(min_size=4, max_size=4)).filter(lambda m: m != protocol.FRAME_MAGIC)


# Each mutation of a header that the daemon must refuse (bad-frame) before it moves a payload byte.
INVALID_HEADER_FIELDS = {
    "magic": _bad_magic(),
    "version": st.integers(0, U8).filter(lambda v: v != protocol.PROTOCOL_VERSION),
    "header_len": st.integers(0, U16).filter(lambda v: v != protocol.FRAME_HEADER_SIZE),
    "payload_len": st.one_of(st.just(0), st.integers(MAX_BATCH + 1, U32), st.sampled_from([MAX_BATCH + 1, 2**31, U32])),
}
# Fields the daemon does not judge (or judges only by range): any value keeps the header acceptable.
FREE_HEADER_FIELDS = {
    "flags": st.integers(0, U8),
    "seq": st.one_of(st.integers(0, U64), st.sampled_from([0, 1, U64])),
    "reserved": st.integers(0, U64),
}


@st.composite
def lines_batch(draw) -> bytes:
    """A batch of whole lines whose header is valid or broken in a way the daemon must refuse; its
    payload_len is never wrong by a little (see ``any_batch`` for that)."""
    lines = draw(whole_lines)
    payload = b"".join(lines)
    fields: dict[str, Any] = {"payload_len": len(payload), "records": draw(st.integers(1, len(lines)))}
    for name in draw(st.sets(st.sampled_from(sorted(FREE_HEADER_FIELDS)))):
        fields[name] = draw(FREE_HEADER_FIELDS[name])
    broken = draw(st.none() | st.sampled_from(sorted(INVALID_HEADER_FIELDS) + ["records"]))
    if broken == "records":
        fields["records"] = draw(st.just(0) | st.integers(len(payload) + 1, U32))
    elif broken is not None:
        fields[broken] = draw(INVALID_HEADER_FIELDS[broken])
    return frame_header(**fields) + payload


@st.composite
def any_batch(draw) -> bytes:
    """A header that passes the daemon's checks or breaks one of them, with payload_len and records
    near the truth or anywhere, and any payload: no trailing newline, lengths overstated or
    understated (the next header read from the middle of a payload), NULs."""
    payload = draw(any_payload)
    n = len(payload)
    fields: dict[str, Any] = {
        "payload_len": draw(st.sampled_from([n, max(n, 1)]) | st.integers(max(1, n - 40), n + 40) | st.integers(0, U32)),
        "records": draw(st.integers(1, max(1, payload.count(b"\n"))) | st.integers(0, U32)),
    }
    broken = draw(st.none() | st.none() | st.sampled_from(["magic", "version", "header_len"]))
    if broken is not None:
        fields[broken] = draw(INVALID_HEADER_FIELDS[broken])
    for name in draw(st.sets(st.sampled_from(sorted(FREE_HEADER_FIELDS)))):
        fields[name] = draw(FREE_HEADER_FIELDS[name])
    return frame_header(**fields) + payload


def truncated(stream_of_bytes: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    """The bytes as drawn, or cut short anywhere (a producer that dies mid-header or mid-payload)."""
    @st.composite
    def cut(draw) -> bytes:
        data = draw(stream_of_bytes)
        if data and draw(st.integers(0, 3)) == 0:
            return data[: draw(st.integers(0, len(data) - 1))]
        return data
    return cut()


# Data-pipe byte streams (what a producer writes to its pipe after WELCOME, then closes it).
pipe_lines_stream = truncated(st.lists(lines_batch(), min_size=1, max_size=5).map(b"".join))
pipe_any_stream = truncated(st.lists(st.one_of(any_batch(), lines_batch(), st.binary(min_size=1, max_size=64)),
                                     min_size=1, max_size=5).map(b"".join))


# -- msgpack and control frames -----------------------------------------------------------------------
msgpack_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**63), U64), st.floats(allow_nan=True),
    st.text(max_size=40), st.binary(max_size=40),
)
msgpack_values = st.recursive(
    msgpack_scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=10) | st.integers(-5, 5), inner, max_size=4)),
    max_leaves=12,
)
MESSAGE_TYPES = [protocol.HELLO, protocol.WELCOME, protocol.RELEASE, protocol.ERROR, protocol.SHUTDOWN, protocol.STATUS]


def pack(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


def framed(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


@st.composite
def message_map(draw) -> dict[Any, Any]:
    """A msgpack map that looks like a control message: a known or unknown type, known keys with
    values of any type, extra keys."""
    msg: dict[Any, Any] = {}
    if draw(st.booleans()):
        msg["t"] = draw(st.sampled_from(MESSAGE_TYPES) | msgpack_scalars)
    for key in draw(st.sets(st.sampled_from(["v", "stream", "pid", "transport", "through", "failed", "code", "reason", "producer", "engine"]))):
        msg[key] = draw(msgpack_values)
    msg.update(draw(st.dictionaries(st.text(max_size=8), msgpack_scalars, max_size=2)))
    return msg


@st.composite
def control_frame(draw) -> bytes:
    """One control frame: well framed or not, a message-like map or any msgpack value or junk."""
    kind = draw(st.sampled_from(["map", "value", "junk", "status", "bad-length", "raw"]))
    if kind == "map":
        return framed(pack(draw(message_map())))
    if kind == "value":
        return framed(pack(draw(msgpack_values)))
    if kind == "junk":
        return framed(draw(st.binary(min_size=1, max_size=64)))
    if kind == "status":
        return protocol.encode({"t": protocol.STATUS})
    if kind == "bad-length":  # the prefix says 0, more than the limit, or more or less than the body
        body = pack(draw(message_map()))
        n = draw(st.sampled_from([0, protocol.MAX_CONTROL_MESSAGE + 1, U32]) | st.integers(0, len(body) + 64))
        return struct.pack(">I", n) + body
    return draw(st.binary(min_size=1, max_size=64))


# -- HELLO ----------------------------------------------------------------------------------------------
def _wrong_type(like: Any) -> st.SearchStrategy[Any]:
    return msgpack_values.filter(lambda v: type(v) is not type(like))


def invalid_stream_names() -> st.SearchStrategy[str]:
    def invalid(name: str) -> bool:
        try:
            protocol.validate_stream_name(name)
            return False
        except protocol.ProtocolError:
            return True
    return st.one_of(
        st.sampled_from(["", "x" * 65, "a/b", "../escape", "a..b", "..", ".", ".hidden", "a b", "app\0", "/etc/passwd", "app.log/"]),
        st.text(max_size=70),
    ).filter(invalid)


@st.composite
def hello_message(draw, streams: list[str], transports: tuple[str, ...]) -> dict[Any, Any]:
    """A HELLO for one of ``streams`` (or an invalid name), each field kept, dropped, retyped or
    changed; plus optional fields and unknown keys."""
    msg: dict[Any, Any] = protocol.hello(draw(st.sampled_from(streams)), draw(st.integers(0, 2**31 - 1)), draw(st.sampled_from(transports)))
    # Mostly one change at a time, so that each check of the daemon's gets its turn to fire.
    for key in draw(st.lists(st.sampled_from(["v", "stream", "stream", "pid", "transport", "t"]), max_size=2, unique=True)):
        how = draw(st.sampled_from(["drop", "retype", "change"]))
        if how == "drop":
            del msg[key]
        elif how == "retype":
            msg[key] = draw(_wrong_type(msg[key]))
        elif key == "t":
            msg[key] = draw(st.sampled_from(MESSAGE_TYPES) | st.text(max_size=8))
        elif key == "v":
            msg[key] = draw(st.sampled_from([0, 2, -1, 255, U64]) | st.integers(-(2**63), U64))
        elif key == "stream":
            msg[key] = draw(invalid_stream_names())
        elif key == "pid":
            msg[key] = draw(st.integers(-(2**63), U64))
        else:
            msg[key] = draw(st.sampled_from(protocol.TRANSPORTS) | st.text(max_size=12))
    for key in draw(st.lists(st.sampled_from(["segment_size", "pipe_size", "token"]), max_size=3, unique=True)):
        msg[key] = draw(msgpack_values | st.integers(-(2**63), U64))
    msg.update(draw(st.dictionaries(st.text(max_size=8).filter(lambda k: k not in msg), msgpack_scalars, max_size=2)))
    return msg


def hello_stream(msg: Any) -> str | None:
    """The stream a HELLO names, if it names one (what its pipe bytes are aimed at)."""
    return msg.get("stream") if isinstance(msg, dict) and isinstance(msg.get("stream"), str) else None


def named_stream(data: bytes) -> str | None:
    """The stream the first map with a string ``stream`` names, over the frames in ``data``
    decoded leniently: where an accepted producer's batch goes."""
    pos = 0
    while pos + 4 <= len(data):
        n = int.from_bytes(data[pos : pos + 4], "big")
        try:
            stream = hello_stream(msgpack.unpackb(data[pos + 4 : pos + 4 + n], raw=False, strict_map_key=False))
        except Exception:
            return None
        if stream is not None:
            return stream
        pos += 4 + n
    return None
