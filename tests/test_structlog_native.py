"""The fused structlog stage (logsink._fastlog, native/ls_fastlog.c): byte-identical to structlog's
own processors and orjson (or stdlib json), falls back to them for what it cannot render exactly."""

from __future__ import annotations

import collections
import dataclasses
import datetime
import decimal
import enum
import json
import math
import os
import random
import struct
import uuid
from pathlib import Path
from typing import Any

import orjson  # in the test extra
import pytest
import structlog

import logsink.structlog as lsk_structlog
from logsink import _fastlog  # type: ignore[attr-defined]  # built by setup.py (ext_modules)

FLUSH_TIMEOUT = 20.0
ORJSON_TYPES = (str, int, float, dict, list, tuple, datetime.date, datetime.time, uuid.UUID, enum.Enum, orjson.Fragment)
STDLIB_TYPES = (str, int, float, dict, list, tuple)


def c_orjson(obj: Any) -> bytes | None:
    return _fastlog.render(obj, str, ORJSON_TYPES, False)


def c_stdlib(obj: Any) -> bytes | None:
    return _fastlog.render(obj, str, STDLIB_TYPES, True)


class Color(enum.Enum):
    RED = 1


class Num(enum.IntEnum):
    ONE = 1


class StrSub(str):
    pass


class IntSub(int):
    pass


class FloatSub(float):
    pass


class DictSub(dict):
    pass


@dataclasses.dataclass
class Point:
    x: int
    y: int


class Opaque:
    def __str__(self) -> str:
        return "opaque \u00e9\n"


Pair = collections.namedtuple("Pair", "a b")

# Values the C renderer writes itself: each must come out exactly as orjson.dumps(default=str) writes it.
RENDERED: list[Any] = [
    "", "plain ascii", "unicode \u00e9\u4e2d\U0001f600 \u2028\u2029", "quote \" backslash \\ slash /",
    "".join(chr(i) for i in range(0x80)), "\x7f\x80\xff", "tab\tnl\ncr\rff\fbs\b",
    0, 1, -1, 2**31, 2**53 + 1, 2**63 - 1, 2**63, 2**64 - 1, -(2**63), True, False, None,
    0.0, -0.0, 1.0, 0.1, 1e16, 1e15, 1.5e-5, 2.5e-05, 1e-5, 1e-6, 1e-7, 1.23e-10, 1e21, 1e22, 1e100, 1.7976931348623157e308,
    5e-324, 12345.678, float("inf"), float("-inf"), float("nan"),
    [], {}, (), [1, "a", None, [2, [3, {"k": "v"}]]], (1, 2.5, "t"),
    {"z": 1, "a": 2, "m": {"nested": [True, False, None], "deep": {"deeper": {"deepest": "x"}}}},
    {"key \u00e9 \"quoted\"\n": "value"},
    b"bytes \x00\xff", bytearray(b"ba"), memoryview(b"mv") and b"mv", {1, 2} and frozenset(), complex(1, 2),
    decimal.Decimal("1.10"), Opaque(), Path("/tmp/x"), [b"in a list", {"in": b"a dict"}],
]
# Values the C renderer must refuse (the event then takes the Python path, which raises or renders them).
REFUSED: list[Any] = [
    2**64, -(2**63) - 1, 2**200, "lone surrogate \ud800", {1: "int key"}, {"a": {None: 1}},
    datetime.datetime(2020, 1, 2, 3, 4, 5), datetime.date(2020, 1, 2), datetime.time(1, 2), uuid.UUID(int=5),
    Color.RED, Num.ONE, StrSub("s"), IntSub(3), FloatSub(1.5), DictSub(a=1), Point(1, 2), Pair(1, 2),
    orjson.Fragment(b"[1]"),
]


def random_doubles(n: int, seed: int = 12) -> list[float]:
    rnd = random.Random(seed)
    out = [10.0**k for k in range(-323, 308)] + [1.5 * 10.0**k for k in range(-320, 300)]
    out += [rnd.random() * 10.0 ** rnd.randint(-30, 30) for _ in range(n)]
    out += [struct.unpack("d", struct.pack("Q", rnd.getrandbits(64)))[0] for _ in range(n)]
    return out + [-v for v in out[:2000]]


class TestRenderLikeOrjson:
    @pytest.mark.parametrize("value", RENDERED, ids=lambda v: type(v).__name__)
    def test_value_renders_as_orjson_writes_it(self, value):
        """Each corpus value, alone and inside a dict, comes out byte-identical to orjson.dumps(default=str)."""
        assert c_orjson(value) == orjson.dumps(value, default=str)
        assert c_orjson({"v": value, "after": 1}) == orjson.dumps({"v": value, "after": 1}, default=str)

    @pytest.mark.parametrize("value", REFUSED, ids=lambda v: type(v).__name__)
    def test_value_not_rendered_exactly_is_refused(self, value):
        """A value the C renderer would not write as orjson does (or orjson rejects) makes render() return None."""
        assert c_orjson(value) is None
        assert c_orjson({"ok": 1, "v": [value]}) is None

    def test_doubles_render_with_orjson_digits_and_layout(self):
        """Over 100k doubles (every decade, random mantissas, random bit patterns) the float text equals orjson's."""
        values = random_doubles(50_000)
        got = c_orjson(values)
        assert got == orjson.dumps(values), "float layout differs from orjson's"

    def test_key_order_is_insertion_order(self):
        """Keys come out in the dict's insertion order, not sorted."""
        d = {k: i for i, k in enumerate(["zeta", "alpha", "mid", "event", "level"])}
        assert c_orjson(d) == orjson.dumps(d) == b'{"zeta":0,"alpha":1,"mid":2,"event":3,"level":4}'

    def test_default_result_is_rendered_recursively(self):
        """default's return value is serialized like any value (orjson does the same), here a dict from a custom default."""
        value = {"o": Opaque()}
        assert _fastlog.render(value, lambda o: {"wrapped": [str(o)]}, ORJSON_TYPES, False) == orjson.dumps(value, default=lambda o: {"wrapped": [str(o)]})

    def test_default_that_raises_is_refused(self):
        """A default that raises leaves the value to the Python path (which raises orjson's error)."""
        def bad(o: Any) -> Any:
            raise RuntimeError("no")

        assert _fastlog.render({"o": Opaque()}, bad, ORJSON_TYPES, False) is None

    def test_deep_nesting_is_refused_not_crashed(self):
        """Nesting deeper than the renderer's limit is refused (orjson itself stops at 255 levels)."""
        deep: Any = "leaf"
        for _ in range(300):
            deep = [deep]
        assert c_orjson(deep) is None


class TestRenderLikeStdlibJson:
    @pytest.mark.parametrize("value", [v for v in RENDERED] + [2**64, 2**200, -(2**70)], ids=lambda v: type(v).__name__)
    def test_value_renders_as_json_dumps_writes_it(self, value):
        """Without orjson, the stage renders json.dumps(separators=(",", ":"), ensure_ascii=False, default=str) exactly."""
        assert c_stdlib({"v": value}) == lsk_structlog._serialize_json({"v": value}).encode()

    def test_doubles_render_as_json_dumps(self):
        """Doubles (including inf and nan, which json writes as Infinity/NaN) come out as json.dumps writes them."""
        values = random_doubles(5_000) + [math.inf, -math.inf, math.nan]
        assert c_stdlib(values) == lsk_structlog._serialize_json(values).encode()


class TestTimestamp:
    def test_iso_utc_matches_timestamper(self):
        """iso_utc(sec, usec) is TimeStamper(fmt="iso", utc=True)'s text, with and without a fraction."""
        rnd = random.Random(3)
        for _ in range(20_000):
            sec, usec = rnd.randint(0, 4_000_000_000), rnd.choice([0, rnd.randint(0, 999_999)])
            dt = datetime.datetime.fromtimestamp(sec, tz=datetime.UTC).replace(microsecond=usec)
            assert _fastlog.iso_utc(sec, usec) == dt.isoformat().replace("+00:00", "Z")


# -- end to end: the fused stage against structlog's own processors ------------------------------
@pytest.fixture
def fused(daemon):
    """configure() with the default processors against a fresh daemon: (daemon, factory, stats before)."""
    structlog.reset_defaults()
    structlog.contextvars.clear_contextvars()
    d = daemon("io_uring")
    factory = lsk_structlog.configure("app", socket=d.sock)
    yield d, factory
    try:
        if factory._client is not None:
            factory._client.close()
    finally:
        structlog.reset_defaults()
        structlog.contextvars.clear_contextvars()


def stream_lines(d: Any, factory: Any) -> list[bytes]:
    factory.client.flush(timeout=FLUSH_TIMEOUT)
    return (d.dir / "app.log").read_bytes().splitlines(keepends=True)


def python_line(method: str, event: Any, kw: dict[str, Any], context: dict[str, Any], timestamp: str) -> bytes:
    """What structlog's own path renders for this call with configure()'s processors, the timestamp fixed."""
    procs = lsk_structlog._default_processors()
    procs[2] = lambda _l, _m, ed: {**ed, "timestamp": timestamp} if "timestamp" not in ed else (ed.__setitem__("timestamp", timestamp) or ed)
    ed: Any = dict(context)
    ed.update(kw)
    ed["event"] = event
    for p in procs:
        ed = p(None, method, ed)
    return (ed.encode() if isinstance(ed, str) else ed) + b"\n"


EVENTS: list[tuple[str, dict[str, Any]]] = [
    ("plain", {}),
    ("fields", {"method": "GET", "path": "/api/v1/items/00000001", "status": 200, "ratio": 0.25, "ok": True, "none": None}),
    ("unicode \u00e9\U0001f600\n\x01", {"k\u00e9y": "v\u2028", "ctl": "\x00\x1f\x7f"}),
    ("nested", {"d": {"a": [1, {"b": (2, 3)}], "e": {}}, "l": [[], [[]]]}),
    ("non-json via str", {"b": b"\x00raw", "o": Opaque(), "dec": decimal.Decimal("2.50"), "s": {1}, "c": 1j}),
    ("floats", {"inf": float("inf"), "nan": float("nan"), "tiny": 2.5e-05, "big": 1e16, "neg": -0.0, "e7": 1e-7}),
    ("ints", {"max": 2**64 - 1, "min": -(2**63), "zero": 0}),
    ("overrides", {"level": "custom", "timestamp": "user-ts", "event_extra": 1}),
]


class TestFusedStage:
    def test_events_are_byte_identical_to_structlog_with_orjson(self, fused):
        """Every corpus event (unicode, control chars, nesting, non-JSON types, floats, 64-bit ints, key overrides) lands as structlog's processors and orjson render it."""
        d, factory = fused
        stats0 = lsk_structlog.native_stats()
        log = structlog.get_logger().bind(bound="yes", n=1)
        structlog.contextvars.bind_contextvars(request="r-1", user="\u00e9")
        for event, kw in EVENTS:
            log.info(event, **kw)
        log.warning("warned", x=1)
        log.warn("warned alias")
        log.error("erred %s and %d", "formatted", 5)
        lines = stream_lines(d, factory)
        assert len(lines) == len(EVENTS) + 3
        calls = [("info", e, kw) for e, kw in EVENTS] + [("warning", "warned", {"x": 1}), ("warning", "warned alias", {}), ("error", "erred formatted and 5", {})]
        context = {"bound": "yes", "n": 1}
        for line, (method, event, kw) in zip(lines, calls, strict=True):
            ts = json.loads(line)["timestamp"]
            if kw.get("timestamp") != "user-ts":
                assert line == python_line(method, event, kw, context, ts), f"fused line differs for {event!r}"
        stats1 = lsk_structlog.native_stats()
        assert stats1["fused"] - stats0["fused"] == len(lines), "not every event took the fused path"
        assert stats1["fallbacks"] == stats0["fallbacks"]

    def test_contextvars_merge_in_structlog_order_without_overriding(self, fused):
        """Context variables are merged as merge_contextvars does: bound keys win, unset (Ellipsis) ones are skipped."""
        d, factory = fused
        for i in range(20):
            structlog.contextvars.bind_contextvars(**{f"cv{i}": i})
        structlog.contextvars.bind_contextvars(bound="from contextvars")
        structlog.contextvars.unbind_contextvars("cv3")
        structlog.get_logger().bind(bound="from bind").info("merged", cv5="from kw")
        (line,) = stream_lines(d, factory)
        ed: dict[str, Any] = {"bound": "from bind", "cv5": "from kw", "event": "merged"}
        structlog.contextvars.merge_contextvars(None, "info", ed)
        assert "cv3" not in ed and ed["bound"] == "from bind" and ed["cv5"] == "from kw"
        ts = json.loads(line)["timestamp"]
        want = lsk_structlog._default_processors()[5](None, "info", {**ed, "level": "info", "timestamp": ts})
        assert line == want + b"\n"

    def test_timestamp_is_now_in_utc(self, fused):
        """The fused timestamp is the time of the call, ISO 8601 in UTC with a Z."""
        d, factory = fused
        before = datetime.datetime.now(datetime.UTC)
        structlog.get_logger().info("when")
        after = datetime.datetime.now(datetime.UTC)
        (line,) = stream_lines(d, factory)
        text = json.loads(line)["timestamp"]
        assert text.endswith("Z")
        assert before <= datetime.datetime.fromisoformat(text.replace("Z", "+00:00")) <= after

    def test_value_it_cannot_render_falls_back_and_is_counted(self, fused):
        """An event holding a datetime or an enum goes through the Python renderer (same bytes) and counts as a fallback."""
        d, factory = fused
        s0 = lsk_structlog.native_stats()
        when = datetime.datetime(2024, 5, 6, 7, 8, 9, 10)
        structlog.get_logger().info("fallback", when=when, color=Color.RED, sub=StrSub("s"))
        (line,) = stream_lines(d, factory)
        ts = json.loads(line)["timestamp"]
        assert line == python_line("info", "fallback", {"when": when, "color": Color.RED, "sub": StrSub("s")}, {}, ts)
        assert json.loads(line)["when"] == "2024-05-06T07:08:09.000010"
        s1 = lsk_structlog.native_stats()
        assert s1["fallbacks"] - s0["fallbacks"] == 1

    def test_int_beyond_64_bits_raises_as_orjson_does(self, fused):
        """An int orjson rejects raises orjson's error to the caller, as structlog's own path would."""
        with pytest.raises(TypeError, match="64-bit"):
            structlog.get_logger().info("big", n=2**64)

    def test_exception_text_is_formatted_as_format_exc_info_does(self, fused):
        """log.exception() inside an except block carries the traceback text of format_exc_info."""
        d, factory = fused
        try:
            raise ValueError("boom \u00e9")
        except ValueError:
            structlog.get_logger().exception("failed", attempt=2)
        (line,) = stream_lines(d, factory)
        doc = json.loads(line)
        assert doc["level"] == "error" and doc["attempt"] == 2
        assert doc["exception"].startswith("Traceback") and "ValueError: boom \u00e9" in doc["exception"]
        assert "exc_info" not in doc

    def test_stack_info_points_at_the_caller_not_logsink(self, fused):
        """stack_info=True renders the stack down to the calling function, without logsink's own frame."""
        d, factory = fused

        def caller_here() -> None:
            structlog.get_logger().info("stack", stack_info=True)

        caller_here()
        (line,) = stream_lines(d, factory)
        stack = json.loads(line)["stack"]
        assert stack.startswith("Stack (most recent call last):")
        assert "caller_here" in stack.splitlines()[-2] or "caller_here" in stack.splitlines()[-1]
        assert "logsink/structlog.py" not in stack

    def test_level_methods_keep_structlogs_signature(self, fused):
        """A level method without an event raises TypeError as structlog's does; positional args interpolate (a lone mapping too)."""
        d, factory = fused
        log = structlog.get_logger().bind()
        with pytest.raises(TypeError, match="event"):
            log.info()
        log.info("%(who)s says %(what)s", {"who": "a", "what": "b"})
        log.info("%s and %s", "x", "y", k=1)
        assert [json.loads(x)["event"] for x in stream_lines(d, factory)] == ["a says b", "x and y"]

    def test_filtered_level_is_structlogs_no_op(self, daemon):
        """Below the configured level the method is structlog's own no-op, so a filtered call costs what structlog's filtering logger costs."""
        structlog.reset_defaults()
        try:
            d = daemon("io_uring")
            factory = lsk_structlog.configure("app", socket=d.sock, level=20)
            log = structlog.get_logger().bind()
            assert type(log).debug is structlog._native._nop
            assert type(log).info is not structlog._native._nop
            assert isinstance(log, structlog.make_filtering_bound_logger(20))
            log.debug("dropped")
            log.info("kept")
            lines = stream_lines(d, factory)
            assert [json.loads(x)["event"] for x in lines] == ["kept"]
            factory.client.close()
        finally:
            structlog.reset_defaults()

    def test_custom_processors_take_structlogs_python_path(self, daemon):
        """A processors list of the user's runs through structlog unchanged (nothing fused, output per that list)."""
        structlog.reset_defaults()
        try:
            d = daemon("io_uring")
            s0 = lsk_structlog.native_stats()
            factory = lsk_structlog.configure("app", socket=d.sock, processors=[structlog.processors.KeyValueRenderer(key_order=["event"])])
            structlog.get_logger().info("custom", a=1)
            assert stream_lines(d, factory) == [b"event='custom' a=1\n"]
            assert lsk_structlog.native_stats() == s0
            factory.client.close()
        finally:
            structlog.reset_defaults()

    def test_processors_changed_after_configure_are_honoured(self, fused):
        """Processors mutated after configure() make the stage step aside: the new chain runs in Python."""
        d, factory = fused
        procs = structlog.get_config()["processors"]
        procs.insert(0, lambda _l, _m, ed: {**ed, "added": "by user"})
        structlog.get_logger().info("changed")
        (line,) = stream_lines(d, factory)
        assert json.loads(line)["added"] == "by user"

    def test_context_class_of_the_users_takes_structlogs_path(self, fused):
        """With structlog's context_class set to a non-dict mapping, events still land (structlog's own path copies it)."""
        import collections.abc

        class Ctx(collections.abc.MutableMapping):
            def __init__(self, *a: Any, **k: Any) -> None:
                self.d = dict(*a, **k)

            def __getitem__(self, k: str) -> Any:
                return self.d[k]

            def __setitem__(self, k: str, v: Any) -> None:
                self.d[k] = v

            def __delitem__(self, k: str) -> None:
                del self.d[k]

            def __iter__(self) -> Any:
                return iter(self.d)

            def __len__(self) -> int:
                return len(self.d)

            def copy(self) -> dict[str, Any]:
                return dict(self.d)

        d, factory = fused
        structlog.configure(context_class=Ctx)
        structlog.get_logger().bind(ctx="mapping").info("custom context")
        (line,) = stream_lines(d, factory)
        doc = json.loads(line)
        assert doc["ctx"] == "mapping" and doc["event"] == "custom context"

    def test_closed_client_raises_like_client_write(self, fused):
        """Logging after the client closed raises the Client's ValueError, not a crash."""
        d, factory = fused
        structlog.get_logger().info("before")
        factory.client.close()
        with pytest.raises(ValueError, match="closed"):
            structlog.get_logger().info("after")

    def test_forked_child_reconnects_and_logs(self, fused):
        """In a forked child the stage reconnects (as Client.write does) and the child's events land."""
        d, factory = fused
        structlog.get_logger().info("parent")
        factory.client.flush(timeout=FLUSH_TIMEOUT)
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                structlog.get_logger().info("child")
                factory.client.flush(timeout=FLUSH_TIMEOUT)
                code = 0
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        structlog.get_logger().info("parent again")
        events = sorted(json.loads(x)["event"] for x in stream_lines(d, factory))
        assert events == ["child", "parent", "parent again"]


class _CtrlCOnce:
    """Raises KeyboardInterrupt once from __str__, as a Ctrl-C arriving while a value is formatted would."""

    def __init__(self) -> None:
        self.calls = 0

    def __str__(self) -> str:
        self.calls += 1
        if self.calls == 1:
            raise KeyboardInterrupt
        return "later"


class TestReviewFixes:
    def test_event_as_keyword_is_structlogs_behaviour(self, fused):
        """log.info(event="x", a=1) writes the event like structlog does, and a duplicate event raises TypeError (the fused method demanded a positional event)."""
        d, factory = fused
        log = structlog.get_logger()
        log.info(event="kw event", a=1)
        with pytest.raises(TypeError):
            log.info("positional", event="again")
        lines = stream_lines(d, factory)
        assert len(lines) == 1 and json.loads(lines[0])["event"] == "kw event" and json.loads(lines[0])["a"] == 1

    def test_keyboard_interrupt_in_a_value_propagates_and_runs_once(self, fused):
        """A KeyboardInterrupt raised while the fused stage formats a value propagates (it was swallowed and the value formatted again)."""
        d, factory = fused
        v = _CtrlCOnce()
        with pytest.raises(KeyboardInterrupt):
            structlog.get_logger().info("ctrl-c", v=v)
        assert v.calls == 1

    def test_keyboard_interrupt_in_a_fastlogger_message_propagates(self, daemon):
        """FastLogger: a KeyboardInterrupt from the message's __str__ propagates as with the stdlib Logger, after one call."""
        import logging

        from logsink import logging as lsk_logging

        d = daemon("io_uring")
        h = lsk_logging.LogsinkHandler("app", socket=d.sock)
        lg = lsk_logging.FastLogger("review-ki")
        lg.addHandler(h)
        lg.propagate = False
        lg.setLevel(logging.INFO)
        msg = _CtrlCOnce()
        try:
            with pytest.raises(KeyboardInterrupt):
                lg.info(msg)
            assert msg.calls == 1
        finally:
            h.close()
