"""The producer side of the shared-memory transport (``transport="shm"``, docs/protocol.md).

A fake daemon (``ShmFakeDaemon``: a Python AF_UNIX server) takes the producer's HELLO with its two
fds, checks the memfd arena's seals, maps it, reads the 32-byte descriptors from the data pipe and
the payload from its own mapping, and releases when the test says so. The C producer is driven
through logsink.Client (cffi), AsyncClient, the logging handler and ``logsink pipe``.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import mmap
import os
import socket
import stat
import struct
import subprocess
import sys
import threading
from dataclasses import dataclass, field

import pytest
from lsk_helpers import make_records, wait_for
from test_c_client import c_build  # noqa: F401 - the fixture: make -C clients/c into a private directory

import logsink
from logsink import protocol

DESCRIPTOR = struct.Struct("<4sBBHIIQQ")  # the frame header layout (ls_frame.h)
WAIT = 20.0


@dataclass
class Batch:
    """One descriptor the fake daemon read, and the payload it pointed at when it was read."""

    seq: int
    offset: int
    length: int
    records: int
    payload: bytes


@dataclass
class FakeConn:
    """One producer connection to the fake daemon."""

    sock: socket.socket
    hello: dict
    pipe_r: int
    memfd: int
    arena: mmap.mmap
    seals: int
    pipe_size: int
    auto_release: bool = True
    batches: list[Batch] = field(default_factory=list)
    ended: bool = False  # the pipe's write end was closed (EOF)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def release(self, through: int) -> None:
        with self.lock:
            self.sock.sendall(protocol.encode(protocol.release(through)))

    def payload_now(self, b: Batch) -> bytes:
        """The bytes the descriptor points at, read from the mapping now (a pinned batch is unchanged)."""
        return bytes(self.arena[b.offset:b.offset + b.length])


class ShmFakeDaemon:
    """Accepts shm producers one connection at a time; ``auto_release`` releases each batch once read."""

    def __init__(self, path: str, max_batch: int | None = None, auto_release: bool = True):
        self.path = path
        self.max_batch = max_batch
        self.auto_release = auto_release
        self.conns: list[FakeConn] = []
        self.errors: list[BaseException] = []
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(8)
        self._stop = False
        self.thread = threading.Thread(target=self._accept_loop, daemon=True)
        self.thread.start()

    def _accept_loop(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(WAIT)
            dec = protocol.ControlDecoder()
            data, fds, _, _ = socket.recv_fds(conn, 65536, 4)
            msgs = dec.feed(data)
            while not msgs:
                msgs = dec.feed(conn.recv(65536))
            hello = msgs[0]
            assert hello["t"] == protocol.HELLO and hello["transport"] == "shm", hello
            assert len(fds) == protocol.HELLO_FDS_SHM, f"HELLO carried {len(fds)} fds"
            pipe_r, memfd = fds
            size = os.fstat(memfd).st_size
            arena = mmap.mmap(memfd, size, mmap.MAP_SHARED, mmap.PROT_READ)
            fc = FakeConn(conn, hello, pipe_r, memfd, arena, fcntl.fcntl(memfd, fcntl.F_GET_SEALS),
                          fcntl.fcntl(pipe_r, fcntl.F_GETPIPE_SZ), self.auto_release)
            extra = {"max_batch": self.max_batch} if self.max_batch else {}
            conn.sendall(protocol.encode(protocol.welcome(len(self.conns) + 1, "fake", **extra)))
            self.conns.append(fc)
            self._read_descriptors(fc)
        except BaseException as exc:  # reported by check()
            self.errors.append(exc)

    def _read_descriptors(self, fc: FakeConn) -> None:
        while True:
            raw = b""
            while len(raw) < DESCRIPTOR.size:
                chunk = os.read(fc.pipe_r, DESCRIPTOR.size - len(raw))
                if not chunk:
                    assert not raw, f"the pipe ended inside a descriptor ({len(raw)} bytes)"
                    fc.ended = True
                    os.close(fc.pipe_r)
                    return
                raw += chunk
            magic, version, flags, hlen, length, records, seq, offset = DESCRIPTOR.unpack(raw)
            assert (magic, version, flags, hlen) == (b"LSK1", 1, protocol.FRAME_FLAG_SHM, 32), raw
            assert 0 < length and offset + length <= len(fc.arena), (offset, length, len(fc.arena))
            b = Batch(seq, offset, length, records, bytes(fc.arena[offset:offset + length]))
            fc.batches.append(b)
            if fc.auto_release:
                fc.release(seq)

    def cut(self, fc: FakeConn) -> None:
        """End a connection without releasing: the producer must reconnect and resend. (The pipe's
        read end stays with its reader thread, which sees EOF once the producer closes its end.)"""
        fc.sock.shutdown(socket.SHUT_RDWR)

    def payload(self) -> bytes:
        return b"".join(b.payload for c in self.conns for b in c.batches)

    def check(self) -> None:
        if self.errors:
            raise self.errors[0]

    def close(self) -> None:
        self._stop = True
        self.listener.close()


@pytest.fixture
def fake(tmp_path):
    made: list[ShmFakeDaemon] = []

    def make(**kw) -> ShmFakeDaemon:
        d = ShmFakeDaemon(str(tmp_path / f"f{len(made)}.sock"), **kw)
        made.append(d)
        return d

    yield make
    for d in made:
        d.close()
        d.check()


def shm_client(d: ShmFakeDaemon, **kw) -> logsink.Client:
    kw.setdefault("segment_size", 8192)
    kw.setdefault("segments", 4)
    kw.setdefault("timeout", WAIT)
    kw.setdefault("flush_interval", None)
    return logsink.Client("app", socket=d.path, transport="shm", **kw)


class TestShmHello:
    def test_hello_passes_the_pipe_then_a_sealed_memfd_of_the_arena_size(self, fake):
        """HELLO names transport shm and carries two fds: a FIFO, then a memfd sealed against shrinking, as big as the arena."""
        d = fake()
        with shm_client(d, segment_size=16384, segments=3) as c:
            wait_for(lambda: d.conns, WAIT, "the HELLO")
            fc = d.conns[0]
            assert stat.S_ISFIFO(os.fstat(fc.pipe_r).st_mode)
            assert os.readlink(f"/proc/self/fd/{fc.memfd}").startswith("/memfd:logsink:app")
            assert fc.seals & fcntl.F_SEAL_SHRINK
            assert os.fstat(fc.memfd).st_size == 3 * 16384
            assert fc.hello["transport"] == "shm" and fc.hello["segment_size"] == 16384
            assert c.stats()["transport"] == "shm"

    def test_data_pipe_is_one_page(self, fake):
        """The pipe carries only descriptors: the producer shrinks it to 4096 bytes and says so in HELLO."""
        d = fake()
        with shm_client(d) as c:
            wait_for(lambda: d.conns, WAIT, "the HELLO")
            assert d.conns[0].pipe_size == 4096
            assert d.conns[0].hello["pipe_size"] == 4096
            assert c.pipe_size == 4096

    def test_transport_shm_is_refused_over_tcp(self):
        """shm needs the local socket: a TCP address with transport shm is a ValueError naming the choices."""
        with pytest.raises(ValueError, match="over TCP"):
            logsink.Client("app", address="tcp://127.0.0.1:1", transport="shm")


class TestShmDescriptors:
    def test_descriptors_point_at_exactly_the_written_bytes(self, fake):
        """Each descriptor's [offset, offset+length) in the memfd holds exactly the records of its batch, in order."""
        d = fake()
        recs = make_records("shm", 400)
        with shm_client(d) as c:
            for r in recs:
                c.write(r)
            c.flush(timeout=WAIT)
            batches = d.conns[0].batches
            assert len(batches) > 4  # more batches than segments: the ring went round
            assert [b.seq for b in batches] == list(range(1, len(batches) + 1))
            assert all(b.records == b.payload.count(b"\n") for b in batches)
            assert all(b.offset % 8192 == 32 for b in batches)  # after each segment's 32 header bytes
        assert d.payload() == b"".join(recs)

    def test_batches_are_not_capped_by_the_pipe_size(self, fake):
        """A record larger than the one-page pipe goes whole: shm capacity is segment_size - 32."""
        d = fake()
        big = b"x" * 60000 + b"\n"
        with shm_client(d, segment_size=65536) as c:
            assert c.max_batch == 65536 - 32
            c.write(big)
            c.flush(timeout=WAIT)
        assert [b.payload for b in d.conns[0].batches] == [big]

    def test_welcome_max_batch_caps_the_batches(self, fake):
        """WELCOME's max_batch below the segment payload is the limit: a longer record is refused, nothing sent."""
        d = fake(max_batch=5000)
        with shm_client(d, segment_size=65536) as c:
            assert c.max_batch == 5000
            with pytest.raises(ValueError, match=r"longer than this connection's batch limit \(5000 bytes: the daemon's max_batch"):
                c.write(b"y" * 6000 + b"\n")
            recs = make_records("cap", 100)
            c.write(b"".join(recs))
            c.flush(timeout=WAIT)
        assert all(b.length <= 5000 for b in d.conns[0].batches)
        assert d.payload() == b"".join(recs)


class TestShmPinning:
    def test_segments_stay_pinned_until_release(self, fake):
        """With every segment handed over and none released, no segment is rewritten; a release frees exactly that one."""
        d = fake(auto_release=False)
        seg = 8192
        with shm_client(d, segments=3, on_full="drop") as c:
            wait_for(lambda: d.conns, WAIT, "the HELLO")
            fc = d.conns[0]
            for i in range(3):  # one record fills one segment
                c.write(bytes([ord("a") + i]) * (seg - 32 - 1) + b"\n")
            c.write(b"z\n")  # hands over the third segment, then finds every segment pinned
            wait_for(lambda: len(fc.batches) == 3, WAIT, "three descriptors")
            assert sorted(b.offset for b in fc.batches) == [32, seg + 32, 2 * seg + 32]
            st = c.stats()
            assert st["pinned_segments"] == 3 and st["dropped_records"] == 1
            assert all(fc.payload_now(b) == b.payload for b in fc.batches)
            fc.release(1)
            wait_for(lambda: c.stats()["released_through"] == 1, WAIT, "the release of seq 1")
            c.write(b"after release\n")  # lands in the segment seq 1 held
            assert all(fc.payload_now(b) == b.payload for b in fc.batches[1:])
            assert bytes(fc.arena[32:32 + 14]) == b"after release\n"
            fc.auto_release = True
            fc.release(3)
            c.flush(timeout=WAIT)
        last = fc.batches[3]
        assert (last.seq, last.offset, last.payload) == (4, 32, b"after release\n")


class TestShmReconnect:
    def test_reconnect_passes_the_same_memfd_and_resends_renumbered(self, fake):
        """After a lost connection the new HELLO carries the same memfd, and the unreleased batches go again from seq 1."""
        d = fake(auto_release=False)
        recs = make_records("rc", 60)
        with shm_client(d) as c:
            c.write(b"".join(recs))
            with pytest.raises(TimeoutError):
                c.flush(timeout=0.05)  # hands the current segment over; nothing is released
            wait_for(lambda: d.conns, WAIT, "the HELLO")
            first = d.conns[0]
            wait_for(lambda: len(first.batches) == c.stats()["handed_over_through"] >= 2, WAIT, "every descriptor")
            before = list(first.batches)
            d.auto_release = True
            d.cut(first)
            wait_for(lambda: len(d.conns) == 2, WAIT, "the reconnect")
            second = d.conns[1]
            a, b = os.fstat(first.memfd), os.fstat(second.memfd)
            assert (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)
            c.flush(timeout=WAIT)
            assert [x.seq for x in second.batches] == list(range(1, len(before) + 1))
            assert [(x.offset, x.payload) for x in second.batches] == [(x.offset, x.payload) for x in before]
            assert c.stats()["reconnects"] == 1 and c.stats()["resent_batches"] == len(before)
        assert b"".join(x.payload for x in second.batches) == b"".join(recs)


class TestShmSpliceFrom:
    def test_splice_from_reads_the_pipe_into_a_segment_and_hands_it_over(self, fake):
        """splice_from on shm: the pipe's bytes become one batch in the arena, after what write() took."""
        d = fake()
        r, w = os.pipe()
        try:
            with shm_client(d) as c:
                c.write(b"written first\n")
                data = b"".join(make_records("sp", 20))
                os.write(w, data)
                c.splice_from(r, len(data), data.count(b"\n"))
                c.flush(timeout=WAIT)
                assert [b.payload for b in d.conns[0].batches] == [b"written first\n", data]
                assert c.stats()["lost_batches"] == 0
            os.set_blocking(r, False)
            with pytest.raises(BlockingIOError):
                os.read(r, 1)  # the input pipe was drained
        finally:
            os.close(r)
            os.close(w)

    def test_splice_from_larger_than_a_batch_is_emsgsize_and_reads_nothing(self, fake):
        """nbytes over the shm capacity fails (EMSGSIZE) before any byte leaves the input pipe."""
        d = fake()
        r, w = os.pipe()
        try:
            with shm_client(d) as c:
                os.write(w, b"q" * 9000 + b"\n")
                with pytest.raises(ValueError, match="spliced batch of 9001 bytes is larger"):  # EMSGSIZE
                    c.splice_from(r, 9001, 1)
                assert len(os.read(r, 10000)) == 9001
        finally:
            os.close(r)
            os.close(w)


class TestShmSplitResend:
    def test_a_smaller_max_batch_after_reconnect_cuts_the_resend_into_descriptors_in_place(self, fake):
        """A batch resent to a daemon with a smaller max_batch goes as several descriptors at record boundaries,
        pointing into the same segment (no copy), together exactly the original bytes."""
        d = fake(auto_release=False)
        recs = make_records("sp", 200, minlen=20, maxlen=60)
        with shm_client(d) as c:
            c.write(b"".join(recs))
            with pytest.raises(TimeoutError):
                c.flush(timeout=0.05)
            wait_for(lambda: d.conns, WAIT, "the HELLO")
            first = d.conns[0]
            wait_for(lambda: len(first.batches) == c.stats()["handed_over_through"], WAIT, "every descriptor")
            assert max(b.length for b in first.batches) > 3000
            d.max_batch, d.auto_release = 3000, True
            d.cut(first)
            wait_for(lambda: len(d.conns) == 2, WAIT, "the reconnect")
            c.flush(timeout=WAIT)
            second = d.conns[1]
            assert all(b.length <= 3000 and b.payload.endswith(b"\n") for b in second.batches)
            assert len(second.batches) > len(first.batches)
            for prev, nxt in zip(second.batches, second.batches[1:], strict=False):  # contiguous within a segment
                if nxt.offset // 8192 == prev.offset // 8192:
                    assert nxt.offset == prev.offset + prev.length
        assert b"".join(b.payload for b in second.batches) == b"".join(recs)


class TestShmFork:
    def test_forked_child_does_not_map_the_parents_arena_and_gets_its_own(self, fake):
        """In a forked child the parent's memfd arena is not mapped (MADV_DONTFORK); a write there opens a new
        connection with a new memfd, and the parent's producer carries on."""
        d = fake()
        with shm_client(d) as c:
            c.write(b"parent 1\n")
            c.flush(timeout=WAIT)
            pid = os.fork()
            if pid == 0:  # pragma: no cover - the child reports through its exit status
                code = 1
                try:
                    with open("/proc/self/maps") as f:  # (the fake daemon's own mapping is read-only)
                        inherited = sum("memfd:logsink:app" in line and " rw-s " in line for line in f)
                    c.write(b"child\n")
                    c.flush(timeout=WAIT)
                    code = 0 if inherited == 0 else 3
                finally:
                    os._exit(code)
            _, status = os.waitpid(pid, 0)
            assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
            c.write(b"parent 2\n")
            c.flush(timeout=WAIT)
        wait_for(lambda: len(d.conns) == 2, WAIT, "the child's connection")
        by_pid = {conn.hello["pid"]: conn for conn in d.conns}
        assert b"".join(b.payload for b in by_pid[os.getpid()].batches) == b"parent 1\nparent 2\n"
        child = next(conn for p, conn in by_pid.items() if p != os.getpid())
        assert b"".join(b.payload for b in child.batches) == b"child\n"
        a, b = os.fstat(by_pid[os.getpid()].memfd), os.fstat(child.memfd)
        assert a.st_ino != b.st_ino


class TestShmIntegrations:
    def test_async_client_delivers_over_shm(self, fake):
        """AsyncClient(transport="shm") hands its records over as shm descriptors, in order."""
        from logsink.aio import AsyncClient

        d = fake()
        recs = make_records("aio", 300)

        async def main() -> str:
            async with AsyncClient("app", socket=d.path, transport="shm", segment_size=8192, timeout=WAIT) as c:
                for r in recs:
                    await c.write(r)
                await c.flush(timeout=WAIT)
                return c.client.stats()["transport"]

        assert asyncio.run(main()) == "shm"
        assert d.payload() == b"".join(recs)

    def test_logging_handler_renders_natively_into_the_shm_arena(self, fake):
        """LogsinkHandler on shm takes the C rendering path (write_log_json) and its JSON lines land as formatted."""
        from logsink.logging import JsonFormatter, LogsinkHandler

        d = fake()
        h = LogsinkHandler("app", socket=d.path, transport="shm", segment_size=8192, timeout=WAIT)
        log = logging.getLogger("shm.test")
        log.propagate = False
        log.addHandler(h)
        log.setLevel(logging.INFO)
        made: list[logging.LogRecord] = []
        h.addFilter(lambda rec: made.append(rec) or True)
        try:
            assert h.client.write_log_json(1700000000.5, b"info", b"direct", b"rendered in C") is True
            for i in range(50):
                log.info("message %d with \"quotes\" and \u00e9", i)
            h.flush()
        finally:
            log.removeHandler(h)
            h.close()
        want = JsonFormatter().format(logging.makeLogRecord({"created": 1700000000.5, "levelname": "INFO", "name": "direct",
                                                              "msg": "rendered in C"})).encode() + b"\n"
        want += b"".join(JsonFormatter().format(rec).encode() + b"\n" for rec in made)
        assert d.payload() == want

    def test_structlog_factory_writes_over_shm(self, fake):
        """A LogsinkLoggerFactory with transport="shm" delivers a structlog logger's records."""
        from logsink.structlog import LogsinkLoggerFactory

        d = fake()
        factory = LogsinkLoggerFactory("app", socket=d.path, transport="shm", segment_size=8192, timeout=WAIT)
        logger = factory("svc")
        logger.msg('{"event":"one"}')
        logger.info(b'{"event":"two"}\n')
        logger.flush()
        factory.client.close()
        assert d.payload() == b'{"event":"one"}\n{"event":"two"}\n'

    @pytest.mark.parametrize("from_pipe", [True, False], ids=["stdin-pipe", "stdin-file"])
    def test_logsink_pipe_transport_shm_relays_stdin(self, fake, tmp_path, from_pipe):
        """`logsink pipe --transport shm` relays stdin (a pipe: read into the arena; a file: copied) byte-exact over shm."""
        d = fake()
        data = b"".join(make_records("pipe", 20_000))
        cmd = [sys.executable, "-m", "logsink", "pipe", "app", "--socket", d.path, "--transport", "shm"]
        if from_pipe:
            relay = subprocess.Popen(cmd, stdin=subprocess.PIPE, stderr=subprocess.PIPE)
            _, err = relay.communicate(data, timeout=120)
        else:
            src = tmp_path / "in.log"
            src.write_bytes(data)
            with open(src, "rb") as f:
                relay = subprocess.Popen(cmd, stdin=f, stderr=subprocess.PIPE)
                _, err = relay.communicate(timeout=120)
        assert relay.returncode == 0, err.decode()
        assert d.conns[0].hello["transport"] == "shm"
        assert d.payload() == data


# -- end to end, with the real daemon (tests/conftest.py `daemon`) ------------------------------------
ENGINES = ("io_uring", "splice", "readwrite")


def _restart(d) -> None:
    """Start the same daemon command again (same --dir and --socket), as a restart after a crash."""
    d._stderr.close()
    d.start()


class TestShmEndToEnd:
    @pytest.mark.parametrize("engine", ENGINES)
    def test_client_records_land_byte_exact_from_the_shared_arena(self, daemon, engine):
        """A Client on shm wrapping its ring many times lands every record in order; the daemon wrote them all
        from the arena (bytes_shared), nothing spliced or copied, and shows the producer as shm."""
        d = daemon(engine)
        recs = make_records("e2e", 20_000)
        with logsink.Client("app", socket=d.sock, transport="shm", segment_size=65536, segments=4, timeout=WAIT) as c:
            for i in range(0, len(recs), 50):
                c.write(b"".join(recs[i:i + 50]))
            c.flush(timeout=WAIT)
            st = d.status()
            assert [p["transport"] for p in st["producers"]] == ["shm"]
            assert c.stats()["transport"] == "shm" and c.stats()["batches"] > 4 * 10
        assert d.log("app").read_bytes() == b"".join(recs)
        t = d.status()["totals"]
        assert t["bytes_shared"] == t["bytes"] == sum(map(len, recs))
        assert t["bytes_spliced"] == 0 and t["bytes_copied"] == 0

    def test_record_larger_than_the_pipe_goes_whole(self, daemon):
        """With the one-page pipe a 1 MiB - 32 record still lands whole: shm batches are capped by the arena, not the pipe."""
        d = daemon("io_uring")
        big = b"b" * ((1 << 20) - 33) + b"\n"
        with logsink.Client("app", socket=d.sock, transport="shm", timeout=WAIT) as c:
            assert c.pipe_size == 4096 and c.max_batch == (1 << 20) - 32
            c.write(big)
            c.flush(timeout=WAIT)
        assert d.log("app").read_bytes() == big

    def test_unreleased_batches_reach_the_restarted_daemon_once(self, daemon):
        """Batches handed to a stopped then SIGKILLed daemon are resent from the same memfd to the restarted one, each once."""
        d = daemon("io_uring")
        with logsink.Client("app", socket=d.sock, transport="shm", segment_size=4096, segments=8, timeout=WAIT,
                            flush_interval=None) as c:
            d.sigstop()
            recs = make_records("r", 80)
            for r in recs:
                c.write(r)
            handed = c.stats()["handed_over_through"]
            assert handed >= 2
            d.proc.kill()
            d.proc.wait()
            d.stopped = False
            wait_for(lambda: not c.connected, WAIT, "the client to notice")
            c.write(b"r:99999999:while-away\n")  # taken into the arena while reconnecting
            _restart(d)
            c.flush(timeout=WAIT)
            st = c.stats()
            assert st["reconnects"] == 1 and st["resent_batches"] == handed and st["connected"]
        from lsk_helpers import assert_file

        assert_file(d.log("app"), {"r": recs + [b"r:99999999:while-away\n"]})

    def test_logsink_pipe_transport_shm_lands_byte_exact(self, daemon):
        """`logsink pipe --transport shm` from a pipe on stdin: byte-exact, every byte written from the arena."""
        d = daemon("io_uring")
        data = b"".join(make_records("pipe", 50_000))
        relay = subprocess.Popen([sys.executable, "-m", "logsink", "pipe", "p", "--socket", d.sock, "--transport", "shm"],
                                 stdin=subprocess.PIPE, stderr=subprocess.PIPE)
        _, err = relay.communicate(data, timeout=120)
        assert relay.returncode == 0, err.decode()
        assert d.log("p").read_bytes() == data
        t = d.status()["totals"]
        assert t["bytes_shared"] == len(data) and t["bytes_spliced"] == 0


class TestLiblogsinkShm:
    @pytest.mark.parametrize("engine", ENGINES)
    def test_blast_on_shm_lands_byte_exact(self, c_build, daemon, engine):
        """logsink-blast -t shm -p 2 (liblogsink, LOGSINK_TRANSPORT_SHM): every record of both producers lands once,
        in order, untorn, and all of it was written from the producers' arenas."""
        from test_c_client import check_blast_file, run

        build, _ = c_build
        d = daemon(engine)
        res = run([build / "logsink-blast", "-s", "blast", "-S", d.sock, "-n", 100000, "-r", 200, "-c", 65536,
                   "-t", "shm", "-p", 2])
        assert "records/s" in res.stdout.decode()
        check_blast_file(d.log("blast"), 2, 100000, 200)
        t = d.status()["totals"]
        assert t["bytes_shared"] == t["bytes"] == 2 * 100000 * 200 and t["bytes_spliced"] == 0


class TestShmSpliceFromDrop:
    def test_splice_from_with_every_segment_pinned_and_on_full_drop_consumes_and_counts(self, fake):
        """on_full="drop" with the only segment pinned: splice_from reads the bytes away and counts their records as dropped."""
        d = fake(auto_release=False)
        r, w = os.pipe()
        try:
            with shm_client(d, segments=1, on_full="drop") as c:
                c.write(b"pinned\n")
                data = b"".join(make_records("dr", 10))
                os.write(w, data)
                c.splice_from(r, len(data), 10)  # hands "pinned" over, then finds its segment pinned
                assert c.stats()["dropped_records"] == 10
                os.set_blocking(r, False)
                with pytest.raises(BlockingIOError):
                    os.read(r, 1)  # consumed: the relay is not stuck on them
                wait_for(lambda: d.conns and d.conns[0].batches, WAIT, "the descriptor")
                d.conns[0].auto_release = True
                d.conns[0].release(1)
                c.flush(timeout=WAIT)
            assert d.payload() == b"pinned\n"
        finally:
            os.close(r)
            os.close(w)
