/* ls_ring.h - the few io_uring calls the engine needs, on raw syscalls.
 *
 * We do not link liburing so that `pip install` works with nothing but gcc and the kernel headers
 * (linux-libc-dev); this is the subset of liburing's queue/register/prep API we use, with the same
 * contract: functions return >= 0 or -errno.
 */
#ifndef LS_RING_H
#define LS_RING_H

#include <linux/io_uring.h>
#include <stdint.h>
#include <sys/uio.h>

struct ls_ring {
    int fd;
    unsigned sq_entries, cq_entries;
    unsigned *sq_head, *sq_tail, *sq_mask, *sq_array;
    unsigned *cq_head, *cq_tail, *cq_mask;
    struct io_uring_sqe *sqes;
    struct io_uring_cqe *cqes;
    void *sq_map, *cq_map;
    size_t sq_map_len, cq_map_len, sqes_len;
    unsigned sqe_tail;   /* local: sqes handed out but not yet published */
    unsigned sqe_head;   /* local: published to the kernel's tail */
    unsigned features;
    unsigned *sq_flags;  /* IORING_SQ_CQ_OVERFLOW: completions wait in the kernel for room in the CQ */
};

int ls_ring_init(struct ls_ring *r, unsigned entries, unsigned flags);
void ls_ring_exit(struct ls_ring *r);
/* A zeroed SQE, or NULL if the SQ is full (submit first). */
struct io_uring_sqe *ls_ring_get_sqe(struct ls_ring *r);
/* Publish prepared SQEs and wait for at least `wait_nr` completions. Returns submitted count or
 * -errno (-EINTR when a signal interrupted the wait; callers loop). */
int ls_ring_submit_and_wait(struct ls_ring *r, unsigned wait_nr);
/* Publish prepared SQEs and wait up to timeout_ns for at least `wait_nr` completions (needs
 * IORING_FEAT_EXT_ARG, 5.11). Returns submitted count, -ETIME on timeout, or -errno. */
int ls_ring_submit_and_wait_timeout(struct ls_ring *r, unsigned wait_nr, uint64_t timeout_ns);
/* 1 if completions overflowed the CQ and wait in the kernel: an io_uring_enter(GETEVENTS) moves
 * them in (ls_ring_submit_and_wait_timeout(r, 0, 0)) once the CQ has room. */
int ls_ring_cq_overflowed(struct ls_ring *r);
/* Next completion or NULL; mark it consumed with ls_ring_cqe_seen(). */
struct io_uring_cqe *ls_ring_peek_cqe(struct ls_ring *r);
void ls_ring_cqe_seen(struct ls_ring *r);
/* 1 if the kernel supports opcode `op`, 0 if not, -errno if the probe failed. */
int ls_ring_op_supported(struct ls_ring *r, int op);
/* A table of `n` empty fixed-file slots. */
int ls_ring_register_files_sparse(struct ls_ring *r, unsigned n);
/* Put fd (or -1 to clear) into fixed-file slot `slot`. */
int ls_ring_update_file(struct ls_ring *r, unsigned slot, int fd);
int ls_ring_register_buffers(struct ls_ring *r, const struct iovec *iov, unsigned n);
/* A buffer table of `n` slots: slot 0 is *first, the others empty until ls_ring_update_buffer. */
int ls_ring_register_buffers_sparse(struct ls_ring *r, const struct iovec *first, unsigned n);
/* Put [base, base+len) into buffer slot `slot` (base NULL, len 0: empty it). The kernel pins the
 * pages (charged to RLIMIT_MEMLOCK without CAP_IPC_LOCK). 0 or -errno. */
int ls_ring_update_buffer(struct ls_ring *r, unsigned slot, void *base, size_t len);

#endif
