"""The producer's write path: the lock-free single-writer fast path and the one-pass copy + count.

The thread that wrote last owns the current segment and appends to it without the lock; whoever
hands the segment over (the background thread's timed flush, flush(), another writer) takes it back
with membarrier(). These tests drive that from many threads at once (tests/c/fastpath_stress.c) and
check the output record by record; others check the record counts the copy loop computes.
"""

from __future__ import annotations

import os
import re
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from lsk_helpers import assert_file, build_shim, make_records

ROOT = Path(__file__).resolve().parent.parent
NATIVE = ROOT / "native"
STRESS_SRC = Path(__file__).resolve().parent / "c" / "fastpath_stress.c"
NATIVE_SRCS = ("ls_producer.c", "ls_producer_send.c", "ls_producer_msg.c", "ls_producer_conn.c", "ls_transport.c",
               "ls_msgpack.c", "ls_render.c", "ls_zerocopy.c")
RECORD = re.compile(rb"T(\d+):(\d{8}):x+\n")

# An LD_PRELOAD shim: membarrier() refused, as seccomp or an old kernel would.
NO_MEMBARRIER = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdarg.h>
#include <sys/syscall.h>
long syscall(long nr, ...)
{
    va_list ap;
    va_start(ap, nr);
    long a = va_arg(ap, long), b = va_arg(ap, long), c = va_arg(ap, long), d = va_arg(ap, long),
         e = va_arg(ap, long), f = va_arg(ap, long);
    va_end(ap);
    if (nr == SYS_membarrier) {
        errno = ENOSYS;
        return -1;
    }
    long (*real)(long, ...) = (long (*)(long, ...))dlsym(RTLD_NEXT, "syscall");
    return real(nr, a, b, c, d, e, f);
}
"""


def run_threads(*calls: Callable[[], object]) -> None:
    """Run every call on a thread of its own, all at once, and wait for them; fail with what any of
    them raised (an exception on a thread would otherwise only be printed)."""
    errs: list[BaseException] = []

    def guarded(fn: Callable[[], object]) -> None:
        try:
            fn()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errs.append(exc)

    ts = [threading.Thread(target=guarded, args=(fn,)) for fn in calls]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errs, errs


def rec_len(t: int, seq: int) -> int:
    """The length fastpath_stress.c gives record (t, seq), its newline included."""
    return 20 + (t * 1000003 + seq * 7919) % 281


@pytest.fixture(scope="module")
def stress(tmp_path_factory) -> Path:
    """fastpath_stress.c compiled with the native producer."""
    out = tmp_path_factory.mktemp("fastpath") / "fastpath_stress"
    cc = os.environ.get("CC") or "gcc"
    res = subprocess.run([cc, "-std=gnu11", "-O2", "-Wall", "-Wextra", "-Werror", f"-I{NATIVE}", "-o", str(out),
                          str(STRESS_SRC), *(str(NATIVE / n) for n in NATIVE_SRCS), "-lpthread"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, f"compiling {STRESS_SRC.name} failed:\n{res.stderr}"
    return out


def run_stress(stress: Path, sock: str, stream: str, threads: int, records: int, transport: str,
               interval_ms: int, env: dict[str, str] | None = None) -> tuple[int, int]:
    """Run the stress producer to its end; returns (records, batches) from its stats."""
    res = subprocess.run([str(stress), sock, stream, str(threads), str(records), transport, str(interval_ms)],
                         capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})})
    assert res.returncode == 0, f"fastpath_stress failed ({res.returncode}): {res.stdout}{res.stderr}"
    ok, nrec, batches = res.stdout.split()
    assert ok == "ok"
    return int(nrec), int(batches)


def check_stream(path: Path, threads: int, records: int) -> None:
    """Every record of every thread is in the file once, whole, and each thread's in its order."""
    data = path.read_bytes()
    assert data.endswith(b"\n")
    nxt = [0] * threads
    pos = 0
    while pos < len(data):
        m = RECORD.match(data, pos)
        assert m, f"not a whole record at byte {pos}: {data[pos:pos + 80]!r}"
        t, seq = int(m.group(1)), int(m.group(2))
        assert t < threads, f"unknown writer {t} at byte {pos}"
        assert seq == nxt[t], f"writer {t}: record {seq} where {nxt[t]} was due (lost, doubled or reordered)"
        assert m.end() - pos == rec_len(t, seq), f"record T{t}:{seq} is {m.end() - pos} bytes, not {rec_len(t, seq)}"
        nxt[t] += 1
        pos = m.end()
    assert nxt == [records] * threads, f"records per writer: {nxt}"


class TestThreadsSharingAHandle:
    @pytest.mark.parametrize("transport", ["vmsplice", "shm", "copy"])
    def test_writers_and_timed_handovers_lose_tear_and_reorder_nothing(self, daemon, stress, transport):
        """4 writer threads, a flusher thread and a 1 ms flush_interval on one handle: every record lands once, whole, in its writer's order."""
        d = daemon("io_uring")
        threads, records = 4, 40000
        nrec, batches = run_stress(stress, d.sock, "st", threads, records, transport, 1)
        assert nrec == threads * records
        assert batches > 100, "the stress should hand over many segments"
        check_stream(d.log("st"), threads, records)

    def test_one_writer_revoked_by_timed_handovers_keeps_every_record(self, daemon, stress):
        """One writer (the lock-free owner nearly always) under a 1 ms flush_interval: the output is exact."""
        d = daemon("io_uring")
        nrec, _ = run_stress(stress, d.sock, "one", 1, 150000, "vmsplice", 1)
        assert nrec == 150000
        check_stream(d.log("one"), 1, 150000)

    def test_without_membarrier_every_write_takes_the_lock_and_stays_exact(self, daemon, stress, tmp_path):
        """Where membarrier() is refused (seccomp, old kernels) nobody owns a segment lock-free and threads still share the handle safely."""
        shim = build_shim(tmp_path, "no_membarrier", NO_MEMBARRIER)
        d = daemon("io_uring")
        nrec, _ = run_stress(stress, d.sock, "nomb", 3, 20000, "vmsplice", 1, env={"LD_PRELOAD": shim})
        assert nrec == 60000
        check_stream(d.log("nomb"), 3, 20000)


class TestMixedCalls:
    def test_writes_and_native_json_records_from_two_threads_all_land_in_order(self, daemon):
        """One thread's write() (lock-free owner) and another's write_log_json (locked, takes the segment back): both sequences are whole and in order."""
        import json

        from logsink import Client

        d = daemon("io_uring")
        n = 20000
        plain = make_records("plain", n)
        c = Client("mixed", socket=d.sock, flush_interval=0.001)

        def writer():
            for r in plain:
                c.write(r)

        def logger():
            for i in range(n):
                assert c.write_log_json(1.7e9 + i, b"INFO", b"app", b"msg %08d" % i)

        try:
            run_threads(writer, logger)
            c.flush()
        finally:
            c.close()
        lines = d.log("mixed").read_bytes().splitlines(keepends=True)
        assert [ln for ln in lines if not ln.startswith(b"{")] == plain
        msgs = [json.loads(ln)["message"] for ln in lines if ln.startswith(b"{")]
        assert msgs == [f"msg {i:08d}" for i in range(n)]


class TestThreadsComingAndGoing:
    def test_threads_that_exit_while_owning_the_segment_hand_it_on_cleanly(self, daemon):
        """60 short-lived threads, 4 at a time, each writing then exiting (often still the segment's owner): every record lands once, in order."""
        from logsink import Client

        d = daemon("io_uring")
        recs = {f"w{i}": make_records(f"w{i}", 500) for i in range(60)}
        c = Client("churn", socket=d.sock, flush_interval=0.001)

        def writer(tag):
            def run():
                for r in recs[tag]:
                    c.write(r)
            return run

        try:
            tags = list(recs)
            for i in range(0, len(tags), 4):
                run_threads(*(writer(t) for t in tags[i:i + 4]))
            c.flush()
        finally:
            c.close()
        assert_file(d.log("churn"), recs)


class TestRecordCounts:
    @pytest.mark.parametrize("transport", ["vmsplice", "shm"])
    def test_counts_and_bytes_match_for_every_length_and_alignment(self, daemon, transport):
        """Writes of 1 to 300 bytes holding 1 to 9 records are copied byte for byte and counted exactly (the copy loop's tail)."""
        from logsink import Client

        d = daemon("io_uring")
        chunks, want = [], 0
        for n in range(1, 301):
            k = 1 + n % 9
            body = b"".join(bytes([65 + (i + n) % 26]) * ((n + i) % 40) + b"\n" for i in range(k))
            chunks.append(body)
            want += k
        c = Client("cnt", socket=d.sock, transport=transport)
        try:
            for ch in chunks:
                c.write(ch)
            c.flush()
            assert c.stats()["records"] == want
        finally:
            c.close()
        assert d.log("cnt").read_bytes() == b"".join(chunks)

    def test_a_newline_inside_a_write_counts_as_a_record(self, daemon):
        """A 64 KiB write of 200-byte records is counted as its records, not as one write."""
        from logsink import Client

        d = daemon("io_uring")
        chunk = (b"y" * 199 + b"\n") * 327
        c = Client("big", socket=d.sock)
        try:
            for _ in range(40):
                c.write(chunk)
            c.flush()
            assert c.stats()["records"] == 40 * 327
        finally:
            c.close()
        assert d.log("big").stat().st_size == 40 * len(chunk)
