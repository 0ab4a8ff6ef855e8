"""The fuzz harness: a live daemon per test module, good producers beside every example, and the
invariants checked after each example.

After every example (``with target.example() as ex: ...``):

1. the daemon process is alive;
2. it closed every fuzzed connection once we ended it, and everything it answered was a well-formed
   control message (known type, documented error code, a reason);
3. each good producer (a real ``logsink.Client``) got every record it wrote into its file exactly:
   in order, none missing, none torn, glued or interleaved;
4. every line of every output file is whole (ends in ``\\n``) and is either the next good record or
   a run of bytes the fuzzed producer sent towards that stream, so nothing of the fuzzed producer
   is ever glued to a good record (and no NUL hole appears);
5. no file appears in the directory but the streams' own ``.log`` files;
6. the daemon's open fd count (``/proc/PID/fd``) is back under a fixed bound.

Nothing here reads the files more than once: each file is checked from where the last example's
check ended, so a long run costs the same per example from start to end.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from conftest import Daemon
from hypothesis import HealthCheck, Phase, settings
from hypothesis.database import DirectoryBasedExampleDatabase
from lsk_helpers import RawProducer, RawTcpProducer, protocol, record, split_lines, wait_for

FUZZ_DIR = Path(__file__).resolve().parent
CORPUS_DIR = FUZZ_DIR / "corpus"

# -- run modes ------------------------------------------------------------------------------------
# CI runs a small, derandomized slice; LOGSINK_FUZZ_EXAMPLES=N (or LOGSINK_FUZZ_PROFILE=long) runs N
# random examples per target with shrinking and a failure database (README.md, "Long runs").
EXAMPLES = os.environ.get("LOGSINK_FUZZ_EXAMPLES")
PROFILE = os.environ.get("LOGSINK_FUZZ_PROFILE") or ("long" if EXAMPLES else "ci")
if PROFILE not in ("ci", "long"):
    raise ValueError(f"LOGSINK_FUZZ_PROFILE={PROFILE!r}: use 'ci' or 'long'")
LONG = PROFILE == "long"
LONG_DEFAULT_EXAMPLES = 1_000_000
DATABASE_DIR = Path(os.environ.get("LOGSINK_FUZZ_DB") or FUZZ_DIR / ".hypothesis")
ENGINE = os.environ.get("LOGSINK_FUZZ_ENGINE", "auto")
# A long run writes a few KiB per example: rotate a test's files (SIGHUP) once one is this big.
ROTATE_BYTES = int(os.environ.get("LOGSINK_FUZZ_ROTATE_BYTES", str(64 << 20)))

_HEALTH = [HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large,
           HealthCheck.filter_too_much, HealthCheck.large_base_example]


def fuzz_settings(ci_examples: int) -> settings:
    """Hypothesis settings for one fuzz target: ``ci_examples`` derandomized examples without
    shrinking in CI (reproducible, bounded time); in a long run as many random examples as asked,
    shrunk on failure and saved in DATABASE_DIR."""
    common: dict[str, Any] = dict(deadline=None, suppress_health_check=_HEALTH, report_multiple_bugs=False, print_blob=True)
    if LONG:
        n = int(EXAMPLES or LONG_DEFAULT_EXAMPLES)
        return settings(max_examples=n, derandomize=False, database=DirectoryBasedExampleDatabase(str(DATABASE_DIR)), **common)
    n = int(EXAMPLES) if EXAMPLES else ci_examples
    # No shrinking in CI: a failure is reported with the example as generated, in seconds, not minutes.
    return settings(max_examples=n, derandomize=True, database=None, phases=(Phase.explicit, Phase.generate), **common)


# -- invariants' bounds ---------------------------------------------------------------------------
GOOD_PER_EXAMPLE = 6        # records each good producer writes per example (half before, half after)
GOOD_FLUSH_INTERVAL = 0.002 # the half written before an example is handed over while it runs
FLUSH_TIMEOUT = 10.0        # a good flush normally takes milliseconds; this is "it never came back"
CLOSE_TIMEOUT = 10.0        # the daemon closes a connection we ended within this
QUIET_TIMEOUT = 10.0        # fuzzed producers leave the daemon's status within this
FD_TIMEOUT = 10.0           # the daemon's fd count comes back under its bound within this
FD_SLACK = 16               # fds the daemon may hold above a test's baseline between examples
IO_TIMEOUT = 10.0           # one send or pipe write may wait this long for the daemon to read

ERROR_CODES = frozenset({
    protocol.E_BAD_MESSAGE, protocol.E_BAD_VERSION, protocol.E_BAD_STREAM, protocol.E_BAD_FD, protocol.E_BAD_FRAME,
    protocol.E_PRODUCER_DIED, protocol.E_WRITE_FAILED, protocol.E_SHUTTING_DOWN, protocol.E_TOO_MANY,
    protocol.E_AUTH, protocol.E_INTERNAL, protocol.E_FORBIDDEN, protocol.E_TOO_MANY_FDS, protocol.E_FILE_REFUSED,
})


# -- the live daemon ------------------------------------------------------------------------------
class LiveDaemon:
    """One ``logsink serve`` shared by a test module's fuzz targets."""

    def __init__(self, d: Daemon, address: str | None):
        self.d = d
        self.address = address
        self.streams: set[str] = set()  # every stream a target may create; any other file is a failure
        self.good_ids: set[int] = set()  # producer ids of the live targets' good clients

    @property
    def pid(self) -> int:
        return self.d.pid

    @property
    def sock(self) -> str:
        return self.d.sock

    @property
    def dir(self) -> Path:
        return self.d.dir

    def assert_alive(self) -> None:
        rc = self.d.proc.poll()
        assert rc is None, f"the daemon died (exit {rc}); its stderr ends:\n{self.d.stderr()[-4000:]}"

    def fd_count(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def status(self) -> dict[str, Any]:
        """The daemon's status over a fresh control connection (in-process: no ``logsink status`` subprocess)."""
        raw = RawProducer(self.sock, timeout=IO_TIMEOUT)
        try:
            raw.send(protocol.encode({"t": protocol.STATUS}))
            msg = raw.next_message()
            assert msg is not None and msg["t"] == protocol.STATUS, f"expected a status reply, got {msg}"
            return msg["status"]
        finally:
            raw.close()


def start_live_daemon(root: Path, tcp: bool = False) -> LiveDaemon:
    extra: tuple[str, ...] = ()
    address = None
    if tcp:
        from peers import free_port  # the suite's way to pick a port (the daemon refuses port 0)

        port = free_port()
        address = f"tcp://127.0.0.1:{port}"
        extra = ("--listen", address)
    d = Daemon(root, ENGINE, extra).start()
    if tcp:
        def accepts() -> bool:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return True

        wait_for(accepts, 20, f"the daemon to listen on {address}")
    return LiveDaemon(d, address)


# -- raw connections ------------------------------------------------------------------------------
class PeerGone(Exception):
    """The daemon closed its end (a refused producer): what we meant to send does not matter any more."""


def send_all(sock: socket.socket, data: bytes, fds: Iterable[int] = ()) -> None:
    """Send ``data`` (with ``fds`` on its first byte) completely; PeerGone if the daemon hung up."""
    fds = list(fds)
    view = memoryview(data)
    try:
        if fds:
            n = socket.send_fds(sock, [view], fds)
            view = view[n:]
        if view:
            sock.sendall(view)
    except (BrokenPipeError, ConnectionResetError) as exc:
        raise PeerGone(str(exc)) from None
    except TimeoutError:
        raise AssertionError(f"the daemon did not read our connection for {sock.gettimeout()} s") from None


def pipe_write(w: int, data: bytes) -> None:
    """Write ``data`` to a pipe whose reader is the daemon; PeerGone once it closed the read end."""
    os.set_blocking(w, False)
    view = memoryview(data)
    deadline = time.monotonic() + IO_TIMEOUT
    while view:
        try:
            view = view[os.write(w, view):]
        except BrokenPipeError:
            raise PeerGone("the daemon closed the pipe") from None
        except BlockingIOError:
            left = deadline - time.monotonic()
            assert left > 0, f"the daemon did not read the producer's pipe for {IO_TIMEOUT} s"
            select.select([], [w], [], left)


@dataclass
class Conn:
    """One fuzzed connection of an example and what the daemon answered on it."""

    raw: RawProducer
    tcp: bool = False
    stream: str | None = None   # the stream its pipe bytes are aimed at (the HELLO's), if any
    replies: list[dict[str, Any]] = field(default_factory=list)

    def send(self, data: bytes, fds: Iterable[int] = ()) -> bool:
        """False (and nothing more to do) if the daemon already hung up."""
        try:
            send_all(self.raw.sock, data, fds)
            return True
        except PeerGone:
            return False

    def read_reply(self, timeout: float = IO_TIMEOUT) -> dict[str, Any] | None:
        """The next control message from the daemon, or None once it closed the connection."""
        msg = self.raw.next_message(timeout)
        if msg is not None:
            self.replies.append(msg)
        return msg

    def hello_reply(self) -> dict[str, Any] | None:
        """WELCOME or ERROR after a HELLO (None if the daemon closed without either)."""
        msg = self.read_reply()
        while msg is not None and msg["t"] == protocol.STATUS:
            msg = self.read_reply()
        return msg

    def end(self) -> None:
        """End our side: close the pipe's write end and half-close the connection."""
        self.raw.close_pipe()
        try:
            self.raw.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def read_to_eof(self) -> None:
        """Read everything the daemon says until it closes the connection (it must, once we ended ours)."""
        deadline = time.monotonic() + CLOSE_TIMEOUT
        while True:
            left = deadline - time.monotonic()
            assert left > 0, f"the daemon did not close a connection we ended within {CLOSE_TIMEOUT} s; it said {self.replies}"
            try:
                msg = self.raw.next_message(left)
            except protocol.ProtocolError as exc:
                raise AssertionError(f"the daemon sent an undecodable control frame: {exc}") from None
            if msg is None:
                return
            self.replies.append(msg)

    def check_replies(self) -> list[str]:
        """Problems with what the daemon answered (documented types and codes, one WELCOME before releases)."""
        problems = []
        kinds = [m["t"] for m in self.replies]
        for m in self.replies:
            if m["t"] not in (protocol.WELCOME, protocol.RELEASE, protocol.ERROR, protocol.STATUS):
                problems.append(f"the daemon sent a {m['t']!r} message to a client: {m}")
            if m["t"] == protocol.ERROR and (m["code"] not in ERROR_CODES or not m["reason"].strip()):
                problems.append(f"ERROR with an undocumented code or an empty reason: {m}")
        if kinds.count(protocol.WELCOME) > 1 or kinds.count(protocol.ERROR) > 1:
            problems.append(f"more than one WELCOME or ERROR on one connection: {kinds}")
        if protocol.RELEASE in kinds and protocol.WELCOME not in kinds[: kinds.index(protocol.RELEASE)]:
            problems.append(f"a RELEASE before any WELCOME: {kinds}")
        return problems


class Example:
    """What one example did: its connections and the bytes it aimed at each stream."""

    def __init__(self, target: Target):
        self.target = target
        self.conns: list[Conn] = []
        self.sent: dict[str, bytearray] = defaultdict(bytearray)

    def connect(self) -> Conn:
        c = Conn(RawProducer(self.target.live.sock, timeout=IO_TIMEOUT))
        self.conns.append(c)
        return c

    def connect_tcp(self) -> Conn:
        assert self.target.live.address, "this module's daemon has no TCP listener (set FUZZ_TCP = True)"
        c = Conn(RawTcpProducer(self.target.live.address, timeout=IO_TIMEOUT), tcp=True)
        self.conns.append(c)
        return c

    def write_pipe(self, conn: Conn, data: bytes) -> bool:
        """Write ``data`` on the connection's data path (its pipe, or the TCP connection), counted as
        aimed at its stream; False once the daemon hung up."""
        if conn.stream is not None:
            self.sent[conn.stream] += data
        try:
            if conn.tcp:
                send_all(conn.raw.sock, data)
            else:
                pipe_write(conn.raw.w, data)
            return True
        except PeerGone:
            return False

    def finish(self) -> list[str]:
        """End every connection, wait for the daemon to close each, and return reply problems."""
        problems = []
        for c in self.conns:
            c.end()
        for c in self.conns:
            c.read_to_eof()
            problems += c.check_replies()
        return problems

    def close(self) -> None:
        for c in self.conns:
            try:
                c.raw.close()
            except OSError:
                pass


# -- a test's streams and good producers ----------------------------------------------------------
@dataclass
class FileState:
    offset: int = 0                                       # checked up to here (a line boundary)
    next: dict[str, int] = field(default_factory=dict)    # good tag -> index of its next record


class Target:
    """A test's streams on the module's daemon, its good producers, and the per-file check state.

    ``app`` is shared by a good producer and the fuzzed one; ``other`` has only a good producer;
    ``extra`` streams (``fuzz_streams`` of them) only ever see fuzzed producers.
    """

    def __init__(self, live: LiveDaemon, prefix: str, *, tcp_good: bool = False, fuzz_streams: int = 0):
        import logsink

        self.live = live
        self.app, self.other = f"{prefix}app", f"{prefix}other"
        self.extra = [f"{prefix}f{i}" for i in range(fuzz_streams)]
        self.streams = [self.app, self.other, *self.extra]
        live.streams.update(self.streams)
        self.clients: dict[str, tuple[str, Any]] = {}
        self.written: dict[str, int] = {}
        self.files = {s: FileState() for s in self.streams}
        try:
            self._add_client("good-app", self.app, logsink.Client(self.app, socket=live.sock, flush_interval=GOOD_FLUSH_INTERVAL))
            self._add_client("good-other", self.other, logsink.Client(self.other, socket=live.sock, flush_interval=GOOD_FLUSH_INTERVAL))
            if tcp_good:
                self._add_client("good-tcp", self.app, logsink.Client(self.app, address=live.address, segment_size=65536,
                                                                      flush_interval=GOOD_FLUSH_INTERVAL))
        except BaseException:
            self.close()
            raise
        for s in self.streams:
            path = self.path(s)
            self.files[s].offset = path.stat().st_size if path.exists() else 0
        self._wait_quiet()
        self.fd_base = live.fd_count()
        self.fd_bound = self.fd_base + len(self.extra) + FD_SLACK
        self.examples = 0

    def _add_client(self, tag: str, stream: str, client: Any) -> None:
        self.clients[tag] = (stream, client)
        self.live.good_ids.add(client.producer_id)
        self.written[tag] = 0
        self.files[stream].next[tag] = 0

    def path(self, stream: str) -> Path:
        return self.live.dir / f"{stream}.log"

    def close(self) -> None:
        for _, client in self.clients.values():
            self.live.good_ids.discard(client.producer_id)
            client.close(timeout=FLUSH_TIMEOUT)

    # the good producers
    def good_write(self, n: int) -> None:
        for tag, (_, client) in self.clients.items():
            start = self.written[tag]
            client.write(b"".join(record(tag, i) for i in range(start, start + n)))
            self.written[tag] = start + n

    def good_flush(self, timeout: float = FLUSH_TIMEOUT) -> None:
        for tag, (_, client) in self.clients.items():
            client.flush(timeout=timeout)
            assert client.connected, f"good producer {tag} was disconnected by the daemon"

    def _wait_quiet(self) -> None:
        wait_for(lambda: {p["id"] for p in self.live.status()["producers"]} <= self.live.good_ids, QUIET_TIMEOUT,
                 "every producer but the good ones to leave the daemon's status")

    # one example
    @contextmanager
    def example(self) -> Iterator[Example]:
        """Run one example: good records go out before it (handed over while it runs, by the
        client's background flush) and after it; then every invariant is checked."""
        ex = Example(self)
        self.good_write(GOOD_PER_EXAMPLE // 2)
        try:
            yield ex
            problems = ex.finish()
        finally:
            ex.close()
        self.live.assert_alive()
        self._wait_quiet()
        self.good_write(GOOD_PER_EXAMPLE - GOOD_PER_EXAMPLE // 2)
        self.good_flush()
        self.live.assert_alive()
        for s in self.streams:
            problems += self.check_file(s, bytes(ex.sent.get(s, b"")))
        problems += self.check_dir()
        assert not problems, "\n".join(problems)
        wait_for(lambda: self.live.fd_count() <= self.fd_bound, FD_TIMEOUT,
                 f"the daemon's open fds to come back under {self.fd_bound} (baseline {self.fd_base}; now {self.live.fd_count()})")
        self.examples += 1
        self._maybe_rotate()

    # the checks
    def check_file(self, stream: str, fuzzed: bytes) -> list[str]:
        """Problems in the part of ``stream``'s file written since the last check (see module docstring)."""
        st = self.files[stream]
        path = self.path(stream)
        if path.is_symlink() or path.exists() and not path.is_file():
            return [f"{path} is not a regular file"]
        data = b""
        if path.exists():
            with open(path, "rb") as f:
                f.seek(st.offset)
                data = f.read()
        problems = []
        if data and not data.endswith(b"\n"):
            problems.append(f"{path} ends in a torn line: {data[-120:]!r}")
        pos = st.offset
        for line in split_lines(data):
            good = next((t for t, i in st.next.items() if line == record(t, i)), None)
            if good is not None:
                st.next[good] += 1
            elif not (line.endswith(b"\n") and line in fuzzed):
                problems.append(
                    f"{path} at offset {pos}: a line that is neither the next good record "
                    f"({', '.join(f'{t} #{i}' for t, i in st.next.items()) or 'none on this stream'}) nor bytes the fuzzed "
                    f"producer sent here whole: {line[:200]!r}" + (" (contains NUL)" if b"\0" in line else ""))
                break
            pos += len(line)
        for tag, i in st.next.items():
            if i != self.written[tag] and not problems:
                problems.append(f"{path}: good producer {tag} wrote {self.written[tag]} records, the file holds {i}")
        st.offset += len(data)
        return problems

    def check_dir(self) -> list[str]:
        allowed = {f"{s}.log" for s in self.live.streams} | {".logsink.lock"}  # the daemon's directory lock
        extra = sorted(p.name for p in self.live.dir.iterdir() if p.name not in allowed)
        return [f"unexpected entries in the daemon's directory: {extra}"] if extra else []

    def _maybe_rotate(self) -> None:
        """Long runs: once a file is big, move this test's files away and SIGHUP the daemon."""
        if not any(self.path(s).exists() and self.path(s).stat().st_size > ROTATE_BYTES for s in self.streams):
            return
        moved = []
        for s in self.streams:
            if self.path(s).exists():
                os.rename(self.path(s), self.path(s).with_suffix(".rotated"))
                moved.append(s)
        os.kill(self.live.pid, signal.SIGHUP)
        wait_for(lambda: all(self.path(s).exists() for s in moved), FD_TIMEOUT, "the daemon to reopen rotated files")
        for s in moved:
            self.path(s).with_suffix(".rotated").unlink()
            self.files[s].offset = 0


# -- what the daemon must answer ------------------------------------------------------------------
@dataclass
class Prediction:
    """What the daemon must answer to bytes sent on a fresh local control connection, worked out
    with the sans-io decoder it uses itself (``logsink.protocol``) and the rules of docs/protocol.md."""

    welcome: bool | None         # a WELCOME must (True) / must not (False) come; None: either
    codes: frozenset[str]        # the ERROR codes it may answer with (empty: no ERROR)
    must_error: bool             # an ERROR must come
    answers: bool                # something complete was sent, so a reply is worth waiting for


def predict(data: bytes, fds: int) -> Prediction:
    """``data`` sent on a fresh local control connection, ``fds`` fds attached to its first byte.

    The daemon decodes what one read returns all at once, so a decode error later in the bytes
    may pre-empt what came before it: then either outcome is allowed.
    """
    dec = protocol.ControlDecoder(protocol.MAX_CLIENT_MESSAGE)  # what the daemon takes from a client
    msgs: list[dict[str, Any]] = []
    decode_error = None
    pos = 0
    while pos + 4 <= len(data):
        n = int.from_bytes(data[pos : pos + 4], "big")
        try:
            got = dec.feed(data[pos : pos + 4 + n])
        except protocol.ProtocolError as exc:
            decode_error = exc.code
            break
        if not got:
            break
        msgs += got
        pos += 4 + n
    welcome, bad = False, None
    for m in msgs:
        if m["t"] == protocol.STATUS:
            continue
        if m["t"] != protocol.HELLO or welcome or m["transport"] not in protocol.LOCAL_TRANSPORTS:
            bad = protocol.E_BAD_MESSAGE
        elif fds != (protocol.HELLO_FDS_SHM if m["transport"] == "shm" else 1):
            bad = protocol.E_BAD_FD
        else:
            welcome = True
            continue
        break
    codes = frozenset(c for c in (bad, decode_error) if c is not None)
    if welcome and any(m["transport"] == "shm" for m in msgs if m["t"] == protocol.HELLO):
        # The harness passes a pipe and an arena the daemon checks: a sealed memfd is welcome, anything
        # else there is bad-frame (not a memfd, unsealed) or bad-fd (not a pipe).
        return Prediction(None, codes | {protocol.E_BAD_FRAME, protocol.E_BAD_FD}, bool(codes), True)
    # A decode error in the same read pre-empts a HELLO before it: then a WELCOME may or may not come.
    return Prediction(None if welcome and decode_error is not None else welcome, codes, bool(codes),
                      bool(msgs) or decode_error is not None)


def check_prediction(conn: Conn, want: Prediction) -> list[str]:
    kinds = [m["t"] for m in conn.replies]
    codes = [m["code"] for m in conn.replies if m["t"] == protocol.ERROR]
    problems = []
    if want.welcome is not None and (protocol.WELCOME in kinds) != want.welcome:
        problems.append(f"expected {'a' if want.welcome else 'no'} WELCOME, the daemon answered {conn.replies}")
    if any(c not in want.codes for c in codes) or want.must_error and not codes:
        problems.append(f"expected an ERROR with a code in {sorted(want.codes)}, the daemon answered {conn.replies}")
    return problems


# -- the saved corpus -----------------------------------------------------------------------------
def corpus(target: str, xfail: dict[str, str] | None = None) -> list[Any]:
    """``pytest.param``s for every seed file in ``corpus/<target>/`` (id: the file name); seeds named
    in ``xfail`` (file name -> reason) are marked strict xfail: they hit a defect fixed elsewhere."""
    xfail = dict(xfail or {})
    files = sorted((CORPUS_DIR / target).iterdir())
    assert files, f"no seeds in {CORPUS_DIR / target}"
    params = []
    for f in files:
        marks = [pytest.mark.xfail(strict=True, reason=xfail.pop(f.name))] if f.name in xfail else []
        params.append(pytest.param(f, id=f.name, marks=marks))
    assert not xfail, f"xfail marks for seeds that do not exist in corpus/{target}: {sorted(xfail)}"
    return params


def load_json_seed(path: Path) -> Any:
    return json.loads(path.read_text())
