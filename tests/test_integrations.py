"""The structlog and stdlib ``logging`` integrations, end to end against a live daemon, and threads sharing one Client."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

import pytest
import structlog
from lsk_helpers import assert_file, make_records, wait_for

import logsink
import logsink.logging as lsk_logging
import logsink.structlog as lsk_structlog

FLUSH_TIMEOUT = 20.0
SUBPROCESS_TIMEOUT = 60.0
THREADS = 8
RECORDS_PER_THREAD = 50_000


# -- helpers --------------------------------------------------------------------------------------
def json_lines(path: Path) -> list[dict[str, Any]]:
    """The stream file's records, each required to be one whole line holding one JSON object."""
    data = path.read_bytes()
    assert data.endswith(b"\n"), f"{path} does not end with a newline: {data[-200:]!r}"
    out = []
    for i, line in enumerate(data.split(b"\n")[:-1]):
        try:
            doc = json.loads(line)
        except ValueError as exc:
            raise AssertionError(f"{path} line {i} is not JSON ({exc}): {line[:300]!r}") from None
        assert isinstance(doc, dict), f"{path} line {i} is not a JSON object: {line[:300]!r}"
        out.append(doc)
    return out


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter (for global logging/structlog state); require exit 0."""
    res = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True, timeout=SUBPROCESS_TIMEOUT, env={**os.environ, **env},
    )
    assert res.returncode == 0, f"subprocess exited {res.returncode}; stderr:\n{res.stderr.decode(errors='replace')[-5000:]}"
    return res


class FakeClient:
    """Stands in for ``logsink.Client`` where only the bytes a logger hands over matter."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.flushes = 0

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))

    def flush(self, timeout: float | None = None) -> None:
        self.flushes += 1


# -- fixtures -------------------------------------------------------------------------------------
@pytest.fixture
def structlog_sink(daemon):
    """Factory: ``structlog_sink(stream, **configure_kw)`` runs ``logsink.structlog.configure`` against a
    fresh daemon and returns ``(daemon, factory)``. Teardown closes the client and resets structlog."""
    structlog.reset_defaults()
    structlog.contextvars.clear_contextvars()
    factories: list[lsk_structlog.LogsinkLoggerFactory] = []
    d = daemon("io_uring")

    def setup(stream: str = "app", **kw: Any):
        factory = lsk_structlog.configure(stream, socket=d.sock, **kw)
        factories.append(factory)
        return d, factory

    yield setup
    try:
        for f in factories:
            if f._client is not None:
                f._client.close()
    finally:
        structlog.reset_defaults()
        structlog.contextvars.clear_contextvars()


@pytest.fixture
def handler_sink(daemon, request):
    """Factory: ``handler_sink(stream, **handler_kw)`` returns ``(daemon, logger, handler)``: a fresh
    ``LogsinkHandler`` on a logger of this test's own that does not propagate. Teardown removes and
    closes every handler."""
    d = daemon("io_uring")
    made: list[tuple[logging.Logger, logging.Handler]] = []

    def setup(stream: str = "app", **kw: Any):
        logger = logging.getLogger(f"lsk.test.{request.node.name}.{len(made)}")
        logger.propagate = False
        logger.setLevel(logging.DEBUG)
        handler = lsk_logging.LogsinkHandler(stream, socket=d.sock, **kw)
        logger.addHandler(handler)
        made.append((logger, handler))
        return d, logger, handler

    yield setup
    for logger, handler in made:
        logger.removeHandler(handler)
        handler.close()


# -- structlog ------------------------------------------------------------------------------------
class TestLogsinkLogger:
    def test_str_event_becomes_one_utf8_record(self):
        """A rendered str event is encoded as UTF-8 and handed over as one record ending in a newline."""
        c = FakeClient()
        lsk_structlog.LogsinkLogger(c).msg('{"event":"héllo ✓"}')
        assert c.writes == ['{"event":"héllo ✓"}\n'.encode()]

    def test_bytes_event_passes_through_with_one_newline(self):
        """A bytes event (orjson's output) is handed over as is, gaining a newline only if it lacks one."""
        c = FakeClient()
        log = lsk_structlog.LogsinkLogger(c)
        log.msg(b'{"a":1}')
        log.msg(b'{"b":2}\n')
        assert c.writes == [b'{"a":1}\n', b'{"b":2}\n']

    def test_embedded_newlines_are_escaped_to_keep_one_record(self):
        """An event whose rendering holds newlines (a console renderer) stays one record, newlines escaped."""
        c = FakeClient()
        lsk_structlog.LogsinkLogger(c).msg("line one\nline two\n")
        assert c.writes == [b"line one\\nline two\n"]

    @pytest.mark.parametrize("method", ["msg", "log", "debug", "info", "warn", "warning", "error", "err", "critical", "fatal", "failure", "exception"])
    def test_every_level_method_appends_the_record(self, method):
        """Every method structlog may call on the logger appends the rendered event."""
        c = FakeClient()
        getattr(lsk_structlog.LogsinkLogger(c), method)("x")
        assert c.writes == [b"x\n"]

    def test_flush_flushes_the_client(self):
        """LogsinkLogger.flush() flushes the shared client."""
        c = FakeClient()
        lsk_structlog.LogsinkLogger(c).flush()
        assert c.flushes == 1


class TestLogsinkLoggerFactory:
    def test_loggers_share_one_client_and_carry_their_name(self):
        """Every logger the factory makes appends to the same client; a string argument becomes its name."""
        c = FakeClient()
        factory = lsk_structlog.LogsinkLoggerFactory(client=c)
        a, b, anon = factory("a"), factory("b"), factory()
        assert a._client is b._client is anon._client is c
        assert (a.name, b.name, anon.name) == ("a", "b", None)

    def test_client_is_created_on_first_use_for_the_stream(self, daemon):
        """Without ``client=``, the factory connects only when the first logger is made, to its stream."""
        d = daemon("readwrite")
        factory = lsk_structlog.LogsinkLoggerFactory("lazy", socket=d.sock)
        assert factory._client is None
        try:
            factory("x")
            assert factory.client is factory("y")._client
            assert factory.client.stream == "lazy"
        finally:
            factory.client.close()


class TestStructlogConfigure:
    def test_events_land_as_json_lines_with_level_and_timestamp(self, structlog_sink):
        """configure(): events appear in the stream file as JSON lines with event, level, timestamp and key-values, in order."""
        d, factory = structlog_sink("sl")
        log = structlog.get_logger("svc")
        log.info("started", port=8080)
        log.warning("slow", ms=1234.5)
        log.error("héllo ✓")
        factory.client.flush(timeout=FLUSH_TIMEOUT)
        docs = json_lines(d.log("sl"))
        assert [(x["event"], x["level"]) for x in docs] == [("started", "info"), ("slow", "warning"), ("héllo ✓", "error")]
        assert docs[0]["port"] == 8080 and docs[1]["ms"] == 1234.5
        for x in docs:
            assert x["timestamp"].endswith("Z") and "T" in x["timestamp"], x

    def test_exception_is_rendered_with_traceback_text(self, structlog_sink):
        """log.exception() inside an except block renders the traceback text into the record."""
        d, factory = structlog_sink("exc")
        log = structlog.get_logger()
        try:
            raise ZeroDivisionError("sentinel-7f3a")
        except ZeroDivisionError:
            log.exception("failed", job=3)
        factory.client.flush(timeout=FLUSH_TIMEOUT)
        [doc] = json_lines(d.log("exc"))
        assert doc["event"] == "failed" and doc["level"] == "error" and doc["job"] == 3
        assert doc["exception"].startswith("Traceback (most recent call last):"), doc
        assert "ZeroDivisionError: sentinel-7f3a" in doc["exception"]

    def test_bound_logger_and_contextvars_fields_are_present(self, structlog_sink):
        """Fields bound on a logger and in structlog.contextvars appear in the record; cleared contextvars disappear."""
        d, factory = structlog_sink("ctx")
        log = structlog.get_logger().bind(user="ann")
        structlog.contextvars.bind_contextvars(request_id="r-42")
        log.info("in request", step=1)
        log.bind(step=2).info("nested")
        structlog.contextvars.clear_contextvars()
        log.info("after request")
        factory.client.flush(timeout=FLUSH_TIMEOUT)
        docs = json_lines(d.log("ctx"))
        assert [x["event"] for x in docs] == ["in request", "nested", "after request"]
        assert docs[0]["user"] == "ann" and docs[0]["request_id"] == "r-42" and docs[0]["step"] == 1
        assert docs[1]["user"] == "ann" and docs[1]["request_id"] == "r-42" and docs[1]["step"] == 2
        assert docs[2]["user"] == "ann" and "request_id" not in docs[2] and "step" not in docs[2]

    def test_logger_made_before_configure_is_cached_on_first_use(self, structlog_sink):
        """A module-level logger created before configure() writes to logsink and is cached after its first use."""
        early = structlog.get_logger("early")  # the usual `log = structlog.get_logger()` at import time
        d, factory = structlog_sink("cache")
        assert structlog.get_config()["cache_logger_on_first_use"] is True
        early.info("one")
        bound_after_first_use = early.bind()
        early.info("two")
        assert early.bind()._logger is bound_after_first_use._logger  # the cached logger, not a new one
        factory.client.flush(timeout=FLUSH_TIMEOUT)
        assert [x["event"] for x in json_lines(d.log("cache"))] == ["one", "two"]

    def test_level_filters_events_below_it(self, structlog_sink):
        """configure(level=WARNING) drops info and debug events before they are rendered."""
        d, factory = structlog_sink("lvl", level=logging.WARNING)
        log = structlog.get_logger()
        log.debug("d")
        log.info("i")
        log.warning("w")
        log.critical("c")
        factory.client.flush(timeout=FLUSH_TIMEOUT)
        assert [x["event"] for x in json_lines(d.log("lvl"))] == ["w", "c"]

    def test_custom_processors_replace_the_default_chain(self, structlog_sink):
        """configure(processors=...) uses the given chain, here a KeyValueRenderer, one record per event."""
        d, factory = structlog_sink("kv", processors=[structlog.processors.KeyValueRenderer(key_order=["event"])])
        structlog.get_logger().info("hi", n=1)
        factory.client.flush(timeout=FLUSH_TIMEOUT)
        assert d.log("kv").read_bytes() == b"event='hi' n=1\n"

    def test_events_logged_just_before_exit_are_delivered(self, daemon):
        """A program that logs with configure() and simply exits still gets its last events into the file."""
        d = daemon("io_uring")
        run_python(f"""
            import structlog, logsink.structlog
            logsink.structlog.configure("atexit", socket={d.sock!r})
            structlog.get_logger().info("last words")
        """)
        assert [x["event"] for x in json_lines(d.log("atexit"))] == ["last words"]


# -- stdlib logging -------------------------------------------------------------------------------
class TestJsonFormatter:
    def make_record(self, msg: str = "m %s", args: tuple = ("x",), **kw: Any) -> logging.LogRecord:
        rec = logging.LogRecord("app.db", logging.WARNING, __file__, 1, msg, args, kw.pop("exc_info", None), **kw)
        rec.created = 1700000000.25
        return rec

    def test_renders_timestamp_level_logger_message(self):
        """A record renders as one JSON object: UTC ISO timestamp with milliseconds, lower-case level, logger, message."""
        doc = json.loads(lsk_logging.JsonFormatter().format(self.make_record()))
        assert doc == {"timestamp": "2023-11-14T22:13:20.250Z", "level": "warning", "logger": "app.db", "message": "m x"}

    def test_exception_text_is_included(self):
        """A record with exc_info gets the formatted traceback under ``exception``."""
        try:
            raise KeyError("sentinel-91")
        except KeyError:
            rec = self.make_record(exc_info=sys.exc_info())
        doc = json.loads(lsk_logging.JsonFormatter().format(rec))
        assert doc["exception"].startswith("Traceback (most recent call last):")
        assert "KeyError: 'sentinel-91'" in doc["exception"]

    def test_extra_fields_are_added(self):
        """``extra_fields`` adds the named LogRecord attributes, None when a record lacks one."""
        rec = self.make_record()
        rec.request_id = "r-1"
        doc = json.loads(lsk_logging.JsonFormatter(extra_fields=("request_id", "process", "absent")).format(rec))
        assert doc["request_id"] == "r-1" and doc["process"] == os.getpid() and doc["absent"] is None


class TestLogsinkHandler:
    def test_records_land_as_json_lines_with_the_documented_fields(self, handler_sink):
        """Records logged through the handler appear in the file as JSON lines with timestamp, level, logger, message."""
        d, logger, handler = handler_sink("lg")
        logger.debug("d %d", 1)
        logger.info("héllo ✓ %s", "world")
        logger.warning("multi\nline")
        handler.flush()
        docs = json_lines(d.log("lg"))
        assert [(x["level"], x["message"]) for x in docs] == [("debug", "d 1"), ("info", "héllo ✓ world"), ("warning", "multi\nline")]
        for x in docs:
            assert set(x) == {"timestamp", "level", "logger", "message"}, x
            assert x["logger"] == logger.name
            assert x["timestamp"].endswith("Z"), x

    def test_exception_text_is_rendered(self, handler_sink):
        """logger.exception() puts the traceback text into the record's ``exception`` field."""
        d, logger, handler = handler_sink("lgexc")
        try:
            {}["sentinel-c0de"]
        except KeyError:
            logger.exception("lookup failed")
        handler.flush()
        [doc] = json_lines(d.log("lgexc"))
        assert doc["level"] == "error" and doc["message"] == "lookup failed"
        assert doc["exception"].startswith("Traceback (most recent call last):")
        assert "KeyError: 'sentinel-c0de'" in doc["exception"]

    def test_flush_makes_records_visible_in_the_file(self, handler_sink):
        """With no timed flush, records are not in the file until Handler.flush(), and are there when it returns."""
        d, logger, handler = handler_sink("fl", flush_interval=None)
        for i in range(100):
            logger.info("record %d", i)
        assert not d.log("fl").exists() or d.log("fl").stat().st_size == 0
        handler.flush()
        assert [x["message"] for x in json_lines(d.log("fl"))] == [f"record {i}" for i in range(100)]

    def test_close_delivers_records_and_is_idempotent(self, handler_sink):
        """close() delivers what was logged, may be called twice, and flush() after it does not raise."""
        d, logger, handler = handler_sink("cl", flush_interval=None)
        logger.info("before close")
        logger.removeHandler(handler)
        handler.close()
        handler.close()
        handler.flush()
        assert [x["message"] for x in json_lines(d.log("cl"))] == ["before close"]

    def test_lost_daemon_reaches_handle_error_not_the_caller(self, handler_sink, monkeypatch):
        """With the daemon gone (reconnect=False), logging calls handleError() (the Handler contract) and flush()/close() do not raise."""
        d, logger, handler = handler_sink("gone", reconnect=False)
        failed: list[logging.LogRecord] = []
        monkeypatch.setattr(handler, "handleError", failed.append)
        logger.info("delivered")
        handler.flush()
        assert d.terminate() == 0, d.stderr()
        wait_for(lambda: not handler.client.connected, 10, "the client to see the daemon go")
        logger.info("undeliverable")  # must not raise
        handler.flush()
        handler.close()
        assert [r.getMessage() for r in failed] == ["undeliverable"]
        assert [x["message"] for x in json_lines(d.log("gone"))] == ["delivered"]

    def test_custom_formatter_output_stays_one_record(self, handler_sink):
        """A plain-text formatter is used as given; a multi-line result is kept as one record with escaped newlines."""
        d, logger, handler = handler_sink("txt", formatter=logging.Formatter("%(levelname)s %(message)s"))
        logger.error("two\nlines")
        handler.flush()
        assert d.log("txt").read_bytes() == b"ERROR two\\nlines\n"

    def test_dictconfig_creates_the_handler_in_both_forms(self, daemon):
        """logging.config.dictConfig builds LogsinkHandler via ``()`` and via ``class``, with level and formatter; records land at exit."""
        d = daemon("io_uring")
        run_python(f"""
            import logging, logging.config
            logging.config.dictConfig({{
                "version": 1,
                "formatters": {{"plain": {{"format": "%(name)s|%(levelname)s|%(message)s"}}}},
                "handlers": {{
                    "factory": {{"()": "logsink.logging.LogsinkHandler", "stream": "dc1", "socket": {d.sock!r}}},
                    "cls": {{"class": "logsink.logging.LogsinkHandler", "stream": "dc2", "socket": {d.sock!r},
                             "level": "WARNING", "formatter": "plain"}},
                }},
                "root": {{"level": "INFO", "handlers": ["factory", "cls"]}},
            }})
            from logsink.logging import LogsinkHandler
            assert [type(h) for h in logging.getLogger().handlers] == [LogsinkHandler, LogsinkHandler]
            log = logging.getLogger("dc")
            log.info("info record")
            log.warning("warning record")
            # no explicit flush: logging.shutdown() at exit flushes and closes the handlers
        """)
        docs = json_lines(d.log("dc1"))
        assert [(x["logger"], x["level"], x["message"]) for x in docs] == [("dc", "info", "info record"), ("dc", "warning", "warning record")]
        assert d.log("dc2").read_bytes() == b"dc|WARNING|warning record\n"


# -- threads --------------------------------------------------------------------------------------
def run_threads(target, n: int = THREADS) -> None:
    """Run ``target(k)`` in n threads released together; re-raise the first failure."""
    barrier = threading.Barrier(n)
    errors: list[BaseException] = []

    def body(k: int) -> None:
        try:
            barrier.wait()
            target(k)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=body, args=(k,)) for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads), "a writer thread hung"
    if errors:
        raise errors[0]


class TestThreads:
    def test_eight_threads_through_one_client_land_byte_exact(self, daemon):
        """8 threads x 50k records through one Client: every record whole, each thread's records in order, nothing else."""
        d = daemon("io_uring")
        expected = {f"t{k}": make_records(f"t{k}", RECORDS_PER_THREAD) for k in range(THREADS)}
        with logsink.Client("thr", socket=d.sock) as client:
            def writer(k: int) -> None:
                write = client.write
                for rec in expected[f"t{k}"]:
                    write(rec)

            run_threads(writer)
            client.flush(timeout=FLUSH_TIMEOUT)
            st = client.stats()
        assert_file(d.log("thr"), expected)
        assert st["records"] == THREADS * RECORDS_PER_THREAD and st["dropped_records"] == 0, st
        assert d.log("thr").stat().st_size == sum(len(r) for recs in expected.values() for r in recs)

    def test_eight_threads_through_one_handler_land_byte_exact(self, handler_sink):
        """8 threads x 50k records through one LogsinkHandler (no handler lock): every record whole and in per-thread order."""
        d, logger, handler = handler_sink("thrlog", formatter=logging.Formatter("%(message)s"))
        expected = {f"h{k}": make_records(f"h{k}", RECORDS_PER_THREAD) for k in range(THREADS)}
        messages = {tag: [r[:-1].decode() for r in recs] for tag, recs in expected.items()}

        def writer(k: int) -> None:
            info = logger.info
            for m in messages[f"h{k}"]:
                info(m)

        run_threads(writer)
        handler.flush()
        assert_file(d.log("thrlog"), expected)
