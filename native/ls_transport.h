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

/* Map `size` bytes of anonymous memory for segments. Sizes of 2 MiB and up are 2 MiB-aligned and
 * advised MADV_HUGEPAGE: vmsplice then references a few huge pages instead of hundreds of 4 KiB
 * pages, which is what makes it cheaper than a copy (docs/architecture.md has the numbers). */
int ls_arena_map(size_t size, void **out);
int ls_arena_unmap(void *addr, size_t size);

/* A data pipe: O_CLOEXEC, write end O_NONBLOCK, resized to `want_size` if allowed (pipe sizes
 * are charged to the uid: past pipe-user-pages-soft the kernel refuses growth, so we keep what we
 * got). *got_size receives the real capacity (F_GETPIPE_SZ). */
int ls_pipe_create(int want_size, int *rfd, int *wfd, int *got_size);

/* Write the 32-byte frame header at `seg` (the segment reserves it) and move header + payload
 * (32 + payload_len bytes) into the pipe: by vmsplice (the pipe references the segment's pages
 * until the daemon consumes them: the caller keeps the segment pinned until RELEASE) or by
 * write (copy). Loops over partial moves; waits for pipe space with poll().
 * Returns 0; -EPIPE if the daemon closed the pipe; -ETIMEDOUT if the pipe stayed full for
 * `timeout_ms` (< 0: wait forever) - after a partial move the pipe is out of sync and must be
 * closed (the daemon discards the partial batch). */
int ls_handover(int pipe_w, void *seg, uint32_t payload_len, uint32_t records, uint64_t seq, int transport,
                int timeout_ms);

/* Append records to a segment: copy n bytes from src to dst and return how many '\n' they hold
 * (the frame header's record count). One pass in C: counting in Python cost more than the copy. */
size_t ls_copy_records(void *dst, const void *src, size_t n);

#endif
