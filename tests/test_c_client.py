"""The C producer (native/ls_producer.c, native/ls_msgpack.c) and liblogsink (clients/c): build, codec, delivery, errors.

Builds clients/c with make (no skip: a missing compiler fails the run), exercises the msgpack codec
against Python's msgpack, the producer state machine through cffi (a test build of the native
sources, so the ls_* internals are reachable) against live and scripted daemons, and the
examples (minimal, logsink-blast) end to end.
"""

from __future__ import annotations

import errno
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path

import msgpack
import pytest
from lsk_helpers import ENGINES, assert_file, make_records, proc_state, wait_for

ROOT = Path(__file__).resolve().parent.parent
CLIENT_DIR = ROOT / "clients" / "c"
NATIVE = ROOT / "native"
MAKE_TIMEOUT = 180

CDEF = """
#define LS_TRANSPORT_VMSPLICE 1
#define LS_TRANSPORT_COPY 2
#define LS_ON_FULL_BLOCK 0
#define LS_ON_FULL_DROP 1
struct ls_producer_opts { int transport; uint32_t segment_size; uint32_t segments; int on_full;
                          int timeout_ms; int flush_interval_ms; int64_t expected_uid; uint32_t zc_copied_switch; int reconnect; };
struct ls_producer_stats { uint64_t batches; uint64_t records; uint64_t bytes; uint64_t dropped_records;
                           uint64_t failed_batches; uint64_t released_through; uint64_t handed_over_through;
                           uint64_t pinned_segments; uint64_t segment_size; uint64_t segments;
                           uint64_t pipe_size; uint64_t waits_for_release;
                           uint64_t zc_sends; uint64_t zc_completed; uint64_t zc_copied; uint64_t zc_enobufs;
                           uint64_t copied_sends; uint64_t zc_switched_to_copy;
                           uint64_t reconnects; uint64_t resent_batches; uint64_t resent_bytes;
                           uint64_t disconnected_us; uint64_t connected; uint64_t lost_batches;
                           uint64_t suppressed_batches; uint64_t suppressed_records; };
struct ls_producer;
int ls_producer_opts_init(struct ls_producer_opts *opts);
int ls_validate_stream_name(const char *stream);
int ls_default_socket_path(char *buf, size_t size);
int ls_producer_open(const char *stream, const char *socket_path, const struct ls_producer_opts *opts,
                     struct ls_producer **out);
int ls_producer_write(struct ls_producer *p, const void *data, size_t len);
int ls_producer_try_write(struct ls_producer *p, const void *data, size_t len);
int ls_producer_flush(struct ls_producer *p, int timeout_ms);
int ls_producer_flush_start(struct ls_producer *p, uint64_t *target);
int ls_producer_flush_check(struct ls_producer *p, uint64_t target);
uint64_t ls_producer_released(struct ls_producer *p);
int ls_producer_event_fd(struct ls_producer *p);
int ls_producer_close(struct ls_producer *p);
int ls_producer_stats(struct ls_producer *p, struct ls_producer_stats *out);
const char *ls_producer_last_error(struct ls_producer *p);

struct ls_mp_node { uint8_t type; uint32_t len; uint32_t next;
                    union { int64_t i; uint64_t u; double f; int b; const char *s; } v; };
struct ls_mp_doc { struct ls_mp_node *nodes; uint32_t count; uint32_t cap; };
int ls_mp_decode(const void *buf, size_t len, struct ls_mp_doc *doc);
void ls_mp_doc_free(struct ls_mp_doc *doc);
struct ls_mp_enc { uint8_t *buf; size_t cap; size_t len; int err; };
void ls_mp_enc_init(struct ls_mp_enc *e, void *buf, size_t cap);
void ls_mp_put_nil(struct ls_mp_enc *e);
void ls_mp_put_bool(struct ls_mp_enc *e, int v);
void ls_mp_put_int(struct ls_mp_enc *e, int64_t v);
void ls_mp_put_uint(struct ls_mp_enc *e, uint64_t v);
void ls_mp_put_str(struct ls_mp_enc *e, const char *s, size_t len);
void ls_mp_put_array(struct ls_mp_enc *e, uint32_t n);
void ls_mp_put_map(struct ls_mp_enc *e, uint32_t n);
int64_t ls_mp_enc_finish(struct ls_mp_enc *e);
"""
# enum ls_mp_type
NIL, BOOL, INT, UINT, FLOAT, STR, BIN, ARRAY, MAP, EXT = range(1, 11)


# -- builds ---------------------------------------------------------------------------------------
def _compiler() -> str:
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if not cc:
        pytest.fail("no C compiler (gcc/cc) on PATH: the C client tests need one; install gcc")
    return cc


@pytest.fixture(scope="session")
def c_build(tmp_path_factory):
    """``make -C clients/c`` into a private build directory; returns (build dir, make output)."""
    _compiler()
    if not shutil.which("make"):
        pytest.fail("make is not on PATH: the C client tests need it")
    build = tmp_path_factory.mktemp("cbuild") / "build"
    res = subprocess.run(["make", "-C", str(CLIENT_DIR), f"BUILD={build}"], capture_output=True, text=True, timeout=MAKE_TIMEOUT)
    out = res.stdout + res.stderr
    assert res.returncode == 0, f"make -C clients/c failed:\n{out}"
    return build, out


@pytest.fixture(scope="session")
def native(tmp_path_factory):
    """The native producer + codec compiled into a test library with every symbol visible, loaded with cffi."""
    from cffi import FFI

    cc = _compiler()
    out = tmp_path_factory.mktemp("native") / "libls_test.so"
    srcs = [str(NATIVE / n) for n in ("ls_producer.c", "ls_producer_send.c", "ls_producer_msg.c", "ls_producer_conn.c", "ls_transport.c", "ls_msgpack.c", "ls_render.c", "ls_zerocopy.c")]
    res = subprocess.run([cc, "-std=gnu11", "-O2", "-Wall", "-Wextra", "-shared", "-fPIC", "-o", str(out), *srcs, "-lpthread"],
                         capture_output=True, text=True, timeout=MAKE_TIMEOUT)
    assert res.returncode == 0, f"compiling the native producer failed:\n{res.stderr}"
    assert "warning" not in res.stderr, res.stderr
    ffi = FFI()
    ffi.cdef(CDEF)
    return ffi, ffi.dlopen(str(out))


# -- the codec ------------------------------------------------------------------------------------
def c_decode(native, data: bytes):
    """Decode with ls_mp_decode and rebuild the Python object from the node array (or return -errno)."""
    ffi, lib = native
    doc = ffi.new("struct ls_mp_doc *")
    buf = ffi.from_buffer(data)
    try:
        r = lib.ls_mp_decode(buf, len(data), doc)
        if r < 0:
            return r
        nodes = doc.nodes

        def build(i):
            n = nodes[i]
            t = n.type
            if t == NIL:
                return None
            if t == BOOL:
                return bool(n.v.b)
            if t == INT:
                return n.v.i
            if t == UINT:
                return n.v.u
            if t == FLOAT:
                return n.v.f
            if t in (STR, BIN, EXT):
                raw = ffi.buffer(n.v.s, n.len)[:]
                return raw.decode() if t == STR else raw if t == BIN else ("ext", raw)
            if t == ARRAY:
                out, k = [], i + 1
                for _ in range(n.len):
                    out.append(build(k))
                    k = nodes[k].next
                return out
            assert t == MAP, t
            out, k = {}, i + 1
            for _ in range(n.len):
                key = build(k)
                k = nodes[k].next
                out[key] = build(k)
                k = nodes[k].next
            return out

        assert doc.count >= 1
        assert nodes[0].next == doc.count, "root subtree must span every node"
        return build(0)
    finally:
        lib.ls_mp_doc_free(doc)


def c_encode(native, obj) -> bytes:
    """Encode a nil/bool/int/str/list/dict tree with the C encoder."""
    ffi, lib = native
    buf = ffi.new("uint8_t[]", 1 << 21)
    e = ffi.new("struct ls_mp_enc *")
    lib.ls_mp_enc_init(e, buf, 1 << 21)

    def put(o):
        if o is None:
            lib.ls_mp_put_nil(e)
        elif isinstance(o, bool):
            lib.ls_mp_put_bool(e, o)
        elif isinstance(o, int):
            if o > (1 << 63) - 1:
                lib.ls_mp_put_uint(e, o)
            else:
                lib.ls_mp_put_int(e, o)
        elif isinstance(o, str):
            b = o.encode()
            lib.ls_mp_put_str(e, b, len(b))
        elif isinstance(o, list):
            lib.ls_mp_put_array(e, len(o))
            for x in o:
                put(x)
        elif isinstance(o, dict):
            lib.ls_mp_put_map(e, len(o))
            for k, v in o.items():
                put(k)
                put(v)
        else:
            raise TypeError(o)

    put(obj)
    n = lib.ls_mp_enc_finish(e)
    assert n >= 0, n
    return ffi.buffer(buf, n)[:]


INT_EDGES = [0, 1, 31, 127, 128, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**63 - 1, 2**63, 2**64 - 1,
             -1, -31, -32, -33, -127, -128, -129, -32768, -32769, -(2**31), -(2**31) - 1, -(2**63)]
STR_EDGES = ["", "t", "x" * 31, "x" * 32, "x" * 255, "x" * 256, "x" * 65535, "x" * 65536, "héllo wörld ✓ 🎉"]


def random_obj(rng: random.Random, depth: int = 0):
    kinds = ["nil", "bool", "int", "str"] + (["list", "dict"] if depth < 4 else [])
    k = rng.choice(kinds)
    if k == "nil":
        return None
    if k == "bool":
        return rng.random() < 0.5
    if k == "int":
        return rng.choice(INT_EDGES + [rng.randint(-(2**63), 2**64 - 1), rng.randint(-1000, 1000)])
    if k == "str":
        return "".join(rng.choice("ab✓é\n\"🎉") for _ in range(rng.choice([0, 1, 5, 40, 300])))
    if k == "list":
        return [random_obj(rng, depth + 1) for _ in range(rng.choice([0, 1, 3, 15, 16, 20]))]
    return {f"k{i}-{rng.random()}": random_obj(rng, depth + 1) for i in range(rng.choice([0, 1, 3, 15, 16, 17]))}


class TestMsgpackCodec:
    def test_decoder_reads_every_edge_value_python_writes(self, native):
        """Ints at every format boundary, strs at every length boundary, nil, bools, floats, bin, ext decode to the same values."""
        values = INT_EDGES + STR_EDGES + [None, True, False, 1.5, -0.25, b"", b"\x00bin", b"z" * 300]
        for v in values:
            assert c_decode(native, msgpack.packb(v, use_bin_type=True)) == v, v
        assert c_decode(native, msgpack.packb(struct.unpack("<f", struct.pack("<f", 0.5))[0], use_single_float=True)) == 0.5
        assert c_decode(native, msgpack.packb(msgpack.ExtType(5, b"abc"))) == ("ext", b"abc")

    def test_decoder_reads_control_messages(self, native):
        """RELEASE with a failed list, ERROR, WELCOME and a STATUS reply decode to what protocol.py encoded."""
        from logsink import protocol

        msgs = [
            protocol.release(7, [[5, "write-failed", "No space left on device"], [6, "write-failed", "x"]]),
            protocol.error("bad-stream", "stream name '..' is invalid"),
            protocol.welcome(3, "io_uring", max_batch=64 << 20),
            {"t": "status", "status": {"streams": {"app": {"bytes": 10, "ratio": 0.5}}, "producers": [{"id": 1}]}},
            {"t": "shutdown"},
        ]
        for m in msgs:
            frame = protocol.encode(m)
            assert struct.unpack(">I", frame[:4])[0] == len(frame) - 4
            assert c_decode(native, frame[4:]) == m

    def test_random_trees_round_trip_both_ways(self, native):
        """500 random nested maps/arrays: C decodes Python's bytes, and C's encoding is byte-identical to Python's."""
        rng = random.Random(1234)
        for _ in range(500):
            obj = {"t": "x", "body": random_obj(rng)}
            packed = msgpack.packb(obj, use_bin_type=True)
            assert c_decode(native, packed) == obj
            assert c_encode(native, obj) == packed

    def test_encoder_matches_python_at_every_boundary(self, native):
        """The C encoder picks the same (smallest) format as msgpack.packb for every int/str/array/map size edge."""
        for v in INT_EDGES + STR_EDGES + [None, True, False, list(range(15)), list(range(16)), list(range(65536)),
                                          {str(i): i for i in range(15)}, {str(i): i for i in range(16)}]:
            assert c_encode(native, v) == msgpack.packb(v, use_bin_type=True), repr(v)[:80]

    @pytest.mark.parametrize("data", [
        b"", b"\xc1", b"\x81\xa1t", b"\xa5abc", b"\x01\x02", b"\x81\x01\x02", b"\x81\xc0\x01", b"\x81\x91\x01\x01",
        b"\xa2\xff\xfe", b"\xa3\xed\xa0\x80", b"\xa2\xc0\xaf", b"\xdd\xff\xff\xff\xff", b"\xdf\x00\x01\x00\x00",
        b"\xdb\x00\x00\x01\x00ab", b"\xcf\x00\x00", b"\xd6\xff\x00\x00\x00", b"\xc7\x05\xff\x00\x00\x00\x00\x00",
    ], ids=["empty", "c1", "truncated-map", "truncated-str", "trailing", "int-key", "nil-key", "array-key",
            "bad-utf8", "surrogate", "overlong", "huge-array", "huge-map", "str32-past-end", "truncated-uint64",
            "truncated-fixext", "bad-timestamp-ext"])
    def test_malformed_input_is_eproto_as_python_refuses_it(self, native, data):
        """Bytes Python's decoder (raw=False, strict_map_key=True) refuses are -EPROTO in C too."""
        with pytest.raises(Exception):  # noqa: B017 - msgpack raises several types (ExtraData, ValueError, ...)
            msgpack.unpackb(data, raw=False, strict_map_key=True)
        assert c_decode(native, data) == -errno.EPROTO

    def test_nesting_deeper_than_the_limit_is_eproto(self, native):
        """33 nested arrays exceed LS_MP_MAX_DEPTH (32): -EPROTO; 32 deep decodes."""
        ok = c_decode(native, b"\x91" * 31 + b"\x90")
        for _ in range(31):
            assert isinstance(ok, list) and len(ok) == 1
            ok = ok[0]
        assert ok == []
        assert c_decode(native, b"\x91" * 32 + b"\x90") == -errno.EPROTO

    def test_oversized_body_is_eproto(self, native):
        """A body over MAX_CONTROL_MESSAGE is refused before parsing."""
        from logsink import protocol

        body = msgpack.packb("x" * protocol.MAX_CONTROL_MESSAGE)
        assert c_decode(native, body) == -errno.EPROTO


# -- the producer through cffi ---------------------------------------------------------------------
class Producer:
    """A thin test wrapper over ls_producer_*: raises nothing, returns the C results."""

    def __init__(self, native, stream, sock, **opts):
        self.ffi, self.lib = native
        o = self.ffi.new("struct ls_producer_opts *")
        self.lib.ls_producer_opts_init(o)
        for k, v in opts.items():
            setattr(o, k, v)
        out = self.ffi.new("struct ls_producer **")
        self.open_rc = self.lib.ls_producer_open(stream.encode(), sock.encode() if sock else self.ffi.NULL, o, out)
        self.open_error = self.ffi.string(self.lib.ls_producer_last_error(self.ffi.NULL)).decode()
        self.p = out[0]

    def write(self, data: bytes) -> int:
        return self.lib.ls_producer_write(self.p, data, len(data))

    def try_write(self, data: bytes) -> int:
        return self.lib.ls_producer_try_write(self.p, data, len(data))

    def flush(self, timeout_ms: int = 10000) -> int:
        return self.lib.ls_producer_flush(self.p, timeout_ms)

    def close(self) -> int:
        p, self.p = self.p, self.ffi.NULL
        return self.lib.ls_producer_close(p) if p != self.ffi.NULL else 0

    def stats(self) -> dict:
        s = self.ffi.new("struct ls_producer_stats *")
        assert self.lib.ls_producer_stats(self.p, s) == 0
        return {k: getattr(s, k) for k in dir(s)}

    def last_error(self) -> str:
        return self.ffi.string(self.lib.ls_producer_last_error(self.p)).decode()


@pytest.fixture
def producer(native):
    made: list[Producer] = []

    def make(stream, sock, **opts) -> Producer:
        pr = Producer(native, stream, sock, **opts)
        made.append(pr)
        return pr

    yield make
    for pr in made:
        pr.close()


def _stop(d):
    d.sigstop()
    wait_for(lambda: proc_state(d.pid) == "T", 10, "the daemon to be stopped")


class TestProducerOpen:
    def test_invalid_stream_name_is_einval_with_reason(self, native, tmp_path):
        """Names protocol.validate_stream_name refuses are -EINVAL before any connection, with the rule in last_error."""
        from logsink import protocol

        ffi, lib = native
        for name in ["", ".hidden", "a..b", "a/b", "x" * 65, "sp ace", "é"]:
            with pytest.raises(protocol.ProtocolError):
                protocol.validate_stream_name(name)
            assert lib.ls_validate_stream_name(name.encode()) == -errno.EINVAL, name
            pr = Producer(native, name, str(tmp_path / "none.sock"))
            assert pr.open_rc == -errno.EINVAL and "[A-Za-z0-9._-]" in pr.open_error
        for name in ["app", "a.b", "A-9_z", "x" * 64, "a."]:
            assert lib.ls_validate_stream_name(name.encode()) == 0, name

    def test_no_daemon_is_enoent_with_hint(self, native, tmp_path):
        """Without a daemon open fails with -ENOENT and says how to start one."""
        pr = Producer(native, "app", str(tmp_path / "none.sock"))
        assert pr.open_rc == -errno.ENOENT
        assert "cannot reach the logsink daemon" in pr.open_error and "logsink serve" in pr.open_error

    def test_default_socket_path_resolution_matches_config(self, native, tmp_path, monkeypatch):
        """ls_default_socket_path agrees with config.default_socket_path for each environment."""
        from logsink.config import default_socket_path

        ffi, lib = native
        buf = ffi.new("char[]", 256)
        cases = [{"LOGSINK_SOCKET": "/x/y.sock"}, {"XDG_RUNTIME_DIR": str(tmp_path)},
                 {"XDG_RUNTIME_DIR": str(tmp_path / "missing")}, {}]
        for env in cases:
            for k in ("LOGSINK_SOCKET", "XDG_RUNTIME_DIR"):
                monkeypatch.delenv(k, raising=False)
                os.unsetenv(k)
            for k, v in env.items():
                monkeypatch.setenv(k, v)
            assert lib.ls_default_socket_path(buf, 256) > 0
            assert ffi.string(buf).decode() == default_socket_path(), env

    def test_bad_options_are_einval(self, native, tmp_path):
        """segment_size not a multiple of 4096, zero segments, unknown transport/on_full are -EINVAL."""
        for opts in [{"segment_size": 5000}, {"segment_size": 0}, {"segments": 0}, {"transport": 9},
                     {"on_full": 7}, {"flush_interval_ms": -1}]:
            pr = Producer(native, "app", str(tmp_path / "none.sock"), **opts)
            assert pr.open_rc == -errno.EINVAL, (opts, pr.open_error)


class TestProducerWrites:
    def test_whole_records_only(self, daemon, producer):
        """A write not ending in '\\n' or empty is -EINVAL and nothing of it lands; records around it do."""
        d = daemon("readwrite")
        pr = producer("app", d.sock)
        assert pr.open_rc == 0, pr.open_error
        assert pr.write(b"before\n") == 0
        assert pr.write(b"no newline") == -errno.EINVAL
        assert pr.write(b"one\ntwo") == -errno.EINVAL
        assert pr.write(b"") == -errno.EINVAL
        assert "whole records" in pr.last_error()
        assert pr.write(b"after\n") == 0
        assert pr.flush() == 0
        assert d.log("app").read_bytes() == b"before\nafter\n"

    @pytest.mark.parametrize("engine", ENGINES)
    def test_large_write_is_split_at_records(self, daemon, producer, engine):
        """One write of 2000 records into 4 KiB segments lands whole; counted as 2000 records."""
        d = daemon(engine)
        recs = make_records("L", 2000)
        pr = producer("app", d.sock, segment_size=4096, segments=4)
        assert pr.write(b"".join(recs)) == 0
        assert pr.flush() == 0
        st = pr.stats()
        assert st["records"] == 2000 and st["released_through"] == st["batches"] and st["pinned_segments"] == 0
        assert_file(d.log("app"), {"L": recs})

    def test_record_longer_than_a_segment_is_emsgsize_and_takes_nothing(self, daemon, producer):
        """A write holding one record over the segment payload is -EMSGSIZE, and none of its other records land."""
        d = daemon("readwrite")
        pr = producer("app", d.sock, segment_size=4096, segments=2)
        assert pr.write(b"a\n" * 3000 + b"x" * 5000 + b"\n") == -errno.EMSGSIZE
        assert "segment payload" in pr.last_error()
        assert pr.write(b"y" * 4064 + b"\n") == -errno.EMSGSIZE  # 4065 > 4096 - 32
        assert pr.write(b"y" * 4063 + b"\n") == 0
        assert pr.flush() == 0
        assert d.log("app").read_bytes() == b"y" * 4063 + b"\n"

    def test_background_flush_lands_a_lone_record(self, daemon, producer):
        """With flush_interval_ms=200 one record reaches the file without a flush call."""
        d = daemon("splice")
        pr = producer("app", d.sock, flush_interval_ms=200)
        assert pr.write(b"lonely record\n") == 0
        wait_for(lambda: d.log("app").exists() and d.log("app").read_bytes() == b"lonely record\n", 10, "the record")

    @pytest.mark.parametrize("transport", [1, 2], ids=["vmsplice", "copy"])
    def test_threads_sharing_a_producer_keep_their_order(self, daemon, producer, transport):
        """4 threads writing through one producer: every record lands once, each thread's in its order."""
        d = daemon("io_uring")
        pr = producer("app", d.sock, segment_size=8192, segments=3, transport=transport)
        recs = {f"t{i}": make_records(f"t{i}", 3000) for i in range(4)}
        errs = []

        def run(tag):
            for r in recs[tag]:
                rc = pr.write(r)
                if rc:
                    errs.append(rc)
                    return

        ts = [threading.Thread(target=run, args=(t,)) for t in recs]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        assert not errs
        assert pr.flush() == 0
        assert_file(d.log("app"), recs)


class TestFullArena:
    def test_on_full_drop_counts_dropped_records(self, daemon, producer):
        """Daemon stopped, 2 segments pinned: drop mode returns 0 at once, counts drops; the kept prefix lands exactly."""
        d = daemon("splice")
        pr = producer("app", d.sock, segments=2, segment_size=4096, on_full=1, flush_interval_ms=0)
        recs = make_records("d", 1000)
        try:
            _stop(d)
            t0 = time.monotonic()
            for r in recs:
                assert pr.write(r) == 0
            assert time.monotonic() - t0 < 5
            st = pr.stats()
            assert st["dropped_records"] > 0 and st["pinned_segments"] == 2, st
        finally:
            d.sigcont()
        assert pr.flush() == 0
        st = pr.stats()
        assert st["records"] + st["dropped_records"] == 1000, st
        assert_file(d.log("app"), {"d": recs[: st["records"]]})

    def test_on_full_block_times_out_then_recovers(self, daemon, producer):
        """Daemon stopped: write waits timeout_ms then -ETIMEDOUT; after SIGCONT the producer works and nothing was overwritten."""
        d = daemon("io_uring")
        pr = producer("app", d.sock, segments=2, segment_size=4096, timeout_ms=500, flush_interval_ms=0)
        accepted = []
        try:
            _stop(d)
            for r in make_records("b", 1000):
                t0 = time.monotonic()
                rc = pr.write(r)
                if rc:
                    break
                accepted.append(r)
            waited = time.monotonic() - t0
            assert rc == -errno.ETIMEDOUT, rc
            assert 0.4 <= waited < 5, waited
            assert "still pinned" in pr.last_error()
            assert pr.stats()["waits_for_release"] >= 1
        finally:
            d.sigcont()
        more = make_records("b", 200, start=len(accepted))
        for r in more:
            assert pr.write(r) == 0
        assert pr.flush() == 0
        assert_file(d.log("app"), {"b": accepted + more})

    def test_try_write_is_eagain_when_pinned_and_event_fd_wakes(self, daemon, producer):
        """try_write returns -EAGAIN instead of waiting; the event fd turns readable once the daemon releases."""
        import select

        d = daemon("splice")
        pr = producer("app", d.sock, segments=2, segment_size=4096, flush_interval_ms=0)
        efd = pr.lib.ls_producer_event_fd(pr.p)
        assert efd >= 0
        accepted = []
        try:
            _stop(d)
            for r in make_records("e", 1000):
                rc = pr.try_write(r)
                if rc < 0:
                    break
                assert rc == len(r)
                accepted.append(r)
            assert rc == -errno.EAGAIN
            try:
                os.read(efd, 8)  # reset: earlier releases
            except BlockingIOError:
                pass
        finally:
            d.sigcont()
        ready, _, _ = select.select([efd], [], [], 10)
        assert ready, "event fd not readable after the daemon resumed"
        assert int.from_bytes(os.read(efd, 8), "little") >= 1
        wait_for(lambda: pr.lib.ls_producer_released(pr.p) >= 2, 10, "releases")
        r = make_records("e", 1, start=len(accepted))[0]
        assert pr.try_write(r) == len(r)
        accepted.append(r)
        target = pr.ffi.new("uint64_t *")
        assert pr.lib.ls_producer_flush_start(pr.p, target) == 0
        wait_for(lambda: pr.lib.ls_producer_flush_check(pr.p, target[0]) == 0, 10, "the flush to be confirmed")
        assert_file(d.log("app"), {"e": accepted})


def _restart(d) -> None:
    """Start the same daemon command again (same --dir and --socket), as a restart after a crash."""
    d._stderr.close()
    d.start()


class TestReconnect:
    def test_producer_resends_unreleased_batches_to_the_restarted_daemon(self, daemon, producer):
        """Batches handed to a daemon that is stopped and then SIGKILLed reach the restarted daemon, each once."""
        d = daemon("readwrite")
        pr = producer("app", d.sock, segment_size=4096, segments=8, flush_interval_ms=0)
        d.sigstop()
        wait_for(lambda: proc_state(d.pid) == "T", 10, "the daemon to stop")
        recs = make_records("r", 80)
        for r in recs:
            assert pr.write(r) == 0
        handed = pr.stats()["handed_over_through"]
        assert handed >= 2
        d.proc.kill()
        d.proc.wait()
        d.stopped = False
        wait_for(lambda: pr.stats()["connected"] == 0, 10, "the producer to notice")
        assert pr.write(b"r:99999999:while-away\n") == 0  # taken into the arena: no error while reconnecting
        _restart(d)
        assert pr.flush(20000) == 0, pr.last_error()
        st = pr.stats()
        assert st["reconnects"] == 1 and st["connected"] == 1 and st["resent_batches"] == handed
        assert st["disconnected_us"] > 0
        assert_file(d.log("app"), {"r": recs + [b"r:99999999:while-away\n"]})

    def test_liblogsink_reconnects_by_default_and_fails_fast_with_reconnect_0(self, c_build, daemon):
        """liblogsink: logsink_opts_init sets reconnect=1 (a restart is ridden out); reconnect=0 gives -ECONNRESET."""
        from cffi import FFI

        build, _ = c_build
        ffi = FFI()
        ffi.cdef(LIBLOGSINK_CDEF)
        lib = ffi.dlopen(str(build / "liblogsink.so"))
        d = daemon("readwrite")
        handles = {}
        for mode in (1, 0):
            opts = ffi.new("struct logsink_opts *")
            lib.logsink_opts_init(opts)
            assert opts.reconnect == 1
            opts.reconnect, opts.segment_size, opts.segments, opts.timeout_ms = mode, 4096, 2, 5000
            out = ffi.new("struct logsink **")
            assert lib.logsink_open(f"c{mode}".encode(), d.sock.encode(), opts, out) == 0
            handles[mode] = out[0]
            assert lib.logsink_write(out[0], b"c:00000000:before\n", 18) == 0 and lib.logsink_flush(out[0], 10000) == 0
        d.proc.kill()
        d.proc.wait()
        st = ffi.new("struct logsink_stats *")
        wait_for(lambda: lib.logsink_stats(handles[1], st) == 0 and st.connected == 0, 10, "the handle to notice")
        _restart(d)
        assert lib.logsink_write(handles[1], b"c:00000001:after\n", 17) == 0
        assert lib.logsink_flush(handles[1], 20000) == 0
        assert lib.logsink_stats(handles[1], st) == 0 and st.reconnects == 1 and st.connected == 1
        assert d.log("c1").read_bytes() == b"c:00000000:before\nc:00000001:after\n"
        rc = 0
        for _ in range(2000):
            rc = lib.logsink_write(handles[0], b"y" * 99 + b"\n", 100)
            if rc:
                break
        assert rc == -errno.ECONNRESET, rc
        assert lib.logsink_close(handles[0]) == 0 and lib.logsink_close(handles[1]) == 0


class TestDaemonEnds:
    def test_shutdown_hands_over_then_writes_are_eshutdown(self, daemon, producer):
        """reconnect=0: on SHUTDOWN the held segment lands; later writes are -ESHUTDOWN."""
        d = daemon("readwrite")
        pr = producer("app", d.sock, flush_interval_ms=0, reconnect=0)
        recs = make_records("s", 50)
        for r in recs:
            assert pr.write(r) == 0
        d.terminate()
        wait_for(lambda: pr.write(b"late\n") == -errno.ESHUTDOWN, 10, "writes to be refused")
        assert "shutting down" in pr.last_error()
        assert_file(d.log("app"), {"s": recs})

    def test_killed_daemon_is_econnreset(self, daemon, producer):
        """reconnect=0: when the daemon vanishes, writes and flush fail with -ECONNRESET (no SIGPIPE kills us)."""
        d = daemon("readwrite")
        pr = producer("app", d.sock, segment_size=4096, segments=2, timeout_ms=2000, reconnect=0)
        assert pr.write(b"x\n") == 0 and pr.flush() == 0
        d.proc.kill()
        d.proc.wait()
        d.proc = subprocess.Popen(["true"])  # teardown expects a process that exited 0
        d.proc.wait()
        rc = 0
        deadline = time.monotonic() + 10
        while rc == 0 and time.monotonic() < deadline:
            rc = pr.write(b"y" * 100 + b"\n")
        assert rc == -errno.ECONNRESET, rc
        assert pr.flush() == -errno.ECONNRESET
        assert pr.last_error()

    def test_forked_child_gets_echild(self, daemon, producer):
        """In a forked child every call is -ECHILD and close frees only the child's copy; the parent keeps working."""
        d = daemon("readwrite")
        pr = producer("app", d.sock)
        assert pr.write(b"parent 1\n") == 0
        pid = os.fork()
        if pid == 0:  # child: report through the exit code
            ok = pr.write(b"child\n") == -errno.ECHILD and pr.flush() == -errno.ECHILD
            ok = ok and pr.lib.ls_producer_close(pr.p) == -errno.ECHILD
            os._exit(0 if ok else 1)
        _, status = os.waitpid(pid, 0)
        assert os.WEXITSTATUS(status) == 0
        assert pr.write(b"parent 2\n") == 0 and pr.flush() == 0
        assert d.log("app").read_bytes() == b"parent 1\nparent 2\n"


# -- a scripted daemon for what a real one rarely says ---------------------------------------------
class FakeDaemon:
    """Accepts one producer, answers HELLO with ``answer``, then runs ``script(conn, pipe_fd, hello_frame)``."""

    def __init__(self, path: str, answer: dict, script=None, close_pipe_first: bool = False):
        from logsink import protocol

        self.close_pipe_first = close_pipe_first  # close the pipe's read end before answering HELLO
        self.protocol = protocol
        self.path = path
        self.answer = answer
        self.script = script
        self.hello: bytes | None = None
        self.error: BaseException | None = None
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(1)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        try:
            self.listener.settimeout(20)
            conn, _ = self.listener.accept()
            conn.settimeout(20)
            data, fds, _, _ = socket.recv_fds(conn, 65536, 4)
            self.hello, self.fds = data, fds
            if self.close_pipe_first:
                os.close(fds[0])
            conn.sendall(self.protocol.encode(self.answer))
            if self.script:
                self.script(conn, fds[0])
            self.conn = conn
        except BaseException as exc:  # reported by join()
            self.error = exc

    def join(self):
        self.thread.join(30)
        if self.error:
            raise self.error


def read_batch(fd: int) -> tuple[int, bytes]:
    """Read one batch (header + payload) from a data pipe; returns (seq, payload)."""
    from logsink import protocol

    def read_exact(n):
        out = b""
        while len(out) < n:
            chunk = os.read(fd, n - len(out))
            assert chunk, "pipe ended mid-batch"
            out += chunk
        return out

    h = protocol.unpack_frame_header(read_exact(32))
    return h.seq, read_exact(h.payload_len)


class TestScriptedDaemon:
    def test_hello_is_byte_identical_to_python_and_carries_the_read_end(self, native, tmp_path):
        """The C HELLO frame equals protocol.encode(protocol.hello(...)); SCM_RIGHTS carries the pipe's read end,
        and the first batch on it is seq 1 with a valid header."""
        import stat

        from logsink import protocol

        batches = []

        def script(conn, fd):
            assert stat.S_ISFIFO(os.fstat(fd).st_mode)
            batches.append(read_batch(fd))
            conn.sendall(protocol.encode(protocol.release(batches[-1][0])))

        fake = FakeDaemon(str(tmp_path / "f.sock"), protocol.welcome(0, "fake"), script)
        pr = Producer(native, "app", fake.path, segment_size=8192, transport=2)
        assert pr.open_rc == 0, pr.open_error
        assert pr.write(b"via copy\n") == 0
        assert pr.flush() == 0
        fake.join()
        want = protocol.encode(protocol.hello("app", os.getpid(), "copy", segment_size=8192, pipe_size=pr.stats()["pipe_size"]))
        assert fake.hello == want
        assert len(fake.fds) == 1
        assert batches == [(1, b"via copy\n")]
        assert pr.close() == 0

    def test_error_answer_to_hello_is_econnrefused_with_reason(self, native, tmp_path):
        """A daemon answering HELLO with ERROR fails open with -ECONNREFUSED; last_error(NULL) has code and reason."""
        from logsink import protocol

        fake = FakeDaemon(str(tmp_path / "f.sock"), protocol.error("too-many-producers", "all 4 producer slots are in use"))
        pr = Producer(native, "app", fake.path)
        fake.join()
        assert pr.open_rc == -errno.ECONNREFUSED
        assert "too-many-producers: all 4 producer slots are in use" in pr.open_error

    def test_garbage_instead_of_welcome_is_eproto(self, native, tmp_path):
        """A daemon answering with a RELEASE before WELCOME fails open with -EPROTO."""
        from logsink import protocol

        fake = FakeDaemon(str(tmp_path / "f.sock"), protocol.release(1))
        pr = Producer(native, "app", fake.path)
        fake.join()
        assert pr.open_rc == -errno.EPROTO, pr.open_error

    def test_error_after_welcome_breaks_the_producer(self, native, tmp_path):
        """ERROR after WELCOME: later calls are -ECONNRESET and last_error holds the daemon's code and reason."""
        from logsink import protocol

        def script(conn, fd):
            conn.sendall(protocol.encode(protocol.error("bad-frame", "frame header rejected: bad magic")))
            conn.close()

        fake = FakeDaemon(str(tmp_path / "f.sock"), protocol.welcome(0, "fake"), script)
        pr = Producer(native, "app", fake.path)
        fake.join()
        assert pr.open_rc == 0
        wait_for(lambda: pr.write(b"x\n") == -errno.ECONNRESET, 10, "the producer to break")
        assert pr.last_error() == "the logsink daemon closed this producer: bad-frame: frame header rejected: bad magic"
        assert pr.flush() == -errno.ECONNRESET
        assert pr.close() == 0  # broken: close does not flush

    def test_failed_batches_make_flush_eio_once(self, native, tmp_path):
        """RELEASE with failed entries: flush returns -EIO naming the first, then the report is consumed."""
        from logsink import protocol

        def script(conn, fd):
            seq, payload = read_batch(fd)
            conn.sendall(protocol.encode(protocol.release(seq, [[seq, "write-failed", "No space left on device"]])))
            seq, payload = read_batch(fd)
            conn.sendall(protocol.encode(protocol.release(seq)))

        fake = FakeDaemon(str(tmp_path / "f.sock"), protocol.welcome(0, "fake"), script)
        pr = Producer(native, "app", fake.path, transport=2)
        assert pr.open_rc == 0
        assert pr.write(b"lost\n") == 0
        assert pr.flush() == -errno.EIO
        assert "seq 1: write-failed: No space left on device" in pr.last_error()
        assert pr.stats()["failed_batches"] == 1
        assert pr.write(b"kept\n") == 0
        assert pr.flush() == 0
        fake.join()
        assert pr.close() == 0

    def test_dead_pipe_reader_is_econnreset_not_sigpipe(self, native, tmp_path):
        """With SIGPIPE at its default (fatal) disposition, a handover into a pipe nobody reads - from a caller's
        write or from the background thread's timed flush - is -ECONNRESET and the process lives."""
        from logsink import protocol

        def script(conn, fd):
            time.sleep(3)  # keep the control socket open: the pipe, not EOF, must break the producer

        # The only read end is closed before WELCOME: every pipe write after it is EPIPE + SIGPIPE.
        fakes = [FakeDaemon(str(tmp_path / f"f{i}.sock"), protocol.welcome(0, "fake"), script, close_pipe_first=True)
                 for i in range(2)]
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                signal.signal(signal.SIGPIPE, signal.SIG_DFL)
                # caller's thread: the third 4 KiB segment's handover happens inside write()
                a = Producer(native, "app", fakes[0].path, segment_size=4096, segments=2, flush_interval_ms=0, reconnect=0)
                rc = 0
                for _ in range(1000):
                    rc = a.write(b"z" * 99 + b"\n")
                    if rc:
                        break
                ok = rc == -errno.ECONNRESET and "Broken pipe" in a.last_error()
                a.close()
                # background thread: its timed flush does the handover
                b = Producer(native, "app", fakes[1].path, flush_interval_ms=50, reconnect=0)
                ok = ok and b.write(b"one\n") == 0
                time.sleep(0.5)
                ok = ok and b.write(b"two\n") == -errno.ECONNRESET and "Broken pipe" in b.last_error()
                b.close()
                code = 0 if ok else 2
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert not os.WIFSIGNALED(status), f"child killed by signal {os.WTERMSIG(status)}"
        assert os.WEXITSTATUS(status) == 0
        for f in fakes:
            f.join()

    @pytest.mark.parametrize("frame", [b"\x00\x00\x00\x00", b"\x00\x20\x00\x00", b"\x00\x00\x00\x02\x81\x01", b"\x00\x00\x00\x01\xc1"],
                             ids=["zero-length", "over-max", "int-key", "c1"])
    def test_garbage_after_welcome_breaks_the_producer(self, native, tmp_path, frame):
        """A bad control frame after WELCOME breaks the producer with -ECONNRESET and says the message was bad."""
        from logsink import protocol

        def script(conn, fd):
            conn.sendall(frame)
            time.sleep(0.5)

        fake = FakeDaemon(str(tmp_path / "f.sock"), protocol.welcome(0, "fake"), script)
        pr = Producer(native, "app", fake.path)
        assert pr.open_rc == 0
        wait_for(lambda: pr.write(b"x\n") == -errno.ECONNRESET, 10, "the producer to break")
        assert "bad control message" in pr.last_error()
        fake.join()
        assert pr.close() == 0


# -- liblogsink and its examples ---------------------------------------------------------------------
def blast_record(p: int, k: int, size: int) -> bytes:
    head = b'{"p":%d,"k":%d,"pad":"' % (p, k)
    return head + b"x" * (size - len(head) - 3) + b'"}\n'


def check_blast_file(path: Path, producers: int, records: int, size: int) -> None:
    """Byte-exact: every record of every producer present once, each producer's in order, no torn line."""
    data = path.read_bytes()
    assert len(data) == producers * records * size, f"{path} has {len(data)} bytes, expected {producers * records * size}"
    assert data.endswith(b"\n") and b"\0" not in data
    per: dict[int, list[bytes]] = {p: [] for p in range(producers)}
    for line in data.split(b"\n")[:-1]:
        p = int(line[5 : line.index(b",")])
        per[p].append(line + b"\n")
    for p in range(producers):
        got = per[p]
        assert len(got) == records, f"producer {p}: {len(got)} records, expected {records}"
        expect = b"".join(blast_record(p, k, size) for k in range(records))
        if b"".join(got) != expect:
            for k, line in enumerate(got):
                assert line == blast_record(p, k, size), f"producer {p} record {k}: {line[:80]!r}"


def run(cmd, timeout=120, **kw):
    res = subprocess.run([str(c) for c in cmd], capture_output=True, timeout=timeout, **kw)
    assert res.returncode == 0, f"{cmd} exited {res.returncode}:\n{res.stdout.decode()[-3000:]}\n{res.stderr.decode()[-3000:]}"
    return res


class TestLibrary:
    def test_build_has_no_warnings_and_exports_only_the_public_api(self, c_build):
        """make builds the .so, .a, .pc and examples with -Wall -Wextra and no warning; the .so exports logsink_* only."""
        build, out = c_build
        assert "warning" not in out.lower(), out
        for name in ("liblogsink.so", "liblogsink.a", "logsink.pc", "minimal", "logsink-blast"):
            assert (build / name).exists(), name
        nm = shutil.which("nm")
        if nm:
            syms = subprocess.run([nm, "-D", "--defined-only", str(build / "liblogsink.so")], capture_output=True, text=True).stdout
            names = {line.split()[-1] for line in syms.splitlines() if line.strip()}
            public = {n for n in names if not n.startswith("_")}
            assert public == {"logsink_open", "logsink_write", "logsink_flush", "logsink_close", "logsink_stats",
                              "logsink_last_error", "logsink_opts_init", "logsink_prefault"}, public

    def test_install_and_link_through_pkg_config_file(self, c_build, tmp_path, daemon):
        """make install PREFIX=... installs header, libs and logsink.pc; a program built from them runs against the .so."""
        build, _ = c_build
        prefix = tmp_path / "prefix"
        run(["make", "-C", CLIENT_DIR, f"BUILD={build}", f"PREFIX={prefix}", "install"])
        pc = (prefix / "lib" / "pkgconfig" / "logsink.pc").read_text()
        assert f"prefix={prefix}" in pc and "-llogsink" in pc
        assert (prefix / "include" / "logsink.h").exists() and (prefix / "lib" / "liblogsink.a").exists()
        exe = tmp_path / "minimal-shared"
        run([_compiler(), "-Wall", "-Wextra", f"-I{prefix}/include", CLIENT_DIR / "examples" / "minimal.c",
             f"-L{prefix}/lib", "-llogsink", f"-Wl,-rpath,{prefix}/lib", "-o", exe])
        d = daemon("readwrite")
        run([exe, d.sock])
        assert d.log("app").read_bytes() == b"hello from liblogsink\nsecond record\nthird record\n"

    def test_minimal_example_lands_three_lines(self, c_build, daemon):
        """examples/minimal (socket from $LOGSINK_SOCKET) writes 3 records that are in app.log when it exits."""
        build, _ = c_build
        d = daemon("splice")
        run([build / "minimal"], env={**os.environ, "LOGSINK_SOCKET": d.sock})
        assert d.log("app").read_bytes() == b"hello from liblogsink\nsecond record\nthird record\n"

    def test_minimal_without_daemon_fails_with_reason(self, c_build, tmp_path):
        """With no daemon, minimal exits 1 and prints why (the last_error of open)."""
        build, _ = c_build
        res = subprocess.run([build / "minimal", str(tmp_path / "none.sock")], capture_output=True, timeout=30)
        assert res.returncode == 1 and b"cannot reach the logsink daemon" in res.stderr

    @pytest.mark.parametrize("engine", ENGINES)
    @pytest.mark.parametrize("transport", ["vmsplice", "copy"])
    def test_blast_two_producers_land_byte_exact(self, c_build, daemon, engine, transport):
        """logsink-blast -p 2 -n 100000: every record of both producers lands once, in per-producer order, untorn."""
        build, _ = c_build
        d = daemon(engine)
        res = run([build / "logsink-blast", "-s", "blast", "-S", d.sock, "-n", 100000, "-r", 200, "-c", 65536,
                   "-t", transport, "-p", 2])
        out = res.stdout.decode()
        assert "records/s" in out and "GB/s" in out
        check_blast_file(d.log("blast"), 2, 100000, 200)

    @pytest.mark.parametrize("engine", ENGINES)
    @pytest.mark.parametrize("transport", ["vmsplice", "copy"])
    def test_small_arena_reused_before_release_stays_byte_exact(self, c_build, daemon, engine, transport):
        """4 x 4 KiB segments, writes of 3000 and 10000 bytes: the ring wraps thousands of times, never reusing a
        segment the pipe still references (the file would show overwritten records)."""
        import json

        build, _ = c_build
        d = daemon(engine)
        for stream, chunk in (("small", 3000), ("split", 10000)):
            res = run([build / "logsink-blast", "-s", stream, "-S", d.sock, "-n", 50000, "-r", 97, "-c", chunk,
                       "-t", transport, "-p", 2, "-z", 4096, "-m", 4])
            stats = [json.loads(x) for x in res.stdout.decode().splitlines() if x.startswith('{"producer"')]
            assert len(stats) == 2 and all(s["segment_size"] == 4096 and s["segments"] == 4 for s in stats), stats
            assert all(s["batches"] >= 50000 * 97 // 4064 for s in stats), stats
            check_blast_file(d.log(stream), 2, 50000, 97)


    @pytest.mark.parametrize("transport", ["vmsplice", "shm"])
    def test_blast_warm_with_end_barrier_lands_byte_exact_and_times_both_ends(self, c_build, daemon, transport):
        """logsink-blast -W -E -D: producers prefault, write, hold until all flushed; every record lands once and the summary has start-up, teardown and the daemon's CPU."""
        import json

        build, _ = c_build
        d = daemon("io_uring")
        res = run([build / "logsink-blast", "-s", "warm", "-S", d.sock, "-n", 20000, "-r", 200, "-c", 65536,
                   "-t", transport, "-p", 3, "-C", "-W", "-E", "-D", d.pid])
        docs = [json.loads(x) for x in res.stdout.decode().splitlines() if x.startswith("{")]
        summary = next(x for x in docs if x.get("summary"))
        producers = [x for x in docs if "producer" in x]
        assert len(producers) == 3 and all(p["warm_seconds"] > 0 for p in producers), producers
        assert summary["startup_seconds"] > 0 and summary["teardown_seconds"] > 0 and summary["daemon_cpu_seconds"] >= 0
        data = d.log("warm").read_bytes()
        assert len(data) == 3 * 20000 * 200 and data.count(b"\n") == 3 * 20000
        assert data[199::200].count(b"\n") == 3 * 20000  # every record whole, none interleaved


LIBLOGSINK_CDEF = """
struct logsink_opts { int transport; uint32_t segment_size; uint32_t segments; int on_full; int timeout_ms;
                      int flush_interval_ms; int64_t expected_uid; int reconnect; };
struct logsink_stats { uint64_t batches, records, bytes, dropped_records, failed_batches;
                       uint64_t released_through, handed_over_through, pinned_segments;
                       uint64_t segment_size, segments, pipe_size, waits_for_release;
                       uint64_t zc_sends, zc_completed, zc_copied, zc_enobufs, copied_sends, zc_switched_to_copy;
                       uint64_t reconnects, resent_batches, resent_bytes, disconnected_us, connected, lost_batches;
                       uint64_t suppressed_batches, suppressed_records; };
struct logsink;
int logsink_opts_init(struct logsink_opts *opts);
int logsink_open(const char *stream, const char *socket_path, const struct logsink_opts *opts, struct logsink **out);
int logsink_write(struct logsink *ls, const void *data, size_t len);
int logsink_flush(struct logsink *ls, int timeout_ms);
int logsink_close(struct logsink *ls);
int logsink_stats(struct logsink *ls, struct logsink_stats *out);
int logsink_prefault(struct logsink *ls);
const char *logsink_last_error(struct logsink *ls);
"""
STATS_FIELDS = ("batches", "records", "bytes", "dropped_records", "failed_batches", "released_through",
                "handed_over_through", "pinned_segments", "segment_size", "segments", "pipe_size", "waits_for_release",
                "zc_sends", "zc_completed", "zc_copied", "zc_enobufs", "copied_sends", "zc_switched_to_copy",
                "reconnects", "resent_batches", "resent_bytes", "disconnected_us", "connected", "lost_batches",
                "suppressed_batches", "suppressed_records")


def _rss_kib(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/self/status")


class TestLibraryPrefault:
    @pytest.mark.parametrize(("transport", "field"), [(4, "RssShmem"), (1, "RssAnon")])  # LOGSINK_TRANSPORT_SHM, _VMSPLICE
    def test_prefault_faults_in_the_whole_arena_and_writes_still_land(self, c_build, daemon, transport, field):
        """logsink_prefault makes the process's memory grow by the whole arena (4 x 1 MiB) at once; records written after it land unchanged."""
        from cffi import FFI

        build, _ = c_build
        ffi = FFI()
        ffi.cdef(LIBLOGSINK_CDEF)
        lib = ffi.dlopen(str(build / "liblogsink.so"))
        d = daemon("io_uring")
        opts = ffi.new("struct logsink_opts *")
        lib.logsink_opts_init(opts)
        opts.transport, opts.segment_size, opts.segments = transport, 1 << 20, 4
        out = ffi.new("struct logsink **")
        assert lib.logsink_open(b"pf", d.sock.encode(), opts, out) == 0, ffi.string(lib.logsink_last_error(ffi.NULL))
        try:
            before = _rss_kib(field)
            assert lib.logsink_prefault(out[0]) == 0
            grown = _rss_kib(field) - before
            assert grown >= 4 << 10, f"{field} grew {grown} KiB after prefaulting a 4 MiB arena"
            assert lib.logsink_prefault(out[0]) == 0  # again: nothing changes, nothing breaks
            recs = b"".join(b"pf:%08d:x\n" % i for i in range(1000))
            assert lib.logsink_write(out[0], recs, len(recs)) == 0 and lib.logsink_flush(out[0], 10000) == 0
        finally:
            assert lib.logsink_close(out[0]) == 0
        assert d.log("pf").read_bytes() == recs


class TestLibraryStats:
    def test_stats_fill_every_field_of_a_poisoned_struct(self, c_build, daemon):
        """logsink_stats() writes all 26 fields: a struct pre-filled with 0xAA comes back equal to a zeroed one and sane."""
        from cffi import FFI

        build, _ = c_build
        ffi = FFI()
        ffi.cdef(LIBLOGSINK_CDEF)
        lib = ffi.dlopen(str(build / "liblogsink.so"))
        assert len(STATS_FIELDS) == ffi.sizeof("struct logsink_stats") // 8
        d = daemon("readwrite")
        opts = ffi.new("struct logsink_opts *")
        lib.logsink_opts_init(opts)
        opts.segment_size, opts.segments = 4096, 4
        out = ffi.new("struct logsink **")
        assert lib.logsink_open(b"cstats", d.sock.encode(), opts, out) == 0
        ls = out[0]
        try:
            recs = make_records("cstats", 500)
            for r in recs:
                assert lib.logsink_write(ls, r, len(r)) == 0
            assert lib.logsink_flush(ls, 10000) == 0
            clean = ffi.new("struct logsink_stats *")  # zeroed by cffi
            poisoned = ffi.new("struct logsink_stats *")
            ffi.memmove(poisoned, b"\xaa" * ffi.sizeof("struct logsink_stats"), ffi.sizeof("struct logsink_stats"))
            assert lib.logsink_stats(ls, clean) == 0
            assert lib.logsink_stats(ls, poisoned) == 0
            got = {f: getattr(poisoned, f) for f in STATS_FIELDS}
            assert got == {f: getattr(clean, f) for f in STATS_FIELDS}, got
            assert all(v < 1 << 40 for v in got.values()), got
            assert got["records"] == 500 and got["segment_size"] == 4096 and got["segments"] == 4
            assert got["released_through"] == got["handed_over_through"] == got["batches"] > 4
            # A local (unix socket) producer never sends over TCP: every TCP counter is zero.
            assert all(got[f] == 0 for f in STATS_FIELDS[12:18]), got
            # Connected all along: nothing to reconnect, resend or lose.
            assert got["connected"] == 1 and all(got[f] == 0 for f in STATS_FIELDS[18:] if f != "connected"), got
        finally:
            assert lib.logsink_close(ls) == 0


class TestDlclose:
    def test_thread_exiting_after_dlclose_does_not_crash(self, c_build, daemon, tmp_path):
        """A program dlopens liblogsink, writes from a thread, closes and dlcloses the library, then lets the thread exit: it exits 0 (the fast path's thread-exit destructor once ran from unmapped code: SIGSEGV)."""
        build, _ = c_build
        d = daemon("readwrite")
        exe = tmp_path / "dlclose_thread"
        res = subprocess.run([_compiler(), "-std=gnu11", "-O2", "-o", str(exe), str(Path(__file__).parent / "c" / "dlclose_thread.c"),
                              "-ldl", "-lpthread"], capture_output=True, text=True, timeout=MAKE_TIMEOUT)
        assert res.returncode == 0, res.stderr
        run = subprocess.run([str(exe), str(build / "liblogsink.so"), str(d.sock)], capture_output=True, text=True, timeout=60)
        assert run.returncode == 0 and "thread exited cleanly" in run.stdout, (run.returncode, run.stdout, run.stderr)
        assert d.log("dl").read_bytes() == b"hello from a thread\n"
