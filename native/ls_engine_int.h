/* ls_engine_int.h - what the engine's state machine (ls_engine.c) and its backends share.
 *
 * Not a public API: the control plane uses ls_engine.h. ls_engine.c owns the producer state
 * machine, streams, events and the public functions; a backend (ls_engine_uring.c: io_uring;
 * ls_engine_epoll.c: splice and readwrite) only issues operations and feeds their results back
 * through the eng_on_* functions. Functions named eng_* are called with e->mu held, on the engine
 * thread (redis' ae.c + ae_epoll.c is the model for the seam).
 */
#ifndef LS_ENGINE_INT_H
#define LS_ENGINE_INT_H

#define _GNU_SOURCE
#include "ls_engine.h"
#include "ls_frame.h"
#include "ls_ring.h"

#include <pthread.h>
#include <stdint.h>

enum pstate { P_FREE = 0, P_HEADER, P_WAIT_DATA, P_WAIT_STREAM, P_PAYLOAD, P_DISCARD, P_SYNC };

/* io_uring user_data: op kind in the high 32 bits, producer id in the low. */
enum uop { U_HEADER = 1, U_POLL, U_SPLICE, U_DISCARD, U_WAKE, U_CANCEL, U_STAGE, U_TIMER, U_FSYNC, U_WRITE };
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

#define HOLD_CTL 1   /* the control plane has part of a message still to send */
#define HOLD_FAIL 2  /* a batch failed: the control plane's RELEASE (with the failure) goes first */

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
    int sync_fd;           /* SYNC: a dup of the file the batch went to (rotation may swap the stream's) */
    struct producer *next_wait;
    /* transport shm: the producer's arena, mapped shared; batches are written from it, never into it. */
    const char *arena;
    uint64_t arena_len;
    uint64_t arena_off;    /* this batch's payload offset in the arena (the descriptor's) */
    int arena_fixed;       /* io_uring: registered as buffer slot 1 + id (else a plain WRITE) */
    uint64_t arena_hot;    /* [0, arena_hot) is mapped here already: eng_arena_populate */
    /* The engine's own RELEASEs (ls_engine_set_release_fd): the control socket, and why not now. */
    int ctl_fd;
    int release_hold;      /* HOLD_* bits: the engine leaves RELEASE to the control plane */
    int32_t bucket[2];     /* rate-limit buckets this producer draws on (-1: none) */
    int suppress;          /* DISCARD of a batch over the rate limit (not a failed write) */
    int run_queued;        /* on the engine's run queue (eng_drive) */
    struct producer *next_run;
    struct ls_counters c;
};

struct stream {
    int fd;
    uint64_t offset;
    struct producer *busy;
    struct producer *wait_head, *wait_tail;
    int paused;           /* no new batch starts (a full spool with the "block" policy) */
    int bounded;          /* no new batch starts at an offset >= bound (the spool bound, see .h) */
    uint64_t bound;
    int copy;             /* the file refused splice (no splice_write): batches move by read + pwrite */
    int sync;             /* LS_SYNC_BATCH: a batch is released only once fdatasync covered it */
    int ring_writes;      /* io_uring: its filesystem takes non-blocking buffered writes (no io-wq punt) */
    int pending_resume;   /* unpaused: serve the waiters on the next wake */
    int pending;          /* a set_stream request waits to be applied */
    int pending_fd;
    uint64_t pending_off;
    struct ls_counters c;
};

struct ls_backend;

/* A rate-limit token bucket (ls_engine_set_bucket). */
struct bucket {
    double rate_b, rate_r;  /* per second; 0 = unlimited */
    double tok_b, tok_r;
    int64_t last_ns;
};

struct ls_engine {
    int kind;
    const struct ls_backend *be;  /* the backend running: io_uring, splice or readwrite */
    int failed;                   /* -errno once the engine thread ended on an error */
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
    int events_lost;       /* an event could not be queued (out of memory): counters must tell */
    struct ls_counters total;
    struct bucket *buckets; /* 2 * max_producers, allocated on first use */
    int in_drive;           /* eng_drive is running: a nested drive is queued, not recursed into */
    struct producer *run_head, *run_tail;
    char *rwbuf;           /* read + pwrite bounce buffer: readwrite, and streams in copy mode */
    /* epoll engines */
    int ep;
    /* io_uring engine */
    struct ls_ring ring;
    int ring_ok;
    int bufs_sparse;       /* the buffer table has a slot per producer (IORING_REGISTER_BUFFERS2) */
    char shm_path[512];    /* how shm batches are written (ls_engine_shm_path builds it) */
    char shm_reg[160];     /* why arenas are not registered ("" = they are) */
    int shm_write;         /* LS_SHM_WRITE_* */
    int no_populate;       /* madvise(MADV_POPULATE_READ) refused (before 5.14): eng_arena_populate is off */
    int wake_armed;
    uint64_t wake_val;
};

/* A backend: how operations are issued and waited for. Every function runs on the engine thread
 * with e->mu held, except setup/teardown (ls_engine_new/free) and thread (the thread itself). */
struct ls_backend {
    int kind;                                                   /* LS_ENGINE_* */
    int nonblocking_fds;   /* producer fds are read with O_NONBLOCK (epoll); io_uring polls by itself */
    int sync_is_op;        /* fsync=batch runs as an operation (state SYNC) rather than in the thread */
    int (*setup)(struct ls_engine *e);                          /* -errno, and e->reason says why */
    void (*teardown)(struct ls_engine *e);
    void *(*thread)(void *engine);
    void (*drive)(struct ls_engine *e, struct producer *p);     /* issue p's next operation */
    int (*watch)(struct ls_engine *e, struct producer *p);      /* start watching p->fd; -errno */
    void (*unwatch)(struct ls_engine *e, struct producer *p);   /* stop (p ends; no op in flight) */
    void (*arm)(struct ls_engine *e, struct producer *p, int on); /* epoll interest: 0, 1 level, 2 edge */
    void (*stream_fd)(struct ls_engine *e, uint32_t sid, int fd); /* a stream's file changed */
    void (*removal)(struct ls_engine *e, struct producer *p);   /* removal was requested */
};

extern const struct ls_backend ls_backend_uring, ls_backend_splice, ls_backend_readwrite;

/* The state machine (ls_engine.c). */
void eng_emit(struct ls_engine *e, uint32_t kind, struct producer *p, int32_t err, uint64_t seq, uint64_t bytes,
              uint64_t records);
int eng_pipe_avail(int fd);
uint32_t eng_producer_cap(struct ls_engine *e, struct producer *p, int refresh);
void eng_finish(struct ls_engine *e, struct producer *p, uint32_t kind, int32_t err, uint64_t bytes);
void eng_stream_release(struct ls_engine *e, struct stream *s);
void eng_truncate_back(struct stream *s, uint64_t start);
void eng_refuse(struct ls_engine *e, struct producer *p, int32_t why, uint64_t bytes);
void eng_wait_stream(struct ls_engine *e, struct producer *p);
int eng_pipe_batch_queued(struct producer *p, int *avail);
void eng_on_header(struct ls_engine *e, struct producer *p, long r);
void eng_synced(struct ls_engine *e, struct producer *p, struct stream *s, int r);
/* How payload moved: by splice (no copy), through the daemon's bounce buffer, or from the arena. */
enum moved_by { MOVED_SPLICE = 0, MOVED_COPY = 1, MOVED_SHARED = 2 };
void eng_on_payload(struct ls_engine *e, struct producer *p, long r, int how);
/* transport shm: write the rest of the batch from the arena with pwrite (the epoll engines, and the
 * io_uring engine's fallback). Returns bytes or -errno (a fault in the mapping is -EFAULT). */
long eng_write_shared(struct ls_engine *e, struct producer *p);
/* Splice the rest of a wholly queued batch from p's pipe (or stage pipe) into its stream's file at
 * the batch's offset, now (SPLICE_F_NONBLOCK: -EAGAIN if the bytes vanished). Bytes or -errno. */
long eng_splice_payload(struct ls_engine *e, struct producer *p);
void eng_on_discard(struct ls_engine *e, struct producer *p, long r);
void eng_payload_vanished(struct ls_engine *e, struct producer *p);
void eng_wait_data_over(struct ls_engine *e, struct producer *p, long r, uint64_t queued);
int eng_removal_due(struct ls_engine *e, struct producer *p);
/* 1 if p's stage pipe has no free slot: an EAGAIN from socket -> stage then means "full". */
int eng_stage_full(struct producer *p);
void eng_drive(struct ls_engine *e, struct producer *p);
void eng_apply_requests(struct ls_engine *e);
/* Wake the engine thread (from the control thread): it applies requests on its next turn. */
void eng_wake(struct ls_engine *e);
/* Move (or discard) queued payload by read + pwrite through e->rwbuf: the readwrite engine, and a
 * stream whose file refused splice. Returns bytes, 0 (EOF) or -errno. */
long eng_move_copy(struct ls_engine *e, struct producer *p, int discard);
/* The engine thread is ending on an error (-errno): say so to the control plane, once. */
void eng_failed(struct ls_engine *e, int err, const char *what);

#endif
