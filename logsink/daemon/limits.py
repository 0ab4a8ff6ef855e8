"""Rate limits that never drop silently: per producer and per uid, per stream, in bytes/s and records/s.

The engine enforces them (token buckets in native/ls_engine.c: a batch over a limit is drained and
dropped whole, never written, and reported LS_EV_BATCH_SUPPRESSED; its RELEASE carries
``suppressed: [[seq, records]]`` so the producer counts it in ``stats()``). This module assigns the
buckets - bucket ``id`` is producer ``id``'s own, bucket ``max_producers + k`` is shared by every
producer of one uid on one stream - and, once a second, writes what was dropped into the stream
itself, one line per producer that lost records in that window::

    {"logsink":"suppressed","records":N,"bytes":B,"producer":ID,"pid":PID,"uid":UID,"stream":NAME,"window_s":1.0}

The line is the daemon's own record (no producer payload passes through here): it goes through a
pipe the daemon registered with the engine as an internal producer of that stream, so it lands
between batches, whole, like any other record. Dropped records are counted in status per stream.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import json
import os
import time
from typing import Any

import structlog

from logsink import protocol
from logsink._native import check, ffi, lib
from logsink.config import Config, RateLimits

log = structlog.get_logger("logsink.daemon")

WINDOW_S = 1.0


class RateLimiter:
    def __init__(self, engine: Any, cfg: Config, free_ids: list[int]):
        self.engine = engine
        self.cfg = cfg
        self.free_ids = free_ids  # the daemon's producer slots: internal producers take one each
        self.uid_buckets: dict[tuple[int, str], list[int]] = {}  # (uid, stream) -> [bucket, producers]
        self.free_uid_buckets = list(range(2 * cfg.max_producers - 1, cfg.max_producers - 1, -1))
        self.window: dict[tuple[str, int, int, int], list[int]] = {}  # (stream, producer, pid, uid) -> [records, bytes]
        self.internal: dict[str, list[int]] = {}  # stream -> [engine id, write fd, seq]
        self.lines_written = 0

    def attach(self, p: Any) -> None:
        """Give a new producer its buckets (before its WELCOME: no batch can come earlier)."""
        lim: RateLimits = self.cfg.stream_limits(p.stream.name)
        if not lim.any:
            return
        own = -1
        if lim.rate_bytes or lim.rate_records:
            check(lib.ls_engine_set_bucket(self.engine, p.id, lim.rate_bytes, lim.rate_records), "rate limit")
            own = p.id
        shared = -1
        if (lim.uid_rate_bytes or lim.uid_rate_records) and p.uid >= 0:  # TCP producers have no uid: no shared bucket
            key = (p.uid, p.stream.name)
            entry = self.uid_buckets.get(key)
            if entry is None:
                entry = self.uid_buckets[key] = [self.free_uid_buckets.pop(), 0]
                check(lib.ls_engine_set_bucket(self.engine, entry[0], lim.uid_rate_bytes, lim.uid_rate_records), "rate limit")
            entry[1] += 1
            shared = entry[0]
        check(lib.ls_engine_set_limit(self.engine, p.id, own, shared), "rate limit")

    def detach(self, p: Any) -> None:
        """A producer ended: its uid's shared bucket goes once no producer draws on it."""
        entry = self.uid_buckets.get((p.uid, p.stream.name))  # only producers that drew on it made it
        if entry is not None:
            entry[1] -= 1
            if entry[1] <= 0:
                del self.uid_buckets[(p.uid, p.stream.name)]
                self.free_uid_buckets.append(entry[0])

    def suppressed(self, p: Any, records: int, nbytes: int) -> None:
        w = self.window.setdefault((p.stream.name, p.id, p.pid, p.uid), [0, 0])
        w[0] += records
        w[1] += nbytes

    def tick(self, streams: Any) -> None:
        """The window ended: say in each stream what it dropped (kept for the next tick if its pipe is full)."""
        for key, (records, nbytes) in list(self.window.items()):
            stream, producer, pid, uid = key
            line = json.dumps({"logsink": "suppressed", "records": records, "bytes": nbytes, "producer": producer,
                               "pid": pid, "uid": uid, "stream": stream, "window_s": WINDOW_S}, separators=(",", ":")).encode() + b"\n"
            try:
                if self._write(streams, stream, line):
                    del self.window[key]
                    self.lines_written += 1
            except OSError as exc:
                log.error("suppressed_line_failed", stream=stream, producer=producer, records=records, error=str(exc))
                del self.window[key]

    def _write(self, streams: Any, stream: str, line: bytes) -> bool:
        ent = self.internal.get(stream)
        if ent is None:
            if not self.free_ids:
                raise OSError("no free producer slot for the daemon's own line")
            sid = streams.get(stream).id
            r, w = os.pipe2(os.O_CLOEXEC)
            fcntl.fcntl(w, fcntl.F_SETFL, os.O_NONBLOCK)
            pid = self.free_ids.pop()
            ret = lib.ls_engine_add_producer(self.engine, pid, sid, r)
            if ret < 0:
                os.close(r)
                os.close(w)
                self.free_ids.append(pid)
                check(ret, "adding the daemon's own producer")
            ent = self.internal[stream] = [pid, w, 0]
        frame = protocol.pack_frame_header(len(line), 1, ent[2] + 1) + line  # < PIPE_BUF: whole or EAGAIN
        try:
            os.write(ent[1], frame)
        except BlockingIOError:
            return False
        ent[2] += 1
        return True

    def is_internal(self, producer_id: int) -> bool:
        return any(ent[0] == producer_id for ent in self.internal.values())

    async def close(self, streams: Any, timeout: float = 2.0) -> None:
        """Shutdown: say what the last window dropped, end the internal producers, and wait (bounded) until
        the engine has landed what they queued."""
        self.tick(streams)
        ids = [ent[0] for ent in self.internal.values()]
        for ent in self.internal.values():
            os.close(ent[1])
        self.internal.clear()
        c = ffi.new("struct ls_counters *")
        deadline = time.monotonic() + timeout
        while ids and time.monotonic() < deadline:
            ids = [i for i in ids if lib.ls_engine_producer_counters(self.engine, i, c) != -errno.ENOENT]
            await asyncio.sleep(0.01)
