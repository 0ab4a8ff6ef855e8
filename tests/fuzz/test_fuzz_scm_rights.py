"""Fuzz target: file descriptors passed with SCM_RIGHTS on the control socket (any number, any
kind, with or without a HELLO, on frames that never complete), beside good producers."""

from __future__ import annotations

import fcntl
import os
import select
import socket
import struct
import termios
from pathlib import Path

import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from lsk_helpers import protocol, wait_for

from fuzz.harness import IO_TIMEOUT, Conn, Example, Target, corpus, fuzz_settings, load_json_seed
from fuzz.strategies import control_frame, framed, hello_message, pack

# The kinds of fd a producer can pass; "self" is the very connection it is sent on.
FD_KINDS = ("pipe_r", "pipe_w", "file", "dir", "socket", "devnull", "eventfd", "memfd", "memfd_sealed", "epoll", "self")
# What one connection that has not sent a complete HELLO may make the daemon hold: one read's worth.
HELD_FD_CAP = 16
HUGE_PREFIX = struct.pack(">I", protocol.MAX_CONTROL_MESSAGE)  # a frame that never completes


def make_fds(kinds: list[str], conn: Conn, scratch: Path) -> tuple[list[int], list[int]]:
    """Fresh fds of the given kinds: (to send, to close once sent)."""
    send, close = [], []
    for kind in kinds:
        if kind == "self":
            send.append(conn.raw.sock.fileno())
            continue
        if kind in ("pipe_r", "pipe_w"):
            r, w = os.pipe()
            close += [r, w]
            send.append(r if kind == "pipe_r" else w)
            continue
        if kind == "socket":
            a, b = socket.socketpair()
            fds = [a.detach(), b.detach()]
        elif kind == "file":
            fds = [os.open(scratch, os.O_RDONLY | os.O_CREAT, 0o600)]
        elif kind == "dir":
            fds = [os.open(scratch.parent, os.O_RDONLY | os.O_DIRECTORY)]
        elif kind == "devnull":
            fds = [os.open(os.devnull, os.O_RDWR)]
        elif kind == "eventfd":
            fds = [os.eventfd(0)]
        elif kind == "memfd":
            fds = [os.memfd_create("logsink-fuzz")]
        elif kind == "memfd_sealed":  # a valid shm arena (with a pipe_r before it: a shm producer)
            fds = [os.memfd_create("logsink-fuzz", os.MFD_ALLOW_SEALING)]
            os.ftruncate(fds[0], 1 << 16)
            fcntl.fcntl(fds[0], fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
        else:
            ep = select.epoll()
            fds = [os.dup(ep.fileno())]
            ep.close()
        close += fds
        send.append(fds[0])
    return send, close


def unread_bytes(sock: socket.socket) -> int:
    """Bytes we sent that the daemon has not read yet (SIOCOUTQ on a unix socket)."""
    return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0]


def send_with_fds(ex: Example, sends: list[tuple[bytes, list[str]]], *, check_held: bool = False, abrupt: bool = False) -> None:
    """One connection: each (bytes, fd kinds) goes out as one sendmsg. ``check_held``: once the
    daemon has read everything, it holds at most HELD_FD_CAP of them (plus the connection).
    ``abrupt``: close without shutdown() or reading the answer, as a crashing process would."""
    before = ex.target.live.fd_count()
    conn = ex.connect()
    scratch = ex.target.live.d.root / "scm-scratch"
    for data, kinds in sends:
        fds, close = make_fds(kinds, conn, scratch)
        try:
            ok = conn.send(data, fds)
        finally:
            for fd in close:
                os.close(fd)
        if not ok:
            break
    if check_held:
        wait_for(lambda: unread_bytes(conn.raw.sock) == 0, IO_TIMEOUT, "the daemon to read everything we sent")
        held = ex.target.live.fd_count() - before
        assert held <= 1 + HELD_FD_CAP, (
            f"the daemon holds {held} more fds for one connection that sent {sum(len(k) for _, k in sends)} fds "
            f"without a complete HELLO (at most {1 + HELD_FD_CAP} allowed)")
    if abrupt:
        ex.conns.remove(conn)
        conn.raw.close()


@pytest.fixture(scope="module")
def target(live):
    t = Target(live, "scm.")
    yield t
    t.close()


@st.composite
def scm_sends(draw, target: Target) -> list[tuple[bytes, list[str]]]:
    """A few sendmsg()s: bytes of a HELLO (whole or split), control frames, junk or a never-ending
    frame, each carrying 0-24 fds of any kinds."""
    hello = framed(pack(draw(hello_message([target.app, target.other], protocol.LOCAL_TRANSPORTS))))
    pieces = draw(st.lists(st.one_of(
        st.just(hello),
        st.integers(1, max(1, len(hello) - 1)).map(lambda n: hello[:n]),
        control_frame(),
        st.binary(min_size=1, max_size=32),
        st.just(HUGE_PREFIX),
    ), min_size=1, max_size=6))
    return [(p, draw(st.lists(st.sampled_from(FD_KINDS), max_size=24))) for p in pieces]


@st.composite
def unfinished_frame_sends(draw) -> list[tuple[bytes, list[str]]]:
    """A length prefix that announces more than will ever come, then sends of filler with fds."""
    announced = draw(st.integers(1024, protocol.MAX_CONTROL_MESSAGE))
    first = struct.pack(">I", announced)
    rest = draw(st.lists(st.binary(min_size=1, max_size=16), min_size=1, max_size=12))
    kinds = st.lists(st.sampled_from(FD_KINDS), min_size=1, max_size=24)
    return [(first, draw(kinds))] + [(chunk, draw(kinds)) for chunk in rest]


ISSUE_REPRO = [(HUGE_PREFIX, ["pipe_r"] * 16)] + [(b"\x80", ["pipe_r"] * 16)] * 19


class TestScmRightsFuzz:
    @fuzz_settings(ci_examples=60)
    @given(data=st.data())
    def test_passed_fds_cost_only_their_connection(self, target, data):
        """Any fds (pipes' either end, files, directories, sockets, the connection itself, ...)
        on any bytes: once the connection ends the daemon's fd count is back under its bound, and
        the good producers land byte-exact."""
        with target.example() as ex:
            send_with_fds(ex, data.draw(scm_sends(target)))

    @fuzz_settings(ci_examples=20)
    @given(sends=unfinished_frame_sends())
    @example(sends=ISSUE_REPRO)  # the issue's repro: 16 pipe fds per message under a huge announced length
    def test_fds_without_a_hello_are_not_held(self, target, sends):
        """A connection that passes fds on a frame that never completes: while it stays open the
        daemon holds at most one read's worth of them."""
        with target.example() as ex:
            send_with_fds(ex, sends, check_held=True)


class TestScmRightsCorpus:
    @pytest.mark.parametrize("seed", corpus("scm"))
    def test_saved_fd_abuse_costs_only_its_connection(self, live, seed: Path):
        """A saved SCM_RIGHTS input (corpus/scm/): the daemon holds at most one read's worth of fds
        while the connection is open, and its fd count comes back once it ends."""
        spec = load_json_seed(seed)
        sends = [(bytes.fromhex(s["data"]), s["fds"]) for s in spec["sends"]]
        # A target per seed, so that a seed that leaks fds (a defect) does not fail the next one.
        # Seeds with a HELLO name the stream "app" (make_corpus.py): the replay runs on exactly that.
        target = Target(live, "")
        try:
            with target.example() as ex:
                for _ in range(spec.get("repeat", 1)):
                    send_with_fds(ex, sends, check_held=not spec.get("abrupt"), abrupt=spec.get("abrupt", False))
        finally:
            target.close()
