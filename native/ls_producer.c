/* ls_producer.c - a logsink producer in C (see ls_producer.h); a port of logsink/client.py.
 *
 * This file: the public API - options and the default socket path, open and close, write
 * (records into the current segment), flush, stats and errors - and the small helpers every part
 * shares (errors, wake-ups, the condition wait). The rest sits at its seams, described with the
 * shared state and the locking rules in ls_producer_int.h: ls_producer_send.c (segments, the batch
 * queue, handovers, zerocopy completions), ls_producer_msg.c (control messages: RELEASE, SHUTDOWN,
 * ERROR) and ls_producer_conn.c (connect, HELLO/WELCOME, the background thread, reconnects).
 */
#include "ls_producer_int.h"
#include "ls_frame.h"
#include "ls_msgpack.h"
#include "ls_render.h"
#include "ls_transport.h"

#include <errno.h>
#include <limits.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sched.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>
#include <linux/membarrier.h>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

#define PAGE 4096u

__thread char prod_open_error[ERRLEN]; /* why this thread's last ls_producer_open failed */
static __thread char tls_error_copy[ERRLEN]; /* what ls_producer_last_error(p) hands out */

/* Fork detection without a getpid() syscall per write: a child handler bumps the generation and a
 * producer opened under another generation belongs to an ancestor (prod_forked). */
unsigned long prod_fork_generation;
static pthread_once_t atfork_once = PTHREAD_ONCE_INIT;

static pthread_mutex_t fast_free_lock = PTHREAD_MUTEX_INITIALIZER; /* see "the single-writer fast path" */

static void on_fork_child(void)
{
    __atomic_add_fetch(&prod_fork_generation, 1, __ATOMIC_RELAXED);
    /* Another parent thread may have held it at fork(): it does not exist here to unlock it. */
    pthread_mutex_init(&fast_free_lock, NULL);
}

static void register_atfork(void)
{
    (void)pthread_atfork(NULL, NULL, on_fork_child);
}

/* -- small helpers ------------------------------------------------------------------------------ */

void prod_set_error(struct ls_producer *p, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(p ? p->last_error : prod_open_error, ERRLEN, fmt, ap);
    va_end(ap);
}

void prod_signal_event(struct ls_producer *p)
{
    uint64_t one = 1;
    /* Non-blocking; the counter cannot realistically reach its 2^64-2 limit. */
    if (write(p->event_fd, &one, sizeof one) < 0) {
    }
}

/* Wait on p->cond until deadline_ms (< 0: no deadline). Returns 0 or -ETIMEDOUT. */
int prod_cond_wait_until(struct ls_producer *p, int64_t deadline_ms)
{
    if (deadline_ms < 0) {
        pthread_cond_wait(&p->cond, &p->lock);
        return 0;
    }
    if (prod_now_ms() >= deadline_ms)
        return -ETIMEDOUT;
    struct timespec ts = {.tv_sec = deadline_ms / 1000, .tv_nsec = (deadline_ms % 1000) * 1000000};
    int r = pthread_cond_timedwait(&p->cond, &p->lock, &ts); /* cond uses CLOCK_MONOTONIC */
    return r == ETIMEDOUT ? -ETIMEDOUT : 0;
}

/* Mark the producer unusable (the first reason wins) and wake everyone. Lock held. */
void prod_fail_locked(struct ls_producer *p, int err, const char *why)
{
    if (!p->broken && !p->closed) {
        p->broken = err;
        snprintf(p->last_error, ERRLEN, "%s", why);
    }
    pthread_cond_broadcast(&p->cond);
    prod_wake_flusher_locked(p);
}

/* The connection ended or broke under the background thread: say so, and wake event loops. */
void prod_lost_locked(struct ls_producer *p, const char *why)
{
    prod_fail_locked(p, ECONNRESET, p->stopping ? "the logsink daemon shut down" : why);
    prod_signal_event(p);
}

void prod_close_pipe_locked(struct ls_producer *p)
{
    if (p->pipe_w >= 0) {
        if (p->is_tcp)
            shutdown(p->sock, SHUT_WR); /* pipe_w is a dup of the socket: end the data direction */
        close(p->pipe_w);
        p->pipe_w = -1;
    }
}

void prod_wake_background(struct ls_producer *p)
{
    uint64_t one = 1;
    if (write(p->wake_fd, &one, sizeof one) < 0) { /* non-blocking; a pending wake is enough */
    }
}

void prod_wake_flusher_locked(struct ls_producer *p)
{
    uint64_t one = 1;
    /* Set and cleared under the lock around its poll: the write lands before or during it. */
    if (p->rx_flusher_polling && write(p->flush_wake_fd, &one, sizeof one) < 0) {
    }
}

/* -- options ------------------------------------------------------------------------------------ */

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

static int check_opts(const struct ls_producer_opts *o)
{
    if (o->transport != 0 && o->transport != LS_TRANSPORT_VMSPLICE && o->transport != LS_TRANSPORT_COPY &&
        o->transport != LS_TRANSPORT_ZEROCOPY && o->transport != LS_TRANSPORT_SHM) {
        prod_set_error(NULL, "transport %d is not LS_TRANSPORT_VMSPLICE, _SHM, _ZEROCOPY or _COPY", o->transport);
        return -EINVAL;
    }
    if (o->segment_size < PAGE || o->segment_size % PAGE || o->segment_size > LS_MAX_BATCH_PAYLOAD) {
        prod_set_error(NULL, "segment_size %u must be a multiple of %u between %u and %u", o->segment_size, PAGE, PAGE,
                  LS_MAX_BATCH_PAYLOAD);
        return -EINVAL;
    }
    if (o->segments < 1 || (uint64_t)o->segments * o->segment_size > ((uint64_t)1 << 40)) {
        prod_set_error(NULL, "segments must be >= 1 (and the arena below 1 TiB), got %u", o->segments);
        return -EINVAL;
    }
    if (o->on_full != LS_ON_FULL_BLOCK && o->on_full != LS_ON_FULL_DROP) {
        prod_set_error(NULL, "on_full %d is not LS_ON_FULL_BLOCK or LS_ON_FULL_DROP", o->on_full);
        return -EINVAL;
    }
    if (o->flush_interval_ms < 0) {
        prod_set_error(NULL, "flush_interval_ms must be >= 0 (0 = no timed flush), got %d", o->flush_interval_ms);
        return -EINVAL;
    }
    if (o->expected_uid < -1 || o->expected_uid >= (int64_t)UINT32_MAX) {
        prod_set_error(NULL, "expected_uid must be a uid (0 .. %u) or -1 (the caller's own), got %lld", UINT32_MAX - 1,
                  (long long)o->expected_uid);
        return -EINVAL;
    }
    return 0;
}

/* -- copying records: one pass that copies and counts ------------------------------------------- */

/* memcpy, then one memchr call per record (ls_copy_records) costs ~14 ns of a 200-byte record's
 * ~45: the calls, not the bytes. With AVX2 one loop copies 32 bytes and counts their newlines. */
#if defined(__x86_64__)
__attribute__((target("avx2,popcnt"))) static size_t copy_count_avx2(char *dst, const char *src, size_t n)
{
    const __m256i nl = _mm256_set1_epi8('\n');
    size_t count = 0, i = 0;
    for (; i + 32 <= n; i += 32) {
        __m256i v = _mm256_loadu_si256((const __m256i *)(src + i));
        _mm256_storeu_si256((__m256i *)(dst + i), v);
        count += (size_t)__builtin_popcount((unsigned)_mm256_movemask_epi8(_mm256_cmpeq_epi8(v, nl)));
    }
    if (i < n) { /* the last 32 bytes again (n >= 32): count only the bits of the bytes not yet seen */
        size_t tail = n - i;
        __m256i v = _mm256_loadu_si256((const __m256i *)(src + n - 32));
        _mm256_storeu_si256((__m256i *)(dst + n - 32), v);
        unsigned m = (unsigned)_mm256_movemask_epi8(_mm256_cmpeq_epi8(v, nl));
        count += (size_t)__builtin_popcount(m >> (32 - tail));
    }
    return count;
}

static int have_avx2 = -1;
#endif

/* Copy n bytes of records to dst and return how many '\n' they hold. */
static inline size_t copy_records(char *dst, const char *src, size_t n)
{
#if defined(__x86_64__)
    if (n >= 32) {
        int avx2 = __atomic_load_n(&have_avx2, __ATOMIC_RELAXED);
        if (avx2 < 0) {
            __builtin_cpu_init();
            avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("popcnt");
            __atomic_store_n(&have_avx2, avx2, __ATOMIC_RELAXED);
        }
        if (avx2)
            return copy_count_avx2(dst, src, n);
    }
#endif
    if (n < 32) {
        size_t count = 0;
        for (size_t i = 0; i < n; i++)
            count += (dst[i] = src[i]) == '\n';
        return count;
    }
    return ls_copy_records(dst, src, n);
}

/* -- the single-writer fast path ------------------------------------------------------------------ *
 *
 * A mutex lock and unlock cost ~19 ns here, a 200-byte record's copy ~4: for one writer thread the
 * lock is most of the cost. So the thread that wrote last may own the current segment and append to
 * it with plain stores (fast_append). The lock holder takes it back (prod_fast_revoke_locked) with
 * an asymmetric barrier: the owner stores busy = 1 and then loads fast_owner with only a compiler
 * barrier between; the revoker stores fast_owner = NULL and runs membarrier(PRIVATE_EXPEDITED),
 * which makes every running thread of the process execute a full barrier. After it, either the
 * owner's busy = 1 is visible (the revoker waits for the release store of busy = 0, which publishes
 * pos and nrec) or the owner's load will see NULL and it takes the locked path. Without membarrier
 * (old kernels, seccomp) nobody is granted ownership and every write takes the lock. */

static pthread_once_t fast_once = PTHREAD_ONCE_INIT;
static int fast_ok;                     /* membarrier registered: ownership may be granted */
static pthread_key_t fast_key;          /* its destructor hands the thread's slot back */
static struct prod_fast_slot *fast_free; /* slots of threads that exited (under fast_free_lock) */
static __thread struct prod_fast_slot *tls_slot; /* the locked path's way to our slot */

/* Who we are, without TLS: fast_append runs in shared libraries (liblogsink.so, the Python
 * extension), where a __thread variable costs a __tls_get_addr call (initial-exec TLS would fail
 * dlopen once the static TLS block is used up). The thread pointer is unique among live threads. */
static inline uintptr_t fast_self(void)
{
#if defined(__has_builtin)
#if __has_builtin(__builtin_thread_pointer)
#define LS_HAVE_THREAD_POINTER 1
    return (uintptr_t)__builtin_thread_pointer();
#endif
#endif
#ifndef LS_HAVE_THREAD_POINTER
    return (uintptr_t)pthread_self();
#endif
}

/* Contended revokes back off: after one, the next this many slow writes do not take ownership
 * (doubling up to FAST_BACKOFF_MAX; cleared when an owner fills a segment alone). Two threads
 * writing one handle then mostly share the lock, as before, instead of paying a membarrier
 * (~0.3-1.5 us) per write. */
#define FAST_BACKOFF_MAX 65536u

static void fast_slot_release(void *v)
{
    struct prod_fast_slot *s = v; /* busy is 0: a thread is not in fast_append when it exits */
    /* Later key destructors of this thread may still write: they must not find a slot that is back on
     * the free list (another thread may take it and append while we revoke as if it were ours). */
    tls_slot = NULL;
    /* A later thread may get our thread pointer: it must not match a handle that still names us. */
    __atomic_store_n(&s->thread, 0, __ATOMIC_RELAXED);
    pthread_mutex_lock(&fast_free_lock);
    s->next_free = fast_free;
    fast_free = s;
    pthread_mutex_unlock(&fast_free_lock);
}

static void fast_init(void)
{
    if (pthread_key_create(&fast_key, fast_slot_release) != 0)
        return;
    fast_ok = syscall(SYS_membarrier, MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED, 0, 0) == 0;
}

/* This thread's slot (NULL: no fast path here). A slot is never freed: a handle may still name it. */
static struct prod_fast_slot *fast_my_slot(void)
{
    if (tls_slot)
        return tls_slot;
    pthread_once(&fast_once, fast_init);
    if (!fast_ok)
        return NULL;
    pthread_mutex_lock(&fast_free_lock);
    struct prod_fast_slot *s = fast_free;
    if (s)
        fast_free = s->next_free;
    pthread_mutex_unlock(&fast_free_lock);
    if (!s && posix_memalign((void **)&s, 64, sizeof *s) != 0)
        return NULL;
    s->busy = 0;
    s->next_free = NULL;
    if (pthread_setspecific(fast_key, s) != 0) {
        fast_slot_release(s);
        return NULL;
    }
    __atomic_store_n(&s->thread, fast_self(), __ATOMIC_RELAXED);
    tls_slot = s;
    return s;
}

/* A full barrier on every running thread of the process. fast_init registered us (a forked child
 * inherits the registration; should it ever be missing, register again, else take the global
 * command, which needs none). Without one a lock-free append could tear: no way on but abort. */
static void fast_barrier(void)
{
    if (syscall(SYS_membarrier, MEMBARRIER_CMD_PRIVATE_EXPEDITED, 0, 0) == 0)
        return;
    if (syscall(SYS_membarrier, MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED, 0, 0) == 0 &&
        syscall(SYS_membarrier, MEMBARRIER_CMD_PRIVATE_EXPEDITED, 0, 0) == 0)
        return;
    if (syscall(SYS_membarrier, MEMBARRIER_CMD_GLOBAL, 0, 0) == 0)
        return;
    static const char msg[] = "liblogsink: membarrier() failed after it had worked: cannot take a segment back safely\n";
    if (write(2, msg, sizeof msg - 1) < 0) {
    }
    abort();
}

void prod_fast_revoke_locked(struct ls_producer *p)
{
    struct prod_fast_slot *o = p->fast_owner;
    if (!o)
        return;
    __atomic_store_n(&p->fast_owner, NULL, __ATOMIC_RELAXED);
    if (o == tls_slot) { /* our own: we are here, not in fast_append; it filled a segment alone */
        p->fast_backoff = 0;
        return;
    }
    /* Pairs with the owner's busy = 1 ... fast_owner load in fast_append. */
    fast_barrier();
    while (__atomic_load_n(&o->busy, __ATOMIC_ACQUIRE)) /* pairs with fast_append's release */
        sched_yield();
    /* Another thread of the application wrote, flushed or logged: contention. (The background
     * thread's timed hand-overs are not: the owner simply takes the next segment back.) */
    if (!p->thread_started || !pthread_equal(pthread_self(), p->thread)) {
        p->fast_backoff = p->fast_backoff ? (p->fast_backoff * 2 > FAST_BACKOFF_MAX ? FAST_BACKOFF_MAX : p->fast_backoff * 2) : 16;
        p->fast_cooldown = p->fast_backoff;
    }
}

/* After a locked write of one chunk: let this thread append lock-free while the segment has room. */
static void fast_grant_locked(struct ls_producer *p, struct prod_fast_slot *me)
{
    if (!me || p->fast_owner || !p->active || !p->pos || p->broken || p->stopping)
        return;
    if (p->fast_cooldown) {
        p->fast_cooldown--;
        return;
    }
    __atomic_store_n(&p->fast_owner, me, __ATOMIC_RELAXED); /* our own next load sees it */
}

/* Append len bytes (whole records, len <= capacity) lock-free if this thread owns the current
 * segment and it has room. Returns 1 if done, 0 to take the locked path. */
static inline int fast_append(struct ls_producer *p, const char *data, size_t len)
{
    /* Our slot if we own the segment: a slot names its live thread only (cleared at thread exit),
     * so only we can match it and only we write its busy. */
    struct prod_fast_slot *me = __atomic_load_n(&p->fast_owner, __ATOMIC_RELAXED);
    if (!me || __atomic_load_n(&me->thread, __ATOMIC_RELAXED) != fast_self())
        return 0;
    __atomic_store_n(&me->busy, 1, __ATOMIC_RELAXED);
    __asm__ __volatile__("" ::: "memory"); /* the CPU barrier is the revoker's membarrier */
    int done = 0;
    /* broken and stopping are set under the lock (not always with a revoke): a write racing them
     * is one that came just before; the next one sees them and takes the locked path to say why. */
    if (__atomic_load_n(&p->fast_owner, __ATOMIC_RELAXED) == me && !__atomic_load_n(&p->broken, __ATOMIC_RELAXED) &&
        !__atomic_load_n(&p->stopping, __ATOMIC_RELAXED)) {
        uint32_t pos = p->pos; /* ours while we own the segment */
        if (pos + len <= __atomic_load_n(&p->capacity, __ATOMIC_RELAXED)) {
            char *dst = p->arena + (size_t)p->cur * p->segment_size + LS_FRAME_HEADER_SIZE + pos;
            uint32_t n = (uint32_t)copy_records(dst, data, len);
            __atomic_store_n(&p->nrec, p->nrec + n, __ATOMIC_RELAXED);
            __atomic_store_n(&p->pos, pos + (uint32_t)len, __ATOMIC_RELAXED);
            done = 1;
        }
    }
    __atomic_store_n(&me->busy, 0, __ATOMIC_RELEASE); /* publishes pos and nrec to a revoker */
    return done;
}

/* -- write ---------------------------------------------------------------------------------------- */

/* Append len <= capacity bytes of whole records. Returns 0 (taken or dropped) or -errno. */
static int write_chunk_locked(struct ls_producer *p, const char *data, size_t len, int nonblock)
{
    char *dst;
    int r = prod_reserve_locked(p, len, nonblock, &dst);
    if (r == PROD_DROPPED) {
        p->st.dropped_records += ls_count_records(data, len);
        return 0;
    }
    if (r < 0)
        return r;
    p->nrec += (uint32_t)copy_records(dst, data, len);
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

/* The locked path of do_write: its checks said the data is whole records, and it did not go lock-free. */
static __attribute__((noinline)) int do_write_locked(struct ls_producer *p, const char *data, size_t len, int nonblock)
{
    uint32_t cap = __atomic_load_n(&p->capacity, __ATOMIC_RELAXED);
    struct prod_fast_slot *me = fast_my_slot();
    if (len > cap) {
        /* Check every record fits before taking any, so -EMSGSIZE means nothing was written. */
        for (size_t s = 0, e; s < len; s = e)
            if ((e = chunk_end(data, s, len, cap)) == 0) {
                pthread_mutex_lock(&p->lock);
                if (cap < p->base_capacity)
                    prod_set_error(p, "a record longer than this connection's batch limit (%u bytes: the daemon's "
                                 "max_batch or the data pipe's size) cannot be sent", cap);
                else
                    prod_set_error(p, "a record longer than the segment payload (%u bytes) cannot be sent: raise "
                                 "segment_size", cap);
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
        r = prod_usable_locked(p);
        if (r == 0 && end == 0) {
            prod_set_error(p, "a record longer than this connection's batch limit (%u bytes: a smaller pipe) cannot be sent",
                      p->capacity);
            r = -EMSGSIZE;
        }
        if (r == 0)
            r = write_chunk_locked(p, data + done, end - done, nonblock);
        if (r == 0 && end == len)
            fast_grant_locked(p, me);
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

/* Small, so that a write the fast path takes costs no more than its checks and the copy. */
static inline int do_write(struct ls_producer *p, const void *buf, size_t len, int nonblock)
{
    const char *data = buf;
    if (!p)
        return -EINVAL;
    if (prod_forked(p))
        return -ECHILD;
    if (len == 0 || !data || data[len - 1] != '\n' || (nonblock && len > INT_MAX)) {
        pthread_mutex_lock(&p->lock);
        prod_set_error(p, "write takes whole records: the data must be non-empty and end with '\\n' (a partial record "
                     "would tear a line)");
        pthread_mutex_unlock(&p->lock);
        return -EINVAL;
    }
    /* capacity changes (under the lock) only when a reconnect brings a smaller pipe. */
    if (len <= __atomic_load_n(&p->capacity, __ATOMIC_RELAXED) && fast_append(p, data, len))
        return nonblock ? (int)len : 0;
    return do_write_locked(p, data, len, nonblock);
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
    if (prod_forked(p))
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
    int r = prod_usable_locked(p);
    if (r == 0)
        r = prod_reserve_locked(p, worst, 0, &dst);
    if (r == -ERANGE)
        r = -EMSGSIZE; /* the batch limit shrank under us: the caller renders it itself */
    if (r == PROD_DROPPED) {
        p->st.dropped_records++;
        r = 0;
    } else if (r == PROD_TAKEN) {
        size_t n = ls_render_log_json(dst, worst, ts, ts_len, level, level_len, logger, logger_len, msg, msg_len, exc,
                                      exc_len);
        p->pos += (uint32_t)n;
        p->nrec++;
        r = 0;
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
    int r = prod_handover_current_locked(p);
    if (r < 0)
        return r;
    *target = p->seq;
    return 0;
}

static int flush_check_locked(struct ls_producer *p, uint64_t target)
{
    if (p->released < target) {
        if (p->closed) {
            prod_set_error(p, "stream '%s': the producer was closed while this flush waited", p->stream);
            return -ESHUTDOWN;
        }
        return p->broken ? -p->broken : -EAGAIN;
    }
    if (p->failed_pending) {
        prod_set_error(p, "the logsink daemon could not write %llu batch(es) of stream '%s' (first: %s)",
                  (unsigned long long)p->failed_pending, p->stream, p->failed_first);
        p->failed_pending = 0;
        return -EIO;
    }
    return 0;
}

int ls_producer_flush_start(struct ls_producer *p, uint64_t *target)
{
    if (prod_forked(p))
        return -ECHILD;
    pthread_mutex_lock(&p->lock);
    int r = flush_start_locked(p, target);
    pthread_mutex_unlock(&p->lock);
    return r;
}

int ls_producer_flush_check(struct ls_producer *p, uint64_t target)
{
    if (prod_forked(p))
        return -ECHILD;
    pthread_mutex_lock(&p->lock);
    int r = flush_check_locked(p, target);
    pthread_mutex_unlock(&p->lock);
    return r;
}

int ls_producer_flush(struct ls_producer *p, int timeout_ms)
{
    if (prod_forked(p))
        return -ECHILD;
    int64_t deadline = prod_deadline_after(timeout_ms);
    uint64_t target = 0;
    int reading = 0; /* this thread took the control socket (ls_producer_int.h, "Reading the control socket") */
    pthread_mutex_lock(&p->lock);
    /* Something to wait for: take the socket before the handover, which wakes the daemon's engine -
     * on a busy CPU it may preempt us and send the RELEASE before we would have taken it, waking the
     * background thread after all. */
    if (p->released < p->seq || (p->active && __atomic_load_n(&p->pos, __ATOMIC_RELAXED)))
        reading = prod_rx_take_locked(p);
    int r = flush_start_locked(p, &target);
    while (r == 0 && (r = flush_check_locked(p, target)) == -EAGAIN) {
        /* Wait on the socket ourselves when nobody else does: the RELEASE then wakes this thread
         * directly, not the background thread that would then wake us. Other flushes wait on cond. */
        if (reading && !prod_rx_keep_locked(p)) {
            prod_rx_give_back_locked(p); /* the connection went down: the background thread reconnects */
            reading = 0;
        }
        if (!reading)
            reading = prod_rx_take_locked(p);
        if ((reading ? prod_rx_wait_locked(p, deadline) : prod_cond_wait_until(p, deadline)) < 0) {
            prod_set_error(p, "flush of stream '%s' not confirmed within %d ms", p->stream, timeout_ms);
            r = -ETIMEDOUT;
        } else
            r = 0;
    }
    if (reading)
        prod_rx_give_back_locked(p);
    pthread_mutex_unlock(&p->lock);
    return r;
}

uint64_t ls_producer_released(struct ls_producer *p)
{
    if (prod_forked(p))
        return 0;
    pthread_mutex_lock(&p->lock);
    uint64_t r = p->released;
    pthread_mutex_unlock(&p->lock);
    return r;
}

int ls_producer_event_fd(struct ls_producer *p)
{
    return prod_forked(p) ? -ECHILD : p->event_fd;
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
    if (p->cancel_fd >= 0)
        close(p->cancel_fd);
    if (p->epoll_fd >= 0)
        close(p->epoll_fd); /* (in a child: its copy; the epoll set is the parent's) */
    if (p->flush_wake_fd >= 0)
        close(p->flush_wake_fd);
    /* In a prod_forked child the arena is not mapped (MADV_DONTFORK): its range may hold the child's
     * own memory by now, so never unmap it there. */
    if (p->arena && !in_child) {
        if (p->arena_fd >= 0)
            ls_arena_unmap_shm(p->arena, p->arena_size);
        else
            ls_arena_unmap(p->arena, p->arena_size);
    }
    if (p->arena_fd >= 0)
        close(p->arena_fd); /* (in a child: its own copy of the fd; the parent's stays open) */
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

int ls_producer_open(const char *stream, const char *socket_path, const struct ls_producer_opts *opts,
                     struct ls_producer **out)
{
    struct ls_producer_opts o;
    char path[sizeof(((struct sockaddr_un *)0)->sun_path)];
    int r;
    prod_open_error[0] = '\0';
    if (!out)
        return -EINVAL;
    *out = NULL;
    if (ls_validate_stream_name(stream) < 0) {
        prod_set_error(NULL,
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
            prod_set_error(NULL, "address %.200s is too long", socket_path);
            return -ENAMETOOLONG;
        }
        strcpy(path, socket_path);
        if (o.transport == LS_TRANSPORT_VMSPLICE || o.transport == 0)
            o.transport = LS_TRANSPORT_ZEROCOPY; /* vmsplice is local-only: the TCP equivalent */
        if (o.transport == LS_TRANSPORT_SHM) {
            prod_set_error(NULL, "transport shm needs the local socket (the daemon maps our memory); over TCP use "
                                 "zerocopy or copy");
            return -EINVAL;
        }
    } else if (o.transport == LS_TRANSPORT_ZEROCOPY) {
        prod_set_error(NULL, "transport zerocopy is for TCP addresses (tcp://HOST:PORT); AF_UNIX refuses SO_ZEROCOPY");
        return -EINVAL;
    } else if (socket_path) {
        if (strlen(socket_path) >= sizeof path) {
            prod_set_error(NULL, "socket path %.200s is longer than %zu bytes (the AF_UNIX limit)", socket_path,
                      sizeof path - 1);
            return -ENAMETOOLONG;
        }
        strcpy(path, socket_path);
    } else if (ls_default_socket_path(path, sizeof path) < 0) {
        prod_set_error(NULL, "the default socket path is longer than %zu bytes (the AF_UNIX limit)", sizeof path - 1);
        return -ENAMETOOLONG;
    }
    pthread_once(&atfork_once, register_atfork);

    struct ls_producer *p = calloc(1, sizeof *p);
    if (!p)
        return -ENOMEM;
    p->sock = p->pipe_w = p->event_fd = p->wake_fd = p->cancel_fd = p->arena_fd = p->epoll_fd = p->flush_wake_fd = -1;
    p->close_deadline = -1;
    p->fork_gen = __atomic_load_n(&prod_fork_generation, __ATOMIC_RELAXED);
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
    p->rand_state = (unsigned)getpid() ^ (unsigned)prod_now_ms() ^ (unsigned)(uintptr_t)p;
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
    /* The arena before the connection: a shm HELLO passes it. */
    p->arena_size = (size_t)o.segments * o.segment_size;
    if (p->transport == LS_TRANSPORT_SHM) {
        char name[16 + LS_MAX_STREAM_NAME];
        snprintf(name, sizeof name, "logsink:%s", stream); /* as /proc/PID/fd shows it */
        if ((r = ls_arena_map_shm(p->arena_size, name, &p->arena_fd, &arena)) < 0) {
            prod_set_error(NULL, "creating the shared-memory arena (a sealed memfd of %zu bytes) failed: %s%s",
                      p->arena_size, strerror(-r),
                      r == -ENOSYS || r == -EINVAL ? " (no memfd sealing here: use transport vmsplice or copy)" : "");
            goto fail;
        }
    } else if ((r = ls_arena_map(p->arena_size, &arena)) < 0) {
        prod_set_error(NULL, "mapping the segment arena (%zu bytes) failed: %s", p->arena_size, strerror(-r));
        goto fail;
    }
    p->arena = arena;
    p->event_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    p->wake_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    p->cancel_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    p->cancel = (struct ls_wait_cancel){.fd = p->cancel_fd, .close_deadline = &p->close_deadline};
    if (p->event_fd < 0 || p->wake_fd < 0 || p->cancel_fd < 0) {
        r = -errno;
        prod_set_error(NULL, "setting up the producer failed: %s", strerror(-r));
        goto fail;
    }
    prod_rx_setup(p); /* before the connection is installed: it joins the epoll set */
    if ((r = prod_connect_once(p, &c)) < 0)
        goto fail; /* prod_connect_once said why */
    prod_install_conn_locked(p, &c); /* no other thread yet */
    /* The background thread runs with every signal blocked: signals go to the application's
     * threads, and a SIGPIPE from a handover it makes stays pending there, harmless. */
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    r = -pthread_create(&p->thread, NULL, prod_background, p);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (r < 0) {
        prod_set_error(NULL, "starting the producer thread failed: %s", strerror(-r));
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

int ls_producer_shutdown(struct ls_producer *p, int timeout_ms)
{
    if (!p)
        return 0;
    if (prod_forked(p))
        return -ECHILD;
    /* The shorter bound wins, for the final flush and any handover it makes. */
    int bound = timeout_ms >= 0 && (p->timeout_ms < 0 || timeout_ms < p->timeout_ms) ? timeout_ms : p->timeout_ms;
    int was_broken = __atomic_load_n(&p->broken, __ATOMIC_RELAXED); /* (broken before: close reports 0, as always) */
    if (bound >= 0 && !__atomic_load_n(&p->shutting, __ATOMIC_RELAXED)) {
        /* Before taking the lock: a writer may hold it while it waits for pipe or socket room with
         * no deadline of its own (ls_cancel.h). From here on it waits no longer than ours. */
        __atomic_store_n(&p->close_deadline, prod_now_ms() + bound, __ATOMIC_RELEASE);
        uint64_t one = 1;
        if (write(p->cancel_fd, &one, sizeof one) < 0) { /* non-blocking; readable is all it must be */
        }
    }
    pthread_mutex_lock(&p->lock);
    if (p->shutting) { /* shut down before, or being shut down by another thread: only close frees */
        pthread_mutex_unlock(&p->lock);
        return 0;
    }
    __atomic_store_n(&p->shutting, 1, __ATOMIC_RELAXED); /* no write is taken from here on ... */
    prod_fast_revoke_locked(p); /* ... lock-free ones included: the final flush covers every accepted one */
    int64_t cd = __atomic_load_n(&p->close_deadline, __ATOMIC_ACQUIRE);
    if (cd >= 0) /* what is left of the bound once a blocked writer let go of the lock */
        bound = cd > prod_now_ms() ? (int)(cd - prod_now_ms()) : 0;
    p->timeout_ms = bound;
    int do_flush = !p->broken && !p->stopping;
    pthread_mutex_unlock(&p->lock);
    int ret = do_flush ? ls_producer_flush(p, bound) : 0;
    pthread_mutex_lock(&p->lock);
    if (ret == 0 && !was_broken && p->broken && (p->released < p->seq || (p->active && p->pos))) {
        /* It broke while we closed (a handover our own bound cut short) with accepted records the
         * daemon never confirmed: not a success. */
        ret = -p->broken;
    }
    __atomic_store_n(&p->closed, 1, __ATOMIC_RELAXED); /* also read by a connect in progress */
    prod_fast_revoke_locked(p); /* a lock-free appender finishes its copy; the next write locks */
    prod_close_pipe_locked(p);
    pthread_cond_broadcast(&p->cond); /* writers and flushes waiting for a release: -ESHUTDOWN */
    prod_wake_flusher_locked(p);      /* ... and the flush polling the socket */
    pthread_mutex_unlock(&p->lock);
    prod_wake_background(p); /* its poll, a reconnect's backoff or HELLO wait */
    if (p->thread_started)
        pthread_join(p->thread, NULL);
    /* Nothing reads or sends any more (every call checks `closed` under the lock first): end the
     * connection now, not when the runtime frees p. The arena stays mapped until then. */
    pthread_mutex_lock(&p->lock);
    p->thread_started = 0;
    while (p->rx_flusher) { /* a flush polling the socket gives it back first (it sees `closed`) */
        prod_wake_flusher_locked(p);
        (void)prod_cond_wait_until(p, -1);
    }
    if (p->sock >= 0) {
        close(p->sock);
        p->sock = -1;
    }
    pthread_mutex_unlock(&p->lock);
    return ret;
}

int ls_producer_close_within(struct ls_producer *p, int timeout_ms)
{
    if (!p)
        return 0;
    if (prod_forked(p)) {
        destroy(p, 1);
        return -ECHILD;
    }
    int ret = ls_producer_shutdown(p, timeout_ms);
    destroy(p, 0);
    return ret;
}

#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23 /* Linux 5.14 */
#endif

int ls_producer_prefault(struct ls_producer *p)
{
    if (prod_forked(p))
        return -ECHILD;
    /* arena and arena_size never change after open, and populating writes no byte: no lock. */
    return madvise(p->arena, p->arena_size, MADV_POPULATE_WRITE) < 0 ? -errno : 0;
}

int ls_producer_stats(struct ls_producer *p, struct ls_producer_stats *out)
{
    if (prod_forked(p))
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
    out->disconnected_us = 1000 * (p->down_total_ms + (p->conn != CONN_UP ? (uint64_t)(prod_now_ms() - p->down_since_ms) : 0));
    pthread_mutex_unlock(&p->lock);
    return 0;
}

const char *ls_producer_last_error(struct ls_producer *p)
{
    if (!p)
        return prod_open_error;
    if (prod_forked(p))
        return "this producer belongs to the parent process: open a new one in the prod_forked child";
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
    if (prod_forked(p))
        return -ECHILD;
    pthread_mutex_lock(&p->lock);
    int r = p->stopping ? -ESHUTDOWN : p->broken ? -p->broken : 0;
    pthread_mutex_unlock(&p->lock);
    return r;
}

int64_t ls_producer_capacity(struct ls_producer *p)
{
    if (!p)
        return -EINVAL;
    if (prod_forked(p))
        return -ECHILD;
    return __atomic_load_n(&p->capacity, __ATOMIC_RELAXED);
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
