"""1000 local producers on the shm transport, as an unprivileged uid: the per-user pipe budget no longer caps them.

A vmsplice producer needs a pipe that holds a whole batch (1 MiB by default): past ~63 of them a uid's
``fs.pipe-user-pages-soft`` (16384 pages) is spent and new pipes get 8 KiB. A shm producer's pipe
carries only 32-byte descriptors and is one page, so 1000 of them use 1000 pages of the budget.
Root is exempt from the budget, so the producers run as uid 65534.
"""

from __future__ import annotations

import json
import subprocess
import sys

from test_access import acl_daemon, as_nobody, needs_root, shared_dir, unprivileged_python  # noqa: F401 (fixtures)

PRODUCERS = 1000
BATCHES = 3
RECORDS = 20

# Run as uid 65534: open PRODUCERS shm producers by the wire protocol, each with a 64 KiB sealed memfd
# arena and a one-page pipe; every producer sends BATCHES batches; wait for every RELEASE.
SCRIPT = r"""
import fcntl, json, mmap, os, resource, selectors, socket, sys
from logsink import protocol
sock_path, n, batches, records = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
F_SETPIPE_SZ, F_GETPIPE_SZ = 1031, 1032
prods, pipe_sizes = [], set()
for i in range(n):
    fd = os.memfd_create("arena", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, 64 << 10)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
    arena = mmap.mmap(fd, 64 << 10)
    r, w = os.pipe()
    fcntl.fcntl(w, F_SETPIPE_SZ, 4096)
    pipe_sizes.add(fcntl.fcntl(w, F_GETPIPE_SZ))
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(sock_path)
    socket.send_fds(s, [protocol.encode(protocol.hello("app", os.getpid(), "shm"))], [r, fd])
    os.close(r)
    os.close(fd)
    dec = protocol.ControlDecoder()
    msgs = []
    while not msgs:
        msgs = dec.feed(s.recv(65536))
    assert msgs[0]["t"] == "welcome", msgs
    prods.append((s, w, arena, dec))
for b in range(1, batches + 1):
    for i, (s, w, arena, dec) in enumerate(prods):
        payload = b"".join(b"p%04d b%d r%03d\n" % (i, b, k) for k in range(records))
        off = (b % 2) * (32 << 10)
        arena[off:off + len(payload)] = payload
        os.write(w, protocol.pack_shm_descriptor(len(payload), records, b, off))
    sel = selectors.DefaultSelector()
    left = {}
    for i, (s, w, arena, dec) in enumerate(prods):
        sel.register(s, selectors.EVENT_READ, i)
        left[i] = b
    released = {}
    while left:
        for key, _ in sel.select(60):
            i = key.data
            s, w, arena, dec = prods[i]
            data = s.recv(65536)
            assert data, f"producer {i}: the daemon closed the connection"
            for m in dec.feed(data):
                assert m["t"] == "release" and not m.get("failed"), m
                if m["through"] >= b:
                    left.pop(i, None)
                    sel.unregister(s)
    sel.close()
for s, w, arena, dec in prods:
    os.close(w)
    s.close()
print(json.dumps({"pipe_sizes": sorted(pipe_sizes)}))
"""


@needs_root
class TestThousandShmProducers:
    def test_1000_unprivileged_shm_producers_all_land_exact(self, acl_daemon):  # noqa: F811
        """1000 producers of one uid on shm, each with its own one-page pipe and arena, all connect at once and every record lands exactly once, whole."""
        d = acl_daemon('shm_write = "ring"\n', engine="auto")  # ring: every arena registered with io_uring
        exe, _ = unprivileged_python()
        res = subprocess.run([exe, "-c", SCRIPT, str(d.sock), str(PRODUCERS), str(BATCHES), str(RECORDS)],
                             capture_output=True, text=True, timeout=300, cwd="/", **as_nobody())
        assert res.returncode == 0, res.stderr[-3000:]
        assert json.loads(res.stdout)["pipe_sizes"] == [4096]
        lines = d.log("app").read_bytes().splitlines(keepends=True)
        assert len(lines) == PRODUCERS * BATCHES * RECORDS
        want = sorted(b"p%04d b%d r%03d\n" % (i, b, k) for i in range(PRODUCERS) for b in range(1, BATCHES + 1)
                      for k in range(RECORDS))
        assert sorted(lines) == want
        for i in (0, PRODUCERS - 1):  # each producer's records stay in its own order
            mine = [ln for ln in lines if ln.startswith(b"p%04d " % i)]
            assert mine == [b"p%04d b%d r%03d\n" % (i, b, k) for b in range(1, BATCHES + 1) for k in range(RECORDS)]
        st = d.status()
        assert st["totals"]["bytes_shared"] == st["totals"]["bytes"] == sum(map(len, lines))
        assert st["errors"].get("bad-frame", 0) == 0
        if st["engine"] == "io_uring":  # 1000 arenas registered in the ring's sparse buffer table
            assert st["shm_path"] == "WRITE_FIXED from registered buffers"


class TestFdLimit:
    def test_daemon_raises_its_soft_fd_limit_to_the_hard_one(self):
        """Started with a soft RLIMIT_NOFILE of 256 (a shell's or systemd's low default), the daemon lifts it to the hard limit, so producers are not capped near soft/2."""
        code = ("import json, resource; hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]; "
                "resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard)); "
                "from logsink.daemon.server import raise_fd_limit; "
                "print(json.dumps([raise_fd_limit(), hard, resource.getrlimit(resource.RLIMIT_NOFILE)]))")
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        said, hard, now = json.loads(res.stdout)
        assert hard > 256
        assert said == [256, hard] and now == [hard, hard]


# As uid 65534: N vmsplice Clients with 1 MiB segments, each flushes a record, then all wait (stdin).
SMALL_PIPES_SCRIPT = r"""
import sys
import logsink
clients = [logsink.Client("many", socket=sys.argv[1], transport="vmsplice", segment_size=1 << 20) for _ in range(int(sys.argv[2]))]
for i, c in enumerate(clients):
    c.write(b"client %d\n" % i)
    c.flush(timeout=30)
print("ready", flush=True)
sys.stdin.readline()
for c in clients:
    c.close()
"""


@needs_root
class TestPipeBudgetIsVisible:
    def test_producers_past_the_pipe_budget_show_their_small_pipes_in_status_and_one_log_line(self, acl_daemon):  # noqa: F811
        """80 unprivileged vmsplice producers with 1 MiB pipes spend the uid's pipe budget: status shows each pipe's size and counts the small ones, and the daemon says so once."""
        d = acl_daemon()
        exe, _ = unprivileged_python()
        proc = subprocess.Popen([exe, "-c", SMALL_PIPES_SCRIPT, str(d.sock), "80"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, cwd="/", **as_nobody())
        try:
            assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
            st = d.status()
            sizes = [p["pipe_size"] for p in st["producers"]]
            assert len(sizes) == 80
            assert sizes.count(1 << 20) >= 32 and min(sizes) < (1 << 20)
            assert st["small_pipes"] == sum(1 for s in sizes if s < (1 << 20))
        finally:
            proc.stdin.close()
            proc.wait(timeout=60)
        assert sorted(d.log("many").read_bytes().splitlines()) == sorted(b"client %d" % i for i in range(80))
        assert d.stderr().count('"small_pipe"') == 1, d.stderr()[-2000:]
