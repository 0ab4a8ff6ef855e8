/* ls_producer_int.h - what the producer's files share: the state, and the prod_* functions.
 *
 * Not a public API (the cffi cdef and liblogsink use ls_producer.h only). The producer is split at
 * its seams:
 *   ls_producer.c       the public API: options, open/close, write, flush, stats; shared helpers
 *   ls_producer_send.c  the data path: arena segments, the batch queue, handovers (pipe: vmsplice,
 *                       copy, splice_from; TCP: send with MSG_ZEROCOPY and its completions)
 *   ls_producer_msg.c   control messages: framing, decoding and checking (protocol rules), and the
 *                       answers to RELEASE, SHUTDOWN and ERROR
 *   ls_producer_conn.c  the connection: connect, peer check, HELLO/WELCOME, the background thread,
 *                       reconnect with backoff and the resend
 * Functions named prod_* are shared between these files; the rest stay static in theirs.
 *
 * Locking: one mutex (p->lock) guards every field below "state"; p->cond is broadcast whenever
 * `released`, `broken`, `stopping` or `conn` change. Handovers run with the lock held (as in
 * client.py), so batches enter the pipe in seq order. A prod_*_locked function is called with the
 * lock held.
 *
 * The single-writer fast path (ls_producer.c, "fast path"): the thread that last wrote may own the
 * current segment (p->fast_owner, its struct prod_fast_slot) and append to it without the lock,
 * raising its slot's `busy` around the append. Whoever changes the fill state (cur, active, pos,
 * nrec) first calls prod_fast_revoke_locked (prod_reserve_locked and prod_handover_current_locked
 * do; reserve again after each wait, as the lock was dropped), which clears fast_owner, issues
 * membarrier(PRIVATE_EXPEDITED) (the owner's full barrier between its busy store and its
 * fast_owner load) and waits for busy to drop. The owner itself checks `broken` and `stopping`
 * before each append. Only do_write grants ownership, under the lock, with the segment active and
 * non-empty.
 *
 * Reading the control socket: p->rx is a reassembly buffer (a message may arrive split), so it is
 * only touched with the lock held: receiving into it, decoding and acting on it
 * (prod_read_control_locked) are one step under the lock, whoever does it. Who *waits* for the socket
 * is an ownership, also changed under the lock: normally the background thread (the socket is in its
 * epoll set); a thread in ls_producer_flush may take it (prod_rx_take_locked: only one at a time,
 * only while a connection is up, never on TCP, whose error queue the background thread reaps). It
 * removes the socket from the background thread's epoll set (which wakes nobody) and polls it
 * itself, so a RELEASE wakes the flushing thread directly instead of the background thread, which
 * then had to wake the flusher. It gives the socket back (prod_rx_give_back_locked) whenever it
 * leaves the wait - released, timed out, failed, closed - or the connection went down; putting the
 * socket back in the epoll set wakes the background thread at once if bytes are waiting, so nothing
 * sits unread. Anything that must end its wait (the connection lost, broken, closed) calls
 * prod_wake_flusher_locked, and the background thread takes the socket back (waiting for the give
 * back) before it tears a connection down, so nobody polls a closed fd.
 *
 * Batches and reconnects: a full segment becomes a batch with the next producer-wide number
 * (`seq`, never reset) and joins the queue `q`; the queue's first `qsent` entries went out on the
 * current connection, numbered 1, 2, 3... there (`wire`: the daemon numbers per connection). A
 * RELEASE pops entries whose wire number it covers; `released` is the producer-wide number below
 * the oldest entry left. When the connection is lost, the background thread reconnects with
 * backoff and sends the whole queue again, renumbered, before anything new (docs/architecture.md,
 * "Reconnect and delivery guarantees").
 */
#ifndef LS_PRODUCER_INT_H
#define LS_PRODUCER_INT_H

#define _GNU_SOURCE
#include "ls_msgpack.h"
#include "ls_producer.h"
#include "ls_cancel.h"

#include <pthread.h>
#include <stdint.h>
#include <time.h>

#define ERRLEN 512


/* The connection, as the writers see it. */
enum conn_state {
    CONN_UP,       /* batches go out as they fill */
    CONN_DRAINING, /* the daemon said SHUTDOWN: our pipe is closed, RELEASEs still come, then EOF */
    CONN_DOWN,     /* lost: the background thread reconnects; batches wait in the queue */
};

/* A connection's parts, set up without the lock (by open, or by the background thread while the
 * producer is CONN_DOWN) and then installed by prod_install_conn_locked. */
struct conn_parts {
    int sock, pipe_w, pipe_size, zc_ok;
    uint32_t capacity;
    int64_t producer_id;
    char engine[32];
};

/* A batch handed to the daemon and not yet released (or waiting for a connection). */
struct batch {
    uint64_t seq;       /* producer-wide number */
    uint64_t wire_last; /* the connection's number of its (last) frame; valid for the first qsent */
    int32_t seg;        /* arena segment, or -1: moved by splice_from, not in the arena */
    uint32_t len, nrec; /* payload bytes (after the segment's 32-byte header) and records */
    int sent_before;    /* went out (at least partly) on an earlier connection */
};

/* One per thread that ever wrote (never freed: reused by a later thread when its thread exits), so
 * a revoker may read `busy` of an owner whose thread is gone. Only its thread writes `busy`. */
struct prod_fast_slot {
    int busy;         /* 1 while its thread appends to a segment lock-free */
    uintptr_t thread; /* its thread (the thread pointer); 0 once that thread exited */
    struct prod_fast_slot *next_free;
} __attribute__((aligned(64)));

struct ls_producer {
    pthread_mutex_t lock;
    pthread_cond_t cond;
    pthread_t thread;
    int thread_started;
    unsigned long fork_gen;
    /* configuration (immutable after open) */
    char stream[LS_MAX_STREAM_NAME + 1];
    int transport, on_full, timeout_ms, flush_interval_ms;
    uint32_t segment_size, segments, capacity; /* capacity: payload bytes per batch (this connection) */
    int pipe_size;
    int64_t producer_id;   /* from WELCOME: the daemon's id for us (status shows it) */
    char engine[32];       /* from WELCOME: the daemon's engine */
    int sock, event_fd;
    int wake_fd;           /* eventfd: wakes the background thread (close, connection lost) */
    int cancel_fd;         /* eventfd: readable once shutdown began (ls_cancel.h) */
    int64_t close_deadline; /* shutdown's bound for waits under the lock (atomic; -1: none yet) */
    struct ls_wait_cancel cancel; /* {cancel_fd, &close_deadline}, for ls_transport's waits */
    int shutting;          /* ls_producer_shutdown began (under lock): a second call returns at once */
    int reconnect;         /* opts.reconnect */
    int64_t expected_uid;
    char path[108];        /* the socket path or tcp:// address, for reconnects */
    uint32_t base_capacity; /* segment_size - 32: what capacity is before the pipe and max_batch cut it */
    char *arena;
    size_t arena_size;
    int arena_fd;          /* transport shm: the arena's memfd, passed with every HELLO; else -1 */
    /* state (under lock) */
    int pipe_w;            /* -1 once closed */
    uint64_t *seg_seq;     /* seq a segment was handed over as and is pinned until; 0 = free */
    struct batch *q;       /* unreleased batches, oldest first: q[qhead .. qhead+qlen) */
    uint32_t qhead, qlen, qcap, qsent;
    uint64_t wire;         /* last frame number used on this connection */
    int conn;              /* enum conn_state */
    int64_t down_since_ms; /* when the connection stopped being CONN_UP */
    uint64_t down_total_ms;
    char refused_code[64]; /* the ERROR code that answered our last HELLO */
    unsigned rand_state;
    uint32_t cur;          /* the ring position: last segment taken */
    int active;            /* cur is being filled (not yet handed over) */
    uint32_t pos, nrec;    /* payload bytes and records in the current segment (the fast owner
                            * writes them lock-free: relaxed atomics) */
    struct prod_fast_slot *fast_owner; /* may append to cur without the lock; NULL: nobody */
    uint32_t fast_backoff; /* slow writes to skip before granting again after a contended revoke */
    uint32_t fast_cooldown; /* ...left of the current backoff */
    int64_t filled_at_ms;  /* when the current segment got its first record */
    uint64_t seq;          /* last seq handed over */
    uint64_t released;     /* daemon: every seq <= this is dealt with */
    int broken;            /* 0, or the errno every later call returns (ECONNRESET) */
    int stopping;          /* daemon said SHUTDOWN */
    int closed;
    uint64_t failed_pending; /* failed batches reported since the last flush */
    char failed_first[ERRLEN];
    struct ls_producer_stats st; /* counters only; the rest is filled in by ls_producer_stats */
    char last_error[ERRLEN];
    int64_t ts_sec;        /* write_log_json: the second ts_text renders */
    char ts_text[24];
    /* TCP producers: frames go on the control connection itself; with MSG_ZEROCOPY a segment
     * stays pinned until the error queue's notifications cover every send that referenced it. */
    int is_tcp;
    int zc_on;             /* still passing MSG_ZEROCOPY (off after a run of COPIED completions) */
    uint32_t zc_next;      /* notification id the next zerocopy send gets (the kernel counts from 0) */
    uint32_t zc_done;      /* every id < zc_done has completed */
    uint32_t *seg_zc;      /* a segment is free once zc_done >= this (0: no zerocopy send pending) */
    uint32_t zc_copied_run; /* consecutive ids the kernel reported COPIED */
    uint32_t zc_switch;     /* ...after this many, stop asking (0 = never); opts.zc_copied_switch */
    struct { uint32_t lo, hi; } zc_pending[64]; /* completions that arrived ahead of a gap */
    int zc_npending;
    /* Control socket input (under lock once the background thread runs; see "Reading the control
     * socket" above): who waits for it is the background thread, or a flushing thread that took it. */
    uint8_t *rx;
    size_t rx_len, rx_cap;
    struct ls_mp_doc doc;
    int epoll_fd;          /* the background thread's wait: wake_fd, and the socket while it reads it */
    int bg_watches_sock;   /* the socket is in epoll_fd's set */
    int flush_reads_sock;  /* config: a flush may wait on the socket (not TCP, not with
                            * LOGSINK_FLUSH_WAITS_ON_SOCKET=0) */
    int rx_flusher;        /* a flushing thread reads the socket now (the background thread does not) */
    int rx_flusher_polling; /* ... and waits in poll() without the lock: flush_wake_fd wakes it */
    int flush_wake_fd;     /* eventfd: wakes that flushing thread (connection lost, broken, closed) */
};

/* -- shared state and small helpers ------------------------------------------------------------- */

/* Why this thread's last ls_producer_open (or reconnect attempt) failed: prod_set_error(NULL, ...). */
extern __thread char prod_open_error[ERRLEN];
/* Bumped in a forked child (pthread_atfork): a producer opened under another value is an ancestor's. */
extern unsigned long prod_fork_generation;

/* Milliseconds on CLOCK_MONOTONIC (the clock p->cond waits on). */
static inline int64_t prod_now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* The deadline timeout_ms from now (< 0: none, -1). */
static inline int64_t prod_deadline_after(int timeout_ms)
{
    return timeout_ms < 0 ? -1 : prod_now_ms() + timeout_ms;
}

/* This producer belongs to the parent process (fork detection without a getpid() syscall per write). */
static inline int prod_forked(const struct ls_producer *p)
{
    return p->fork_gen != __atomic_load_n(&prod_fork_generation, __ATOMIC_RELAXED);
}

/* The i-th unreleased batch, oldest first. */
static inline struct batch *prod_q_at(struct ls_producer *p, uint32_t i)
{
    return &p->q[p->qhead + i];
}

/* ls_producer.c */
/* Say why the last call failed: into p->last_error, or with p NULL into prod_open_error. */
void prod_set_error(struct ls_producer *p, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* Make ls_producer_event_fd readable (releases, a lost or ended connection). */
void prod_signal_event(struct ls_producer *p);
/* Wait on p->cond until deadline_ms (< 0: no deadline). Returns 0 or -ETIMEDOUT. */
int prod_cond_wait_until(struct ls_producer *p, int64_t deadline_ms);
/* Mark the producer unusable (the first reason wins) and wake everyone. */
void prod_fail_locked(struct ls_producer *p, int err, const char *why);
/* The connection ended or broke under the background thread: break for good, and wake event loops. */
void prod_lost_locked(struct ls_producer *p, const char *why);
/* Close our data direction (the pipe's write end; TCP: shut the socket's). */
void prod_close_pipe_locked(struct ls_producer *p);
/* Wake the background thread (close, connection lost). */
void prod_wake_background(struct ls_producer *p);
/* Take the current segment back from its lock-free owner (if any) before changing the fill state. */
void prod_fast_revoke_locked(struct ls_producer *p);

/* ls_producer_send.c */
/* prod_reserve_locked's results besides -errno. */
#define PROD_TAKEN 1
#define PROD_DROPPED 0
/* Read the zerocopy completions off the TCP socket's error queue; < 0 on a real socket error. */
int prod_zc_reap_locked(struct ls_producer *p);
/* 0 if records may be written now, else -ESHUTDOWN or the -errno the producer broke with. */
int prod_usable_locked(struct ls_producer *p);
/* The connection stopped being usable: keep the queue and let the background thread reconnect. */
void prod_go_down_locked(struct ls_producer *p, const char *why);
/* p->released from the queue: everything below the oldest queued batch is dealt with. */
void prod_update_released_locked(struct ls_producer *p);
/* Send every queued batch not yet sent on this connection, oldest first. */
int prod_pump_locked(struct ls_producer *p);
/* The current segment becomes a batch: queued, and sent at once if connected. */
int prod_handover_current_locked(struct ls_producer *p);
/* Room for len bytes in the current segment: PROD_TAKEN with *dst, PROD_DROPPED, or -errno. */
int prod_reserve_locked(struct ls_producer *p, size_t len, int nonblock, char **dst);

/* ls_producer_msg.c */
/* A msgpack node is an int (signed or unsigned). */
int prod_is_int(const struct ls_mp_doc *d, int i);
/* A str node as a bounded C string ("?" if it is not a str). */
const char *prod_str_of(const struct ls_mp_doc *d, int i, char *buf, size_t size);
/* protocol.check_message: the kind (enum ls_msg_kind), or -EPROTO with *code and why filled in. */
int prod_check_message(const struct ls_mp_doc *d, const char **code, char *why, size_t whylen);
/* Decode the first complete frame of p->rx into p->doc: 1, 0 (need more bytes) or -EPROTO/-ENOMEM. */
int prod_next_frame(struct ls_producer *p, char *why, size_t whylen);
/* Drop the frame prod_next_frame decoded from p->rx. */
void prod_consume_frame(struct ls_producer *p);
/* Receive what the socket has into p->rx: bytes read (> 0), 0 on EOF, or -errno. */
int prod_recv_some(struct ls_producer *p, int sock);
/* An ERROR code worth a reconnect (protocol.RETRIABLE_CODES). */
int prod_retriable_code(const char *code);
/* Decode and act on every complete frame in p->rx. Returns 0 or -EPROTO/-ENOMEM (producer lost). */
int prod_drain_frames_locked(struct ls_producer *p);

/* ls_producer_conn.c */
/* One connection attempt (connect, HELLO, WELCOME); on failure nothing stays open. 0 or -errno. */
int prod_connect_once(struct ls_producer *p, struct conn_parts *c);
/* Take a fresh connection into use (lock held, or no other thread yet). */
void prod_install_conn_locked(struct ls_producer *p, struct conn_parts *c);
/* The background thread: releases, timed flushes, reconnects. arg is the producer. */
void *prod_background(void *arg);
/* Receive what the control socket has into p->rx and act on it: RELEASE, SHUTDOWN, ERROR, the end
 * of the connection (reconnect, or broken). For whoever reads the socket now. */
void prod_read_control_locked(struct ls_producer *p);
/* A flushing thread takes the control socket from the background thread, if it may (see "Reading
 * the control socket"). Returns 1 if it now reads it, 0 if it should wait on p->cond instead. */
int prod_rx_take_locked(struct ls_producer *p);
/* The flushing thread that took the socket may keep reading it (the connection is still there). */
int prod_rx_keep_locked(struct ls_producer *p);
/* The flushing thread hands the socket back to the background thread (and to other flushes). */
void prod_rx_give_back_locked(struct ls_producer *p);
/* The flushing thread waits once on the socket, until deadline_ms (< 0: none), and reads what came.
 * Returns 0 (something happened: check again) or -ETIMEDOUT. */
int prod_rx_wait_locked(struct ls_producer *p, int64_t deadline_ms);
/* End the wait of a flushing thread polling the socket (the connection lost, broken, closed). */
void prod_wake_flusher_locked(struct ls_producer *p);
/* At open, before the first connection is installed: whether flushes may wait on the socket
 * (LOGSINK_FLUSH_WAITS_ON_SOCKET, not TCP) and the epoll set that lets them. Failing here only
 * keeps the background thread's path. */
void prod_rx_setup(struct ls_producer *p);

#endif
