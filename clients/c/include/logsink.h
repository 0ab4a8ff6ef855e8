/* logsink.h - liblogsink: write log records to a logsink daemon from C.
 *
 *     struct logsink *ls;
 *     int r = logsink_open("app", NULL, NULL, &ls);   // stream "app", default socket and options
 *     if (r < 0) { fprintf(stderr, "%s\n", logsink_last_error(NULL)); return 1; }
 *     logsink_write(ls, "hello\n", 6);                // whole records only: ends in '\n'
 *     r = logsink_close(ls);                           // flushes: the record is in app.log
 *
 * Every int function returns >= 0 on success or a negative errno; errno itself carries no meaning.
 * logsink_last_error() says in words what went wrong. A handle may be shared by threads; it
 * belongs to the process that opened it (in a forked child every call returns -ECHILD: open a
 * new handle there). liblogsink never lets SIGPIPE kill the process. Calls are not
 * async-signal-safe: never call them from a signal handler. The library is linked -z nodelete (it
 * stays loaded after dlclose: threads that wrote keep state it cleans up when they exit).
 *
 * A daemon that goes away (restart, crash, SIGTERM) is no error by default: the handle reconnects
 * by itself and resends every batch the daemon had not released (at-least-once; opts.reconnect).
 *
 * Errors: -EINVAL (bad argument), -EMSGSIZE (a record longer than a segment), -ETIMEDOUT,
 * -ECONNRESET (the daemon ended this producer: a non-retriable ERROR such as forbidden; with
 * reconnect = 0 also when it went away), -ESHUTDOWN (reconnect = 0: the daemon is stopping),
 * -EIO (flush: the daemon could not write some batches, e.g. disk full), -ECHILD (forked child),
 * -ENOENT/-ECONNREFUSED (open: no daemon listening; or it refused the stream), -EACCES (open: the
 * daemon's access rules do not let this uid write the stream), -EPERM (open: the process listening
 * on the socket runs as neither opts.expected_uid nor root - e.g. another user squatting a path in
 * /tmp - and nothing was sent to it).
 */
#ifndef LOGSINK_H
#define LOGSINK_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define LOGSINK_VERSION "0.1.0" /* = logsink/_version.py; the Makefile fails the build if not */

#define LOGSINK_TRANSPORT_VMSPLICE 1 /* zero-copy: pages are lent to the daemon until it releases them */
#define LOGSINK_TRANSPORT_COPY 2     /* write(): segments are free again right away */
#define LOGSINK_TRANSPORT_SHM 4      /* shared memory: the buffers are a sealed memfd the daemon maps; only
                                      * 32-byte descriptors go through a one-page pipe. Local socket only */
#define LOGSINK_ON_FULL_BLOCK 0      /* every segment in flight: wait (up to timeout_ms) */
#define LOGSINK_ON_FULL_DROP 1       /* every segment in flight: drop the records and count them */

struct logsink;

/* Fill with logsink_opts_init(), then change what you need. */
struct logsink_opts {
    int transport;         /* LOGSINK_TRANSPORT_*; default VMSPLICE (SHM needs a daemon that knows it) */
    uint32_t segment_size; /* bytes per batch buffer, multiple of 4096; default 1 MiB */
    uint32_t segments;     /* buffers in the ring; default 4 */
    int on_full;           /* LOGSINK_ON_FULL_*; default BLOCK */
    int timeout_ms;        /* longest wait for the daemon; -1 (default) = forever */
    int flush_interval_ms; /* records wait at most this long in a half-full buffer; default 200; 0 = never */
    int64_t expected_uid;  /* the uid the daemon must run as (root is always accepted); default -1: your own */
    int reconnect;         /* 1 (default): ride out a daemon restart - reconnect with backoff, resend what it had
                            * not released, calls wait meanwhile (bounded by timeout_ms); 0: fail fast with
                            * -ECONNRESET / -ESHUTDOWN once the daemon is gone */
};

struct logsink_stats {
    uint64_t batches, records, bytes, dropped_records, failed_batches;
    uint64_t released_through, handed_over_through, pinned_segments;
    uint64_t segment_size, segments, pipe_size, waits_for_release;
    /* TCP producers (socket_path "tcp://HOST:PORT", LOGSINK_TOKEN for the daemon's auth_token) */
    uint64_t zc_sends, zc_completed, zc_copied, zc_enobufs, copied_sends, zc_switched_to_copy;
    /* reconnects (opts.reconnect) */
    uint64_t reconnects, resent_batches, resent_bytes, disconnected_us, connected, lost_batches;
    /* batches the daemon dropped over its rate limit (it writes a "suppressed" line saying so) */
    uint64_t suppressed_batches, suppressed_records;
};

/* Defaults into *opts. Returns 0. */
int logsink_opts_init(struct logsink_opts *opts);

/* Connect to the daemon for `stream` ([A-Za-z0-9._-], 1..64, no leading '.', no ".."). socket_path
 * NULL: $LOGSINK_SOCKET, else $XDG_RUNTIME_DIR/logsink.sock, else /run/logsink/logsink.sock (root,
 * or if that directory exists), else /tmp/logsink-<uid>.sock. Before sending anything it checks
 * with SO_PEERCRED that the daemon runs as opts.expected_uid (default: your uid) or root. opts
 * NULL: defaults. Returns 0 and *out, or -errno (logsink_last_error(NULL) says why). */
int logsink_open(const char *stream, const char *socket_path, const struct logsink_opts *opts, struct logsink **out);

/* Append one or more whole records (len > 0, data ends in '\n'). Returns 0 once they are buffered
 * (or dropped, with on_full DROP). Larger-than-a-segment writes are split between records. */
int logsink_write(struct logsink *ls, const void *data, size_t len);

/* Return once everything written before is in the stream's file (timeout_ms < 0: no limit). */
int logsink_flush(struct logsink *ls, int timeout_ms);

/* Flush, disconnect and free ls (always freed). Returns 0 or the flush's error. */
int logsink_close(struct logsink *ls);

/* Fault in every page of this handle's buffers now (segments x segment_size bytes of memory at
 * once; the first writes would otherwise fault in only what they fill, a page at a time), so that
 * later writes take no page faults: for producers that must not stall in their first writes, and
 * for benchmarks of the steady state. Contents do not change; safe at any time. Returns 0, -ECHILD
 * (in a forked child), or -errno (-EINVAL: the kernel is older than Linux 5.14). */
int logsink_prefault(struct logsink *ls);

/* Counters of this handle. Returns 0 or -ECHILD. */
int logsink_stats(struct logsink *ls, struct logsink_stats *out);

/* The last error in words (ls NULL: the last failed logsink_open on this thread); "" if none.
 * Valid until this thread's next logsink_last_error call. */
const char *logsink_last_error(struct logsink *ls);

#ifdef __cplusplus
}
#endif

#endif
