/* ls_forward_uring.c - newline windows through the forwarder's own io_uring (see ls_forward.h).
 *
 * The file is mapped read-only and shared (a window of it at a time); one SEND (or SEND_ZC) of the
 * rest of the send window is in flight at a time, with MSG_WAITALL so the kernel finishes a short
 * send itself when the socket drains, and the completion arrives on the ring: no EAGAIN round trip
 * through the event loop per socket buffer. One send at a time keeps the bytes in order without
 * links (a short send does not fail a link, so a linked next send could overtake it).
 *
 * Why a mapping and not registered buffers: page cache pages of a regular file cannot be
 * registered (fixed buffers pin with FOLL_LONGTERM, refused for file-backed mappings: EFAULT on
 * ext4 here), and reading
 * the file into registered buffers first adds the copy that sendfile avoids (measured: pread +
 * SEND_ZC cost the sender more than sendfile; see docs/forwarding.md). SEND copies once from the
 * page cache into the socket's own pages; SEND_ZC hands the socket the page cache pages themselves
 * until its IORING_CQE_F_NOTIF completion, which is counted (the mapping may go away before it: the
 * pages stay pinned by the kernel; what must not happen is counting the bytes twice or never).
 *
 * A mapped byte past the file's end (the file was truncated under us) is not a SIGBUS here: the
 * forwarder never touches the mapping itself, the kernel's copy fails with -EFAULT, reported as
 * -ENODATA like sendfile's early end.
 */
#define _GNU_SOURCE
#include "ls_forward_int.h"
#include "ls_ring.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

/* The mapping follows the cursor in windows of this size (a send window is at most ~4 MiB). */
#define MAP_WINDOW (64u << 20)
#define MAP_ALIGN (2u << 20)
/* user_data of a cancel request (send requests carry their sequence number, from 1). */
#define CANCEL_TAG UINT64_MAX
/* How long a detach, reset or free waits for an in-flight send to finish or be cancelled. */
#define SETTLE_NS (2000000000ull)

static void say(struct ls_forward *f, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

struct fwd_uring {
    struct ls_ring r;
    int zc;
    char *map;
    uint64_t map_off;
    size_t map_len;
    uint64_t seq;        /* user_data of the send in flight */
    int inflight;        /* its result is due */
    int res_due, res;    /* a send's result applied (by whoever reaped it) and not yet acted on */
    uint32_t notifs;     /* SEND_ZC notifications due */
};

static void unmap(struct fwd_uring *u)
{
    if (u->map)
        munmap(u->map, u->map_len);
    u->map = NULL;
    u->map_len = 0;
}

void fwd_uring_reset(struct ls_forward *f)
{
    if (!f->u)
        return;
    fwd_uring_settle(f);
    unmap(f->u); /* it maps the old file (rotation), or bytes since rewritten (truncation) */
}

void fwd_uring_free(struct ls_forward *f)
{
    struct fwd_uring *u = f->u;
    if (!u)
        return;
    fwd_uring_settle(f);
    unmap(u); /* SEND_ZC pages still referenced by the socket stay pinned by the kernel */
    ls_ring_exit(&u->r);
    free(u);
    f->u = NULL;
}

/* One completion: a send's result (counted, the cursor moves) or a SEND_ZC notification. */
static void apply_cqe(struct ls_forward *f, const struct io_uring_cqe *c)
{
    struct fwd_uring *u = f->u;
    if (c->user_data == CANCEL_TAG)
        return;
    if (c->flags & IORING_CQE_F_NOTIF) {
        if (u->notifs)
            u->notifs--;
        f->c.zc_notifs++;
        if ((uint32_t)c->res & IORING_NOTIF_USAGE_ZC_COPIED)
            f->c.zc_copied++;
        return;
    }
    if (!u->inflight || c->user_data != u->seq)
        return; /* cannot happen: one send in flight */
    u->inflight = 0;
    if (c->flags & IORING_CQE_F_MORE)
        u->notifs++;
    f->c.uring_sends++;
    if (c->res > 0) {
        uint64_t n = (uint64_t)c->res;
        f->cursor += n;
        f->wire += n;
        f->c.bytes_sent += n;
        f->c.payload_sent += n;
        f->c.bytes_uring += n;
    }
    u->res = c->res; /* acted on by the next fwd_send_newline_uring, even if ls_forward_ring_reap reaped it */
    u->res_due = 1;
}

/* Apply every completion on the ring. Returns how many. */
static int reap(struct ls_forward *f)
{
    int n = 0;
    for (;;) {
        struct io_uring_cqe *c;
        while ((c = ls_ring_peek_cqe(&f->u->r))) {
            struct io_uring_cqe copy = *c;
            ls_ring_cqe_seen(&f->u->r);
            apply_cqe(f, &copy);
            n++;
        }
        /* SEND_ZC notifications can outrun the CQ: the kernel keeps them until we ask (once the CQ
         * has room), and a notification never asked for would never be counted */
        if (!ls_ring_cq_overflowed(&f->u->r) || ls_ring_submit_and_wait_timeout(&f->u->r, 0, 0) < 0)
            return n;
    }
}

int ls_forward_ring_reap(struct ls_forward *f)
{
    if (!f->u)
        return 0;
    return reap(f);
}

int ls_forward_ring_fd(struct ls_forward *f)
{
    return f->u ? f->u->r.fd : -1;
}

int ls_forward_ring_busy(struct ls_forward *f)
{
    return f->u && f->u->inflight;
}

void fwd_uring_settle(struct ls_forward *f)
{
    struct fwd_uring *u = f->u;
    if (!u)
        return;
    reap(f);
    u->res_due = 0; /* the connection or the file is going away: its last result no longer matters */
    if (!u->inflight)
        return;
    struct io_uring_sqe *q = ls_ring_get_sqe(&u->r);
    if (q) { /* a send waiting for socket space ends now with what it sent so far */
        q->opcode = IORING_OP_ASYNC_CANCEL;
        q->addr = u->seq;
        q->user_data = CANCEL_TAG;
    }
    for (int tries = 0; u->inflight && tries < 4; tries++) {
        int r = ls_ring_submit_and_wait_timeout(&u->r, 1, SETTLE_NS / 4);
        reap(f);
        u->res_due = 0;
        if (r < 0 && r != -EINTR && r != -ETIME && r != -EBUSY)
            break;
    }
    if (u->inflight) { /* never answered: count nothing (a resend, never a loss), forget it */
        u->inflight = 0;
        say(f, "a ring send did not complete within 2 s; "
                 "what it sent is sent again");
    }
}

/* Map the file window holding [off, off + len), at most MAP_WINDOW from an aligned start. Returns
 * the bytes of [off, ...) the mapping covers (> 0) or -errno. */
static int64_t map_at(struct ls_forward *f, uint64_t off, uint64_t len)
{
    struct fwd_uring *u = f->u;
    if (u->map && off >= u->map_off && off < u->map_off + u->map_len) {
        uint64_t have = u->map_off + u->map_len - off;
        return (int64_t)(have < len ? have : len);
    }
    unmap(u);
    uint64_t base = off - off % MAP_ALIGN;
    void *m = mmap(NULL, MAP_WINDOW, PROT_READ, MAP_SHARED, f->fd, (off_t)base);
    if (m == MAP_FAILED)
        return -errno;
    u->map = m;
    u->map_off = base;
    u->map_len = MAP_WINDOW;
    uint64_t have = base + MAP_WINDOW - off;
    return (int64_t)(have < len ? have : len);
}

/* The sends complete on the ring; the caller waits for its fd. */
int fwd_send_newline_uring(struct ls_forward *f)
{
    struct fwd_uring *u = f->u;
    for (;;) {
        reap(f);
        if (u->inflight)
            return -EINPROGRESS;
        int res = u->res_due ? u->res : 1;
        u->res_due = 0;
        if (res == -EFAULT)
            return -ENODATA; /* the mapping ran past the file's end: truncated under us */
        if (res == 0)
            return -ENODATA;
        if (res < 0 && res != -EAGAIN && res != -EINTR && res != -ECANCELED)
            return res; /* the connection failed: the caller detaches and rewinds */
        if (f->cursor >= f->plan_end)
            return 0;
        int64_t len = map_at(f, f->cursor, f->plan_end - f->cursor);
        if (len < 0)
            return (int)len;
        if (len > (1 << 30))
            len = 1 << 30;
        struct io_uring_sqe *q = ls_ring_get_sqe(&u->r);
        if (!q)
            return -EBUSY; /* cannot happen: the ring holds at most a send and a cancel */
        q->opcode = u->zc ? IORING_OP_SEND_ZC : IORING_OP_SEND;
        q->fd = f->sock;
        q->addr = (uint64_t)(uintptr_t)(u->map + (f->cursor - u->map_off));
        q->len = (uint32_t)len;
        /* MSG_MORE only if more follows now (as sendmsg does for octet counting) */
        q->msg_flags = MSG_NOSIGNAL | MSG_WAITALL | (f->cursor + (uint64_t)len < f->end ? MSG_MORE : 0);
        if (u->zc)
            q->ioprio = IORING_SEND_ZC_REPORT_USAGE;
        q->user_data = ++u->seq;
        u->inflight = 1;
        int r = ls_ring_submit_and_wait(&u->r, 0);
        if (r < 0) {
            u->inflight = 0;
            return r;
        }
        /* a send that fit in the socket completed during the submit: its CQE is already there */
    }
}

/* ---------------------------------------------------------------------------------------- */
/* choosing the path                                                                         */

static void say(struct ls_forward *f, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void say(struct ls_forward *f, const char *fmt, ...)
{
    char tmp[sizeof f->path_reason];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(tmp, sizeof tmp, fmt, ap); /* the arguments may include path_reason itself */
    va_end(ap);
    memcpy(f->path_reason, tmp, sizeof tmp);
}

/* A ring that can send: set up, and the op in the probe. 0 or -errno, with the reason written. */
static int ring_for(struct ls_forward *f, int zc)
{
    struct fwd_uring *u = calloc(1, sizeof *u);
    if (!u)
        return -ENOMEM;
    int r = ls_ring_init(&u->r, 8, 0); /* a send and a cancel; notifications may overflow the CQ (reap) */
    if (r < 0) {
        say(f, "io_uring_setup refused: %s%s; forwarding with sendfile", strerror(-r),
            r == -EPERM || r == -ENOSYS ? " (kernel.io_uring_disabled, seccomp, a container's profile or gVisor)" : "");
        free(u);
        return r;
    }
    int op = zc ? IORING_OP_SEND_ZC : IORING_OP_SEND;
    int ok = ls_ring_op_supported(&u->r, op);
    if (ok != 1 || !(u->r.features & IORING_FEAT_EXT_ARG)) {
        say(f, "the kernel's io_uring lacks %s%s",
                 ok != 1 ? (zc ? "IORING_OP_SEND_ZC" : "IORING_OP_SEND") : "IORING_FEAT_EXT_ARG",
                 ok < 0 ? " (the probe was refused)" : "");
        ls_ring_exit(&u->r);
        free(u);
        return ok < 0 ? ok : -EOPNOTSUPP;
    }
    u->zc = zc;
    f->u = u;
    return 0;
}

int ls_forward_use_path(struct ls_forward *f, int want)
{
    if (f->sock >= 0)
        return -EBUSY;
    fwd_uring_free(f);
    const char *env = getenv("LOGSINK_FORWARD_PATH");
    const char *why = "";
    if (env && *env) {
        if (!strcmp(env, "sendfile"))
            want = LS_FWD_PATH_SENDFILE;
        else if (!strcmp(env, "uring-send"))
            want = LS_FWD_PATH_URING_SEND;
        else if (!strcmp(env, "uring-zc"))
            want = LS_FWD_PATH_URING_ZC;
        else if (!strcmp(env, "auto"))
            want = LS_FWD_PATH_AUTO;
        else
            why = " (LOGSINK_FORWARD_PATH is not one of auto, sendfile, uring-send, uring-zc: ignored)";
    }
    if (want == LS_FWD_PATH_AUTO)
        want = LS_FWD_PATH_URING_SEND;
    if (want < LS_FWD_PATH_SENDFILE || want > LS_FWD_PATH_URING_ZC)
        return -EINVAL;
    f->path = LS_FWD_PATH_SENDFILE;
    if (f->framing != LS_FWD_NEWLINE) {
        say(f, "%s framing puts a header before each record: sendmsg "
                 "from the scan buffer, sendfile for records of 16 KiB or more", f->framing == LS_FWD_RELP ? "relp" : "octet-counted");
        return f->path;
    }
    if (want == LS_FWD_PATH_SENDFILE) {
        say(f, "%s%s", env && !strcmp(env, "sendfile") ?
                 "LOGSINK_FORWARD_PATH=sendfile" : "asked for sendfile", why);
        return f->path;
    }
    int zc_refused = 0;
    if (want == LS_FWD_PATH_URING_ZC) {
        if (ring_for(f, 1) == 0) {
            f->path = LS_FWD_PATH_URING_ZC;
            say(f, "io_uring SEND_ZC from a mapping of the file%s", why);
            return f->path;
        }
        zc_refused = 1;
    }
    char first[sizeof f->path_reason];
    memcpy(first, f->path_reason, sizeof first);
    if (ring_for(f, 0) == 0) {
        f->path = LS_FWD_PATH_URING_SEND;
        say(f, "%s%sio_uring SEND from a mapping of the file%s", zc_refused ? first : "", zc_refused ? "; " : "", why);
        return f->path;
    }
    if (zc_refused && strcmp(first, f->path_reason))
        say(f, "%s; %s", first, f->path_reason);
    if (!strstr(f->path_reason, "sendfile"))
        say(f, "%s; forwarding with sendfile", f->path_reason);
    return f->path;
}

int ls_forward_path_reason(struct ls_forward *f, char *buf, uint32_t size)
{
    if (!size)
        return 0;
    snprintf(buf, size, "%s", f->path_reason);
    return (int)strlen(buf);
}
