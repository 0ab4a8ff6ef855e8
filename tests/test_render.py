"""LogsinkHandler's native rendering writes exactly the bytes JsonFormatter.format() would."""

from __future__ import annotations

import json
import logging
import sys

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


def alone_on_logger(name: str, handler: logging.Handler, request) -> logging.Logger:
    """Logger ``name`` with ``handler`` as its only handler, not propagating, at DEBUG; the handler is
    closed and the logger emptied when the test ends."""
    logger = logging.getLogger(name)
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    logger.handlers[:] = [handler]
    request.addfinalizer(handler.close)
    request.addfinalizer(logger.handlers.clear)
    return logger


class TestHandleInC:
    """LogsinkHandler.handle runs in C (logsink._fastlog) for plain records; whatever a user set keeps working."""

    def setup_handler(self, daemon, request, **kw):
        d = daemon("io_uring")
        handler = kw.pop("handler_class", LogsinkHandler)("c", socket=d.sock, **kw)
        return d, alone_on_logger(f"render.c.{request.node.name}", handler, request), handler

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


class TestFastLogger:
    """FastLogger skips the LogRecord only when a plain LogsinkHandler is the record's only reader, with the same bytes."""

    @pytest.fixture
    def sink(self, daemon, request):
        """(daemon, logger, handler): a LogsinkHandler (fast_loggers on) alone on a non-propagating logger of this test."""
        import logsink.logging as ll

        d = daemon("io_uring")
        handler = ll.LogsinkHandler("fast", socket=d.sock)
        return d, alone_on_logger(f"render.fast.{request.node.name}", handler, request), handler

    @staticmethod
    def direct() -> int:
        import logsink._fastlog as fastlog

        return fastlog.logging_stats()["direct"]

    @staticmethod
    def lines(d, handler) -> list[bytes]:
        handler.flush()
        return d.log("fast").read_bytes().splitlines(keepends=True)

    def test_existing_and_new_plain_loggers_become_fast_others_stay(self, daemon):
        """Creating the handler turns plain Logger instances (and later ones) into FastLogger; a library's own Logger subclass and fast_loggers=False are left alone."""
        import logsink.logging as ll

        class Own(logging.Logger):
            pass

        d = daemon("io_uring")
        plain = logging.Logger.manager.getLogger("render.fast.before")
        plain.__class__ = logging.Logger
        own = Own("render.fast.own")
        logging.Logger.manager.loggerDict["render.fast.own"] = own
        try:
            h = ll.LogsinkHandler("fast", socket=d.sock, fast_loggers=False)
            h.close()
            assert type(plain) is logging.Logger
            h = ll.LogsinkHandler("fast", socket=d.sock)
            h.close()
            assert type(plain) is ll.FastLogger and type(own) is Own
            assert type(logging.getLogger("render.fast.after.creation")) is ll.FastLogger
        finally:
            del logging.Logger.manager.loggerDict["render.fast.own"]

    def test_direct_lines_equal_the_formatters(self, sink):
        """Records rendered without a LogRecord are byte-identical to JsonFormatter.format of the record logging would have made."""
        d, logger, handler = sink
        logger.handlers[:] = [handler]  # pytest's log capture joins non-propagating loggers for the test's call
        calls = [(logging.INFO, "plain", ()), (logging.WARNING, "args %s %d %r", ("é\n\"", 5, b"x")),
                 (logging.ERROR, "mapping %(a)s", ({"a": "A"},)), (logging.DEBUG, "empty mapping %s", ({},)),
                 (logging.CRITICAL, 'ctl \x00\x1f\x7f \u2028 😀 "q" \\', ())]
        before = self.direct()
        for level, msg, args in calls:
            logger.log(level, msg, *args)
        assert self.direct() - before == len(calls), "not every record took the direct path"
        got = self.lines(d, handler)
        fmt = JsonFormatter()
        for line, (level, msg, args) in zip(got, calls, strict=True):
            record = logging.LogRecord(logger.name, level, __file__, 1, msg, args, None)
            ts = json.loads(line)["timestamp"]
            import datetime

            record.created = datetime.datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp() + 0.0005
            assert line == fmt.format(record).encode() + b"\n"

    @pytest.mark.parametrize("case", ["exc_info", "extra", "stack_info", "second_handler", "handler_filter", "logger_filter",
                                      "handler_level", "formatter", "disabled", "record_factory"])
    def test_anything_observable_makes_the_record(self, sink, request, case):
        """Whenever something could see the record (exc_info, extra, stack_info, another handler, filters, levels, a formatter, a factory), the stdlib path runs, with the caller's file, line and function."""
        d, logger, handler = sink
        logger.handlers[:] = [handler]  # pytest's log capture joins non-propagating loggers for the test's call
        seen: list[logging.LogRecord] = []

        class Capture(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                seen.append(record)

        kw: dict = {}
        if case == "exc_info":
            kw["exc_info"] = (ValueError, ValueError("v"), None)
        elif case == "extra":
            kw["extra"] = {"field": 1}
        elif case == "stack_info":
            kw["stack_info"] = True
        elif case == "second_handler":
            logger.addHandler(Capture())
        elif case == "handler_filter":
            handler.addFilter(lambda r: seen.append(r) or True)
        elif case == "logger_filter":
            logger.addFilter(lambda r: seen.append(r) or True)
        elif case == "handler_level":
            handler.setLevel(logging.ERROR)
        elif case == "formatter":
            handler.setFormatter(logging.Formatter("%(funcName)s:%(lineno)d %(message)s"))
        elif case == "disabled":
            logger.disabled = True
        elif case == "record_factory":
            old = logging.getLogRecordFactory()

            def factory(*a, **k):
                r = old(*a, **k)
                seen.append(r)
                return r

            logging.setLogRecordFactory(factory)
            request.addfinalizer(lambda: logging.setLogRecordFactory(old))
        before = self.direct()
        logger.info("observed %s", "here", **kw); line = sys._getframe().f_lineno  # noqa: E702
        assert self.direct() == before, f"{case}: the record was skipped"
        if case == "formatter":
            assert self.lines(d, handler) == [f"test_anything_observable_makes_the_record:{line} observed here\n".encode()]
        elif case in ("second_handler", "handler_filter", "logger_filter", "record_factory"):
            assert seen and seen[0].funcName == "test_anything_observable_makes_the_record" and seen[0].lineno == line
            assert seen[0].pathname == __file__

    def test_root_logger_functions_take_the_direct_path(self, daemon, request):
        """logging.info() through the root logger with only a LogsinkHandler on it renders directly too."""
        import logsink.logging as ll

        d = daemon("io_uring")
        root = logging.getLogger()
        saved = root.handlers[:], root.level
        handler = ll.LogsinkHandler("fast", socket=d.sock)
        root.handlers[:] = [handler]
        root.setLevel(logging.INFO)
        try:
            assert isinstance(root, ll.FastLogger)
            before = self.direct()
            logging.info("from the root %d", 1)
            assert self.direct() == before + 1
            assert json.loads(self.lines(d, handler)[0])["logger"] == "root"
        finally:
            root.handlers[:], _ = saved[0], root.setLevel(saved[1])
            handler.close()
