"""What ``logsink status`` shows: the engine's counters per stream, per producer and in total, and the daemon's own."""

from __future__ import annotations

import os
import time
from collections import deque
from typing import Any

from logsink import protocol
from logsink._native import ffi, lib
from logsink._version import __version__

_FIELDS = ("bytes", "records", "batches", "bytes_spliced", "bytes_copied", "bytes_shared", "header_bytes", "errors", "offset",
           "last_seq", "holes_closed", "syncs", "suppressed_records")


def engine_counters(engine: Any, fn: Any, ident: int | None = None) -> dict[str, int]:
    """One of the engine's ``ls_engine_*_counters`` calls (total, or of stream/producer ``ident``) as a dict."""
    c = ffi.new("struct ls_counters *")
    if ident is None:
        fn(engine, c)
    else:
        fn(engine, ident, c)
    return {k: getattr(c, k) for k in _FIELDS}


def totals(engine: Any) -> dict[str, int]:
    c = engine_counters(engine, lib.ls_engine_total_counters)
    del c["offset"], c["last_seq"], c["holes_closed"], c["syncs"]  # (suppressed_records stays: the total)
    return c


class Rates:
    """Bytes/s and records/s per stream over the last WINDOW seconds, from a sample taken every second.

    ``logsink status`` shows them so an operator sees a stream stall without a dashboard."""

    WINDOW = 5

    def __init__(self) -> None:
        self.samples: deque[tuple[float, dict[str, tuple[int, int]]]] = deque(maxlen=self.WINDOW + 1)

    def sample(self, now: float, counters: dict[str, tuple[int, int]]) -> None:
        self.samples.append((now, counters))

    def per_stream(self) -> dict[str, tuple[float, float]]:
        """stream -> (bytes/s, records/s); a stream seen in one sample only has none yet."""
        if len(self.samples) < 2:
            return {}
        (t0, first), (t1, last) = self.samples[0], self.samples[-1]
        span = t1 - t0
        return {name: ((b - first[name][0]) / span, (r - first[name][1]) / span)
                for name, (b, r) in last.items() if name in first and span > 0}


def stream_counts(d: Any) -> dict[str, tuple[int, int]]:
    """(bytes, records) of every stream now: what Rates samples."""
    out = {}
    for s in d.streams.values():
        c = engine_counters(d.engine, lib.ls_engine_stream_counters, s.id)
        out[s.name] = (c["bytes"], c["records"])
    return out


def report(d: Any) -> dict[str, Any]:
    """The STATUS answer of daemon ``d`` (logsink/daemon/server.py's Daemon)."""
    streams = {}
    rates = d.rates.per_stream()
    for s in d.streams.values():
        c = engine_counters(d.engine, lib.ls_engine_stream_counters, s.id)
        streams[s.name] = {
            "file": s.path, "bytes": c["bytes"], "records": c["records"], "batches": c["batches"],
            "producers": s.producers, "bytes_spliced": c["bytes_spliced"], "bytes_copied": c["bytes_copied"],
            "bytes_shared": c["bytes_shared"], "errors": c["errors"], "size": c["offset"], "holes_closed": c["holes_closed"],
            "fsync": s.fsync, "syncs": c["syncs"] + s.interval_syncs, "suppressed_records": c["suppressed_records"],
            "bytes_per_s": round(rates.get(s.name, (0.0, 0.0))[0], 1),
            "records_per_s": round(rates.get(s.name, (0.0, 0.0))[1], 1),
        }
    producers = []
    for p in d.producers.values():
        c = engine_counters(d.engine, lib.ls_engine_producer_counters, p.id)
        queued = c["offset"]
        if p.transport == "shm":  # the pipe holds 32-byte descriptors, each a batch pinned in the arena
            pinned = queued // protocol.FRAME_HEADER_SIZE
        else:
            pinned = -(-queued // p.segment_size) if p.segment_size and p.transport == "vmsplice" else 0
        producers.append({
            "id": p.id, "stream": p.stream.name, "pid": p.pid, "uid": p.uid, "transport": p.transport,
            "batches": c["batches"], "bytes": c["bytes"], "records": c["records"], "released": p.released,
            "pipe_bytes": queued, "pinned_segments": pinned, "pipe_size": p.pipe_size,
        })
    return {
        "version": __version__, "engine": d.engine_name, "fallback_reason": d.fallback_reason,
        "shm_path": ffi.string(lib.ls_engine_shm_path(d.engine)).decode(),
        "engine_failed": d.engine_failed, "small_pipes": d.small_pipes,
        "releases": {"engine": d.releases_by_engine, "daemon": d.releases_by_daemon},
        "suppressed_lines": d.limits.lines_written,
        "pid": os.getpid(), "uptime": round(time.time() - d.started, 3), "dir": d.dir,
        "socket": d.socket_path, "totals": totals(d.engine), "errors": dict(d.errors),
        "listen": [f"tcp://{t.getsockname()[0]}:{t.getsockname()[1]}" for t in getattr(d, "tcp_listeners", [])],
        "metrics": d.metrics.address if d.metrics is not None else None,
        "streams": streams, "producers": producers,
        "forwards": d.forward.status(),
    }
