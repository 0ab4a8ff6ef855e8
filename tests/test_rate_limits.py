"""Rate limits that never drop silently: what goes over a limit is dropped whole, counted, told to the producer, and said in the stream."""

from __future__ import annotations

import json

import pytest
from lsk_helpers import ENGINES, wait_for

import logsink
from logsink.config import load
from logsink.errors import ConfigError


def _config(tmp_path, text: str) -> str:
    path = tmp_path / "limits.toml"
    path.write_text(text)
    return str(path)


def _split(data: bytes) -> tuple[list[bytes], list[dict]]:
    """A stream file's producer records and its suppressed lines (parsed)."""
    records, notes = [], []
    for line in data.splitlines(keepends=True):
        assert line.endswith(b"\n"), f"torn line {line!r}"
        if line.startswith(b'{"logsink":"suppressed"'):
            notes.append(json.loads(line))
        else:
            records.append(line)
    return records, notes


def _burst(d, stream: str, n: int, transport: str = "vmsplice", per_batch: int = 500) -> dict:
    """Write n records to ``stream`` in batches of per_batch (each flushed), as fast as it goes; return stats()."""
    with logsink.Client(stream, socket=d.sock, transport=transport, flush_interval=None) as c:
        for i in range(n):
            c.write(b"%s %06d\n" % (stream.encode(), i))
            if (i + 1) % per_batch == 0:
                c.flush(timeout=30)  # a suppressed batch is released: flush() does not fail
        c.flush(timeout=30)
        return c.stats()


class TestProducerLimit:
    @pytest.mark.parametrize("engine", ENGINES)
    @pytest.mark.parametrize("transport", ["vmsplice", "shm"])
    def test_excess_is_dropped_whole_counted_and_said_in_the_stream(self, daemon, tmp_path, engine, transport):
        """Over rate_records the excess batches are dropped whole; the producer's stats, status and the stream's suppressed lines all count exactly what the file lacks."""
        d = daemon(engine, "--config", _config(tmp_path, "[stream.lim]\nrate_records = 1000\n"))
        n = 20000
        st = _burst(d, "lim", n, transport)
        assert st["suppressed_records"] > 0 and st["suppressed_batches"] > 0
        wait_for(lambda: sum(x["records"] for x in _split(d.log("lim").read_bytes())[1]) == st["suppressed_records"], 30,
                 "the suppressed lines to account for every dropped record")
        records, notes = _split(d.log("lim").read_bytes())
        assert len(records) + st["suppressed_records"] == n  # nothing lost silently
        assert records == sorted(records) and len(set(records)) == len(records)  # whole batches, in order, once
        for note in notes:
            assert note["stream"] == "lim" and note["records"] > 0 and note["bytes"] > 0 and note["window_s"] == 1.0
            assert set(note) == {"logsink", "records", "bytes", "producer", "pid", "uid", "stream", "window_s"}
        status = d.status()
        assert status["streams"]["lim"]["suppressed_records"] == st["suppressed_records"]
        assert status["suppressed_lines"] == len(notes)

    def test_unlimited_stream_beside_a_limited_one_loses_nothing(self, daemon, tmp_path):
        """A limit on one stream leaves another stream of the same daemon untouched."""
        d = daemon("io_uring", "--config", _config(tmp_path, "[stream.lim]\nrate_records = 100\n"))
        st_free = _burst(d, "free", 5000)
        st_lim = _burst(d, "lim", 5000)
        assert st_free["suppressed_records"] == 0 and st_lim["suppressed_records"] > 0
        records, notes = _split(d.log("free").read_bytes())
        assert len(records) == 5000 and notes == []

    def test_limit_in_bytes(self, daemon, tmp_path):
        """rate_bytes limits by payload bytes the same way."""
        d = daemon("splice", "--config", _config(tmp_path, "rate_bytes = 20000\n"))
        st = _burst(d, "b", 10000)
        assert st["suppressed_records"] > 0
        wait_for(lambda: sum(x["records"] for x in _split(d.log("b").read_bytes())[1]) == st["suppressed_records"], 30,
                 "the suppressed lines")
        assert len(_split(d.log("b").read_bytes())[0]) + st["suppressed_records"] == 10000


class TestUidLimit:
    def test_producers_of_one_uid_share_the_uid_limit(self, daemon, tmp_path):
        """uid_rate_records is shared by every producer of the uid on that stream: the second producer starts with the first one's bucket drained."""
        d = daemon("io_uring", "--config", _config(tmp_path, "[stream.u]\nuid_rate_records = 2000\n"))
        with logsink.Client("u", socket=d.sock, flush_interval=None) as a, logsink.Client("u", socket=d.sock, flush_interval=None) as b:
            for i in range(10000):
                a.write(b"a %06d\n" % i)
                b.write(b"b %06d\n" % i)
                if (i + 1) % 500 == 0:
                    a.flush(timeout=30)
                    b.flush(timeout=30)
            a.flush(timeout=30)
            b.flush(timeout=30)
            sa, sb = a.stats(), b.stats()
            ids = {a.producer_id, b.producer_id}
        assert sa["suppressed_records"] > 0 and sb["suppressed_records"] > 0
        wait_for(lambda: sum(x["records"] for x in _split(d.log("u").read_bytes())[1]) == sa["suppressed_records"] + sb["suppressed_records"],
                 30, "the suppressed lines of both producers")
        records, notes = _split(d.log("u").read_bytes())
        assert len([r for r in records if r.startswith(b"a ")]) + sa["suppressed_records"] == 10000
        assert len([r for r in records if r.startswith(b"b ")]) + sb["suppressed_records"] == 10000
        assert {n["producer"] for n in notes} == ids


class TestConfig:
    @pytest.mark.parametrize("text", ["rate_bytes = -1\n", "[stream.x]\nrate_records = \"fast\"\n", "uid_rate_records = true\n"])
    def test_bad_limit_is_a_config_error(self, tmp_path, text):
        """A negative, non-numeric or boolean limit is refused at load, naming the key."""
        with pytest.raises(ConfigError, match="rate_"):
            load(_config(tmp_path, text), {})

    def test_stream_table_overrides_the_top_level(self, tmp_path):
        """[stream.NAME] limits win over the top level's, key by key."""
        cfg = load(_config(tmp_path, "rate_bytes = 5\nrate_records = 7\n[stream.x]\nrate_records = 9\n"), {})
        assert tuple(cfg.stream_limits("x")) == (5, 9, 0, 0)
        assert tuple(cfg.stream_limits("y")) == (5, 7, 0, 0)
