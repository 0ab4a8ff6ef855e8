"""Shared helpers for the logsink test suite: record generation, file checks, raw producers, status.

Imported by conftest.py, the test modules and tests/producer.py (which runs in subprocesses), so it
depends only on the standard library and ``logsink.protocol``.
"""

from __future__ import annotations

import fcntl
import json
import mmap
import os
import select
import socket
import subprocess
import sys
import time
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any


class _LazyProtocol:
    """``logsink.protocol``, imported on first use (so a broken ``logsink`` package fails the tests that
    need it, not the import of this module)."""

    def __getattr__(self, name: str) -> Any:
        from logsink import protocol as mod

        return getattr(mod, name)


protocol = _LazyProtocol()

NUL = b"\0"
# Plain names, for parametrize and loops alike: conftest.py marks every test that gets "io_uring" as a
# parameter (and every daemon("io_uring")) to skip, with the reason, where the kernel refuses io_uring.
ENGINES = ("io_uring", "splice", "readwrite")
SPLICE_ENGINES = ("io_uring", "splice")

# Starts one io_uring engine and prints 0 or the -errno it got (a subprocess: a crash or an LD_PRELOAD
# shim stays there, and the test process never holds a ring).
_IO_URING_PROBE = """
from logsink._native import ffi, lib
out = ffi.new("struct ls_engine **")
r = lib.ls_engine_new(lib.LS_ENGINE_IO_URING, 1, 1, 1 << 16, out)
if r >= 0:
    lib.ls_engine_free(out[0])
print(r)
"""
_io_uring_reason: list[str | None] = []


def io_uring_unavailable() -> str | None:
    """Why the io_uring engine cannot run here (None if it can), probed once by starting one."""
    if not _io_uring_reason:
        _io_uring_reason.append(_probe_io_uring())
    return _io_uring_reason[0]


def _probe_io_uring() -> str | None:
    res = subprocess.run([sys.executable, "-c", _IO_URING_PROBE], capture_output=True, text=True, timeout=60)
    try:
        r = int(res.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return f"the io_uring probe failed (exit {res.returncode}): {res.stderr.strip()[-500:]}"
    if r >= 0:
        return None
    why = f"the kernel refuses io_uring (io_uring_setup: {os.strerror(-r)})"
    try:
        disabled = Path("/proc/sys/kernel/io_uring_disabled").read_text().strip()
    except OSError:
        disabled = "0"
    return why + (f"; kernel.io_uring_disabled={disabled}" if disabled != "0" else "")

# -- records --------------------------------------------------------------------------------------
_FILL = (b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_=+" * 8)


def record(tag: str, i: int, minlen: int = 20, maxlen: int = 300) -> bytes:
    """Record ``i`` of producer ``tag``: ``tag:i:filler\\n``, distinct, length in [minlen, maxlen].

    Deterministic and random-access (the length comes from a CRC of tag and i), so a checker can
    regenerate any prefix without knowing how many records the producer wrote.
    """
    head = b"%s:%08d:" % (tag.encode(), i)
    span = maxlen - minlen + 1
    length = minlen + zlib.crc32(head) % span
    fill = max(length - len(head) - 1, 1)
    start = i % 64
    return head + _FILL[start : start + fill] + b"\n"


def make_records(tag: str, n: int, start: int = 0, **kw: int) -> list[bytes]:
    return [record(tag, i, **kw) for i in range(start, start + n)]


def tag_of(line: bytes) -> str:
    return line.split(b":", 1)[0].decode("ascii", "replace")


def split_lines(data: bytes) -> list[bytes]:
    """Split file contents into lines that keep their ``\\n`` (a torn tail stays as is)."""
    lines = data.split(b"\n")
    out = [ln + b"\n" for ln in lines[:-1]]
    if lines[-1]:
        out.append(lines[-1])
    return out


def check_file(
    path: Path | str,
    expected: dict[str, list[bytes]],
    prefix_of: dict[str, Callable[[int], bytes]] | None = None,
) -> tuple[list[str], dict[str, list[bytes]]]:
    """Check a stream file: no NUL, ends with ``\\n``, every line belongs to a known producer tag.

    ``expected[tag]`` must equal that producer's lines exactly (in order). ``prefix_of[tag]`` is a
    generator of record i: that producer's lines must be records 0, 1, 2, ... (any length).
    Returns (problems, lines grouped by tag); an empty problem list means the file is right.
    """
    prefix_of = prefix_of or {}
    p = Path(path)
    problems: list[str] = []
    if not p.exists():
        data = b""
        if any(expected.values()):
            problems.append(f"{p} does not exist")
    else:
        data = p.read_bytes()
    if NUL in data:
        problems.append(f"{p} contains a NUL byte at offset {data.index(NUL)}")
    if data and not data.endswith(b"\n"):
        problems.append(f"{p} does not end with a newline (torn last line {data[-80:]!r})")
    groups: dict[str, list[bytes]] = {}
    for line in split_lines(data):
        groups.setdefault(tag_of(line), []).append(line)
    for tag, lines in groups.items():
        if tag not in expected and tag not in prefix_of:
            problems.append(f"{p}: {len(lines)} lines with unknown tag {tag!r}, e.g. {lines[0][:100]!r}")
    for tag, want in expected.items():
        got = groups.get(tag, [])
        if got != want:
            problems.append(f"{p}: producer {tag!r}: " + _diff(got, want))
    for tag, gen in prefix_of.items():
        got = groups.get(tag, [])
        for i, line in enumerate(got):
            if line != gen(i):
                problems.append(f"{p}: producer {tag!r} line {i} is {line[:100]!r}, expected {gen(i)[:100]!r}")
                break
    return problems, groups


def _diff(got: list[bytes], want: list[bytes]) -> str:
    if len(got) != len(want):
        msg = f"{len(got)} lines, expected {len(want)}"
    else:
        msg = "same count"
    for i, (a, b) in enumerate(zip(got, want, strict=False)):
        if a != b:
            return msg + f"; first difference at line {i}: {a[:100]!r} != {b[:100]!r}"
    return msg + "; one is a prefix of the other"


def assert_file(path: Path | str, expected: dict[str, list[bytes]], **kw: Any) -> dict[str, list[bytes]]:
    problems, groups = check_file(path, expected, **kw)
    assert not problems, "\n".join(problems)
    return groups


# -- waiting --------------------------------------------------------------------------------------
def wait_for(cond: Callable[[], Any], timeout: float, what: str, interval: float = 0.02) -> Any:
    """Poll ``cond`` until it returns a truthy value (returned) or fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while True:
        try:
            val = cond()
            if val:
                return val
        except Exception as exc:  # the condition may race with startup; report the last one
            last_exc = exc
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}" + (f" (last error: {last_exc!r})" if last_exc else ""))
        time.sleep(interval)


def read_line(proc: subprocess.Popen, timeout: float, what: str) -> str:
    """Read one line from ``proc.stdout`` within ``timeout`` seconds."""
    fd = proc.stdout.fileno()
    ready, _, _ = select.select([fd], [], [], timeout)
    assert ready, f"timed out after {timeout}s waiting for {what} from pid {proc.pid}"
    line = proc.stdout.readline()
    assert line, f"pid {proc.pid} closed stdout (exit {proc.poll()}) before {what}"
    return line.decode().strip()


# -- status ---------------------------------------------------------------------------------------
def status(sock: str | Path, text: bool = False) -> Any:
    """``logsink status --socket SOCK --json`` parsed (or the text output with ``text=True``)."""
    cmd = [sys.executable, "-m", "logsink", "status", "--socket", str(sock)]
    if not text:
        cmd.append("--json")
    res = subprocess.run(cmd, capture_output=True, timeout=30)
    assert res.returncode == 0, f"{cmd} exited {res.returncode}: {res.stderr.decode(errors='replace')}"
    out = res.stdout.decode()
    return out if text else json.loads(out)


# -- a hand-driven producer -----------------------------------------------------------------------
class RawProducer:
    """A producer that speaks the wire protocol by hand, to send what logsink.Client never would."""

    def __init__(self, sock_path: str | Path, timeout: float = 15.0):
        self.timeout = timeout
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(sock_path))
        self.decoder = protocol.ControlDecoder()
        self.queue: list[dict[str, Any]] = []
        self.eof = False
        self.r: int | None = None
        self.w: int | None = None
        self.released = 0

    # sending
    def send(self, data: bytes, fds: Iterable[int] = ()) -> None:
        fds = list(fds)
        if fds:
            socket.send_fds(self.sock, [data], fds)
        else:
            self.sock.sendall(data)

    def pipe(self) -> int:
        self.r, self.w = os.pipe()
        return self.r

    def hello(self, stream: str, transport: str = "copy", fds: Iterable[int] | None = None, **fields: Any) -> None:
        """Send a HELLO; by default with a fresh pipe's read end attached (closed here after sending)."""
        msg = protocol.hello(stream, os.getpid(), transport)
        msg.update(fields)
        if fds is None:
            fds = [self.pipe()]
        self.send(protocol.encode(msg), fds)
        if self.r is not None:
            os.close(self.r)
            self.r = None

    def write_pipe(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = os.write(self.w, view)
            view = view[n:]

    def send_batch(self, records: list[bytes], seq: int) -> None:
        payload = b"".join(records)
        self.write_pipe(protocol.pack_frame_header(len(payload), len(records), seq) + payload)

    def close_pipe(self) -> None:
        if self.w is not None:
            os.close(self.w)
            self.w = None

    def close(self) -> None:
        self.close_pipe()
        if self.r is not None:
            os.close(self.r)
            self.r = None
        self.sock.close()

    # transport shm (docs/protocol.md "The shared-memory transport")
    def hello_shm(self, stream: str, size: int = 1 << 20, seals: int = fcntl.F_SEAL_SHRINK, **fields: Any) -> None:
        """Create a memfd arena of ``size`` bytes (with ``seals``), map it, and send a shm HELLO with the pipe and the arena."""
        self.arena_fd = os.memfd_create("raw-arena", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(self.arena_fd, size)
        if seals:
            fcntl.fcntl(self.arena_fd, fcntl.F_ADD_SEALS, seals)
        self.arena = mmap.mmap(self.arena_fd, size)
        self.hello(stream, "shm", fds=[self.pipe(), self.arena_fd], **fields)

    def send_shm_batch(self, records: list[bytes], seq: int, offset: int = 0) -> None:
        """Put ``records`` into the arena at ``offset`` and announce them with a descriptor."""
        payload = b"".join(records)
        self.arena[offset:offset + len(payload)] = payload
        self.write_pipe(protocol.pack_shm_descriptor(len(payload), len(records), seq, offset))

    # receiving
    def next_message(self, timeout: float | None = None) -> dict[str, Any] | None:
        """The next control message, or None once the daemon closed the connection."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while not self.queue:
            if self.eof:
                return None
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError("timed out waiting for a control message from the daemon")
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(65536)
            except ConnectionResetError:
                data = b""
            except TimeoutError:
                continue
            if not data:
                self.eof = True
                assert self.decoder.buffered == 0, "daemon closed the connection in the middle of a frame"
                continue
            self.queue.extend(self.decoder.feed(data))
        msg = self.queue.pop(0)
        if msg["t"] == protocol.RELEASE:
            self.released = max(self.released, msg["through"])
        return msg

    def expect_welcome(self) -> dict[str, Any]:
        msg = self.next_message()
        assert msg is not None, "daemon closed the connection instead of answering HELLO"
        assert msg["t"] == protocol.WELCOME, f"expected WELCOME, got {msg}"
        assert msg["v"] == protocol.PROTOCOL_VERSION
        return msg

    def wait_release(self, seq: int) -> None:
        while self.released < seq:
            msg = self.next_message()
            assert msg is not None, f"daemon closed the connection before releasing seq {seq}"
            assert msg["t"] in (protocol.RELEASE,), f"expected RELEASE, got {msg}"
            assert not msg.get("failed"), f"batches failed: {msg}"

    def expect_error(self, code: str) -> dict[str, Any]:
        """Wait for an ERROR (skipping RELEASEs), check its code, then check the daemon closes."""
        while True:
            msg = self.next_message()
            assert msg is not None, f"daemon closed the connection without an ERROR (expected {code!r})"
            if msg["t"] == protocol.RELEASE:
                continue
            assert msg["t"] == protocol.ERROR, f"expected ERROR {code!r}, got {msg}"
            break
        assert msg["code"] == code, f"expected error code {code!r}, got {msg}"
        assert isinstance(msg["reason"], str) and msg["reason"], f"ERROR without a reason: {msg}"
        self.expect_closed()
        return msg

    def expect_closed(self) -> None:
        while True:
            msg = self.next_message()
            if msg is None:
                return
            assert msg["t"] == protocol.RELEASE, f"expected the connection to close, got {msg}"


class RawTcpProducer(RawProducer):
    """RawProducer over a TCP connection: HELLO carries no fd and frames follow on the same socket."""

    def __init__(self, address: str, timeout: float = 15.0):
        host, port = address[len("tcp://"):].rsplit(":", 1)
        self.timeout = timeout
        self.sock = socket.create_connection((host, int(port)), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.decoder = protocol.ControlDecoder()
        self.queue = []
        self.eof = False
        self.r = self.w = None
        self.released = 0

    def hello(self, stream: str, transport: str = "copy", fds=(), **fields) -> None:
        super().hello(stream, transport=transport, fds=(), **fields)

    def write_pipe(self, data: bytes) -> None:
        self.sock.sendall(data)


# The head of an LD_PRELOAD shim that wraps libc's syscall(): the body (syscall_shim's argument) sees
# the number `n` and the arguments `a[0..5]`, may fail a call (errno = ...; return -1) and ends with
# `return real(n, a[0], a[1], a[2], a[3], a[4], a[5]);` (or changes what the real call returned).
SYSCALL_SHIM_HEAD = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdarg.h>
#include <linux/io_uring.h>
#include <sys/syscall.h>
static long (*real)(long, ...);
long syscall(long n, ...)
{
    va_list ap;
    long a[6];
    va_start(ap, n);
    for (int i = 0; i < 6; i++)
        a[i] = va_arg(ap, long);
    va_end(ap);
    if (!real)
        real = (long (*)(long, ...))dlsym(RTLD_NEXT, "syscall");
"""


def syscall_shim(body: str) -> str:
    """C source of a syscall() shim: SYSCALL_SHIM_HEAD, then ``body`` (see there), then the closing brace."""
    return SYSCALL_SHIM_HEAD + body + "}\n"


def build_shim(tmp_path: Path, name: str, source: str) -> str:
    """Compile C ``source`` into ``tmp_path/<name>.so``, an LD_PRELOAD shim that fakes a syscall's failure."""
    src = tmp_path / f"{name}.c"
    src.write_text(source)
    lib = tmp_path / f"{name}.so"
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(lib), str(src), "-ldl", "-lpthread"], check=True, timeout=60)
    return str(lib)


def proc_state(pid: int) -> str:
    """The one-letter state of a process from /proc (``T`` = stopped)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat.rsplit(")", 1)[1].split()[0]
