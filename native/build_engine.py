"""cffi builder for logsink._native: the engine (daemon) and the transport (producers), from native/*.c."""

import pathlib

from cffi import FFI

# setuptools refuses absolute source paths: name them relative to the project root (the build cwd).
HERE = pathlib.Path("native")
VERSION = "0.1.0"  # keep in step with pyproject.toml; the import checks it (logsink/_native.py)

CDEF = """
struct ls_event { uint32_t kind; uint32_t producer_id; uint32_t stream_id; int32_t err;
                  uint64_t seq; uint64_t bytes; uint64_t records; };
struct ls_counters { uint64_t bytes; uint64_t records; uint64_t batches; uint64_t bytes_spliced;
                     uint64_t bytes_copied; uint64_t header_bytes; uint64_t errors; uint64_t offset;
                     uint64_t last_seq; };
struct ls_engine;

#define LS_ENGINE_AUTO ...
#define LS_ENGINE_IO_URING ...
#define LS_ENGINE_SPLICE ...
#define LS_ENGINE_READWRITE ...
#define LS_EV_BATCH_DONE ...
#define LS_EV_BATCH_FAILED ...
#define LS_EV_PRODUCER_EOF ...
#define LS_EV_PRODUCER_DIED ...
#define LS_EV_BAD_FRAME ...
#define LS_EV_PRODUCER_ERROR ...
#define LS_EV_PRODUCER_REMOVED ...
#define LS_EFRAME_MAGIC ...
#define LS_EFRAME_VERSION ...
#define LS_EFRAME_LENGTH ...
#define LS_EFRAME_RECORDS ...
#define LS_FRAME_HEADER_SIZE ...
#define LS_MAX_BATCH_PAYLOAD ...
#define LS_TRANSPORT_VMSPLICE ...
#define LS_TRANSPORT_COPY ...
#define LS_TRANSPORT_ZEROCOPY ...

int ls_engine_new(int kind, uint32_t max_streams, uint32_t max_producers, uint32_t max_batch,
                  struct ls_engine **out);
int ls_engine_kind(struct ls_engine *e);
const char *ls_engine_fallback_reason(struct ls_engine *e);
int ls_engine_notify_fd(struct ls_engine *e);
int ls_engine_set_stream(struct ls_engine *e, uint32_t id, int fd, uint64_t offset);
int ls_engine_pause_stream(struct ls_engine *e, uint32_t id, int paused);
int ls_engine_add_producer(struct ls_engine *e, uint32_t id, uint32_t stream_id, int pipe_fd);
int ls_engine_add_socket_producer(struct ls_engine *e, uint32_t id, uint32_t stream_id, int sock_fd);
int ls_engine_remove_producer(struct ls_engine *e, uint32_t id, int drain);
int ls_engine_poll_events(struct ls_engine *e, struct ls_event *out, int max);
int ls_engine_stream_counters(struct ls_engine *e, uint32_t id, struct ls_counters *out);
int ls_engine_producer_counters(struct ls_engine *e, uint32_t id, struct ls_counters *out);
int ls_engine_total_counters(struct ls_engine *e, struct ls_counters *out);
void ls_engine_free(struct ls_engine *e);
int64_t ls_repair_tail(int fd, uint64_t *size);

int ls_arena_map(size_t size, void **out);
int ls_arena_unmap(void *addr, size_t size);
int ls_pipe_create(int want_size, int *rfd, int *wfd, int *got_size);
int ls_handover(int pipe_w, void *seg, uint32_t payload_len, uint32_t records, uint64_t seq,
                int transport, int timeout_ms);
size_t ls_copy_records(void *dst, const void *src, size_t n);
int ls_peek_records(int in_fd, int scan_r, int scan_w, char *buf, size_t max, size_t *avail, size_t *batch,
                    uint32_t *records);
int ls_splice_batch(int pipe_w, int in_fd, uint32_t payload_len, uint32_t records, uint64_t seq, int timeout_ms);

/* native/ls_producer.h: the producer (control protocol + segments) shared with clients/c */
#define LS_ON_FULL_BLOCK ...
#define LS_ON_FULL_DROP ...
struct ls_producer_opts { int transport; uint32_t segment_size; uint32_t segments; int on_full;
                          int timeout_ms; int flush_interval_ms; };
struct ls_producer_stats { uint64_t batches; uint64_t records; uint64_t bytes; uint64_t dropped_records;
                           uint64_t failed_batches; uint64_t released_through; uint64_t handed_over_through;
                           uint64_t pinned_segments; uint64_t segment_size; uint64_t segments;
                           uint64_t pipe_size; uint64_t waits_for_release;
                           uint64_t zc_sends; uint64_t zc_completed; uint64_t zc_copied; uint64_t zc_enobufs;
                           uint64_t copied_sends; uint64_t zc_switched_to_copy; };
struct ls_producer;
int ls_producer_opts_init(struct ls_producer_opts *opts);
int ls_validate_stream_name(const char *stream);
int ls_default_socket_path(char *buf, size_t size);
int ls_producer_open(const char *stream, const char *socket_path, const struct ls_producer_opts *opts,
                     struct ls_producer **out);
int ls_producer_write(struct ls_producer *p, const void *data, size_t len);
int ls_producer_write_log_json(struct ls_producer *p, double created, const char *level, size_t level_len,
                               const char *logger, size_t logger_len, const char *msg, size_t msg_len,
                               const char *exc, size_t exc_len);
int64_t ls_producer_info(struct ls_producer *p, char *engine, size_t engine_len);
int ls_producer_splice_from(struct ls_producer *p, int fd, uint32_t nbytes, uint32_t records);
int ls_producer_try_write(struct ls_producer *p, const void *data, size_t len);
int ls_producer_flush(struct ls_producer *p, int timeout_ms);
int ls_producer_flush_start(struct ls_producer *p, uint64_t *target);
int ls_producer_flush_check(struct ls_producer *p, uint64_t target);
uint64_t ls_producer_released(struct ls_producer *p);
int ls_producer_event_fd(struct ls_producer *p);
int ls_producer_close(struct ls_producer *p);
int ls_producer_usable(struct ls_producer *p);
int ls_producer_transport(struct ls_producer *p);
int ls_producer_close_within(struct ls_producer *p, int timeout_ms);
int ls_producer_stats(struct ls_producer *p, struct ls_producer_stats *out);
const char *ls_producer_last_error(struct ls_producer *p);

/* native/ls_forward.h: forwarding a stream's file to a downstream socket */
#define LS_FWD_NEWLINE ...
#define LS_FWD_OCTET ...
#define LS_FWD_SENDFILE_MIN ...
struct ls_forward_counters { uint64_t cursor; uint64_t end; uint64_t acked_cursor; uint64_t unacked_bytes;
    uint64_t bytes_sent; uint64_t payload_sent; uint64_t records_sent; uint64_t bytes_sendfile;
    uint64_t bytes_copied; uint64_t framing_bytes; uint64_t connects; uint64_t disconnects;
    uint64_t rewound_bytes; uint64_t dropped_bytes; uint64_t dropped_records; };
struct ls_forward;
int ls_forward_new(int file_fd, uint64_t cursor, int framing, struct ls_forward **out);
int ls_forward_set_socket(struct ls_forward *f, int sock_fd);
int ls_forward_advance(struct ls_forward *f, uint64_t end);
int64_t ls_forward_pump(struct ls_forward *f);
int64_t ls_forward_drop(struct ls_forward *f, uint64_t min_cursor);
int64_t ls_forward_sync_acked(struct ls_forward *f);
int ls_forward_reset(struct ls_forward *f, int file_fd, uint64_t cursor);
int ls_forward_counters(struct ls_forward *f, struct ls_forward_counters *out);
void ls_forward_free(struct ls_forward *f);
int64_t ls_spool_punch(int fd, uint64_t from, uint64_t upto);

/* native/ls_render.h: JSON-line rendering of log records into arena memory */
size_t ls_render_log_json(char *dst, size_t cap, const char *ts, size_t ts_len, const char *level,
                          size_t level_len, const char *logger, size_t logger_len, const char *msg,
                          size_t msg_len, const char *exc, size_t exc_len);

const char *ls_native_version(void);
"""

ffi = FFI()
ffi.cdef(CDEF)
ffi.set_source(
    "logsink._core",
    f'#include "ls_engine.h"\n#include "ls_frame.h"\n#include "ls_transport.h"\n#include "ls_producer.h"\n#include "ls_forward.h"\n#include "ls_render.h"\n'
    f'const char *ls_native_version(void) {{ return "{VERSION}"; }}\n',
    sources=[str(HERE / name) for name in ("ls_engine.c", "ls_ring.c", "ls_transport.c", "ls_producer.c", "ls_msgpack.c", "ls_forward.c", "ls_render.c", "ls_zerocopy.c")],
    include_dirs=[str(HERE)],
    extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wno-unused-parameter"],
    libraries=["pthread"],
)

if __name__ == "__main__":
    ffi.compile(verbose=True)
