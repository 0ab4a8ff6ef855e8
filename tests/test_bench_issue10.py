"""The issue-10 benchmarks (`logsink bench cpu|scaling|flush`): their output check, their handling of a
transport the client does not implement yet, and tiny end-to-end runs (seconds, not the real sizes)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from logsink_bench.blast import check_output  # noqa: E402
from logsink_bench.harness import BenchError, NotAvailable, percentile, run_rounds  # noqa: E402


def bench(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "logsink.bench", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


class TestCheckOutput:
    def test_whole_records_pass(self, tmp_path):
        """Records of the expected size, all there, pass the check."""
        (tmp_path / "bench.log").write_bytes(b"abcdefghi\n" * 1000)
        check_output(tmp_path, 1000, 10)

    def test_torn_record_is_caught_even_when_the_totals_match(self, tmp_path):
        """A record split by another one moves newlines off their slots: caught though bytes and lines add up."""
        good = b"abcdefghi\n"
        (tmp_path / "bench.log").write_bytes(good * 10 + b"abcd" + good + b"efghi\n" + good * 8)
        with pytest.raises(BenchError, match="not 20 whole records"):
            check_output(tmp_path, 20, 10)

    def test_lost_record_is_caught(self, tmp_path):
        """One record short is a failed run, not a slower one."""
        (tmp_path / "bench.log").write_bytes(b"abcdefghi\n" * 999)
        with pytest.raises(BenchError, match="expected 10000"):
            check_output(tmp_path, 1000, 10)


class TestRounds:
    def test_percentile_is_a_measured_value_by_nearest_rank(self):
        """p50 of 1..100 is 50 and p99 is 99: nearest rank, no interpolation."""
        values = [float(v) for v in range(100, 0, -1)]
        assert (percentile(values, 50), percentile(values, 99), percentile(values, 100)) == (50.0, 99.0, 100.0)

    def test_unavailable_variant_becomes_a_row_and_is_not_retried(self):
        """A variant that raises NotAvailable is marked so, tried once, and is not a failure."""
        calls: list[str] = []

        class S:
            def metrics(self):
                return {"gb_per_s": 1.0}

        def measure(v, run_no):
            calls.append(v)
            if v == "shm":
                raise NotAvailable("not implemented yet")
            return S()

        results = run_rounds(["vmsplice", "shm"], 3, measure, str, lambda s: "")
        assert calls == ["vmsplice", "shm", "vmsplice", "vmsplice"]
        shm = results[1]
        assert (shm.unavailable, shm.failures, shm.samples) == ("not implemented yet", [], [])


class TestBenchCommands:
    def test_flush_bench_reports_percentiles_and_an_unavailable_transport(self):
        """`logsink bench flush` measures vmsplice flushes and, for a transport raising NotImplementedError, says so."""
        res = bench("flush", "--seconds", "0.2", "--runs", "1", "--transports", "vmsplice,shm", "--json")
        assert res.returncode == 0, res.stderr
        doc = json.loads(res.stdout)
        vms, shm = doc["variants"]
        assert vms["median"]["p50_ms"] > 0 and len(vms["samples"][0]["latencies_ms"]) == 20
        if shm["unavailable"] is None:  # shm landed: then it must have measured
            assert shm["samples"]
        else:
            assert "shm" in shm["unavailable"] and not shm["failures"]

    def test_scaling_bench_checks_every_output(self):
        """`logsink bench scaling` runs 1 and 3 C producers into one stream, each run checked exact."""
        res = bench("scaling", "--bytes", "2M", "--runs", "1", "--producers", "1,3", "--many", "0",
                    "--transports", "vmsplice", "--json")
        assert res.returncode == 0, res.stderr
        rows = json.loads(res.stdout)["variants"]
        assert [(r["producers"], len(r["samples"]), r["failures"]) for r in rows] == [(1, 1, []), (3, 1, [])]

    def test_scaling_bench_reports_start_and_end_outside_the_window_warm_and_cold(self):
        """Warm (the default) and --cold runs are both exact; warm ones report start-up and teardown seconds and the daemon's CPU over the writes."""
        for extra in ((), ("--cold",)):
            res = bench("scaling", "--bytes", "2M", "--runs", "1", "--producers", "1,3", "--many", "0",
                        "--transports", "shm", "--json", *extra)
            assert res.returncode == 0, res.stderr
            rows = json.loads(res.stdout)["variants"]
            assert [(len(r["samples"]), r["failures"]) for r in rows] == [(1, []), (1, [])], rows
            for r in rows:
                s = r["samples"][0]
                assert s["startup_s"] > 0 and s["daemon_cpu_s"] >= 0
                assert (s["teardown_s"] > 0) if not extra else s["teardown_s"] == 0, s

    def test_cpu_bench_reports_ns_per_record_for_c_and_python(self):
        """`logsink bench cpu` gives CPU ns/record for the C single-record writer and Python 64 KiB writes."""
        res = bench("cpu", "--records", "20000", "--runs", "1", "--transports", "copy", "--json")
        assert res.returncode == 0, res.stderr
        rows = {r["kind"]: r for r in json.loads(res.stdout)["variants"]}
        assert rows["c"]["median"]["cpu_ns_per_record"] > 0 and rows["py"]["median"]["cpu_ns_per_record"] > 0
