/* ls_ring.c - minimal io_uring ring on raw syscalls (see ls_ring.h). */
#define _GNU_SOURCE
#include "ls_ring.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

static int sys_setup(unsigned entries, struct io_uring_params *p)
{
    long r = syscall(__NR_io_uring_setup, entries, p);
    return r < 0 ? -errno : (int)r;
}

static int sys_enter(int fd, unsigned to_submit, unsigned min_complete, unsigned flags)
{
    long r = syscall(__NR_io_uring_enter, fd, to_submit, min_complete, flags, NULL, 0);
    return r < 0 ? -errno : (int)r;
}

static int sys_register(int fd, unsigned op, const void *arg, unsigned nr)
{
    long r = syscall(__NR_io_uring_register, fd, op, arg, nr);
    return r < 0 ? -errno : (int)r;
}

int ls_ring_init(struct ls_ring *r, unsigned entries, unsigned flags)
{
    struct io_uring_params p;
    memset(&p, 0, sizeof p);
    memset(r, 0, sizeof *r);
    p.flags = flags;
    int fd = sys_setup(entries, &p);
    if (fd < 0)
        return fd;
    r->fd = fd;
    r->features = p.features;
    r->sq_map_len = p.sq_off.array + p.sq_entries * sizeof(unsigned);
    r->cq_map_len = p.cq_off.cqes + p.cq_entries * sizeof(struct io_uring_cqe);
    if (p.features & IORING_FEAT_SINGLE_MMAP) {
        if (r->cq_map_len > r->sq_map_len)
            r->sq_map_len = r->cq_map_len;
        r->cq_map_len = r->sq_map_len;
    }
    r->sq_map = mmap(NULL, r->sq_map_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd,
                     IORING_OFF_SQ_RING);
    if (r->sq_map == MAP_FAILED) {
        int err = -errno;
        close(fd);
        return err;
    }
    if (p.features & IORING_FEAT_SINGLE_MMAP) {
        r->cq_map = r->sq_map;
    } else {
        r->cq_map = mmap(NULL, r->cq_map_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd,
                         IORING_OFF_CQ_RING);
        if (r->cq_map == MAP_FAILED) {
            int err = -errno;
            munmap(r->sq_map, r->sq_map_len);
            close(fd);
            return err;
        }
    }
    r->sqes_len = p.sq_entries * sizeof(struct io_uring_sqe);
    r->sqes = mmap(NULL, r->sqes_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, IORING_OFF_SQES);
    if (r->sqes == MAP_FAILED) {
        int err = -errno;
        ls_ring_exit(r);
        return err;
    }
    char *sq = r->sq_map, *cq = r->cq_map;
    r->sq_head = (unsigned *)(sq + p.sq_off.head);
    r->sq_tail = (unsigned *)(sq + p.sq_off.tail);
    r->sq_mask = (unsigned *)(sq + p.sq_off.ring_mask);
    r->sq_array = (unsigned *)(sq + p.sq_off.array);
    r->sq_flags = (unsigned *)(sq + p.sq_off.flags);
    r->cq_head = (unsigned *)(cq + p.cq_off.head);
    r->cq_tail = (unsigned *)(cq + p.cq_off.tail);
    r->cq_mask = (unsigned *)(cq + p.cq_off.ring_mask);
    r->cqes = (struct io_uring_cqe *)(cq + p.cq_off.cqes);
    r->sq_entries = p.sq_entries;
    r->cq_entries = p.cq_entries;
    return 0;
}

void ls_ring_exit(struct ls_ring *r)
{
    if (r->sqes && r->sqes != MAP_FAILED)
        munmap(r->sqes, r->sqes_len);
    if (r->cq_map && r->cq_map != r->sq_map && r->cq_map != MAP_FAILED)
        munmap(r->cq_map, r->cq_map_len);
    if (r->sq_map && r->sq_map != MAP_FAILED)
        munmap(r->sq_map, r->sq_map_len);
    if (r->fd > 0)
        close(r->fd);
    memset(r, 0, sizeof *r);
    r->fd = -1;
}

struct io_uring_sqe *ls_ring_get_sqe(struct ls_ring *r)
{
    /* Pairs with the kernel's store-release of sq_head once it consumed SQEs. */
    unsigned head = __atomic_load_n(r->sq_head, __ATOMIC_ACQUIRE);
    if (r->sqe_tail - head >= r->sq_entries)
        return NULL;
    struct io_uring_sqe *sqe = &r->sqes[r->sqe_tail & *r->sq_mask];
    r->sqe_tail++;
    memset(sqe, 0, sizeof *sqe);
    return sqe;
}

static unsigned flush_sq(struct ls_ring *r)
{
    unsigned tail = *r->sq_tail;
    unsigned n = r->sqe_tail - r->sqe_head;
    for (unsigned i = 0; i < n; i++) {
        r->sq_array[tail & *r->sq_mask] = r->sqe_head & *r->sq_mask;
        tail++;
        r->sqe_head++;
    }
    /* Store-release: the kernel must see the SQE contents and array entries before the new tail. */
    __atomic_store_n(r->sq_tail, tail, __ATOMIC_RELEASE);
    return n;
}

int ls_ring_submit_and_wait(struct ls_ring *r, unsigned wait_nr)
{
    unsigned n = flush_sq(r);
    unsigned flags = wait_nr ? IORING_ENTER_GETEVENTS : 0;
    if (n == 0 && wait_nr == 0)
        return 0;
    return sys_enter(r->fd, n, wait_nr, flags);
}

int ls_ring_submit_and_wait_timeout(struct ls_ring *r, unsigned wait_nr, uint64_t timeout_ns)
{
    unsigned n = flush_sq(r);
    struct __kernel_timespec ts = {.tv_sec = (long long)(timeout_ns / 1000000000u), .tv_nsec = (long long)(timeout_ns % 1000000000u)};
    struct io_uring_getevents_arg arg;
    memset(&arg, 0, sizeof arg);
    arg.ts = (uint64_t)(uintptr_t)&ts;
    long ret = syscall(__NR_io_uring_enter, r->fd, n, wait_nr, IORING_ENTER_GETEVENTS | IORING_ENTER_EXT_ARG, &arg, sizeof arg);
    return ret < 0 ? -errno : (int)ret;
}

int ls_ring_cq_overflowed(struct ls_ring *r)
{
    return (__atomic_load_n(r->sq_flags, __ATOMIC_ACQUIRE) & IORING_SQ_CQ_OVERFLOW) != 0;
}

struct io_uring_cqe *ls_ring_peek_cqe(struct ls_ring *r)
{
    unsigned head = *r->cq_head;
    /* Load-acquire pairs with the kernel's store-release of cq_tail after writing the CQE. */
    unsigned tail = __atomic_load_n(r->cq_tail, __ATOMIC_ACQUIRE);
    if (head == tail)
        return NULL;
    return &r->cqes[head & *r->cq_mask];
}

void ls_ring_cqe_seen(struct ls_ring *r)
{
    /* Store-release: we are done reading the CQE before the kernel may reuse its slot. */
    __atomic_store_n(r->cq_head, *r->cq_head + 1, __ATOMIC_RELEASE);
}

int ls_ring_op_supported(struct ls_ring *r, int op)
{
    size_t len = sizeof(struct io_uring_probe) + 256 * sizeof(struct io_uring_probe_op);
    struct io_uring_probe *probe = calloc(1, len);
    if (!probe)
        return -ENOMEM;
    int ret = sys_register(r->fd, IORING_REGISTER_PROBE, probe, 256);
    if (ret >= 0)
        ret = (op <= probe->last_op && (probe->ops[op].flags & IO_URING_OP_SUPPORTED)) ? 1 : 0;
    free(probe);
    return ret;
}

int ls_ring_register_files_sparse(struct ls_ring *r, unsigned n)
{
    struct io_uring_rsrc_register reg;
    memset(&reg, 0, sizeof reg);
    reg.nr = n;
    reg.flags = IORING_RSRC_REGISTER_SPARSE;
    int ret = sys_register(r->fd, IORING_REGISTER_FILES2, &reg, sizeof reg);
    if (ret != -EINVAL)
        return ret;
    /* Kernels before 5.19: register an explicit table of -1 entries instead. */
    int *fds = malloc(n * sizeof(int));
    if (!fds)
        return -ENOMEM;
    for (unsigned i = 0; i < n; i++)
        fds[i] = -1;
    ret = sys_register(r->fd, IORING_REGISTER_FILES, fds, n);
    free(fds);
    return ret;
}

int ls_ring_update_file(struct ls_ring *r, unsigned slot, int fd)
{
    struct io_uring_files_update up;
    memset(&up, 0, sizeof up);
    up.offset = slot;
    up.fds = (uint64_t)(uintptr_t)&fd;
    int ret = sys_register(r->fd, IORING_REGISTER_FILES_UPDATE, &up, 1);
    return ret < 0 ? ret : 0;
}

int ls_ring_register_buffers(struct ls_ring *r, const struct iovec *iov, unsigned n)
{
    return sys_register(r->fd, IORING_REGISTER_BUFFERS, iov, n);
}

int ls_ring_register_buffers_sparse(struct ls_ring *r, const struct iovec *first, unsigned n)
{
    /* A table of n slots, slot 0 = *first and the rest empty (NULL, 0), updated as producers come
     * and go (IORING_REGISTER_BUFFERS2, 5.13+). */
    struct iovec *iov = calloc(n, sizeof *iov);
    if (!iov)
        return -ENOMEM;
    iov[0] = *first;
    struct io_uring_rsrc_register reg;
    memset(&reg, 0, sizeof reg);
    reg.nr = n;
    reg.data = (uint64_t)(uintptr_t)iov;
    int ret = sys_register(r->fd, IORING_REGISTER_BUFFERS2, &reg, sizeof reg);
    free(iov);
    return ret < 0 ? ret : 0;
}

int ls_ring_update_buffer(struct ls_ring *r, unsigned slot, void *base, size_t len)
{
    struct iovec iov = {.iov_base = base, .iov_len = len};
    struct io_uring_rsrc_update2 up;
    memset(&up, 0, sizeof up);
    up.offset = slot;
    up.data = (uint64_t)(uintptr_t)&iov;
    up.nr = 1;
    int ret = sys_register(r->fd, IORING_REGISTER_BUFFERS_UPDATE, &up, sizeof up);
    return ret < 0 ? ret : 0;
}
