"""The shared-memory transport, daemon side: batches written from a producer's memfd arena, and what a bad arena or descriptor gets.

The producers here speak the wire protocol by hand (lsk_helpers.RawProducer.hello_shm), so they can
send what logsink.Client never would. docs/protocol.md "The shared-memory transport" is the spec.
"""

from __future__ import annotations

import fcntl
import os
import subprocess

import pytest
from lsk_helpers import ENGINES, RawProducer, build_shim, make_records, protocol, syscall_shim, wait_for


def _shm_producer(d, stream: str = "app", **kw) -> RawProducer:
    p = RawProducer(d.sock)
    p.hello_shm(stream, **kw)
    return p


def _ring_config(tmp_path, mode: str = "ring") -> tuple[str, str]:
    cfg = tmp_path / f"shm-{mode}.toml"
    cfg.write_text(f'shm_write = "{mode}"\n')
    return "--config", str(cfg)


class TestShmWriteModes:
    @pytest.mark.parametrize(("mode", "path"), [("ring", "WRITE_FIXED from registered buffers"),
                                                 ("inline", "pwrite from the mapping")])
    def test_forced_write_mode_lands_exact_and_says_so(self, daemon, tmp_path, mode, path):
        """shm_write = "ring" writes every shm batch with WRITE_FIXED through the ring, "inline" with pwrite in the engine thread: both byte-exact, all counted shared, status says which."""
        d = daemon("io_uring", *_ring_config(tmp_path, mode))
        p = _shm_producer(d, size=4 << 20)
        p.expect_welcome()
        want = b""
        for seq in range(1, 9):
            recs = make_records(f"m{seq}", 3000)  # ~100 KiB .. batches both under and over 256 KiB below
            if seq % 2:
                recs = recs * 4
            p.send_shm_batch(recs, seq, offset=(seq % 2) << 21)
            p.wait_release(seq)
            want += b"".join(recs)
        p.close()
        assert d.log("app").read_bytes() == want
        st = d.status()
        assert st["shm_path"] == path
        assert st["totals"]["bytes_shared"] == len(want) and st["totals"]["bytes_spliced"] == 0

    def test_unknown_mode_is_a_config_error(self, daemon, tmp_path):
        """shm_write must be auto, ring or inline."""
        from logsink.config import load
        from logsink.errors import ConfigError

        with pytest.raises(ConfigError, match="shm_write"):
            load(_ring_config(tmp_path, "fast")[1], {})


class TestShmBatchesLand:
    @pytest.mark.parametrize("engine", ENGINES)
    def test_batches_from_the_arena_land_byte_exact_and_never_through_a_pipe(self, daemon, engine):
        """Descriptors at several arena offsets land their records in order, counted as bytes_shared: nothing spliced, nothing copied."""
        d = daemon(engine)
        p = _shm_producer(d)
        welcome = p.expect_welcome()
        assert welcome["max_batch"] == 1 << 20  # min(max_batch, the arena's size)
        want = b""
        for seq in range(1, 41):
            recs = make_records(f"s{seq}", 50)
            p.send_shm_batch(recs, seq, offset=(seq % 4) * (256 << 10))
            p.wait_release(seq)  # the arena region may be reused only after its RELEASE
            want += b"".join(recs)
        p.close()
        assert d.log("app").read_bytes() == want
        st = d.status()
        t = st["totals"]
        assert t["bytes"] == len(want) and t["bytes_shared"] == len(want)
        assert t["bytes_spliced"] == 0 and t["bytes_copied"] == 0
        assert t["header_bytes"] == 32 * 40  # the engine read the descriptors, nothing else
        assert st["streams"]["app"]["bytes_shared"] == len(want)
        if engine == "io_uring":  # auto: on ext4/tmpfs io_uring would punt to io-wq, so pwrite, and it says so
            assert st["shm_path"].startswith("auto: WRITE_FIXED from registered buffers on filesystems that take")
        else:
            assert st["shm_path"] == "pwrite from the mapping"

    @pytest.mark.parametrize("engine", ENGINES)
    def test_shm_and_pipe_producers_share_a_stream_without_interleaving(self, daemon, engine):
        """A shm producer and a vmsplice-style pipe producer writing one stream each get whole lines, in their own order."""
        d = daemon(engine)
        shm = _shm_producer(d)
        shm.expect_welcome()
        pipe = RawProducer(d.sock)
        pipe.hello("app")
        pipe.expect_welcome()
        for seq in range(1, 21):
            shm.send_shm_batch(make_records("shm", 100, start=seq * 100), seq, offset=(seq % 2) << 19)
            pipe.send_batch(make_records("pipe", 100, start=seq * 100), seq)
            shm.wait_release(seq)
            pipe.wait_release(seq)
        shm.close()
        pipe.close()
        lines = d.log("app").read_bytes().splitlines(keepends=True)
        assert [ln for ln in lines if ln.startswith(b"shm")] == make_records("shm", 2000, start=100)
        assert [ln for ln in lines if ln.startswith(b"pipe")] == make_records("pipe", 2000, start=100)
        assert len(lines) == 4000


class TestBadArena:
    def test_arena_without_the_shrink_seal_is_refused_as_bad_frame(self, daemon):
        """A memfd not sealed with F_SEAL_SHRINK could shrink under the daemon's mapping: HELLO is refused, bad-frame, saying which seal."""
        d = daemon()
        p = _shm_producer(d, seals=0)
        msg = p.expect_error(protocol.E_BAD_FRAME)
        assert "F_SEAL_SHRINK" in msg["reason"]
        assert d.status()["errors"][protocol.E_BAD_FRAME] == 1

    def test_arena_that_is_not_a_memfd_is_refused(self, daemon, tmp_path):
        """A regular file passed as the arena (it cannot be sealed) is refused, bad-frame."""
        d = daemon()
        p = RawProducer(d.sock)
        f = open(tmp_path / "not-a-memfd", "wb+")  # noqa: SIM115
        f.truncate(4096)
        p.hello("app", "shm", fds=[p.pipe(), f.fileno()])
        f.close()
        msg = p.expect_error(protocol.E_BAD_FRAME)
        assert "not a memfd" in msg["reason"]

    def test_arena_larger_than_max_arena_is_refused(self, daemon, tmp_path):
        """An arena over the daemon's max_arena (it would be pinned whole) is refused, bad-frame, naming the limit."""
        cfg = tmp_path / "small-arena.toml"
        cfg.write_text(f"max_arena = {1 << 20}\n")
        d = daemon("auto", "--config", str(cfg))
        p = _shm_producer(d, size=2 << 20)
        msg = p.expect_error(protocol.E_BAD_FRAME)
        assert "max_arena" in msg["reason"] and str(1 << 20) in msg["reason"]

    def test_shm_hello_with_one_fd_is_refused(self, daemon):
        """A shm HELLO must carry the pipe and the arena: with only the pipe it is bad-fd."""
        d = daemon()
        p = RawProducer(d.sock)
        p.hello("app", "shm")
        msg = p.expect_error(protocol.E_BAD_FD)
        assert "two fds" in msg["reason"]

    def test_vmsplice_hello_with_two_fds_is_refused(self, daemon):
        """A pipe transport's HELLO with an extra fd is bad-fd (and both fds are closed)."""
        d = daemon()
        p = RawProducer(d.sock)
        extra = os.memfd_create("extra")
        p.hello("app", "vmsplice", fds=[p.pipe(), extra])
        os.close(extra)
        p.expect_error(protocol.E_BAD_FD)


class TestBadDescriptor:
    @pytest.mark.parametrize("engine", ENGINES)
    @pytest.mark.parametrize("where", ["past_the_end", "offset_overflow", "offset_beyond"])
    def test_descriptor_outside_the_arena_ends_only_that_producer(self, daemon, engine, where):
        """A descriptor reaching past the arena is bad-frame for its producer; nothing of it lands and a neighbour's records are untouched."""
        d = daemon(engine)
        good = RawProducer(d.sock)
        good.hello("app")
        good.expect_welcome()
        good.send_batch(make_records("good", 10), 1)
        good.wait_release(1)
        bad = _shm_producer(d, size=1 << 20)
        bad.expect_welcome()
        offset, length = {"past_the_end": ((1 << 20) - 10, 20), "offset_overflow": ((1 << 64) - 8, 16),
                          "offset_beyond": (2 << 20, 10)}[where]
        bad.write_pipe(protocol.pack_shm_descriptor(length, 1, 1, offset))
        msg = bad.expect_error(protocol.E_BAD_FRAME)
        assert "outside the arena" in msg["reason"]
        good.send_batch(make_records("good", 10, start=10), 2)
        good.wait_release(2)
        good.close()
        assert d.log("app").read_bytes() == b"".join(make_records("good", 20))

    def test_payload_frame_from_a_shm_producer_is_bad_frame(self, daemon):
        """A shm producer that puts payload bytes in the pipe (no descriptor flag) is bad-frame; nothing lands."""
        d = daemon()
        p = _shm_producer(d)
        p.expect_welcome()
        p.send_batch(make_records("x", 3), 1)
        p.expect_error(protocol.E_BAD_FRAME)
        assert d.log("app").read_bytes() == b""

    def test_descriptor_from_a_pipe_producer_is_bad_frame(self, daemon):
        """A descriptor on a producer that passed no arena is bad-frame (the daemon has nothing to read it from)."""
        d = daemon()
        p = RawProducer(d.sock)
        p.hello("app")
        p.expect_welcome()
        p.write_pipe(protocol.pack_shm_descriptor(10, 1, 1, 0))
        p.expect_error(protocol.E_BAD_FRAME)

    @pytest.mark.parametrize("engine", ENGINES)
    def test_unterminated_batch_in_the_arena_is_cut_back(self, daemon, engine):
        """A shm batch whose last byte is not a newline is cut back off the file and refused: the newline rule holds on shm."""
        d = daemon(engine)
        p = _shm_producer(d)
        p.expect_welcome()
        p.send_shm_batch([b"whole\n"], 1)
        p.wait_release(1)
        p.send_shm_batch([b"no newline"], 2, offset=4096)
        msg = p.expect_error(protocol.E_BAD_FRAME)
        assert "newline" in msg["reason"]
        assert d.log("app").read_bytes() == b"whole\n"


class TestShmProducerEnds:
    @pytest.mark.parametrize("engine", ENGINES)
    def test_producer_that_exits_leaves_its_released_batches_and_unmaps(self, daemon, engine):
        """A shm producer closing its pipe after its batches ends cleanly; the daemon's mapping of the arena goes with it."""
        d = daemon(engine)
        p = _shm_producer(d, size=3 << 20)
        p.expect_welcome()
        p.send_shm_batch(make_records("e", 10), 1)
        p.wait_release(1)
        pid = d.proc.pid
        inode = os.fstat(p.arena_fd).st_ino

        def mapped() -> bool:
            maps = open(f"/proc/{pid}/maps").read()
            return any(line.split()[4] == str(inode) and "raw-arena" in line for line in maps.splitlines())

        assert mapped()
        p.close()
        wait_for(lambda: not mapped(), timeout=10, what="the daemon to unmap the ended producer's arena")
        assert d.log("app").read_bytes() == b"".join(make_records("e", 10))
        assert fcntl.fcntl(p.arena_fd, fcntl.F_GET_SEALS) & fcntl.F_SEAL_SHRINK


# An LD_PRELOAD shim: io_uring_register refuses one opcode (REFUSE_OP) with REFUSE_ERR, as an older
# kernel (no sparse buffer table: EINVAL) or a service user past RLIMIT_MEMLOCK (ENOMEM) would.
REGISTER_REFUSED_SHIM = syscall_shim(r"""
    if (n == __NR_io_uring_register && a[1] == REFUSE_OP) {
        errno = REFUSE_ERR;
        return -1;
    }
    return real(n, a[0], a[1], a[2], a[3], a[4], a[5]);
""")


class TestRegisteredBufferStepDown:
    @pytest.mark.parametrize(("op", "err", "path"), [
        (15, "EINVAL", "WRITE from the mapping (no sparse buffer table: Invalid argument)"),       # IORING_REGISTER_BUFFERS2
        (16, "ENOMEM", "WRITE from the mapping (registering the arena failed: Cannot allocate memory)"),  # BUFFERS_UPDATE
    ])
    def test_refused_buffer_registration_steps_down_to_plain_write_and_says_why(self, daemon, tmp_path, op, err, path):
        """Where the kernel refuses the sparse buffer table or an arena's registration, io_uring still runs and writes shm batches with a plain WRITE; status says which and why."""
        source = REGISTER_REFUSED_SHIM.replace("REFUSE_OP", str(op)).replace("REFUSE_ERR", err)
        shim = build_shim(tmp_path, f"refuse{op}", source)
        d = daemon("io_uring", *_ring_config(tmp_path), env={"LD_PRELOAD": shim})
        p = _shm_producer(d)
        p.expect_welcome()
        p.send_shm_batch(make_records("fb", 100), 1)
        p.wait_release(1)
        p.close()
        assert d.log("app").read_bytes() == b"".join(make_records("fb", 100))
        st = d.status()
        assert st["engine"] == "io_uring" and st["shm_path"] == path
        assert st["totals"]["bytes_shared"] == st["totals"]["bytes"] > 0


def _rss_shmem_kib(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("RssShmem:"):
            return int(line.split()[1])
    raise AssertionError("no RssShmem in /proc/PID/status")


class TestArenaMemory:
    @pytest.mark.parametrize(("mode", "pinned"), [("auto", False), ("ring", True)])
    def test_only_an_arena_the_ring_writes_from_is_registered_and_pinned(self, daemon, tmp_path, mode, pinned):
        """A producer with a 16 MiB arena that sends 4 KiB: on ext4 "auto" pwrites and faults in only what it reads, while "ring" registers (pins, faults in) the whole arena - so 1000 mostly empty arenas cost the daemon no memory in auto."""
        fstype = subprocess.run(["stat", "-f", "-c", "%T", str(tmp_path)], capture_output=True, text=True).stdout.strip()
        if mode == "auto" and fstype in ("xfs", "btrfs"):
            pytest.skip(f"auto registers arenas on {fstype} (io_uring writes there without io-wq)")
        d = daemon("io_uring", *_ring_config(tmp_path, mode))
        before = _rss_shmem_kib(d.pid)
        p = _shm_producer(d, size=16 << 20)
        p.expect_welcome()
        p.send_shm_batch([b"x" * 4095 + b"\n"], 1)
        p.wait_release(1)
        grown = _rss_shmem_kib(d.pid) - before
        p.close()
        assert (grown >= 16 << 10) if pinned else (grown < 1 << 10), f"{mode}: the daemon's RssShmem grew {grown} KiB"

    def test_mapping_a_fresh_batch_touches_only_its_own_pages(self, daemon, tmp_path):
        """Batches at the start and 12 MiB into a 16 MiB arena land exact, and the daemon maps (RssShmem) only their pages, never the gap between them."""
        d = daemon("io_uring", *_ring_config(tmp_path, "inline"))
        before = _rss_shmem_kib(d.pid)
        p = _shm_producer(d, size=16 << 20)
        p.expect_welcome()
        first, far = make_records("a", 300), make_records("b", 300)
        p.send_shm_batch(first, 1, offset=0)
        p.send_shm_batch(far, 2, offset=12 << 20)
        p.wait_release(2)
        grown = _rss_shmem_kib(d.pid) - before
        p.close()
        assert grown < 1 << 10, f"the daemon's RssShmem grew {grown} KiB for two batches of {len(b''.join(first))} bytes"
        assert d.log("app").read_bytes() == b"".join(first + far)

