/* ls_producer_send.c - the producer's data path: segments to batches to the daemon.
 *
 * Records fill the current arena segment (prod_reserve_locked); a full segment becomes a batch in
 * the queue and goes out at once if connected (prod_handover_current_locked, prod_pump_locked):
 * into the data pipe with vmsplice or write(2) (SIGPIPE kept from the process), as a 32-byte
 * descriptor of its place in the shared memfd arena (transport shm), or on the TCP
 * connection with send(2), MSG_ZEROCOPY where it pays, whose completions (the socket's error queue)
 * decide when a segment may be reused. A batch filled for an earlier connection and larger than
 * this one's batches goes as several frames cut at record boundaries. ls_producer_splice_from
 * hands a batch over from the caller's pipe (shm: read into a segment first). Everything here
 * runs with p->lock held (see ls_producer_int.h for the state and the queue's numbering).
 */
#include "ls_producer_int.h"
#include "ls_frame.h"
#include "ls_render.h"
#include "ls_transport.h"
#include "ls_zerocopy.h"

#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

/* -- MSG_ZEROCOPY completions (lock held) -------------------------------------------------------- */

/* Sends smaller than this go copied: pinning pages and reaping a notification cost more than
 * copying ~10 KiB (kernel docs: "zerocopy is generally only effective at writes over around 10 KB"). */
#define ZC_MIN_SEND (10u << 10)

static void zc_complete_locked(struct ls_producer *p, uint32_t lo, uint32_t hi, int copied)
{
    uint32_t n = hi - lo + 1;
    p->st.zc_completed += n;
    if (copied) {
        p->st.zc_copied += n;
        p->zc_copied_run += n;
        if (p->zc_on && p->zc_switch && p->zc_copied_run >= p->zc_switch) {
            p->zc_on = 0;
            p->st.zc_switched_to_copy = 1;
        }
    } else {
        p->zc_copied_run = 0;
    }
    if (lo != p->zc_done) { /* ahead of a gap: keep it until the gap fills */
        if (p->zc_npending < (int)(sizeof p->zc_pending / sizeof p->zc_pending[0])) {
            p->zc_pending[p->zc_npending].lo = lo;
            p->zc_pending[p->zc_npending].hi = hi;
            p->zc_npending++;
        } else { /* cannot track it: fail loudly rather than pin segments forever */
            prod_fail_locked(p, ECONNRESET, "too many out-of-order zerocopy completions to track");
            pthread_cond_broadcast(&p->cond);
        }
        return;
    }
    p->zc_done = hi + 1;
    for (int again = 1; again;) { /* merge what the gap held back */
        again = 0;
        for (int i = 0; i < p->zc_npending; i++)
            if (p->zc_pending[i].lo == p->zc_done) {
                p->zc_done = p->zc_pending[i].hi + 1;
                p->zc_pending[i] = p->zc_pending[--p->zc_npending];
                again = 1;
            }
    }
    pthread_cond_broadcast(&p->cond);
}

/* Read the error queue; returns < 0 if the socket reported a real error. */
int prod_zc_reap_locked(struct ls_producer *p)
{
    uint32_t lo[32], hi[32];
    int copied[32], n;
    do {
        n = ls_zc_reap(p->sock, lo, hi, copied, 32);
        for (int i = 0; i < n; i++)
            zc_complete_locked(p, lo[i], hi[i], copied[i]);
    } while (n == 32);
    return n < 0 ? n : 0;
}

/* Send a whole segment (header + payload) on the TCP connection. With zerocopy the segment stays
 * pinned until the completions cover the ids its sends consumed. */
static int handover_tcp_locked(struct ls_producer *p, char *seg, uint32_t len, uint32_t records, uint64_t seq,
                               uint32_t segidx, int allow_zc)
{
    ls_frame_fill(seg, len, records, seq);
    size_t total = LS_FRAME_HEADER_SIZE + (size_t)len, done = 0;
    int zc = allow_zc && p->transport == LS_TRANSPORT_ZEROCOPY && p->zc_on && total >= ZC_MIN_SEND;
    int64_t deadline = prod_deadline_after(p->timeout_ms);
    uint32_t ids = 0;
    while (done < total) {
        int enobufs = 0;
        ssize_t r = ls_zc_send(p->sock, seg + done, total - done, zc, &enobufs);
        if (enobufs)
            p->st.zc_enobufs++; /* that part went copied */
        if (r > 0) {
            if (zc && !enobufs)
                ids++;
            done += (size_t)r;
            continue;
        }
        if (r != -EAGAIN)
            return r == -EPIPE ? -EPIPE : (int)r;
        int wait = -1, watch;
        int64_t until = ls_wait_deadline(&p->cancel, deadline, &watch); /* a shutdown can cut it short */
        if (until >= 0) {
            int64_t left = until - prod_now_ms();
            if (left <= 0)
                return -ETIMEDOUT;
            wait = (int)left;
        }
        struct pollfd pfd[2] = {{.fd = p->sock, .events = POLLOUT}, {.fd = watch, .events = POLLIN}};
        int pr = poll(pfd, 2, wait);
        if (pr < 0 && errno != EINTR)
            return -errno;
        if (pr > 0 && (pfd[0].revents & POLLERR) && prod_zc_reap_locked(p) < 0)
            return -ECONNRESET; /* a real socket error, not a notification */
        if (pr > 0 && (pfd[0].revents & POLLHUP) && !(pfd[0].revents & POLLOUT))
            return -EPIPE;
    }
    if (zc) {
        p->st.zc_sends++;
        p->zc_next += ids;
        p->seg_zc[segidx] = ids ? p->zc_next : 0;
    } else {
        p->st.copied_sends++; /* (seg_zc keeps what an earlier zerocopy send of this segment needs) */
    }
    return 0;
}

/* -- segments (lock held) ---------------------------------------------------------------------- */

/* ls_handover (or, with splice_in >= 0, ls_splice_batch from that pipe; with transport shm,
 * ls_shm_handover of the payload after the header at seg) without letting SIGPIPE kill the process
 * (see ls_producer.h). */
static int handover_nosigpipe_from(struct ls_producer *p, int splice_in, void *seg, uint32_t len, uint32_t records,
                                   uint64_t seq, int transport)
{
    sigset_t pipe_set, old, pending;
    sigemptyset(&pipe_set);
    sigaddset(&pipe_set, SIGPIPE);
    pthread_sigmask(SIG_BLOCK, &pipe_set, &old);
    int was_blocked = sigismember(&old, SIGPIPE);
    int was_pending = 0;
    if (!was_blocked && sigpending(&pending) == 0)
        was_pending = sigismember(&pending, SIGPIPE); /* someone else's: leave it alone */
    int ret;
    ls_transport_cancel_scope(&p->cancel); /* a shutdown can cut its waits for pipe room short */
    if (splice_in >= 0)
        ret = ls_splice_batch(p->pipe_w, splice_in, len, records, seq, p->timeout_ms);
    else if (transport == LS_TRANSPORT_SHM)
        ret = ls_shm_handover(p->pipe_w, (uint64_t)((char *)seg - p->arena) + LS_FRAME_HEADER_SIZE, len, records, seq,
                              p->timeout_ms);
    else
        ret = ls_handover(p->pipe_w, seg, len, records, seq, transport, p->timeout_ms);
    ls_transport_cancel_scope(NULL);
    if (ret == -EPIPE && !was_blocked && !was_pending) {
        struct timespec zero = {0, 0};
        while (sigtimedwait(&pipe_set, NULL, &zero) < 0 && errno == EINTR)
            ;
    }
    if (!was_blocked)
        pthread_sigmask(SIG_SETMASK, &old, NULL);
    return ret;
}

int prod_usable_locked(struct ls_producer *p)
{
    if (p->shutting) { /* (from its start: what was accepted before is in the final flush) */
        prod_set_error(p, "stream '%s': the producer was closed (by another thread, or at exit)", p->stream);
        return -ESHUTDOWN;
    }
    if (p->stopping) {
        prod_set_error(p, "the logsink daemon is shutting down; stream '%s' takes no more records", p->stream);
        return -ESHUTDOWN;
    }
    if (p->broken)
        return -p->broken; /* last_error already says why */
    return 0;
}

/* The connection stopped being usable (the daemon died, closed, or said a retriable ERROR). With
 * reconnect: end our data direction (a partial batch is discarded by the daemon and resent by
 * us), keep every unreleased batch queued, and let the background thread reconnect. Lock held. */
void prod_go_down_locked(struct ls_producer *p, const char *why)
{
    if (p->conn == CONN_DOWN)
        return;
    if (p->conn == CONN_UP)
        p->down_since_ms = prod_now_ms();
    p->conn = CONN_DOWN;
    prod_close_pipe_locked(p);
    snprintf(p->last_error, ERRLEN, "lost the logsink daemon (%s); reconnecting", why);
    pthread_cond_broadcast(&p->cond);
    prod_wake_flusher_locked(p); /* a flush polling the socket gives it back for the teardown */
    prod_signal_event(p);
    prod_wake_background(p);
}

/* A handover failed. Returns what the caller returns: without reconnect the producer is broken
 * (-ECONNRESET, or -ETIMEDOUT for a pipe that stayed full); with reconnect 0 - the batch is
 * queued and goes out again on the next connection. Lock held. */
static int handover_failed_locked(struct ls_producer *p, int ret, const char *what)
{
    char why[ERRLEN];
    if (ret == -ETIMEDOUT && __atomic_load_n(&p->close_deadline, __ATOMIC_ACQUIRE) >= 0)
        snprintf(why, sizeof why, "%s was cut short by close: the pipe stayed full until its deadline", what);
    else if (ret == -ETIMEDOUT)
        snprintf(why, sizeof why, "%s failed: the pipe stayed full for %d ms", what, p->timeout_ms);
    else
        snprintf(why, sizeof why, "%s failed: %s", what, strerror(-ret));
    if (p->reconnect) {
        prod_go_down_locked(p, why);
        return 0;
    }
    /* A partial batch may be in the pipe: the stream is out of sync, so end it (the daemon
     * discards the partial batch) and make every later call fail loudly. */
    prod_close_pipe_locked(p);
    prod_fail_locked(p, ECONNRESET, why);
    return ret == -ETIMEDOUT ? ret : -ECONNRESET;
}

/* Append a batch to the queue with the next producer-wide seq. Returns 0 or -ENOMEM. */
static int q_push_locked(struct ls_producer *p, int32_t seg, uint32_t len, uint32_t nrec)
{
    if (p->qhead + p->qlen == p->qcap) {
        if (p->qhead > 0) {
            memmove(p->q, p->q + p->qhead, p->qlen * sizeof *p->q);
            p->qhead = 0;
        } else {
            uint32_t cap = p->qcap ? p->qcap * 2 : p->segments + 8;
            struct batch *q = realloc(p->q, cap * sizeof *q);
            if (!q)
                return -ENOMEM;
            p->q = q;
            p->qcap = cap;
        }
    }
    struct batch *b = &p->q[p->qhead + p->qlen++];
    *b = (struct batch){.seq = ++p->seq, .seg = seg, .len = len, .nrec = nrec};
    return 0;
}

/* Everything below the oldest queued batch is dealt with. */
void prod_update_released_locked(struct ls_producer *p)
{
    p->released = p->qlen ? prod_q_at(p, 0)->seq - 1 : p->seq;
}

/* One frame from the arena: `len` payload bytes at `payload` (its 32-byte header goes right before
 * it). copy_only: write(2)/plain send, so the bytes are copied before this returns (shm ignores it:
 * a descriptor names any range of the arena, and the segment stays pinned until RELEASE). */
static int send_frame_locked(struct ls_producer *p, char *payload, uint32_t len, uint32_t nrec, uint64_t wire,
                             uint32_t segidx, int copy_only)
{
    char *hdr = payload - LS_FRAME_HEADER_SIZE;
    if (p->is_tcp)
        return handover_tcp_locked(p, hdr, len, nrec, wire, segidx, !copy_only);
    int transport = copy_only && p->transport != LS_TRANSPORT_SHM ? LS_TRANSPORT_COPY : p->transport;
    int ret = handover_nosigpipe_from(p, -1, hdr, len, nrec, wire, transport);
    if ((ret == -ENOSYS || ret == -EPERM) && transport == LS_TRANSPORT_VMSPLICE) {
        /* vmsplice is missing (gVisor: ENOSYS) or refused (seccomp: EPERM) before it moved a
         * byte: step down the ladder to plain writes, for good, and say so in last_error. */
        p->transport = LS_TRANSPORT_COPY;
        snprintf(p->last_error, sizeof p->last_error, "vmsplice unavailable (%s): using copy", strerror(-ret));
        ret = handover_nosigpipe_from(p, -1, hdr, len, nrec, wire, LS_TRANSPORT_COPY);
    }
    return ret;
}

/* Send queued batch b on the current connection. A batch filled for an earlier connection may be
 * larger than this one takes whole (a smaller pipe, a smaller max_batch): it then goes as several
 * frames cut at record boundaries, copied (each frame's header borrows the 32 bytes before its
 * payload, restored once write() has copied them). shm: one descriptor per piece, no copy and no
 * borrowed header (the daemon may be reading the piece before). Returns 0 or -errno. */
static int send_batch_locked(struct ls_producer *p, struct batch *b)
{
    char *payload = p->arena + (size_t)b->seg * p->segment_size + LS_FRAME_HEADER_SIZE;
    if (b->len <= p->capacity) {
        int r = send_frame_locked(p, payload, b->len, b->nrec, p->wire + 1, (uint32_t)b->seg, 0);
        if (r == 0)
            b->wire_last = ++p->wire;
        return r;
    }
    for (uint32_t off = 0; off < b->len;) {
        uint32_t n = b->len - off;
        if (n > p->capacity) {
            const char *cut = memrchr(payload + off, '\n', p->capacity);
            if (!cut)
                return -EMSGSIZE; /* checked before the connection was taken into use */
            n = (uint32_t)(cut - (payload + off)) + 1;
        }
        int borrow = off && p->transport != LS_TRANSPORT_SHM;
        char saved[LS_FRAME_HEADER_SIZE];
        if (borrow)
            memcpy(saved, payload + off - LS_FRAME_HEADER_SIZE, sizeof saved);
        int r = send_frame_locked(p, payload + off, n, (uint32_t)ls_count_records(payload + off, n), p->wire + 1,
                                  (uint32_t)b->seg, 1);
        if (borrow)
            memcpy(payload + off - LS_FRAME_HEADER_SIZE, saved, sizeof saved);
        if (r < 0)
            return r;
        b->wire_last = ++p->wire;
        off += n;
    }
    return 0;
}

/* Send every queued batch not yet sent on this connection, oldest first. Returns 0, or what
 * handover_failed_locked says. Lock held. */
int prod_pump_locked(struct ls_producer *p)
{
    while (p->conn == CONN_UP && p->qsent < p->qlen) {
        struct batch *b = prod_q_at(p, p->qsent);
        if (p->pipe_w < 0)
            return handover_failed_locked(p, -EPIPE, "handing a batch to the daemon");
        int resend = b->sent_before;
        b->sent_before = 1; /* part of it may be in the pipe whatever happens next */
        int r = send_batch_locked(p, b);
        if (r < 0)
            return handover_failed_locked(p, r, "handing a batch to the daemon");
        if (resend) {
            p->st.resent_batches++;
            p->st.resent_bytes += b->len;
        }
        p->qsent++;
    }
    return 0;
}

/* The current segment becomes a batch: queued, and sent at once if connected. */
int prod_handover_current_locked(struct ls_producer *p)
{
    prod_fast_revoke_locked(p); /* pos and nrec are final only once nobody appends lock-free */
    if (!p->active || !p->pos)
        return 0;
    if (!p->reconnect && p->pipe_w < 0) {
        if (p->broken)
            return -p->broken;
        prod_set_error(p, "the data pipe is closed");
        return p->stopping ? -ESHUTDOWN : -ECONNRESET;
    }
    if (q_push_locked(p, (int32_t)p->cur, p->pos, p->nrec) < 0) {
        prod_set_error(p, "out of memory queueing a batch");
        return -ENOMEM;
    }
    uint64_t seq = p->seq;
    p->st.batches++;
    p->st.records += p->nrec;
    p->st.bytes += p->pos;
    p->active = 0;
    p->pos = 0;
    p->nrec = 0;
    int ret = prod_pump_locked(p);
    /* vmsplice: the pipe references the pages until the daemon releases seq; shm: the daemon reads
     * them from its mapping until then. With reconnect every transport keeps the segment until
     * then (it may have to go again). Without: copy is free now; zerocopy once its completions
     * arrive (seg_zc), whatever the daemon says. */
    p->seg_seq[p->cur] =
        p->reconnect || p->transport == LS_TRANSPORT_VMSPLICE || p->transport == LS_TRANSPORT_SHM ? seq : 0;
    return ret;
}

/* Make the next segment in ring order current, or wait once for a release. Returns PROD_TAKEN (also
 * after a wait: the caller re-checks its condition, as another thread may have taken a segment
 * with room meanwhile), PROD_DROPPED, -EAGAIN (nonblock) or -ETIMEDOUT. */
static int next_segment_locked(struct ls_producer *p, int64_t deadline, int nonblock)
{
    uint32_t nxt = (p->cur + 1) % p->segments;
    if (p->is_tcp && p->seg_zc[nxt] > p->zc_done)
        (void)prod_zc_reap_locked(p); /* completions may be waiting: look before we wait */
    if (p->seg_seq[nxt] <= p->released && (!p->is_tcp || p->seg_zc[nxt] <= p->zc_done)) {
        p->cur = nxt;
        p->seg_seq[nxt] = 0;
        p->active = 1;
        p->pos = 0;
        p->nrec = 0;
        return PROD_TAKEN;
    }
    if (p->on_full == LS_ON_FULL_DROP)
        return PROD_DROPPED;
    if (nonblock)
        return -EAGAIN;
    p->st.waits_for_release++;
    if (prod_cond_wait_until(p, deadline) < 0) {
        prod_set_error(p,
                  "all %u segments of stream '%s' are still pinned after %d ms: the daemon has not released "
                  "them (is it overloaded or stopped?)",
                  p->segments, p->stream, p->timeout_ms);
        return -ETIMEDOUT;
    }
    return PROD_TAKEN;
}

/* Make room for len <= capacity bytes in the current segment: PROD_TAKEN with *dst where they go,
 * PROD_DROPPED (on_full=drop, every segment pinned), or -errno. */
int prod_reserve_locked(struct ls_producer *p, size_t len, int nonblock, char **dst)
{
    int r;
    int64_t deadline = -2; /* computed on first wait */
    /* The caller is about to move pos. Again after every wait: the lock was dropped there, and a
     * writer may have taken the segment with its lock-free ownership meanwhile. */
    prod_fast_revoke_locked(p);
    while (!p->active || p->pos + len > p->capacity) {
        if ((r = prod_usable_locked(p)) < 0)
            return r;
        if (len > p->capacity)
            return -ERANGE; /* a reconnect made batches smaller while we waited: cut again */
        if ((r = prod_handover_current_locked(p)) < 0)
            return r;
        if (deadline == -2)
            deadline = prod_deadline_after(p->timeout_ms);
        r = next_segment_locked(p, deadline, nonblock);
        if (r == PROD_DROPPED || r < 0)
            return r;
        prod_fast_revoke_locked(p);
    }
    if (!p->pos)
        p->filled_at_ms = prod_now_ms();
    *dst = p->arena + (size_t)p->cur * p->segment_size + LS_FRAME_HEADER_SIZE + p->pos;
    return PROD_TAKEN;
}

/* splice_from on shm: no pipe carries payload, so read the caller's bytes into a fresh arena
 * segment and hand that over as a batch. Being in the arena, it is queued and resent like any
 * written batch (no waiting for a connection, nothing lost with one). Lock held. */
static int splice_into_arena_locked(struct ls_producer *p, int fd, uint32_t nbytes)
{
    int r = prod_handover_current_locked(p); /* what write() took before goes first, on its own */
    char *dst;
    if (r == 0 && nbytes > p->capacity)
        r = -ERANGE;
    if (r == 0)
        r = prod_reserve_locked(p, nbytes, 0, &dst);
    if (r == -ERANGE) {
        prod_set_error(p, "a spliced batch of %u bytes is larger than this connection's batches (%u bytes%s)", nbytes,
                  p->capacity, p->capacity < p->base_capacity ? ": the daemon's max_batch" : ": raise segment_size");
        return -EMSGSIZE;
    }
    if (r == PROD_DROPPED) { /* on_full=drop, every segment pinned: consume the bytes, count them */
        char sink[4096];
        uint32_t left = nbytes;
        while (left) {
            ssize_t n = read(fd, sink, left < sizeof sink ? left : sizeof sink);
            if (n < 0 && errno == EINTR)
                continue;
            if (n <= 0)
                return n < 0 ? -errno : -EIO;
            p->st.dropped_records += ls_count_records(sink, (size_t)n);
            left -= (uint32_t)n;
        }
        return 0;
    }
    if (r < 0)
        return r;
    /* The caller saw these bytes waiting (ls_peek_records): read() returns them without blocking. */
    for (uint32_t got = 0; got < nbytes;) {
        ssize_t n = read(fd, dst + got, nbytes - got);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0) {
            r = n < 0 ? -errno : -EIO;
            prod_set_error(p, "reading a batch to splice failed after %u of %u bytes (they are lost): %s", got, nbytes,
                      n < 0 ? strerror(errno) : "the input ended");
            return r;
        }
        got += (uint32_t)n;
    }
    if (dst[nbytes - 1] != '\n') {
        prod_set_error(p, "splice_from takes whole records: the %u bytes read do not end with '\\n' (they are dropped)",
                  nbytes);
        return -EINVAL;
    }
    p->nrec += (uint32_t)ls_count_records(dst, nbytes);
    p->pos += nbytes;
    return prod_handover_current_locked(p);
}

int ls_producer_splice_from(struct ls_producer *p, int fd, uint32_t nbytes, uint32_t records)
{
    if (!p || nbytes == 0 || records == 0)
        return -EINVAL;
    if (prod_forked(p))
        return -ECHILD;
    if (p->is_tcp)
        return -EOPNOTSUPP; /* splice needs the local data pipe */
    pthread_mutex_lock(&p->lock);
    int r = prod_usable_locked(p);
    if (r == 0 && p->transport == LS_TRANSPORT_SHM) {
        r = splice_into_arena_locked(p, fd, nbytes);
        pthread_mutex_unlock(&p->lock);
        return r;
    }
    if (r == 0)
        r = prod_handover_current_locked(p); /* what write() took before goes first */
    /* A spliced batch goes out now or never (it is not in the arena): wait for a connection
     * whose queue is all sent (the background thread resends it under the lock). */
    int64_t deadline = prod_deadline_after(p->timeout_ms);
    while (r == 0 && p->reconnect && (p->conn != CONN_UP || p->qsent < p->qlen) && !p->broken && !p->closed) {
        if (prod_cond_wait_until(p, deadline) < 0) {
            prod_set_error(p, "no connection to the logsink daemon within %d ms to splice a batch", p->timeout_ms);
            r = -ETIMEDOUT;
        }
    }
    if (r == 0 && (r = prod_usable_locked(p)) == 0 && p->pipe_w < 0) {
        prod_set_error(p, "the data pipe is closed");
        r = -ECONNRESET;
    }
    if (r == 0) {
        r = handover_nosigpipe_from(p, fd, NULL, nbytes, records, p->wire + 1, LS_TRANSPORT_COPY);
        if (r < 0) {
            char why[ERRLEN];
            snprintf(why, sizeof why, "splicing a batch to the daemon failed: %s", strerror(-r));
            int ret = handover_failed_locked(p, r, "splicing a batch to the daemon");
            /* Its bytes left the input pipe: with or without reconnect they are lost. */
            prod_set_error(p, "%s", why);
            r = ret < 0 ? ret : -ECONNRESET;
        } else if (q_push_locked(p, -1, nbytes, records) < 0) {
            prod_set_error(p, "out of memory queueing a batch");
            r = -ENOMEM;
        } else {
            /* No segment: nothing to pin, the kernel copied into the pipe. */
            prod_q_at(p, p->qlen - 1)->wire_last = ++p->wire;
            p->qsent++;
            p->st.batches++;
            p->st.records += records;
            p->st.bytes += nbytes;
        }
    }
    pthread_mutex_unlock(&p->lock);
    return r;
}
