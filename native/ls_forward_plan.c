/* ls_forward_plan.c - the forwarder's windows: lay one out from the cursor and hand it to the kernel.
 *
 * A window is a run of whole records starting at the cursor, at most SCAN_BUF bytes or PLAN_RECORDS
 * records (octet-counted and RELP), or about NEWLINE_PLAN bytes (newline); ls_forward.c has already
 * put the cursor at data and f->stop before any hole (guard_window). Newline framing sends the file
 * range with sendfile. Octet counting and RELP lay out pieces: a header per record (in f->prefixes),
 * then its body, from the scan buffer for small records (one sendmsg for many) or by sendfile for
 * long ones. What happens once a window is handed over (checkpoint, drops) is ls_forward.c's.
 */
#define _GNU_SOURCE
#include "ls_forward_int.h"

#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/sendfile.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

/* A newline window ends at the first record boundary past this many bytes (found by scanning one
 * record), so a connection loss rescans at most this much. */
#define NEWLINE_PLAN (4u << 20)

/* Make the window hold bytes from `off`: what the last window read past its last whole record is
 * kept (moved to the front only if it holds no whole record), the rest topped up, so each byte is
 * read from the file once. Returns 0 or -errno. */
static int window_at(struct ls_forward *f, uint64_t off)
{
    struct fbuf *w = &f->win;
    uint32_t keep = 0;
    if (off >= w->off && off < w->off + w->len) {
        keep = (uint32_t)(w->off + w->len - off);
        if (memchr(w->p + (off - w->off), '\n', keep))
            return 0;
        memmove(w->p, w->p + (off - w->off), keep); /* less than one record */
    }
    w->off = off;
    w->len = keep;
    uint64_t want = f->stop - off;
    if (want > SCAN_BUF)
        want = SCAN_BUF;
    if (w->len < want) {
        int r = fwd_pread_all(f, w->p + w->len, (uint32_t)(want - w->len), off + w->len);
        if (r < 0)
            return r;
        w->len = (uint32_t)want;
    }
    return 0;
}

/* Write the header of a record of `len` bytes (its '\n' included) ending at file offset `rec_end`
 * into `pre`; RELP also takes a txnr and puts the command in flight. Returns the header's length,
 * or -EMSGSIZE for a record RELP cannot carry (DATALEN has at most 9 digits). */
static int make_prefix(struct ls_forward *f, char *pre, uint64_t len, uint64_t rec_end)
{
    if (f->framing == LS_FWD_RELP)
        return fwd_relp_prefix(f, pre, len, rec_end);
    int n = fwd_put_u64(pre, len);
    pre[n] = ' ';
    return n + 1;
}

/* Octet-counted and RELP: lay out prefix + body pieces for the records in one scan buffer from the
 * cursor (RELP: at most the free part of the window). Returns the records planned (> 0), 0 if no
 * complete record is there, or -errno. */
int fwd_plan_octet(struct ls_forward *f)
{
    uint64_t p = f->cursor;
    int r = window_at(f, p);
    if (r < 0)
        return r;
    uint32_t n = 0, np = 0, cap = PLAN_RECORDS;
    if (f->framing == LS_FWD_RELP && f->window - f->rcount < cap)
        cap = f->window - f->rcount; /* > 0: pump checked */
    const char *scan = f->win.p + (p - f->win.off), *stop = f->win.p + f->win.len;
    if (f->win.off + f->win.len > f->stop) /* kept from the last window: not past a hole */
        stop = f->win.p + (f->stop - f->win.off);
    while (n < cap && scan < stop) {
        const char *nl = memchr(scan, '\n', (size_t)(stop - scan));
        if (!nl)
            break;
        uint64_t len = (uint64_t)(nl + 1 - scan);
        char *pre = f->prefixes + (size_t)n * PREFIX_MAX;
        int pl = make_prefix(f, pre, len, p + len); /* < SCAN_BUF: fits any framing */
        f->pieces[np++] = (struct piece){.mem = pre, .len = (uint32_t)pl, .flags = PIECE_MEM | PIECE_PREFIX};
        if (len >= LS_FWD_SENDFILE_MIN)
            f->pieces[np++] = (struct piece){.off = p, .len = (uint32_t)len, .flags = PIECE_FILE | PIECE_REC_END, .rec_end = p + len};
        else
            f->pieces[np++] = (struct piece){.mem = scan, .len = (uint32_t)len, .flags = PIECE_MEM | PIECE_REC_END, .rec_end = p + len};
        p += len;
        scan = nl + 1;
        n++;
    }
    if (n == 0) { /* one record longer than the scan buffer: find its end, send it with sendfile */
        uint64_t next;
        int found = fwd_next_boundary(f, f->win.off + f->win.len, f->stop, &next);
        if (found <= 0)
            return found;
        /* The search read past the record's end; those bytes start the next window (no piece of
         * this window points into either buffer: the body goes by sendfile). */
        struct fbuf t = f->win;
        f->win = f->search;
        f->search = t;
        uint64_t len = next - f->cursor;
        if (len > 0x7fffffffu)
            return -EMSGSIZE; /* sendfile moves at most 2 GiB per call; no log line is that long */
        int pl = make_prefix(f, f->prefixes, len, next);
        if (pl < 0)
            return pl;
        f->pieces[np++] = (struct piece){.mem = f->prefixes, .len = (uint32_t)pl, .flags = PIECE_MEM | PIECE_PREFIX};
        f->pieces[np++] = (struct piece){.off = f->cursor, .len = (uint32_t)len, .flags = PIECE_FILE | PIECE_REC_END, .rec_end = next};
        n = 1;
        p = next;
    }
    f->npieces = np;
    f->pi = f->poff = 0;
    f->plan_end = p;
    f->plan_active = 1;
    return (int)n;
}

/* Newline: the window is [cursor, end) or, for a long backlog, up to the first boundary past
 * NEWLINE_PLAN bytes (one record scanned to find it). */
int fwd_plan_newline(struct ls_forward *f)
{
    uint64_t stop = f->stop;
    if (stop - f->cursor > NEWLINE_PLAN) {
        uint64_t next;
        int r = fwd_next_boundary(f, f->cursor + NEWLINE_PLAN - 1, f->stop, &next);
        if (r < 0)
            return r;
        if (r > 0)
            stop = next;
    }
    f->plan_end = stop;
    f->plan_active = 1;
    return 1;
}

/* Account `n` wire bytes of the octet-counted window as sent. */
static void consume(struct ls_forward *f, uint64_t n)
{
    while (n > 0 && f->pi < f->npieces) {
        struct piece *pc = &f->pieces[f->pi];
        uint64_t left = pc->len - f->poff;
        uint64_t take = n < left ? n : left;
        f->poff += (uint32_t)take;
        n -= take;
        if (pc->flags & PIECE_PREFIX)
            f->c.framing_bytes += take;
        if (f->poff < pc->len)
            break;
        if (pc->flags & PIECE_REC_END) {
            uint64_t start = f->cursor;
            f->cursor = pc->rec_end;
            f->c.payload_sent += pc->rec_end - start;
            f->c.records_sent++;
        }
        f->pi++;
        f->poff = 0;
    }
}

/* Send the rest of the octet-counted window. 0 when all of it is handed over, or -errno. */
int fwd_send_octet(struct ls_forward *f)
{
    struct iovec iov[1024];
    while (f->pi < f->npieces) {
        struct piece *pc = &f->pieces[f->pi];
        ssize_t n;
        if (pc->flags & PIECE_FILE) {
            off_t off = (off_t)(pc->off + f->poff);
            n = sendfile(f->sock, f->fd, &off, pc->len - f->poff);
            if (n == 0)
                return -ENODATA;
            if (n > 0)
                f->c.bytes_sendfile += (uint64_t)n;
        } else {
            int k = 0;
            for (uint32_t i = f->pi; i < f->npieces && k < 1024 && (f->pieces[i].flags & PIECE_MEM); i++, k++) {
                uint32_t skip = i == f->pi ? f->poff : 0;
                iov[k].iov_base = (void *)(f->pieces[i].mem + skip);
                iov[k].iov_len = f->pieces[i].len - skip;
            }
            /* MSG_MORE only if more follows now: a RELP window that is full waits for responses,
             * which would never come for bytes the kernel holds back */
            int more = f->pi + (uint32_t)k < f->npieces ||
                       (f->plan_end < f->end && !(f->framing == LS_FWD_RELP && f->rcount >= f->window));
            struct msghdr mh = {.msg_iov = iov, .msg_iovlen = (size_t)k};
            n = sendmsg(f->sock, &mh, MSG_DONTWAIT | MSG_NOSIGNAL | (more ? MSG_MORE : 0));
        }
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return errno == EWOULDBLOCK ? -EAGAIN : -errno;
        }
        f->wire += (uint64_t)n;
        f->c.bytes_sent += (uint64_t)n;
        consume(f, (uint64_t)n);
    }
    return 0;
}

/* Newline: sendfile the window's file range. 0 when all of it is handed over, or -errno. */
int fwd_send_newline(struct ls_forward *f)
{
    while (f->cursor < f->plan_end) {
        uint64_t want = f->plan_end - f->cursor;
        off_t off = (off_t)f->cursor;
        ssize_t n = sendfile(f->sock, f->fd, &off, want > (1u << 30) ? (1u << 30) : want);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return errno == EWOULDBLOCK ? -EAGAIN : -errno;
        }
        if (n == 0)
            return -ENODATA;
        f->cursor += (uint64_t)n;
        f->wire += (uint64_t)n;
        f->c.bytes_sent += (uint64_t)n;
        f->c.bytes_sendfile += (uint64_t)n;
        f->c.payload_sent += (uint64_t)n;
    }
    return 0;
}
