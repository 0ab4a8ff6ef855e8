"""End to end: records written by several producer processes land byte-exact in the stream file."""

from __future__ import annotations

import pytest
from conftest import finish_producer
from lsk_helpers import ENGINES, assert_file, make_records

N_RECORDS = 100_000
STATS_KEYS = {
    "transport", "segment_size", "segments", "pipe_size", "batches", "records", "bytes",
    "dropped_records", "released_through", "pinned_segments", "failed_batches",
}


def run_and_check(d, producers, stream, n_producers, n_records, client_kw):
    procs = {
        f"p{i}": producers({
            "socket": d.sock, "stream": stream, "tag": f"p{i}", "mode": "count",
            "count": n_records, "client": client_kw,
        })
        for i in range(n_producers)
    }
    stats = {tag: finish_producer(p, timeout=180) for tag, p in procs.items()}
    expected = {tag: make_records(tag, n_records) for tag in procs}
    assert_file(d.log(stream), expected)
    total_bytes = sum(len(r) for recs in expected.values() for r in recs)
    for tag, st in stats.items():
        assert STATS_KEYS <= set(st), f"stats() lacks {STATS_KEYS - set(st)}"
        assert st["records"] == n_records, st
        assert st["bytes"] == sum(len(r) for r in expected[tag]), st
        assert st["dropped_records"] == 0 and st["failed_batches"] == 0, st
        assert st["released_through"] == st["batches"], f"flush() returned before every batch was released: {st}"
        assert st["pinned_segments"] == 0, st
    return stats, total_bytes


class TestByteExact:
    @pytest.mark.parametrize("engine", ENGINES)
    def test_four_producers_land_byte_exact(self, daemon, producers, engine):
        """4 processes x 100k records through one stream: the file is exactly their union, each in order, on every engine."""
        d = daemon(engine)
        stats, total_bytes = run_and_check(d, producers, "app", 4, N_RECORDS, {})
        assert d.log("app").stat().st_size == total_bytes
        st = d.status()
        assert st["engine"] == engine
        assert st["streams"]["app"]["records"] == 4 * N_RECORDS
        assert st["streams"]["app"]["bytes"] == total_bytes
        assert st["totals"]["records"] == 4 * N_RECORDS
        assert st["totals"]["bytes"] == total_bytes
        assert st["totals"]["batches"] == sum(s["batches"] for s in stats.values())
        assert st["totals"]["header_bytes"] >= 32 * st["totals"]["batches"]
        assert not any(st["errors"].values()), st["errors"]

    def test_copy_transport_lands_byte_exact(self, daemon, producers):
        """The copy transport (write(2) into the pipe) gives the same byte-exact file."""
        d = daemon("splice")
        stats, _ = run_and_check(d, producers, "app", 4, N_RECORDS, {"transport": "copy"})
        assert {s["transport"] for s in stats.values()} == {"copy"}

    def test_producers_on_separate_streams_get_separate_files(self, daemon, producers):
        """Two streams written at once each get exactly their own producers' records."""
        d = daemon("io_uring")
        procs = {
            tag: producers({"socket": d.sock, "stream": stream, "tag": tag, "mode": "count", "count": 20_000})
            for tag, stream in (("a0", "alpha"), ("a1", "alpha"), ("b0", "beta"))
        }
        for p in procs.values():
            finish_producer(p)
        assert_file(d.log("alpha"), {"a0": make_records("a0", 20_000), "a1": make_records("a1", 20_000)})
        assert_file(d.log("beta"), {"b0": make_records("b0", 20_000)})


class TestSegmentReuse:
    @pytest.mark.parametrize("engine", ENGINES)
    def test_small_arena_reused_under_load_stays_byte_exact(self, daemon, producers, engine):
        """With 4 segments of 4 KiB, 2 x 100k records force thousands of segment reuses and the file is still exact."""
        d = daemon(engine)
        kw = {"segments": 4, "segment_size": 4096}
        stats, _ = run_and_check(d, producers, "app", 2, N_RECORDS, kw)
        for _tag, st in stats.items():
            assert st["segments"] == 4 and st["segment_size"] == 4096, st
            # each batch fits one 4 KiB segment, so the batches are at least bytes/4096: far above 4
            assert st["batches"] >= st["bytes"] // 4096, st
            assert st["batches"] > 100 * st["segments"], f"segments were not reused: {st}"


class TestRestart:
    def test_restarted_daemon_appends_to_existing_file(self, daemon):
        """A second daemon on the same directory appends after what the first one wrote."""
        import logsink

        first = daemon("io_uring")
        a = make_records("r0", 5000)
        with logsink.Client("app", socket=first.sock) as c:
            for r in a:
                c.write(r)
            c.flush(timeout=20)
        assert first.terminate() == 0, first.stderr()
        second = daemon("readwrite", log_dir=first.dir)
        b = make_records("r1", 5000)
        with logsink.Client("app", socket=second.sock) as c:
            for r in b:
                c.write(r)
            c.flush(timeout=20)
        assert second.log("app").read_bytes() == b"".join(a + b)

    def test_torn_tail_is_cut_before_appending(self, daemon, tmp_path):
        """A file left ending in a partial line (a crash) is cut back to its last newline before new records land."""
        import logsink

        logs = tmp_path / "prelogs"
        logs.mkdir()
        (logs / "app.log").write_bytes(b"old:1:complete\nold:2:comp")
        d = daemon("splice", log_dir=logs)
        recs = make_records("new", 100)
        with logsink.Client("app", socket=d.sock) as c:
            for r in recs:
                c.write(r)
            c.flush(timeout=20)
        assert d.log("app").read_bytes() == b"old:1:complete\n" + b"".join(recs)
