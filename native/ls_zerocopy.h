/* ls_zerocopy.h - MSG_ZEROCOPY sends over TCP and their completions (the producer's network path).
 *
 * Kernel contract (Documentation/networking/msg_zerocopy.rst): with SO_ZEROCOPY set, every send()
 * with MSG_ZEROCOPY that moves bytes gets the next 32-bit notification id; the pages stay
 * referenced until a notification on the socket's error queue covers the id (a [lo, hi] range,
 * sock_extended_err.ee_info/ee_data). SO_EE_CODE_ZEROCOPY_COPIED says the kernel copied anyway
 * (always on loopback): the process should then stop asking. ENOBUFS = optmem exhausted: send
 * that part copied. AF_UNIX refuses SO_ZEROCOPY (EOPNOTSUPP).
 * Functions return >= 0 or -errno.
 */
#ifndef LS_ZEROCOPY_H
#define LS_ZEROCOPY_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

/* setsockopt(SO_ZEROCOPY, 1). */
int ls_zc_enable(int sock);

/* One non-blocking send of buf[0..len). zerocopy=1 adds MSG_ZEROCOPY; if the kernel answers
 * ENOBUFS (optmem exhausted) the same bytes go again as a plain send and *enobufs is set.
 * Returns the bytes sent (> 0: with zerocopy, the call consumed one notification id), -EAGAIN
 * (socket buffer full: poll for POLLOUT), or -errno. Never raises SIGPIPE. */
ssize_t ls_zc_send(int sock, const void *buf, size_t len, int zerocopy, int *enobufs);

/* Read pending zerocopy notifications from the error queue without blocking: up to `max` ranges
 * into lo[i]..hi[i] (inclusive) with copied[i] = 1 if SO_EE_CODE_ZEROCOPY_COPIED. Returns the
 * number of ranges read (0 if none), or -errno (a real socket error queued, e.g. -ECONNRESET). */
int ls_zc_reap(int sock, uint32_t *lo, uint32_t *hi, int *copied, int max);

#endif
