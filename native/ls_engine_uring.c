/* ls_engine_uring.c - the io_uring backend of the engine (see ls_engine_int.h for the seam).
 *
 * Header reads are READ_FIXED into one registered buffer; payload moves with SPLICE between fixed
 * files (producer pipes, stream files, /dev/null for discards); an empty pipe is waited for with
 * POLL_ADD, a partly queued batch re-checked with a TIMEOUT, fsync=batch runs as FSYNC. Each
 * producer has at most one operation in flight; its CQE feeds the state machine (eng_on_*).
 */
#include "ls_engine_int.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdio.h>
#include <string.h>
#include <sys/vfs.h>
#include <unistd.h>

static uint32_t fixed_stream_slot(struct ls_engine *e, uint32_t sid) { return e->max_producers + sid; }
static uint32_t fixed_devnull_slot(struct ls_engine *e) { return e->max_producers + e->max_streams; }
/* Registered buffers: slot 0 holds every producer's header slot; producer id's arena is slot 1 + id
 * (the kernel takes at most IORING_MAX_REG_BUFFERS = 16384 slots: ids beyond use a plain WRITE). */
#define MAX_BUF_SLOTS 16384u
static uint32_t arena_slot(const struct producer *p) { return 1 + p->id; }

/* A free SQE. The ring has an entry per producer (each has at most one op in flight) plus spares,
 * so a full SQ only means "prepared but not submitted yet": submitting frees it. If the kernel
 * keeps refusing, the engine has failed (said once, loudly) and the SQE handed out goes nowhere. */
static struct io_uring_sqe *sqe_get(struct ls_engine *e)
{
    static __thread struct io_uring_sqe scratch;
    for (int tries = 0; tries < 64; tries++) {
        struct io_uring_sqe *sqe = ls_ring_get_sqe(&e->ring);
        if (sqe)
            return sqe;
        int r = ls_ring_submit_and_wait(&e->ring, 0);
        if (r < 0 && r != -EINTR && r != -EAGAIN && r != -EBUSY) {
            eng_failed(e, r, "io_uring_enter (submit)");
            break;
        }
    }
    eng_failed(e, -EBUSY, "io_uring submission queue");
    memset(&scratch, 0, sizeof scratch);
    return &scratch;
}

/* SQ entries: one per producer (one op each), the wake-up read, cancels: a power of two. */
static unsigned ring_entries(struct ls_engine *e)
{
    unsigned want = e->max_producers + 64, n = 64;
    while (n < want && n < 32768)
        n <<= 1;
    return n;
}

static void submit_poll(struct ls_engine *e, struct producer *p)
{
    struct io_uring_sqe *sqe = sqe_get(e);
    sqe->opcode = IORING_OP_POLL_ADD;
    sqe->fd = (int)p->id;
    sqe->flags = IOSQE_FIXED_FILE;
    sqe->poll32_events = POLLIN;
    sqe->user_data = UD(U_POLL, p->id);
    p->inflight++;
}

/* Re-check a partly queued batch later (a POLL_ADD would complete at once: bytes are there). */
static void submit_timer(struct ls_engine *e, struct producer *p)
{
    p->backoff_ns = p->backoff_ns ? p->backoff_ns * 2 : WAIT_BACKOFF_MIN_NS;
    if (p->backoff_ns > WAIT_BACKOFF_MAX_NS)
        p->backoff_ns = WAIT_BACKOFF_MAX_NS;
    p->ts.tv_sec = p->backoff_ns / 1000000000ll;
    p->ts.tv_nsec = p->backoff_ns % 1000000000ll;
    struct io_uring_sqe *sqe = sqe_get(e);
    sqe->opcode = IORING_OP_TIMEOUT;
    sqe->fd = -1;
    sqe->addr = (uint64_t)(uintptr_t)&p->ts;
    sqe->len = 1;
    sqe->off = 0; /* no completion count: a pure timer */
    sqe->user_data = UD(U_TIMER, p->id);
    p->inflight++;
}

/* SPLICE len bytes from `in` (a fixed-file slot if in_fixed, else a plain fd) to where this batch
 * goes: the stream's file at its offset (PAYLOAD) or /dev/null (DISCARD). SPLICE_F_NONBLOCK: the
 * bytes are queued, and if they vanished (the producer read them back) the op must not park an
 * io-wq worker on an empty pipe. */
static void submit_splice_out(struct ls_engine *e, struct producer *p, int in, int in_fixed, uint32_t len)
{
    struct io_uring_sqe *sqe = sqe_get(e);
    sqe->opcode = IORING_OP_SPLICE;
    sqe->splice_fd_in = in;
    sqe->splice_off_in = (uint64_t)-1;
    sqe->len = len;
    sqe->splice_flags = (in_fixed ? SPLICE_F_FD_IN_FIXED : 0) | SPLICE_F_MOVE | SPLICE_F_NONBLOCK;
    sqe->flags = IOSQE_FIXED_FILE;
    if (p->state == P_PAYLOAD) {
        sqe->fd = (int32_t)fixed_stream_slot(e, p->stream_id);
        sqe->off = p->batch_start + p->moved;
        sqe->user_data = UD(U_SPLICE, p->id);
    } else {
        sqe->fd = (int32_t)fixed_devnull_slot(e);
        sqe->off = (uint64_t)-1;
        sqe->user_data = UD(U_DISCARD, p->id);
    }
    p->inflight++;
}

/* Batches up to this size are written by the engine thread itself (splice, or pwrite from the arena);
 * larger ones go through the ring (SPLICE, WRITE_FIXED), where io-wq runs them beside the engine. */
#define INLINE_MAX (256u << 10)

static void uring_drive(struct ls_engine *e, struct producer *p)
{
    if (p->inflight || e->stop) /* stopping: issue nothing new, the thread waits out what runs */
        return;
    int avail;
    switch (p->state) {
    case P_HEADER:
        avail = eng_pipe_avail(p->fd);
        if (avail <= 0 && p->remove && (p->drain || p->hdr_have == 0)) {
            eng_finish(e, p, p->hdr_have ? LS_EV_PRODUCER_DIED : LS_EV_PRODUCER_REMOVED, 0, p->hdr_have);
            return;
        }
        if (p->remove && !p->drain) {
            eng_finish(e, p, LS_EV_PRODUCER_REMOVED, 0, 0);
            return;
        }
        if (avail <= 0) { /* empty: wait for data (or hangup) without holding an io-wq worker */
            submit_poll(e, p);
            return;
        }
        {
            struct io_uring_sqe *sqe = sqe_get(e);
            sqe->opcode = IORING_OP_READ_FIXED;
            sqe->fd = (int)p->id;
            sqe->flags = IOSQE_FIXED_FILE;
            sqe->addr = (uint64_t)(uintptr_t)(p->hdr + p->hdr_have);
            sqe->len = LS_FRAME_HEADER_SIZE - p->hdr_have;
            sqe->buf_index = 0;
            sqe->user_data = UD(U_HEADER, p->id);
            p->inflight++;
        }
        return;
    case P_WAIT_DATA:
        if (p->is_sock) {
            if (p->staged < p->h.payload_len) {
                avail = eng_pipe_avail(p->fd); /* FIONREAD of the socket */
                if (avail <= 0) {
                    if (p->remove) {
                        eng_wait_data_over(e, p, 0, p->staged);
                        return;
                    }
                    submit_poll(e, p);
                    return;
                }
                uint32_t want = p->h.payload_len - p->staged;
                if ((uint32_t)avail < want)
                    want = (uint32_t)avail;
                struct io_uring_sqe *sqe = sqe_get(e); /* socket -> stage pipe */
                sqe->opcode = IORING_OP_SPLICE;
                sqe->splice_fd_in = (int32_t)p->id;
                sqe->splice_off_in = (uint64_t)-1;
                sqe->len = want;
                sqe->splice_flags = SPLICE_F_FD_IN_FIXED | SPLICE_F_MOVE | SPLICE_F_NONBLOCK;
                sqe->fd = p->stage_w;
                sqe->off = (uint64_t)-1;
                sqe->user_data = UD(U_STAGE, p->id);
                p->inflight++;
                return;
            }
        } else {
            int q = eng_pipe_batch_queued(p, &avail);
            if (q < 0 || (q == 0 && p->remove)) {
                eng_wait_data_over(e, p, 0, avail > 0 ? (uint64_t)avail : 0);
                return;
            }
            if (q == 0) {
                if (avail <= 0)
                    submit_poll(e, p);
                else
                    submit_timer(e, p);
                return;
            }
        }
        eng_wait_stream(e, p);
        return;
    case P_SYNC: {
        struct io_uring_sqe *sqe = sqe_get(e);
        sqe->opcode = IORING_OP_FSYNC;
        sqe->fd = p->sync_fd; /* not the fixed slot: a rotation may have repointed it */
        sqe->fsync_flags = IORING_FSYNC_DATASYNC;
        sqe->user_data = UD(U_FSYNC, p->id);
        p->inflight++;
        return;
    }
    case P_PAYLOAD:
    case P_DISCARD: {
        /* All of the payload was queued before the batch began: splice the rest in one go. */
        uint32_t want = p->h.payload_len - p->moved;
        struct stream *st = &e->streams[p->stream_id];
        /* Written here rather than through the ring: a small batch (a flush()'s partial segment), whose
         * io-wq hand-offs (~55 us) cost a third of a flush while the copy costs the same; and a shm
         * batch the ring would punt to io-wq anyway (shm_write auto on ext4/tmpfs, or inline). */
        int inline_now = p->arena ? e->shm_write == LS_SHM_WRITE_INLINE ||
                                        (e->shm_write == LS_SHM_WRITE_AUTO && (!st->ring_writes || want <= INLINE_MAX))
                                  : want <= INLINE_MAX;
        if (p->state == P_PAYLOAD && inline_now && !st->copy) {
            /* Without the mutex: the control plane's calls (status, ctl_send, events) must not wait on a
             * slow disk. Nothing they do touches a producer in PAYLOAD or its busy stream's fd. */
            pthread_mutex_unlock(&e->mu);
            long r = p->arena ? eng_write_shared(e, p) : eng_splice_payload(e, p);
            pthread_mutex_lock(&e->mu);
            if (r == -EAGAIN && !p->arena) {
                eng_payload_vanished(e, p);
                return;
            }
            eng_on_payload(e, p, r, p->arena ? MOVED_SHARED : MOVED_SPLICE);
            if (p->state != P_FREE)
                eng_drive(e, p); /* the rest, the next header, or the SYNC */
            return;
        }
        if (p->arena) { /* shm: from the arena, a registered buffer where the ring took it */
            struct io_uring_sqe *sqe = sqe_get(e);
            sqe->opcode = p->arena_fixed ? IORING_OP_WRITE_FIXED : IORING_OP_WRITE;
            sqe->fd = (int32_t)fixed_stream_slot(e, p->stream_id);
            sqe->flags = IOSQE_FIXED_FILE;
            sqe->addr = (uint64_t)(uintptr_t)(p->arena + p->arena_off + p->moved);
            sqe->len = want;
            sqe->off = p->batch_start + p->moved;
            sqe->buf_index = p->arena_fixed ? (uint16_t)arena_slot(p) : 0;
            sqe->user_data = UD(U_WRITE, p->id);
            p->inflight++;
            return;
        }
        if (e->streams[p->stream_id].copy) { /* the file refused splice: read + pwrite, here */
            enum pstate st = p->state;
            long r = eng_move_copy(e, p, st == P_DISCARD);
            if (r == -EAGAIN)
                eng_payload_vanished(e, p);
            else if (st == P_DISCARD)
                eng_on_discard(e, p, r);
            else
                eng_on_payload(e, p, r, MOVED_COPY);
            if (p->state != P_FREE)
                eng_drive(e, p); /* the rest of this batch, the next header, or the SYNC */
            return;
        }
        if (p->is_sock) {
            submit_splice_out(e, p, p->stage_r, 0, want);
            return;
        }
        avail = eng_pipe_avail(p->fd);
        if (avail < 0 || (uint32_t)avail < want) {
            eng_payload_vanished(e, p);
            return;
        }
        submit_splice_out(e, p, (int)p->id, 1, want);
        return;
    }
    default:
        return;
    }
}

static void arm_wake(struct ls_engine *e)
{
    struct io_uring_sqe *sqe = sqe_get(e);
    sqe->opcode = IORING_OP_READ;
    sqe->fd = e->wake_fd;
    sqe->addr = (uint64_t)(uintptr_t)&e->wake_val;
    sqe->len = sizeof e->wake_val;
    sqe->off = (uint64_t)-1;
    sqe->user_data = UD(U_WAKE, 0);
    e->wake_armed = 1;
}

static void cancel_op(struct ls_engine *e, struct producer *p)
{
    if (!p->inflight || p->cancel_sent)
        return;
    struct io_uring_sqe *sqe = sqe_get(e);
    sqe->opcode = IORING_OP_ASYNC_CANCEL;
    sqe->fd = -1;
    sqe->addr = UD(U_POLL, p->id); /* only polls wait indefinitely; other ops are short */
    sqe->user_data = UD(U_CANCEL, p->id);
    p->cancel_sent = 1;
}

static void on_cqe(struct ls_engine *e, uint64_t ud, int res)
{
    uint32_t op = (uint32_t)(ud >> 32), id = (uint32_t)ud;
    if (op == U_WAKE) {
        e->wake_armed = 0;
        return;
    }
    if (op == U_CANCEL || id >= e->max_producers)
        return;
    struct producer *p = &e->prod[id];
    p->inflight--;
    p->cancel_sent = 0;
    if (p->state == P_FREE)
        return;
    switch (op) {
    case U_HEADER:
        if (res == -EINTR || res == -EAGAIN)
            break;
        eng_on_header(e, p, res);
        break;
    case U_POLL:
        if (res == -ECANCELED)
            break; /* eng_drive() decides: removal, or poll again */
        if (res >= 0 && (res & (POLLHUP | POLLERR | (p->is_sock ? POLLIN : 0))) && eng_pipe_avail(p->fd) <= 0) {
            if (p->state == P_HEADER)
                eng_on_header(e, p, 0);
            else if (p->state == P_WAIT_DATA)
                eng_wait_data_over(e, p, 0, p->staged);
            else if (p->state == P_PAYLOAD)
                eng_on_payload(e, p, 0, MOVED_SPLICE);
            else
                eng_on_discard(e, p, 0);
            return;
        }
        break;
    case U_TIMER: /* -ETIME: time to look at a partly queued batch again */
        break;
    case U_FSYNC:
        if (res == -EINTR || res == -EAGAIN)
            break; /* eng_drive() submits it again */
        eng_synced(e, p, &e->streams[p->stream_id], res < 0 ? res : 0);
        break;
    case U_SPLICE:
        if (res == -EINTR || res == -EAGAIN)
            break;
        eng_on_payload(e, p, res, MOVED_SPLICE);
        break;
    case U_WRITE:
        if (res == -EINTR || res == -EAGAIN)
            break; /* eng_drive() writes the rest */
        eng_on_payload(e, p, res, MOVED_SHARED);
        break;
    case U_DISCARD:
        if (res == -EINTR || res == -EAGAIN)
            break;
        eng_on_discard(e, p, res);
        break;
    case U_STAGE:
        if (res == -EINTR)
            break;
        if (res == -EAGAIN && eng_stage_full(p)) { /* the batch does not fit the stage's slots */
            eng_refuse(e, p, LS_EBATCH_TOO_BIG, p->staged);
            return;
        }
        if (res == -EAGAIN)
            break;
        if (res > 0) {
            p->staged += (uint32_t)res;
            break;
        }
        /* The socket ended (0) or failed (ECONNRESET...) mid-batch: nothing was written yet. */
        eng_wait_data_over(e, p, res, p->staged);
        return;
    }
    if (p->state != P_FREE)
        eng_drive(e, p);
}

static int live_inflight(struct ls_engine *e)
{
    int n = 0;
    for (uint32_t i = 0; i < e->max_producers; i++)
        n += e->prod[i].inflight;
    return n;
}

static void *uring_thread(void *arg)
{
    struct ls_engine *e = arg;
    pthread_mutex_lock(&e->mu);
    for (;;) {
        if (e->stop) {
            /* Cancel what still waits, then leave once nothing references our buffers. */
            for (uint32_t i = 0; i < e->max_producers; i++)
                if (e->prod[i].inflight)
                    cancel_op(e, &e->prod[i]);
            if (!live_inflight(e))
                break;
        }
        if (!e->wake_armed)
            arm_wake(e);
        pthread_mutex_unlock(&e->mu);
        int r = ls_ring_submit_and_wait(&e->ring, 1);
        pthread_mutex_lock(&e->mu);
        if (r < 0 && r != -EINTR && r != -EBUSY && r != -EAGAIN) {
            eng_failed(e, r, "io_uring_enter");
            break;
        }
        struct io_uring_cqe *cqe;
        int woke = 0;
        while ((cqe = ls_ring_peek_cqe(&e->ring)) != NULL) {
            uint64_t ud = cqe->user_data;
            int res = cqe->res;
            ls_ring_cqe_seen(&e->ring);
            if ((ud >> 32) == U_WAKE)
                woke = 1;
            on_cqe(e, ud, res);
        }
        if (woke)
            eng_apply_requests(e);
        if (e->failed)
            break; /* said so (LS_EV_ENGINE_FAILED); nothing more moves */
    }
    pthread_mutex_unlock(&e->mu);
    return NULL;
}

static int uring_setup(struct ls_engine *e)
{
    /* COOP_TASKRUN: completions of io-wq work wait for our next io_uring_enter instead of
     * interrupting the thread (5.19+; older kernels refuse the flag: retry without it). */
    int r = ls_ring_init(&e->ring, ring_entries(e), IORING_SETUP_COOP_TASKRUN);
    if (r == -EINVAL)
        r = ls_ring_init(&e->ring, ring_entries(e), 0);
    if (r < 0) {
        snprintf(e->reason, sizeof e->reason, "io_uring_setup: %s", strerror(-r));
        return r;
    }
    e->ring_ok = 1;
    static const int need[] = {IORING_OP_SPLICE, IORING_OP_READ_FIXED, IORING_OP_POLL_ADD, IORING_OP_READ,
                               IORING_OP_ASYNC_CANCEL, IORING_OP_TIMEOUT, IORING_OP_FSYNC, IORING_OP_WRITE, IORING_OP_WRITE_FIXED};
    static const char *names[] = {"SPLICE", "READ_FIXED", "POLL_ADD", "READ", "ASYNC_CANCEL", "TIMEOUT", "FSYNC", "WRITE", "WRITE_FIXED"};
    for (unsigned i = 0; i < sizeof need / sizeof need[0]; i++) {
        r = ls_ring_op_supported(&e->ring, need[i]);
        if (r <= 0) {
            snprintf(e->reason, sizeof e->reason, "io_uring lacks IORING_OP_%s", names[i]);
            return r < 0 ? r : -EOPNOTSUPP;
        }
    }
    r = ls_ring_register_files_sparse(&e->ring, e->max_producers + e->max_streams + 1);
    if (r < 0) {
        snprintf(e->reason, sizeof e->reason, "io_uring register files: %s", strerror(-r));
        return r;
    }
    struct iovec iov = {.iov_base = e->hdrbuf, .iov_len = (size_t)e->max_producers * HDR_STRIDE};
    /* A buffer slot per producer for shm arenas (registered as they come); where the kernel has no
     * sparse table (before 5.13) only the headers are registered and arenas go by plain WRITE. */
    unsigned nbuf = e->max_producers + 1 < MAX_BUF_SLOTS ? e->max_producers + 1 : MAX_BUF_SLOTS;
    r = ls_ring_register_buffers_sparse(&e->ring, &iov, nbuf);
    if (r == 0) {
        e->bufs_sparse = 1;
    } else {
        snprintf(e->shm_reg, sizeof e->shm_reg, "no sparse buffer table: %s", strerror(-r));
        r = ls_ring_register_buffers(&e->ring, &iov, 1);
    }
    if (r < 0) {
        snprintf(e->reason, sizeof e->reason, "io_uring register buffers: %s", strerror(-r));
        return r;
    }
    r = ls_ring_update_file(&e->ring, fixed_devnull_slot(e), e->devnull);
    if (r < 0) {
        snprintf(e->reason, sizeof e->reason, "io_uring files update: %s", strerror(-r));
        return r;
    }
    return 0;
}

static void uring_teardown(struct ls_engine *e)
{
    if (e->ring_ok)
        ls_ring_exit(&e->ring);
    e->ring_ok = 0;
}

static int uring_watch(struct ls_engine *e, struct producer *p)
{
    int r = ls_ring_update_file(&e->ring, p->id, p->fd);
    if (r < 0 || !p->arena || !e->bufs_sparse || arena_slot(p) >= MAX_BUF_SLOTS)
        return r;
    /* Register only an arena the ring will write from: registration pins (and so faults in) every
     * page of it, which a producer that fills a little of a large arena would otherwise pay for in
     * the daemon (1000 producers with 4 MiB arenas: 4 GiB zeroed and pinned). */
    if (!(e->shm_write == LS_SHM_WRITE_RING ||
          (e->shm_write == LS_SHM_WRITE_AUTO && e->streams[p->stream_id].ring_writes)))
        return 0;
    /* Register the arena: WRITE_FIXED then copies with no per-write page pinning. Refused (no
     * BUFFERS_UPDATE, RLIMIT_MEMLOCK for a service user without CAP_IPC_LOCK): a plain WRITE from
     * the mapping, and status says why. */
    r = ls_ring_update_buffer(&e->ring, arena_slot(p), (void *)p->arena, p->arena_len);
    p->arena_fixed = r == 0;
    if (r == 0)
        e->shm_reg[0] = '\0';
    else
        snprintf(e->shm_reg, sizeof e->shm_reg, "registering the arena failed: %s", strerror(-r));
    return 0;
}

static void uring_unwatch(struct ls_engine *e, struct producer *p)
{
    (void)ls_ring_update_file(&e->ring, p->id, -1); /* drop the ring's reference to the pipe */
    if (p->arena_fixed) /* no op in flight: the kernel unpins the arena's pages */
        (void)ls_ring_update_buffer(&e->ring, arena_slot(p), NULL, 0);
    p->arena_fixed = 0;
}

static void uring_arm(struct ls_engine *e, struct producer *p, int on)
{
    (void)e, (void)p, (void)on; /* io_uring polls per operation */
}

/* Filesystems whose buffered writes io_uring completes without io-wq (FMODE_BUF_WASYNC). */
static int takes_nowait_writes(int fd)
{
    struct statfs sf;
    if (fd < 0 || fstatfs(fd, &sf) < 0)
        return 0;
    return sf.f_type == 0x58465342 /* XFS */ || sf.f_type == (typeof(sf.f_type))0x9123683E /* btrfs */;
}

static void uring_stream_fd(struct ls_engine *e, uint32_t sid, int fd)
{
    e->streams[sid].ring_writes = takes_nowait_writes(fd);
    /* -1 clears the slot (the ring drops its reference to the old file). A failed update would
     * send batches to the old, rotated file: never silently. */
    int r = ls_ring_update_file(&e->ring, fixed_stream_slot(e, sid), fd);
    if (r < 0)
        eng_failed(e, r, "io_uring files update (rotation)");
}

static void uring_removal(struct ls_engine *e, struct producer *p)
{
    if (p->inflight)
        cancel_op(e, p); /* a poll may wait forever; other ops are short and finish by themselves */
    else
        eng_drive(e, p);
}

const struct ls_backend ls_backend_uring = {
    .kind = LS_ENGINE_IO_URING,
    .nonblocking_fds = 0,
    .sync_is_op = 1,
    .setup = uring_setup,
    .teardown = uring_teardown,
    .thread = uring_thread,
    .drive = uring_drive,
    .watch = uring_watch,
    .unwatch = uring_unwatch,
    .arm = uring_arm,
    .stream_fd = uring_stream_fd,
    .removal = uring_removal,
};
