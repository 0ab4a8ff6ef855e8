"""--metrics: the daemon's status in Prometheus text format, scraped over HTTP like a Prometheus server would."""

from __future__ import annotations

import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

import logsink


def scrape(address: str, path: str = "/metrics") -> dict[str, dict[tuple, float]]:
    """GET the metrics; returns {sample name: {sorted label items: value}}."""
    url = "http://" + address.removeprefix("tcp://") + path
    with urllib.request.urlopen(url, timeout=30) as resp:
        assert resp.headers["Content-Type"].startswith("text/plain; version=")  # the exposition format
        text = resp.read().decode()
    out: dict[str, dict[tuple, float]] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


class TestMetrics:
    def test_scrape_matches_status(self, daemon):
        """Per-stream bytes/records/batches/file size, engine bytes by path, producers by transport and errors by code equal what status says."""
        d = daemon("io_uring", "--metrics", "tcp://127.0.0.1:0")
        st0 = d.status()
        addr = st0["metrics"]
        assert addr and addr.startswith("tcp://127.0.0.1:")
        with logsink.Client("web", socket=d.sock, transport="shm") as a, logsink.Client("db", socket=d.sock, transport="vmsplice") as b:
            for i in range(500):
                a.write(b"web %d\n" % i)
                b.write(b"db %d\n" % i)
            a.flush(timeout=10)
            b.flush(timeout=10)
            m = scrape(addr)
            st = d.status()
        for stream in ("web", "db"):
            s = st["streams"][stream]
            key = (("stream", stream),)
            assert m["logsink_stream_bytes_total"][key] == s["bytes"] > 0
            assert m["logsink_stream_records_total"][key] == s["records"] == 500
            assert m["logsink_stream_batches_total"][key] == s["batches"]
            assert m["logsink_stream_file_size_bytes"][key] == s["size"] == d.log(stream).stat().st_size
        assert m["logsink_engine_bytes_total"][(("how", "shared"),)] == st["totals"]["bytes_shared"] > 0
        assert m["logsink_engine_bytes_total"][(("how", "spliced"),)] == st["totals"]["bytes_spliced"] > 0
        assert m["logsink_producers"] == {(("transport", "shm"),): 1, (("transport", "vmsplice"),): 1}
        assert m["logsink_errors_total"][(("code", "bad-frame"),)] == 0
        assert m["logsink_info"][(("engine", "io_uring"), ("shm_path", st["shm_path"]), ("version", st["version"]))] == 1
        assert m["logsink_releases_total"][(("by", "engine"),)] == st["releases"]["engine"] > 0
        assert sum(m["logsink_producer_pipes"].values()) == 2

    def test_other_paths_are_404(self, daemon):
        """Only /metrics answers; anything else is a 404, and the daemon keeps serving."""
        d = daemon("readwrite", "--metrics", "tcp://127.0.0.1:0")
        addr = d.status()["metrics"]
        with pytest.raises(urllib.error.HTTPError) as err:
            scrape(addr, "/")
        assert err.value.code == 404
        assert "logsink_errors_total" in scrape(addr)

    def test_metrics_off_by_default(self, daemon):
        """Without --metrics nothing listens and status says metrics is None."""
        d = daemon("readwrite")
        assert d.status()["metrics"] is None
