"""SIGTERM: the daemon drains and exits 0, losing nothing that a producer's write() accepted."""

from __future__ import annotations

import signal
import subprocess
import time

import pytest
from conftest import finish_producer
from lsk_helpers import ENGINES, assert_file, make_records, read_line, record, wait_for


class TestSigtermDrain:
    @pytest.mark.parametrize(
        "engine,transport",
        [(e, "vmsplice") for e in ENGINES] + [("splice", "copy")],
        ids=[*ENGINES, "splice-copy"],
    )
    def test_sigterm_mid_run_loses_no_accepted_record(self, daemon, producers, engine, transport):
        """Producers writing flat out while the daemon gets SIGTERM: exit 0, and every accepted record is in the file, in order."""
        d = daemon(engine, "--shutdown-grace", "5")
        busy = {
            tag: producers({"socket": d.sock, "stream": "app", "tag": tag, "mode": "until-error",
                            "ready_after": 2000, "max_seconds": 60,
                            "client": {"transport": transport, "reconnect": False}})  # fail fast: see when it went
            for tag in ("w0", "w1")
        }
        idle = producers({"socket": d.sock, "stream": "app", "tag": "f0", "mode": "flush-then-wait", "count": 5000},
                         stdin=subprocess.PIPE)
        for p in busy.values():
            assert read_line(p, 30, "'ready'") == "ready"
        assert read_line(idle, 30, "'flushed'") == "flushed"
        # let the busy producers get well into their run so the pipes and arenas are full when SIGTERM hits
        start = d.log("app").stat().st_size
        wait_for(lambda: d.log("app").stat().st_size > start + (8 << 20), 30, "8 MiB more in the file")
        d.proc.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        rc = d.proc.wait(30)
        assert rc == 0, f"daemon exited {rc} after SIGTERM; stderr:\n{d.stderr()}"
        results = {tag: finish_producer(p, timeout=90) for tag, p in busy.items()}
        finish_producer(idle, timeout=30, input=b"")

        for tag, res in results.items():
            assert res["error"] is not None, f"producer {tag} never saw the daemon go away: {res}"
            assert res["is_connection_error"], f"producer {tag} got {res['error']}: {res['message']} (expected ConnectionError)"
        groups = assert_file(
            d.log("app"),
            {"f0": make_records("f0", 5000)},
            prefix_of={tag: (lambda i, tag=tag: record(tag, i)) for tag in busy},
        )
        for tag, res in results.items():
            landed = len(groups.get(tag, []))
            assert landed >= res["accepted"], (
                f"producer {tag}: {res['accepted']} writes returned but only {landed} records are in the file"
            )
            assert landed <= res["accepted"] + 1, f"producer {tag}: {landed} records landed but only {res['accepted']} writes returned"
            assert res["accepted"] > 2000
        assert time.monotonic() - t0 < 30

    def test_sigterm_with_flushed_idle_producer_keeps_everything(self, daemon):
        """A producer that wrote and flush()ed before SIGTERM has all its records in the file after exit 0."""
        import logsink

        d = daemon("io_uring", "--shutdown-grace", "2")
        c = logsink.Client("app", socket=d.sock, timeout=10, reconnect=False)
        recs = make_records("q", 30_000)
        for r in recs:
            c.write(r)
        c.flush(timeout=20)
        rc = d.terminate()
        assert rc == 0, d.stderr()
        assert_file(d.log("app"), {"q": recs})
        with pytest.raises(ConnectionError):
            for r in make_records("q", 10_000, start=30_000):
                c.write(r)
            c.flush(timeout=10)
        try:
            c.close()
        except ConnectionError:
            pass

    def test_sigint_also_drains_and_exits_zero(self, daemon):
        """SIGINT is handled like SIGTERM: exit 0 with flushed records in the file."""
        import logsink

        d = daemon("splice")
        with logsink.Client("app", socket=d.sock) as c:
            recs = make_records("i", 1000)
            for r in recs:
                c.write(r)
            c.flush(timeout=20)
        d.proc.send_signal(signal.SIGINT)
        assert d.proc.wait(30) == 0, d.stderr()
        assert_file(d.log("app"), {"i": recs})

    def test_new_producer_after_shutdown_is_refused(self, daemon):
        """Once the daemon has stopped, a new Client raises ConnectionError."""
        import logsink

        d = daemon("readwrite")
        assert d.terminate() == 0, d.stderr()
        with pytest.raises(ConnectionError):
            logsink.Client("app", socket=d.sock)
