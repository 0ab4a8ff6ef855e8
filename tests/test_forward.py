"""Forwarding streams downstream: the C forwarder on its own (cffi, a file and a loopback listener), then the
daemon with --forward into a plain Python sink, a real rsyslog and a real syslog-ng."""

from __future__ import annotations

import errno
import os
import select
import socket
import struct
import threading
import time
from pathlib import Path

import pytest
from conftest import finish_producer
from lsk_helpers import make_records, wait_for
from peers import Rsyslog, SyslogNg

SIOCINQ = 0x541B


# -- a plain collector ------------------------------------------------------------------------------
def parse_octet(data: bytes) -> tuple[list[bytes], int]:
    """RFC 6587 frames -> (messages, bytes of an incomplete last frame)."""
    out, pos = [], 0
    while pos < len(data):
        sp = data.find(b" ", pos)
        if sp < 0:
            break
        n = int(data[pos:sp])
        if sp + 1 + n > len(data):
            break
        out.append(data[sp + 1 : sp + 1 + n])
        pos = sp + 1 + n
    return out, len(data) - pos


def parse_newline(data: bytes) -> tuple[list[bytes], int]:
    cut = data.rfind(b"\n") + 1
    return data[:cut].splitlines(keepends=True), len(data) - cut


class Sink:
    """A TCP collector on loopback keeping each connection's bytes. ``stop_gracefully()`` ends the
    current connection the way a careful collector would: it keeps every byte its kernel ACKed."""

    def __init__(self, port: int = 0, bound: socket.socket | None = None):
        """Listen on ``port`` (0: any), or start listening on ``bound``, a socket bound while the
        downstream was to look down (see ``down_port``): the port was never free in between."""
        if bound is not None:
            self.srv = bound
        else:
            self.srv = socket.socket()
            self.srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.srv.bind(("127.0.0.1", port))
        self.srv.listen(8)
        self.port = self.srv.getsockname()[1]
        self.conns: list[bytearray] = []
        self.socks: list[socket.socket] = []
        self.paused = threading.Event()
        self.lock = threading.Lock()
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                c, _ = self.srv.accept()
            except OSError:
                return
            buf = bytearray()
            with self.lock:
                self.conns.append(buf)
                self.socks.append(c)
            threading.Thread(target=self._read, args=(c, buf), daemon=True).start()

    def _read(self, c: socket.socket, buf: bytearray) -> None:
        while True:
            if self.paused.is_set():
                time.sleep(0.01)
                continue
            try:
                r, _, _ = select.select([c], [], [], 0.05)
                if not r or self.paused.is_set():
                    continue
                data = c.recv(1 << 20)
            except (OSError, ValueError):
                return
            if not data:
                return
            with self.lock:
                buf += data

    @property
    def nbytes(self) -> int:
        with self.lock:
            return sum(len(b) for b in self.conns)

    def records(self, framing: str) -> list[bytes]:
        """Every whole record received, connections in order; a torn last record of a connection is dropped."""
        parse = parse_octet if framing == "octet-counted" else parse_newline
        out: list[bytes] = []
        with self.lock:
            for buf in self.conns:
                out += parse(bytes(buf))[0]
        return out

    def stop_gracefully(self) -> None:
        """Stop reading; once the sender is flow-controlled (nothing new arrives), send FIN and wait
        for the sender's abortive close; then read every byte queued (all that our kernel ACKed)."""
        self.paused.set()
        with self.lock:
            c, buf = self.socks[-1], self.conns[-1]
        last, stable_since = -1, time.monotonic()
        while time.monotonic() - stable_since < 0.3:
            q = struct.unpack("i", __import__("fcntl").ioctl(c.fileno(), SIOCINQ, b"\0" * 4))[0]
            if q != last:
                last, stable_since = q, time.monotonic()
            time.sleep(0.02)
        self.stop_listening()
        c.shutdown(socket.SHUT_WR)
        p = select.poll()
        p.register(c.fileno(), 0)  # only POLLERR/POLLHUP: the sender's RST
        p.poll(5000)
        c.setblocking(False)
        while True:
            try:
                data = c.recv(1 << 20)
            except BlockingIOError:
                break
            except OSError:
                break
            if not data:
                break
            with self.lock:
                buf += data
        c.close()
        self.closed = True

    def stop_listening(self) -> None:
        try:
            self.srv.shutdown(socket.SHUT_RDWR)  # wakes the accept() in our thread; close() alone does not
        except OSError:
            pass
        self.srv.close()

    def close(self) -> None:
        self.stop_listening()
        with self.lock:
            for c in self.socks:
                try:
                    c.close()
                except OSError:
                    pass


def down_port() -> tuple[socket.socket, int]:
    """A loopback port with nobody listening (connects are refused), held bound so no other process
    can take it before the test brings its downstream up there with ``sinks(bound=sock)``."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    return sock, sock.getsockname()[1]


@pytest.fixture
def sinks():
    made: list[Sink] = []

    def make(port: int = 0, bound: socket.socket | None = None) -> Sink:
        s = Sink(port, bound)
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


# -- the C forwarder on its own -----------------------------------------------------------------------
def _lib():
    from logsink._native import ffi, lib

    return ffi, lib


FRAMING = {"newline": 0, "octet-counted": 1}


class CForwarder:
    """ls_forward_* driven by hand: pump, wait for writability, notice the peer closing."""

    def __init__(self, path: Path, framing: str, cursor: int = 0):
        self.ffi, self.lib = _lib()
        self.fd = os.open(path, os.O_RDONLY)
        out = self.ffi.new("struct ls_forward **")
        assert self.lib.ls_forward_new(self.fd, cursor, FRAMING[framing], out) == 0
        self.f = out[0]
        self.sock: socket.socket | None = None

    def connect(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setblocking(False)
        assert self.lib.ls_forward_set_socket(self.f, self.sock.fileno()) == 0

    def counters(self):
        c = self.ffi.new("struct ls_forward_counters *")
        self.lib.ls_forward_counters(self.f, c)
        return c

    def advance(self, end: int) -> None:
        assert self.lib.ls_forward_advance(self.f, end) == 0

    def pump_until_sent(self, timeout: float = 20.0) -> int:
        """Pump until everything is handed over; returns 0, or -errno if the connection failed."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            r = self.lib.ls_forward_pump(self.f)
            if r >= 0:
                return 0
            if r != -errno.EAGAIN:
                return r
            rd, wr, _ = select.select([self.sock], [self.sock], [], 0.5)
            if rd and not self.sock.recv(4096, socket.MSG_PEEK):
                return self.drop()
        raise AssertionError("forwarder did not hand everything over in time")

    def drop(self) -> int:
        """The peer went away: detach (rewinds to what it ACKed) and close abortively."""
        self.lib.ls_forward_set_socket(self.f, -1)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()
        self.sock = None
        return -errno.ECONNRESET

    def wait_acked(self, timeout: float = 10.0) -> None:
        wait_for(lambda: self.counters().unacked_bytes == 0, timeout, "the peer to ACK everything")

    def close(self) -> None:
        if self.sock is not None:
            self.lib.ls_forward_set_socket(self.f, -1)
            self.sock.close()
        self.lib.ls_forward_free(self.f)
        os.close(self.fd)


def write_records(path: Path, recs: list[bytes]) -> int:
    with open(path, "ab") as fh:
        fh.write(b"".join(recs))
    return path.stat().st_size


def octet(recs: list[bytes]) -> bytes:
    return b"".join(b"%d %s" % (len(r), r) for r in recs)


class TestCForwarder:
    @pytest.mark.parametrize("framing", ["newline", "octet-counted"])
    def test_framing_is_byte_exact(self, tmp_path, sinks, framing):
        """Records of 1 byte to 600 KiB arrive byte-exact in either framing; octet counting scans every byte once."""
        recs = make_records("a", 20_000) + [b"x" * 20_000 + b"\n", b"\n", b"y" * (600 << 10) + b"\n"] + make_records("b", 3000)
        path = tmp_path / "app.log"
        end = write_records(path, recs)
        sink = sinks()
        fw = CForwarder(path, framing)
        fw.connect(sink.port)
        fw.advance(end)
        assert fw.pump_until_sent() == 0
        fw.wait_acked()
        want = octet(recs) if framing == "octet-counted" else b"".join(recs)
        wait_for(lambda: sink.nbytes >= len(want), 10, "the sink to get everything")
        assert bytes(sink.conns[0]) == want
        c = fw.counters()
        assert (c.cursor, c.acked_cursor, c.bytes_sent, c.payload_sent) == (end, end, len(want), end)
        if framing == "octet-counted":
            assert c.records_sent == len(recs)
            assert c.framing_bytes == len(want) - end
            assert c.bytes_copied == end, "every payload byte is scanned exactly once for '\\n'"
            assert c.bytes_sendfile == 20_001 + (600 << 10) + 1, "records >= 16 KiB go out with sendfile"
        else:
            assert c.bytes_sendfile == end
            assert c.bytes_copied < 64 << 10, "newline framing reads only a record per 4 MiB window (to end it at a boundary)"
        fw.close()

    @pytest.mark.parametrize("framing", ["newline", "octet-counted"])
    def test_peer_gone_mid_stream_resumes_without_loss_or_duplicate(self, tmp_path, sinks, framing):
        """The peer stops mid-stream: the forwarder rewinds to the first record it did not ACK whole, and
        the next connection starts with a whole record; every record arrives exactly once."""
        path = tmp_path / "app.log"
        recs = make_records("p", 200_000)
        end = write_records(path, recs)
        sink1 = sinks()
        fw = CForwarder(path, framing)
        sink1.paused.set()  # the collector reads nothing until it stops: flow control holds the sender mid-stream
        fw.connect(sink1.port)
        fw.advance(end)
        assert fw.lib.ls_forward_pump(fw.f) == -errno.EAGAIN
        wait_for(lambda: sink1.socks, 10, "the sink to accept the connection")  # stop_gracefully needs it
        t = threading.Thread(target=sink1.stop_gracefully)
        t.start()
        r = fw.pump_until_sent()
        t.join()
        assert r == -errno.ECONNRESET, "the peer closed mid-stream, the forwarder must notice"
        c = fw.counters()
        assert 0 < c.cursor < end and c.disconnects == 1
        assert c.rewound_bytes > 0, "bytes handed to the kernel but never ACKed must be sent again"
        sink2 = sinks()
        fw.connect(sink2.port)
        assert fw.pump_until_sent() == 0
        fw.wait_acked()
        wait_for(lambda: len(sink1.records(framing)) + len(sink2.records(framing)) >= len(recs), 10, "all records")
        got = sink1.records(framing) + sink2.records(framing)
        assert len(got) == len(recs) and got == recs
        fw.close()

    def test_drop_moves_to_a_record_boundary_and_counts(self, tmp_path, sinks):
        """drop-oldest: the cursor moves to the first record boundary at or past the target, counted."""
        path = tmp_path / "app.log"
        recs = make_records("d", 1000)
        end = write_records(path, recs)
        fw = CForwarder(path, "octet-counted")
        fw.advance(end)
        target = sum(len(r) for r in recs[:300]) + 5  # inside record 300
        dropped = fw.lib.ls_forward_drop(fw.f, target)
        c = fw.counters()
        assert c.cursor == sum(len(r) for r in recs[:301]) == dropped
        assert (c.dropped_records, c.dropped_bytes) == (301, dropped)
        sink = sinks()
        fw.connect(sink.port)
        assert fw.pump_until_sent() == 0
        wait_for(lambda: len(sink.records("octet-counted")) == 699, 10, "the rest")
        assert sink.records("octet-counted") == recs[301:]
        fw.close()

    def test_spool_punch_frees_blocks_keeps_size(self, tmp_path):
        """Punching the forwarded part of a spool gives its blocks back; size and later offsets stay."""
        _, lib = _lib()
        path = tmp_path / "s.spool"
        path.write_bytes(b"z" * (8 << 20))
        fd = os.open(path, os.O_RDWR)
        try:
            before = os.fstat(fd).st_blocks
            r = lib.ls_spool_punch(fd, 0, (5 << 20) + 123)
            if r == -errno.EOPNOTSUPP:
                pytest.fail(f"{tmp_path} is on a file system without hole punching")
            assert r == 5 << 20
            st = os.fstat(fd)
            assert st.st_size == 8 << 20 and st.st_blocks < before
            assert os.pread(fd, 4, 5 << 20) == b"zzzz" and os.pread(fd, 4, 0) == b"\0\0\0\0"
        finally:
            os.close(fd)


# -- through the daemon ---------------------------------------------------------------------------------
def forward_status(d, stream: str = "app") -> dict:
    st = d.status()
    fws = [f for f in st.get("forwards", []) if f["stream"] == stream]
    assert fws, f"status has no forward for {stream!r}: {st.get('forwards')}"
    return fws[0]


def run_producers(d, producers, n_producers: int, n_records: int, stream: str = "app", **client) -> dict[str, list[bytes]]:
    procs = {f"p{i}": producers({"socket": d.sock, "stream": stream, "tag": f"p{i}", "mode": "count", "count": n_records, "client": client})
             for i in range(n_producers)}
    for p in procs.values():
        finish_producer(p, timeout=60)
    return {tag: make_records(tag, n_records) for tag in procs}


def assert_exactly_once_in_order(got: list[bytes], expected: dict[str, list[bytes]]) -> None:
    by_tag: dict[str, list[bytes]] = {}
    for line in got:
        by_tag.setdefault(line.split(b":", 1)[0].decode(errors="replace"), []).append(line)
    assert set(by_tag) <= set(expected), f"unexpected producers {set(by_tag) - set(expected)}"
    for tag, want in expected.items():
        have = by_tag.get(tag, [])
        assert len(have) == len(want), f"producer {tag}: {len(have)} records arrived, expected {len(want)}"
        assert have == want, f"producer {tag}: records differ (first at {next(i for i, (a, b) in enumerate(zip(have, want, strict=False)) if a != b)})"


class TestDaemonForwarding:
    @pytest.mark.parametrize("framing", ["newline", "octet-counted"])
    def test_forward_only_stream_arrives_byte_exact(self, daemon, producers, sinks, framing):
        """--forward without a file: 3 producers' records reach the sink exactly once, in order per producer; no app.log."""
        sink = sinks()
        d = daemon("io_uring", "--forward", f"app=tcp://127.0.0.1:{sink.port}", "--framing", framing)
        expected = run_producers(d, producers, 3, 20_000)
        total = sum(len(r) for v in expected.values() for r in v)
        wait_for(lambda: forward_status(d)["acked_cursor"] == total, 20, "the forwarder to be ACKed")
        assert_exactly_once_in_order(sink.records(framing), expected)
        wire = octet if framing == "octet-counted" else b"".join
        assert sink.nbytes == sum(len(wire(v)) for v in expected.values())
        fs = forward_status(d)
        assert fs["state"] == "up" and fs["lag_bytes"] == 0 and fs["framing"] == framing
        assert fs["file"].endswith("app.spool"), fs
        assert not d.log("app").exists(), "a forward-only stream must not write <dir>/app.log"
        if framing == "newline":
            # sendfile or the io_uring path moves the payload; the only bytes read are newline searches at send-window ends
            assert fs["bytes_sendfile"] + fs["bytes_uring"] == total and fs["bytes_copied"] <= max(65536, total // 100), fs

    def test_file_and_forward_from_toml(self, daemon, producers, sinks, tmp_path):
        """[forward.app] with file = true: the stream goes to both app.log and the downstream, byte-identical."""
        sink = sinks()
        conf = tmp_path / "fwd.toml"
        conf.write_text(f'[forward.app]\naddress = "tcp://127.0.0.1:{sink.port}"\nframing = "octet-counted"\nfile = true\nspool_max = "64M"\npolicy = "block"\n')
        d = daemon("splice", "--config", str(conf))
        expected = run_producers(d, producers, 2, 10_000)
        total = sum(len(r) for v in expected.values() for r in v)
        wait_for(lambda: forward_status(d)["acked_cursor"] == total, 20, "the forwarder to be ACKed")
        assert sink.records("octet-counted") == d.log("app").read_bytes().splitlines(keepends=True)
        fs = forward_status(d)
        assert fs["records_sent"] == 20_000 and fs["spool_max"] == 64 << 20

    def test_downstream_restart_replays_spool_exactly_once(self, daemon, producers, sinks):
        """The collector goes away mid-run and comes back: batches spool meanwhile, replay in order, and
        every record arrives exactly once."""
        sink1 = sinks()
        port = sink1.port
        d = daemon("io_uring", "--forward", f"app=tcp://127.0.0.1:{port}", "--framing", "octet-counted")
        p = producers({"socket": d.sock, "stream": "app", "tag": "k0", "mode": "count", "count": 150_000, "client": {}})
        wait_for(lambda: sink1.nbytes > 1_000_000, 30, "the forward to be running")
        sink1.stop_gracefully()
        wait_for(lambda: forward_status(d)["disconnects"] >= 1, 10, "the forwarder to notice")
        finish_producer(p, timeout=60)
        # Written while the downstream is surely down (a fast producer may have finished k0 before the
        # collector stopped): these must wait in the spool.
        p2 = producers({"socket": d.sock, "stream": "app", "tag": "k1", "mode": "count", "count": 20_000, "client": {}})
        finish_producer(p2, timeout=60)  # every batch was acknowledged while the downstream was down
        fs = forward_status(d)
        assert fs["lag_bytes"] > 0, "the spool should hold the batches written while down"
        sink2 = sinks(port)
        expected = {"k0": make_records("k0", 150_000), "k1": make_records("k1", 20_000)}
        total = sum(len(r) for recs in expected.values() for r in recs)
        wait_for(lambda: forward_status(d)["acked_cursor"] == total, 30, "the spool to replay")
        assert_exactly_once_in_order(sink1.records("octet-counted") + sink2.records("octet-counted"), expected)
        fs = forward_status(d)
        assert fs["reconnects"] >= 1 and fs["disconnects"] >= 1

    def test_restart_resumes_from_cursor_without_duplicates(self, daemon, producers, sinks):
        """The daemon stopped with the downstream down keeps the spool; the next run replays it, no duplicate."""
        dead, port = down_port()  # nobody listens: the forward stays down
        d1 = daemon("splice", "--forward", f"app=tcp://127.0.0.1:{port}")
        expected = run_producers(d1, producers, 1, 20_000)
        assert d1.terminate() == 0
        sink = sinks(bound=dead)
        d2 = daemon("splice", "--forward", f"app=tcp://127.0.0.1:{port}", log_dir=d1.dir)
        total = sum(len(r) for r in expected["p0"])
        wait_for(lambda: forward_status(d2)["acked_cursor"] == total, 20, "the replay after restart")
        assert d2.terminate() == 0
        d3 = daemon("splice", "--forward", f"app=tcp://127.0.0.1:{port}", log_dir=d1.dir)
        more = run_producers(d3, producers, 1, 100, )
        wait_for(lambda: len(sink.records("newline")) >= 20_100, 20, "the third run's records")
        time.sleep(0.3)
        got = sink.records("newline")
        assert got == expected["p0"] + more["p0"]

    def test_rotation_finishes_old_file_then_follows_new(self, daemon, producers, sinks):
        """logrotate moves app.log away and SIGHUPs: the forwarder sends the old file's tail, then the new file's records."""
        import signal

        sink = sinks()
        d = daemon("splice", "--forward", f"app=tcp://127.0.0.1:{sink.port},file")
        first = run_producers(d, producers, 1, 5000)["p0"]
        os.rename(d.log("app"), d.dir / "app.log.1")
        os.kill(d.pid, signal.SIGHUP)
        wait_for(d.log("app").exists, 10, "the daemon to reopen app.log")
        procs = producers({"socket": d.sock, "stream": "app", "tag": "q0", "mode": "count", "count": 3000})
        finish_producer(procs)
        wait_for(lambda: len(sink.records("newline")) >= 8000, 20, "both files' records")
        got = sink.records("newline")
        assert got[:5000] == first and got[5000:] == make_records("q0", 3000), "old file first, then the new one, once each"
        assert forward_status(d)["file"].endswith("/app.log")

    def test_spool_bound_drop_oldest_counts(self, daemon, producers, tmp_path):
        """With the downstream down and drop-oldest, the spool keeps at most spool_max of lag and counts the rest as dropped."""
        dead, port = down_port()  # nobody listens: the forward stays down
        d = daemon("io_uring", "--forward", f"app=tcp://127.0.0.1:{port},policy=drop-oldest,spool_max=256K")
        expected = run_producers(d, producers, 2, 10_000)
        total = sum(len(r) for v in expected.values() for r in v)
        fs = forward_status(d)
        assert fs["state"] == "down"
        assert fs["lag_bytes"] <= 256 << 10
        assert fs["dropped_bytes"] == fs["cursor"] > total - (256 << 10) - 1000
        assert 0 < fs["dropped_records"] < 20_000

    def test_spool_bound_block_blocks_producers_then_resumes(self, daemon, producers, sinks):
        """With block, a full spool pauses the stream (producers block); when the downstream returns they resume and nothing is lost."""
        dead, port = down_port()  # nobody listens: the forward stays down
        d = daemon("io_uring", "--forward", f"app=tcp://127.0.0.1:{port},policy=block,spool_max=256K")
        p = producers({"socket": d.sock, "stream": "app", "tag": "b0", "mode": "count", "count": 30_000,
                       "client": {"segments": 2, "segment_size": 65536}})
        wait_for(lambda: forward_status(d)["paused"], 20, "the stream to pause")
        time.sleep(0.5)
        assert p.poll() is None, "the producer should be blocked while the spool is full"
        lag = forward_status(d)["lag_bytes"]
        assert (256 << 10) < lag < (256 << 10) + 3 * 65536, "only batches already started may land past the bound"
        sink = sinks(bound=dead)
        finish_producer(p, timeout=60)
        expected = {"b0": make_records("b0", 30_000)}
        total = sum(len(r) for r in expected["b0"])
        wait_for(lambda: forward_status(d)["acked_cursor"] == total, 40, "everything to be forwarded")
        assert_exactly_once_in_order(sink.records("newline"), expected)
        assert forward_status(d)["dropped_records"] == 0


    @pytest.mark.parametrize("engine,transport", [("io_uring", "shm"), ("io_uring", "vmsplice"), ("splice", "vmsplice")])
    def test_spool_bound_holds_while_the_control_plane_is_stalled(self, daemon, sinks, engine, transport):
        """The engine lands and releases batches without the asyncio loop: with the loop stopped, the
        "block" bound still stops the stream at spool_max (plus the batch in flight), then nothing is lost."""
        import logsink

        dead, port = down_port()
        d = daemon(engine, "--forward", f"app=tcp://127.0.0.1:{port},policy=block,spool_max=256K")
        records = make_records("st", 20_000)
        total = sum(len(r) for r in records)
        assert total > 4 * (256 << 10)
        c = logsink.Client("app", socket=d.sock, transport=transport, segments=2, segment_size=65536, flush_interval=None)
        c.write(records[0])
        c.flush()  # connected and answered before the loop stops
        spool = Path(forward_status(d)["file"])
        done = threading.Event()

        def write_rest() -> None:
            for r in records[1:]:
                c.write(r)
            c.flush()
            done.set()

        writer = threading.Thread(target=write_rest, daemon=True)
        with d.control_plane_stalled():
            writer.start()
            wait_for(lambda: spool.stat().st_size >= 256 << 10, 20, "the stream to reach the spool bound")
            time.sleep(0.5)  # the room a missing bound would need to run on
            size = spool.stat().st_size
            assert size < (256 << 10) + 2 * 65536, f"{size} bytes landed with the loop stopped: past the bound"
            assert not done.is_set(), "the producer should block at the bound"
        sink = sinks(bound=dead)
        assert done.wait(60), "the producer should finish once the downstream is back"
        writer.join()
        c.close()
        wait_for(lambda: forward_status(d)["acked_cursor"] == total, 40, "everything to be forwarded")
        assert_exactly_once_in_order(sink.records("newline"), {"st": records})


    def test_copytruncate_while_held_at_the_spool_bound_does_not_stall_the_stream(self, daemon, sinks):
        """A kept file held at policy=block's bound (downstream down, producer blocked) is truncated
        under the daemon (copytruncate): once the downstream is back, the stream moves again and the
        collector gets what the file holds from then on (the truncated, unsent bytes are lost, logged)."""
        import logsink

        dead, port = down_port()
        d = daemon("io_uring", "--forward", f"app=tcp://127.0.0.1:{port},file,policy=block,spool_max=64K")
        records = make_records("ct", 4000)
        c = logsink.Client("app", socket=d.sock, segments=2, segment_size=16384, flush_interval=None)
        done = threading.Event()

        def write_all() -> None:
            for r in records:
                c.write(r)
            c.flush()
            done.set()

        writer = threading.Thread(target=write_all, daemon=True)
        writer.start()
        wait_for(lambda: forward_status(d)["paused"], 20, "the stream to pause at the bound")
        assert not done.is_set()
        os.truncate(d.log("app"), 0)  # copytruncate's second half
        sink = sinks(bound=dead)
        assert done.wait(60), "the producer should finish once the downstream is back"
        writer.join()
        c.close()
        kept = d.log("app").read_bytes()
        assert kept and kept.endswith(b"\n")
        wait_for(lambda: b"".join(sink.records("newline")).endswith(kept), 30,
                 "the collector to get everything the file holds after the truncation")
        assert any(e.get("event") == "forward_source_truncated" for e in d.stderr_events())


    def test_copytruncate_under_a_bounded_stream_with_the_collector_up_loses_nothing_after_it(self, daemon, sinks):
        """A kept, policy=block file truncated (copytruncate) while a producer writes and the collector reads:
        the collector gets every whole record the file holds afterwards, never a torn one."""
        import logsink

        sink = sinks()
        d = daemon("io_uring", "--forward", f"app=tcp://127.0.0.1:{sink.port},file,policy=block,spool_max=64K")
        first, second = make_records("c1", 3000), make_records("c2", 3000)
        with logsink.Client("app", socket=d.sock, segments=2, segment_size=16384, flush_interval=None) as c:
            for r in first:
                c.write(r)
            c.flush(timeout=20)
            os.truncate(d.log("app"), 0)  # copytruncate's second half, the collector maybe behind
            for r in second:
                c.write(r)
            c.flush(timeout=20)
        kept = d.log("app").read_bytes()
        assert kept.endswith(b"".join(second))
        wait_for(lambda: b"".join(sink.records("newline")).endswith(kept), 30, "the collector to get what the file holds")
        got = sink.records("newline")
        assert all(r.startswith((b"c1:", b"c2:")) and r.endswith(b"\n") for r in got)
        assert got[-len(second):] == second


class TestRealCollectors:
    def test_rsyslog_imtcp_octet_counted(self, daemon, producers, tmp_path):
        """A real rsyslogd (imtcp -> omfile, %rawmsg%) gets every record once, in order per producer."""
        peer = Rsyslog(tmp_path / "rsyslog").start()
        try:
            d = daemon("io_uring", "--forward", f"app=tcp://127.0.0.1:{peer.port}", "--framing", "octet-counted")
            expected = run_producers(d, producers, 3, 20_000)
            got = peer.wait_lines(60_000, 30)
            assert_exactly_once_in_order(got, expected)
        finally:
            peer.stop()

    @pytest.mark.parametrize("framing", ["newline", "octet-counted"])
    def test_syslog_ng_network_source(self, daemon, producers, tmp_path, framing):
        """A real syslog-ng (network() with flags(no-parse) -> file(), ${MESSAGE}) gets every record once, in order."""
        peer = SyslogNg(tmp_path / "syslog-ng", framing).start()
        try:
            d = daemon("splice", "--forward", f"app=tcp://127.0.0.1:{peer.port}", "--framing", framing)
            expected = run_producers(d, producers, 2, 20_000)
            got = peer.wait_lines(40_000, 30)
            assert_exactly_once_in_order(got, expected)
        finally:
            peer.stop()


class TestConfig:
    def test_toml_and_cli_forms(self):
        """Tables, arrays of tables and --forward options parse into per-stream specs."""
        from logsink.forward import forward_from_config

        got = forward_from_config(
            {"app": {"address": "tcp://10.0.0.1:514", "framing": "octet-counted", "file": True, "spool_max": "1G", "policy": "drop-oldest"},
             "web": [{"address": "tcp://a:1"}, {"address": "tcp://b:2"}]},
            ["db=tcp://127.0.0.1:6514,file,spool_max=64M"], "octet-counted",
        )
        app = got["app"][0]
        assert (app.host, app.port, app.framing, app.file, app.spool_max, app.policy) == ("10.0.0.1", 514, "octet-counted", True, 1 << 30, "drop-oldest")
        assert [s.host for s in got["web"]] == ["a", "b"] and got["web"][0].framing == "octet-counted"
        db = got["db"][0]
        assert (db.port, db.file, db.spool_max, db.policy, db.framing) == (6514, True, 64 << 20, "block", "octet-counted")
        assert db.key == "db.127.0.0.1_6514"

    @pytest.mark.parametrize("table,cli,needle", [
        ({"app": {"address": "udp://x:1"}}, None, "[forward.app]: address"),
        ({"app": {"address": "tcp://x:1", "framing": "rfc5424"}}, None, "framing 'rfc5424'"),
        ({"app": {"address": "tcp://x:1", "policy": "drop"}}, None, "policy 'drop'"),
        ({"app": {"address": "tcp://x:1", "spool_max": "lots"}}, None, "spool_max"),
        ({"app": {"address": "tcp://x:1", "bogus": 1}}, None, "unknown key 'bogus'"),
        ({"app": {"framing": "newline"}}, None, "address is missing"),
        ({"../x": {"address": "tcp://x:1"}}, None, "invalid"),
        (None, ["app"], "expected STREAM=tcp://HOST:PORT"),
        (None, ["app=tcp://x:1,fast"], "unknown option 'fast'"),
        (None, ["app=tcp://x:1", "app=tcp://x:1"], "twice"),
    ])
    def test_errors_name_the_bad_setting(self, table, cli, needle):
        """Each bad value is refused with a message naming it."""
        from logsink.forward import ForwardConfigError, forward_from_config

        with pytest.raises(ForwardConfigError) as exc:
            forward_from_config(table, cli)
        assert needle in str(exc.value)

    def test_cli_rejects_bad_forward_with_exit_2(self, tmp_path):
        """`logsink serve --forward app=nowhere` exits 2 with a message naming the flag."""
        import subprocess
        import sys

        res = subprocess.run([sys.executable, "-m", "logsink", "serve", "--dir", str(tmp_path), "--socket", str(tmp_path / "s"),
                              "--forward", "app=nowhere"], capture_output=True, timeout=30)
        assert res.returncode == 2 and b"--forward 'app=nowhere'" in res.stderr, res.stderr
