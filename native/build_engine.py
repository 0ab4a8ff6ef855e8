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

const char *ls_native_version(void);
"""

ffi = FFI()
ffi.cdef(CDEF)
ffi.set_source(
    "logsink._core",
    f'#include "ls_engine.h"\n#include "ls_frame.h"\n#include "ls_transport.h"\n'
    f'const char *ls_native_version(void) {{ return "{VERSION}"; }}\n',
    sources=[str(HERE / name) for name in ("ls_engine.c", "ls_ring.c", "ls_transport.c")],
    include_dirs=[str(HERE)],
    extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wno-unused-parameter"],
    libraries=["pthread"],
)

if __name__ == "__main__":
    ffi.compile(verbose=True)
