/* ls_transport.h - the producer side of the data path: arena memory, the data pipe, handover.
 *
 * One implementation for every producer: the Python client calls it through cffi, and
 * clients/c links it. Functions return >= 0 or -errno.
 */
#ifndef LS_TRANSPORT_H
#define LS_TRANSPORT_H

#include <stddef.h>
#include <stdint.h>

#define LS_TRANSPORT_VMSPLICE 1
#define LS_TRANSPORT_COPY 2
#define LS_TRANSPORT_ZEROCOPY 3 /* TCP producers: send(MSG_ZEROCOPY), see ls_zerocopy.h */
#define LS_TRANSPORT_SHM 4      /* local: the arena is a memfd the daemon maps; the pipe carries descriptors */
/* The data pipe of a shm producer carries only 32-byte descriptors: one page holds 128. */
#define LS_SHM_PIPE_SIZE 4096

/* Map `size` bytes of anonymous memory for segments. Sizes of 2 MiB and up are 2 MiB-aligned and
 * advised MADV_HUGEPAGE: vmsplice then references a few huge pages instead of hundreds of 4 KiB
 * pages, which is what makes it cheaper than a copy (docs/architecture.md has the numbers). */
/* Returns 0 and *out, or mmap's -errno (-ENOMEM). ls_arena_unmap returns 0 or -EINVAL. */
int ls_arena_map(size_t size, void **out);
int ls_arena_unmap(void *addr, size_t size);

/* The shm transport's arena: a memfd named `name` (MFD_CLOEXEC | MFD_ALLOW_SEALING) of `size`
 * bytes, sealed F_SEAL_SHRINK | F_SEAL_SEAL (the daemon maps it: it must never shrink under that
 * mapping) and mapped MAP_SHARED read-write, MADV_DONTFORK (a forked child must not write into a
 * batch the daemon is reading) and MADV_HUGEPAGE (advice). Returns 0 with *fd and *out (unmap with
 * ls_arena_unmap_shm, then close *fd), or -errno: memfd_create's (-ENOSYS: no memfd here, use
 * another transport), ftruncate's (-ENOMEM/-EFBIG), fcntl's or mmap's. */
int ls_arena_map_shm(size_t size, const char *name, int *fd, void **out);
int ls_arena_unmap_shm(void *addr, size_t size);

/* A data pipe: O_CLOEXEC, write end O_NONBLOCK, resized to `want_size` if allowed (pipe sizes
 * are charged to the uid: past pipe-user-pages-soft the kernel refuses growth, so we keep what we
 * got). *got_size receives the real capacity (F_GETPIPE_SZ). Returns 0, or -EMFILE/-ENFILE (no fd
 * left) and other pipe2/fcntl -errno. */
int ls_pipe_create(int want_size, int *rfd, int *wfd, int *got_size);

/* Write the 32-byte frame header at `seg` (the segment reserves it) and move header + payload
 * (32 + payload_len bytes) into the pipe: by vmsplice (the pipe references the segment's pages
 * until the daemon consumes them: the caller keeps the segment pinned until RELEASE) or by
 * write (copy). Loops over partial moves; waits for pipe space with poll().
 * Returns 0; -ENOSYS/-EPERM if vmsplice is unavailable (nothing was moved: retry with copy);
 * -EPIPE if the daemon closed the pipe; -ETIMEDOUT if the pipe stayed full for
 * `timeout_ms` (< 0: wait forever) - after a partial move the pipe is out of sync and must be
 * closed (the daemon discards the partial batch). */
int ls_handover(int pipe_w, void *seg, uint32_t payload_len, uint32_t records, uint64_t seq, int transport,
                int timeout_ms);

/* transport shm: announce the batch of `payload_len` bytes at byte `offset` of the arena by one
 * 32-byte descriptor (a frame header with LS_PROTO_FRAME_FLAG_SHM and `reserved` = offset) written
 * to the data pipe. 32 bytes <= PIPE_BUF: the write is atomic, so a timeout or an error never leaves
 * part of a descriptor in the pipe. The caller keeps the bytes pinned until RELEASE covers seq.
 * Returns 0, -EPIPE (the daemon closed the pipe), -ETIMEDOUT (the pipe stayed full for
 * `timeout_ms`; < 0: wait forever) or -errno. */
int ls_shm_handover(int pipe_w, uint64_t offset, uint32_t payload_len, uint32_t records, uint64_t seq, int timeout_ms);

/* Append records to a segment: copy n bytes from src to dst and return how many '\n' they hold
 * (the frame header's record count). One pass in C: counting in Python cost more than the copy. */
size_t ls_copy_records(void *dst, const void *src, size_t n);
/* How many records ('\n') the n bytes at buf hold (glibc's vectorised memchr). */
size_t ls_count_records(const void *buf, size_t n);

/* `logsink pipe`: look at what waits in the pipe `in_fd` without consuming it. tee() up to `max`
 * bytes into the scratch pipe and read them back into `buf` (a copy made only to find record
 * boundaries; the payload itself moves by ls_splice_batch). Blocks until data or EOF.
 * *avail = bytes seen (0 = EOF), *batch = length through the last '\n' (0 if none yet),
 * *records = '\n' count in the batch. Returns 0 or -errno: tee/read/poll errors (-EINVAL: in_fd is
 * not a pipe), -EIO (the scratch pipe gave back less than tee put in). */
int ls_peek_records(int in_fd, int scan_r, int scan_w, char *buf, size_t max, size_t *avail, size_t *batch,
                    uint32_t *records);

/* Hand one batch from a pipe: write the 32-byte frame header into the data pipe, then splice(2)
 * `payload_len` bytes from `in_fd` (a pipe) into it, waiting for space (up to timeout_ms per wait;
 * < 0 forever). Returns 0, -EPIPE, -ETIMEDOUT (the data pipe is then out of sync), or -errno. */
int ls_splice_batch(int pipe_w, int in_fd, uint32_t payload_len, uint32_t records, uint64_t seq, int timeout_ms);

#endif
