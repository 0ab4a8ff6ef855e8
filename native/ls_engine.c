/* ls_engine.c - the daemon's data plane (see ls_engine.h for the contract).
 *
 * One state machine per producer, shared by the three engines; only how an operation is issued
 * differs. The epoll engines (splice, readwrite) try the syscall now and arm epoll on EAGAIN; the
 * io_uring engine submits an SQE and feeds the CQE's result to the same handler.
 *
 *   HEADER --32 bytes--> WAIT_DATA --whole payload queued--> WAIT_STREAM --stream free-->
 *      |                    |                                   PAYLOAD --payload_len moved--> HEADER
 *      +-- EOF: ends        +-- EOF: died (nothing written)        |
 *                                          write error: truncate back, DISCARD the rest
 *                                          last byte not '\n' / bytes vanished: truncate back, bad frame
 *
 * A stream writes one batch at a time at the offset it owns: batches of different producers never
 * interleave, and a failed batch is cut back off the file so no torn line or hole stays behind.
 *
 * Containment: a batch takes its stream only once ALL of its payload is queued (in the producer's
 * pipe, or for TCP in the engine's stage pipe), so moving it never waits on the producer: one that
 * stalls mid-batch (SIGSTOP, a bug, malice) holds nobody but itself. The pipe must therefore hold a
 * whole batch (a larger payload_len is a bad frame; clients size batches to their pipe). Every
 * committed batch must end in '\n' (checked with a 1-byte pread of the file's page cache), so an
 * overstated or unterminated batch can only garble its own producer's lines.
 */
#define _GNU_SOURCE
#include "ls_engine.h"
#include "ls_frame.h"
#include "ls_ring.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

enum pstate { P_FREE = 0, P_HEADER, P_WAIT_DATA, P_WAIT_STREAM, P_PAYLOAD, P_DISCARD, P_SYNC };

/* io_uring user_data: op kind in the high 32 bits, producer id in the low. */
enum uop { U_HEADER = 1, U_POLL, U_SPLICE, U_DISCARD, U_WAKE, U_CANCEL, U_STAGE, U_TIMER, U_FSYNC };
#define UD(op, id) (((uint64_t)(op) << 32) | (uint32_t)(id))

/* The readwrite engine's bounce buffer: big enough that a 256 KiB batch is one read + one pwrite. */
#define RW_BUF_SIZE (1u << 20)
/* Header slots in the registered buffer are 64 bytes apart (cache lines, no false sharing). */
#define HDR_STRIDE 64
/* A batch partly queued is re-checked after a backoff (io_uring: a POLL_ADD would fire at once
 * while bytes sit in the pipe). Clients hand a batch over in one call, so this path is for slow or
 * stalled producers: from 100 us, doubling, to at most 50 ms (20 wake-ups/s per stalled producer). */
#define WAIT_BACKOFF_MIN_NS 100000ll
#define WAIT_BACKOFF_MAX_NS 50000000ll
/* A TCP batch is staged (socket -> stage pipe) before it is written. Socket buffers splice as one
 * pipe slot per fragment, often < 4 KiB (an MSS of 1448 bytes), so a stage pipe of N bytes is only
 * promised to hold N/4 of payload: TCP producers are told that max_batch in WELCOME. */
#define STAGE_FILL_DIVISOR 4

struct stream;

struct producer {
    enum pstate state;
    uint32_t id, stream_id;
    int fd;
    int inflight;        /* io_uring ops outstanding for this producer */
    int drain, remove;   /* removal requested: drain first (1) or stop now */
    int armed;           /* epoll: interest currently enabled */
    int started;         /* engine thread has taken it over */
    int cancel_sent;
    /* Socket producers (TCP): splice needs a pipe on one side, so payload goes
     * socket -> stage pipe (engine-owned) -> file. staged = bytes waiting in the stage pipe. */
    int is_sock;
    int stage_r, stage_w;
    uint32_t staged;
    unsigned char *hdr;  /* HDR_STRIDE bytes in the header buffer */
    uint32_t hdr_have;
    struct ls_frame_header h;
    uint64_t batch_start;  /* file offset where this batch begins */
    uint32_t moved;        /* payload bytes moved (or discarded) so far */
    uint32_t cap;          /* the largest payload_len this producer's pipe (or stage) holds whole */
    int et;                /* epoll: armed edge-triggered (a partial batch waits for more bytes) */
    long long backoff_ns;  /* io_uring: WAIT_DATA re-check interval */
    struct __kernel_timespec ts; /* io_uring: the TIMEOUT of that re-check */
    int32_t fail_err;      /* DISCARD: why the batch failed */
    struct producer *next_wait;
    struct ls_counters c;
};

struct stream {
    int fd;
    uint64_t offset;
    struct producer *busy;
    struct producer *wait_head, *wait_tail;
    int paused;           /* no new batch starts (a full spool with the "block" policy) */
    int sync;             /* LS_SYNC_BATCH: a batch is released only once fdatasync covered it */
    int pending_resume;   /* unpaused: serve the waiters on the next wake */
    int pending;          /* a set_stream request waits to be applied */
    int pending_fd;
    uint64_t pending_off;
    struct ls_counters c;
};

struct ls_engine {
    int kind;
    char reason[256];
    uint32_t max_streams, max_producers, max_batch;
    struct producer *prod;
    struct stream *streams;
    unsigned char *hdrbuf;
    int devnull;
    int notify_fd, wake_fd;
    pthread_t thread;
    int thread_started;
    pthread_mutex_t mu;
    pthread_cond_t cond;   /* signalled when a set_stream request was applied */
    int stop;
    /* events */
    struct ls_event *ev;
    size_t ev_len, ev_cap;
    struct ls_counters total;
    /* epoll engines */
    int ep;
    char *rwbuf;
    /* io_uring engine */
    struct ls_ring ring;
    int ring_ok;
    int wake_armed;
    uint64_t wake_val;
};

static void drive(struct ls_engine *e, struct producer *p);

/* ---------------------------------------------------------------------------------------- */
/* helpers                                                                                    */

static void emit(struct ls_engine *e, uint32_t kind, struct producer *p, int32_t err, uint64_t seq,
                 uint64_t bytes, uint64_t records)
{
    if (e->ev_len == e->ev_cap) {
        size_t cap = e->ev_cap ? e->ev_cap * 2 : 256;
        struct ls_event *n = realloc(e->ev, cap * sizeof *n);
        if (!n)
            return; /* out of memory: the event is lost; counters still tell */
        e->ev = n;
        e->ev_cap = cap;
    }
    struct ls_event *v = &e->ev[e->ev_len++];
    v->kind = kind;
    v->producer_id = p->id;
    v->stream_id = p->stream_id;
    v->err = err;
    v->seq = seq;
    v->bytes = bytes;
    v->records = records;
    if (e->ev_len == 1) {
        uint64_t one = 1;
        (void)!write(e->notify_fd, &one, sizeof one);
    }
}

static uint32_t fixed_stream_slot(struct ls_engine *e, uint32_t sid) { return e->max_producers + sid; }
static uint32_t fixed_devnull_slot(struct ls_engine *e) { return e->max_producers + e->max_streams; }

static int pipe_avail(int fd)
{
    int n = 0;
    if (ioctl(fd, FIONREAD, &n) < 0)
        return -errno;
    return n;
}

/* on: 0 = no interest, 1 = EPOLLIN level-triggered, 2 = edge-triggered (a partial batch sits in
 * the pipe: wake on new bytes only; a pipe someone poll()ed wakes its readers on every write). */
static void epoll_arm(struct ls_engine *e, struct producer *p, int on)
{
    if (e->kind == LS_ENGINE_IO_URING || p->armed == on)
        return;
    struct epoll_event ev = {.events = on == 2 ? EPOLLIN | EPOLLET : on ? EPOLLIN : 0, .data.u32 = p->id};
    if (epoll_ctl(e->ep, EPOLL_CTL_MOD, p->fd, &ev) == 0)
        p->armed = on;
}

/* The largest payload_len p may announce: a pipe must hold header + payload whole (the producer
 * queues both before we read either); a stage pipe holds the payload (p->cap, set at add). */
static uint32_t producer_cap(struct ls_engine *e, struct producer *p, int refresh)
{
    if (!p->is_sock && (refresh || !p->cap)) {
        int sz = fcntl(p->fd, F_GETPIPE_SZ);
        p->cap = sz > LS_FRAME_HEADER_SIZE ? (uint32_t)sz - LS_FRAME_HEADER_SIZE : 0;
    }
    return p->cap < e->max_batch ? p->cap : e->max_batch;
}

/* The producer is over: close its pipe, free its slot, say why. No op may be in flight. */
static void finish(struct ls_engine *e, struct producer *p, uint32_t kind, int32_t err, uint64_t bytes)
{
    if (e->kind == LS_ENGINE_IO_URING)
        ls_ring_update_file(&e->ring, p->id, -1); /* drop the ring's reference to the pipe */
    else
        epoll_ctl(e->ep, EPOLL_CTL_DEL, p->fd, NULL);
    close(p->fd);
    p->fd = -1;
    if (p->is_sock) {
        close(p->stage_r);
        close(p->stage_w);
        p->stage_r = p->stage_w = -1;
        p->staged = 0;
    }
    if (p->remove && kind == LS_EV_PRODUCER_EOF)
        kind = LS_EV_PRODUCER_REMOVED;
    emit(e, kind, p, err, p->h.seq, bytes, 0);
    p->state = P_FREE;
}

static void stream_release(struct ls_engine *e, struct stream *s);

/* Give the stream to the next waiting producer, if any, and start its payload. */
static void stream_release(struct ls_engine *e, struct stream *s)
{
    s->busy = NULL;
    if (s->pending) {
        s->fd = s->pending_fd;
        s->offset = s->pending_off;
        s->pending = 0;
        if (e->kind == LS_ENGINE_IO_URING && s->fd >= 0)
            ls_ring_update_file(&e->ring, fixed_stream_slot(e, (uint32_t)(s - e->streams)), s->fd);
        pthread_cond_broadcast(&e->cond);
    }
    struct producer *p = s->wait_head;
    if (!p || s->fd < 0 || s->paused)
        return;
    s->wait_head = p->next_wait;
    if (!s->wait_head)
        s->wait_tail = NULL;
    p->next_wait = NULL;
    s->busy = p;
    /* Someone truncated the file under us (logrotate's copytruncate, an admin's `: > file`):
     * continue at its new end instead of leaving a hole of NUL bytes. One fstat per batch. */
    struct stat st;
    if (fstat(s->fd, &st) == 0 && (uint64_t)st.st_size < s->offset)
        s->offset = (uint64_t)st.st_size;
    p->batch_start = s->offset;
    p->moved = 0;
    p->state = P_PAYLOAD;
    drive(e, p);
}

/* Cut a failed or torn batch back off the file: the file ends at the last whole batch again. */
static void truncate_back(struct stream *s, uint64_t start)
{
    if (s->fd >= 0)
        (void)!ftruncate(s->fd, (off_t)start);
    s->offset = start;
}

/* The producer broke the protocol with this batch (why = LS_EFRAME_* / LS_EBATCH_*): count it and
 * end the producer. The caller has cut back whatever of the batch reached the file. */
static void refuse(struct ls_engine *e, struct producer *p, int32_t why, uint64_t bytes)
{
    p->c.errors++;
    e->total.errors++;
    if (p->state == P_PAYLOAD || p->state == P_DISCARD)
        e->streams[p->stream_id].c.errors++;
    finish(e, p, LS_EV_BAD_FRAME, why, bytes);
}

/* The whole payload is queued: wait for the stream (or take it now). */
static void wait_stream(struct ls_engine *e, struct producer *p)
{
    struct stream *s = &e->streams[p->stream_id];
    p->state = P_WAIT_STREAM;
    p->backoff_ns = 0;
    epoll_arm(e, p, 0);
    if (s->wait_tail)
        s->wait_tail->next_wait = p;
    else
        s->wait_head = p;
    s->wait_tail = p;
    if (!s->busy)
        stream_release(e, s); /* takes p (the only waiter) and drives it */
}

/* For a pipe producer in WAIT_DATA: 1 if the whole payload is queued, 0 if not yet, -1 if it never
 * will be (the pipe's writer is gone). *avail gets the bytes queued. */
static int pipe_batch_queued(struct producer *p, int *avail)
{
    *avail = pipe_avail(p->fd);
    if (*avail >= (int)p->h.payload_len)
        return 1;
    struct pollfd pfd = {.fd = p->fd, .events = POLLIN};
    if (poll(&pfd, 1, 0) == 1 && (pfd.revents & (POLLHUP | POLLERR))) {
        *avail = pipe_avail(p->fd); /* the last bytes may have come just before the close */
        return *avail >= (int)p->h.payload_len ? 1 : -1;
    }
    return 0;
}

/* Copy len bytes of fd from src down to dst < src (no user-space copy where the kernel can). */
static int move_down(int fd, uint64_t src, uint64_t dst, uint64_t len)
{
    uint64_t gap = src - dst;
    while (len) {
        size_t n = len < gap ? (size_t)len : (size_t)gap; /* ranges never overlap */
        if (n > (1u << 30))
            n = 1u << 30;
        loff_t in = (loff_t)src, out = (loff_t)dst;
        ssize_t r = copy_file_range(fd, &in, fd, &out, n, 0);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0) { /* no copy_file_range here: a bounce buffer (a rare repair, not the data path) */
            char buf[65536];
            size_t m = n < sizeof buf ? n : sizeof buf;
            ssize_t got = pread(fd, buf, m, (off_t)src);
            if (got <= 0)
                return got < 0 ? -errno : -EIO;
            ssize_t put = pwrite(fd, buf, (size_t)got, (off_t)dst);
            if (put < 0)
                return -errno;
            r = put;
        }
        src += (uint64_t)r;
        dst += (uint64_t)r;
        len -= (uint64_t)r;
    }
    return 0;
}

/* logrotate's copytruncate (or `: > file`) ran between our fstat and the write: the batch landed
 * past the new end of the file, behind a hole that reads as NULs. The byte before a batch is the
 * '\n' that ended the one before; a NUL there means exactly this. Move the batch down to just after
 * the file's last whole line and cut the file after it. Returns the bytes of hole closed (0 if
 * none), or -errno; p->batch_start is updated. */
static int64_t close_truncation_hole(struct stream *s, struct producer *p)
{
    uint64_t start = p->batch_start, len = p->h.payload_len;
    char c;
    if (start == 0 || pread(s->fd, &c, 1, (off_t)(start - 1)) != 1 || c != '\0')
        return 0; /* whole (or cut again since: the next batch's fstat finds the new end) */
    /* Where does the real data end? Before the first hole, and before the run of NULs ending at
     * the batch (the block that holds the new end is allocated and zero-filled past it). */
    uint64_t end = start;
    off_t h = lseek(s->fd, 0, SEEK_HOLE);
    if (h >= 0 && (uint64_t)h < end)
        end = (uint64_t)h;
    char buf[65536];
    uint64_t t = 0;
    while (end > 0) {
        size_t n = end < sizeof buf ? (size_t)end : sizeof buf;
        ssize_t r = pread(s->fd, buf, n, (off_t)(end - n));
        if (r != (ssize_t)n)
            return r < 0 ? -errno : -EIO;
        ssize_t i = (ssize_t)n - 1;
        while (i >= 0 && buf[i] != '\n')
            i--; /* data before the hole must end in a whole line too: a cut one goes */
        if (i >= 0) {
            t = end - n + (uint64_t)i + 1;
            break;
        }
        end -= n;
    }
    int r = move_down(s->fd, start, t, len);
    if (r == 0 && ftruncate(s->fd, (off_t)(t + len)) < 0)
        r = -errno;
    p->batch_start = t; /* on failure the caller cuts back to here: the hole goes with the batch */
    return r < 0 ? r : (int64_t)(start - t);
}

/* 1 if the batch just written ends in '\n', 0 if not, -errno if it could not be read back. One
 * byte from the page cache; a file cut shorter meanwhile (copytruncate) cannot be checked. */
static int batch_ends_in_newline(struct stream *s, struct producer *p)
{
    char last;
    ssize_t n = pread(s->fd, &last, 1, (off_t)(p->batch_start + p->h.payload_len - 1));
    if (n < 0)
        return -errno;
    return n == 0 || last == '\n';
}

/* ---------------------------------------------------------------------------------------- */
/* the state machine: results of operations, whichever engine issued them                    */

static void on_header(struct ls_engine *e, struct producer *p, long r)
{
    if (r < 0) {
        p->c.errors++;
        e->total.errors++;
        finish(e, p, LS_EV_PRODUCER_ERROR, (int32_t)r, 0);
        return;
    }
    if (r == 0) { /* EOF */
        if (p->hdr_have == 0)
            finish(e, p, LS_EV_PRODUCER_EOF, 0, 0);
        else {
            p->c.errors++;
            e->total.errors++;
            finish(e, p, LS_EV_PRODUCER_DIED, 0, p->hdr_have);
        }
        return;
    }
    p->hdr_have += (uint32_t)r;
    p->c.header_bytes += (uint64_t)r;
    e->total.header_bytes += (uint64_t)r;
    if (p->hdr_have < LS_FRAME_HEADER_SIZE)
        return; /* drive() reads the rest */
    memcpy(&p->h, p->hdr, sizeof p->h);
    p->hdr_have = 0;
    int bad = ls_frame_check(&p->h, e->max_batch);
    if (!bad && p->h.payload_len > producer_cap(e, p, 0) && p->h.payload_len > producer_cap(e, p, 1))
        bad = LS_EBATCH_TOO_BIG; /* it could never be queued whole: waiting for it would be forever */
    if (bad) {
        refuse(e, p, bad, 0);
        return;
    }
    p->state = P_WAIT_DATA; /* drive() takes it from here */
    p->staged = 0;
    p->backoff_ns = 0;
}

static void synced(struct ls_engine *e, struct producer *p, struct stream *s, int r);

/* The batch is in the file: count it, then release it (after its fdatasync, with fsync=batch). */
static void batch_done(struct ls_engine *e, struct producer *p, struct stream *s)
{
    uint64_t len = p->h.payload_len;
    s->offset = p->batch_start + len;
    s->c.offset = s->offset;
    s->c.bytes += len;
    s->c.records += p->h.record_count;
    s->c.batches++;
    p->c.bytes += len;
    p->c.records += p->h.record_count;
    p->c.batches++;
    p->c.last_seq = p->h.seq;
    e->total.bytes += len;
    e->total.records += p->h.record_count;
    e->total.batches++;
    p->staged = 0;
    if (s->sync == LS_SYNC_BATCH) {
        if (e->kind == LS_ENGINE_IO_URING) { /* drive() submits an FSYNC; the stream is free meanwhile */
            p->state = P_SYNC;
            return;
        }
        /* The epoll engines sync in their thread: other streams wait the sync out, by policy. */
        int r = fdatasync(s->fd) < 0 ? -errno : 0;
        synced(e, p, s, r);
        return;
    }
    emit(e, LS_EV_BATCH_DONE, p, 0, p->h.seq, len, p->h.record_count);
    p->state = P_HEADER;
}

/* fsync=batch: the batch's fdatasync finished (r = 0 or -errno): now release it, or report it
 * failed (it is in the file, but the disk did not confirm it). */
static void synced(struct ls_engine *e, struct producer *p, struct stream *s, int r)
{
    s->c.syncs++;
    if (r < 0) {
        p->c.errors++;
        s->c.errors++;
        e->total.errors++;
        emit(e, LS_EV_BATCH_FAILED, p, r, p->h.seq, p->h.payload_len, p->h.record_count);
    } else {
        emit(e, LS_EV_BATCH_DONE, p, 0, p->h.seq, p->h.payload_len, p->h.record_count);
    }
    p->state = P_HEADER;
}

static void on_payload(struct ls_engine *e, struct producer *p, long r, int copied)
{
    struct stream *s = &e->streams[p->stream_id];
    if (r > 0) {
        p->moved += (uint32_t)r;
        uint64_t *ctr = copied ? &s->c.bytes_copied : &s->c.bytes_spliced;
        *ctr += (uint64_t)r;
        if (copied) {
            p->c.bytes_copied += (uint64_t)r;
            e->total.bytes_copied += (uint64_t)r;
        } else {
            p->c.bytes_spliced += (uint64_t)r;
            e->total.bytes_spliced += (uint64_t)r;
        }
        if (p->moved == p->h.payload_len) {
            int64_t hole = close_truncation_hole(s, p);
            if (hole > 0) {
                s->c.holes_closed++;
                emit(e, LS_EV_HOLE_CLOSED, p, 0, p->h.seq, (uint64_t)hole, 0);
            }
            int nl = hole < 0 ? (int)hole : batch_ends_in_newline(s, p);
            if (nl == 0) { /* it would glue the next batch (maybe another producer's) onto its tail */
                truncate_back(s, p->batch_start);
                refuse(e, p, LS_EBATCH_NO_NEWLINE, p->moved);
            } else if (nl < 0) { /* unreadable: we cannot vouch for it, so it is not committed */
                truncate_back(s, p->batch_start);
                p->c.errors++;
                s->c.errors++;
                e->total.errors++;
                emit(e, LS_EV_BATCH_FAILED, p, nl, p->h.seq, p->h.payload_len, p->h.record_count);
                p->state = P_HEADER;
                p->staged = 0;
            } else {
                batch_done(e, p, s);
            }
            stream_release(e, s);
        }
        return;
    }
    if (r == 0) { /* the pipe ended mid-batch: the producer died */
        uint64_t partial = p->moved;
        truncate_back(s, p->batch_start);
        p->c.errors++;
        s->c.errors++;
        e->total.errors++;
        finish(e, p, LS_EV_PRODUCER_DIED, 0, partial);
        stream_release(e, s);
        return;
    }
    /* The file refused the batch (ENOSPC, EIO, EFBIG...): cut it back, discard the rest from the
     * pipe so the producer's next batch is read in sync, and report the batch failed. */
    truncate_back(s, p->batch_start);
    p->c.errors++;
    s->c.errors++;
    e->total.errors++;
    p->fail_err = (int32_t)r;
    s->busy = NULL;
    if (p->moved >= p->h.payload_len) { /* readwrite: the failed pwrite's read took the whole rest */
        emit(e, LS_EV_BATCH_FAILED, p, p->fail_err, p->h.seq, p->h.payload_len, p->h.record_count);
        p->state = P_HEADER;
        p->staged = 0;
    } else {
        p->state = P_DISCARD;
    }
    stream_release(e, s);
}

static void on_discard(struct ls_engine *e, struct producer *p, long r)
{
    if (r > 0) {
        p->moved += (uint32_t)r;
        if (p->moved == p->h.payload_len) {
            emit(e, LS_EV_BATCH_FAILED, p, p->fail_err, p->h.seq, p->h.payload_len, p->h.record_count);
            p->state = P_HEADER;
            p->staged = 0;
        }
        return;
    }
    finish(e, p, r == 0 ? LS_EV_PRODUCER_DIED : LS_EV_PRODUCER_ERROR, (int32_t)r, p->moved);
}

/* A batch's queued payload is gone from under us (PAYLOAD/DISCARD started only once all of it was
 * queued, so only the producer reading its own pipe back can do this): cut back, end the producer. */
static void payload_vanished(struct ls_engine *e, struct producer *p)
{
    struct stream *s = &e->streams[p->stream_id];
    int held = p->state == P_PAYLOAD;
    if (held)
        truncate_back(s, p->batch_start);
    refuse(e, p, LS_EBATCH_VANISHED, p->moved);
    if (held)
        stream_release(e, s);
}

/* WAIT_DATA and the rest of the batch will not come: the pipe (socket) ended, or the producer is
 * being removed. Nothing of the batch was written; the producer ends (died, or removed). */
static void wait_data_over(struct ls_engine *e, struct producer *p, long r, uint64_t queued)
{
    if (r < 0) {
        p->c.errors++;
        e->total.errors++;
        finish(e, p, LS_EV_PRODUCER_ERROR, (int32_t)r, queued);
    } else if (p->remove && !p->drain) {
        finish(e, p, LS_EV_PRODUCER_REMOVED, 0, queued);
    } else {
        p->c.errors++;
        e->total.errors++;
        finish(e, p, LS_EV_PRODUCER_DIED, 0, queued);
    }
}

/* Removal requested and nothing more is queued (or drain=0): end the producer now if we can. */
static int removal_due(struct ls_engine *e, struct producer *p)
{
    (void)e;
    if (!p->remove)
        return 0;
    if (!p->drain)
        return 1;
    int avail = pipe_avail(p->fd);
    return avail <= 0;
}

/* ---------------------------------------------------------------------------------------- */
/* epoll engines: splice and readwrite                                                       */

/* 1 if p's stage pipe has no free slot (the kernel counts slots, not bytes: see STAGE_FILL_DIVISOR).
 * An EAGAIN from socket -> stage means "socket empty" unless this says the stage is full. */
static int stage_full(struct producer *p)
{
    struct pollfd pfd = {.fd = p->stage_w, .events = POLLOUT};
    return poll(&pfd, 1, 0) == 0;
}

/* A TCP batch into its stage pipe: splice, or (readwrite) read + write. The stage holds the whole
 * batch (checked at the header), so the write side never waits. Returns bytes, 0 (EOF) or -errno;
 * -ENOSPC if the stage is full before the batch is whole (see STAGE_FILL_DIVISOR). */
static long stage_sync(struct ls_engine *e, struct producer *p)
{
    size_t want = p->h.payload_len - p->staged;
    if (e->kind == LS_ENGINE_SPLICE) {
        ssize_t r = splice(p->fd, NULL, p->stage_w, NULL, want, SPLICE_F_NONBLOCK | SPLICE_F_MOVE);
        if (r < 0 && errno == EAGAIN && stage_full(p))
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
    struct stream *s = &e->streams[p->stream_id];
    size_t want = p->h.payload_len - p->moved;
    int in = p->is_sock ? p->stage_r : p->fd;
    if (e->kind == LS_ENGINE_SPLICE) {
        ssize_t r;
        if (discard) {
            r = splice(in, NULL, e->devnull, NULL, want, SPLICE_F_NONBLOCK);
        } else {
            loff_t off = (loff_t)(p->batch_start + p->moved);
            r = splice(in, NULL, s->fd, &off, want, SPLICE_F_NONBLOCK | SPLICE_F_MOVE);
        }
        return r < 0 ? -errno : r;
    }
    if (want > RW_BUF_SIZE)
        want = RW_BUF_SIZE;
    ssize_t n = read(in, e->rwbuf, want);
    if (n <= 0)
        return n < 0 ? -errno : 0;
    if (discard)
        return n;
    size_t done = 0;
    while (done < (size_t)n) {
        ssize_t w = pwrite(s->fd, e->rwbuf + done, (size_t)n - done, (off_t)(p->batch_start + p->moved + done));
        if (w < 0) {
            if (errno == EINTR)
                continue;
            /* The bytes we read are gone from the pipe: count them as moved into the discard. */
            p->moved += (uint32_t)n;
            return -errno;
        }
        done += (size_t)w;
    }
    return n;
}

static void drive_sync(struct ls_engine *e, struct producer *p)
{
    for (;;) {
        long r;
        switch (p->state) {
        case P_HEADER:
            if (p->hdr_have == 0 && removal_due(e, p)) {
                finish(e, p, LS_EV_PRODUCER_REMOVED, 0, 0);
                return;
            }
            r = read(p->fd, p->hdr + p->hdr_have, LS_FRAME_HEADER_SIZE - p->hdr_have);
            if (r < 0 && errno == EINTR)
                continue;
            if (r < 0 && errno == EAGAIN) {
                if (p->remove && p->drain) { /* drain found half a header and nothing more */
                    finish(e, p, LS_EV_PRODUCER_DIED, 0, p->hdr_have);
                    return;
                }
                epoll_arm(e, p, 1);
                return;
            }
            on_header(e, p, r < 0 ? -errno : r);
            break;
        case P_WAIT_DATA:
            if (p->is_sock) {
                if (p->staged < p->h.payload_len) {
                    r = stage_sync(e, p);
                    if (r == -EINTR)
                        continue;
                    if (r == -EAGAIN) { /* the socket is empty: wait for more */
                        if (p->remove) {
                            wait_data_over(e, p, 0, p->staged);
                            return;
                        }
                        epoll_arm(e, p, 1);
                        return;
                    }
                    if (r == -ENOSPC) {
                        refuse(e, p, LS_EBATCH_TOO_BIG, p->staged);
                        return;
                    }
                    if (r <= 0) {
                        wait_data_over(e, p, r, p->staged);
                        return;
                    }
                    p->staged += (uint32_t)r;
                    continue;
                }
            } else {
                int avail;
                int q = pipe_batch_queued(p, &avail);
                if (q < 0 || (q == 0 && p->remove)) {
                    wait_data_over(e, p, 0, avail > 0 ? (uint64_t)avail : 0);
                    return;
                }
                if (q == 0) { /* part of it is queued: wake on the next bytes, never spin */
                    epoll_arm(e, p, avail > 0 ? 2 : 1);
                    return;
                }
            }
            wait_stream(e, p);
            break;
        case P_PAYLOAD:
        case P_DISCARD: {
            int discard = p->state == P_DISCARD;
            r = do_move_sync(e, p, discard);
            if (r == -EINTR)
                continue;
            if (r == -EAGAIN) { /* it was all queued when the batch began */
                payload_vanished(e, p);
                return;
            }
            if (discard)
                on_discard(e, p, r);
            else
                on_payload(e, p, r, e->kind == LS_ENGINE_READWRITE);
            break;
        }
        default: /* P_WAIT_STREAM or P_FREE: nothing to do until the stream frees up */
            return;
        }
    }
}

/* ---------------------------------------------------------------------------------------- */
/* io_uring engine                                                                            */

static struct io_uring_sqe *sqe_get(struct ls_engine *e)
{
    struct io_uring_sqe *sqe = ls_ring_get_sqe(&e->ring);
    if (!sqe) {
        ls_ring_submit_and_wait(&e->ring, 0);
        sqe = ls_ring_get_sqe(&e->ring);
    }
    return sqe;
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

static void drive_uring(struct ls_engine *e, struct producer *p)
{
    if (p->inflight || e->stop) /* stopping: issue nothing new, the thread waits out what runs */
        return;
    int avail;
    switch (p->state) {
    case P_HEADER:
        avail = pipe_avail(p->fd);
        if (avail <= 0 && p->remove && (p->drain || p->hdr_have == 0)) {
            finish(e, p, p->hdr_have ? LS_EV_PRODUCER_DIED : LS_EV_PRODUCER_REMOVED, 0, p->hdr_have);
            return;
        }
        if (p->remove && !p->drain) {
            finish(e, p, LS_EV_PRODUCER_REMOVED, 0, 0);
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
                avail = pipe_avail(p->fd); /* FIONREAD of the socket */
                if (avail <= 0) {
                    if (p->remove) {
                        wait_data_over(e, p, 0, p->staged);
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
            int q = pipe_batch_queued(p, &avail);
            if (q < 0 || (q == 0 && p->remove)) {
                wait_data_over(e, p, 0, avail > 0 ? (uint64_t)avail : 0);
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
        wait_stream(e, p);
        return;
    case P_SYNC: {
        struct io_uring_sqe *sqe = sqe_get(e);
        sqe->opcode = IORING_OP_FSYNC;
        sqe->fd = (int32_t)fixed_stream_slot(e, p->stream_id);
        sqe->flags = IOSQE_FIXED_FILE;
        sqe->fsync_flags = IORING_FSYNC_DATASYNC;
        sqe->user_data = UD(U_FSYNC, p->id);
        p->inflight++;
        return;
    }
    case P_PAYLOAD:
    case P_DISCARD: {
        /* All of the payload was queued before the batch began: splice the rest in one go. */
        uint32_t want = p->h.payload_len - p->moved;
        if (p->is_sock) {
            submit_splice_out(e, p, p->stage_r, 0, want);
            return;
        }
        avail = pipe_avail(p->fd);
        if (avail < 0 || (uint32_t)avail < want) {
            payload_vanished(e, p);
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
        on_header(e, p, res);
        break;
    case U_POLL:
        if (res == -ECANCELED)
            break; /* drive() decides: removal, or poll again */
        if (res >= 0 && (res & (POLLHUP | POLLERR | (p->is_sock ? POLLIN : 0))) && pipe_avail(p->fd) <= 0) {
            if (p->state == P_HEADER)
                on_header(e, p, 0);
            else if (p->state == P_WAIT_DATA)
                wait_data_over(e, p, 0, p->staged);
            else if (p->state == P_PAYLOAD)
                on_payload(e, p, 0, 0);
            else
                on_discard(e, p, 0);
            return;
        }
        break;
    case U_TIMER: /* -ETIME: time to look at a partly queued batch again */
        break;
    case U_FSYNC:
        if (res == -EINTR || res == -EAGAIN)
            break; /* drive() submits it again */
        synced(e, p, &e->streams[p->stream_id], res < 0 ? res : 0);
        break;
    case U_SPLICE:
        if (res == -EINTR || res == -EAGAIN)
            break;
        on_payload(e, p, res, 0);
        break;
    case U_DISCARD:
        if (res == -EINTR || res == -EAGAIN)
            break;
        on_discard(e, p, res);
        break;
    case U_STAGE:
        if (res == -EINTR)
            break;
        if (res == -EAGAIN && stage_full(p)) { /* the batch does not fit the stage's slots */
            refuse(e, p, LS_EBATCH_TOO_BIG, p->staged);
            return;
        }
        if (res == -EAGAIN)
            break;
        if (res > 0) {
            p->staged += (uint32_t)res;
            break;
        }
        /* The socket ended (0) or failed (ECONNRESET...) mid-batch: nothing was written yet. */
        wait_data_over(e, p, res, p->staged);
        return;
    }
    if (p->state != P_FREE)
        drive(e, p);
}

static void drive(struct ls_engine *e, struct producer *p)
{
    if (e->kind == LS_ENGINE_IO_URING)
        drive_uring(e, p);
    else
        drive_sync(e, p);
}

/* ---------------------------------------------------------------------------------------- */
/* engine thread                                                                              */

/* Apply what the control thread asked for since the last wake (under the mutex). */
static void apply_requests(struct ls_engine *e)
{
    for (uint32_t i = 0; i < e->max_streams; i++) {
        struct stream *s = &e->streams[i];
        if ((s->pending || s->pending_resume) && !s->busy) {
            s->pending_resume = 0;
            stream_release(e, s); /* applies a new fd, then serves waiters */
        }
    }
    for (uint32_t i = 0; i < e->max_producers; i++) {
        struct producer *p = &e->prod[i];
        if (p->state == P_FREE)
            continue;
        if (!p->started) {
            p->started = 1;
            if (e->kind == LS_ENGINE_IO_URING) {
                ls_ring_update_file(&e->ring, p->id, p->fd);
            } else {
                struct epoll_event ev = {.events = EPOLLIN, .data.u32 = p->id};
                epoll_ctl(e->ep, EPOLL_CTL_ADD, p->fd, &ev);
                p->armed = 1;
            }
            drive(e, p);
            continue;
        }
        if (p->remove && p->state != P_FREE) {
            if (p->state == P_WAIT_STREAM && !p->drain) {
                /* Not started on the file yet: drop it from the stream's queue. */
                struct stream *s = &e->streams[p->stream_id];
                struct producer **pp = &s->wait_head, *prev = NULL;
                while (*pp && *pp != p) {
                    prev = *pp;
                    pp = &(*pp)->next_wait;
                }
                if (*pp) {
                    *pp = p->next_wait;
                    if (s->wait_tail == p)
                        s->wait_tail = prev;
                }
                finish(e, p, LS_EV_PRODUCER_REMOVED, 0, 0);
                continue;
            }
            if (e->kind == LS_ENGINE_IO_URING) {
                if (p->inflight)
                    cancel_op(e, p);
                else
                    drive(e, p);
            } else if (p->state == P_HEADER || p->state == P_WAIT_DATA || p->state == P_PAYLOAD ||
                       p->state == P_DISCARD) {
                drive(e, p);
            }
        }
    }
}

static int live_inflight(struct ls_engine *e)
{
    int n = 0;
    for (uint32_t i = 0; i < e->max_producers; i++)
        n += e->prod[i].inflight;
    return n;
}

static void *thread_uring(void *arg)
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
            snprintf(e->reason, sizeof e->reason, "io_uring_enter failed: %s", strerror(-r));
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
            apply_requests(e);
    }
    pthread_mutex_unlock(&e->mu);
    return NULL;
}

static void *thread_epoll(void *arg)
{
    struct ls_engine *e = arg;
    struct epoll_event evs[64];
    pthread_mutex_lock(&e->mu);
    while (!e->stop) {
        pthread_mutex_unlock(&e->mu);
        int n = epoll_wait(e->ep, evs, 64, -1);
        pthread_mutex_lock(&e->mu);
        if (n < 0 && errno != EINTR)
            break;
        for (int i = 0; i < n; i++) {
            uint32_t id = evs[i].data.u32;
            if (id == UINT32_MAX) {
                uint64_t v;
                (void)!read(e->wake_fd, &v, sizeof v);
                apply_requests(e);
                continue;
            }
            struct producer *p = &e->prod[id];
            if (p->state != P_FREE && p->started)
                drive(e, p);
        }
    }
    pthread_mutex_unlock(&e->mu);
    return NULL;
}

static void wake(struct ls_engine *e)
{
    uint64_t one = 1;
    (void)!write(e->wake_fd, &one, sizeof one);
}

/* ---------------------------------------------------------------------------------------- */
/* setup                                                                                      */

static int setup_uring(struct ls_engine *e)
{
    /* COOP_TASKRUN: completions of io-wq work wait for our next io_uring_enter instead of
     * interrupting the thread (5.19+; older kernels refuse the flag: retry without it). */
    int r = ls_ring_init(&e->ring, 256, IORING_SETUP_COOP_TASKRUN);
    if (r == -EINVAL)
        r = ls_ring_init(&e->ring, 256, 0);
    if (r < 0) {
        snprintf(e->reason, sizeof e->reason, "io_uring_setup: %s", strerror(-r));
        return r;
    }
    e->ring_ok = 1;
    static const int need[] = {IORING_OP_SPLICE, IORING_OP_READ_FIXED, IORING_OP_POLL_ADD, IORING_OP_READ,
                               IORING_OP_ASYNC_CANCEL, IORING_OP_TIMEOUT, IORING_OP_FSYNC};
    static const char *names[] = {"SPLICE", "READ_FIXED", "POLL_ADD", "READ", "ASYNC_CANCEL", "TIMEOUT", "FSYNC"};
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
    r = ls_ring_register_buffers(&e->ring, &iov, 1);
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

static void teardown(struct ls_engine *e)
{
    if (e->ring_ok)
        ls_ring_exit(&e->ring);
    e->ring_ok = 0;
    if (e->ep >= 0)
        close(e->ep);
    e->ep = -1;
}

int ls_engine_new(int kind, uint32_t max_streams, uint32_t max_producers, uint32_t max_batch,
                  struct ls_engine **out)
{
    if (kind < LS_ENGINE_AUTO || kind > LS_ENGINE_READWRITE || max_streams == 0 || max_producers == 0 ||
        max_producers >= UINT32_MAX / HDR_STRIDE || max_batch == 0 || max_batch > LS_MAX_BATCH_PAYLOAD)
        return -EINVAL;
    struct ls_engine *e = calloc(1, sizeof *e);
    if (!e)
        return -ENOMEM;
    e->ep = -1;
    e->notify_fd = e->wake_fd = e->devnull = -1;
    e->max_streams = max_streams;
    e->max_producers = max_producers;
    e->max_batch = max_batch;
    e->prod = calloc(max_producers, sizeof *e->prod);
    e->streams = calloc(max_streams, sizeof *e->streams);
    e->hdrbuf = aligned_alloc(4096, ((size_t)max_producers * HDR_STRIDE + 4095) & ~(size_t)4095);
    int r = -ENOMEM;
    if (!e->prod || !e->streams || !e->hdrbuf)
        goto fail;
    for (uint32_t i = 0; i < max_producers; i++) {
        e->prod[i].id = i;
        e->prod[i].fd = -1;
        e->prod[i].hdr = e->hdrbuf + (size_t)i * HDR_STRIDE;
    }
    for (uint32_t i = 0; i < max_streams; i++)
        e->streams[i].fd = -1;
    pthread_mutex_init(&e->mu, NULL);
    pthread_cond_init(&e->cond, NULL);
    e->notify_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    e->wake_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    e->devnull = open("/dev/null", O_WRONLY | O_CLOEXEC);
    if (e->notify_fd < 0 || e->wake_fd < 0 || e->devnull < 0) {
        r = -errno;
        goto fail;
    }

    int want = kind;
    if (want == LS_ENGINE_AUTO || want == LS_ENGINE_IO_URING) {
        r = setup_uring(e);
        if (r == 0) {
            e->kind = LS_ENGINE_IO_URING;
        } else {
            teardown(e);
            if (want == LS_ENGINE_IO_URING)
                goto fail;
            want = LS_ENGINE_SPLICE;
        }
    }
    if (!e->kind && want == LS_ENGINE_SPLICE) {
        char why[128] = "";
        r = probe_splice(why, sizeof why);
        if (r == 0) {
            e->kind = LS_ENGINE_SPLICE;
        } else {
            if (kind == LS_ENGINE_SPLICE)
                goto fail;
            size_t l = strlen(e->reason);
            snprintf(e->reason + l, sizeof e->reason - l, "%s%s", l ? "; " : "", why);
            want = LS_ENGINE_READWRITE;
        }
    }
    if (!e->kind)
        e->kind = LS_ENGINE_READWRITE;
    if (e->kind != LS_ENGINE_IO_URING) {
        e->ep = epoll_create1(EPOLL_CLOEXEC);
        if (e->ep < 0) {
            r = -errno;
            goto fail;
        }
        struct epoll_event ev = {.events = EPOLLIN, .data.u32 = UINT32_MAX};
        epoll_ctl(e->ep, EPOLL_CTL_ADD, e->wake_fd, &ev);
        if (e->kind == LS_ENGINE_READWRITE && !(e->rwbuf = malloc(RW_BUF_SIZE))) {
            r = -ENOMEM;
            goto fail;
        }
    }
    r = -pthread_create(&e->thread, NULL, e->kind == LS_ENGINE_IO_URING ? thread_uring : thread_epoll, e);
    if (r < 0)
        goto fail;
    e->thread_started = 1;
    *out = e;
    return 0;
fail:
    ls_engine_free(e);
    return r;
}

int ls_engine_kind(struct ls_engine *e) { return e->kind; }
const char *ls_engine_fallback_reason(struct ls_engine *e) { return e->reason; }
int ls_engine_notify_fd(struct ls_engine *e) { return e->notify_fd; }

int ls_engine_set_stream(struct ls_engine *e, uint32_t id, int fd, uint64_t offset)
{
    if (id >= e->max_streams)
        return -EINVAL;
    pthread_mutex_lock(&e->mu);
    struct stream *s = &e->streams[id];
    s->pending = 1;
    s->pending_fd = fd;
    s->pending_off = offset;
    s->c.offset = offset;
    wake(e);
    while (s->pending && !e->stop)
        pthread_cond_wait(&e->cond, &e->mu);
    pthread_mutex_unlock(&e->mu);
    return 0;
}

int ls_engine_set_stream_sync(struct ls_engine *e, uint32_t id, int sync)
{
    if (id >= e->max_streams || (sync != LS_SYNC_NEVER && sync != LS_SYNC_BATCH))
        return -EINVAL;
    pthread_mutex_lock(&e->mu);
    e->streams[id].sync = sync;
    pthread_mutex_unlock(&e->mu);
    return 0;
}

int ls_engine_pause_stream(struct ls_engine *e, uint32_t id, int paused)
{
    if (id >= e->max_streams)
        return -EINVAL;
    pthread_mutex_lock(&e->mu);
    e->streams[id].paused = paused ? 1 : 0;
    if (!paused)
        e->streams[id].pending_resume = 1;
    wake(e);
    pthread_mutex_unlock(&e->mu);
    return 0;
}

/* Take slot `id` for a producer on `fd` (stage_r/stage_w: its stage pipe, or -1) and wake the
 * engine thread, which starts it. Returns 0, -EBUSY (slot in use) or -ENOENT (no such stream). */
static int claim_slot(struct ls_engine *e, uint32_t id, uint32_t stream_id, int fd, int stage_r, int stage_w,
                      uint32_t cap)
{
    pthread_mutex_lock(&e->mu);
    struct producer *p = &e->prod[id];
    if (p->state != P_FREE || e->streams[stream_id].fd < 0) {
        pthread_mutex_unlock(&e->mu);
        return p->state != P_FREE ? -EBUSY : -ENOENT;
    }
    unsigned char *hdr = p->hdr;
    memset(p, 0, sizeof *p);
    p->id = id;
    p->hdr = hdr;
    p->stream_id = stream_id;
    p->fd = fd;
    p->is_sock = stage_r >= 0;
    p->stage_r = stage_r;
    p->stage_w = stage_w;
    p->cap = cap; /* 0 for a pipe: read from the pipe at its first header */
    p->state = P_HEADER;
    wake(e);
    pthread_mutex_unlock(&e->mu);
    return 0;
}

/* Producers are read without blocking by the epoll engines (io_uring polls by itself). */
static int set_nonblock_for_epoll(struct ls_engine *e, int fd, int fl)
{
    return e->kind != LS_ENGINE_IO_URING && fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0 ? -errno : 0;
}

int ls_engine_add_producer(struct ls_engine *e, uint32_t id, uint32_t stream_id, int pipe_fd)
{
    if (id >= e->max_producers || stream_id >= e->max_streams)
        return -EINVAL;
    struct stat st;
    if (fstat(pipe_fd, &st) < 0)
        return -errno;
    if (!S_ISFIFO(st.st_mode))
        return -ENOTTY; /* not a pipe */
    int fl = fcntl(pipe_fd, F_GETFL);
    if (fl < 0)
        return -errno;
    if ((fl & O_ACCMODE) != O_RDONLY)
        return -EBADF; /* a pipe, but not its read end */
    int r = set_nonblock_for_epoll(e, pipe_fd, fl);
    return r < 0 ? r : claim_slot(e, id, stream_id, pipe_fd, -1, -1, 0);
}

int ls_engine_add_socket_producer(struct ls_engine *e, uint32_t id, uint32_t stream_id, int sock_fd)
{
    if (id >= e->max_producers || stream_id >= e->max_streams)
        return -EINVAL;
    struct stat st;
    if (fstat(sock_fd, &st) < 0)
        return -errno;
    if (!S_ISSOCK(st.st_mode))
        return -ENOTSOCK;
    int fl = fcntl(sock_fd, F_GETFL);
    int r = fl < 0 ? -errno : set_nonblock_for_epoll(e, sock_fd, fl);
    if (r < 0)
        return r;
    int stage[2];
    if (pipe2(stage, O_CLOEXEC | O_NONBLOCK) < 0)
        return -errno;
    (void)fcntl(stage[1], F_SETPIPE_SZ, 1 << 20); /* best effort: a bigger stage, bigger batches */
    int sz = fcntl(stage[1], F_GETPIPE_SZ);
    if (sz < 0) {
        r = -errno;
        close(stage[0]);
        close(stage[1]);
        return r;
    }
    r = claim_slot(e, id, stream_id, sock_fd, stage[0], stage[1], (uint32_t)sz / STAGE_FILL_DIVISOR);
    if (r < 0) {
        close(stage[0]);
        close(stage[1]);
    }
    return r;
}

int ls_engine_producer_max_batch(struct ls_engine *e, uint32_t id)
{
    if (id >= e->max_producers)
        return -EINVAL;
    pthread_mutex_lock(&e->mu);
    struct producer *p = &e->prod[id];
    int r = p->state == P_FREE ? -ENOENT : (int)producer_cap(e, p, 1);
    pthread_mutex_unlock(&e->mu);
    return r;
}

int ls_engine_remove_producer(struct ls_engine *e, uint32_t id, int drain)
{
    if (id >= e->max_producers)
        return -EINVAL;
    pthread_mutex_lock(&e->mu);
    struct producer *p = &e->prod[id];
    int r = 0;
    if (p->state == P_FREE) {
        r = -ENOENT;
    } else {
        p->remove = 1;
        p->drain = drain ? 1 : 0;
        wake(e);
    }
    pthread_mutex_unlock(&e->mu);
    return r;
}

int ls_engine_poll_events(struct ls_engine *e, struct ls_event *out, int max)
{
    uint64_t v;
    (void)!read(e->notify_fd, &v, sizeof v);
    pthread_mutex_lock(&e->mu);
    size_t n = e->ev_len < (size_t)max ? e->ev_len : (size_t)max;
    memcpy(out, e->ev, n * sizeof *out);
    memmove(e->ev, e->ev + n, (e->ev_len - n) * sizeof *out);
    e->ev_len -= n;
    if (e->ev_len) {
        uint64_t one = 1;
        (void)!write(e->notify_fd, &one, sizeof one);
    }
    pthread_mutex_unlock(&e->mu);
    return (int)n;
}

int ls_engine_stream_counters(struct ls_engine *e, uint32_t id, struct ls_counters *out)
{
    if (id >= e->max_streams)
        return -EINVAL;
    pthread_mutex_lock(&e->mu);
    *out = e->streams[id].c;
    out->offset = e->streams[id].offset;
    pthread_mutex_unlock(&e->mu);
    return 0;
}

int ls_engine_producer_counters(struct ls_engine *e, uint32_t id, struct ls_counters *out)
{
    if (id >= e->max_producers)
        return -EINVAL;
    pthread_mutex_lock(&e->mu);
    struct producer *p = &e->prod[id];
    *out = p->c;
    int avail = p->state != P_FREE && p->fd >= 0 ? pipe_avail(p->fd) : 0;
    out->offset = avail > 0 ? (uint64_t)avail : 0;
    pthread_mutex_unlock(&e->mu);
    return p->state == P_FREE ? -ENOENT : 0;
}

int ls_engine_total_counters(struct ls_engine *e, struct ls_counters *out)
{
    pthread_mutex_lock(&e->mu);
    *out = e->total;
    pthread_mutex_unlock(&e->mu);
    return 0;
}

void ls_engine_free(struct ls_engine *e)
{
    if (!e)
        return;
    if (e->thread_started) {
        pthread_mutex_lock(&e->mu);
        e->stop = 1;
        pthread_cond_broadcast(&e->cond);
        pthread_mutex_unlock(&e->mu);
        wake(e);
        pthread_join(e->thread, NULL);
    }
    /* A batch cut short by the stop must not stay behind as a torn tail. */
    for (uint32_t i = 0; e->streams && i < e->max_streams; i++) {
        struct stream *s = &e->streams[i];
        if (s->busy)
            truncate_back(s, s->busy->batch_start);
    }
    for (uint32_t i = 0; e->prod && i < e->max_producers; i++) {
        struct producer *p = &e->prod[i];
        if (p->state != P_FREE && p->fd >= 0)
            close(p->fd);
        if (p->state != P_FREE && p->is_sock) {
            close(p->stage_r);
            close(p->stage_w);
        }
    }
    teardown(e);
    if (e->notify_fd >= 0)
        close(e->notify_fd);
    if (e->wake_fd >= 0)
        close(e->wake_fd);
    if (e->devnull >= 0)
        close(e->devnull);
    free(e->rwbuf);
    free(e->ev);
    free(e->prod);
    free(e->streams);
    free(e->hdrbuf);
    free(e);
}
