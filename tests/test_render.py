"""LogsinkHandler's native rendering writes exactly the bytes JsonFormatter.format() would."""

from __future__ import annotations

import json
import logging

import pytest

from logsink.logging import JsonFormatter, LogsinkHandler

TRICKY = [
    "plain",
    'quote " backslash \\ newline \n tab \t cr \r bs \b ff \f',
    "controls \x00 \x01 \x1f and del \x7f",
    "unicode é ü 漢字 😀 line-sep \u2028",
    "%s percent args",
    "",
]


class TestNativeRendering:
    def test_native_lines_equal_formatter_output(self, daemon):
        """For tricky messages, logger names, levels and exceptions, the file holds byte-for-byte what JsonFormatter renders for the same records."""
        d = daemon("io_uring")
        handler = LogsinkHandler("render", socket=d.sock)
        expected: list[bytes] = []
        fmt = JsonFormatter()

        class Reference(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                expected.append(fmt.format(record).encode("utf-8", "backslashreplace").replace(b"\n", b"\\n") + b"\n")

        logger = logging.getLogger('render."odd"\\name é')
        logger.propagate = False
        logger.setLevel(logging.DEBUG)
        logger.addHandler(handler)  # first: renders natively (and sets record.exc_text)
        logger.addHandler(Reference())
        try:
            for i, msg in enumerate(TRICKY):
                level = 10 * (1 + i % 5)  # DEBUG .. CRITICAL
                if "%s" in msg:
                    logger.log(level, msg, "arg")
                else:
                    logger.log(level, msg)
            try:
                raise ValueError('bad "value"\nsecond line')
            except ValueError:
                logger.exception("failed with %d", 42)
            handler.flush()
        finally:
            logger.handlers.clear()
            handler.close()
        assert d.log("render").read_bytes() == b"".join(expected)
        assert len(expected) == len(TRICKY) + 1

    def test_native_rendering_through_a_small_arena_reuses_segments_safely(self, daemon):
        """20k records rendered into 4 segments of 4 KiB (each reused hundreds of times, only after release) land byte-exact."""
        d = daemon("io_uring")
        handler = LogsinkHandler("small", socket=d.sock, segments=4, segment_size=4096)
        expected: list[bytes] = []
        fmt = JsonFormatter()

        class Reference(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                expected.append(fmt.format(record).encode() + b"\n")

        logger = logging.getLogger("render.small")
        logger.propagate = False
        logger.setLevel(logging.INFO)
        logger.addHandler(handler)
        logger.addHandler(Reference())
        try:
            for i in range(20_000):
                logger.info("record %d %s", i, "p" * (i % 150))
            handler.flush()
            batches = handler.client.stats()["batches"]
        finally:
            logger.handlers.clear()
            handler.close()
        assert batches > 100 * 4
        assert d.log("small").read_bytes() == b"".join(expected)


class TestHandleInC:
    """LogsinkHandler.handle runs in C (logsink._fastlog) for plain records; whatever a user set keeps working."""

    def setup_handler(self, daemon, request, **kw):
        d = daemon("io_uring")
        handler = kw.pop("handler_class", LogsinkHandler)("c", socket=d.sock, **kw)
        logger = logging.getLogger(f"render.c.{request.node.name}")
        logger.propagate = False
        logger.setLevel(logging.DEBUG)
        logger.handlers[:] = [handler]
        request.addfinalizer(handler.close)
        request.addfinalizer(logger.handlers.clear)
        return d, logger, handler

    def lines(self, d, handler) -> list[bytes]:
        handler.flush()
        return d.log("c").read_bytes().splitlines(keepends=True)

    def test_plain_record_never_reaches_the_python_path(self, daemon, request, monkeypatch):
        """A plain record with the default formatter is rendered in C: _handle_slow is not called, the line equals format()'s."""
        import logsink._fastlog as fastlog

        assert LogsinkHandler.__dict__["handle"] is fastlog.handler_handle
        d, logger, handler = self.setup_handler(daemon, request)
        monkeypatch.setattr(LogsinkHandler, "_handle_slow", lambda self, record: pytest.fail("took the Python path"))
        records: list[logging.LogRecord] = []
        logger.addFilter(lambda r: records.append(r) or True)  # a logger filter: not the handler's
        logger.info("in C %s %d", "ok", 5)
        monkeypatch.undo()
        assert self.lines(d, handler) == [JsonFormatter().format(records[0]).encode() + b"\n"]

    def test_handler_filters_still_drop_and_modify(self, daemon, request):
        """A handler filter that returns False drops the record; one that edits the record changes what lands."""
        d, logger, handler = self.setup_handler(daemon, request)

        def edit(record: logging.LogRecord) -> bool:
            if "drop" in record.msg:
                return False
            record.msg = record.msg.upper()
            return True

        handler.addFilter(edit)
        logger.info("drop me")
        logger.info("keep me")
        assert [json.loads(x)["message"] for x in self.lines(d, handler)] == ["KEEP ME"]

    def test_custom_formatter_is_used(self, daemon, request):
        """A formatter the user set renders the record (the C path is for the default JsonFormatter only)."""
        d, logger, handler = self.setup_handler(daemon, request)
        handler.setFormatter(logging.Formatter("%(levelname)s|%(name)s|%(message)s"))
        logger.warning("custom %s", "fmt")
        assert self.lines(d, handler) == [f"WARNING|{logger.name}|custom fmt\n".encode()]

    def test_subclass_emit_is_called(self, daemon, request):
        """A LogsinkHandler subclass with its own emit() gets it called for every record."""
        seen: list[str] = []

        class Mine(LogsinkHandler):
            def emit(self, record: logging.LogRecord) -> None:
                seen.append(record.getMessage())
                super().emit(record)

        d, logger, handler = self.setup_handler(daemon, request, handler_class=Mine)
        logger.info("sub %d", 1)
        assert seen == ["sub 1"]
        assert json.loads(self.lines(d, handler)[0])["message"] == "sub 1"

    def test_bad_format_reaches_handle_error_not_the_caller(self, daemon, request, monkeypatch):
        """A message whose % args do not fit is reported through handleError, as logging does; the caller does not see it."""
        d, logger, handler = self.setup_handler(daemon, request)
        errors: list[logging.LogRecord] = []
        monkeypatch.setattr(handler, "handleError", errors.append)
        logger.info("%d needs a number", "text")
        logger.info("after")
        assert len(errors) == 1 and errors[0].msg == "%d needs a number"
        assert [json.loads(x)["message"] for x in self.lines(d, handler)] == ["after"]

    def test_lone_surrogate_is_backslash_escaped_like_the_python_path(self, daemon, request):
        """A message with a lone surrogate lands backslash-escaped, as format().encode("utf-8", "backslashreplace") writes it."""
        d, logger, handler = self.setup_handler(daemon, request)
        logger.info("bad \ud800 char")
        assert json.loads(self.lines(d, handler)[0])["message"] == "bad \\ud800 char"

    def test_record_factory_subclass_get_message_is_honoured(self, daemon, request):
        """Records from a custom LogRecord factory (a subclass with its own getMessage) render through it."""

        class Upper(logging.LogRecord):
            def getMessage(self) -> str:
                return super().getMessage().upper()

        old = logging.getLogRecordFactory()
        logging.setLogRecordFactory(Upper)
        request.addfinalizer(lambda: logging.setLogRecordFactory(old))
        d, logger, handler = self.setup_handler(daemon, request)
        logger.info("shout %s", "this")
        assert json.loads(self.lines(d, handler)[0])["message"] == "SHOUT THIS"
