/* ls_producer.h - a logsink producer: control protocol + segment state machine, in C.
 *
 * One implementation for every producer: clients/c (liblogsink) wraps it under logsink_* names and
 * the Python logsink.Client can drive it through cffi. Its behaviour is that of logsink/client.py;
 * the bytes it speaks are in docs/protocol.md.
 *
 * Model: the producer owns an arena of `segments` segments of `segment_size` bytes. Writes copy
 * whole records into the current segment (after its 32-byte frame header); a full segment is
 * handed to the daemon over the data pipe (ls_handover: vmsplice or copy) as batch seq 1, 2, 3...
 * and the next segment in ring order becomes current. A vmsplice segment stays pinned until the
 * daemon's RELEASE covers its seq (the pipe still references its pages); a copy segment is free
 * right after the handover. With LS_TRANSPORT_SHM the arena is a sealed memfd passed with HELLO:
 * the daemon maps it, the handover writes a 32-byte descriptor (offset + length) to the pipe, and
 * the segment stays pinned until RELEASE, as with vmsplice. A background thread reads RELEASE / SHUTDOWN / ERROR from the control
 * socket and hands over a segment whose first record is older than the flush interval; a thread
 * waiting in ls_producer_flush reads the socket itself meanwhile (locally; one such thread at a time),
 * so its RELEASE wakes it directly.
 *
 * Contract (liburing style): every int function returns >= 0 on success or -errno; errno carries
 * no meaning. Common errors:
 *   -EINVAL      bad argument (stream name, options, a write not ending in '\n')
 *   -EMSGSIZE    one record is longer than a segment's payload (segment_size - 32)
 *   -ETIMEDOUT   timeout_ms passed waiting for a release or for pipe space
 *   -ECONNRESET  the producer is broken: the daemon sent a non-retriable ERROR (forbidden,
 *                bad-stream, auth, bad-frame, ...) or garbage; with opts.reconnect = 0 also when
 *                it closed the connection or a handover failed; ls_producer_last_error() says which
 *   -ESHUTDOWN   (opts.reconnect = 0) the daemon said SHUTDOWN: what was written is handed over,
 *                no more writes. With reconnect (the default) a lost daemon is no error: the
 *                producer reconnects by itself and calls wait (bounded by timeout_ms) meanwhile.
 *   -EIO         (flush) the daemon reported batches it could not write (e.g. disk full)
 *   -ECHILD      called in a forked child: a producer belongs to the process that opened it
 *                (the connection is shared with the parent; open a new producer in the child)
 * Thread safety: every call may come from any thread (one mutex per producer; the thread that wrote
 * last appends lock-free until another call takes the segment back), except that
 * ls_producer_close must be the last call (ls_producer_shutdown may race other calls; see there). Not async-signal-safe: never call from a signal handler.
 *
 * SIGPIPE: writing to the data pipe after the daemon died raises SIGPIPE. The producer never lets
 * that kill the process: its background thread runs with all signals blocked, and every handover
 * made on a caller's thread blocks SIGPIPE for its duration and, if it failed with EPIPE, consumes
 * the SIGPIPE it caused with sigtimedwait() (only if none was pending before) - the error comes
 * back as -ECONNRESET instead. The control socket uses MSG_NOSIGNAL. Callers need not ignore
 * SIGPIPE for logsink's sake.
 */
#ifndef LS_PRODUCER_H
#define LS_PRODUCER_H

#include <stddef.h>
#include <stdint.h>

#include "ls_protocol_gen.h"

#define LS_ON_FULL_BLOCK 0
#define LS_ON_FULL_DROP 1

/* Defaults, as logsink/client.py: 4 segments of 1 MiB (the benchmark's best, one segment fills
 * the 1 MiB pipe), records never wait more than 200 ms in a half-full segment. */
#define LS_DEFAULT_SEGMENT_SIZE (1u << 20)
#define LS_DEFAULT_SEGMENTS 4
#define LS_DEFAULT_PIPE_SIZE (1 << 20)
#define LS_DEFAULT_FLUSH_INTERVAL_MS 200
/* How long connect + HELLO may take before the daemon counts as unreachable. */
#define LS_CONNECT_TIMEOUT_MS 10000
#define LS_MAX_STREAM_NAME LS_PROTO_MAX_STREAM_NAME /* protocol.MAX_STREAM_NAME */
/* TCP zerocopy: after this many consecutive ids come back COPIED (always, on loopback), stop
 * asking for zerocopy on the connection: the kernel documentation's advice, and it saves the
 * completion round trips. */
#define LS_DEFAULT_ZC_COPIED_SWITCH 32

struct ls_producer_opts {
    int transport;         /* LS_TRANSPORT_VMSPLICE (default; 0 also means it), LS_TRANSPORT_SHM (local:
                            * a sealed memfd arena the daemon maps, the pipe carries descriptors) or
                            * LS_TRANSPORT_COPY; over TCP LS_TRANSPORT_ZEROCOPY or _COPY */
    uint32_t segment_size; /* bytes, a multiple of 4096 in 4096 .. 64 MiB */
    uint32_t segments;     /* >= 1 */
    int on_full;           /* LS_ON_FULL_BLOCK: wait for a release; LS_ON_FULL_DROP: drop and count */
    int timeout_ms;        /* longest wait for a release or pipe space; -1 = forever */
    int flush_interval_ms; /* hand over a segment whose first record is this old; 0 = never */
    /* The uid the daemon must run as (checked with SO_PEERCRED right after connect, before HELLO:
     * a socket path in a world-writable directory can be squatted). -1 (default): the caller's
     * effective uid. Root is always accepted. Not checked over TCP (no credentials there). */
    int64_t expected_uid;
    /* TCP zerocopy: this many COPIED completions in a row turn zerocopy off; 0 = never.
     * Default LS_DEFAULT_ZC_COPIED_SWITCH. */
    uint32_t zc_copied_switch;
    /* 1 (default): when the daemon goes away (killed, restarted, SHUTDOWN, a retriable ERROR) the
     * background thread reconnects with backoff (50 ms doubling to 2 s, jittered) and resends
     * every batch the daemon had not released, in order; records written meanwhile wait in the
     * arena (on_full applies when it is full). Segments stay pinned until RELEASE on every
     * transport (copy too) so they can be resent. 0: fail fast, as before (-ECONNRESET /
     * -ESHUTDOWN for good). docs/architecture.md "Reconnect and delivery guarantees". */
    int reconnect;
};

struct ls_producer_stats {
    uint64_t batches;             /* handed over */
    uint64_t records;             /* in handed-over batches */
    uint64_t bytes;               /* payload bytes in handed-over batches */
    uint64_t dropped_records;     /* on_full=drop */
    uint64_t failed_batches;      /* reported in RELEASE.failed */
    uint64_t released_through;    /* daemon: every seq <= this is dealt with */
    uint64_t handed_over_through; /* last seq handed over */
    uint64_t pinned_segments;     /* handed over, not yet released (vmsplice, shm; any with reconnect) */
    uint64_t segment_size;
    uint64_t segments;
    uint64_t pipe_size;           /* the data pipe's real capacity */
    uint64_t waits_for_release;   /* times a writer found every segment pinned */
    /* TCP producers (tcp://HOST:PORT): */
    uint64_t zc_sends;            /* segments sent with MSG_ZEROCOPY */
    uint64_t zc_completed;        /* notification ids completed (error queue) */
    uint64_t zc_copied;           /* ... of which the kernel reported SO_EE_CODE_ZEROCOPY_COPIED */
    uint64_t zc_enobufs;          /* sends that hit ENOBUFS (optmem) and went copied */
    uint64_t copied_sends;        /* segments sent copied (copy transport, small, or after the switch) */
    uint64_t zc_switched_to_copy; /* 1 once a run of COPIED completions turned zerocopy off */
    /* Reconnects (opts.reconnect): */
    uint64_t reconnects;          /* connections re-established after the first */
    uint64_t resent_batches;      /* batches sent again on a new connection (unreleased at the loss) */
    uint64_t resent_bytes;        /* ... their payload bytes */
    uint64_t disconnected_us;     /* total time without a usable connection (the current gap included) */
    uint64_t connected;           /* 1 while connected (0 while reconnecting or after SHUTDOWN) */
    uint64_t lost_batches;        /* splice_from batches a lost connection took with it (not in the arena) */
    /* Rate limits (the daemon's): */
    uint64_t suppressed_batches;  /* dropped by the daemon over a rate limit (RELEASE.suppressed) */
    uint64_t suppressed_records;
};

struct ls_producer;

/* Fill *opts with the defaults above (timeout_ms -1, on_full block). Returns 0. */
int ls_producer_opts_init(struct ls_producer_opts *opts);

/* Check a stream name as protocol.validate_stream_name: 1..64 of [A-Za-z0-9._-], not starting
 * with '.', no "..". Returns 0 or -EINVAL. */
int ls_validate_stream_name(const char *stream);

/* The protocol checks on their own, for tests/test_conformance.py (which runs the same bytes through
 * logsink/protocol.py, the reference) and for fuzzing. */
/* The first control frame in buf[0..len) (4-byte big-endian length, msgpack map), checked as
 * protocol.ControlDecoder + check_message do. Returns its kind (enum ls_msg_kind, > 0), 0 if buf
 * holds less than the whole frame, -EPROTO with why = "<error code>: <reason>" (the code is
 * protocol.E_BAD_MESSAGE, E_BAD_VERSION or E_BAD_STREAM) if it breaks the protocol, or -ENOMEM. */
int ls_check_control_frame(const void *buf, size_t len, char *why, size_t whylen);
/* A 32-byte batch frame header checked as protocol.unpack_frame_header does: returns 0 (valid),
 * its verdict LS_EFRAME_* (> 0, ls_frame.h), or -EINVAL if len is not 32. */
int ls_check_frame_header(const void *buf, size_t len, uint32_t max_payload);

/* The socket path the daemon and clients agree on when none is configured, as
 * config.default_socket_path: $LOGSINK_SOCKET, else $XDG_RUNTIME_DIR/logsink.sock if that
 * directory exists, else /run/logsink/logsink.sock for root (and for other users if /run/logsink
 * is a directory they may search), else /tmp/logsink-<uid>.sock. Returns its length or
 * -ENAMETOOLONG. */
int ls_default_socket_path(char *buf, size_t size);

/* Map the arena (LS_TRANSPORT_SHM: create it as a sealed memfd), connect to the daemon
 * (socket_path NULL = ls_default_socket_path), create the data pipe, send HELLO with the pipe's read
 * end (shm: and the memfd), wait for WELCOME (up to LS_CONNECT_TIMEOUT_MS) and start the
 * background thread. opts NULL = defaults. Returns 0 and *out, or -EINVAL (stream
 * name or options), -ENOENT/-ECONNREFUSED (no daemon at the path), -EPERM (the process listening
 * there runs as neither opts.expected_uid nor root: nothing was sent to it), -EACCES (the daemon
 * answered ERROR forbidden: its access rules do not admit this uid for the stream), -ECONNREFUSED
 * (the daemon answered another ERROR), -ETIMEDOUT, -EPROTO (garbage instead of WELCOME),
 * -ENAMETOOLONG, -ENOMEM, ...
 * On failure ls_producer_last_error(NULL) describes it (per thread). */
int ls_producer_open(const char *stream, const char *socket_path, const struct ls_producer_opts *opts,
                     struct ls_producer **out);

/* Append whole records: len > 0 and data ends in '\n' (else -EINVAL). Returns 0 once they are in
 * the arena (or, on_full=drop with every segment pinned, dropped and counted). Writes larger than
 * a segment's payload are split at '\n' boundaries; a single record larger than it is -EMSGSIZE
 * and then nothing of the write was taken. May wait up to timeout_ms for a release
 * (-ETIMEDOUT) and for pipe space. */
int ls_producer_write(struct ls_producer *p, const void *data, size_t len);

/* Render one log record as a JSON line (ls_render_log_json: the format of
 * logsink.logging.JsonFormatter, the timestamp from `created`, Unix seconds) straight into the
 * arena; exc may be NULL. Returns 0 (appended, or
 * dropped by on_full=drop) or -errno; -EMSGSIZE if its worst-case size does not fit a segment
 * (the caller renders it itself and uses ls_producer_write). */
int ls_producer_write_log_json(struct ls_producer *p, double created, const char *level, size_t level_len,
                               const char *logger, size_t logger_len, const char *msg, size_t msg_len, const char *exc,
                               size_t exc_len);
/* Hand over `nbytes` of whole records (`records` of them) waiting in the pipe `fd` as one batch,
 * moved by splice(2): no copy through user space (`logsink pipe`). The current segment goes first.
 * Returns 0 or -errno (-ECONNRESET: the data pipe is now out of sync and closed).
 * With LS_TRANSPORT_SHM no payload goes through the data pipe: the bytes are read(2) into a fresh
 * arena segment (the only copy) and handed over as a batch like a written one - queued, resent
 * after a reconnect, dropped and counted under on_full=drop. nbytes must fit ls_producer_capacity
 * (-EMSGSIZE, nothing read); bytes read that do not end in '\n' are dropped (-EINVAL). The bytes
 * must be waiting in `fd`: the read happens with the producer's lock held. */
int ls_producer_splice_from(struct ls_producer *p, int fd, uint32_t nbytes, uint32_t records);
/* As ls_producer_write, but never waits for a release (for event loops): returns the number of
 * bytes taken - len when all of it was (or was dropped, on_full=drop) - or -EAGAIN when every
 * segment is pinned and nothing was taken: wait for ls_producer_event_fd and retry. A write split
 * at records may stop part-way: the return is then the bytes taken (whole records, < len); retry
 * with the rest. len must be <= INT_MAX (-EINVAL). Handing a full segment over may still wait for
 * pipe space (bounded by timeout_ms): the daemon drains the pipe without help from the caller. */
int ls_producer_try_write(struct ls_producer *p, const void *data, size_t len);

/* Hand over the current segment and wait until the daemon released every batch handed over so
 * far (timeout_ms < 0: forever). Returns 0; -ETIMEDOUT; -ECONNRESET (broken, also when the daemon
 * closed the connection after SHUTDOWN before releasing everything); -EIO if the daemon reported
 * failed batches since the last flush (last_error says which; the report is consumed).
 * On a local socket the first thread waiting here polls the control socket itself and acts on what
 * comes, as the background thread would (one thread wake-up less per flush); other threads flushing
 * meanwhile wait for it. LOGSINK_FLUSH_WAITS_ON_SOCKET=0 in the environment at open leaves all of
 * it to the background thread (the path before; for comparisons). */
int ls_producer_flush(struct ls_producer *p, int timeout_ms);

/* Non-blocking flush in two steps, for event loops: flush_start hands over the current segment and
 * stores the seq to wait for in *target; when ls_producer_released() >= *target (watch the event
 * fd), flush_check returns the flush's result. flush_check returns 0, -EAGAIN (not yet released),
 * -EIO (failed batches, consumed) or -ECONNRESET. */
int ls_producer_flush_start(struct ls_producer *p, uint64_t *target);
int ls_producer_flush_check(struct ls_producer *p, uint64_t target);
/* Every seq <= this is dealt with by the daemon (0 in a forked child). */
uint64_t ls_producer_released(struct ls_producer *p);

/* An eventfd (non-blocking, close-on-exec) the producer increments after each RELEASE,
 * SHUTDOWN, ERROR and connection loss. Event loops watch it for readability and read() 8 bytes to
 * reset it. Owned by the producer: do not close it. Returns the fd or -ECHILD. */
int ls_producer_event_fd(struct ls_producer *p);

/* Flush (unless broken or shut down; waiting up to opts.timeout_ms), stop the background thread,
 * close the pipe and socket, unmap the arena and free p - whatever the return value, p is gone.
 * Returns 0 or the flush's error. In a forked child: frees the child's copies only (the
 * connection belongs to the parent: no flush, no socket shutdown) and returns -ECHILD. */
int ls_producer_close(struct ls_producer *p);
/* ls_producer_close, with the final flush (and any handover it makes) bounded by timeout_ms when
 * that is shorter than opts.timeout_ms (-1: no extra bound). For exit paths. */
int ls_producer_close_within(struct ls_producer *p, int timeout_ms);
/* The first half of ls_producer_close_within: flush (bounded likewise), stop the background thread,
 * close the data pipe and the connection - but p stays allocated and mapped. A handover another
 * thread is in, waiting for pipe or socket room with the lock held, is cut short by the same bound
 * (it fails as a timeout), so shutdown never waits for it longer than timeout_ms. Calls made meanwhile or later from other
 * threads return -ESHUTDOWN (writers and flushes waiting for a release wake up with it) instead of
 * racing the free. ls_producer_close then only frees. For runtimes that cannot be sure no other
 * thread is inside a call (Python's Client at exit, with daemon threads still logging): free once
 * nothing can call any more. Returns 0 or the flush's error (0 if already shut down), or -errno
 * (-ECONNRESET) if the producer broke while closing - e.g. a handover cut short by timeout_ms -
 * with accepted records the daemon never confirmed. */
int ls_producer_shutdown(struct ls_producer *p, int timeout_ms);

/* Fault in every page of p's segments now (MADV_POPULATE_WRITE; their contents do not change), so
 * that later writes take no page faults: for producers that must not stall on their first writes,
 * and for benchmarks that measure the steady state. Costs segments x segment_size bytes of memory
 * at once (the first writes would otherwise fault in only what they fill). Returns 0, -ECHILD, or
 * madvise's -errno (-EINVAL before Linux 5.14, -ENOMEM/-EFAULT when memory runs out). */
int ls_producer_prefault(struct ls_producer *p);

/* A snapshot of the counters. Returns 0 or -ECHILD. */
int ls_producer_stats(struct ls_producer *p, struct ls_producer_stats *out);

/* Why the last thing failed, as text: the daemon's ERROR code and reason, the failed batch a flush
 * reported, the failing call's name and strerror. p NULL: the last failed ls_producer_open on this
 * thread. Returns "" if nothing failed. The string is a per-thread copy, valid until this thread's
 * next ls_producer_last_error call. */
const char *ls_producer_last_error(struct ls_producer *p);

/* The daemon's id for this producer (as `logsink status` shows it), and its engine name into
 * engine (engine_len bytes), both from WELCOME. Returns the id or -EINVAL. */
int64_t ls_producer_info(struct ls_producer *p, char *engine, size_t engine_len);

/* 0 while the producer can take records; -ESHUTDOWN (the daemon is stopping), -ECONNRESET
 * (broken: last_error says why) or -ECHILD otherwise. */
int ls_producer_usable(struct ls_producer *p);

/* The largest batch payload this connection takes, in bytes: segment_size - 32, cut by the daemon's
 * max_batch (WELCOME) and, for vmsplice and copy, by the data pipe's size (a batch must fit the pipe
 * whole). A longer record is -EMSGSIZE. Returns it, -EINVAL or -ECHILD. */
int64_t ls_producer_capacity(struct ls_producer *p);

/* The transport in use now: LS_TRANSPORT_* (vmsplice steps down to copy where the kernel refuses it). */
int ls_producer_transport(struct ls_producer *p);

#endif
