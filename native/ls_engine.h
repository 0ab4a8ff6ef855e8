/* ls_engine.h - the daemon's data plane: moves batches from producer pipes into stream files.
 *
 * Python (the control plane) creates an engine, adds streams (an output fd and the offset to
 * write at) and producers (a pipe's read end and the stream it feeds). The engine runs its own
 * thread: it reads each batch's 32-byte frame header, then moves the payload into the stream's
 * file at an offset it owns, one batch at a time per stream (so batches never interleave), and
 * queues an event per finished or failed batch. Python waits for readability of
 * ls_engine_notify_fd() and drains events with ls_engine_poll_events().
 *
 * Engines: io_uring (READ_FIXED of headers into a registered buffer, SPLICE with fixed files),
 * splice (epoll + splice(2)), readwrite (epoll + read/pwrite, the copy baseline). All three
 * produce byte-identical files.
 *
 * Contract: every function returns >= 0 on success or -errno on failure; errno is never the
 * channel. Functions are safe to call from one control thread while the engine thread runs.
 */
#ifndef LS_ENGINE_H
#define LS_ENGINE_H

#include <stdint.h>

#define LS_ENGINE_AUTO 0
#define LS_ENGINE_IO_URING 1
#define LS_ENGINE_SPLICE 2
#define LS_ENGINE_READWRITE 3

/* Event kinds delivered by ls_engine_poll_events(). */
#define LS_EV_BATCH_DONE 1      /* batch seq of producer is in the file: release it (err 1: the engine already did) */
#define LS_EV_BATCH_FAILED 2    /* batch seq was not written (err = -errno from the file); payload discarded */
#define LS_EV_PRODUCER_EOF 3    /* pipe closed cleanly between batches; producer slot is free again */
#define LS_EV_PRODUCER_DIED 4   /* pipe closed mid-batch (bytes = bytes of the partial batch discarded) */
#define LS_EV_BAD_FRAME 5       /* a batch broke the protocol (err = an LS_EFRAME_ or LS_EBATCH_ verdict, > 0); producer stopped */
#define LS_EV_PRODUCER_ERROR 6  /* reading the pipe failed (err = -errno); producer stopped */
#define LS_EV_PRODUCER_REMOVED 7 /* answer to ls_engine_remove_producer(); slot free again */
/* The file was truncated under batch seq (copytruncate): the batch was moved down to the new end;
 * bytes = the hole closed. Informational. */
#define LS_EV_HOLE_CLOSED 8
/* The stream's file refused splice (err = -errno: a filesystem without splice_write) before a byte
 * of batch seq moved: the stream now moves batches by read + pwrite. Informational. */
#define LS_EV_STREAM_COPY 9
/* The engine thread ended on an error (err = -errno; ls_engine_fallback_reason() says which call):
 * no batch moves any more. producer_id and stream_id are UINT32_MAX. */
#define LS_EV_ENGINE_FAILED 10
/* Batch seq went over its producer's rate limit (ls_engine_set_limit): it was dropped, not written
 * (bytes, records: the batch's). Released like a landed batch, but the RELEASE must say so. */
#define LS_EV_BATCH_SUPPRESSED 11

/* LS_EV_BAD_FRAME's err beyond the header checks of ls_frame.h (LS_EFRAME_*, 1001..1004): what the
 * engine found wrong with a batch. Verdicts, not -errno (they share no number with one). The
 * producer is stopped; nothing of the batch stays in the file. */
#define LS_EBATCH_TOO_BIG 1005    /* payload larger than the producer's pipe (or stage) holds whole */
#define LS_EBATCH_NO_NEWLINE 1006 /* the batch's last byte is not '\n': it would glue the next record */
#define LS_EBATCH_VANISHED 1007   /* queued payload left the pipe mid-batch (the producer read it back) */
/* transport shm: a descriptor outside the arena, a descriptor from a producer without an arena, or a
 * payload frame (no LS_PROTO_FRAME_FLAG_SHM) from one with */
#define LS_EBATCH_ARENA 1008

struct ls_event {
    uint32_t kind;
    uint32_t producer_id;
    uint32_t stream_id;
    int32_t err;
    uint64_t seq;
    uint64_t bytes;
    uint64_t records;
};

struct ls_counters {
    uint64_t bytes;          /* payload bytes landed in files */
    uint64_t records;
    uint64_t batches;
    uint64_t bytes_spliced;  /* moved by splice (no user-space copy) */
    uint64_t bytes_copied;   /* moved through a user-space buffer (readwrite engine) */
    uint64_t bytes_shared;   /* written from a producer's shared arena by the kernel (WRITE_FIXED, pwrite) */
    uint64_t header_bytes;   /* frame header bytes read (the only bytes the engine looks at) */
    uint64_t errors;
    uint64_t offset;         /* streams: the next write offset (= file size); producers: pipe bytes queued */
    uint64_t last_seq;       /* producers: last seq landed */
    uint64_t holes_closed;   /* streams: batches moved down after the file was truncated under them */
    uint64_t syncs;          /* streams: fdatasync calls made for fsync=batch */
    uint64_t suppressed_records; /* dropped over a rate limit (LS_EV_BATCH_SUPPRESSED) */
};

struct ls_engine;

/* Create an engine of `kind`; LS_ENGINE_AUTO tries io_uring, then splice, then readwrite.
 * `max_producers` and `max_streams` size the slot tables (ids are 0..max-1).
 * `max_batch` bounds payload_len (a larger header is a bad frame). Returns 0 and *out, -EINVAL
 * (unknown kind, a zero size, max_batch over LS_MAX_BATCH_PAYLOAD), -ENOMEM, -EMFILE/-ENFILE (its
 * eventfds), or the chosen backend's setup error (e.g. -EPERM/-ENOSYS from io_uring_setup when
 * kind is LS_ENGINE_IO_URING; AUTO steps down instead and ls_engine_fallback_reason says why). */
int ls_engine_new(int kind, uint32_t max_streams, uint32_t max_producers, uint32_t max_batch,
                  struct ls_engine **out);
/* The engine actually running (LS_ENGINE_IO_URING, _SPLICE or _READWRITE); -EINVAL for NULL. */
int ls_engine_kind(struct ls_engine *e);
/* Why AUTO stepped down the ladder, e.g. "io_uring_setup: Operation not permitted" ("" if not). */
const char *ls_engine_fallback_reason(struct ls_engine *e);
/* An fd that is readable while events are pending (an eventfd); -EINVAL for NULL. */
int ls_engine_notify_fd(struct ls_engine *e);

/* Output: stream `id` writes to `fd` (opened without O_APPEND) starting at `offset`. The engine
 * does not own fd: the caller closes it after ls_engine_set_stream(e, id, -1, 0) returns. Replacing
 * the fd (rotation) takes effect between batches; the call waits for the in-flight batch.
 * Returns 0, -EINVAL (id out of range), or the engine thread's -errno if it failed meanwhile. */
int ls_engine_set_stream(struct ls_engine *e, uint32_t id, int fd, uint64_t offset);

/* Durability of stream `id`'s batches: LS_SYNC_NEVER (default: RELEASE once in the page cache) or
 * LS_SYNC_BATCH (RELEASE only after an fdatasync that started after the batch landed; a failed sync
 * fails the batch). Takes effect from the next batch. Returns 0 or -EINVAL (id or sync). */
#define LS_SYNC_NEVER 0
#define LS_SYNC_BATCH 1
int ls_engine_set_stream_sync(struct ls_engine *e, uint32_t id, int sync);

/* paused=1: batches already started finish, no new one starts (producers wait, pipes fill, and
 * their clients block or drop by their own policy). paused=0 resumes. For a full spool.
 * Returns 0 or -EINVAL (id out of range). */
int ls_engine_pause_stream(struct ls_engine *e, uint32_t id, int paused);

/* bound>0: no new batch of stream `id` starts once its offset reached `bound` (a batch already
 * started finishes, so the file ends at most one batch past it); raising the bound serves the
 * waiters. bound=0: none. The forward spool's "block" policy, enforced here and not by the
 * control plane alone: the engine lands and releases batches without waiting for the asyncio
 * loop, so a busy or stalled loop must not let producers run past the spool bound. The bound is
 * in the current file's offsets (set it again after ls_engine_set_stream). Returns 0 or -EINVAL. */
int ls_engine_bound_stream(struct ls_engine *e, uint32_t id, uint64_t bound);

/* Producer `id` feeds stream `stream_id` through the pipe read end `pipe_fd`; the engine owns the
 * fd from now on and closes it when the producer ends (EOF/DIED/BAD_FRAME/ERROR/REMOVED).
 * Returns 0; -EINVAL (id or stream_id out of range), -ENOTTY (pipe_fd is not a pipe), -EBADF (a
 * pipe's write end), -EBUSY (slot id in use), -ENOENT (stream_id has no file); fstat/fcntl/epoll
 * errors as -errno. On failure the caller still owns pipe_fd. */
int ls_engine_add_producer(struct ls_engine *e, uint32_t id, uint32_t stream_id, int pipe_fd);
/* Producer `id` feeds stream `stream_id` from a connected stream socket (TCP): after the control
 * plane read HELLO, the socket carries frames exactly as a pipe does. The payload moves socket ->
 * engine-owned stage pipe -> file by splice. The engine owns sock_fd's read side and closes it when
 * the producer ends; the caller keeps a dup() for writing RELEASE/ERROR. Returns 0 or the errors
 * of ls_engine_add_producer, with -ENOTSOCK for a non-socket instead of -ENOTTY/-EBADF, and the
 * stage pipe's -EMFILE/-ENFILE. */
int ls_engine_add_socket_producer(struct ls_engine *e, uint32_t id, uint32_t stream_id, int sock_fd);
/* Producer `id` feeds stream `stream_id` over the shared-memory transport: batches stay in the
 * producer's arena (`arena_fd`, a memfd sealed with F_SEAL_SHRINK, 1 .. max_arena bytes), and the
 * pipe read end `pipe_fd` carries 32-byte descriptors (frame headers with LS_PROTO_FRAME_FLAG_SHM,
 * the payload's arena offset in `reserved`). The engine maps the arena and writes each
 * batch from it: io_uring registers the mapping as a fixed buffer and writes with WRITE_FIXED (a
 * plain WRITE where registration is refused: ls_engine_shm_path says), splice and readwrite pwrite
 * from the mapping. Its pages are never touched in user space, so a producer cannot fault the
 * daemon. The engine owns pipe_fd (as ls_engine_add_producer) and unmaps the arena when the
 * producer ends; the caller keeps (and closes) arena_fd. Returns 0, the errors of
 * ls_engine_add_producer, or for the arena: -EMEDIUMTYPE (not a memfd: it cannot be sealed),
 * -EPERM (not sealed with F_SEAL_SHRINK), -EFBIG (empty or larger than max_arena), mmap's -errno. */
int ls_engine_add_shm_producer(struct ls_engine *e, uint32_t id, uint32_t stream_id, int pipe_fd, int arena_fd,
                               uint64_t max_arena);
/* How shm batches are written, for status, e.g. "WRITE_FIXED from registered buffers", "pwrite from
 * the mapping", or a step down and why ("WRITE from the mapping (registering the arena failed: ...)"). */
const char *ls_engine_shm_path(struct ls_engine *e);
/* io_uring engine, shm batches: LS_SHM_WRITE_RING writes each with WRITE_FIXED through the ring;
 * LS_SHM_WRITE_INLINE pwrites it from the engine thread; LS_SHM_WRITE_AUTO (default) uses the ring
 * where the stream's filesystem completes buffered writes without blocking (xfs, btrfs: io_uring
 * then copies inline) and pwrite elsewhere (ext4, tmpfs: io_uring would hand every buffered write
 * to an io-wq worker, measured 1.27x slower at 1.24x the CPU on ext4), and pwrite for batches up to
 * 256 KiB everywhere. Other engines always pwrite. Returns 0 or -EINVAL. */
#define LS_SHM_WRITE_AUTO 0
#define LS_SHM_WRITE_RING 1
#define LS_SHM_WRITE_INLINE 2
int ls_engine_set_shm_write(struct ls_engine *e, int mode);

/* The engine answers producer `id`'s batches itself: on each landed batch it sends RELEASE(through=
 * seq) on `ctl_fd` (a dup of the producer's AF_UNIX control socket; the engine owns and closes it),
 * from the engine thread, without waiting for the control plane; LS_EV_BATCH_DONE then has err 1.
 * Every other write on that socket must go through ls_engine_ctl_send, so frames never interleave.
 * held=1: the control plane still has bytes of a message queued (the engine waits, see below).
 * The engine steps aside (the event has err 0, the control plane sends RELEASE as before) while the
 * control plane holds the socket, after a failed batch until ls_engine_release_resume (its RELEASE
 * carries the failure and must come first), and when the socket is full.
 * Returns 0, -EINVAL (id), -ENOENT (no such producer). On error the caller keeps ctl_fd. */
int ls_engine_set_release_fd(struct ls_engine *e, uint32_t id, int ctl_fd, int held);
/* Send `len` bytes of the control plane's on producer `id`'s control socket, serialized with the
 * engine's RELEASEs (MSG_DONTWAIT). Returns the bytes sent (fewer: the rest must be sent next, and
 * the engine holds off until all of it is), -EAGAIN (nothing sent), -ENOENT (the engine no longer
 * answers this producer: it ended; write on the socket directly), or send's -errno. */
long ls_engine_ctl_send(struct ls_engine *e, uint32_t id, const void *buf, uint32_t len);
/* After a LS_EV_BATCH_FAILED: the control plane sent its RELEASE with the failure; the engine may
 * answer batches again. Returns 0, -EINVAL, -ENOENT. */
int ls_engine_release_resume(struct ls_engine *e, uint32_t id);

/* Rate limits (off unless set). Bucket `bucket` (0 .. max_producers*2-1; the control plane assigns
 * them, e.g. one per producer and one per uid and stream) refills at bytes_per_s and records_per_s
 * (0 = no limit on that one) up to one second's worth. A batch is let through while every bucket
 * of its producer has tokens left (it may take them below zero: a big batch passes at the average
 * rate), else it is dropped whole and reported LS_EV_BATCH_SUPPRESSED. Returns 0 or -EINVAL. */
int ls_engine_set_bucket(struct ls_engine *e, uint32_t bucket, double bytes_per_s, double records_per_s);
/* Producer `id` draws on buckets b1 and b2 (-1: none). Returns 0, -EINVAL, -ENOENT. */
int ls_engine_set_limit(struct ls_engine *e, uint32_t id, int32_t b1, int32_t b2);

/* Stop producer `id`. drain=1: first land every whole batch already queued in the pipe, then
 * stop; drain=0: stop at once (a batch in flight still completes). Answered by
 * LS_EV_PRODUCER_REMOVED (or EOF/DIED if the pipe ended first). Returns 0, -EINVAL (id out of
 * range) or -ENOENT (no such producer: it ended already). */
int ls_engine_remove_producer(struct ls_engine *e, uint32_t id, int drain);

/* The largest payload_len producer `id` may send (its pipe or stage pipe must hold a whole batch
 * before the engine starts writing it), -EINVAL (id out of range) or -ENOENT (no such producer).
 * For WELCOME's max_batch. */
int ls_engine_producer_max_batch(struct ls_engine *e, uint32_t id);

/* Copy up to `max` pending events into `out`; returns how many (>= 0, never an error). Clears the
 * notify fd. */
int ls_engine_poll_events(struct ls_engine *e, struct ls_event *out, int max);
/* 1 (once) if an event could not be queued (out of memory) since the last call: the caller must
 * reconcile every producer from ls_engine_producer_counters() (last_seq; -ENOENT = it ended). */
int ls_engine_events_lost(struct ls_engine *e);
/* 0, or the -errno that ended the engine thread (LS_EV_ENGINE_FAILED was sent). */
int ls_engine_failed(struct ls_engine *e);

/* Counters of stream `id`, producer `id`, or the whole engine. Return 0, -EINVAL (id out of
 * range), or for a producer -ENOENT (its slot is free: it ended). */
int ls_engine_stream_counters(struct ls_engine *e, uint32_t id, struct ls_counters *out);
int ls_engine_producer_counters(struct ls_engine *e, uint32_t id, struct ls_counters *out);
int ls_engine_total_counters(struct ls_engine *e, struct ls_counters *out);

/* Stop the engine thread and free everything (closes producer pipes, not stream fds). */
void ls_engine_free(struct ls_engine *e);

/* ls_repair_tail (the tail check of a stream file) lives in ls_files.h. */

#endif
