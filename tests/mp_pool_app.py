"""An application with a module-level logsink producer and a multiprocessing.Pool (run by test_multiprocessing).

``python mp_pool_app.py METHOD TASKS PER_TASK``: $LSK_MP_KIND ``client`` writes through a module-level
``logsink.Client``, ``handler`` logs through a module-level ``LogsinkHandler``. Task i writes records
``t<i>:0..PER_TASK-1`` (lsk_helpers.record); the pool is closed and joined, and nothing is flushed by
hand: the workers leave through multiprocessing's os._exit. The socket and stream come from
$LOGSINK_SOCKET and $LSK_MP_STREAM; with spawn and forkserver each worker imports this module anew.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from lsk_helpers import record  # noqa: E402

import logsink  # noqa: E402
from logsink.logging import LogsinkHandler  # noqa: E402

KIND = os.environ["LSK_MP_KIND"]  # from the environment: spawn/forkserver workers import this module with other argv
STREAM = os.environ["LSK_MP_STREAM"]
SOCKET = os.environ["LOGSINK_SOCKET"]

if KIND == "client":
    CLIENT = logsink.Client(STREAM, socket=SOCKET)
else:
    LOG = logging.getLogger("mpapp")
    LOG.setLevel(logging.INFO)
    LOG.propagate = False
    LOG.addHandler(LogsinkHandler(STREAM, socket=SOCKET))


def task(args: tuple[int, int]) -> int:
    i, per_task = args
    for j in range(per_task):
        rec = record(f"t{i}", j)
        if KIND == "client":
            CLIENT.write(rec)
        else:
            LOG.info(rec[:-1].decode())
    return os.getpid()


def main() -> int:
    method, tasks, per_task = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    pool = multiprocessing.get_context(method).Pool(2)
    pids = pool.map(task, [(i, per_task) for i in range(tasks)], chunksize=1)
    pool.close()
    pool.join()
    print(len(set(pids)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
