/* Internal: cutting short a producer's wait for pipe or socket room when it is being closed.
 *
 * A handover waits for room while holding the producer's lock (ls_transport.c: wait_writable), with
 * no deadline when the application set none. ls_producer_shutdown must then still end within its
 * timeout: it stores a close deadline and signals `fd` (an eventfd that stays readable) before it
 * takes the lock; a waiting handover wakes on the fd, and from then on waits no longer than the
 * deadline, then fails with -ETIMEDOUT like any handover that ran out of time. */
#ifndef LS_CANCEL_H
#define LS_CANCEL_H

#include <stdint.h>

struct ls_wait_cancel {
    int fd;                        /* eventfd, readable once closing began */
    const int64_t *close_deadline; /* monotonic ms, atomic; < 0 until closing began (or no bound) */
};

/* The calling thread's waits in ls_transport.c honour c until called again with NULL. */
void ls_transport_cancel_scope(const struct ls_wait_cancel *c);

/* The deadline a wait under c (NULL: none) must keep, given its own (< 0: none); *watch_fd gets
 * the fd to poll for the start of closing, or -1 once it began (the deadline covers it then). */
int64_t ls_wait_deadline(const struct ls_wait_cancel *c, int64_t deadline, int *watch_fd);

#endif
