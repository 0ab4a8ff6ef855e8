"""Producers outlive the daemon: reconnect with backoff, resend what was not released, at-least-once delivery."""

from __future__ import annotations

import asyncio
import re
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
from conftest import START_TIMEOUT, Daemon, finish_producer
from lsk_helpers import assert_file, make_records, proc_state, read_line, record, wait_for
from peers import free_port

import logsink

CRASHES = 3
PRODUCERS = 6
SEGMENT_SIZE = 64 << 10
SEGMENTS = 4
_LINE = re.compile(rb"^([A-Za-z0-9]+):(\d{8}):")


def restart(d: Daemon) -> Daemon:
    """Start ``d``'s command again: the same --dir and --socket (and --listen), as an operator's restart."""
    d._stderr.close()
    stderr_path = d.stderr_path
    d.stderr_path = stderr_path.with_name(f"{stderr_path.stem}.{time.monotonic_ns()}.stderr")
    return d.start()


def sigkill(d: Daemon) -> None:
    d.proc.send_signal(signal.SIGKILL)
    d.proc.wait()


def replay(path: Path, counts: dict[str, int]) -> dict[str, dict]:
    """Walk the file once, per producer tag: every record 0..count-1 must appear and be byte-exact;
    a record seen again must belong to a contiguous replay run that ends where the producer's
    stream resumes. Returns per tag: lost, dup_records, dup_runs, longest_run_bytes."""
    out = {tag: {"next": 0, "lost": 0, "dup_records": 0, "dup_runs": 0, "run_bytes": 0, "longest_run_bytes": 0,
                 "run_next": None, "bad": []} for tag in counts}
    for line in path.read_bytes().splitlines(keepends=True):
        m = _LINE.match(line)
        assert m, f"a line that is no record (torn or foreign): {line[:80]!r}"
        tag, i = m.group(1).decode(), int(m.group(2))
        s = out[tag]
        assert line == record(tag, i), f"record {tag}:{i} is damaged: {line[:80]!r}"
        if i == s["next"]:
            s["next"] += 1
            s["run_next"] = None
        elif i < s["next"]:  # a replayed record: part of a run i0, i0+1, ... (never a scatter)
            if s["run_next"] != i:
                s["dup_runs"] += 1
                s["run_bytes"] = 0
            s["dup_records"] += 1
            s["run_bytes"] += len(line)
            s["longest_run_bytes"] = max(s["longest_run_bytes"], s["run_bytes"])
            s["run_next"] = i + 1
        else:
            s["bad"].append(f"{tag}: record {i} follows {s['next'] - 1}: {i - s['next']} records skipped")
            s["lost"] += i - s["next"]
            s["next"] = i + 1
    for tag, n in counts.items():
        s = out[tag]
        if s["next"] < n:
            s["lost"] += n - s["next"]
            s["bad"].append(f"{tag}: the file ends at record {s['next'] - 1} of {n}")
    return out


def start_continuous(producers, sock: str, tags: list[str], **client) -> dict[str, subprocess.Popen]:
    client = {"segment_size": SEGMENT_SIZE, "segments": SEGMENTS, **client}
    procs = {tag: producers({"socket": sock, "stream": "app", "tag": tag, "mode": "continuous", "client": client},
                            stdin=subprocess.PIPE) for tag in tags}
    for tag, p in procs.items():
        assert read_line(p, 60, f"producer {tag} ready") == "ready"
    return procs


def all_writing(d: Daemon, procs: dict[str, subprocess.Popen]) -> bool:
    """Every producer process has a connection to ``d`` over which batches have landed."""
    pids = {p["pid"] for p in d.status()["producers"] if p["batches"] > 0}
    return all(p.pid in pids for p in procs.values())


def grows(path: Path, by: int):
    base = path.stat().st_size
    return lambda: path.stat().st_size >= base + by


class TestDaemonCrashUnderLoad:
    def test_six_producers_lose_nothing_across_three_sigkills(self, daemon, producers):
        """6 producers writing flat out while the daemon is SIGKILLed and restarted 3 times: every record lands,
        and every duplicate is a contiguous replay of what was in flight (at most the arena) at a crash."""
        d = daemon("io_uring")
        tags = [f"p{i}" for i in range(PRODUCERS)]
        procs = start_continuous(producers, d.sock, tags)
        log = d.log("app")
        for _ in range(CRASHES):
            # Every producer is connected to this daemon and has batches in flight when it dies.
            wait_for(lambda: all_writing(d, procs), 60, "every producer to write to this daemon")
            wait_for(grows(log, 2 << 20), 60, "the producers to write 2 MB more")
            sigkill(d)
            time.sleep(0.3)  # producers fill their arenas meanwhile and wait
            restart(d)
        wait_for(lambda: all_writing(d, procs), 60, "every producer to write to the last daemon")
        results = {tag: finish_producer(p, timeout=180, input=b"") for tag, p in procs.items()}
        report = replay(log, {tag: r["count"] for tag, r in results.items()})
        arena_bytes = SEGMENTS * (SEGMENT_SIZE - 32)
        print({tag: (r["count"], r["reconnects"], r["resent_batches"], report[tag]["dup_records"], report[tag]["dup_runs"])
               for tag, r in results.items()})
        for tag, r in results.items():
            s = report[tag]
            assert s["lost"] == 0, "\n".join(s["bad"][:10])
            assert r["reconnects"] == CRASHES, f"{tag} reconnected {r['reconnects']} times for {CRASHES} crashes: {r}"
            assert s["dup_runs"] <= CRASHES, f"{tag}: {s['dup_runs']} replay runs for {CRASHES} crashes"
            assert s["longest_run_bytes"] <= arena_bytes, f"{tag}: a replay of {s['longest_run_bytes']} bytes is more than the arena"
            assert s["dup_records"] * 20 <= CRASHES * arena_bytes  # records are >= 20 bytes
            assert r["resent_batches"] >= 0 and r["dropped_records"] == 0

    def test_graceful_restart_loses_and_duplicates_nothing(self, daemon, producers):
        """SIGTERM + start under load: every record lands exactly once (SHUTDOWN drains and releases all)."""
        d = daemon("io_uring")
        tags = [f"g{i}" for i in range(3)]
        procs = start_continuous(producers, d.sock, tags)
        log = d.log("app")
        for _ in range(2):
            wait_for(grows(log, 1 << 20), 60, "the producers to write 1 MB more")
            assert d.terminate() == 0
            restart(d)
        wait_for(grows(log, 1 << 20), 60, "the producers to write on after the restart")
        results = {tag: finish_producer(p, timeout=180, input=b"") for tag, p in procs.items()}
        report = replay(log, {tag: r["count"] for tag, r in results.items()})
        for tag, r in results.items():
            assert report[tag]["lost"] == 0, "\n".join(report[tag]["bad"][:10])
            assert report[tag]["dup_records"] == 0, f"{tag}: {report[tag]['dup_records']} duplicates after a graceful restart"
            assert r["reconnects"] >= 1 and r["resent_batches"] == 0, r


class TestClientReconnect:
    def test_stats_count_the_reconnect_and_the_resent_batches(self, daemon):
        """Batches handed to a stopped daemon that is then killed are resent to the next one, and stats() says so."""
        d = daemon("readwrite")
        c = logsink.Client("app", socket=d.sock, segment_size=4096, segments=8, flush_interval=None)
        recs = make_records("s", 60)  # several 4 KiB batches
        d.sigstop()
        wait_for(lambda: proc_state(d.pid) == "T", 10, "the daemon to stop")
        for r in recs:
            c.write(r)
        tail = make_records("x", 2)  # stays in the current segment: not handed over before the crash
        c.write(b"".join(tail))
        handed, handed_bytes = c.stats()["handed_over_through"], c.stats()["bytes"]
        assert handed >= 2 and c.stats()["released_through"] == 0
        sigkill(d)
        d.stopped = False
        wait_for(lambda: not c.connected, 10, "the client to notice")
        restart(d)
        c.flush(timeout=30)
        st = c.stats()
        assert st["connected"] and c.connected
        assert st["reconnects"] == 1
        assert st["resent_batches"] == handed
        assert st["resent_bytes"] == handed_bytes
        assert st["disconnected_seconds"] > 0
        assert_file(d.log("app"), {"s": recs, "x": tail})
        c.close()

    def test_flush_while_disconnected_waits_for_the_restart(self, daemon):
        """flush() with the daemon gone waits for the reconnect and the releases, then returns."""
        d = daemon("readwrite")
        c = logsink.Client("app", socket=d.sock)
        c.write(b"before\n")
        c.flush(timeout=10)
        sigkill(d)
        c.write(b"during\n")
        threading.Timer(0.5, restart, (d,)).start()
        t0 = time.monotonic()
        c.flush(timeout=30)
        assert time.monotonic() - t0 >= 0.4
        assert d.log("app").read_bytes() == b"before\nduring\n"
        c.close()

    def test_flush_times_out_while_the_daemon_stays_away(self, daemon):
        """flush() is bounded by its timeout when no daemon comes back; the records stay queued for a later one."""
        d = daemon("readwrite")
        c = logsink.Client("app", socket=d.sock)
        c.write(b"a\n")
        c.flush(timeout=10)
        sigkill(d)
        c.write(b"b\n")
        with pytest.raises(TimeoutError):
            c.flush(timeout=0.5)
        restart(d)
        c.flush(timeout=30)
        assert d.log("app").read_bytes() == b"a\nb\n"
        c.close()

    def test_full_arena_drops_and_counts_while_disconnected(self, daemon):
        """With the daemon away and on_full='drop', writes past the arena are dropped and counted, never raised."""
        d = daemon("readwrite")
        c = logsink.Client("app", socket=d.sock, segment_size=4096, segments=2, on_full="drop", flush_interval=None)
        sigkill(d)
        wait_for(lambda: not c.connected, 10, "the client to notice")
        recs = make_records("d", 200)
        for r in recs:
            c.write(r)
        dropped = c.stats()["dropped_records"]
        assert dropped > 0
        restart(d)
        c.flush(timeout=30)
        lines = d.log("app").read_bytes().splitlines(keepends=True)
        assert len(lines) == len(recs) - dropped and lines == recs[: len(lines)]
        c.close()

    def test_full_arena_blocks_up_to_timeout_while_disconnected(self, daemon):
        """With the daemon away and on_full='block', a write past the arena raises TimeoutError after `timeout`."""
        d = daemon("readwrite")
        c = logsink.Client("app", socket=d.sock, segment_size=4096, segments=2, timeout=0.5, flush_interval=None)
        sigkill(d)
        with pytest.raises(TimeoutError):
            for r in make_records("b", 500):
                c.write(r)
        restart(d)
        c.flush(timeout=30)
        assert c.connected
        c.close()

    def test_reconnect_false_keeps_fail_fast(self, daemon):
        """reconnect=False: once the daemon is gone every call raises ConnectionError, even after a restart."""
        d = daemon("readwrite")
        c = logsink.Client("app", socket=d.sock, reconnect=False, segment_size=4096, segments=2)
        c.write(b"x\n")
        c.flush(timeout=10)
        sigkill(d)
        wait_for(lambda: not c.connected, 10, "the client to see the daemon go")
        restart(d)
        time.sleep(0.3)  # a reconnecting client would be back by now
        assert not c.connected
        with pytest.raises(ConnectionError):
            for _ in range(2000):
                c.write(b"y" * 100 + b"\n")
            c.flush(timeout=5)
        c.close()

    def test_tcp_producer_reconnects_and_resends(self, daemon):
        """A TCP (zerocopy) producer rides out a daemon SIGKILL + restart on the same port: every record lands."""
        port = free_port()
        d = daemon("readwrite", "--listen", f"tcp://127.0.0.1:{port}")
        wait_for(lambda: socket.create_connection(("127.0.0.1", port), timeout=1).close() or True, START_TIMEOUT, "tcp")
        c = logsink.Client("app", address=f"tcp://127.0.0.1:{port}", segment_size=64 << 10, segments=4)
        assert c.transport == "zerocopy"
        first = make_records("t", 3000)
        for r in first:
            c.write(r)
        c.flush(timeout=10)
        d.sigstop()
        wait_for(lambda: proc_state(d.pid) == "T", 10, "the daemon to stop")
        second = make_records("t", 1000, start=3000)  # less than the arena: the stopped daemon releases nothing
        for r in second:
            c.write(r)
        sigkill(d)
        d.stopped = False
        restart(d)
        c.flush(timeout=30)
        st = c.stats()
        assert st["reconnects"] == 1 and st["connected"]
        assert_file(d.log("app"), {"t": first + second})
        c.close()


class TestAsyncClientReconnect:
    def test_async_client_survives_a_restart(self, daemon):
        """An AsyncClient keeps taking records across a daemon SIGKILL + restart and flushes them all."""
        d = daemon("readwrite")

        async def main() -> list[bytes]:
            recs = make_records("a", 4000)
            async with logsink.AsyncClient("app", socket=d.sock, segment_size=16384, segments=4) as c:
                for r in recs[:2000]:
                    await c.write(r)
                await c.flush(timeout=10)
                loop = asyncio.get_running_loop()
                await loop.run_in_executor(None, sigkill, d)
                # More than the arena holds: the writes wait (on the loop, never blocking it) for the restart.
                back = loop.run_in_executor(None, lambda: (time.sleep(0.5), restart(d)))
                for r in recs[2000:]:
                    await c.write(r)
                await back
                await c.flush(timeout=30)
                assert c.stats()["reconnects"] == 1
            return recs

        recs = asyncio.run(main())
        assert_file(d.log("app"), {"a": recs})


class TestSmallerDaemon:
    def test_record_in_the_current_segment_too_big_for_the_new_daemon_is_said(self, daemon, tmp_path):
        """A record still in the client's current segment that the restarted daemon's smaller max_batch cannot take: the reconnect is refused with the reason (the record's size), and flush() fails instead of hanging silently."""
        import logsink

        d = daemon("readwrite")
        c = logsink.Client("big", socket=d.sock, transport="vmsplice", flush_interval=None, timeout=3)
        c.write(b"x" * (200 << 10) + b"\n")  # stays in the current segment: no flush yet
        sigkill(d)  # (a SIGTERM would have the client hand it over to the old daemon first)
        cfg = tmp_path / "small.toml"
        cfg.write_text(f"max_batch = {64 << 10}\n")
        d.cmd += ["--config", str(cfg)]
        restart(d)
        with pytest.raises((TimeoutError, OSError)):
            c.flush(timeout=3)
        from logsink._native import ffi, lib

        wait_for(lambda: "does not fit" in ffi.string(lib.ls_producer_last_error(c._p)).decode(), 15,
                 "the client to say the waiting record does not fit")
        c.close(timeout=1)
