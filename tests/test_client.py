"""logsink.Client behaviour against a live daemon: whole records, flush, full arenas, errors."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import threading
import time

import pytest
from lsk_helpers import assert_file, make_records, proc_state, wait_for
from test_flush_path import blocked_in, needs_known_arch

STATS_KEYS = {
    "transport", "segment_size", "segments", "pipe_size", "batches", "records", "bytes",
    "dropped_records", "released_through", "pinned_segments", "failed_batches",
}


@pytest.fixture
def logsink():
    import logsink as mod

    return mod


class TestWholeRecords:
    @pytest.mark.parametrize("data", [b"no newline", b"one\ntwo", b"x" * 5000], ids=["no-newline", "torn-second", "long-no-newline"])
    def test_partial_record_raises_value_error(self, daemon, logsink, data):
        """write() of bytes not ending in a newline raises ValueError and nothing of it reaches the file."""
        d = daemon("readwrite")
        with logsink.Client("app", socket=d.sock) as c:
            c.write(b"before\n")
            with pytest.raises(ValueError):
                c.write(data)
            c.write(b"after\n")
            c.flush(timeout=10)
        assert d.log("app").read_bytes() == b"before\nafter\n"

    def test_several_records_in_one_write(self, daemon, logsink):
        """One write() of several whole records lands them all, counted as records."""
        d = daemon("splice")
        recs = make_records("m", 500)
        with logsink.Client("app", socket=d.sock) as c:
            for i in range(0, 500, 50):
                c.write(b"".join(recs[i : i + 50]))
            c.flush(timeout=10)
            assert c.stats()["records"] == 500
        assert_file(d.log("app"), {"m": recs})

    def test_write_larger_than_a_segment_is_split_at_records(self, daemon, logsink):
        """A single write bigger than a segment lands whole, never split inside a record."""
        d = daemon("io_uring")
        recs = make_records("L", 2000)
        with logsink.Client("app", socket=d.sock, segment_size=4096, segments=4) as c:
            c.write(b"".join(recs))
            c.flush(timeout=10)
        assert_file(d.log("app"), {"L": recs})


class TestFlush:
    @pytest.mark.parametrize("engine", ["io_uring", "readwrite"])
    def test_flush_returns_only_when_records_are_in_the_file(self, daemon, logsink, engine):
        """Right after flush() returns, the file holds every record written before it (no background flush helps)."""
        d = daemon(engine)
        with logsink.Client("app", socket=d.sock, flush_interval=None) as c:
            written = []
            for round_ in range(5):
                recs = make_records("f", 37 * (round_ + 1), start=len(written))
                for r in recs:
                    c.write(r)
                written += recs
                c.flush(timeout=10)
                assert_file(d.log("app"), {"f": written})
                st = c.stats()
                assert st["released_through"] == st["batches"] and st["pinned_segments"] == 0

    def test_background_flush_lands_a_lone_record(self, daemon, logsink):
        """With flush_interval=0.2 a single record reaches the file without flush() being called."""
        d = daemon("splice")
        with logsink.Client("app", socket=d.sock, flush_interval=0.2) as c:
            c.write(b"lonely record\n")
            wait_for(lambda: d.log("app").exists() and d.log("app").read_bytes() == b"lonely record\n", 10, "the record in the file")

    def test_stats_keys_and_counts(self, daemon, logsink):
        """stats() has the contract keys and counts records and bytes written."""
        d = daemon("readwrite")
        recs = make_records("k", 3000)
        with logsink.Client("app", socket=d.sock, transport="vmsplice", segment_size=8192, segments=3) as c:
            for r in recs:
                c.write(r)
            c.flush(timeout=10)
            st = c.stats()
        assert STATS_KEYS <= set(st), f"missing {STATS_KEYS - set(st)}"
        assert (st["segment_size"], st["segments"], st["transport"]) == (8192, 3, "vmsplice")
        assert st["records"] == 3000 and st["bytes"] == sum(map(len, recs))
        assert st["dropped_records"] == 0 and st["failed_batches"] == 0
        assert st["pipe_size"] >= 8192


class TestConnectionErrors:
    def test_no_daemon_raises_connection_error(self, tmp_path, logsink):
        """A Client whose socket has no daemon raises ConnectionError."""
        with pytest.raises(ConnectionError):
            logsink.Client("app", socket=str(tmp_path / "nobody.sock"))

    def test_invalid_stream_is_refused(self, daemon, logsink):
        """A Client for an invalid stream name raises (ValueError or ConnectionError) naming the problem."""
        d = daemon("readwrite")
        with pytest.raises((ValueError, ConnectionError)) as info:
            logsink.Client("../etc/passwd", socket=d.sock)
        assert "stream" in str(info.value)
        assert [p.name for p in d.dir.iterdir() if p.name != ".logsink.lock"] == []  # the lock: one daemon per dir


class TestFullArena:
    def _stopped(self, d):
        d.sigstop()
        wait_for(lambda: proc_state(d.pid) == "T", 10, "the daemon to be stopped")

    def test_on_full_drop_counts_dropped_records(self, daemon, logsink):
        """With the daemon stopped and 2 segments pinned, on_full="drop" drops and counts; the accepted prefix lands exactly."""
        d = daemon("splice")
        c = logsink.Client("app", socket=d.sock, segments=2, segment_size=4096, on_full="drop", flush_interval=None)
        try:
            self._stopped(d)
            recs = make_records("d", 1000)  # ~160 KB, 40 times the arena
            t0 = time.monotonic()
            for r in recs:
                c.write(r)
            assert time.monotonic() - t0 < 5, "drop mode blocked"
            st = c.stats()
            assert st["dropped_records"] > 0, st
            assert st["pinned_segments"] == 2, st
        finally:
            d.sigcont()
        c.flush(timeout=10)
        st = c.stats()
        c.close()
        assert st["records"] + st["dropped_records"] == 1000, st
        assert st["dropped_records"] >= 1000 - 2 * 4096 // 20, st
        # the records that were kept are the ones written before the arena filled: a prefix
        assert_file(d.log("app"), {"d": recs[: st["records"]]})

    def test_on_full_block_times_out(self, daemon, logsink):
        """With the daemon stopped, on_full="block" with timeout=0.5 makes write() raise TimeoutError after ~0.5 s."""
        d = daemon("io_uring")
        c = logsink.Client("app", socket=d.sock, segments=2, segment_size=4096, on_full="block", timeout=0.5, flush_interval=None)
        accepted = []
        try:
            self._stopped(d)
            recs = make_records("b", 1000)
            with pytest.raises(TimeoutError):
                for r in recs:
                    t0 = time.monotonic()
                    c.write(r)
                    accepted.append(r)
            waited = time.monotonic() - t0
            assert 0.4 <= waited < 5, f"write blocked {waited:.2f}s, expected about 0.5s"
            assert len(accepted) < 2 * 4096 // 20, "more records accepted than 2 segments can hold"
        finally:
            d.sigcont()
        # after SIGCONT the daemon releases; the client works again and nothing was overwritten
        more = make_records("b", 200, start=len(accepted))
        for r in more:
            c.write(r)
        c.flush(timeout=10)
        c.close()
        assert_file(d.log("app"), {"b": accepted + more})

    def test_segment_not_reused_before_release(self, daemon, logsink):
        """While the daemon is stopped, pinned segments are not overwritten: everything accepted lands byte-exact after SIGCONT."""
        d = daemon("splice")
        c = logsink.Client("app", socket=d.sock, segments=3, segment_size=4096, on_full="block", timeout=0.3, flush_interval=None)
        accepted = []
        try:
            self._stopped(d)
            with pytest.raises(TimeoutError):
                for r in make_records("n", 2000):
                    c.write(r)
                    accepted.append(r)
            assert c.stats()["pinned_segments"] == 3
        finally:
            d.sigcont()
        c.flush(timeout=10)
        c.close()
        assert_file(d.log("app"), {"n": accepted})


class TestThreads:
    def test_threads_sharing_a_client_keep_their_order(self, daemon, logsink):
        """4 threads writing through one Client: every record lands once, each thread's in its order."""
        import threading

        d = daemon("io_uring")
        n = 20_000
        errors = []
        with logsink.Client("app", socket=d.sock, segment_size=16384, segments=4) as c:
            def work(tag):
                try:
                    for r in make_records(tag, n):
                        c.write(r)
                except BaseException as exc:  # reported below
                    errors.append(exc)

            threads = [threading.Thread(target=work, args=(f"t{i}",)) for i in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(120)
            assert not any(t.is_alive() for t in threads), "a writer thread hung"
            c.flush(timeout=20)
        assert not errors, errors
        assert_file(d.log("app"), {f"t{i}": make_records(f"t{i}", n) for i in range(4)})


def _sockets_to(path: str) -> list[int]:
    """This process's fds that are AF_UNIX sockets connected to the daemon at ``path``."""
    import socket as _s

    out = []
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            if not stat.S_ISSOCK(os.fstat(fd).st_mode):
                continue
            s = _s.socket(fileno=os.dup(fd))
        except OSError:
            continue
        try:
            if s.family == _s.AF_UNIX and s.getpeername() == path:
                out.append(fd)
        except OSError:
            pass
        finally:
            s.close()
    return out


class TestClose:
    def test_close_racing_other_threads_calls_never_crashes(self, daemon):
        """close() while other threads call connected, stats() and write() on the same Client: they
        get False, a snapshot or an error, never a NULL or freed producer (a crash kills the script)."""
        d = daemon("io_uring")
        script = (
            "import logsink, sys, threading\n"
            "sys.setswitchinterval(1e-6)\n"  # switch threads as often as the interpreter can
            "for i in range(300):\n"
            f"    c = logsink.Client('race', socket={d.sock!r}, flush_interval=None)\n"
            "    stop = False\n"
            "    def poke():\n"
            "        while not stop:\n"
            "            c.connected; c.stats()\n"
            "            try:\n"
            "                c.write(b'r\\n')\n"
            "            except (ValueError, ConnectionError):\n"
            "                pass\n"
            "    t = threading.Thread(target=poke)\n"
            "    t.start()\n"
            "    c.close()\n"
            "    stop = True\n"
            "    t.join()\n"
            "print('done', flush=True)\n"
        )
        res = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=240)
        assert res.returncode == 0 and res.stdout.strip() == b"done", (res.returncode, res.stderr.decode()[-2000:])

    def test_close_ends_the_connection_while_the_client_is_still_referenced(self, daemon, logsink):
        """A closed Client that something still holds (a list, a handler) has ended its connection:
        the daemon no longer lists it, without waiting for the garbage collector."""
        d = daemon("io_uring")
        kept = [logsink.Client("held", socket=d.sock) for _ in range(3)]
        wait_for(lambda: len(d.status()["producers"]) == 3, 20, "three producers")
        for c in kept:
            c.write(b"last\n")
            c.close()
        wait_for(lambda: len(d.status()["producers"]) == 0, 20, "the daemon to see every closed Client go")
        assert d.log("held").read_bytes() == b"last\n" * 3
        assert all(not c.connected for c in kept)
        assert not _sockets_to(d.sock), "a closed Client still holds its control socket"


class TestShutdownReportsLoss:
    @needs_known_arch
    def test_shutdown_that_cuts_a_blocked_handover_short_says_so(self, daemon, logsink):
        """A close whose bound cuts short a handover blocked on a full pipe (daemon stopped, no reconnect)
        does not report success: accepted records were not delivered, so shutdown returns an error and
        last_error says the close cut it short."""
        from logsink._native import ffi, lib

        d = daemon("readwrite")
        c = logsink.Client("app", socket=d.sock, transport="vmsplice", segments=32, segment_size=1 << 20,
                           flush_interval=None, reconnect=False)
        d.sigstop()
        accepted: list[int] = []
        tid: list[int] = []

        def writer() -> None:
            tid.append(threading.get_native_id())
            rec = b"w" * 199 + b"\n"
            try:
                while True:
                    c.write(rec)
                    accepted.append(1)
            except (ConnectionError, TimeoutError, ValueError):
                pass

        t = threading.Thread(target=writer, daemon=True)
        t.start()
        # A segment's handover fills the 1 MiB pipe; the next one waits for room, in poll, holding the lock.
        wait_for(lambda: len(accepted) * 200 > c.pipe_size and blocked_in(tid[0]) == "poll", 20,
                 "the writer's handover to wait for pipe room")
        try:
            ret = lib.ls_producer_shutdown(c._p, 500)
            t.join(10)
        finally:
            d.sigcont()
        assert not t.is_alive()
        assert ret < 0, "shutdown returned 0 though the daemon confirmed none of the accepted records"
        assert "cut short by close" in ffi.string(lib.ls_producer_last_error(c._p)).decode()
        c.close()


def _exit_with_daemon_stopped(d, script: str) -> tuple[bytes, float]:
    """Run ``script``, which prints "connected" and then waits for a line on stdin; stop the daemon
    (SIGSTOP), let the script go on to its end and exit. Returns (its stdout, seconds from the go to
    its exit); fails the test if it does not exit with 0 within 60 s."""
    proc = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout.readline().strip() == b"connected"
        d.sigstop()
        t0 = time.monotonic()
        out, err = proc.communicate(b"go\n", timeout=60)
        elapsed = time.monotonic() - t0
    finally:
        d.sigcont()
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err.decode()
    return out, elapsed


class TestForkAndExit:
    def test_forked_child_gets_its_own_connection_and_both_land(self, daemon):
        """After fork, parent and child both log through the same Client object: the child reconnects lazily and every record of both lands, each process's in order."""
        d = daemon("io_uring")
        script = f"""
import os, logsink
c = logsink.Client("fork", socket={d.sock!r})
for i in range(1000):
    c.write(b"before %d\\n" % i)
pid = os.fork()
who = b"child" if pid == 0 else b"parent"
for i in range(20000):
    c.write(b"%s %d\\n" % (who, i))
if pid == 0:
    c.close()
    os._exit(0)
_, status = os.waitpid(pid, 0)
assert status == 0, status
c.close()
"""
        res = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
        assert res.returncode == 0, res.stderr.decode()
        lines = d.log("fork").read_bytes().split(b"\n")
        assert lines[-1] == b""
        by = {}
        for line in lines[:-1]:
            who, i = line.split(b" ")
            by.setdefault(who, []).append(int(i))
        assert by == {b"before": list(range(1000)), b"parent": list(range(20000)), b"child": list(range(20000))}

    def test_records_written_just_before_exit_are_delivered(self, daemon):
        """A program that writes and exits without close() still delivers (the client flushes at exit)."""
        d = daemon("io_uring")
        script = f"import logsink\nc = logsink.Client('exit', socket={d.sock!r}, flush_interval=None)\nc.write(b'last words\\n')\n"
        res = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60)
        assert res.returncode == 0, res.stderr.decode()
        assert d.log("exit").read_bytes() == b"last words\n"

    def test_exit_does_not_hang_on_a_stopped_daemon(self, daemon):
        """With the daemon stopped (SIGSTOP), a program that exits with unflushed records still exits, bounded by the exit flush timeout."""
        d = daemon("io_uring")
        script = (
            f"import logsink, sys\nc = logsink.Client('stuck', socket={d.sock!r}, flush_interval=None)\n"
            "print('connected', flush=True)\nsys.stdin.readline()\nc.write(b'x\\n')\n"
        )
        _, elapsed = _exit_with_daemon_stopped(d, script)
        assert elapsed < 20, f"exit took {elapsed:.1f} s"

    @pytest.mark.parametrize("transport,segments", [("shm", "segments=2, segment_size=4096"), ("vmsplice", "segments=2, segment_size=4096"),
                                                    ("vmsplice", "segments=None"), ("copy", "segments=None")])
    def test_exit_does_not_hang_on_a_thread_blocked_in_write(self, daemon, transport, segments):
        """A daemon thread blocked in write() when the program exits (the daemon is stopped: small
        segments all pinned, or default ones filling the pipe so the handover itself waits, holding
        the producer's lock): the exit's close cuts it short (ESHUTDOWN or a timeout) and the
        process exits within the exit flush timeout, instead of waiting forever or freeing the
        producer under it."""
        d = daemon("io_uring")
        script = (
            "import logsink, sys, threading\n"
            f"c = logsink.Client('stuck', socket={d.sock!r}, transport={transport!r}, {segments}, flush_interval=None)\n"
            "print('connected', flush=True)\nsys.stdin.readline()\n"
            "def spin():\n"
            "    try:\n"
            "        while True:\n"
            "            c.write(b'y' * 99 + b'\\n')\n"
            "    except (ConnectionError, ValueError, TimeoutError) as exc:\n"
            "        print('writer:', type(exc).__name__, exc, flush=True)\n"
            "threading.Thread(target=spin, daemon=True).start()\n"
            # Not stats() to see it block: a handover waiting for pipe room holds the lock stats() takes.
            # The writer fills two 4 KiB segments or a 1 MiB pipe within milliseconds.
            "import time; time.sleep(1.0)\n"
            "print('blocked', flush=True)\n"
        )
        out, elapsed = _exit_with_daemon_stopped(d, script)
        assert b"blocked" in out, out
        assert elapsed < 30, f"exit took {elapsed:.1f} s"
        for line in out.split(b"\n")[:-1]:  # whole lines only: the exit may stop the writer mid-print
            if line.startswith(b"writer:"):
                assert line.startswith((b"writer: ConnectionError", b"writer: ValueError", b"writer: TimeoutError")), out


class TestAutoTransport:
    def test_auto_is_shm_locally(self, daemon, logsink):
        """A local Client with the default transport uses the shared-memory arena: every byte is written from it."""
        d = daemon("io_uring")
        with logsink.Client("auto", socket=d.sock) as c:
            c.write(b"one\ntwo\n")
            c.flush(timeout=10)
            assert c.transport == "shm" and c.stats()["transport"] == "shm"
        st = d.status()
        assert st["totals"]["bytes_shared"] == 8 and st["totals"]["bytes_spliced"] == 0

    def test_auto_steps_down_to_vmsplice_when_the_daemon_refuses_the_arena(self, daemon, tmp_path, logsink):
        """A daemon whose max_arena is below the client's arena refuses shm (bad-frame): auto connects with vmsplice instead and lands every record; an explicit transport="shm" fails with the daemon's reason."""
        cfg = tmp_path / "tiny-arena.toml"
        cfg.write_text("max_arena = 65536\n")
        d = daemon("io_uring", "--config", str(cfg))
        with pytest.raises(ConnectionError, match="max_arena"):
            logsink.Client("auto", socket=d.sock, transport="shm")
        with logsink.Client("auto", socket=d.sock) as c:
            c.write(b"still lands\n")
            c.flush(timeout=10)
            assert c.transport == "vmsplice"
        assert d.log("auto").read_bytes() == b"still lands\n"
