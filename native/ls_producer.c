/* ls_producer.c - a logsink producer in C (see ls_producer.h); a port of logsink/client.py.
 *
 * Locking: one mutex (p->lock) guards every field below "state"; p->cond is broadcast whenever
 * `released`, `broken`, `stopping` or `conn` change. Handovers run with the lock held (as in
 * client.py), so batches enter the pipe in seq order.
 *
 * Batches and reconnects: a full segment becomes a batch with the next producer-wide number
 * (`seq`, never reset) and joins the queue `q`; the queue's first `qsent` entries went out on the
 * current connection, numbered 1, 2, 3... there (`wire`: the daemon numbers per connection). A
 * RELEASE pops entries whose wire number it covers; `released` is the producer-wide number below
 * the oldest entry left. When the connection is lost, the background thread reconnects with
 * backoff and sends the whole queue again, renumbered, before anything new (docs/architecture.md,
 * "Reconnect and delivery guarantees").
 */
#define _GNU_SOURCE
#include "ls_producer.h"
#include "ls_frame.h"
#include "ls_msgpack.h"
#include "ls_render.h"
#include "ls_transport.h"
#include "ls_zerocopy.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096u
#define ERRLEN 512
#define RECV_CHUNK 65536

static __thread char tls_open_error[ERRLEN]; /* why this thread's last ls_producer_open failed */
static __thread char tls_error_copy[ERRLEN]; /* what ls_producer_last_error(p) hands out */

/* Fork detection without a getpid() syscall per write: a child handler bumps the generation and a
 * producer opened under another generation belongs to an ancestor. */
static unsigned long fork_generation;
static pthread_once_t atfork_once = PTHREAD_ONCE_INIT;

static void on_fork_child(void)
{
    __atomic_add_fetch(&fork_generation, 1, __ATOMIC_RELAXED);
}

static void register_atfork(void)
{
    (void)pthread_atfork(NULL, NULL, on_fork_child);
}

/* The connection, as the writers see it. */
enum conn_state {
    CONN_UP,       /* batches go out as they fill */
    CONN_DRAINING, /* the daemon said SHUTDOWN: our pipe is closed, RELEASEs still come, then EOF */
    CONN_DOWN,     /* lost: the background thread reconnects; batches wait in the queue */
};

/* Reconnect backoff: 50 ms doubling to 2 s, each wait jittered to 50-100 % so producers restarted
 * together do not reconnect in lockstep. */
#define BACKOFF_FIRST_MS 50
#define BACKOFF_MAX_MS 2000

/* A connection's parts, set up without the lock (by open, or by the background thread while the
 * producer is CONN_DOWN) and then installed by install_conn_locked. */
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
    int reconnect;         /* opts.reconnect */
    int64_t expected_uid;
    char path[108];        /* the socket path or tcp:// address, for reconnects */
    uint32_t base_capacity; /* segment_size - 32: what capacity is before the pipe and max_batch cut it */
    char *arena;
    size_t arena_size;
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
    uint32_t pos, nrec;    /* payload bytes and records in the current segment */
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
    /* control socket input: owned by open, then by the background thread */
    uint8_t *rx;
    size_t rx_len, rx_cap;
    struct ls_mp_doc doc;
};

static int connect_once(struct ls_producer *p, struct conn_parts *c);
static void install_conn_locked(struct ls_producer *p, struct conn_parts *c);

/* -- small helpers ------------------------------------------------------------------------------ */

static int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static int forked(const struct ls_producer *p)
{
    return p->fork_gen != __atomic_load_n(&fork_generation, __ATOMIC_RELAXED);
}

static void set_error(struct ls_producer *p, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void set_error(struct ls_producer *p, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(p ? p->last_error : tls_open_error, ERRLEN, fmt, ap);
    va_end(ap);
}

static void signal_event(struct ls_producer *p)
{
    uint64_t one = 1;
    /* Non-blocking; the counter cannot realistically reach its 2^64-2 limit. */
    if (write(p->event_fd, &one, sizeof one) < 0) {
    }
}

/* Wait on p->cond until deadline_ms (< 0: no deadline). Returns 0 or -ETIMEDOUT. */
static int cond_wait_until(struct ls_producer *p, int64_t deadline_ms)
{
    if (deadline_ms < 0) {
        pthread_cond_wait(&p->cond, &p->lock);
        return 0;
    }
    if (now_ms() >= deadline_ms)
        return -ETIMEDOUT;
    struct timespec ts = {.tv_sec = deadline_ms / 1000, .tv_nsec = (deadline_ms % 1000) * 1000000};
    int r = pthread_cond_timedwait(&p->cond, &p->lock, &ts); /* cond uses CLOCK_MONOTONIC */
    return r == ETIMEDOUT ? -ETIMEDOUT : 0;
}

static int64_t deadline_after(int timeout_ms)
{
    return timeout_ms < 0 ? -1 : now_ms() + timeout_ms;
}

/* Mark the producer unusable (the first reason wins) and wake everyone. Lock held. */
static void fail_locked(struct ls_producer *p, int err, const char *why)
{
    if (!p->broken && !p->closed) {
        p->broken = err;
        snprintf(p->last_error, ERRLEN, "%s", why);
    }
    pthread_cond_broadcast(&p->cond);
}

/* The connection ended or broke under the background thread: say so, and wake event loops. */
static void lost_locked(struct ls_producer *p, const char *why)
{
    fail_locked(p, ECONNRESET, p->stopping ? "the logsink daemon shut down" : why);
    signal_event(p);
}

static void close_pipe_locked(struct ls_producer *p)
{
    if (p->pipe_w >= 0) {
        if (p->is_tcp)
            shutdown(p->sock, SHUT_WR); /* pipe_w is a dup of the socket: end the data direction */
        close(p->pipe_w);
        p->pipe_w = -1;
    }
}

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
            fail_locked(p, ECONNRESET, "too many out-of-order zerocopy completions to track");
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
static int zc_reap_locked(struct ls_producer *p)
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
    int64_t deadline = deadline_after(p->timeout_ms);
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
        int wait = -1;
        if (deadline >= 0) {
            int64_t left = deadline - now_ms();
            if (left <= 0)
                return -ETIMEDOUT;
            wait = (int)left;
        }
        struct pollfd pfd = {.fd = p->sock, .events = POLLOUT};
        int pr = poll(&pfd, 1, wait);
        if (pr < 0 && errno != EINTR)
            return -errno;
        if (pr > 0 && (pfd.revents & POLLERR) && zc_reap_locked(p) < 0)
            return -ECONNRESET; /* a real socket error, not a notification */
        if (pr > 0 && (pfd.revents & POLLHUP) && !(pfd.revents & POLLOUT))
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

/* -- names and paths ---------------------------------------------------------------------------- */

/* protocol.validate_stream_name over n bytes (a msgpack str is not NUL-terminated): 1 ..
 * MAX_STREAM_NAME of STREAM_NAME_CHARS, not starting with '.', without "..". */
static int stream_name_ok(const char *s, size_t n)
{
    if (n == 0 || n > LS_PROTO_MAX_STREAM_NAME || s[0] == '.')
        return 0;
    for (size_t i = 0; i < n; i++) {
        if (s[i] == '\0' || !strchr(LS_PROTO_STREAM_NAME_CHARS, s[i]) || (i && s[i] == '.' && s[i - 1] == '.'))
            return 0;
    }
    return 1;
}

int ls_validate_stream_name(const char *s)
{
    return s && stream_name_ok(s, strnlen(s, LS_MAX_STREAM_NAME + 1)) ? 0 : -EINVAL;
}

/* The system daemon's runtime directory (systemd's RuntimeDirectory=logsink), as config.SYSTEM_RUNTIME_DIR. */
#define LS_SYSTEM_RUNTIME_DIR "/run/logsink"

int ls_default_socket_path(char *buf, size_t size)
{
    const char *env = getenv("LOGSINK_SOCKET");
    const char *runtime = getenv("XDG_RUNTIME_DIR");
    struct stat st;
    int n;
    if (env && *env)
        n = snprintf(buf, size, "%s", env);
    else if (runtime && *runtime && stat(runtime, &st) == 0 && S_ISDIR(st.st_mode))
        n = snprintf(buf, size, "%s%slogsink.sock", runtime, runtime[strlen(runtime) - 1] == '/' ? "" : "/");
    else if (getuid() == 0 ||
             (stat(LS_SYSTEM_RUNTIME_DIR, &st) == 0 && S_ISDIR(st.st_mode) && access(LS_SYSTEM_RUNTIME_DIR, X_OK) == 0))
        n = snprintf(buf, size, "%s/logsink.sock", LS_SYSTEM_RUNTIME_DIR);
    else
        n = snprintf(buf, size, "/tmp/logsink-%u.sock", (unsigned)getuid());
    return n < 0 || (size_t)n >= size ? -ENAMETOOLONG : n;
}

int ls_producer_opts_init(struct ls_producer_opts *opts)
{
    opts->transport = LS_TRANSPORT_VMSPLICE;
    opts->segment_size = LS_DEFAULT_SEGMENT_SIZE;
    opts->segments = LS_DEFAULT_SEGMENTS;
    opts->on_full = LS_ON_FULL_BLOCK;
    opts->timeout_ms = -1;
    opts->flush_interval_ms = LS_DEFAULT_FLUSH_INTERVAL_MS;
    opts->expected_uid = -1;
    opts->zc_copied_switch = LS_DEFAULT_ZC_COPIED_SWITCH;
    opts->reconnect = 1;
    return 0;
}

/* -- control messages -------------------------------------------------------------------------- */

static int is_int(const struct ls_mp_doc *d, int i)
{
    return i >= 0 && (d->nodes[i].type == LS_MP_INT || d->nodes[i].type == LS_MP_UINT);
}

static int is_str(const struct ls_mp_doc *d, int i)
{
    return i >= 0 && d->nodes[i].type == LS_MP_STR;
}

/* The rules of protocol.check_message beyond the schema table, for RELEASE and HELLO. */
static const char *check_rules(const struct ls_mp_doc *d, int kind, char *why, size_t whylen)
{
    if (kind == LS_MSG_RELEASE) {
        const struct ls_mp_node *t = &d->nodes[ls_mp_map_get(d, 0, "through")];
        if (t->type == LS_MP_INT && t->v.i < 0) {
            snprintf(why, whylen, "release 'through' must be >= 0, got %lld", (long long)t->v.i);
            return LS_PROTO_E_BAD_MESSAGE;
        }
        int f = ls_mp_map_get(d, 0, "failed"); /* optional: [[seq, code, reason], ...] */
        if (f < 0)
            return NULL;
        int ok = d->nodes[f].type == LS_MP_ARRAY;
        uint32_t e = (uint32_t)f + 1;
        for (uint32_t i = 0; ok && i < d->nodes[f].len; i++, e = d->nodes[e].next) {
            ok = d->nodes[e].type == LS_MP_ARRAY && d->nodes[e].len == 3 && is_int(d, (int)e + 1) &&
                 is_str(d, (int)d->nodes[e + 1].next) && is_str(d, (int)d->nodes[d->nodes[e + 1].next].next);
        }
        if (!ok) {
            snprintf(why, whylen, "release 'failed' must be a list of [seq, code, reason]");
            return LS_PROTO_E_BAD_MESSAGE;
        }
    } else if (kind == LS_MSG_HELLO) {
        const struct ls_mp_node *v = &d->nodes[ls_mp_map_get(d, 0, "v")];
        if (v->type != LS_MP_INT || v->v.i != LS_PROTO_VERSION) {
            if (v->type == LS_MP_INT)
                snprintf(why, whylen, "protocol version %lld is not supported (this daemon speaks %d)",
                         (long long)v->v.i, LS_PROTO_VERSION);
            else
                snprintf(why, whylen, "protocol version %llu is not supported (this daemon speaks %d)",
                         (unsigned long long)v->v.u, LS_PROTO_VERSION);
            return LS_PROTO_E_BAD_VERSION;
        }
        const struct ls_mp_node *s = &d->nodes[ls_mp_map_get(d, 0, "stream")];
        if (!stream_name_ok(s->v.s, s->len)) {
            snprintf(why, whylen, "stream name is invalid: use 1 to %d characters of [A-Za-z0-9._-], not starting "
                     "with '.' and without '..'", LS_PROTO_MAX_STREAM_NAME);
            return LS_PROTO_E_BAD_STREAM;
        }
        static const char *const transports[] = LS_PROTO_TRANSPORTS;
        int t = ls_mp_map_get(d, 0, "transport");
        for (size_t i = 0; i < sizeof transports / sizeof transports[0]; i++)
            if (ls_mp_str_eq(d, (uint32_t)t, transports[i]))
                return NULL;
        snprintf(why, whylen, "transport is not one of the protocol's transports");
        return LS_PROTO_E_BAD_MESSAGE;
    }
    return NULL;
}

/* protocol.check_message: the map, a known "t", the required keys with their types (the table
 * generated from protocol._SCHEMA), then check_rules. Returns the kind (enum ls_msg_kind) or
 * -EPROTO with `why` filled in and *code the protocol error code (E_BAD_MESSAGE, ...). */
static int check_message(const struct ls_mp_doc *d, const char **code, char *why, size_t whylen)
{
    static const struct ls_msg_schema schema[] = LS_PROTO_SCHEMA;
    *code = LS_PROTO_E_BAD_MESSAGE;
    if (d->nodes[0].type != LS_MP_MAP) {
        snprintf(why, whylen, "control message is not a map");
        return -EPROTO;
    }
    int t = ls_mp_map_get(d, 0, "t");
    for (size_t k = 0; k < sizeof schema / sizeof schema[0]; k++) {
        if (!ls_mp_str_eq(d, (uint32_t)(t < 0 ? UINT32_MAX : (uint32_t)t), schema[k].name))
            continue;
        for (const struct ls_msg_field *f = schema[k].fields; f->key; f++) {
            int v = ls_mp_map_get(d, 0, f->key);
            if (f->type == LS_FIELD_INT ? !is_int(d, v) : !is_str(d, v)) {
                snprintf(why, whylen, "%s message needs '%s' of type %s", schema[k].name, f->key,
                         f->type == LS_FIELD_INT ? "int" : "str");
                return -EPROTO;
            }
        }
        const char *bad = check_rules(d, schema[k].kind, why, whylen);
        if (bad) {
            *code = bad;
            return -EPROTO;
        }
        return schema[k].kind;
    }
    snprintf(why, whylen, "unknown control message type");
    return -EPROTO;
}

/* A str node as a bounded C string (for messages). */
static const char *str_of(const struct ls_mp_doc *d, int i, char *buf, size_t size)
{
    if (!is_str(d, i)) {
        snprintf(buf, size, "?");
        return buf;
    }
    int n = d->nodes[i].len > INT_MAX ? INT_MAX : (int)d->nodes[i].len;
    snprintf(buf, size, "%.*s", n, d->nodes[i].v.s);
    return buf;
}

/* Take the first complete frame off p->rx into p->doc. Returns 1 (decoded), 0 (need more bytes)
 * or -EPROTO (garbage: the connection is unusable). */
static int next_frame(struct ls_producer *p, char *why, size_t whylen)
{
    if (p->rx_len < 4)
        return 0;
    int64_t n = ls_mp_frame_body_len(p->rx);
    if (n < 0) {
        snprintf(why, whylen, "control frame length is outside 1..%u", LS_MAX_CONTROL_MESSAGE);
        return -EPROTO;
    }
    if (p->rx_len < 4 + (size_t)n)
        return 0;
    int r = ls_mp_decode(p->rx + 4, (size_t)n, &p->doc);
    /* The doc points into rx: callers use it before the next next_frame, which compacts. Shift
     * lazily: remember how much to drop. */
    if (r < 0) {
        snprintf(why, whylen, "control frame is not valid msgpack");
        return r == -ENOMEM ? r : -EPROTO;
    }
    return 1;
}

static void consume_frame(struct ls_producer *p)
{
    size_t n = 4 + (size_t)ls_mp_frame_body_len(p->rx);
    memmove(p->rx, p->rx + n, p->rx_len - n);
    p->rx_len -= n;
}

int ls_check_control_frame(const void *buf, size_t len, char *why, size_t whylen)
{
    char w[256];
    const char *code = LS_PROTO_E_BAD_MESSAGE;
    int r;
    if (len < 4)
        return 0;
    int64_t n = ls_mp_frame_body_len(buf);
    if (n < 0) {
        snprintf(w, sizeof w, "control frame length is outside 1..%u", LS_MAX_CONTROL_MESSAGE);
        r = -EPROTO;
    } else if (len < 4 + (size_t)n) {
        return 0;
    } else {
        struct ls_mp_doc doc = {0};
        r = ls_mp_decode((const char *)buf + 4, (size_t)n, &doc);
        if (r == -ENOMEM)
            return r;
        if (r < 0)
            snprintf(w, sizeof w, "control frame is not valid msgpack");
        else
            r = check_message(&doc, &code, w, sizeof w);
        ls_mp_doc_free(&doc);
    }
    if (r < 0 && why && whylen)
        snprintf(why, whylen, "%s: %s", code, w);
    return r;
}

int ls_check_frame_header(const void *buf, size_t len, uint32_t max_payload)
{
    struct ls_frame_header h;
    if (len != sizeof h)
        return -EINVAL;
    memcpy(&h, buf, sizeof h);
    return ls_frame_check(&h, max_payload);
}

/* Receive what the socket has into rx. Returns bytes read (> 0), 0 on EOF, -errno. */
static int recv_some(struct ls_producer *p, int sock)
{
    if (p->rx_cap - p->rx_len < RECV_CHUNK) {
        /* Bounded: rx never holds more than one incomplete frame (<= 4 + LS_MAX_CONTROL_MESSAGE)
         * plus one chunk, as complete frames are consumed right away. */
        size_t cap = p->rx_cap ? p->rx_cap * 2 : 2 * RECV_CHUNK;
        while (cap - p->rx_len < RECV_CHUNK)
            cap *= 2;
        uint8_t *rx = realloc(p->rx, cap);
        if (!rx)
            return -ENOMEM;
        p->rx = rx;
        p->rx_cap = cap;
    }
    ssize_t r = recv(sock, p->rx + p->rx_len, RECV_CHUNK, MSG_DONTWAIT);
    if (r < 0)
        return -errno;
    p->rx_len += (size_t)r;
    return (int)r;
}

/* -- segments (lock held) ---------------------------------------------------------------------- */

/* ls_handover (or, with splice_in >= 0, ls_splice_batch from that pipe) without letting SIGPIPE
 * kill the process (see ls_producer.h). */
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
    int ret = splice_in >= 0 ? ls_splice_batch(p->pipe_w, splice_in, len, records, seq, p->timeout_ms)
                             : ls_handover(p->pipe_w, seg, len, records, seq, transport, p->timeout_ms);
    if (ret == -EPIPE && !was_blocked && !was_pending) {
        struct timespec zero = {0, 0};
        while (sigtimedwait(&pipe_set, NULL, &zero) < 0 && errno == EINTR)
            ;
    }
    if (!was_blocked)
        pthread_sigmask(SIG_SETMASK, &old, NULL);
    return ret;
}

static int usable_locked(struct ls_producer *p)
{
    if (p->stopping) {
        set_error(p, "the logsink daemon is shutting down; stream '%s' takes no more records", p->stream);
        return -ESHUTDOWN;
    }
    if (p->broken)
        return -p->broken; /* last_error already says why */
    return 0;
}

static void wake_background(struct ls_producer *p)
{
    uint64_t one = 1;
    if (write(p->wake_fd, &one, sizeof one) < 0) { /* non-blocking; a pending wake is enough */
    }
}

/* The connection stopped being usable (the daemon died, closed, or said a retriable ERROR). With
 * reconnect: end our data direction (a partial batch is discarded by the daemon and resent by
 * us), keep every unreleased batch queued, and let the background thread reconnect. Lock held. */
static void go_down_locked(struct ls_producer *p, const char *why)
{
    if (p->conn == CONN_DOWN)
        return;
    if (p->conn == CONN_UP)
        p->down_since_ms = now_ms();
    p->conn = CONN_DOWN;
    close_pipe_locked(p);
    snprintf(p->last_error, ERRLEN, "lost the logsink daemon (%s); reconnecting", why);
    pthread_cond_broadcast(&p->cond);
    signal_event(p);
    wake_background(p);
}

/* A handover failed. Returns what the caller returns: without reconnect the producer is broken
 * (-ECONNRESET, or -ETIMEDOUT for a pipe that stayed full); with reconnect 0 - the batch is
 * queued and goes out again on the next connection. Lock held. */
static int handover_failed_locked(struct ls_producer *p, int ret, const char *what)
{
    char why[ERRLEN];
    if (ret == -ETIMEDOUT)
        snprintf(why, sizeof why, "%s failed: the pipe stayed full for %d ms", what, p->timeout_ms);
    else
        snprintf(why, sizeof why, "%s failed: %s", what, strerror(-ret));
    if (p->reconnect) {
        go_down_locked(p, why);
        return 0;
    }
    /* A partial batch may be in the pipe: the stream is out of sync, so end it (the daemon
     * discards the partial batch) and make every later call fail loudly. */
    close_pipe_locked(p);
    fail_locked(p, ECONNRESET, why);
    return ret == -ETIMEDOUT ? ret : -ECONNRESET;
}

static struct batch *q_at(struct ls_producer *p, uint32_t i)
{
    return &p->q[p->qhead + i];
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
static void update_released_locked(struct ls_producer *p)
{
    p->released = p->qlen ? q_at(p, 0)->seq - 1 : p->seq;
}

/* One frame from the arena: `len` payload bytes at `payload` (its 32-byte header goes right before
 * it). copy_only: write(2)/plain send, so the bytes are copied before this returns. */
static int send_frame_locked(struct ls_producer *p, char *payload, uint32_t len, uint32_t nrec, uint64_t wire,
                             uint32_t segidx, int copy_only)
{
    char *hdr = payload - LS_FRAME_HEADER_SIZE;
    if (p->is_tcp)
        return handover_tcp_locked(p, hdr, len, nrec, wire, segidx, !copy_only);
    int transport = copy_only ? LS_TRANSPORT_COPY : p->transport;
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
 * payload, restored once write() has copied them). Returns 0 or -errno. */
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
        char saved[LS_FRAME_HEADER_SIZE];
        memcpy(saved, payload + off - LS_FRAME_HEADER_SIZE, sizeof saved);
        int r = send_frame_locked(p, payload + off, n, (uint32_t)ls_count_records(payload + off, n), p->wire + 1,
                                  (uint32_t)b->seg, 1);
        if (off)
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
static int pump_locked(struct ls_producer *p)
{
    while (p->conn == CONN_UP && p->qsent < p->qlen) {
        struct batch *b = q_at(p, p->qsent);
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
static int handover_current_locked(struct ls_producer *p)
{
    if (!p->active || !p->pos)
        return 0;
    if (!p->reconnect && p->pipe_w < 0) {
        if (p->broken)
            return -p->broken;
        set_error(p, "the data pipe is closed");
        return p->stopping ? -ESHUTDOWN : -ECONNRESET;
    }
    if (q_push_locked(p, (int32_t)p->cur, p->pos, p->nrec) < 0) {
        set_error(p, "out of memory queueing a batch");
        return -ENOMEM;
    }
    uint64_t seq = p->seq;
    p->st.batches++;
    p->st.records += p->nrec;
    p->st.bytes += p->pos;
    p->active = 0;
    p->pos = 0;
    p->nrec = 0;
    int ret = pump_locked(p);
    /* vmsplice: the pipe references the pages until the daemon releases seq. With reconnect every
     * transport keeps the segment until then (it may have to go again). Without: copy is free
     * now; zerocopy once its completions arrive (seg_zc), whatever the daemon says. */
    p->seg_seq[p->cur] = p->reconnect || p->transport == LS_TRANSPORT_VMSPLICE ? seq : 0;
    return ret;
}

#define TAKEN 1
#define DROPPED 0

/* Make the next segment in ring order current, or wait once for a release. Returns TAKEN (also
 * after a wait: the caller re-checks its condition, as another thread may have taken a segment
 * with room meanwhile), DROPPED, -EAGAIN (nonblock) or -ETIMEDOUT. */
static int next_segment_locked(struct ls_producer *p, int64_t deadline, int nonblock)
{
    uint32_t nxt = (p->cur + 1) % p->segments;
    if (p->is_tcp && p->seg_zc[nxt] > p->zc_done)
        (void)zc_reap_locked(p); /* completions may be waiting: look before we wait */
    if (p->seg_seq[nxt] <= p->released && (!p->is_tcp || p->seg_zc[nxt] <= p->zc_done)) {
        p->cur = nxt;
        p->seg_seq[nxt] = 0;
        p->active = 1;
        p->pos = 0;
        p->nrec = 0;
        return TAKEN;
    }
    if (p->on_full == LS_ON_FULL_DROP)
        return DROPPED;
    if (nonblock)
        return -EAGAIN;
    p->st.waits_for_release++;
    if (cond_wait_until(p, deadline) < 0) {
        set_error(p,
                  "all %u segments of stream '%s' are still pinned after %d ms: the daemon has not released "
                  "them (is it overloaded or stopped?)",
                  p->segments, p->stream, p->timeout_ms);
        return -ETIMEDOUT;
    }
    return TAKEN;
}

/* Make room for len <= capacity bytes in the current segment: TAKEN with *dst where they go,
 * DROPPED (on_full=drop, every segment pinned), or -errno. */
static int reserve_locked(struct ls_producer *p, size_t len, int nonblock, char **dst)
{
    int r;
    int64_t deadline = -2; /* computed on first wait */
    while (!p->active || p->pos + len > p->capacity) {
        if ((r = usable_locked(p)) < 0)
            return r;
        if (len > p->capacity)
            return -ERANGE; /* a reconnect made batches smaller while we waited: cut again */
        if ((r = handover_current_locked(p)) < 0)
            return r;
        if (deadline == -2)
            deadline = deadline_after(p->timeout_ms);
        r = next_segment_locked(p, deadline, nonblock);
        if (r == DROPPED || r < 0)
            return r;
    }
    if (!p->pos)
        p->filled_at_ms = now_ms();
    *dst = p->arena + (size_t)p->cur * p->segment_size + LS_FRAME_HEADER_SIZE + p->pos;
    return TAKEN;
}

/* Append len <= capacity bytes of whole records. Returns 0 (taken or dropped) or -errno. */
static int write_chunk_locked(struct ls_producer *p, const char *data, size_t len, int nonblock)
{
    char *dst;
    int r = reserve_locked(p, len, nonblock, &dst);
    if (r == DROPPED) {
        p->st.dropped_records += ls_count_records(data, len);
        return 0;
    }
    if (r < 0)
        return r;
    p->nrec += (uint32_t)ls_copy_records(dst, data, len);
    p->pos += (uint32_t)len;
    return 0;
}

/* Where the chunk starting at data[start] ends for a split write: one past its last '\n' within
 * capacity bytes. Returns the end offset, or 0 if one record is longer than the capacity. */
static size_t chunk_end(const char *data, size_t start, size_t len, size_t cap)
{
    if (len - start <= cap)
        return len;
    const char *cut = memrchr(data + start, '\n', cap);
    return cut ? (size_t)(cut - data) + 1 : 0;
}

static int do_write(struct ls_producer *p, const void *buf, size_t len, int nonblock)
{
    const char *data = buf;
    if (!p)
        return -EINVAL;
    if (forked(p))
        return -ECHILD;
    if (len == 0 || !data || data[len - 1] != '\n' || (nonblock && len > INT_MAX)) {
        pthread_mutex_lock(&p->lock);
        set_error(p, "write takes whole records: the data must be non-empty and end with '\\n' (a partial record "
                     "would tear a line)");
        pthread_mutex_unlock(&p->lock);
        return -EINVAL;
    }
    /* capacity changes (under the lock) only when a reconnect brings a smaller pipe. */
    uint32_t cap = __atomic_load_n(&p->capacity, __ATOMIC_RELAXED);
    if (len > cap) {
        /* Check every record fits before taking any, so -EMSGSIZE means nothing was written. */
        for (size_t s = 0, e; s < len; s = e)
            if ((e = chunk_end(data, s, len, cap)) == 0) {
                pthread_mutex_lock(&p->lock);
                set_error(p, "a record longer than the segment payload (%u bytes) cannot be sent: raise segment_size",
                          cap);
                pthread_mutex_unlock(&p->lock);
                return -EMSGSIZE;
            }
    }
    int r = 0;
    size_t done = 0;
    /* Each chunk takes the lock on its own, as client.py does: records stay whole and in order,
     * but another thread's records may land between two chunks of one large write. */
    while (done < len) {
        pthread_mutex_lock(&p->lock);
        size_t end = chunk_end(data, done, len, p->capacity);
        r = usable_locked(p);
        if (r == 0 && end == 0) {
            set_error(p, "a record longer than this connection's batch limit (%u bytes: a smaller pipe) cannot be sent",
                      p->capacity);
            r = -EMSGSIZE;
        }
        if (r == 0)
            r = write_chunk_locked(p, data + done, end - done, nonblock);
        pthread_mutex_unlock(&p->lock);
        if (r == -ERANGE)
            continue;
        if (r < 0)
            break;
        done = end;
    }
    if (nonblock)
        return r == -EAGAIN && done > 0 ? (int)done : r < 0 ? r : (int)len;
    return r;
}

int ls_producer_write(struct ls_producer *p, const void *data, size_t len)
{
    return do_write(p, data, len, 0);
}

/* "YYYY-mm-ddTHH:MM:SS.mmmZ" for a Unix time, as logsink.logging.JsonFormatter writes it (same
 * double arithmetic: int(created), int((created - sec) * 1000)). The second's text is cached. */
static size_t format_timestamp(struct ls_producer *p, double created, char *out)
{
    int64_t sec = (int64_t)created;
    if (sec != p->ts_sec || !p->ts_text[0]) {
        time_t t = (time_t)sec;
        struct tm tm;
        gmtime_r(&t, &tm);
        strftime(p->ts_text, sizeof p->ts_text, "%Y-%m-%dT%H:%M:%S", &tm);
        p->ts_sec = sec;
    }
    int ms = (int)((created - (double)sec) * 1000);
    return (size_t)snprintf(out, 40, "%s.%03dZ", p->ts_text, ms);
}

int ls_producer_write_log_json(struct ls_producer *p, double created, const char *level, size_t level_len,
                               const char *logger, size_t logger_len, const char *msg, size_t msg_len, const char *exc,
                               size_t exc_len)
{
    if (!p)
        return -EINVAL;
    if (forked(p))
        return -ECHILD;
    char ts[40];
    size_t ts_len;
    /* Reserve the worst case (every byte escaped as \u00XX) so rendering never runs out. */
    size_t worst = 6 * (32 + level_len + logger_len + msg_len + (exc ? exc_len : 0)) + 96;
    if (worst > __atomic_load_n(&p->capacity, __ATOMIC_RELAXED))
        return -EMSGSIZE;
    pthread_mutex_lock(&p->lock);
    ts_len = format_timestamp(p, created, ts);
    char *dst;
    int r = usable_locked(p);
    if (r == 0)
        r = reserve_locked(p, worst, 0, &dst);
    if (r == -ERANGE)
        r = -EMSGSIZE; /* the batch limit shrank under us: the caller renders it itself */
    if (r == DROPPED) {
        p->st.dropped_records++;
        r = 0;
    } else if (r == TAKEN) {
        size_t n = ls_render_log_json(dst, worst, ts, ts_len, level, level_len, logger, logger_len, msg, msg_len, exc,
                                      exc_len);
        p->pos += (uint32_t)n;
        p->nrec++;
        r = 0;
    }
    pthread_mutex_unlock(&p->lock);
    return r;
}

int ls_producer_splice_from(struct ls_producer *p, int fd, uint32_t nbytes, uint32_t records)
{
    if (!p || nbytes == 0 || records == 0)
        return -EINVAL;
    if (forked(p))
        return -ECHILD;
    if (p->is_tcp)
        return -EOPNOTSUPP; /* splice needs the local data pipe */
    pthread_mutex_lock(&p->lock);
    int r = usable_locked(p);
    if (r == 0)
        r = handover_current_locked(p); /* what write() took before goes first */
    /* A spliced batch goes out now or never (it is not in the arena): wait for a connection
     * whose queue is all sent (the background thread resends it under the lock). */
    int64_t deadline = deadline_after(p->timeout_ms);
    while (r == 0 && p->reconnect && (p->conn != CONN_UP || p->qsent < p->qlen) && !p->broken && !p->closed) {
        if (cond_wait_until(p, deadline) < 0) {
            set_error(p, "no connection to the logsink daemon within %d ms to splice a batch", p->timeout_ms);
            r = -ETIMEDOUT;
        }
    }
    if (r == 0 && (r = usable_locked(p)) == 0 && p->pipe_w < 0) {
        set_error(p, "the data pipe is closed");
        r = -ECONNRESET;
    }
    if (r == 0) {
        r = handover_nosigpipe_from(p, fd, NULL, nbytes, records, p->wire + 1, LS_TRANSPORT_COPY);
        if (r < 0) {
            char why[ERRLEN];
            snprintf(why, sizeof why, "splicing a batch to the daemon failed: %s", strerror(-r));
            int ret = handover_failed_locked(p, r, "splicing a batch to the daemon");
            /* Its bytes left the input pipe: with or without reconnect they are lost. */
            set_error(p, "%s", why);
            r = ret < 0 ? ret : -ECONNRESET;
        } else if (q_push_locked(p, -1, nbytes, records) < 0) {
            set_error(p, "out of memory queueing a batch");
            r = -ENOMEM;
        } else {
            /* No segment: nothing to pin, the kernel copied into the pipe. */
            q_at(p, p->qlen - 1)->wire_last = ++p->wire;
            p->qsent++;
            p->st.batches++;
            p->st.records += records;
            p->st.bytes += nbytes;
        }
    }
    pthread_mutex_unlock(&p->lock);
    return r;
}

int ls_producer_try_write(struct ls_producer *p, const void *data, size_t len)
{
    return do_write(p, data, len, 1);
}

/* -- flush ------------------------------------------------------------------------------------- */

static int flush_start_locked(struct ls_producer *p, uint64_t *target)
{
    if (p->broken)
        return -p->broken;
    int r = handover_current_locked(p);
    if (r < 0)
        return r;
    *target = p->seq;
    return 0;
}

static int flush_check_locked(struct ls_producer *p, uint64_t target)
{
    if (p->released < target)
        return p->broken ? -p->broken : -EAGAIN;
    if (p->failed_pending) {
        set_error(p, "the logsink daemon could not write %llu batch(es) of stream '%s' (first: %s)",
                  (unsigned long long)p->failed_pending, p->stream, p->failed_first);
        p->failed_pending = 0;
        return -EIO;
    }
    return 0;
}

int ls_producer_flush_start(struct ls_producer *p, uint64_t *target)
{
    if (forked(p))
        return -ECHILD;
    pthread_mutex_lock(&p->lock);
    int r = flush_start_locked(p, target);
    pthread_mutex_unlock(&p->lock);
    return r;
}

int ls_producer_flush_check(struct ls_producer *p, uint64_t target)
{
    if (forked(p))
        return -ECHILD;
    pthread_mutex_lock(&p->lock);
    int r = flush_check_locked(p, target);
    pthread_mutex_unlock(&p->lock);
    return r;
}

int ls_producer_flush(struct ls_producer *p, int timeout_ms)
{
    if (forked(p))
        return -ECHILD;
    int64_t deadline = deadline_after(timeout_ms);
    uint64_t target = 0;
    pthread_mutex_lock(&p->lock);
    int r = flush_start_locked(p, &target);
    while (r == 0 && (r = flush_check_locked(p, target)) == -EAGAIN) {
        if (cond_wait_until(p, deadline) < 0) {
            set_error(p, "flush of stream '%s' not confirmed within %d ms", p->stream, timeout_ms);
            r = -ETIMEDOUT;
        } else
            r = 0;
    }
    pthread_mutex_unlock(&p->lock);
    return r;
}

uint64_t ls_producer_released(struct ls_producer *p)
{
    if (forked(p))
        return 0;
    pthread_mutex_lock(&p->lock);
    uint64_t r = p->released;
    pthread_mutex_unlock(&p->lock);
    return r;
}

int ls_producer_event_fd(struct ls_producer *p)
{
    return forked(p) ? -ECHILD : p->event_fd;
}

/* -- background thread ------------------------------------------------------------------------- */

/* ERROR codes worth a reconnect (protocol.RETRIABLE_CODES): the daemon is stopping, full, or
 * failed on its side. The rest (forbidden, bad-stream, auth: the answer will not change;
 * bad-frame, bad-message, bad-fd, bad-version, too-many-fds: our bug; file-refused: the operator
 * must fix the file; codes this client does not know) end the producer. */
static int retriable_code(const char *code)
{
    static const char *const retriable[] = LS_PROTO_RETRIABLE_CODES;
    for (size_t i = 0; i < sizeof retriable / sizeof retriable[0]; i++)
        if (strcmp(code, retriable[i]) == 0)
            return 1;
    return 0;
}

/* Act on one control message (p->doc). Lock held. Returns 0 or -EPROTO (why filled in). */
static int on_message_locked(struct ls_producer *p, char *why, size_t whylen)
{
    const struct ls_mp_doc *d = &p->doc;
    const char *code_unused;
    int kind = check_message(d, &code_unused, why, whylen);
    if (kind < 0)
        return kind;
    if (kind == LS_MSG_RELEASE) {
        const struct ls_mp_node *t = &d->nodes[ls_mp_map_get(d, 0, "through")];
        uint64_t through = t->type == LS_MP_UINT ? t->v.u : t->v.i < 0 ? 0 : (uint64_t)t->v.i;
        int f = ls_mp_map_get(d, 0, "failed");
        uint32_t nfailed = 0;
        if (f >= 0) {
            /* [[seq, code, reason], ...]: batches that were NOT written (check_message checked the shape). */
            nfailed = d->nodes[f].len;
            uint32_t e = (uint32_t)f + 1;
            for (uint32_t i = 0; i < nfailed; i++, e = d->nodes[e].next) {
                if (i == 0 && p->failed_pending == 0) {
                    char code[64], reason[256];
                    uint32_t c = d->nodes[e + 1].next, r = d->nodes[c].next;
                    const struct ls_mp_node *s = &d->nodes[e + 1];
                    snprintf(p->failed_first, ERRLEN, "seq %llu: %s: %s",
                             s->type == LS_MP_UINT ? (unsigned long long)s->v.u : (unsigned long long)s->v.i,
                             str_of(d, (int)c, code, sizeof code), str_of(d, (int)r, reason, sizeof reason));
                }
            }
        }
        /* `through` counts this connection's frames: pop the batches whose (last) frame it covers. */
        while (p->qsent > 0 && q_at(p, 0)->wire_last <= through) {
            p->qhead++;
            p->qlen--;
            p->qsent--;
        }
        if (!p->qlen)
            p->qhead = 0;
        update_released_locked(p);
        p->failed_pending += nfailed;
        p->st.failed_batches += nfailed;
        pthread_cond_broadcast(&p->cond);
        signal_event(p);
    } else if (kind == LS_MSG_SHUTDOWN) {
        /* Hand over what we hold and end the pipe: the daemon drains it before it exits. With
         * reconnect, keep reading RELEASEs until the daemon closes, then reconnect. */
        if (p->reconnect) {
            if (p->conn == CONN_UP) {
                if (p->pos && !p->broken)
                    (void)handover_current_locked(p);
                if (p->conn == CONN_UP) {
                    p->conn = CONN_DRAINING;
                    p->down_since_ms = now_ms();
                    snprintf(p->last_error, ERRLEN, "the logsink daemon is shutting down; will reconnect");
                }
                close_pipe_locked(p);
            }
        } else {
            p->stopping = 1;
            if (p->pos && !p->broken)
                (void)handover_current_locked(p); /* a failure marks us broken */
            close_pipe_locked(p);
        }
        pthread_cond_broadcast(&p->cond);
        signal_event(p);
    } else if (kind == LS_MSG_ERROR) {
        char code[64], reason[400], msg[ERRLEN];
        snprintf(msg, sizeof msg, "the logsink daemon closed this producer: %s: %s",
                 str_of(d, ls_mp_map_get(d, 0, "code"), code, sizeof code),
                 str_of(d, ls_mp_map_get(d, 0, "reason"), reason, sizeof reason));
        if (p->reconnect && retriable_code(code)) {
            go_down_locked(p, msg);
            return 0;
        }
        if (!p->broken && !p->closed) {
            p->broken = ECONNRESET;
            snprintf(p->last_error, ERRLEN, "%s", msg);
        }
        pthread_cond_broadcast(&p->cond);
        signal_event(p);
    }
    /* welcome, status, hello: valid messages a producer has no use for here; ignored. */
    return 0;
}

/* Decode and act on every complete frame in rx. Lock held. Returns 0 or -EPROTO/-ENOMEM. */
static int drain_frames_locked(struct ls_producer *p)
{
    char why[256];
    int r;
    while ((r = next_frame(p, why, sizeof why)) == 1) {
        r = on_message_locked(p, why, sizeof why);
        consume_frame(p);
        if (r < 0)
            break;
    }
    if (r < 0) {
        char msg[ERRLEN];
        snprintf(msg, sizeof msg, "the daemon sent a bad control message: %s", r == -ENOMEM ? "out of memory" : why);
        lost_locked(p, msg);
        return r;
    }
    return 0;
}

/* The connection ended or failed under us: reconnect, or (reconnect = 0) break for good. */
static void conn_lost_locked(struct ls_producer *p, const char *why)
{
    if (p->reconnect && !p->closed)
        go_down_locked(p, p->conn == CONN_DRAINING ? "the daemon shut down" : why);
    else
        lost_locked(p, why);
}

/* How long a dead TCP connection may take to post its zerocopy completions before we give up on
 * the segments it references (after the abort below they come at once; a wedged NIC queue could
 * hold them). */
#define ZC_TEARDOWN_WAIT_MS 10000

/* Close the lost connection. Lock held; may drop it while waiting for zerocopy completions. */
static void teardown_locked(struct ls_producer *p)
{
    if (p->sock >= 0) {
        /* RELEASEs the daemon sent before it went: fewer batches to resend. */
        while (!p->broken && recv_some(p, p->sock) > 0)
            if (drain_frames_locked(p) < 0)
                break;
        close_pipe_locked(p);
        if (p->is_tcp && p->zc_done != p->zc_next) {
            /* A page a zerocopy send referenced must not be rewritten (the resend renumbers its
             * header) before the kernel lets go of it: abort the connection (connect AF_UNSPEC
             * purges the send queue) and wait for the completions that follow. */
            struct sockaddr sa = {.sa_family = AF_UNSPEC};
            (void)!connect(p->sock, &sa, sizeof sa);
            int64_t deadline = now_ms() + ZC_TEARDOWN_WAIT_MS;
            for (;;) {
                (void)zc_reap_locked(p);
                if (p->closed || p->zc_done == p->zc_next)
                    break;
                if (now_ms() > deadline) {
                    fail_locked(p, ECONNRESET,
                                "a lost TCP connection never completed its zerocopy sends: the segments they "
                                "reference cannot be reused safely");
                    break;
                }
                pthread_mutex_unlock(&p->lock);
                struct pollfd pfd = {.fd = p->sock, .events = 0}; /* POLLERR: the error queue */
                (void)poll(&pfd, 1, 100);
                pthread_mutex_lock(&p->lock);
            }
        }
        close(p->sock);
        p->sock = -1;
    }
    p->rx_len = 0;
}

/* Every record of the queued batches fits a batch of `cap` bytes (a batch larger than cap is cut
 * at record boundaries). Returns 0, or the length of a record that does not fit. */
static uint32_t queue_unfit_locked(struct ls_producer *p, uint32_t cap)
{
    for (uint32_t i = 0; i < p->qlen; i++) {
        struct batch *b = q_at(p, i);
        if (b->seg < 0 || b->len <= cap)
            continue;
        const char *payload = p->arena + (size_t)b->seg * p->segment_size + LS_FRAME_HEADER_SIZE;
        for (uint32_t off = 0; b->len - off > cap;) {
            const char *cut = memrchr(payload + off, '\n', cap);
            if (!cut) {
                const char *end = memchr(payload + off, '\n', b->len - off);
                return end ? (uint32_t)(end - (payload + off)) + 1 : b->len - off;
            }
            off = (uint32_t)(cut - payload) + 1;
        }
    }
    return 0;
}

/* Batches moved by splice_from are not in the arena: a lost connection took them. Say so (flush
 * reports -EIO) and drop them from the queue. */
static void drop_spliced_locked(struct ls_producer *p)
{
    uint32_t keep = 0;
    for (uint32_t i = 0; i < p->qlen; i++) {
        struct batch *b = q_at(p, i);
        if (b->seg >= 0) {
            p->q[p->qhead + keep++] = *b;
            continue;
        }
        p->st.lost_batches++;
        p->st.failed_batches++;
        if (p->failed_pending++ == 0)
            snprintf(p->failed_first, ERRLEN,
                     "seq %llu: lost: %u records moved by splice were in flight when the connection was lost",
                     (unsigned long long)b->seq, b->nrec);
    }
    p->qlen = keep;
    update_released_locked(p);
}

/* CONN_DOWN: reconnect with backoff, then resend the queue. Returns with the producer CONN_UP,
 * broken (a non-retriable refusal) or closed. Lock held; dropped while waiting and connecting. */
static void reconnect_locked(struct ls_producer *p)
{
    teardown_locked(p);
    int backoff = BACKOFF_FIRST_MS;
    while (!p->closed && !p->broken) {
        int wait = backoff / 2 + (int)(rand_r(&p->rand_state) % (unsigned)(backoff / 2 + 1));
        pthread_mutex_unlock(&p->lock);
        struct pollfd pfd = {.fd = p->wake_fd, .events = POLLIN};
        uint64_t v;
        if (poll(&pfd, 1, wait) > 0 && read(p->wake_fd, &v, sizeof v) < 0) {
        }
        struct conn_parts c;
        int r = __atomic_load_n(&p->closed, __ATOMIC_RELAXED) ? -ECANCELED : connect_once(p, &c);
        pthread_mutex_lock(&p->lock);
        uint32_t unfit = 0;
        if (r == 0 && (p->closed || p->broken || (unfit = queue_unfit_locked(p, c.capacity)) != 0)) {
            close(c.sock);
            close(c.pipe_w);
            if (p->closed || p->broken)
                break;
            set_error(NULL,
                      "a waiting record of %u bytes does not fit this connection's batches of %u bytes (a smaller "
                      "pipe: the uid's pipe-user-pages-soft budget?)",
                      unfit, c.capacity);
            r = -EMSGSIZE;
        }
        if (r == 0) {
            drop_spliced_locked(p);
            install_conn_locked(p, &c);
            p->st.reconnects++;
            p->down_total_ms += (uint64_t)(now_ms() - p->down_since_ms);
            p->last_error[0] = '\0';
            (void)pump_locked(p); /* the resend: every unreleased batch, in order, renumbered */
            if (p->conn == CONN_UP) {
                (void)drain_frames_locked(p); /* anything that came right after WELCOME */
                pthread_cond_broadcast(&p->cond);
                signal_event(p);
                return;
            }
            teardown_locked(p); /* lost again during the resend */
            backoff = BACKOFF_FIRST_MS;
            continue;
        }
        if (r == -ECANCELED)
            break;
        if (r == -EACCES || r == -EPERM || (r == -ECONNREFUSED && p->refused_code[0] && !retriable_code(p->refused_code))) {
            /* The answer will not change: forbidden, a squatter on the socket path, auth, ... */
            fail_locked(p, ECONNRESET, tls_open_error);
            signal_event(p);
            break;
        }
        snprintf(p->last_error, ERRLEN, "lost the logsink daemon; reconnecting: %.400s", tls_open_error);
        backoff = backoff * 2 > BACKOFF_MAX_MS ? BACKOFF_MAX_MS : backoff * 2;
    }
}

static void *background(void *arg)
{
    struct ls_producer *p = arg;
    int interval = p->flush_interval_ms;
    pthread_mutex_lock(&p->lock);
    (void)drain_frames_locked(p); /* anything that arrived with WELCOME */
    for (;;) {
        if (p->closed || p->broken)
            break;
        if (p->conn == CONN_DOWN) {
            reconnect_locked(p);
            continue;
        }
        int wait = -1;
        if (interval > 0) {
            wait = interval;
            if (p->conn == CONN_UP && p->active && p->pos) {
                int64_t left = p->filled_at_ms + interval - now_ms();
                if (left <= 0) {
                    (void)handover_current_locked(p); /* a failure marks us broken or down */
                    continue;
                }
                wait = (int)left;
            }
        }
        int sock = p->sock; /* only this thread replaces it */
        pthread_mutex_unlock(&p->lock);
        struct pollfd pfd[2] = {{.fd = sock, .events = POLLIN}, {.fd = p->wake_fd, .events = POLLIN}};
        int pr = poll(pfd, 2, wait);
        int got = 0;
        uint64_t v;
        if (pr > 0 && pfd[1].revents && read(p->wake_fd, &v, sizeof v) < 0) {
        }
        if (pr > 0 && (pfd[0].revents & (POLLIN | POLLHUP)))
            got = recv_some(p, sock); /* only this thread touches rx after open */
        else if (pr > 0)
            got = -EAGAIN; /* the error queue (zerocopy completions), or only a wakeup */
        pthread_mutex_lock(&p->lock);
        if (p->closed)
            break;
        if (p->is_tcp && pr > 0 && (pfd[0].revents & POLLERR)) {
            if (zc_reap_locked(p) < 0) {
                conn_lost_locked(p, "the TCP connection to the logsink daemon failed");
                continue;
            }
            signal_event(p);
        }
        if (pr < 0 && errno != EINTR) {
            conn_lost_locked(p, "polling the control socket failed");
        } else if (pr > 0) {
            if (got == 0) {
                conn_lost_locked(p, "the logsink daemon closed the connection");
            } else if (got < 0 && got != -EAGAIN && got != -EINTR) {
                char msg[ERRLEN];
                snprintf(msg, sizeof msg, "control socket error: %s", strerror(-got));
                conn_lost_locked(p, msg);
            } else if (got > 0)
                (void)drain_frames_locked(p);
        }
    }
    pthread_mutex_unlock(&p->lock);
    return NULL;
}

/* -- open / close ------------------------------------------------------------------------------ */

static void destroy(struct ls_producer *p, int in_child)
{
    if (p->sock >= 0)
        close(p->sock);
    if (p->pipe_w >= 0)
        close(p->pipe_w);
    if (p->event_fd >= 0)
        close(p->event_fd);
    if (p->wake_fd >= 0)
        close(p->wake_fd);
    /* In a forked child the arena is not mapped (MADV_DONTFORK): its range may hold the child's
     * own memory by now, so never unmap it there. */
    if (p->arena && !in_child)
        ls_arena_unmap(p->arena, p->arena_size);
    if (!in_child) {
        /* In a child the mutex may have been copied locked by a thread that does not exist there. */
        pthread_cond_destroy(&p->cond);
        pthread_mutex_destroy(&p->lock);
    }
    free(p->seg_seq);
    free(p->seg_zc);
    free(p->q);
    free(p->rx);
    ls_mp_doc_free(&p->doc);
    free(p);
}

static const char *transport_name(int t)
{
    return t == LS_TRANSPORT_VMSPLICE ? "vmsplice" : t == LS_TRANSPORT_ZEROCOPY ? "zerocopy" : "copy";
}

static int send_hello(struct ls_producer *p, int sock, int rfd, int pipe_size)
{
    uint8_t buf[1024];
    struct ls_mp_enc e;
    const char *token = p->is_tcp ? getenv("LOGSINK_TOKEN") : NULL;
    if (token && strlen(token) > 512)
        token = NULL;
    ls_mp_frame_begin(&e, buf, sizeof buf);
    ls_mp_put_map(&e, token ? 8 : 7);
    ls_mp_put_cstr(&e, "t");
    ls_mp_put_cstr(&e, "hello");
    ls_mp_put_cstr(&e, "v");
    ls_mp_put_int(&e, 1);
    ls_mp_put_cstr(&e, "stream");
    ls_mp_put_cstr(&e, p->stream);
    ls_mp_put_cstr(&e, "pid");
    ls_mp_put_int(&e, getpid());
    ls_mp_put_cstr(&e, "transport");
    ls_mp_put_cstr(&e, transport_name(p->transport));
    ls_mp_put_cstr(&e, "segment_size");
    ls_mp_put_uint(&e, p->segment_size);
    ls_mp_put_cstr(&e, "pipe_size");
    ls_mp_put_int(&e, pipe_size);
    if (token) {
        ls_mp_put_cstr(&e, "token");
        ls_mp_put_cstr(&e, token);
    }
    int64_t n = ls_mp_frame_finish(&e);
    if (n < 0)
        return (int)n;
    if (rfd < 0) { /* TCP: no fd to pass */
        for (size_t done = 0; done < (size_t)n;) {
            ssize_t r = send(sock, buf + done, (size_t)n - done, MSG_NOSIGNAL);
            if (r < 0 && errno == EINTR)
                continue;
            if (r < 0)
                return errno == EAGAIN ? -ETIMEDOUT : -errno;
            done += (size_t)r;
        }
        return 0;
    }

    union {
        char buf[CMSG_SPACE(sizeof(int))];
        struct cmsghdr align;
    } ctl;
    memset(&ctl, 0, sizeof ctl);
    struct iovec iov = {.iov_base = buf, .iov_len = (size_t)n};
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = ctl.buf, .msg_controllen = sizeof ctl.buf};
    struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(c), &rfd, sizeof rfd);
    size_t done = 0;
    while (done < (size_t)n) {
        ssize_t r = done ? send(sock, buf + done, (size_t)n - done, MSG_NOSIGNAL)
                         : sendmsg(sock, &msg, MSG_NOSIGNAL); /* the fd rides on the first byte */
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0)
            return errno == EAGAIN ? -ETIMEDOUT : -errno; /* SO_SNDTIMEO expired */
        done += (size_t)r;
    }
    return 0;
}

/* Wait for the answer to HELLO. Returns 0 (WELCOME), -ECONNREFUSED (ERROR: its code in
 * p->refused_code), -EACCES (ERROR forbidden), -ETIMEDOUT, -EPROTO, -ECONNRESET (closed),
 * -ECANCELED (the producer is being closed); tls_open_error says which. */
static int await_welcome(struct ls_producer *p, struct conn_parts *c, const char *path)
{
    int64_t deadline = now_ms() + LS_CONNECT_TIMEOUT_MS;
    char why[256];
    for (;;) {
        int r = next_frame(p, why, sizeof why);
        if (r == 1) {
            const char *code_unused;
            int kind = check_message(&p->doc, &code_unused, why, sizeof why);
            if (kind == LS_MSG_WELCOME) {
                const struct ls_mp_node *id = &p->doc.nodes[ls_mp_map_get(&p->doc, 0, "producer")];
                c->producer_id = id->type == LS_MP_UINT ? (int64_t)id->v.u : id->v.i;
                str_of(&p->doc, ls_mp_map_get(&p->doc, 0, "engine"), c->engine, sizeof c->engine);
                /* The daemon refuses a batch larger than it can hold whole before writing it (a
                 * stalled producer must never hold a stream): obey its max_batch. */
                int mb = ls_mp_map_get(&p->doc, 0, "max_batch");
                if (is_int(&p->doc, mb)) {
                    const struct ls_mp_node *n = &p->doc.nodes[mb];
                    int64_t v = n->type == LS_MP_UINT ? (n->v.u > INT64_MAX ? INT64_MAX : (int64_t)n->v.u) : n->v.i;
                    if (v >= 1 && v < (int64_t)c->capacity)
                        c->capacity = (uint32_t)v;
                }
                consume_frame(p);
                return 0;
            }
            if (kind == LS_MSG_ERROR) {
                char code[64], reason[400];
                set_error(NULL, "logsink daemon at %s refused stream '%s': %s: %s", path, p->stream,
                          str_of(&p->doc, ls_mp_map_get(&p->doc, 0, "code"), code, sizeof code),
                          str_of(&p->doc, ls_mp_map_get(&p->doc, 0, "reason"), reason, sizeof reason));
                snprintf(p->refused_code, sizeof p->refused_code, "%s", code);
                consume_frame(p);
                /* forbidden: the access rules say no; retrying will not help, unlike a busy daemon */
                return strcmp(code, LS_PROTO_E_FORBIDDEN) == 0 ? -EACCES : -ECONNREFUSED;
            }
            if (kind >= 0)
                snprintf(why, sizeof why, "unexpected message instead of WELCOME");
            r = -EPROTO;
        }
        if (r < 0) {
            set_error(NULL, "logsink daemon at %s did not answer HELLO properly: %s", path, why);
            return r;
        }
        int64_t left = deadline - now_ms();
        if (left <= 0) {
            set_error(NULL, "logsink daemon at %s did not answer HELLO within %d ms", path, LS_CONNECT_TIMEOUT_MS);
            return -ETIMEDOUT;
        }
        struct pollfd pfd[2] = {{.fd = c->sock, .events = POLLIN}, {.fd = p->wake_fd, .events = POLLIN}};
        int pr = poll(pfd, 2, (int)left);
        if (pr < 0 && errno != EINTR)
            return -errno;
        if (pr > 0 && pfd[1].revents && __atomic_load_n(&p->closed, __ATOMIC_RELAXED)) {
            set_error(NULL, "the producer was closed while connecting");
            return -ECANCELED;
        }
        if (pr <= 0 || !pfd[0].revents)
            continue;
        r = recv_some(p, c->sock);
        if (r == 0 || r == -ECONNRESET) {
            set_error(NULL, "logsink daemon at %s closed the connection during HELLO", path);
            return -ECONNRESET;
        }
        if (r < 0 && r != -EAGAIN && r != -EINTR) {
            set_error(NULL, "logsink daemon at %s: receiving WELCOME failed: %s", path, strerror(-r));
            return r;
        }
    }
}

/* Connect to tcp://HOST:PORT, enable SO_ZEROCOPY (zerocopy transport), send HELLO (no fd). */
static int open_tcp(struct ls_producer *p, const char *address, struct conn_parts *c)
{
    char host[256], port[16];
    const char *rest = address + 6, *colon = strrchr(rest, ':');
    if (!colon || colon == rest || (size_t)(colon - rest) >= sizeof host || strlen(colon + 1) >= sizeof port ||
        !colon[1]) {
        set_error(NULL, "address %s must look like tcp://HOST:PORT", address);
        return -EINVAL;
    }
    memcpy(host, rest, (size_t)(colon - rest));
    host[colon - rest] = '\0';
    if (host[0] == '[' && host[strlen(host) - 1] == ']') { /* [v6]:port */
        memmove(host, host + 1, strlen(host));
        host[strlen(host) - 1] = '\0';
    }
    strcpy(port, colon + 1);
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM}, *res = NULL;
    int g = getaddrinfo(host, port, &hints, &res);
    if (g != 0) {
        set_error(NULL, "cannot resolve %s: %s", address, gai_strerror(g));
        return -EHOSTUNREACH;
    }
    int r = -ECONNREFUSED;
    for (struct addrinfo *ai = res; ai; ai = ai->ai_next) {
        int s = socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC, ai->ai_protocol);
        if (s < 0) {
            r = -errno;
            continue;
        }
        struct timeval tv = {.tv_sec = LS_CONNECT_TIMEOUT_MS / 1000, .tv_usec = LS_CONNECT_TIMEOUT_MS % 1000 * 1000};
        (void)setsockopt(s, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
        if (connect(s, ai->ai_addr, ai->ai_addrlen) == 0) {
            c->sock = s;
            r = 0;
            break;
        }
        r = errno == EINPROGRESS || errno == EAGAIN ? -ETIMEDOUT : -errno;
        close(s);
    }
    freeaddrinfo(res);
    if (r < 0) {
        set_error(NULL, "cannot reach the logsink daemon at %s: %s", address, strerror(-r));
        return r;
    }
    int one = 1;
    (void)setsockopt(c->sock, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    /* (zc_ok = 0: the kernel refuses, every send goes copied) */
    c->zc_ok = p->transport == LS_TRANSPORT_ZEROCOPY && ls_zc_enable(c->sock) == 0;
    c->pipe_w = dup(c->sock); /* the "data pipe" of a TCP producer: closing it ends the data direction */
    c->pipe_size = 0;
    if (c->pipe_w < 0 || (r = send_hello(p, c->sock, -1, 0)) < 0) {
        r = c->pipe_w < 0 ? -errno : r;
        set_error(NULL, "logsink daemon at %s dropped the connection during HELLO: %s", address, strerror(-r));
        return r;
    }
    return 0;
}

static int check_daemon_uid(int sock, const char *path, int64_t expected_uid);

/* Connect to the local daemon at path, create the data pipe and send HELLO with its read end. */
static int open_unix(struct ls_producer *p, const char *path, struct conn_parts *c)
{
    int r;
    c->sock = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (c->sock < 0) {
        r = -errno;
        set_error(NULL, "socket(AF_UNIX) failed: %s", strerror(-r));
        return r;
    }
    /* AF_UNIX connect and sendmsg honour SO_SNDTIMEO: a daemon with a full backlog cannot hang us. */
    struct timeval tv = {.tv_sec = LS_CONNECT_TIMEOUT_MS / 1000, .tv_usec = LS_CONNECT_TIMEOUT_MS % 1000 * 1000};
    (void)setsockopt(c->sock, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    strcpy(addr.sun_path, path);
    while ((r = connect(c->sock, (struct sockaddr *)&addr, sizeof addr)) < 0 && errno == EINTR)
        ;
    if (r < 0) {
        r = errno == EAGAIN ? -ETIMEDOUT : -errno;
        set_error(NULL,
                  "cannot reach the logsink daemon at %s: %s; start it with `logsink serve` or point LOGSINK_SOCKET "
                  "at its socket",
                  path, strerror(-r));
        return r;
    }
    if ((r = check_daemon_uid(c->sock, path, p->expected_uid)) < 0)
        return r;
    int rfd;
    if ((r = ls_pipe_create(LS_DEFAULT_PIPE_SIZE, &rfd, &c->pipe_w, &c->pipe_size)) < 0) {
        set_error(NULL, "creating the data pipe failed: %s", strerror(-r));
        return r;
    }
    /* A batch (header + payload) must fit the pipe whole: the daemon starts writing a batch only
     * once all of it is queued, so a producer that stalls mid-batch holds nobody but itself.
     * Past the uid's pipe budget the pipe is 2 pages: batches shrink with it. */
    if ((uint32_t)c->pipe_size < p->segment_size)
        c->capacity = (uint32_t)c->pipe_size - LS_FRAME_HEADER_SIZE;
    r = send_hello(p, c->sock, rfd, c->pipe_size);
    close(rfd); /* the daemon holds the read end now */
    if (r < 0) {
        set_error(NULL, "logsink daemon at %s dropped the connection during HELLO: %s", path, strerror(-r));
        return r;
    }
    return 0;
}

/* One connection attempt: connect, HELLO, WELCOME. On failure nothing stays open. Uses p->rx and
 * p->doc (owned by open, then by the background thread). Returns 0 or -errno (tls_open_error). */
static int connect_once(struct ls_producer *p, struct conn_parts *c)
{
    memset(c, 0, sizeof *c);
    c->sock = c->pipe_w = -1;
    c->capacity = p->base_capacity;
    p->rx_len = 0;
    p->refused_code[0] = '\0';
    int r = p->is_tcp ? open_tcp(p, p->path, c) : open_unix(p, p->path, c);
    if (r == 0)
        r = await_welcome(p, c, p->path);
    if (r == 0 && fcntl(c->sock, F_SETFL, fcntl(c->sock, F_GETFL) | O_NONBLOCK) < 0) {
        r = -errno;
        set_error(NULL, "setting up the control socket failed: %s", strerror(-r));
    }
    if (r < 0) {
        if (c->sock >= 0)
            close(c->sock);
        if (c->pipe_w >= 0)
            close(c->pipe_w);
        c->sock = c->pipe_w = -1;
    }
    return r;
}

/* Take a fresh connection into use. Lock held (or no other thread yet). */
static void install_conn_locked(struct ls_producer *p, struct conn_parts *c)
{
    p->sock = c->sock;
    p->pipe_w = c->pipe_w;
    p->pipe_size = c->pipe_size;
    __atomic_store_n(&p->capacity, c->capacity, __ATOMIC_RELAXED);
    p->producer_id = c->producer_id;
    memcpy(p->engine, c->engine, sizeof p->engine);
    /* A new socket counts zerocopy notifications from 0. */
    p->zc_on = c->zc_ok && !p->st.zc_switched_to_copy;
    if (p->is_tcp && p->transport == LS_TRANSPORT_ZEROCOPY && !c->zc_ok)
        p->st.zc_switched_to_copy = 1; /* the kernel refuses: every send goes copied */
    p->zc_next = p->zc_done = 0;
    p->zc_npending = 0;
    p->zc_copied_run = 0;
    memset(p->seg_zc, 0, p->segments * sizeof *p->seg_zc);
    p->wire = 0;
    p->qsent = 0;
    p->conn = CONN_UP;
}

static int check_opts(const struct ls_producer_opts *o)
{
    if (o->transport != 0 && o->transport != LS_TRANSPORT_VMSPLICE && o->transport != LS_TRANSPORT_COPY &&
        o->transport != LS_TRANSPORT_ZEROCOPY) {
        set_error(NULL, "transport %d is not LS_TRANSPORT_VMSPLICE, _ZEROCOPY or _COPY", o->transport);
        return -EINVAL;
    }
    if (o->segment_size < PAGE || o->segment_size % PAGE || o->segment_size > LS_MAX_BATCH_PAYLOAD) {
        set_error(NULL, "segment_size %u must be a multiple of %u between %u and %u", o->segment_size, PAGE, PAGE,
                  LS_MAX_BATCH_PAYLOAD);
        return -EINVAL;
    }
    if (o->segments < 1 || (uint64_t)o->segments * o->segment_size > ((uint64_t)1 << 40)) {
        set_error(NULL, "segments must be >= 1 (and the arena below 1 TiB), got %u", o->segments);
        return -EINVAL;
    }
    if (o->on_full != LS_ON_FULL_BLOCK && o->on_full != LS_ON_FULL_DROP) {
        set_error(NULL, "on_full %d is not LS_ON_FULL_BLOCK or LS_ON_FULL_DROP", o->on_full);
        return -EINVAL;
    }
    if (o->flush_interval_ms < 0) {
        set_error(NULL, "flush_interval_ms must be >= 0 (0 = no timed flush), got %d", o->flush_interval_ms);
        return -EINVAL;
    }
    if (o->expected_uid < -1 || o->expected_uid >= (int64_t)UINT32_MAX) {
        set_error(NULL, "expected_uid must be a uid (0 .. %u) or -1 (the caller's own), got %lld", UINT32_MAX - 1,
                  (long long)o->expected_uid);
        return -EINVAL;
    }
    return 0;
}

/* Refuse a daemon that runs as neither `expected_uid` (-1: our effective uid) nor root: a socket
 * path in a world-writable directory (/tmp) can be squatted by another user, who would then get
 * our records. Called right after connect, before anything is sent. Returns 0, -EPERM or -errno. */
static int check_daemon_uid(int sock, const char *path, int64_t expected_uid)
{
    struct ucred cred;
    socklen_t len = sizeof cred;
    uid_t want = expected_uid < 0 ? geteuid() : (uid_t)expected_uid;
    if (getsockopt(sock, SOL_SOCKET, SO_PEERCRED, &cred, &len) < 0) {
        int r = -errno;
        set_error(NULL, "cannot tell who runs the logsink daemon at %s (SO_PEERCRED): %s", path, strerror(-r));
        return r;
    }
    if (cred.uid == 0 || cred.uid == want)
        return 0;
    set_error(NULL,
              "the daemon at %s (pid %d) runs as uid %u, not uid %u or root: another user may have taken over the "
              "socket path, so nothing was sent; pass expected_uid=%u (C: ls_producer_opts.expected_uid) if that "
              "is intended",
              path, (int)cred.pid, (unsigned)cred.uid, (unsigned)want, (unsigned)cred.uid);
    return -EPERM;
}

int ls_producer_open(const char *stream, const char *socket_path, const struct ls_producer_opts *opts,
                     struct ls_producer **out)
{
    struct ls_producer_opts o;
    char path[sizeof(((struct sockaddr_un *)0)->sun_path)];
    int r;
    tls_open_error[0] = '\0';
    if (!out)
        return -EINVAL;
    *out = NULL;
    if (ls_validate_stream_name(stream) < 0) {
        set_error(NULL,
                  "stream name '%.80s' is invalid: use 1 to %d characters of [A-Za-z0-9._-], not starting with '.' "
                  "and without '..'",
                  stream ? stream : "(null)", LS_MAX_STREAM_NAME);
        return -EINVAL;
    }
    if (opts)
        o = *opts;
    else
        ls_producer_opts_init(&o);
    if ((r = check_opts(&o)) < 0)
        return r;
    int tcp = socket_path && strncmp(socket_path, "tcp://", 6) == 0;
    if (tcp) {
        if (strlen(socket_path) >= sizeof path) {
            set_error(NULL, "address %.200s is too long", socket_path);
            return -ENAMETOOLONG;
        }
        strcpy(path, socket_path);
        if (o.transport == LS_TRANSPORT_VMSPLICE || o.transport == 0)
            o.transport = LS_TRANSPORT_ZEROCOPY; /* vmsplice is local-only: the TCP equivalent */
    } else if (o.transport == LS_TRANSPORT_ZEROCOPY) {
        set_error(NULL, "transport zerocopy is for TCP addresses (tcp://HOST:PORT); AF_UNIX refuses SO_ZEROCOPY");
        return -EINVAL;
    } else if (socket_path) {
        if (strlen(socket_path) >= sizeof path) {
            set_error(NULL, "socket path %.200s is longer than %zu bytes (the AF_UNIX limit)", socket_path,
                      sizeof path - 1);
            return -ENAMETOOLONG;
        }
        strcpy(path, socket_path);
    } else if (ls_default_socket_path(path, sizeof path) < 0) {
        set_error(NULL, "the default socket path is longer than %zu bytes (the AF_UNIX limit)", sizeof path - 1);
        return -ENAMETOOLONG;
    }
    pthread_once(&atfork_once, register_atfork);

    struct ls_producer *p = calloc(1, sizeof *p);
    if (!p)
        return -ENOMEM;
    p->sock = p->pipe_w = p->event_fd = p->wake_fd = -1;
    p->fork_gen = __atomic_load_n(&fork_generation, __ATOMIC_RELAXED);
    snprintf(p->stream, sizeof p->stream, "%s", stream);
    snprintf(p->path, sizeof p->path, "%s", path);
    p->is_tcp = tcp;
    p->transport = o.transport ? o.transport : LS_TRANSPORT_VMSPLICE;
    p->on_full = o.on_full;
    p->timeout_ms = o.timeout_ms < 0 ? -1 : o.timeout_ms;
    p->flush_interval_ms = o.flush_interval_ms;
    p->zc_switch = o.zc_copied_switch;
    p->segment_size = o.segment_size;
    p->segments = o.segments;
    p->reconnect = o.reconnect != 0;
    p->expected_uid = o.expected_uid;
    p->base_capacity = o.segment_size - LS_FRAME_HEADER_SIZE;
    p->capacity = p->base_capacity;
    p->rand_state = (unsigned)getpid() ^ (unsigned)now_ms() ^ (unsigned)(uintptr_t)p;
    p->cur = o.segments - 1; /* the first segment taken is 0 */
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&p->cond, &ca);
    pthread_condattr_destroy(&ca);
    pthread_mutex_init(&p->lock, NULL);

    /* From here every failure ends at `fail`: destroy() releases whatever was set up so far (the
     * fds are -1 and the pointers NULL until then). */
    struct conn_parts c;
    void *arena;
    sigset_t all, old;
    p->seg_seq = calloc(o.segments, sizeof *p->seg_seq);
    p->seg_zc = calloc(o.segments, sizeof *p->seg_zc);
    if (!p->seg_seq || !p->seg_zc) {
        r = -ENOMEM;
        goto fail;
    }
    if ((r = connect_once(p, &c)) < 0)
        goto fail; /* connect_once said why */
    install_conn_locked(p, &c); /* no other thread yet */
    p->arena_size = (size_t)o.segments * o.segment_size;
    if ((r = ls_arena_map(p->arena_size, &arena)) < 0) {
        set_error(NULL, "mapping the segment arena (%zu bytes) failed: %s", p->arena_size, strerror(-r));
        goto fail;
    }
    p->arena = arena;
    p->event_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    p->wake_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (p->event_fd < 0 || p->wake_fd < 0) {
        r = -errno;
        set_error(NULL, "setting up the producer failed: %s", strerror(-r));
        goto fail;
    }
    /* The background thread runs with every signal blocked: signals go to the application's
     * threads, and a SIGPIPE from a handover it makes stays pending there, harmless. */
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    r = -pthread_create(&p->thread, NULL, background, p);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (r < 0) {
        set_error(NULL, "starting the producer thread failed: %s", strerror(-r));
        goto fail;
    }
    p->thread_started = 1;
    *out = p;
    return 0;

fail:
    destroy(p, 0);
    return r;
}

int ls_producer_close(struct ls_producer *p)
{
    return ls_producer_close_within(p, -1);
}

int ls_producer_close_within(struct ls_producer *p, int timeout_ms)
{
    if (!p)
        return 0;
    if (forked(p)) {
        destroy(p, 1);
        return -ECHILD;
    }
    pthread_mutex_lock(&p->lock);
    /* Closing: the shorter bound wins, for the final flush and any handover it makes. */
    if (timeout_ms >= 0 && (p->timeout_ms < 0 || timeout_ms < p->timeout_ms))
        p->timeout_ms = timeout_ms;
    int do_flush = !p->broken && !p->stopping;
    pthread_mutex_unlock(&p->lock);
    int ret = do_flush ? ls_producer_flush(p, p->timeout_ms) : 0;
    pthread_mutex_lock(&p->lock);
    __atomic_store_n(&p->closed, 1, __ATOMIC_RELAXED); /* also read by a connect in progress */
    close_pipe_locked(p);
    pthread_cond_broadcast(&p->cond);
    pthread_mutex_unlock(&p->lock);
    wake_background(p); /* its poll, a reconnect's backoff or HELLO wait */
    if (p->thread_started)
        pthread_join(p->thread, NULL);
    destroy(p, 0);
    return ret;
}

int ls_producer_stats(struct ls_producer *p, struct ls_producer_stats *out)
{
    if (forked(p))
        return -ECHILD;
    pthread_mutex_lock(&p->lock);
    *out = p->st;
    out->released_through = p->released;
    out->handed_over_through = p->seq;
    out->pinned_segments = 0;
    for (uint32_t i = 0; i < p->segments; i++)
        out->pinned_segments += p->seg_seq[i] > p->released;
    out->segment_size = p->segment_size;
    out->segments = p->segments;
    out->pipe_size = (uint64_t)p->pipe_size;
    out->connected = p->conn == CONN_UP && !p->broken && !p->stopping;
    out->disconnected_us = 1000 * (p->down_total_ms + (p->conn != CONN_UP ? (uint64_t)(now_ms() - p->down_since_ms) : 0));
    pthread_mutex_unlock(&p->lock);
    return 0;
}

const char *ls_producer_last_error(struct ls_producer *p)
{
    if (!p)
        return tls_open_error;
    if (forked(p))
        return "this producer belongs to the parent process: open a new one in the forked child";
    pthread_mutex_lock(&p->lock);
    memcpy(tls_error_copy, p->last_error, ERRLEN);
    pthread_mutex_unlock(&p->lock);
    return tls_error_copy;
}

int64_t ls_producer_info(struct ls_producer *p, char *engine, size_t engine_len)
{
    if (!p)
        return -EINVAL;
    if (engine && engine_len)
        snprintf(engine, engine_len, "%s", p->engine);
    return p->producer_id;
}

int ls_producer_usable(struct ls_producer *p)
{
    if (!p)
        return -EINVAL;
    if (forked(p))
        return -ECHILD;
    pthread_mutex_lock(&p->lock);
    int r = p->stopping ? -ESHUTDOWN : p->broken ? -p->broken : 0;
    pthread_mutex_unlock(&p->lock);
    return r;
}

int ls_producer_transport(struct ls_producer *p)
{
    if (!p)
        return -EINVAL;
    pthread_mutex_lock(&p->lock);
    int t = p->transport;
    pthread_mutex_unlock(&p->lock);
    return t;
}
