"""flush() waits on the control socket itself (native/ls_producer_conn.c, "reading the control socket").

A thread in ls_producer_flush takes the control socket from the background thread, polls it and
acts on what comes (RELEASE, SHUTDOWN, ERROR, the end of the connection) with the background
thread's own code, so a RELEASE wakes the flushing thread directly. These tests prove the hand-off
between the two readers: the flushing thread really waits in poll(), a message split across two
reads is put together whoever reads each half, the background thread reads again after a flush
timed out, writers waiting for a segment wake on releases the flushing thread reads, and flushes
run through restarts, SHUTDOWN, close and fork. LOGSINK_FLUSH_WAITS_ON_SOCKET=0 (read at open)
restores the background thread's path.
"""

from __future__ import annotations

import errno
import fcntl
import os
import platform
import subprocess
import termios
import threading
from pathlib import Path

import pytest
from lsk_helpers import assert_file, make_records, wait_for
from test_c_client import CDEF, NATIVE, FakeDaemon, Producer, _compiler, read_batch

from logsink import protocol

SHM = 4  # LS_TRANSPORT_SHM
VMSPLICE = 1
COPY = 2

# The syscall a blocked thread sits in (/proc/self/task/TID/syscall): the flushing thread polls the
# socket (poll or ppoll) instead of sleeping on the condition variable (futex).
_SYSCALLS = {"x86_64": ({7, 271}, 202), "aarch64": ({73}, 98)}


@pytest.fixture(scope="module")
def native(tmp_path_factory):
    """The native producer compiled into a test library (every symbol visible), with ls_producer_shutdown declared."""
    from cffi import FFI

    out = tmp_path_factory.mktemp("native_flush") / "libls_flush.so"
    srcs = [str(NATIVE / n) for n in ("ls_producer.c", "ls_producer_send.c", "ls_producer_msg.c", "ls_producer_conn.c",
                                      "ls_transport.c", "ls_msgpack.c", "ls_render.c", "ls_zerocopy.c")]
    cmd = [_compiler(), "-std=gnu11", "-O2", "-Wall", "-Wextra", "-shared", "-fPIC", "-o", str(out), *srcs, "-lpthread"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert res.returncode == 0 and "warning" not in res.stderr, res.stderr
    ffi = FFI()
    ffi.cdef(CDEF + "int ls_producer_shutdown(struct ls_producer *p, int timeout_ms);\n")
    return ffi, ffi.dlopen(str(out))


@pytest.fixture
def producer(native):
    made: list[Producer] = []

    def make(stream, sock, **opts) -> Producer:
        pr = Producer(native, stream, sock, **opts)
        assert pr.open_rc == 0, pr.open_error
        made.append(pr)
        return pr

    yield make
    for pr in made:
        pr.close()


def blocked_in(tid: int) -> str:
    """What thread `tid` of this process is blocked in: "poll", "futex", or another syscall number / "running"."""
    polls, futex = _SYSCALLS[platform.machine()]
    try:
        first = Path(f"/proc/self/task/{tid}/syscall").read_text().split()[0]
    except (OSError, IndexError):
        return "gone"
    if not first.lstrip("-").isdigit():
        return first
    nr = int(first)
    return "poll" if nr in polls else "futex" if nr == futex else str(nr)


def unread_by_peer(conn) -> int:
    """Bytes sent on `conn` (AF_UNIX stream) that the peer has not read yet."""
    return int.from_bytes(fcntl.ioctl(conn.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"), "little")


def release_on(go: threading.Event):
    """A FakeDaemon script: read one batch, and release it once `go` is set."""

    def script(conn, fd):
        seq, _ = read_batch(fd)
        go.wait(30)
        conn.sendall(protocol.encode(protocol.release(seq)))

    return script


def one_record_pending(producer, tmp_path: Path, go: threading.Event):
    """A FakeDaemon that releases the first batch once `go` is set, and a copy producer on it that
    wrote one record (not yet handed over). Returns (fake, producer)."""
    fake = FakeDaemon(str(tmp_path / "f.sock"), protocol.welcome(0, "fake"), release_on(go))
    pr = producer("app", fake.path, transport=COPY, flush_interval_ms=0)
    assert pr.write(b"one\n") == 0
    return fake, pr


class Flusher:
    """ls_producer_flush on its own thread; `tid` is its kernel thread id, `rc` the result once done."""

    def __init__(self, pr: Producer, timeout_ms: int = 20000):
        self.rc: int | None = None
        self.tid: int | None = None
        started = threading.Event()

        def run():
            self.tid = threading.get_native_id()
            started.set()
            self.rc = pr.flush(timeout_ms)

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        started.wait(10)

    def join(self, timeout: float = 30) -> int | None:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the flush did not return"
        return self.rc


needs_known_arch = pytest.mark.skipif(platform.machine() not in _SYSCALLS,
                                      reason=f"syscall numbers for {platform.machine()} are not in this test's table")


class TestFlushingThreadReadsTheSocket:
    @needs_known_arch
    def test_flushing_thread_waits_in_poll_and_reads_the_release_itself(self, producer, tmp_path):
        """While its RELEASE is outstanding the flushing thread sleeps in poll() on the socket, not on the condition
        variable, and the RELEASE ends the flush."""
        go = threading.Event()
        fake, pr = one_record_pending(producer, tmp_path, go)
        f = Flusher(pr)
        wait_for(lambda: blocked_in(f.tid) == "poll", 10, "the flushing thread to poll the control socket")
        go.set()
        assert f.join() == 0
        assert pr.stats()["released_through"] == 1
        fake.join()

    @needs_known_arch
    def test_knob_0_keeps_the_background_thread_path(self, producer, tmp_path, monkeypatch):
        """LOGSINK_FLUSH_WAITS_ON_SOCKET=0 at open: the flushing thread sleeps on the condition variable as before."""
        go = threading.Event()
        monkeypatch.setenv("LOGSINK_FLUSH_WAITS_ON_SOCKET", "0")  # read at open
        fake, pr = one_record_pending(producer, tmp_path, go)
        f = Flusher(pr)
        wait_for(lambda: blocked_in(f.tid) == "futex", 10, "the flushing thread to wait on the condition variable")
        go.set()
        assert f.join() == 0
        fake.join()

    @pytest.mark.parametrize("knob,bg_wakes_per_flush", [(None, False), ("0", True)], ids=["default", "knob-0"])
    def test_background_thread_sleeps_through_flushes(self, daemon, producer, monkeypatch, knob, bg_wakes_per_flush):
        """200 write + flush rounds against a real daemon wake the background thread about never (the flushing thread
        reads each RELEASE); with LOGSINK_FLUSH_WAITS_ON_SOCKET=0 it wakes for every one, as before."""
        d = daemon("readwrite")
        if knob is not None:
            monkeypatch.setenv("LOGSINK_FLUSH_WAITS_ON_SOCKET", knob)
        before = set(os.listdir("/proc/self/task"))
        pr = producer("app", d.sock, transport=VMSPLICE, flush_interval_ms=0)
        (bg,) = set(os.listdir("/proc/self/task")) - before

        def wakes() -> int:
            status = Path(f"/proc/self/task/{bg}/status").read_text()
            return sum(int(line.split()[1]) for line in status.splitlines() if "ctxt_switches:" in line)

        assert pr.write(b"warm\n") == 0 and pr.flush(20000) == 0
        start = wakes()
        for i in range(200):
            assert pr.write(b"r%d\n" % i) == 0
            assert pr.flush(20000) == 0, pr.last_error()
        woke = wakes() - start
        if bg_wakes_per_flush:
            assert woke >= 150, woke  # about once per flush (a wake-up may find it still running)
        else:
            assert woke < 20, f"the background thread woke {woke} times in 200 flushes"

    def test_release_split_across_two_reads_ends_the_flush(self, producer, tmp_path):
        """A RELEASE whose halves arrive apart (the first read before the rest is sent) is put together and ends the
        flush."""
        frame = protocol.encode(protocol.release(1))

        def script(conn, fd):
            read_batch(fd)
            conn.sendall(frame[:6])
            wait_for(lambda: unread_by_peer(conn) == 0, 10, "the producer to read the first half")
            conn.sendall(frame[6:])
            wait_for(lambda: unread_by_peer(conn) == 0, 10, "the producer to read the rest")

        fake = FakeDaemon(str(tmp_path / "f.sock"), protocol.welcome(0, "fake"), script)
        pr = producer("app", fake.path, transport=COPY, flush_interval_ms=0)
        assert pr.write(b"one\n") == 0
        assert pr.flush(20000) == 0, pr.last_error()
        assert pr.stats()["released_through"] == 1
        fake.join()

    def test_half_release_read_by_a_timed_out_flush_is_finished_by_the_background_thread(self, producer, tmp_path):
        """A flush that read half a RELEASE and then timed out leaves it to the background thread, which reads the rest
        and releases the batch with nobody flushing."""
        frame = protocol.encode(protocol.release(1))
        half_read, rest = threading.Event(), threading.Event()

        def script(conn, fd):
            read_batch(fd)
            conn.sendall(frame[:6])
            wait_for(lambda: unread_by_peer(conn) == 0, 10, "the producer to read the first half")
            half_read.set()
            rest.wait(30)
            conn.sendall(frame[6:])
            wait_for(lambda: unread_by_peer(conn) == 0, 10, "the producer to read the rest")

        fake = FakeDaemon(str(tmp_path / "f.sock"), protocol.welcome(0, "fake"), script)
        pr = producer("app", fake.path, transport=COPY, flush_interval_ms=0)
        assert pr.write(b"one\n") == 0
        f = Flusher(pr, timeout_ms=300)
        assert half_read.wait(20)
        assert f.join() == -errno.ETIMEDOUT
        assert pr.stats()["released_through"] == 0
        rest.set()
        wait_for(lambda: pr.stats()["released_through"] == 1, 10, "the background thread to read the rest")
        fake.join()

    def test_release_after_a_flush_timeout_is_read_by_the_background_thread(self, producer, tmp_path):
        """After a flush timed out waiting on the socket, the background thread reads again: a later RELEASE is
        processed (released counter, event fd) and a writer waiting for a segment wakes, with nobody flushing."""
        go = threading.Event()

        def script(conn, fd):
            seqs = [read_batch(fd)[0] for _ in range(2)]
            go.wait(30)
            conn.sendall(protocol.encode(protocol.release(seqs[-1])))
            while True:  # whatever comes after: release it at once
                seq, _ = read_batch(fd)
                conn.sendall(protocol.encode(protocol.release(seq)))
                if seq == 3:
                    break

        fake = FakeDaemon(str(tmp_path / "f.sock"), protocol.welcome(0, "fake"), script)
        pr = producer("app", fake.path, transport=VMSPLICE, segment_size=4096, segments=2, flush_interval_ms=0)
        rec = b"w" * 99 + b"\n"
        for _ in range(60):  # 40 records fill a segment: one handed over, the second one filling
            assert pr.write(rec) == 0
        assert pr.flush(200) == -errno.ETIMEDOUT  # hands the second over, times out
        assert pr.stats()["pinned_segments"] == 2
        writer_rc: list[int] = []
        w = threading.Thread(target=lambda: writer_rc.append(pr.write(rec)), daemon=True)
        w.start()  # every segment pinned: waits for a release
        wait_for(lambda: pr.stats()["waits_for_release"] >= 1, 10, "the writer to wait for a segment")
        go.set()
        wait_for(lambda: pr.stats()["released_through"] == 2, 10, "the background thread to read the RELEASE")
        w.join(10)
        assert writer_rc == [0]
        assert pr.flush(20000) == 0, pr.last_error()
        fake.join()

    @needs_known_arch
    def test_writer_waiting_for_a_segment_wakes_on_a_release_the_flushing_thread_reads(self, producer, tmp_path):
        """A writer blocked on a pinned arena wakes when the flushing thread (polling the socket) reads the RELEASE."""
        go = threading.Event()

        def script(conn, fd):
            seqs = [read_batch(fd)[0] for _ in range(2)]
            go.wait(30)
            conn.sendall(protocol.encode(protocol.release(seqs[-1])))
            seq, _ = read_batch(fd)
            conn.sendall(protocol.encode(protocol.release(seq)))

        fake = FakeDaemon(str(tmp_path / "f.sock"), protocol.welcome(0, "fake"), script)
        pr = producer("app", fake.path, transport=VMSPLICE, segment_size=4096, segments=2, flush_interval_ms=0)
        rec = b"w" * 99 + b"\n"
        for _ in range(60):
            assert pr.write(rec) == 0
        f = Flusher(pr)  # hands the second segment over: both pinned
        wait_for(lambda: blocked_in(f.tid) == "poll", 10, "the flushing thread to poll the control socket")
        writer_rc: list[int] = []
        w = threading.Thread(target=lambda: writer_rc.append(pr.write(rec)), daemon=True)
        w.start()
        wait_for(lambda: pr.stats()["waits_for_release"] >= 1, 10, "the writer to wait for a segment")
        go.set()
        assert f.join() == 0
        w.join(10)
        assert writer_rc == [0]
        assert pr.flush(20000) == 0, pr.last_error()
        fake.join()


class TestFlushThroughConnectionChanges:
    @pytest.mark.parametrize("reconnect", [1, 0])
    def test_shutdown_read_by_the_flushing_thread_ends_the_flush_cleanly(self, producer, tmp_path, reconnect):
        """SHUTDOWN arriving while a flush polls the socket: the flushing thread acts on it (the pipe ends), the RELEASE
        after it ends the flush with 0; then reconnect=0 refuses writes, reconnect=1 goes reconnecting."""
        go = threading.Event()

        def script(conn, fd):
            seq, _ = read_batch(fd)
            go.wait(30)
            conn.sendall(protocol.encode({"t": protocol.SHUTDOWN}))
            assert os.read(fd, 1) == b""  # the producer ends its pipe
            conn.sendall(protocol.encode(protocol.release(seq)))
            wait_for(lambda: unread_by_peer(conn) == 0, 10, "the producer to read the RELEASE")
            conn.close()

        fake = FakeDaemon(str(tmp_path / "f.sock"), protocol.welcome(0, "fake"), script)
        pr = producer("app", fake.path, transport=COPY, flush_interval_ms=0, reconnect=reconnect)
        assert pr.write(b"one\n") == 0
        f = Flusher(pr)
        wait_for(lambda: pr.stats()["handed_over_through"] == 1, 10, "the flush to hand the batch over")
        go.set()
        assert f.join() == 0, pr.last_error()
        fake.join()
        if reconnect:
            wait_for(lambda: pr.stats()["connected"] == 0 and "reconnecting" in pr.last_error(), 10,
                     "the producer to start reconnecting")
        else:
            wait_for(lambda: pr.write(b"two\n") == -errno.ESHUTDOWN, 10, "writes to be refused")

    def test_flush_waiting_through_a_daemon_restart_returns_once_the_new_daemon_wrote_it(self, daemon, producer):
        """A flush polling the socket when the daemon dies hands the socket back; the background thread reconnects and
        resends, and the same flush returns 0 with every record in the file once."""
        d = daemon("readwrite")
        pr = producer("app", d.sock, transport=VMSPLICE, segment_size=4096, segments=8, flush_interval_ms=0)
        recs = make_records("r", 120)
        d.sigstop()
        for r in recs:
            assert pr.write(r) == 0
        handed = pr.stats()["handed_over_through"]
        f = Flusher(pr, timeout_ms=60000)
        wait_for(lambda: pr.stats()["handed_over_through"] == handed + 1, 10, "the flush to hand over")
        d.proc.kill()
        d.proc.wait()
        d.stopped = False
        wait_for(lambda: pr.stats()["connected"] == 0, 10, "the producer to notice the loss")
        d._stderr.close()
        d.start()
        assert f.join(60) == 0, pr.last_error()
        st = pr.stats()
        assert st["reconnects"] == 1 and st["connected"] == 1
        assert_file(d.log("app"), {"r": recs})

    def test_flush_during_daemon_shutdown_returns_with_the_records_written(self, daemon, producer):
        """A flush polling the socket while the real daemon stops (SIGTERM: SHUTDOWN, drain, RELEASE, close) returns 0
        with its records in the file; the producer then reconnects to the next daemon."""
        d = daemon("readwrite")
        pr = producer("app", d.sock, transport=VMSPLICE, flush_interval_ms=0)
        recs = make_records("s", 200)
        d.sigstop()
        for r in recs:
            assert pr.write(r) == 0
        f = Flusher(pr, timeout_ms=60000)
        wait_for(lambda: pr.stats()["handed_over_through"] == 1, 10, "the flush to hand over")
        assert d.terminate() == 0  # SIGCONT + SIGTERM
        assert f.join(60) == 0, pr.last_error()
        assert_file(d.log("app"), {"s": recs})
        d._stderr.close()
        d.start()
        assert pr.write(b"s:99999999:after\n") == 0
        assert pr.flush(30000) == 0, pr.last_error()
        assert pr.stats()["reconnects"] == 1
        assert_file(d.log("app"), {"s": recs + [b"s:99999999:after\n"]})

    def test_shutdown_from_another_thread_wakes_a_flush_polling_the_socket(self, producer, tmp_path, native):
        """ls_producer_shutdown while a flush waits on the socket for a RELEASE that never comes: the flush returns
        -ESHUTDOWN at once (not at its timeout) and shutdown returns."""
        _, lib = native
        done = threading.Event()

        def script(conn, fd):
            read_batch(fd)
            done.wait(60)  # never releases

        fake = FakeDaemon(str(tmp_path / "f.sock"), protocol.welcome(0, "fake"), script)
        pr = producer("app", fake.path, transport=COPY, flush_interval_ms=0)
        assert pr.write(b"one\n") == 0
        f = Flusher(pr, timeout_ms=120000)
        wait_for(lambda: pr.stats()["handed_over_through"] == 1, 10, "the flush to hand over")
        assert lib.ls_producer_shutdown(pr.p, 200) in (0, -errno.ETIMEDOUT, -errno.ESHUTDOWN)
        assert f.join(20) == -errno.ESHUTDOWN
        done.set()
        fake.join()

    def test_forked_child_leaves_the_parents_waiting_flush_alone(self, producer, tmp_path):
        """Forking while a flush polls the socket: in the child every call is -ECHILD and its close frees only its
        copies; the parent's flush still gets its RELEASE and returns 0."""
        go = threading.Event()
        fake, pr = one_record_pending(producer, tmp_path, go)
        f = Flusher(pr)
        wait_for(lambda: pr.stats()["handed_over_through"] == 1, 10, "the flush to hand over")
        pid = os.fork()
        if pid == 0:
            ok = pr.flush(100) == -errno.ECHILD and pr.write(b"c\n") == -errno.ECHILD
            ok = ok and pr.lib.ls_producer_close(pr.p) == -errno.ECHILD
            os._exit(0 if ok else 1)
        _, status = os.waitpid(pid, 0)
        assert os.WEXITSTATUS(status) == 0
        go.set()
        assert f.join() == 0, pr.last_error()
        fake.join()


class TestTcpKeepsTheBackgroundThread:
    @needs_known_arch
    def test_tcp_flush_leaves_the_socket_to_the_background_thread(self, daemon, producer):
        """Over TCP (zerocopy completions arrive on the same socket's error queue) a waiting flush sleeps on the
        condition variable: the background thread keeps reading the socket, and the flush still returns."""
        from test_tcp import tcp_daemon

        d, address = tcp_daemon(daemon, "readwrite")
        pr = producer("app", address, transport=COPY, flush_interval_ms=0)
        assert pr.write(b"one\n") == 0 and pr.flush(20000) == 0
        d.sigstop()
        try:
            assert pr.write(b"two\n") == 0
            f = Flusher(pr)
            wait_for(lambda: blocked_in(f.tid) in ("poll", "futex"), 10, "the flush to wait")
            state = blocked_in(f.tid)
        finally:
            d.sigcont()
        assert f.join() == 0
        assert state == "futex", f"the flushing thread waits in {state}, not on the condition variable"
        assert d.log("app").read_bytes() == b"one\ntwo\n"


class TestRefusalsAndShutdown:
    @pytest.mark.parametrize("knob", [None, "0"], ids=["default", "knob-0"])
    def test_a_refusal_read_by_the_flushing_thread_keeps_its_reason(self, producer, tmp_path, monkeypatch, knob):
        """The daemon refuses the producer for good (ERROR bad-frame, RELEASE, close - as the daemon does) while a
        flush polls the socket: after the background thread ended, last_error still gives the daemon's reason,
        not a "reconnecting" it will never do."""
        go = threading.Event()

        def script(conn, fd):
            read_batch(fd)
            go.wait(30)
            conn.sendall(protocol.encode(protocol.error(protocol.E_BAD_FRAME, "frame header rejected: test"))
                         + protocol.encode(protocol.release(0)))
            conn.close()
            os.close(fd)

        if knob is not None:
            monkeypatch.setenv("LOGSINK_FLUSH_WAITS_ON_SOCKET", knob)
        fake = FakeDaemon(str(tmp_path / "f.sock"), protocol.welcome(0, "fake"), script)
        before = set(os.listdir("/proc/self/task"))
        pr = producer("app", fake.path, transport=COPY, flush_interval_ms=0, reconnect=1)
        (bg,) = set(os.listdir("/proc/self/task")) - before
        assert pr.write(b"one\n") == 0
        f = Flusher(pr)
        wait_for(lambda: blocked_in(f.tid) in ("poll", "futex"), 10, "the flush to wait")
        go.set()
        assert f.join() == -errno.ECONNRESET
        wait_for(lambda: not os.path.exists(f"/proc/self/task/{bg}"), 10, "the background thread to end (refused for good)")
        assert "bad-frame" in pr.last_error(), pr.last_error()
        fake.join()

    @pytest.mark.parametrize("transport", [COPY, SHM])
    def test_every_write_accepted_while_shutdown_runs_is_in_the_file(self, daemon, producer, transport):
        """Two threads write while another shuts the producer down: once shutdown returned 0, every record a write
        accepted (returned 0) is in the file; the writes after its start are refused (-ESHUTDOWN), none dropped."""
        d = daemon("readwrite")
        for rnd in range(6):
            pr = producer(f"s{rnd}", d.sock, transport=transport, flush_interval_ms=0, segment_size=65536)
            ok: list[list[bytes]] = [[], []]
            refused: list[int] = []

            def writer(k: int, pr=pr, ok=ok, refused=refused, rnd=rnd) -> None:
                i = 0
                while True:
                    rec = b"r%d-%d:%d\n" % (rnd, k, i)
                    r = pr.write(rec)
                    if r != 0:
                        refused.append(r)
                        return
                    ok[k].append(rec)
                    i += 1

            ts = [threading.Thread(target=writer, args=(k,)) for k in range(2)]
            for t in ts:
                t.start()
            wait_for(lambda ok=ok: len(ok[0]) + len(ok[1]) > 2000, 10, "the writers to be under way")
            assert pr.lib.ls_producer_shutdown(pr.p, 10000) == 0
            for t in ts:
                t.join(20)
            assert refused == [-errno.ESHUTDOWN] * 2
            assert_file(d.log(f"s{rnd}"), {f"r{rnd}-0": ok[0], f"r{rnd}-1": ok[1]})


class TestManyFlushers:
    @pytest.mark.parametrize("transport", [SHM, VMSPLICE], ids=["shm", "vmsplice"])
    def test_concurrent_flushes_each_return_after_their_records_are_in_the_file(self, daemon, producer, transport):
        """Threads writing and flushing one producer at once (one of them polls the socket, the others wait on the
        condition variable, a writer keeps the arena busy): every flush returns 0 only once all that its thread wrote
        before it is in the file."""
        d = daemon("readwrite")
        pr = producer("app", d.sock, transport=transport, segment_size=16384, segments=4, flush_interval_ms=5)
        threads, rounds, per_round = 4, 25, 8
        failures: list[str] = []
        written: dict[str, list[bytes]] = {}

        def flusher(k: int):
            tag = f"f{k}"
            recs = make_records(tag, rounds * per_round)
            written[tag] = recs
            for r in range(rounds):
                for rec in recs[r * per_round:(r + 1) * per_round]:
                    if pr.write(rec):
                        failures.append(f"{tag}: write failed: {pr.last_error()}")
                        return
                rc = pr.flush(30000)
                if rc:
                    failures.append(f"{tag}: flush {r} returned {rc}: {pr.last_error()}")
                    return
                have = set(d.log("app").read_bytes().splitlines(keepends=True))
                missing = [x for x in recs[:(r + 1) * per_round] if x not in have]
                if missing:
                    failures.append(f"{tag}: flush {r} returned before {len(missing)} of its records were in the file")
                    return

        def writer():
            recs = make_records("w", 3000)
            written["w"] = recs
            for rec in recs:
                if pr.write(rec):
                    failures.append(f"w: write failed: {pr.last_error()}")
                    return

        ts = [threading.Thread(target=flusher, args=(k,)) for k in range(threads)] + [threading.Thread(target=writer)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(120)
        assert not any(t.is_alive() for t in ts), "a thread hung"
        assert not failures, failures
        assert pr.flush(30000) == 0
        assert_file(d.log("app"), written)
