"""LogsinkHandler's native rendering writes exactly the bytes JsonFormatter.format() would."""

from __future__ import annotations

import logging

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
