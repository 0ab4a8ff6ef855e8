/* ls_zerocopy.c - MSG_ZEROCOPY sends and error-queue completions (see ls_zerocopy.h). */
#define _GNU_SOURCE
#include "ls_zerocopy.h"

#include <errno.h>
#include <time.h> /* linux/errqueue.h needs struct timespec */
#include <linux/errqueue.h>
#include <netinet/in.h>
#include <string.h>
#include <sys/socket.h>

#ifndef SO_ZEROCOPY
#define SO_ZEROCOPY 60
#endif
#ifndef MSG_ZEROCOPY
#define MSG_ZEROCOPY 0x4000000
#endif

int ls_zc_enable(int sock)
{
    int one = 1;
    return setsockopt(sock, SOL_SOCKET, SO_ZEROCOPY, &one, sizeof one) < 0 ? -errno : 0;
}

ssize_t ls_zc_send(int sock, const void *buf, size_t len, int zerocopy, int *enobufs)
{
    for (;;) {
        int flags = MSG_NOSIGNAL | MSG_DONTWAIT | (zerocopy ? MSG_ZEROCOPY : 0);
        ssize_t r = send(sock, buf, len, flags);
        if (r >= 0)
            return r;
        if (errno == EINTR)
            continue;
        if (errno == ENOBUFS && zerocopy) {
            zerocopy = 0; /* optmem exhausted: this part goes copied */
            *enobufs = 1;
            continue;
        }
        return -errno;
    }
}

int ls_zc_reap(int sock, uint32_t *lo, uint32_t *hi, int *copied, int max)
{
    int n = 0;
    while (n < max) {
        char control[128];
        struct msghdr msg;
        memset(&msg, 0, sizeof msg);
        msg.msg_control = control;
        msg.msg_controllen = sizeof control;
        ssize_t r = recvmsg(sock, &msg, MSG_ERRQUEUE | MSG_DONTWAIT);
        if (r < 0) {
            if (errno == EAGAIN || errno == EINTR)
                break;
            return n ? n : -errno;
        }
        for (struct cmsghdr *cm = CMSG_FIRSTHDR(&msg); cm; cm = CMSG_NXTHDR(&msg, cm)) {
            if (!((cm->cmsg_level == SOL_IP && cm->cmsg_type == IP_RECVERR) ||
                  (cm->cmsg_level == SOL_IPV6 && cm->cmsg_type == IPV6_RECVERR)))
                continue;
            struct sock_extended_err ee;
            memcpy(&ee, CMSG_DATA(cm), sizeof ee);
            if (ee.ee_origin != SO_EE_ORIGIN_ZEROCOPY) {
                if (ee.ee_errno)
                    return n ? n : -(int)ee.ee_errno;
                continue;
            }
            lo[n] = ee.ee_info;
            hi[n] = ee.ee_data;
            copied[n] = (ee.ee_code & SO_EE_CODE_ZEROCOPY_COPIED) ? 1 : 0;
            n++;
        }
    }
    return n;
}
