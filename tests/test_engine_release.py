"""The engine answers landed batches itself (RELEASE from the engine thread, no asyncio turn), without ever reordering a failure.

docs/architecture.md "Who sends RELEASE" says why: a flush() waited for the daemon's asyncio loop
before. The rules tested here: a local producer's RELEASEs come from the engine; a failed batch's
RELEASE (which carries the failure) is the daemon's and comes before any RELEASE that covers it; the
daemon's own messages on the same socket never interleave with the engine's.
"""

from __future__ import annotations

import pytest
from lsk_helpers import ENGINES, RawProducer, make_records, protocol
from test_write_failure import limited_daemon  # noqa: F401 (fixture)

import logsink


class TestEngineSendsRelease:
    @pytest.mark.parametrize("engine", ENGINES)
    def test_local_producer_is_released_by_the_engine(self, daemon, engine):
        """Every flush of a local Client is answered by the engine's own RELEASE; the daemon sends none while nothing fails."""
        d = daemon(engine)
        with logsink.Client("app", socket=d.sock) as c:
            for i in range(50):
                c.write(b"rec %d\n" % i)
                c.flush(timeout=10)
            st = d.status()
        assert st["releases"]["engine"] >= 50 and st["releases"]["daemon"] == 0, st["releases"]
        assert d.log("app").read_bytes() == b"".join(b"rec %d\n" % i for i in range(50))

    def test_shm_producer_is_released_by_the_engine(self, daemon):
        """The engine answers shm batches as well (RawProducer: the RELEASE frames decode as protocol.release)."""
        d = daemon("io_uring")
        p = RawProducer(d.sock)
        p.hello_shm("app")
        p.expect_welcome()
        for seq in range(1, 11):
            p.send_shm_batch(make_records("r", 5, start=seq * 5), seq, offset=(seq % 2) * 4096)
            p.wait_release(seq)
        st = d.status()
        p.close()
        assert st["releases"]["engine"] >= 10 and st["releases"]["daemon"] == 0, st["releases"]

    def test_tcp_producer_is_released_by_the_daemon(self, daemon):
        """Over TCP the daemon still answers (a TCP send can be partial; the engine never leaves half a frame)."""
        d = daemon("io_uring", "--listen", "tcp://127.0.0.1:0")
        addr = d.status()["listen"][0]
        with logsink.Client("tcp", address=addr) as c:
            for i in range(5):
                c.write(b"t %d\n" % i)
                c.flush(timeout=10)
        st = d.status()
        assert st["releases"]["daemon"] >= 5 and st["releases"]["engine"] == 0, st["releases"]


class TestFailureComesFirst:
    @pytest.mark.parametrize("engine", ENGINES)
    def test_failed_batch_is_reported_before_any_release_that_covers_it(self, limited_daemon, engine):  # noqa: F811
        """Batch 2 is refused by the file (size limit) and batch 3 lands: the first RELEASE that covers seq 2 names it failed, even though the engine landed batch 3 on its own."""
        sock, path = limited_daemon(engine)
        p = RawProducer(sock)
        p.hello("big")
        p.expect_welcome()
        p.send_batch([b"a" * 999 + b"\n"] * 40, 1)  # 40 000 bytes: lands
        p.send_batch([b"b" * 999 + b"\n"] * 30, 2)  # would end at 70 000 > 65 536: refused, cut back
        p.send_batch([b"c" * 99 + b"\n"] * 10, 3)  # 1 000 bytes: lands
        first_cover = None
        while p.released < 3:
            msg = p.next_message()
            assert msg is not None and msg["t"] == protocol.RELEASE, msg
            if first_cover is None and msg["through"] >= 2:
                first_cover = msg
        assert first_cover is not None and [f[0] for f in first_cover.get("failed", [])] == [2], first_cover
        p.close()
        assert path.read_bytes() == b"a" * 999 + b"\n" + (b"a" * 999 + b"\n") * 39 + (b"c" * 99 + b"\n") * 10


class TestHoldRaces:
    @pytest.mark.parametrize("engine", ["io_uring", "splice"])
    def test_release_never_overtakes_a_suppression(self, daemon, tmp_path, engine):
        """Under a stream of tiny batches over a rate limit, every suppressed seq is told in the first RELEASE whose through covers it: the engine's hold is not cleared while another suppression waits in its event queue, nor while the daemon's RELEASE sits unsent (from an independent review's repro)."""
        import threading

        cfg = tmp_path / "limit.toml"
        cfg.write_text("rate_records = 20000\n")
        d = daemon(engine, "--config", str(cfg))
        rp = RawProducer(d.sock, timeout=30)
        rp.hello("s")
        rp.expect_welcome()
        n = 100000
        msgs: list[dict] = []

        def reader() -> None:
            while True:
                m = rp.next_message(timeout=30)
                if m is None:
                    return
                msgs.append(m)
                if m["t"] == protocol.RELEASE and m["through"] >= n:
                    return

        t = threading.Thread(target=reader)
        t.start()
        frames = [protocol.pack_frame_header(2, 1, seq) + b"x\n" for seq in range(1, n + 1)]
        for i in range(0, n, 200):
            rp.write_pipe(b"".join(frames[i:i + 200]))
        t.join(60)
        assert not t.is_alive(), "the daemon did not release every batch"
        through, bad, suppressed = 0, [], 0
        for m in msgs:
            if m["t"] != protocol.RELEASE:
                continue
            for seq, _ in m.get("suppressed", []):
                suppressed += 1
                if seq <= through:
                    bad.append((seq, through))
            through = max(through, m["through"])
        rp.close()
        assert suppressed > 0
        assert not bad, f"{len(bad)} suppressed seqs were covered by an earlier RELEASE that did not carry them: {bad[:5]}"
