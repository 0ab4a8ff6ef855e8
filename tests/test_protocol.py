"""Unit tests of logsink/protocol.py, the sans-io wire protocol (no daemon needed)."""

from __future__ import annotations

import ast
import json
import random
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import msgpack
import pytest

from logsink import protocol
from logsink.protocol import (
    E_BAD_FRAME,
    E_BAD_MESSAGE,
    E_BAD_STREAM,
    E_BAD_VERSION,
    FRAME_HEADER_SIZE,
    MAX_BATCH_PAYLOAD,
    MAX_CONTROL_MESSAGE,
    ControlDecoder,
    FrameHeader,
    ProtocolError,
)

PROTOCOL_PY = Path(protocol.__file__).resolve()


def frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def raw_frame(obj) -> bytes:
    return frame(msgpack.packb(obj, use_bin_type=True))


def decode_one(data: bytes):
    dec = ControlDecoder()
    msgs = dec.feed(data)
    assert len(msgs) == 1
    return msgs[0]


def expect_error(code: str, data: bytes) -> ProtocolError:
    dec = ControlDecoder()
    with pytest.raises(ProtocolError) as info:
        dec.feed(data)
    assert info.value.code == code, f"expected {code}, got {info.value.code}: {info.value.reason}"
    assert info.value.reason
    return info.value


class TestSansIo:
    def test_protocol_module_imports_neither_socket_nor_asyncio(self):
        """Loading protocol.py on its own in a fresh interpreter pulls in neither socket nor asyncio."""
        code = textwrap.dedent(f"""
            import importlib.util, json, sys
            spec = importlib.util.spec_from_file_location("lsk_protocol_alone", {str(PROTOCOL_PY)!r})
            mod = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = mod
            spec.loader.exec_module(mod)
            print(json.dumps([m for m in ("socket", "asyncio", "selectors", "_socket") if m in sys.modules]))
        """)
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=30, cwd="/")
        assert res.returncode == 0, res.stderr.decode()
        assert json.loads(res.stdout) == []

    def test_protocol_source_has_no_io_imports(self):
        """protocol.py's import statements name no I/O module (socket, asyncio, selectors, select, threading)."""
        tree = ast.parse(PROTOCOL_PY.read_text())
        names = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module.split(".")[0])
        assert not names & {"socket", "asyncio", "selectors", "select", "threading"}, names


class TestEncodeDecode:
    @pytest.mark.parametrize(
        "msg",
        [
            protocol.hello("app", 1234, "vmsplice"),
            protocol.hello("a.b-c_D9", 1, "copy", extra="ignored", n=[1, 2]),
            protocol.welcome(7, "io_uring"),
            protocol.release(42),
            protocol.release(3, failed=[[2, "write-failed", "disk full"]]),
            protocol.error(protocol.E_BAD_STREAM, "nope"),
            {"t": protocol.SHUTDOWN},
            {"t": protocol.STATUS},
            {"t": protocol.STATUS, "engine": "splice", "streams": {"app": {"bytes": 1}}},
        ],
        ids=lambda m: m["t"],
    )
    def test_round_trip_returns_the_same_message(self, msg):
        """encode then ControlDecoder.feed gives back an equal message."""
        data = protocol.encode(msg)
        assert struct.unpack(">I", data[:4])[0] == len(data) - 4
        assert decode_one(data) == msg

    def test_encode_refuses_oversize_message(self):
        """encode raises ProtocolError(bad-message) for a body above MAX_CONTROL_MESSAGE."""
        with pytest.raises(ProtocolError) as info:
            protocol.encode({"t": protocol.STATUS, "blob": b"x" * (MAX_CONTROL_MESSAGE + 1)})
        assert info.value.code == E_BAD_MESSAGE

    def test_message_constructors_produce_valid_messages(self):
        """hello/welcome/release/error build maps that pass check_message."""
        for msg in (protocol.hello("s", 1, "copy"), protocol.welcome(0, "splice"), protocol.release(1), protocol.error("x", "y")):
            assert protocol.check_message(msg) is msg
        assert protocol.hello("s", 5, "copy")["v"] == protocol.PROTOCOL_VERSION
        assert "failed" not in protocol.release(1)


class TestControlDecoder:
    def test_byte_at_a_time_input_yields_each_message_once(self):
        """Feeding several frames one byte at a time yields every message exactly once, in order."""
        msgs = [protocol.release(i) for i in range(1, 6)] + [protocol.hello("app", 9, "copy")]
        data = b"".join(protocol.encode(m) for m in msgs)
        dec = ControlDecoder()
        out = []
        for i in range(len(data)):
            out.extend(dec.feed(data[i : i + 1]))
            if i < len(data) - 1:
                assert dec.buffered > 0 or out  # something is held back until the frame completes
        assert out == msgs
        assert dec.buffered == 0

    def test_random_split_points_give_the_same_messages(self):
        """Any chunking of a stream of frames decodes to the same message list."""
        rng = random.Random(1234)
        msgs = [protocol.release(i) for i in range(50)] + [protocol.error("bad-fd", "r" * rng.randint(0, 300)) for _ in range(20)]
        rng.shuffle(msgs)
        data = b"".join(protocol.encode(m) for m in msgs)
        for _ in range(30):
            dec = ControlDecoder()
            out, pos = [], 0
            while pos < len(data):
                n = rng.randint(0, 40)
                out.extend(dec.feed(data[pos : pos + n]))
                pos += n
            assert out == msgs

    def test_many_frames_in_one_chunk(self):
        """One feed holding several whole frames returns all of them."""
        msgs = [protocol.release(i) for i in range(100)]
        assert ControlDecoder().feed(b"".join(map(protocol.encode, msgs))) == msgs

    def test_partial_frame_is_buffered_not_returned(self):
        """A frame missing its last byte yields nothing and reports its bytes as buffered."""
        data = protocol.encode(protocol.release(1))
        dec = ControlDecoder()
        assert dec.feed(data[:-1]) == []
        assert dec.buffered == len(data) - 1
        assert dec.feed(data[-1:]) == [protocol.release(1)]
        assert dec.buffered == 0

    def test_empty_feed_returns_nothing(self):
        """feed(b"") is a no-op."""
        dec = ControlDecoder()
        assert dec.feed(b"") == []
        assert dec.buffered == 0

    def test_garbage_bytes_raise_bad_message(self):
        """An HTTP request (its first 4 bytes read as a huge length) is rejected as bad-message."""
        expect_error(E_BAD_MESSAGE, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")

    def test_non_msgpack_body_raises_bad_message(self):
        """A well-framed body that is not msgpack is rejected as bad-message."""
        expect_error(E_BAD_MESSAGE, frame(b"\xc1\xc1\xc1"))

    def test_truncated_msgpack_body_raises_bad_message(self):
        """A frame whose body is a cut-off msgpack map is rejected as bad-message."""
        body = msgpack.packb(protocol.release(1))
        expect_error(E_BAD_MESSAGE, frame(body[:-1]))

    def test_trailing_bytes_in_body_raise_bad_message(self):
        """A body with extra bytes after the map is rejected as bad-message."""
        expect_error(E_BAD_MESSAGE, frame(msgpack.packb(protocol.release(1)) + b"\x00"))

    def test_oversize_length_raises_before_the_body_arrives(self):
        """A length prefix above the limit is rejected as soon as the 4 bytes are in."""
        dec = ControlDecoder()
        with pytest.raises(ProtocolError) as info:
            dec.feed(struct.pack(">I", MAX_CONTROL_MESSAGE + 1))
        assert info.value.code == E_BAD_MESSAGE

    def test_custom_max_message_is_enforced(self):
        """ControlDecoder(max_message=n) rejects a frame of n+1 bytes and accepts n."""
        body = msgpack.packb({"t": "status", "pad": "x" * 20})
        assert ControlDecoder(max_message=len(body)).feed(frame(body))
        with pytest.raises(ProtocolError):
            ControlDecoder(max_message=len(body) - 1).feed(frame(body))

    def test_zero_length_frame_raises_bad_message(self):
        """A frame of length 0 is rejected."""
        expect_error(E_BAD_MESSAGE, b"\x00\x00\x00\x00")

    def test_error_state_is_sticky(self):
        """After a ProtocolError every later feed raises again, even with valid bytes."""
        dec = ControlDecoder()
        with pytest.raises(ProtocolError):
            dec.feed(b"\xff\xff\xff\xff")
        with pytest.raises(ProtocolError):
            dec.feed(protocol.encode(protocol.release(1)))

    def test_valid_message_before_garbage_is_not_returned_with_error(self):
        """Garbage after a valid frame in the same chunk raises (the connection must close)."""
        dec = ControlDecoder()
        with pytest.raises(ProtocolError):
            dec.feed(protocol.encode(protocol.release(1)) + b"\xff\xff\xff\xff")


class TestSchema:
    @pytest.mark.parametrize(
        "obj",
        [[1, 2, 3], "hello", 17, None, b"bytes", True],
        ids=["list", "str", "int", "nil", "bin", "bool"],
    )
    def test_non_map_message_is_bad_message(self, obj):
        """A frame holding anything but a map is rejected as bad-message."""
        expect_error(E_BAD_MESSAGE, raw_frame(obj))

    @pytest.mark.parametrize("t", ["bogus", "HELLO", "", 1, None, b"hello", ["hello"]], ids=repr)
    def test_unknown_or_ill_typed_message_type_is_bad_message(self, t):
        """A map whose "t" is not a known message type string is rejected as bad-message."""
        expect_error(E_BAD_MESSAGE, raw_frame({"t": t, "v": 1}))

    def test_missing_type_is_bad_message(self):
        """A map without "t" is rejected as bad-message."""
        expect_error(E_BAD_MESSAGE, raw_frame({"v": 1, "stream": "app"}))

    def test_non_string_map_key_is_bad_message(self):
        """A map with an integer key is rejected (strict map keys) as bad-message."""
        expect_error(E_BAD_MESSAGE, raw_frame({1: "x", "t": "status"}))

    CASES = [
        (protocol.hello("app", 1, "copy"), {"v": int, "stream": str, "pid": int, "transport": str}),
        (protocol.welcome(1, "splice"), {"v": int, "producer": int, "engine": str}),
        (protocol.release(1), {"through": int}),
        (protocol.error("c", "r"), {"code": str, "reason": str}),
    ]
    KEY_CASES = [(m, k, t) for m, keys in CASES for k, t in keys.items()]

    @pytest.mark.parametrize("msg,key,typ", KEY_CASES, ids=[f"{m['t']}-{k}" for m, k, _ in KEY_CASES])
    def test_missing_required_key_is_bad_message(self, msg, key, typ):
        """Each required key of each message type, when missing, makes the message bad-message."""
        bad = {k: v for k, v in msg.items() if k != key}
        expect_error(E_BAD_MESSAGE, raw_frame(bad))
        with pytest.raises(ProtocolError):
            protocol.check_message(bad)

    @pytest.mark.parametrize("msg,key,typ", KEY_CASES, ids=[f"{m['t']}-{k}" for m, k, _ in KEY_CASES])
    def test_wrong_type_for_required_key_is_bad_message(self, msg, key, typ):
        """Each required key of each message type, with a value of the wrong type, is bad-message."""
        for wrong in ([1], {"a": 1}, 1.5, None) + (("str",) if typ is int else (7,)):
            bad = dict(msg, **{key: wrong})
            err = expect_error(E_BAD_MESSAGE, raw_frame(bad))
            assert key in err.reason

    @pytest.mark.parametrize("msg,key", [(protocol.hello("a", 1, "copy"), "pid"), (protocol.release(1), "through"), (protocol.welcome(1, "x"), "producer")])
    def test_bool_is_not_accepted_as_int(self, msg, key):
        """True/False where an int is required is bad-message (bool is not an int on the wire)."""
        expect_error(E_BAD_MESSAGE, raw_frame(dict(msg, **{key: True})))

    @pytest.mark.parametrize("v", [0, 2, 255, -1])
    def test_hello_with_other_version_is_bad_version(self, v):
        """A HELLO with a protocol version other than PROTOCOL_VERSION is bad-version."""
        expect_error(E_BAD_VERSION, raw_frame(dict(protocol.hello("app", 1, "copy"), v=v)))

    def test_hello_with_bad_stream_is_bad_stream(self):
        """A HELLO naming an invalid stream is bad-stream."""
        expect_error(E_BAD_STREAM, raw_frame(protocol.hello("../etc", 1, "copy")))

    @pytest.mark.parametrize("transport", ["auto", "splice", "", "VMSPLICE"])
    def test_hello_with_unknown_transport_is_bad_message(self, transport):
        """A HELLO whose transport is not vmsplice/copy is bad-message."""
        expect_error(E_BAD_MESSAGE, raw_frame(protocol.hello("app", 1, transport)))

    def test_unknown_extra_keys_are_ignored(self):
        """Extra keys do not invalidate a message (forward compatibility)."""
        msg = dict(protocol.release(5), future={"x": 1})
        assert decode_one(protocol.encode(msg)) == msg


class TestFrameHeader:
    def test_pack_unpack_round_trip(self):
        """unpack_frame_header(pack_frame_header(...)) returns the same fields."""
        for plen, recs, seq in [(1, 1, 1), (4096, 17, 2), (MAX_BATCH_PAYLOAD, 1, 2**64 - 1)]:
            data = protocol.pack_frame_header(plen, recs, seq)
            assert len(data) == FRAME_HEADER_SIZE == 32
            assert protocol.unpack_frame_header(data) == FrameHeader(plen, recs, seq, 0)

    def test_layout_matches_ls_frame_h(self):
        """The header's bytes follow the documented little-endian layout."""
        data = protocol.pack_frame_header(0x01020304, 5, 0x1122334455667788)
        assert data[:4] == b"LSK1"
        assert data[4] == 1 and data[5] == 0
        assert data[6:8] == (32).to_bytes(2, "little")
        assert data[8:12] == (0x01020304).to_bytes(4, "little")
        assert data[12:16] == (5).to_bytes(4, "little")
        assert data[16:24] == (0x1122334455667788).to_bytes(8, "little")
        assert data[24:32] == b"\0" * 8

    @pytest.mark.parametrize("n", [0, 31, 33, 64])
    def test_wrong_size_is_bad_frame(self, n):
        """A header that is not exactly 32 bytes is bad-frame."""
        with pytest.raises(ProtocolError) as info:
            protocol.unpack_frame_header(b"L" * n)
        assert info.value.code == E_BAD_FRAME

    def _bad(self, data: bytes, **kw) -> ProtocolError:
        with pytest.raises(ProtocolError) as info:
            protocol.unpack_frame_header(data, **kw)
        assert info.value.code == E_BAD_FRAME
        return info.value

    def test_bad_magic_is_bad_frame(self):
        """A header not starting with LSK1 is bad-frame and the reason says magic."""
        data = b"XSK1" + protocol.pack_frame_header(10, 1, 1)[4:]
        assert "magic" in self._bad(data).reason

    def test_bad_version_is_bad_frame(self):
        """A header with version byte 2 is bad-frame."""
        data = bytearray(protocol.pack_frame_header(10, 1, 1))
        data[4] = 2
        self._bad(bytes(data))

    def test_bad_header_len_is_bad_frame(self):
        """A header whose header_len field is not 32 is bad-frame."""
        data = bytearray(protocol.pack_frame_header(10, 1, 1))
        data[6:8] = (64).to_bytes(2, "little")
        self._bad(bytes(data))

    def test_zero_payload_is_bad_frame(self):
        """payload_len 0 is bad-frame."""
        self._bad(protocol.pack_frame_header(0, 1, 1))

    @pytest.mark.parametrize("plen", [MAX_BATCH_PAYLOAD + 1, 2**31, 2**32 - 1])
    def test_absurd_payload_is_bad_frame(self, plen):
        """payload_len above MAX_BATCH_PAYLOAD is bad-frame."""
        self._bad(protocol.pack_frame_header(plen, 1, 1))

    def test_custom_max_payload_is_enforced(self):
        """unpack_frame_header(max_payload=n) accepts n and rejects n+1."""
        assert protocol.unpack_frame_header(protocol.pack_frame_header(4096, 1, 1), max_payload=4096).payload_len == 4096
        self._bad(protocol.pack_frame_header(4097, 1, 1), max_payload=4096)

    def test_zero_records_is_bad_frame(self):
        """record_count 0 is bad-frame."""
        self._bad(protocol.pack_frame_header(10, 0, 1))

    def test_more_records_than_bytes_is_bad_frame(self):
        """record_count above payload_len is bad-frame (a record is at least its newline)."""
        assert protocol.unpack_frame_header(protocol.pack_frame_header(10, 10, 1)).record_count == 10
        self._bad(protocol.pack_frame_header(10, 11, 1))


class TestStreamNames:
    @pytest.mark.parametrize("name", ["a", "app", "A-Z_0.9", "web.access", "x" * 64, "a.b.c", "-", "_x", "9"])
    def test_valid_names_are_returned(self, name):
        """Names of 1..64 chars of [A-Za-z0-9._-] not starting with '.' and without '..' are valid."""
        assert protocol.validate_stream_name(name) == name

    @pytest.mark.parametrize(
        "name",
        ["", "x" * 65, "a/b", "/", "..", "a..b", "..a", ".hidden", ".", "a b", " a", "a\n", "a\x00",
         "é", "a\\b", "a:b", None, 5, b"app", ["app"]],
        ids=repr,
    )
    def test_invalid_names_raise_bad_stream(self, name):
        """Empty, too long, '/', '..', leading '.', whitespace, non-ASCII and non-str names are bad-stream."""
        with pytest.raises(ProtocolError) as info:
            protocol.validate_stream_name(name)
        assert info.value.code == E_BAD_STREAM
        assert isinstance(info.value, ValueError)


class TestFuzz:
    def test_random_bytes_only_raise_protocol_error(self):
        """Random byte strings fed in random chunks make ControlDecoder raise nothing but ProtocolError."""
        rng = random.Random(20240531)
        for _ in range(3000):
            dec = ControlDecoder(max_message=rng.choice([64, 4096, MAX_CONTROL_MESSAGE]))
            data = rng.randbytes(rng.randint(0, 200))
            if rng.random() < 0.5:  # make the length prefix plausible so the body gets parsed
                data = struct.pack(">I", rng.randint(1, 64)) + data
            pos = 0
            try:
                while pos <= len(data):
                    n = rng.randint(1, 50)
                    for msg in dec.feed(data[pos : pos + n]):
                        assert isinstance(msg, dict) and isinstance(msg["t"], str)
                    pos += n
            except ProtocolError as exc:
                assert exc.code in (E_BAD_MESSAGE, E_BAD_VERSION, E_BAD_STREAM)
                with pytest.raises(ProtocolError):
                    dec.feed(b"")

    def test_mutated_valid_frames_only_raise_protocol_error(self):
        """Valid frames with random byte flips, cuts and insertions yield valid messages or ProtocolError only."""
        rng = random.Random(7)
        seeds = [
            protocol.encode(protocol.hello("app", 123, "vmsplice")),
            protocol.encode(protocol.welcome(3, "io_uring")),
            protocol.encode(protocol.release(99, failed=[[1, "write-failed", "x"]])),
            protocol.encode(protocol.error("bad-fd", "not a pipe")),
            protocol.encode({"t": "status", "streams": {"a": {"b": [1, 2.5, None, True]}}}),
        ]
        for _ in range(5000):
            data = bytearray(rng.choice(seeds))
            for _ in range(rng.randint(1, 4)):
                op = rng.random()
                pos = rng.randrange(len(data))
                if op < 0.6:
                    data[pos] = rng.randrange(256)
                elif op < 0.8:
                    del data[pos:]
                    if not data:
                        data = bytearray(b"\x00")
                else:
                    data[pos:pos] = rng.randbytes(rng.randint(1, 8))
            dec = ControlDecoder()
            try:
                for msg in dec.feed(bytes(data)):
                    assert protocol.check_message(msg) is msg
            except ProtocolError:
                pass

    def test_random_frame_headers_only_raise_protocol_error(self):
        """Random 32-byte headers either unpack to a valid FrameHeader or raise ProtocolError(bad-frame)."""
        rng = random.Random(99)
        base = protocol.pack_frame_header(100, 3, 1)
        for i in range(5000):
            data = bytearray(base if i % 2 else rng.randbytes(32))
            data[rng.randrange(32)] = rng.randrange(256)
            try:
                h = protocol.unpack_frame_header(bytes(data))
            except ProtocolError as exc:
                assert exc.code == E_BAD_FRAME
            else:
                assert 1 <= h.record_count <= h.payload_len <= MAX_BATCH_PAYLOAD
