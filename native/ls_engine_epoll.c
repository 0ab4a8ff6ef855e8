/* ls_engine_epoll.c - the epoll backends of the engine: splice and readwrite (see ls_engine_int.h).
 *
 * Both try the syscall now and arm epoll on EAGAIN. splice moves payload with splice(2) (used
 * where io_uring is refused: kernel.io_uring_disabled, container seccomp, gVisor); readwrite reads
 * into a 1 MiB buffer and pwrites it, the copy baseline and the last step of the ladder.
 */
#include "ls_engine_int.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/mman.h>
#include <unistd.h>

/* on: 0 = no interest, 1 = EPOLLIN level-triggered, 2 = edge-triggered (a partial batch sits in
 * the pipe: wake on new bytes only; a pipe someone poll()ed wakes its readers on every write). */
static void epoll_arm(struct ls_engine *e, struct producer *p, int on)
{
    if (p->armed == on)
        return;
    if (on == 0) {
        /* Out of the set, not events = 0: EPOLLHUP is reported whatever the mask, and a producer
         * whose client exited while it waits for its stream would spin the thread. */
        if (epoll_ctl(e->ep, EPOLL_CTL_DEL, p->fd, NULL) == 0 || errno == ENOENT)
            p->armed = 0;
        return;
    }
    struct epoll_event ev = {.events = on == 2 ? EPOLLIN | EPOLLET : EPOLLIN, .data.u32 = p->id};
    int r = epoll_ctl(e->ep, p->armed ? EPOLL_CTL_MOD : EPOLL_CTL_ADD, p->fd, &ev);
    if (r == 0) {
        p->armed = on;
    } else if (p->state != P_FREE) { /* this producer can never be woken again: end it, loudly */
        p->c.errors++;
        e->total.errors++;
        eng_finish(e, p, LS_EV_PRODUCER_ERROR, -errno, 0);
    }
}

/* A TCP batch into its stage pipe: splice, or (readwrite) read + write. The stage holds the whole
 * batch (checked at the header), so the write side never waits. Returns bytes, 0 (EOF) or -errno;
 * -ENOSPC if the stage is full before the batch is whole (see STAGE_FILL_DIVISOR). */
static long stage_sync(struct ls_engine *e, struct producer *p)
{
    size_t want = p->h.payload_len - p->staged;
    if (e->be == &ls_backend_splice) {
        ssize_t r = splice(p->fd, NULL, p->stage_w, NULL, want, SPLICE_F_NONBLOCK | SPLICE_F_MOVE);
        if (r < 0 && errno == EAGAIN && eng_stage_full(p))
            return -ENOSPC; /* the batch does not fit the stage's slots: it can never be whole */
        return r < 0 ? -errno : r;
    }
    if (want > RW_BUF_SIZE)
        want = RW_BUF_SIZE;
    ssize_t n = read(p->fd, e->rwbuf, want);
    if (n <= 0)
        return n < 0 ? -errno : 0;
    for (ssize_t done = 0; done < n;) {
        ssize_t w = write(p->stage_w, e->rwbuf + done, (size_t)(n - done));
        if (w < 0 && errno == EINTR)
            continue;
        if (w < 0)
            return errno == EAGAIN ? -ENOSPC : -errno;
        done += w;
    }
    return n;
}

/* Move (or discard) payload that is all queued: from the pipe, or a TCP producer's stage pipe. */
static long do_move_sync(struct ls_engine *e, struct producer *p, int discard)
{
    if (e->be != &ls_backend_splice || e->streams[p->stream_id].copy)
        return eng_move_copy(e, p, discard);
    if (!discard)
        return eng_splice_payload(e, p);
    ssize_t r = splice(p->is_sock ? p->stage_r : p->fd, NULL, e->devnull, NULL, p->h.payload_len - p->moved,
                       SPLICE_F_NONBLOCK);
    return r < 0 ? -errno : r;
}

static void epoll_drive(struct ls_engine *e, struct producer *p)
{
    for (;;) {
        long r;
        switch (p->state) {
        case P_HEADER:
            if ((p->hdr_have == 0 || !p->drain) && eng_removal_due(e, p)) {
                eng_finish(e, p, LS_EV_PRODUCER_REMOVED, 0, 0); /* drain=0: a half header goes too */
                return;
            }
            r = read(p->fd, p->hdr + p->hdr_have, LS_FRAME_HEADER_SIZE - p->hdr_have);
            if (r < 0 && errno == EINTR)
                continue;
            if (r < 0 && errno == EAGAIN) {
                if (p->remove && p->drain) { /* drain found half a header and nothing more */
                    eng_finish(e, p, LS_EV_PRODUCER_DIED, 0, p->hdr_have);
                    return;
                }
                epoll_arm(e, p, 1);
                return;
            }
            eng_on_header(e, p, r < 0 ? -errno : r);
            break;
        case P_WAIT_DATA:
            if (p->is_sock) {
                if (p->staged < p->h.payload_len) {
                    r = stage_sync(e, p);
                    if (r == -EINTR)
                        continue;
                    if (r == -EAGAIN) { /* the socket is empty: wait for more */
                        if (p->remove) {
                            eng_wait_data_over(e, p, 0, p->staged);
                            return;
                        }
                        epoll_arm(e, p, 1);
                        return;
                    }
                    if (r == -ENOSPC) {
                        eng_refuse(e, p, LS_EBATCH_TOO_BIG, p->staged);
                        return;
                    }
                    if (r <= 0) {
                        eng_wait_data_over(e, p, r, p->staged);
                        return;
                    }
                    p->staged += (uint32_t)r;
                    continue;
                }
            } else {
                int avail;
                int q = eng_pipe_batch_queued(p, &avail);
                if (q < 0 || (q == 0 && p->remove)) {
                    eng_wait_data_over(e, p, 0, avail > 0 ? (uint64_t)avail : 0);
                    return;
                }
                if (q == 0) { /* part of it is queued: wake on the next bytes, never spin */
                    epoll_arm(e, p, avail > 0 ? 2 : 1);
                    return;
                }
            }
            eng_wait_stream(e, p);
            break;
        case P_PAYLOAD:
        case P_DISCARD: {
            if (p->arena) { /* shm: pwrite from the mapping (never DISCARD: nothing is in the pipe) */
                r = eng_write_shared(e, p);
                eng_on_payload(e, p, r, MOVED_SHARED);
                break;
            }
            int discard = p->state == P_DISCARD;
            r = do_move_sync(e, p, discard);
            if (r == -EINTR)
                continue;
            if (r == -EAGAIN) { /* it was all queued when the batch began */
                eng_payload_vanished(e, p);
                return;
            }
            if (discard)
                eng_on_discard(e, p, r);
            else
                eng_on_payload(e, p, r,
                               e->be == &ls_backend_readwrite || e->streams[p->stream_id].copy ? MOVED_COPY : MOVED_SPLICE);
            break;
        }
        default: /* P_WAIT_STREAM or P_FREE: nothing to do until the stream frees up */
            return;
        }
    }
}

static void *epoll_thread(void *arg)
{
    struct ls_engine *e = arg;
    struct epoll_event evs[64];
    pthread_mutex_lock(&e->mu);
    while (!e->stop) {
        pthread_mutex_unlock(&e->mu);
        int n = epoll_wait(e->ep, evs, 64, -1);
        pthread_mutex_lock(&e->mu);
        if (n < 0 && errno != EINTR) {
            eng_failed(e, -errno, "epoll_wait");
            break;
        }
        for (int i = 0; i < n; i++) {
            uint32_t id = evs[i].data.u32;
            if (id == UINT32_MAX) {
                uint64_t v;
                (void)!read(e->wake_fd, &v, sizeof v);
                eng_apply_requests(e);
                continue;
            }
            struct producer *p = &e->prod[id];
            if (p->state != P_FREE && p->started)
                eng_drive(e, p);
        }
    }
    pthread_mutex_unlock(&e->mu);
    return NULL;
}

/* splice(2) can be missing or refused (gVisor, odd filesystems): try one byte pipe -> memfd. */
static int probe_splice(char *reason, size_t len)
{
    int pfd[2];
    if (pipe2(pfd, O_CLOEXEC | O_NONBLOCK) < 0)
        return -errno;
    int mfd = memfd_create("logsink-probe", MFD_CLOEXEC);
    int r = 0;
    if (mfd < 0) {
        r = -errno;
    } else if (write(pfd[1], "x", 1) != 1) {
        r = -errno;
    } else {
        loff_t off = 0;
        if (splice(pfd[0], NULL, mfd, &off, 1, SPLICE_F_NONBLOCK) != 1)
            r = -errno;
    }
    if (r < 0)
        snprintf(reason, len, "splice: %s", strerror(-r));
    if (mfd >= 0)
        close(mfd);
    close(pfd[0]);
    close(pfd[1]);
    return r;
}

static int epoll_setup(struct ls_engine *e)
{
    e->ep = epoll_create1(EPOLL_CLOEXEC);
    if (e->ep < 0) {
        int r = -errno;
        snprintf(e->reason, sizeof e->reason, "epoll_create1: %s", strerror(-r));
        return r;
    }
    struct epoll_event ev = {.events = EPOLLIN, .data.u32 = UINT32_MAX};
    if (epoll_ctl(e->ep, EPOLL_CTL_ADD, e->wake_fd, &ev) < 0) {
        int r = -errno;
        snprintf(e->reason, sizeof e->reason, "epoll_ctl(wake fd): %s", strerror(-r));
        return r;
    }
    return 0;
}

static int splice_setup(struct ls_engine *e)
{
    char why[128] = "";
    int r = probe_splice(why, sizeof why);
    if (r < 0) {
        snprintf(e->reason, sizeof e->reason, "%s", why);
        return r;
    }
    return epoll_setup(e);
}

static int readwrite_setup(struct ls_engine *e)
{
    if (!e->rwbuf && !(e->rwbuf = malloc(RW_BUF_SIZE))) {
        snprintf(e->reason, sizeof e->reason, "readwrite buffer: %s", strerror(ENOMEM));
        return -ENOMEM;
    }
    return epoll_setup(e);
}

static void epoll_teardown(struct ls_engine *e)
{
    if (e->ep >= 0)
        close(e->ep);
    e->ep = -1;
}

static int epoll_watch(struct ls_engine *e, struct producer *p)
{
    struct epoll_event ev = {.events = EPOLLIN, .data.u32 = p->id};
    if (epoll_ctl(e->ep, EPOLL_CTL_ADD, p->fd, &ev) < 0)
        return -errno;
    p->armed = 1;
    return 0;
}

static void epoll_unwatch(struct ls_engine *e, struct producer *p)
{
    if (p->armed)
        (void)epoll_ctl(e->ep, EPOLL_CTL_DEL, p->fd, NULL); /* close() drops it anyway */
    p->armed = 0;
}

static void epoll_stream_fd(struct ls_engine *e, uint32_t sid, int fd)
{
    (void)e, (void)sid, (void)fd; /* files are written by fd directly */
}

static void epoll_removal(struct ls_engine *e, struct producer *p)
{
    if (p->state == P_HEADER || p->state == P_WAIT_DATA || p->state == P_PAYLOAD || p->state == P_DISCARD)
        eng_drive(e, p);
}

const struct ls_backend ls_backend_splice = {
    .kind = LS_ENGINE_SPLICE,
    .nonblocking_fds = 1,
    .sync_is_op = 0,
    .setup = splice_setup,
    .teardown = epoll_teardown,
    .thread = epoll_thread,
    .drive = epoll_drive,
    .watch = epoll_watch,
    .unwatch = epoll_unwatch,
    .arm = epoll_arm,
    .stream_fd = epoll_stream_fd,
    .removal = epoll_removal,
};

const struct ls_backend ls_backend_readwrite = {
    .kind = LS_ENGINE_READWRITE,
    .nonblocking_fds = 1,
    .sync_is_op = 0,
    .setup = readwrite_setup,
    .teardown = epoll_teardown,
    .thread = epoll_thread,
    .drive = epoll_drive,
    .watch = epoll_watch,
    .unwatch = epoll_unwatch,
    .arm = epoll_arm,
    .stream_fd = epoll_stream_fd,
    .removal = epoll_removal,
};
