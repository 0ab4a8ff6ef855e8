"""Fuzz target: shm descriptors. A producer on transport "shm" announces batches anywhere in (and past)
its arena, with any flags, lengths and record counts, over an arena with torn lines: the daemon
never faults, the good producers beside it land byte-exact, and every line the fuzzed producer gets
into the file is bytes its arena held (so it can only garble its own records)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fuzz.harness import Target, fuzz_settings
from logsink import protocol

ARENA = 1 << 16

# A descriptor: mostly inside the arena and well-formed, sometimes past its end, with a wrong flag,
# an offset near 2**64, zero or huge lengths, impossible record counts.
descriptor = st.builds(
    lambda off, length, records, seq, flags: struct.pack("<4sBBHIIQQ", protocol.FRAME_MAGIC, protocol.PROTOCOL_VERSION, flags,
                                                         protocol.FRAME_HEADER_SIZE, length, records, seq, off),
    off=st.one_of(st.integers(0, ARENA), st.integers(ARENA, 2**64 - 1)),
    length=st.one_of(st.integers(1, 4096), st.integers(0, 2**32 - 1)),
    records=st.integers(0, 64),
    seq=st.integers(0, 2**64 - 1),
    flags=st.sampled_from([protocol.FRAME_FLAG_SHM] * 4 + [0, 2, 0xFF]),
)
arena_lines = st.lists(st.binary(max_size=60).map(lambda b: b.replace(b"\n", b"~") + b"\n"), min_size=1, max_size=200)


@pytest.fixture(scope="module")
def shm_target(live):
    t = Target(live, "shm.")
    yield t
    t.close()


class TestShmDescriptorFuzz:
    @fuzz_settings(ci_examples=60)
    @given(lines=arena_lines, descs=st.lists(descriptor, min_size=1, max_size=8), scribble=st.binary(max_size=64))
    def test_descriptors_anywhere_cost_only_their_producer(self, shm_target, lines, descs, scribble):
        """Descriptors at any offset/length/flags over an arena of lines (some torn by a scribble): the
        daemon stays up, good records land, and every fuzzed line in the file is arena bytes."""
        with shm_target.example() as ex:
            conn = ex.connect()
            conn.stream = shm_target.app
            conn.raw.hello_shm(shm_target.app, size=ARENA)
            reply = conn.hello_reply()
            assert reply is not None and reply["t"] == protocol.WELCOME, f"a valid shm HELLO was answered with {reply}"
            content = b"".join(lines)[:ARENA]
            conn.raw.arena[: len(content)] = content
            conn.raw.arena[: len(scribble)] = scribble  # torn lines of its own, maybe without a newline
            ex.sent[shm_target.app] += bytes(conn.raw.arena)  # what could land: arena bytes
            for d in descs:
                if not ex.write_pipe(conn, d):
                    break
