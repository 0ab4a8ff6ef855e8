"""Engine faults are never silent: a file that refuses splice steps its stream down to copying."""

from __future__ import annotations

from lsk_helpers import assert_file, build_shim, make_records, wait_for

import logsink

# splice(2) into a regular file fails with EINVAL, as on a filesystem without splice_write; splices
# into pipes and /dev/null still work (the daemon's probe and discards use those).
NO_SPLICE_WRITE_SHIM = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>
ssize_t splice(int in, loff_t *off_in, int out, loff_t *off_out, size_t len, unsigned int flags)
{
    static ssize_t (*real)(int, loff_t *, int, loff_t *, size_t, unsigned int);
    if (!real)
        real = (ssize_t (*)(int, loff_t *, int, loff_t *, size_t, unsigned int))dlsym(RTLD_NEXT, "splice");
    struct stat st;
    if (fstat(out, &st) == 0 && S_ISREG(st.st_mode) && st.st_nlink > 0 && off_out) {
        errno = EINVAL;
        return -1;
    }
    return real(in, off_in, out, off_out, len, flags);
}
"""


class TestSpliceRefusedByTheFile:
    def test_stream_steps_down_to_copy_before_any_byte_moved(self, daemon, tmp_path):
        """Splice refused by the output file (EINVAL) moves that stream to read + pwrite, logged; nothing is lost or failed."""
        shim = build_shim(tmp_path, "nosplicewrite", NO_SPLICE_WRITE_SHIM)
        d = daemon("splice", env={"LD_PRELOAD": shim})
        recs = make_records("cp", 20_000)
        with logsink.Client("app", socket=d.sock, transport="vmsplice") as c:  # the splice path
            for r in recs:
                c.write(r)
            c.flush(timeout=30)
        assert_file(d.log("app"), {"cp": recs})
        st = d.status()
        assert st["engine"] == "splice"
        assert st["errors"]["write-failed"] == 0
        assert st["streams"]["app"]["bytes_copied"] == sum(map(len, recs))
        assert st["streams"]["app"]["bytes_spliced"] == 0
        events = [e for e in d.stderr_events() if e.get("event") == "stream_copy_mode"]
        assert len(events) == 1 and events[0]["stream"] == "app"


# epoll_wait fails (EINVAL) in the engine's thread ("logsink-engine") once the file named by
# $LSK_FAIL_TRIGGER exists: the engine thread ends. asyncio's own epoll_wait is left alone.
EPOLL_WAIT_FAILS_SHIM = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <unistd.h>
int epoll_wait(int ep, struct epoll_event *ev, int max, int timeout)
{
    static int (*real)(int, struct epoll_event *, int, int);
    if (!real)
        real = (int (*)(int, struct epoll_event *, int, int))dlsym(RTLD_NEXT, "epoll_wait");
    const char *trigger = getenv("LSK_FAIL_TRIGGER");
    char name[16] = "";
    pthread_getname_np(pthread_self(), name, sizeof name);
    if (trigger && strcmp(name, "logsink-engine") == 0 && access(trigger, F_OK) == 0) {
        errno = EINVAL;
        return -1;
    }
    return real(ep, ev, max, timeout);
}
"""


def fail_the_engine(daemon, tmp_path):
    """A splice daemon whose engine thread dies (epoll_wait fails) after moving two batches of a client
    ("before", "after"); returns (daemon, that client), the client with reconnect=False to see the ERROR."""
    shim = build_shim(tmp_path, "epollfails", EPOLL_WAIT_FAILS_SHIM)
    trigger = tmp_path / "fail-now"
    d = daemon("splice", env={"LD_PRELOAD": shim, "LSK_FAIL_TRIGGER": str(trigger)})
    c = logsink.Client("app", socket=d.sock, flush_interval=None, reconnect=False)
    c.write(b"before\n")
    c.flush(timeout=10)
    trigger.touch()
    c.write(b"after\n")  # wakes the engine: it moves this batch, then its next epoll_wait fails
    c.flush(timeout=10)
    wait_for(lambda: d.status()["engine_failed"], 10, "status to show the engine failure")
    return d, c


class TestEngineThreadFailure:
    def test_engine_failure_is_logged_shown_and_answered(self, daemon, tmp_path):
        """When the engine thread dies (epoll_wait fails) the daemon logs it, status shows it, producers get an ERROR, new ones are refused."""
        import pytest

        d, c = fail_the_engine(daemon, tmp_path)
        assert "epoll_wait failed" in d.status()["engine_failed"]
        assert any(e.get("event") == "engine_failed" for e in d.stderr_events())
        with pytest.raises(ConnectionError, match="engine failed"):
            for _ in range(100):  # the ERROR reaches the client's background thread
                c.write(b"lost\n")
                c.flush(timeout=10)
        c.close()
        with pytest.raises(ConnectionError, match="engine failed"):
            logsink.Client("other", socket=d.sock)
        assert d.log("app").read_bytes() == b"before\nafter\n"

    def test_sighup_after_engine_failure_keeps_the_daemon_answering(self, daemon, tmp_path):
        """A rotation (SIGHUP) after the engine failed does not hang the control plane: status still answers."""
        import os
        import signal

        d, c = fail_the_engine(daemon, tmp_path)
        c.close()
        os.rename(d.log("app"), str(d.log("app")) + ".1")
        os.kill(d.pid, signal.SIGHUP)
        wait_for(lambda: any(e.get("event") == "reopen_skipped" for e in d.stderr_events()), 10, "the reopen to be skipped")
        assert d.status()["engine_failed"]
