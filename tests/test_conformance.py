"""One protocol source: the C side (native/ls_protocol_gen.h, the producer's checks) agrees with logsink/protocol.py.

The same byte vectors - the fuzz corpus seeds, hand-made edge cases and Hypothesis-generated ones -
go through protocol.py's decoder (the reference) and the C producer's (``ls_check_control_frame``,
``ls_check_frame_header``, ``ls_validate_stream_name``, reached through cffi), and must get the
same verdict: the message type, or the protocol error code.
"""

from __future__ import annotations

import errno
import runpy
import struct
import subprocess
import sys
from pathlib import Path

import msgpack
import pytest
from fuzz import strategies as fs
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from logsink import protocol
from logsink._native import ffi, lib

ROOT = Path(__file__).resolve().parent.parent
CORPUS = Path(__file__).resolve().parent / "fuzz" / "corpus"
GEN = ROOT / "native" / "gen_protocol.py"
KINDS = {getattr(lib, f"LS_MSG_{name.upper()}"): name for name in protocol._SCHEMA}
FRAME_VERDICTS = {"magic": lib.LS_EFRAME_MAGIC, "version": lib.LS_EFRAME_VERSION,
                  "payload length": lib.LS_EFRAME_LENGTH, "record count": lib.LS_EFRAME_RECORDS}
EXAMPLES = settings(max_examples=400, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


def framed(msg: object) -> bytes:
    return fs.framed(msgpack.packb(msg, use_bin_type=True))


# -- the two deciders ---------------------------------------------------------------------------------
def py_control(data: bytes) -> str | None:
    """protocol.py's verdict on the first control frame in data: its type, an error code, or None (incomplete)."""
    try:
        msgs = protocol.ControlDecoder().feed(data, limit=1)
    except protocol.ProtocolError as exc:
        return f"error {exc.code}"
    return msgs[0]["t"] if msgs else None


def c_control(data: bytes) -> str | None:
    why = ffi.new("char[512]")
    r = lib.ls_check_control_frame(data, len(data), why, 512)
    if r == 0:
        return None
    if r > 0:
        return KINDS[r]
    assert r == -errno.EPROTO, r
    code, _, reason = ffi.string(why).decode().partition(": ")
    assert reason, "the C check says why"
    return f"error {code}"


def py_frame(header: bytes, max_payload: int) -> int:
    try:
        protocol.unpack_frame_header(header, max_payload)
    except protocol.ProtocolError as exc:
        assert exc.code == protocol.E_BAD_FRAME
        return next(v for word, v in FRAME_VERDICTS.items() if word in exc.reason)
    return 0


def c_frame(header: bytes, max_payload: int) -> int:
    return lib.ls_check_frame_header(header, len(header), max_payload)


def py_stream_ok(name: str) -> bool:
    try:
        protocol.validate_stream_name(name)
        return True
    except protocol.ProtocolError:
        return False


# -- vectors ----------------------------------------------------------------------------------------
def corpus(kind: str) -> list[bytes]:
    return [p.read_bytes() for p in sorted((CORPUS / kind).glob("*.bin"))]


def hello(**changes: object) -> dict[str, object]:
    msg: dict[str, object] = protocol.hello("app", 42, "vmsplice")
    msg.update(changes)
    return {k: v for k, v in msg.items() if v is not DROP}


DROP = object()
CONTROL_VECTORS = [
    framed(hello()), framed(hello(transport="copy")), framed(hello(transport="zerocopy")),
    framed(hello(v=2)), framed(hello(v=-1)), framed(hello(v=2**64 - 1)), framed(hello(v=True)),
    framed(hello(stream="a..b")), framed(hello(stream=".x")), framed(hello(stream="x" * 64)),
    framed(hello(stream="x" * 65)), framed(hello(stream="app\0")), framed(hello(stream="é")),
    framed(hello(stream=b"app")), framed(hello(transport="tcp")), framed(hello(transport=DROP)),
    framed(hello(pid=True)), framed(hello(pid=1.0)),
    framed(protocol.welcome(3, "io_uring")), framed({"t": "welcome", "v": 1, "producer": "3", "engine": "x"}),
    framed(protocol.release(0)), framed(protocol.release(5, [[4, "write-failed", "disk full"]])),
    framed({"t": "release", "through": -1}), framed({"t": "release", "through": 2**64 - 1}),
    framed({"t": "release", "through": 1, "failed": None}), framed({"t": "release", "through": 1, "failed": []}),
    framed({"t": "release", "through": 1, "failed": [[1, "c", "r", "extra"]]}),
    framed({"t": "release", "through": 1, "failed": [[1, "c"]]}), framed({"t": "release", "through": 1, "failed": [[True, "c", "r"]]}),
    framed({"t": "release", "through": 1, "failed": [[-1, "c", "r"]]}), framed({"t": "release", "through": 1, "failed": [1]}),
    framed({"t": "release", "through": 1, "failed": {"a": 1}}), framed({"t": "release", "through": 1.5}),
    framed(protocol.error("forbidden", "no")), framed({"t": "error", "code": "x"}), framed({"t": "shutdown"}),
    framed({"t": "status", "extra": [1, {"deep": None}]}), framed({"t": "nope"}), framed({"t": 1}), framed({}),
    framed([1, 2]), framed({"t": "status", "t2": b"bin"}), fs.framed(b"\xc1"), fs.framed(b"\x81\xa1t"),
    fs.framed(msgpack.packb({"t": "status"}) + b"\x00"), b"\0\0\0\0", b"\0\0\0", struct.pack(">I", protocol.MAX_CONTROL_MESSAGE + 1),
    struct.pack(">I", 10) + b"\x80",
]


class TestGeneratedHeader:
    def test_committed_header_matches_protocol_py(self):
        """native/ls_protocol_gen.h is what gen_protocol.py makes of today's protocol.py (else: rerun it and commit)."""
        res = subprocess.run([sys.executable, str(GEN), "--check"], capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr

    def test_stale_header_is_detected(self, tmp_path):
        """Changing an error code in protocol.py changes the generated header, so the check above would fail."""
        gen = runpy.run_path(str(GEN))
        changed = tmp_path / "protocol.py"
        changed.write_text((ROOT / "logsink" / "protocol.py").read_text().replace('"forbidden"', '"denied"'))
        assert gen["render"](changed) != (ROOT / "native" / "ls_protocol_gen.h").read_text()
        assert '#define LS_PROTO_E_FORBIDDEN "denied"' in gen["render"](changed)

    def test_generation_does_not_import_protocol_or_msgpack(self):
        """gen_protocol.py reads protocol.py as text: it runs where msgpack is missing (pip's isolated build)."""
        code = ("import sys; sys.modules['msgpack'] = None; import runpy; "
                f"g = runpy.run_path({str(GEN)!r}); print(len(g['render']()))")
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd="/")
        assert res.returncode == 0 and int(res.stdout) > 0, res.stderr

    def test_c_constants_come_from_protocol_py(self):
        """The C limits the Python package sees through cffi are protocol.py's."""
        assert lib.LS_FRAME_HEADER_SIZE == protocol.FRAME_HEADER_SIZE
        assert lib.LS_MAX_BATCH_PAYLOAD == protocol.MAX_BATCH_PAYLOAD
        assert lib.LS_MAX_STREAM_NAME == protocol.MAX_STREAM_NAME
        assert sorted(KINDS.values()) == sorted(protocol._SCHEMA)


class TestControlFrames:
    @pytest.mark.parametrize("data", CONTROL_VECTORS + corpus("control") + corpus("hello"), ids=repr)
    def test_vectors_get_the_same_verdict(self, data):
        """Each hand-made and corpus control frame gets the same type or error code from C as from protocol.py."""
        assert c_control(data) == py_control(data)

    def test_vectors_cover_every_verdict(self):
        """The vectors reach every message type and every error code the check can give."""
        verdicts = {py_control(d) for d in CONTROL_VECTORS}
        assert set(protocol._SCHEMA) | {f"error {c}" for c in (protocol.E_BAD_MESSAGE, protocol.E_BAD_VERSION, protocol.E_BAD_STREAM)} <= verdicts

    @EXAMPLES
    @given(fs.control_frame())
    def test_generated_control_frames_get_the_same_verdict(self, data):
        """Fuzz-style control frames (any map, any msgpack value, junk, bad lengths) agree too."""
        assert c_control(data) == py_control(data)

    @EXAMPLES
    @given(st.data())
    def test_generated_hellos_get_the_same_verdict(self, data):
        """HELLOs with fields dropped, retyped or changed (version, stream name, transport) agree too."""
        msg = data.draw(fs.hello_message(["app", "other.log"], protocol.TRANSPORTS))
        wire = framed(msg)
        assert c_control(wire) == py_control(wire)


class TestFrameHeaders:
    @pytest.mark.parametrize("data", corpus("pipe"), ids=repr)
    def test_corpus_headers_get_the_same_verdict(self, data):
        """The first 32 bytes of each data-pipe corpus seed get the same verdict from C and Python."""
        head = data[: protocol.FRAME_HEADER_SIZE].ljust(protocol.FRAME_HEADER_SIZE, b"\0")
        assert c_frame(head, protocol.MAX_BATCH_PAYLOAD) == py_frame(head, protocol.MAX_BATCH_PAYLOAD)

    @EXAMPLES
    @given(st.data())
    def test_headers_with_any_field_get_the_same_verdict(self, data):
        """Headers with each field at any value its width holds, against any max_payload, agree."""
        fields = {name: data.draw(s) for name, s in fs.INVALID_HEADER_FIELDS.items() if data.draw(st.booleans())}
        fields |= {name: data.draw(s) for name, s in fs.FREE_HEADER_FIELDS.items()}
        fields.setdefault("payload_len", data.draw(st.integers(0, 2**32 - 1)))
        fields["records"] = data.draw(st.integers(0, 2**32 - 1) | st.integers(0, fields["payload_len"] + 1))
        header = fs.frame_header(**fields)
        max_payload = data.draw(st.sampled_from([protocol.MAX_BATCH_PAYLOAD, 1, 4096, 2**32 - 1]))
        assert c_frame(header, max_payload) == py_frame(header, max_payload)

    @EXAMPLES
    @given(st.binary(min_size=32, max_size=32))
    def test_random_bytes_get_the_same_verdict(self, header):
        """Any 32 bytes at all get the same verdict."""
        assert c_frame(header, protocol.MAX_BATCH_PAYLOAD) == py_frame(header, protocol.MAX_BATCH_PAYLOAD)

    def test_wrong_length_is_refused_by_both(self):
        """A header that is not 32 bytes is refused by both (C: -EINVAL, as it is the caller's error)."""
        assert c_frame(b"LSK1" + b"\0" * 27, 100) == -errno.EINVAL
        with pytest.raises(protocol.ProtocolError):
            protocol.unpack_frame_header(b"LSK1" + b"\0" * 27)


class TestVerdictCodes:
    NAMES = ("LS_EFRAME_MAGIC", "LS_EFRAME_VERSION", "LS_EFRAME_LENGTH", "LS_EFRAME_RECORDS",
             "LS_EBATCH_TOO_BIG", "LS_EBATCH_NO_NEWLINE", "LS_EBATCH_VANISHED", "LS_EBATCH_ARENA")

    def test_frame_verdicts_are_outside_the_errno_space(self):
        """Frame and batch verdicts are distinct positive codes above any errno, never mistaken for a -errno."""
        values = [getattr(lib, n) for n in self.NAMES]
        assert len(set(values)) == len(values)
        assert all(v > lib.LS_FRAME_VERDICT_BASE > max(errno.errorcode) for v in values), values

    def test_daemon_explains_every_verdict(self):
        """The daemon has a sentence for each verdict the engine can report."""
        from logsink.daemon import refusals

        assert set(refusals.FRAME_ERRORS) == {getattr(lib, n) for n in self.NAMES}


class TestStreamNames:
    NAMES = ["app", "a.b", "a-b_c", "x" * 64, "x" * 65, "", ".", "..", ".hidden", "a..b", "a/b", "a b", "é", "A9.-_",
             "ends.", "a.b.c", "../x"]

    @pytest.mark.parametrize("name", NAMES)
    def test_names_get_the_same_verdict(self, name):
        """ls_validate_stream_name accepts exactly the names protocol.validate_stream_name does."""
        assert (lib.ls_validate_stream_name(name.encode()) == 0) == py_stream_ok(name)

    @EXAMPLES
    @given(st.text(max_size=70).filter(lambda s: "\0" not in s))
    def test_generated_names_get_the_same_verdict(self, name):
        """Any text (a C string holds no NUL: HELLO's msgpack str covers that case) gets the same verdict."""
        assert (lib.ls_validate_stream_name(name.encode()) == 0) == py_stream_ok(name)
