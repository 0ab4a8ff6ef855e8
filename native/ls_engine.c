/* ls_engine.c - the daemon's data plane: the producer state machine, and the requests the control
 * plane makes of it (streams, producers; see ls_engine.h for the contract). Creating and freeing the
 * engine, its events and counters: ls_engine_life.c.
 *
 * One state machine per producer, shared by the three engines; only how an operation is issued
 * differs, and that lives behind struct ls_backend (ls_engine_int.h): ls_engine_uring.c submits an
 * SQE and feeds the CQE's result to the same handlers; ls_engine_epoll.c (splice, readwrite) tries
 * the syscall now and arms epoll on EAGAIN.
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
#include "ls_engine_int.h"
#include "ls_files.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

/* ---------------------------------------------------------------------------------------- */
/* helpers                                                                                    */

static void emit_raw(struct ls_engine *e, uint32_t kind, uint32_t producer_id, uint32_t stream_id, int32_t err,
                     uint64_t seq, uint64_t bytes, uint64_t records)
{
    if (e->ev_len == e->ev_cap) {
        size_t cap = e->ev_cap ? e->ev_cap * 2 : 256;
        struct ls_event *n = realloc(e->ev, cap * sizeof *n);
        if (!n) {
            /* Out of memory: the event is lost, but never silently. The control plane sees
             * ls_engine_events_lost() and reconciles from the counters (last_seq, ended slots),
             * so no producer waits forever for its RELEASE. */
            e->events_lost = 1;
            uint64_t one = 1;
            (void)!write(e->notify_fd, &one, sizeof one);
            return;
        }
        e->ev = n;
        e->ev_cap = cap;
    }
    struct ls_event *v = &e->ev[e->ev_len++];
    v->kind = kind;
    v->producer_id = producer_id;
    v->stream_id = stream_id;
    v->err = err;
    v->seq = seq;
    v->bytes = bytes;
    v->records = records;
    if (e->ev_len == 1) {
        uint64_t one = 1;
        (void)!write(e->notify_fd, &one, sizeof one);
    }
}

/* RELEASE(through) as protocol.encode(protocol.release(through)) makes it: a 4-byte big-endian
 * length, then the msgpack map {"t": "release", "through": through}. Returns the frame's length. */
static size_t encode_release(unsigned char *out, uint64_t through)
{
    static const unsigned char head[] = {0x82, 0xa1, 't', 0xa7, 'r', 'e', 'l', 'e', 'a', 's', 'e',
                                         0xa7, 't', 'h', 'r', 'o', 'u', 'g', 'h'};
    unsigned char *b = out + 4;
    memcpy(b, head, sizeof head);
    size_t n = sizeof head;
    int width = through < 128 ? 0 : through <= 0xff ? 1 : through <= 0xffff ? 2 : through <= 0xffffffffu ? 4 : 8;
    if (width)
        b[n++] = width == 1 ? 0xcc : width == 2 ? 0xcd : width == 4 ? 0xce : 0xcf;
    for (int i = width ? width - 1 : 0; i >= 0; i--)
        b[n++] = (unsigned char)(through >> (8 * i));
    out[0] = out[1] = 0;
    out[2] = (unsigned char)(n >> 8);
    out[3] = (unsigned char)n;
    return n + 4;
}

/* Answer a landed batch on the producer's control socket now (1), or leave it to the control
 * plane (0). A frame this small goes into an AF_UNIX socket whole or not at all (one skb). */
static int release_now(struct ls_engine *e, struct producer *p, uint64_t seq)
{
    (void)e;
    if (p->ctl_fd < 0 || p->release_hold)
        return 0;
    unsigned char frame[40];
    size_t len = encode_release(frame, seq);
    ssize_t n = send(p->ctl_fd, frame, len, MSG_DONTWAIT | MSG_NOSIGNAL);
    if (n == (ssize_t)len)
        return 1;
    if (n > 0) { /* cannot happen on AF_UNIX; never leave half a frame: end the control channel */
        shutdown(p->ctl_fd, SHUT_RDWR);
        close(p->ctl_fd);
        p->ctl_fd = -1;
    }
    return 0;
}

void eng_emit(struct ls_engine *e, uint32_t kind, struct producer *p, int32_t err, uint64_t seq, uint64_t bytes,
              uint64_t records)
{
    if (kind == LS_EV_BATCH_DONE && release_now(e, p, seq))
        err = 1;
    else if (kind == LS_EV_BATCH_FAILED || kind == LS_EV_BATCH_SUPPRESSED)
        p->release_hold |= HOLD_FAIL; /* the control plane's RELEASE says what happened to it, first */
    emit_raw(e, kind, p->id, p->stream_id, err, seq, bytes, records);
}

void eng_failed(struct ls_engine *e, int err, const char *what)
{
    if (e->failed)
        return;
    e->failed = err;
    snprintf(e->reason, sizeof e->reason, "%s failed: %s", what, strerror(-err));
    pthread_cond_broadcast(&e->cond); /* nobody may wait for a request the thread will never apply */
    emit_raw(e, LS_EV_ENGINE_FAILED, UINT32_MAX, UINT32_MAX, err, 0, 0, 0);
}

int eng_pipe_avail(int fd)
{
    int n = 0;
    if (ioctl(fd, FIONREAD, &n) < 0)
        return -errno;
    return n;
}

#ifndef MADV_POPULATE_READ
#define MADV_POPULATE_READ 22 /* Linux 5.14 */
#endif

/* Map a batch's pages of the arena into our address space in one call before writing from them.
 * Without this the first write from fresh arena pages (every new producer's first pass through its
 * ring) faults them in 64 KiB at a time, and each fault inside pwrite costs a short copy: the
 * kernel undoes that page-cache step, zeroes it, halves its write size for the rest of the call
 * and retries (1000 producers of 1 MiB each: ~0.2 CPU s/GB). Producers fill their segments in
 * ring order, so a high-water mark says what is mapped: in steady state this is two compares. Only
 * the batch's own pages (which the producer wrote) are populated, never a gap before it. */
static void eng_arena_populate(struct ls_engine *e, struct producer *p)
{
    uint64_t end = p->arena_off + p->h.payload_len;
    if (p->arena_fixed || end <= p->arena_hot || e->no_populate)
        return; /* registered: pinned already; or mapped by an earlier batch */
    uint64_t from = (p->arena_off > p->arena_hot ? p->arena_off : p->arena_hot) & ~(uint64_t)4095;
    if (madvise((void *)(p->arena + from), end - from, MADV_POPULATE_READ) < 0 && errno == EINVAL)
        e->no_populate = 1; /* before 5.14: the write faults them in itself */
    p->arena_hot = (end + 4095) & ~(uint64_t)4095;
}

/* The largest payload_len p may announce: a pipe must hold header + payload whole (the producer
 * queues both before we read either); a stage pipe holds the payload (p->cap, set at add). */
uint32_t eng_producer_cap(struct ls_engine *e, struct producer *p, int refresh)
{
    if (p->arena) /* shm: the batch is in the arena, the pipe holds only its descriptor */
        return p->arena_len < e->max_batch ? (uint32_t)p->arena_len : e->max_batch;
    if (!p->is_sock && (refresh || !p->cap)) {
        int sz = fcntl(p->fd, F_GETPIPE_SZ);
        p->cap = sz > LS_FRAME_HEADER_SIZE ? (uint32_t)sz - LS_FRAME_HEADER_SIZE : 0;
    }
    return p->cap < e->max_batch ? p->cap : e->max_batch;
}

/* The producer is over: close its pipe, free its slot, say why. No op may be in flight. */
void eng_finish(struct ls_engine *e, struct producer *p, uint32_t kind, int32_t err, uint64_t bytes)
{
    if (p->started)
        e->be->unwatch(e, p);
    close(p->fd);
    p->fd = -1;
    if (p->is_sock) {
        close(p->stage_r);
        close(p->stage_w);
        p->stage_r = p->stage_w = -1;
        p->staged = 0;
    }
    if (p->ctl_fd >= 0) { /* the control plane writes on its own socket from now on */
        close(p->ctl_fd);
        p->ctl_fd = -1;
    }
    if (p->arena) { /* unwatch dropped the ring's registration; no write reads it any more */
        munmap((void *)p->arena, p->arena_len);
        p->arena = NULL;
    }
    if (p->remove && kind == LS_EV_PRODUCER_EOF)
        kind = LS_EV_PRODUCER_REMOVED;
    eng_emit(e, kind, p, err, p->h.seq, bytes, 0);
    p->state = P_FREE;
}

/* Give the stream to the next waiting producer, if any, and start its payload. */
void eng_stream_release(struct ls_engine *e, struct stream *s)
{
    s->busy = NULL;
    if (s->pending) {
        if (s->bounded) /* the spool bound keeps the allowance it had, now in the new file's offsets */
            s->bound = s->pending_off + (s->bound > s->offset ? s->bound - s->offset : 0);
        s->fd = s->pending_fd;
        s->offset = s->pending_off;
        s->pending = 0;
        e->be->stream_fd(e, (uint32_t)(s - e->streams), s->fd);
        s->copy = 0; /* a new file: try splice again */
        pthread_cond_broadcast(&e->cond);
    }
    struct producer *p = s->wait_head;
    if (!p || s->fd < 0)
        return;
    /* Someone truncated the file under us (logrotate's copytruncate, an admin's `: > file`):
     * continue at its new end instead of leaving a hole of NUL bytes. One fstat per batch, before
     * the bound is checked: a stream held at its spool bound must see that its file shrank. */
    struct stat st;
    if (fstat(s->fd, &st) == 0 && (uint64_t)st.st_size < s->offset) {
        uint64_t cut = s->offset - (uint64_t)st.st_size;
        s->offset = (uint64_t)st.st_size;
        s->c.offset = s->offset;
        if (s->bounded) {
            /* The bound was in the old content's offsets: hold the stream until the control plane,
             * woken by this event, has reset its forwarders to the new end and sent a bound again
             * (else new bytes could land where a lagging forwarder still expects old ones). */
            s->bound = s->offset;
            eng_emit(e, LS_EV_HOLE_CLOSED, p, 0, p->h.seq, cut, 0);
        }
    }
    if (s->paused || (s->bounded && s->offset >= s->bound))
        return;
    s->wait_head = p->next_wait;
    if (!s->wait_head)
        s->wait_tail = NULL;
    p->next_wait = NULL;
    s->busy = p;
    p->batch_start = s->offset;
    p->moved = 0;
    p->state = P_PAYLOAD;
    eng_drive(e, p);
}

/* Cut a failed or torn batch back off the file: the file ends at the last whole batch again. */
void eng_truncate_back(struct stream *s, uint64_t start)
{
    struct stat st;
    if (s->fd >= 0 && fstat(s->fd, &st) == 0) {
        /* Cut back only what is there: a file truncated under the batch (copytruncate) must not
         * be re-grown to `start` with a hole of NULs. */
        if ((uint64_t)st.st_size > start && ftruncate(s->fd, (off_t)start) < 0)
            s->c.errors++; /* the torn tail stays until the next start's repair; counted */
        if ((uint64_t)st.st_size < start)
            start = (uint64_t)st.st_size;
    }
    s->offset = start;
}

/* The producer broke the protocol with this batch (why = LS_EFRAME_* / LS_EBATCH_*): count it and
 * end the producer. The caller has cut back whatever of the batch reached the file. */
void eng_refuse(struct ls_engine *e, struct producer *p, int32_t why, uint64_t bytes)
{
    p->c.errors++;
    e->total.errors++;
    if (p->state == P_PAYLOAD || p->state == P_DISCARD)
        e->streams[p->stream_id].c.errors++;
    eng_finish(e, p, LS_EV_BAD_FRAME, why, bytes);
}

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000ll + ts.tv_nsec;
}

/* Refill bucket b to now; 1 if it has tokens of both kinds left. */
static int bucket_open(struct bucket *b, int64_t now)
{
    double dt = (double)(now - b->last_ns) / 1e9;
    b->last_ns = now;
    if (b->rate_b > 0) {
        b->tok_b += dt * b->rate_b;
        if (b->tok_b > b->rate_b)
            b->tok_b = b->rate_b; /* burst: one second's worth */
    }
    if (b->rate_r > 0) {
        b->tok_r += dt * b->rate_r;
        if (b->tok_r > b->rate_r)
            b->tok_r = b->rate_r;
    }
    return (b->rate_b <= 0 || b->tok_b > 0) && (b->rate_r <= 0 || b->tok_r > 0);
}

/* 1 if p's batch is over a rate limit (and must be dropped), else take its tokens and 0. */
static int over_limit(struct ls_engine *e, struct producer *p)
{
    if (!e->buckets || (p->bucket[0] < 0 && p->bucket[1] < 0))
        return 0;
    int64_t now = now_ns();
    for (int i = 0; i < 2; i++)
        if (p->bucket[i] >= 0 && !bucket_open(&e->buckets[p->bucket[i]], now))
            return 1;
    for (int i = 0; i < 2; i++)
        if (p->bucket[i] >= 0) {
            e->buckets[p->bucket[i]].tok_b -= p->h.payload_len;
            e->buckets[p->bucket[i]].tok_r -= p->h.record_count;
        }
    return 0;
}

/* The whole payload is queued: wait for the stream (or take it now); a batch over its producer's
 * rate limit is dropped instead (drained from the pipe, never written) and reported. */
void eng_wait_stream(struct ls_engine *e, struct producer *p)
{
    struct stream *s = &e->streams[p->stream_id];
    if (over_limit(e, p)) {
        p->c.suppressed_records += p->h.record_count;
        s->c.suppressed_records += p->h.record_count;
        e->total.suppressed_records += p->h.record_count;
        if (p->arena) { /* nothing in the pipe to drain */
            eng_emit(e, LS_EV_BATCH_SUPPRESSED, p, 0, p->h.seq, p->h.payload_len, p->h.record_count);
            p->state = P_HEADER;
        } else {
            p->state = P_DISCARD;
            p->suppress = 1;
            p->moved = 0;
            p->fail_err = 0;
        }
        e->be->arm(e, p, 0);
        eng_drive(e, p);
        return;
    }
    p->state = P_WAIT_STREAM;
    p->backoff_ns = 0;
    e->be->arm(e, p, 0);
    if (s->wait_tail)
        s->wait_tail->next_wait = p;
    else
        s->wait_head = p;
    s->wait_tail = p;
    if (!s->busy)
        eng_stream_release(e, s); /* takes p (the only waiter) and drives it */
}

/* For a pipe producer in WAIT_DATA: 1 if the whole payload is queued, 0 if not yet, -1 if it never
 * will be (the pipe's writer is gone). *avail gets the bytes queued. */
int eng_pipe_batch_queued(struct producer *p, int *avail)
{
    *avail = eng_pipe_avail(p->fd);
    if (*avail >= (int)p->h.payload_len)
        return 1;
    struct pollfd pfd = {.fd = p->fd, .events = POLLIN};
    if (poll(&pfd, 1, 0) == 1 && (pfd.revents & (POLLHUP | POLLERR))) {
        *avail = eng_pipe_avail(p->fd); /* the last bytes may have come just before the close */
        return *avail >= (int)p->h.payload_len ? 1 : -1;
    }
    return 0;
}

/* 1 if p's stage pipe has no free slot (the kernel counts slots, not bytes: see STAGE_FILL_DIVISOR).
 * An EAGAIN from socket -> stage means "socket empty" unless this says the stage is full. */
int eng_stage_full(struct producer *p)
{
    struct pollfd pfd = {.fd = p->stage_w, .events = POLLOUT};
    return poll(&pfd, 1, 0) == 0;
}

/* ---------------------------------------------------------------------------------------- */
/* the state machine: results of operations, whichever backend issued them                  */

void eng_on_header(struct ls_engine *e, struct producer *p, long r)
{
    if (r < 0) {
        p->c.errors++;
        e->total.errors++;
        eng_finish(e, p, LS_EV_PRODUCER_ERROR, (int32_t)r, 0);
        return;
    }
    if (r == 0) { /* EOF */
        if (p->hdr_have == 0)
            eng_finish(e, p, LS_EV_PRODUCER_EOF, 0, 0);
        else {
            p->c.errors++;
            e->total.errors++;
            eng_finish(e, p, LS_EV_PRODUCER_DIED, 0, p->hdr_have);
        }
        return;
    }
    p->hdr_have += (uint32_t)r;
    p->c.header_bytes += (uint64_t)r;
    e->total.header_bytes += (uint64_t)r;
    if (p->hdr_have < LS_FRAME_HEADER_SIZE)
        return; /* eng_drive() reads the rest */
    memcpy(&p->h, p->hdr, sizeof p->h);
    p->hdr_have = 0;
    int bad = ls_frame_check(&p->h, e->max_batch);
    int desc = (p->h.flags & LS_PROTO_FRAME_FLAG_SHM) != 0;
    if (!bad && desc != (p->arena != NULL))
        bad = LS_EBATCH_ARENA; /* a descriptor without an arena, or payload bytes from a shm producer */
    else if (!bad && p->arena && (p->h.reserved > p->arena_len || p->h.payload_len > p->arena_len - p->h.reserved))
        bad = LS_EBATCH_ARENA; /* [offset, offset + len) is not inside the arena */
    else if (!bad && !p->arena && p->h.payload_len > eng_producer_cap(e, p, 0) &&
             p->h.payload_len > eng_producer_cap(e, p, 1))
        bad = LS_EBATCH_TOO_BIG; /* it could never be queued whole: waiting for it would be forever */
    if (bad) {
        eng_refuse(e, p, bad, 0);
        return;
    }
    if (p->arena) { /* shm: the payload is all there already */
        p->arena_off = p->h.reserved;
        eng_arena_populate(e, p);
        p->staged = 0;
        p->backoff_ns = 0;
        eng_wait_stream(e, p);
        return;
    }
    p->state = P_WAIT_DATA; /* eng_drive() takes it from here */
    p->staged = 0;
    p->backoff_ns = 0;
}

static void batch_done(struct ls_engine *e, struct producer *p, struct stream *s);

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
    e->total.bytes += len;
    e->total.records += p->h.record_count;
    e->total.batches++;
    p->staged = 0;
    if (s->sync == LS_SYNC_BATCH) {
        if (e->be->sync_is_op) { /* the backend submits an FSYNC; the stream is free meanwhile */
            p->sync_fd = fcntl(s->fd, F_DUPFD_CLOEXEC, 0); /* the file this batch is in, whatever rotates */
            if (p->sync_fd >= 0) {
                p->state = P_SYNC;
                return;
            }
            eng_synced(e, p, s, -errno);
            return;
        }
        /* The epoll engines sync in their thread: other streams wait the sync out, by policy. */
        int r = fdatasync(s->fd) < 0 ? -errno : 0;
        eng_synced(e, p, s, r);
        return;
    }
    p->c.last_seq = p->h.seq;
    eng_emit(e, LS_EV_BATCH_DONE, p, 0, p->h.seq, len, p->h.record_count);
    p->state = P_HEADER;
}

/* fsync=batch: the batch's fdatasync finished (r = 0 or -errno): now release it, or report it
 * failed (it is in the file, but the disk did not confirm it). */
void eng_synced(struct ls_engine *e, struct producer *p, struct stream *s, int r)
{
    s->c.syncs++;
    if (p->sync_fd >= 0) {
        close(p->sync_fd);
        p->sync_fd = -1;
    }
    if (r < 0) {
        p->c.errors++;
        s->c.errors++;
        e->total.errors++;
        eng_emit(e, LS_EV_BATCH_FAILED, p, r, p->h.seq, p->h.payload_len, p->h.record_count);
    } else {
        p->c.last_seq = p->h.seq; /* released: what a reconciliation may release */
        eng_emit(e, LS_EV_BATCH_DONE, p, 0, p->h.seq, p->h.payload_len, p->h.record_count);
    }
    p->state = P_HEADER;
}

static uint64_t *moved_ctr(struct ls_counters *c, int how)
{
    return how == MOVED_SHARED ? &c->bytes_shared : how == MOVED_COPY ? &c->bytes_copied : &c->bytes_spliced;
}

void eng_on_payload(struct ls_engine *e, struct producer *p, long r, int how)
{
    struct stream *s = &e->streams[p->stream_id];
    if (r == 0 && p->arena)
        r = -EIO; /* a write from the arena that moved nothing: a failed batch, not a dead producer */
    if (r > 0) {
        p->moved += (uint32_t)r;
        *moved_ctr(&s->c, how) += (uint64_t)r;
        *moved_ctr(&p->c, how) += (uint64_t)r;
        *moved_ctr(&e->total, how) += (uint64_t)r;
        if (p->moved == p->h.payload_len) {
            uint64_t start;
            int64_t hole = ls_close_truncation_hole(s->fd, p->batch_start, p->h.payload_len, &start);
            p->batch_start = start;
            if (hole > 0) {
                s->c.holes_closed++;
                eng_emit(e, LS_EV_HOLE_CLOSED, p, 0, p->h.seq, (uint64_t)hole, 0);
            }
            int nl = hole < 0 ? (int)hole : ls_ends_in_newline(s->fd, p->batch_start + p->h.payload_len);
            if (nl == 0) { /* it would glue the next batch (maybe another producer's) onto its tail */
                eng_truncate_back(s, p->batch_start);
                eng_refuse(e, p, LS_EBATCH_NO_NEWLINE, p->moved);
            } else if (nl < 0) { /* unreadable: we cannot vouch for it, so it is not committed */
                eng_truncate_back(s, p->batch_start);
                p->c.errors++;
                s->c.errors++;
                e->total.errors++;
                eng_emit(e, LS_EV_BATCH_FAILED, p, nl, p->h.seq, p->h.payload_len, p->h.record_count);
                p->state = P_HEADER;
                p->staged = 0;
            } else {
                batch_done(e, p, s);
            }
            eng_stream_release(e, s);
        }
        return;
    }
    if (r == 0) { /* the pipe ended mid-batch: the producer died */
        uint64_t partial = p->moved;
        eng_truncate_back(s, p->batch_start);
        p->c.errors++;
        s->c.errors++;
        e->total.errors++;
        eng_finish(e, p, LS_EV_PRODUCER_DIED, 0, partial);
        eng_stream_release(e, s);
        return;
    }
    if ((r == -EINVAL || r == -ENOSYS || r == -EOPNOTSUPP) && how == MOVED_SPLICE && p->moved == 0 && !s->copy) {
        /* The file refuses splice (a filesystem without splice_write) and nothing moved yet:
         * this stream steps down to read + pwrite, and the batch goes again that way. */
        s->copy = 1;
        eng_emit(e, LS_EV_STREAM_COPY, p, (int32_t)r, p->h.seq, 0, 0);
        return;
    }
    /* The file refused the batch (ENOSPC, EIO, EFBIG...): cut it back, discard the rest from the
     * pipe so the producer's next batch is read in sync, and report the batch failed. */
    eng_truncate_back(s, p->batch_start);
    p->c.errors++;
    s->c.errors++;
    e->total.errors++;
    p->fail_err = (int32_t)r;
    s->busy = NULL;
    if (p->moved >= p->h.payload_len || p->arena) { /* nothing left in the pipe to discard */
        eng_emit(e, LS_EV_BATCH_FAILED, p, p->fail_err, p->h.seq, p->h.payload_len, p->h.record_count);
        p->state = P_HEADER;
        p->staged = 0;
    } else {
        p->state = P_DISCARD;
    }
    eng_stream_release(e, s);
}

void eng_on_discard(struct ls_engine *e, struct producer *p, long r)
{
    if (r > 0) {
        p->moved += (uint32_t)r;
        if (p->moved == p->h.payload_len) {
            eng_emit(e, p->suppress ? LS_EV_BATCH_SUPPRESSED : LS_EV_BATCH_FAILED, p, p->fail_err, p->h.seq,
                     p->h.payload_len, p->h.record_count);
            p->suppress = 0;
            p->state = P_HEADER;
            p->staged = 0;
        }
        return;
    }
    eng_finish(e, p, r == 0 ? LS_EV_PRODUCER_DIED : LS_EV_PRODUCER_ERROR, (int32_t)r, p->moved);
}

/* A batch's queued payload is gone from under us (PAYLOAD/DISCARD started only once all of it was
 * queued, so only the producer reading its own pipe back can do this): cut back, end the producer. */
void eng_payload_vanished(struct ls_engine *e, struct producer *p)
{
    struct stream *s = &e->streams[p->stream_id];
    int held = p->state == P_PAYLOAD;
    if (held)
        eng_truncate_back(s, p->batch_start);
    eng_refuse(e, p, LS_EBATCH_VANISHED, p->moved);
    if (held)
        eng_stream_release(e, s);
}

/* WAIT_DATA and the rest of the batch will not come: the pipe (socket) ended, or the producer is
 * being removed. Nothing of the batch was written; the producer ends (died, or removed). */
void eng_wait_data_over(struct ls_engine *e, struct producer *p, long r, uint64_t queued)
{
    if (r < 0) {
        p->c.errors++;
        e->total.errors++;
        eng_finish(e, p, LS_EV_PRODUCER_ERROR, (int32_t)r, queued);
    } else if (p->remove && !p->drain) {
        eng_finish(e, p, LS_EV_PRODUCER_REMOVED, 0, queued);
    } else {
        p->c.errors++;
        e->total.errors++;
        eng_finish(e, p, LS_EV_PRODUCER_DIED, 0, queued);
    }
}

/* Removal requested and nothing more is queued (or drain=0): end the producer now if we can. */
int eng_removal_due(struct ls_engine *e, struct producer *p)
{
    (void)e;
    if (!p->remove)
        return 0;
    if (!p->drain)
        return 1;
    int avail = eng_pipe_avail(p->fd);
    return avail <= 0;
}

long eng_splice_payload(struct ls_engine *e, struct producer *p)
{
    struct stream *s = &e->streams[p->stream_id];
    int in = p->is_sock ? p->stage_r : p->fd;
    loff_t off = (loff_t)(p->batch_start + p->moved);
    for (;;) {
        ssize_t r = splice(in, NULL, s->fd, &off, p->h.payload_len - p->moved, SPLICE_F_NONBLOCK | SPLICE_F_MOVE);
        if (r < 0 && errno == EINTR)
            continue;
        return r < 0 ? -errno : r;
    }
}

long eng_write_shared(struct ls_engine *e, struct producer *p)
{
    struct stream *s = &e->streams[p->stream_id];
    for (;;) {
        ssize_t w = pwrite(s->fd, p->arena + p->arena_off + p->moved, p->h.payload_len - p->moved,
                           (off_t)(p->batch_start + p->moved));
        if (w < 0 && errno == EINTR)
            continue;
        return w < 0 ? -errno : w;
    }
}

long eng_move_copy(struct ls_engine *e, struct producer *p, int discard)
{
    struct stream *s = &e->streams[p->stream_id];
    size_t want = p->h.payload_len - p->moved;
    int in = p->is_sock ? p->stage_r : p->fd;
    if (!e->rwbuf && !(e->rwbuf = malloc(RW_BUF_SIZE)))
        return -ENOMEM;
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

/* Drive p: issue its next operation (io_uring) or run it as far as it goes (epoll). A drive started
 * while another runs - a landed batch hands the stream to the next waiter, which drives it, whose
 * inline write lands, which drives the next... - is queued and run by the outermost drive instead,
 * so the stack never grows with the number of batches or waiters (a pipe full of tiny batches once
 * recursed 68,773 frames deep and crashed the engine thread). Every backend drive acts on p's state
 * as it finds it, so running it later, or once more, is harmless. */
void eng_drive(struct ls_engine *e, struct producer *p)
{
    if (e->in_drive) {
        if (!p->run_queued) {
            p->run_queued = 1;
            p->next_run = NULL;
            if (e->run_tail)
                e->run_tail->next_run = p;
            else
                e->run_head = p;
            e->run_tail = p;
        }
        return;
    }
    e->in_drive = 1;
    e->be->drive(e, p);
    while (e->run_head) {
        struct producer *q = e->run_head;
        e->run_head = q->next_run;
        if (!e->run_head)
            e->run_tail = NULL;
        q->run_queued = 0;
        if (q->state != P_FREE)
            e->be->drive(e, q);
    }
    e->in_drive = 0;
}

/* ---------------------------------------------------------------------------------------- */
/* engine thread and public API                                                               */

/* Apply what the control thread asked for since the last wake (under the mutex). */
void eng_apply_requests(struct ls_engine *e)
{
    for (uint32_t i = 0; i < e->max_streams; i++) {
        struct stream *s = &e->streams[i];
        if ((s->pending || s->pending_resume) && !s->busy) {
            s->pending_resume = 0;
            eng_stream_release(e, s); /* applies a new fd, then serves waiters */
        }
    }
    for (uint32_t i = 0; i < e->max_producers; i++) {
        struct producer *p = &e->prod[i];
        if (p->state == P_FREE)
            continue;
        if (!p->started) {
            int r = e->be->watch(e, p);
            if (r < 0) { /* the ring's file table or epoll refused it: that producer cannot run */
                p->c.errors++;
                e->total.errors++;
                eng_finish(e, p, LS_EV_PRODUCER_ERROR, r, 0);
                continue;
            }
            p->started = 1;
            eng_drive(e, p);
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
                eng_finish(e, p, LS_EV_PRODUCER_REMOVED, 0, 0);
                continue;
            }
            e->be->removal(e, p);
        }
    }
}

void eng_wake(struct ls_engine *e)
{
    uint64_t one = 1;
    (void)!write(e->wake_fd, &one, sizeof one);
}

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
    eng_wake(e);
    while (s->pending && !e->stop && !e->failed)
        pthread_cond_wait(&e->cond, &e->mu);
    int r = e->failed;
    pthread_mutex_unlock(&e->mu);
    return r;
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
    eng_wake(e);
    pthread_mutex_unlock(&e->mu);
    return 0;
}

int ls_engine_bound_stream(struct ls_engine *e, uint32_t id, uint64_t bound)
{
    if (id >= e->max_streams)
        return -EINVAL;
    pthread_mutex_lock(&e->mu);
    struct stream *s = &e->streams[id];
    if (bound != s->bound || !s->bounded) { /* look again: raised, lifted, or the file may have shrunk */
        s->pending_resume = 1;
        eng_wake(e);
    }
    s->bounded = bound != 0;
    s->bound = bound;
    pthread_mutex_unlock(&e->mu);
    return 0;
}

/* Take slot `id` for a producer on `fd` (stage_r/stage_w: its stage pipe, or -1) and wake the
 * engine thread, which starts it. Returns 0, -EBUSY (slot in use) or -ENOENT (no such stream). */
static int claim_slot(struct ls_engine *e, uint32_t id, uint32_t stream_id, int fd, int stage_r, int stage_w,
                      uint32_t cap, const char *arena, uint64_t arena_len)
{
    pthread_mutex_lock(&e->mu);
    struct producer *p = &e->prod[id];
    if (p->state != P_FREE || e->streams[stream_id].fd < 0) {
        pthread_mutex_unlock(&e->mu);
        return p->state != P_FREE ? -EBUSY : -ENOENT;
    }
    unsigned char *hdr = p->hdr;
    struct producer *next_run = p->next_run; /* a slot ended while queued may still be on the run queue */
    int run_queued = p->run_queued;
    memset(p, 0, sizeof *p);
    p->id = id;
    p->hdr = hdr;
    p->next_run = next_run;
    p->run_queued = run_queued;
    p->stream_id = stream_id;
    p->fd = fd;
    p->is_sock = stage_r >= 0;
    p->stage_r = stage_r;
    p->stage_w = stage_w;
    p->cap = cap; /* 0 for a pipe: read from the pipe at its first header */
    p->sync_fd = -1;
    p->ctl_fd = -1;
    p->bucket[0] = p->bucket[1] = -1;
    p->arena = arena;
    p->arena_len = arena_len;
    p->state = P_HEADER;
    eng_wake(e);
    pthread_mutex_unlock(&e->mu);
    return 0;
}

/* Producers are read without blocking by the epoll engines (io_uring polls by itself). */
static int set_nonblock_for_epoll(struct ls_engine *e, int fd, int fl)
{
    return e->be->nonblocking_fds && fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0 ? -errno : 0;
}

/* A producer's pipe: a FIFO's read end (-ENOTTY: not a pipe; -EBADF: its write end), made
 * non-blocking for the epoll engines. */
static int check_pipe_read_end(struct ls_engine *e, int pipe_fd)
{
    struct stat st;
    if (fstat(pipe_fd, &st) < 0)
        return -errno;
    if (!S_ISFIFO(st.st_mode))
        return -ENOTTY;
    int fl = fcntl(pipe_fd, F_GETFL);
    if (fl < 0)
        return -errno;
    if ((fl & O_ACCMODE) != O_RDONLY)
        return -EBADF;
    return set_nonblock_for_epoll(e, pipe_fd, fl);
}

int ls_engine_add_producer(struct ls_engine *e, uint32_t id, uint32_t stream_id, int pipe_fd)
{
    if (id >= e->max_producers || stream_id >= e->max_streams)
        return -EINVAL;
    int r = check_pipe_read_end(e, pipe_fd);
    return r < 0 ? r : claim_slot(e, id, stream_id, pipe_fd, -1, -1, 0, NULL, 0);
}

int ls_engine_add_shm_producer(struct ls_engine *e, uint32_t id, uint32_t stream_id, int pipe_fd, int arena_fd,
                               uint64_t max_arena)
{
    if (id >= e->max_producers || stream_id >= e->max_streams)
        return -EINVAL;
    int r = check_pipe_read_end(e, pipe_fd);
    if (r < 0)
        return r;
    /* The arena must be a memfd that can never shrink: then no part of our mapping can go away
     * under a write (a write that faults anyway fails with EFAULT; we never touch its bytes). */
    int seals = fcntl(arena_fd, F_GET_SEALS);
    if (seals < 0)
        return errno == EINVAL ? -EMEDIUMTYPE : -errno;
    if (!(seals & F_SEAL_SHRINK))
        return -EPERM;
    struct stat st;
    if (fstat(arena_fd, &st) < 0)
        return -errno;
    if (st.st_size <= 0 || (uint64_t)st.st_size > max_arena)
        return -EFBIG;
    /* PROT_WRITE only because io_uring pins registered buffers for writing (FOLL_WRITE: a fixed
     * buffer may be READ_FIXED into); the engine never stores into the arena. */
    void *m = mmap(NULL, (size_t)st.st_size, PROT_READ | PROT_WRITE, MAP_SHARED, arena_fd, 0);
    if (m == MAP_FAILED && errno == EPERM) /* F_SEAL_(FUTURE_)WRITE: read-only, written by plain WRITE */
        m = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_SHARED, arena_fd, 0);
    if (m == MAP_FAILED)
        return errno == EPERM ? -EACCES : -errno;
    (void)madvise(m, (size_t)st.st_size, MADV_DONTFORK); /* never into a child the daemon starts */
    r = claim_slot(e, id, stream_id, pipe_fd, -1, -1, 0, m, (uint64_t)st.st_size);
    if (r < 0)
        munmap(m, (size_t)st.st_size);
    return r;
}

const char *ls_engine_shm_path(struct ls_engine *e)
{
    pthread_mutex_lock(&e->mu);
    char ring[224];
    if (e->shm_reg[0])
        snprintf(ring, sizeof ring, "WRITE from the mapping (%s)", e->shm_reg);
    else
        snprintf(ring, sizeof ring, "WRITE_FIXED from registered buffers");
    if (e->kind != LS_ENGINE_IO_URING || e->shm_write == LS_SHM_WRITE_INLINE)
        snprintf(e->shm_path, sizeof e->shm_path, "pwrite from the mapping");
    else if (e->shm_write == LS_SHM_WRITE_RING)
        snprintf(e->shm_path, sizeof e->shm_path, "%s", ring);
    else
        snprintf(e->shm_path, sizeof e->shm_path,
                 "auto: %s on filesystems that take non-blocking buffered writes (xfs, btrfs), else (and for "
                 "batches up to 256 KiB) pwrite from the mapping", ring);
    pthread_mutex_unlock(&e->mu);
    return e->shm_path;
}

int ls_engine_set_shm_write(struct ls_engine *e, int mode)
{
    if (mode < LS_SHM_WRITE_AUTO || mode > LS_SHM_WRITE_INLINE)
        return -EINVAL;
    pthread_mutex_lock(&e->mu);
    e->shm_write = mode;
    pthread_mutex_unlock(&e->mu);
    return 0;
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
    r = claim_slot(e, id, stream_id, sock_fd, stage[0], stage[1], (uint32_t)sz / STAGE_FILL_DIVISOR, NULL, 0);
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
    int r = p->state == P_FREE ? -ENOENT : (int)eng_producer_cap(e, p, 1);
    pthread_mutex_unlock(&e->mu);
    return r;
}

int ls_engine_set_release_fd(struct ls_engine *e, uint32_t id, int ctl_fd, int held)
{
    if (id >= e->max_producers)
        return -EINVAL;
    pthread_mutex_lock(&e->mu);
    struct producer *p = &e->prod[id];
    int r = p->state == P_FREE ? -ENOENT : 0;
    if (r == 0) {
        if (p->ctl_fd >= 0)
            close(p->ctl_fd);
        p->ctl_fd = ctl_fd;
        p->release_hold = held ? HOLD_CTL : 0;
    }
    pthread_mutex_unlock(&e->mu);
    return r;
}

long ls_engine_ctl_send(struct ls_engine *e, uint32_t id, const void *buf, uint32_t len)
{
    if (id >= e->max_producers)
        return -EINVAL;
    pthread_mutex_lock(&e->mu);
    struct producer *p = &e->prod[id];
    long r;
    if (p->state == P_FREE || p->ctl_fd < 0) {
        r = -ENOENT;
    } else {
        ssize_t n = send(p->ctl_fd, buf, len, MSG_DONTWAIT | MSG_NOSIGNAL);
        r = n < 0 ? -errno : n;
        if (r >= 0 && (uint32_t)r == len)
            p->release_hold &= ~HOLD_CTL;
        else if (r > 0 || r == -EAGAIN)
            p->release_hold |= HOLD_CTL; /* the rest is the control plane's to send before anything else */
    }
    pthread_mutex_unlock(&e->mu);
    return r;
}

int ls_engine_release_resume(struct ls_engine *e, uint32_t id)
{
    if (id >= e->max_producers)
        return -EINVAL;
    pthread_mutex_lock(&e->mu);
    struct producer *p = &e->prod[id];
    int r = p->state == P_FREE ? -ENOENT : 0;
    int later = 0; /* a failure emitted after the control plane polled: its RELEASE is still to come */
    for (size_t i = 0; i < e->ev_len && !later; i++)
        later = e->ev[i].producer_id == id && (e->ev[i].kind == LS_EV_BATCH_FAILED || e->ev[i].kind == LS_EV_BATCH_SUPPRESSED);
    if (!later)
        p->release_hold &= ~HOLD_FAIL;
    pthread_mutex_unlock(&e->mu);
    return r;
}

int ls_engine_set_bucket(struct ls_engine *e, uint32_t bucket, double bytes_per_s, double records_per_s)
{
    if (bucket >= 2 * e->max_producers || bytes_per_s < 0 || records_per_s < 0)
        return -EINVAL;
    pthread_mutex_lock(&e->mu);
    if (!e->buckets && !(e->buckets = calloc(2 * (size_t)e->max_producers, sizeof *e->buckets))) {
        pthread_mutex_unlock(&e->mu);
        return -ENOMEM;
    }
    struct bucket *b = &e->buckets[bucket];
    b->rate_b = bytes_per_s;
    b->rate_r = records_per_s;
    b->tok_b = bytes_per_s; /* a fresh bucket starts full */
    b->tok_r = records_per_s;
    b->last_ns = now_ns();
    pthread_mutex_unlock(&e->mu);
    return 0;
}

int ls_engine_set_limit(struct ls_engine *e, uint32_t id, int32_t b1, int32_t b2)
{
    if (id >= e->max_producers || b1 >= (int32_t)(2 * e->max_producers) || b2 >= (int32_t)(2 * e->max_producers))
        return -EINVAL;
    pthread_mutex_lock(&e->mu);
    struct producer *p = &e->prod[id];
    int r = p->state == P_FREE ? -ENOENT : (b1 >= 0 || b2 >= 0) && !e->buckets ? -EINVAL : 0;
    if (r == 0) {
        p->bucket[0] = b1 < 0 ? -1 : b1;
        p->bucket[1] = b2 < 0 ? -1 : b2;
    }
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
        eng_wake(e);
    }
    pthread_mutex_unlock(&e->mu);
    return r;
}
