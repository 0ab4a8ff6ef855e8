"""``--metrics tcp://HOST:PORT``: the daemon's status in Prometheus text format, for the dashboards operators have.

The numbers are exactly ``logsink status``'s (logsink/daemon/status.py), turned into metric families
at scrape time by a prometheus-client collector. The HTTP side is a few lines on the daemon's own
asyncio loop, not prometheus-client's server thread: the collector reads the daemon's state on the
thread that changes it, so a scrape never sees a half-updated table. GET /metrics answers; anything
else is 404; a client gets 5 s to send its request.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import structlog
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily

from logsink.protocol import parse_tcp_address

log = structlog.get_logger("logsink.daemon")

REQUEST_TIMEOUT = 5.0
MAX_REQUEST = 8192
# Scrapes served at once; more connections are closed at once (they would hold fds producers need).
MAX_SCRAPES = 8


class StatusCollector:
    """A prometheus-client collector over ``status()`` (the STATUS answer's dict)."""

    def __init__(self, status: Callable[[], dict[str, Any]]):
        self.status = status

    def collect(self) -> Iterator[Any]:
        st = self.status()
        yield InfoMetricFamily("logsink", "The daemon: version, engine and how shm batches are written",
                               value={"version": st["version"], "engine": st["engine"], "shm_path": st.get("shm_path", "")})
        streams = st["streams"]
        for key, name, doc in (("bytes", "stream_bytes", "Payload bytes landed in the stream's file"),
                               ("records", "stream_records", "Records landed in the stream's file"),
                               ("batches", "stream_batches", "Batches landed in the stream's file"),
                               ("errors", "stream_errors", "Batches of the stream that failed or were refused"),
                               ("suppressed_records", "stream_suppressed_records", "Records dropped over a rate limit")):
            fam = CounterMetricFamily(f"logsink_{name}", doc, labels=["stream"])
            for s, v in streams.items():
                fam.add_metric([s], v[key])
            yield fam
        for key, name, doc in (("size", "stream_file_size_bytes", "Size of the stream's file (the engine's write offset)"),
                               ("producers", "stream_producers", "Producers connected to the stream"),
                               ("bytes_per_s", "stream_bytes_per_second", "Bytes/s landed over the last 5 s"),
                               ("records_per_s", "stream_records_per_second", "Records/s landed over the last 5 s")):
            gauge = GaugeMetricFamily(f"logsink_{name}", doc, labels=["stream"])
            for s, v in streams.items():
                gauge.add_metric([s], v[key])
            yield gauge
        moved = CounterMetricFamily("logsink_engine_bytes", "Payload bytes the engine moved, by how", labels=["how"])
        for how in ("spliced", "copied", "shared"):
            moved.add_metric([how], st["totals"].get(f"bytes_{how}", 0))
        yield moved
        producers = st["producers"]
        by_transport = Counter(p["transport"] for p in producers)
        gauge = GaugeMetricFamily("logsink_producers", "Producers connected, by transport", labels=["transport"])
        for t, n in sorted(by_transport.items()):
            gauge.add_metric([t], n)
        yield gauge
        yield GaugeMetricFamily("logsink_pinned_segments", "Producer segments handed over and not yet released",
                                value=sum(p["pinned_segments"] for p in producers))
        pipes = GaugeMetricFamily("logsink_producer_pipes", "Local pipe producers by the pipe size they were granted",
                                  labels=["pipe_size"])
        for size, n in sorted(Counter(p["pipe_size"] for p in producers if p.get("pipe_size")).items()):
            pipes.add_metric([str(size)], n)
        yield pipes
        yield CounterMetricFamily("logsink_small_pipes", "Pipe producers admitted with a pipe smaller than their segment "
                                  "(their uid's pipe budget was spent)", value=st.get("small_pipes", 0))
        errors = CounterMetricFamily("logsink_errors", "Errors by code (what producers were told, and the daemon's own)",
                                     labels=["code"])
        for code, n in sorted(st["errors"].items()):
            errors.add_metric([code], n)
        yield errors
        rel = CounterMetricFamily("logsink_releases", "RELEASE messages, by who sent them", labels=["by"])
        for by, n in sorted(st.get("releases", {}).items()):
            rel.add_metric([by], n)
        yield rel
        lag = GaugeMetricFamily("logsink_forward_lag_bytes", "Bytes of the stream not yet sent downstream",
                                labels=["stream", "address"])
        dropped = CounterMetricFamily("logsink_forward_dropped_bytes", "Bytes dropped by a forward's spool policy",
                                      labels=["stream", "address"])
        sent = CounterMetricFamily("logsink_forward_sent_bytes", "Bytes sent downstream", labels=["stream", "address"])
        for f in st.get("forwards", []):
            labels = [f["stream"], f["address"]]
            lag.add_metric(labels, f["lag_bytes"])
            dropped.add_metric(labels, f["dropped_bytes"])
            sent.add_metric(labels, f["bytes_sent"])
        yield lag
        yield dropped
        yield sent


class MetricsServer:
    """GET /metrics on ``address`` (tcp://HOST:PORT; port 0 picks one: see ``address`` after start)."""

    def __init__(self, status: Callable[[], dict[str, Any]]):
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(StatusCollector(status))  # type: ignore[arg-type]
        self.server: asyncio.base_events.Server | None = None
        self.address = ""
        self.active = 0

    async def start(self, address: str) -> None:
        host, port = parse_tcp_address(address, listen=True)
        try:
            self.server = await asyncio.start_server(self._serve, host, port, reuse_address=True, limit=MAX_REQUEST)
        except OSError as exc:
            raise OSError(exc.errno, f"cannot serve metrics on {address}: {exc.strerror}") from None
        sockname = self.server.sockets[0].getsockname()
        self.address = f"tcp://{sockname[0]}:{sockname[1]}"
        log.info("metrics_listening", address=self.address, path="/metrics")

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.active >= MAX_SCRAPES:
            writer.close()
            return
        self.active += 1
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), REQUEST_TIMEOUT)
            parts = head.split(b"\r\n", 1)[0].split()
            if len(parts) >= 2 and parts[0] in (b"GET", b"HEAD") and parts[1].split(b"?")[0] == b"/metrics":
                body = generate_latest(self.registry)
                status, ctype = b"200 OK", CONTENT_TYPE_LATEST.encode()
            else:
                body, status, ctype = b"not found: GET /metrics\n", b"404 Not Found", b"text/plain"
            writer.write(b"HTTP/1.1 " + status + b"\r\nContent-Type: " + ctype + b"\r\nContent-Length: "
                         + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + (body if parts[0] != b"HEAD" else b""))
            await asyncio.wait_for(writer.drain(), REQUEST_TIMEOUT)
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError, IndexError):
            pass
        finally:
            self.active -= 1
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
            self.server = None
