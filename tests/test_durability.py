"""Durability: the fsync policy per stream decides what a RELEASE (and so flush()) promises."""

from __future__ import annotations

import subprocess
import sys

import pytest
from lsk_helpers import ENGINES, assert_file, make_records, wait_for

import logsink


def _write(d, stream: str, tag: str, n: int, batches: int) -> None:
    """``n`` records in ``batches`` flushes (each flush hands over at least one batch)."""
    with logsink.Client(stream, socket=d.sock, segment_size=64 << 10) as c:
        per = n // batches
        for b in range(batches):
            for rec in make_records(tag, per, start=b * per):
                c.write(rec)
            c.flush(timeout=20)


class TestFsyncBatch:
    @pytest.mark.parametrize("engine", ENGINES)
    def test_every_released_batch_was_synced_first(self, daemon, engine):
        """With fsync=batch a flush returns only after an fdatasync covered its batches: syncs == batches at that moment."""
        d = daemon(engine, "--fsync", "batch")
        with logsink.Client("app", socket=d.sock, segment_size=64 << 10) as c:
            for b in range(5):
                for rec in make_records("a", 400, start=b * 400):
                    c.write(rec)
                c.flush(timeout=20)
                st = d.status()["streams"]["app"]
                assert st["fsync"] == "batch"
                assert st["syncs"] == st["batches"] >= b + 1, st
        assert_file(d.log("app"), {"a": make_records("a", 2000)})

    def test_default_never_syncs(self, daemon):
        """The default (never) releases from the page cache and makes no fdatasync."""
        d = daemon("io_uring")
        _write(d, "app", "a", 1000, 4)
        st = d.status()["streams"]["app"]
        assert st["fsync"] == "never" and st["syncs"] == 0 and st["batches"] >= 4


class TestFsyncPerStream:
    def test_stream_table_overrides_the_default(self, daemon, tmp_path):
        """A [stream.NAME] fsync setting applies to that stream only, and turns no access rules on."""
        cfg = tmp_path / "c.toml"
        cfg.write_text('fsync = "never"\n[stream.audit]\nfsync = "batch"\n')
        d = daemon("splice", "--config", str(cfg))
        _write(d, "audit", "u", 600, 3)
        _write(d, "app", "a", 600, 3)
        st = d.status()["streams"]
        assert st["audit"]["syncs"] == st["audit"]["batches"] >= 3
        assert st["app"]["syncs"] == 0

    def test_interval_syncs_a_stream_that_grew(self, daemon):
        """fsync=interval fdatasyncs a stream that was written to, within a few periods."""
        d = daemon("readwrite", "--fsync", "interval", "--fsync-interval", "0.2")
        _write(d, "app", "a", 500, 1)
        wait_for(lambda: d.status()["streams"]["app"]["syncs"] >= 1, 20, "an interval fdatasync")
        assert_file(d.log("app"), {"a": make_records("a", 500)})


class TestFsyncConfig:
    @pytest.mark.parametrize("toml, message", [
        ('fsync = "always"\n', "fsync must be one of never, batch, interval"),
        ('fsync_interval = 0\n', "fsync_interval must be a number of seconds"),
        ('[stream.app]\nfsync = "sometimes"\n', "stream.app.fsync must be one of"),
    ])
    def test_bad_policy_is_a_clear_config_error(self, tmp_path, toml, message):
        """An unknown policy or a bad interval stops `logsink serve` with exit 2 and names the setting."""
        cfg = tmp_path / "c.toml"
        cfg.write_text(toml)
        res = subprocess.run([sys.executable, "-m", "logsink", "serve", "--config", str(cfg), "--dir", str(tmp_path / "l"),
                              "--socket", str(tmp_path / "s.sock")], capture_output=True, timeout=30)
        assert res.returncode == 2
        assert message in res.stderr.decode()
