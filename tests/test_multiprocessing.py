"""Producers in multiprocessing workers: records written in a Pool worker land although the worker leaves through os._exit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from lsk_helpers import assert_file, make_records, split_lines

APP = Path(__file__).resolve().parent / "mp_pool_app.py"
TASKS = 8
PER_TASK = 2_000  # 16,000 records of 20-300 bytes: well inside the default arena, so nothing is handed over early


def run_pool_app(d, stream: str, method: str, kind: str) -> None:
    env = {**os.environ, "LOGSINK_SOCKET": d.sock, "LSK_MP_STREAM": stream, "LSK_MP_KIND": kind}
    res = subprocess.run([sys.executable, str(APP), method, str(TASKS), str(PER_TASK)], env=env,
                         capture_output=True, timeout=120, check=False)
    assert res.returncode == 0, res.stderr.decode()[-5000:]
    assert b"Traceback" not in res.stderr, res.stderr.decode()[-5000:]


def expected() -> dict[str, list[bytes]]:
    return {f"t{i}": make_records(f"t{i}", PER_TASK) for i in range(TASKS)}


@pytest.mark.parametrize("method", ["fork", "forkserver", "spawn"])
class TestPoolWorkersFlushOnExit:
    def test_module_level_client_records_all_land(self, daemon, method):
        """Every record a Pool worker wrote through a module-level Client is in the file once the pool is joined."""
        d = daemon("splice")
        run_pool_app(d, "mpc", method, "client")
        assert_file(d.log("mpc"), expected())

    def test_logging_handler_records_all_land(self, daemon, method):
        """Every record a Pool worker logged through a module-level LogsinkHandler is in the file once the pool is joined."""
        d = daemon("splice")
        run_pool_app(d, "mph", method, "handler")
        got: dict[str, list[bytes]] = {}
        for line in split_lines(d.log("mph").read_bytes()):
            msg = json.loads(line)["message"].encode() + b"\n"
            got.setdefault(msg.split(b":", 1)[0].decode(), []).append(msg)
        assert got == expected()
