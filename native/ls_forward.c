/* ls_forward.c - forward a stream's file to a downstream socket (see ls_forward.h for the contract).
 *
 * This file is the forwarder itself: the cursor, reading the file (boundary searches),
 * checkpoints and rewinding, the holes/zeros guard, drops, and the public API. A window is laid
 * out and sent by ls_forward_plan.c; RELP's commands and responses are ls_forward_relp.c's; what
 * they share is in ls_forward_int.h.
 *
 * Sending goes in windows ("plans"): a run of whole records starting at the cursor, at most
 * SCAN_BUF bytes or PLAN_RECORDS records (octet-counted), or about NEWLINE_PLAN bytes (newline).
 * Each window ends at a record boundary; when it has been handed to the kernel completely, a
 * checkpoint (wire bytes sent on this connection, file offset) is recorded. On connection loss the
 * newest checkpoint the peer ACKed is the starting point for finding the exact first record it did
 * not get whole: a scan of at most one window. RELP keeps no checkpoints: a lost connection
 * rewinds to acked_cursor, the end of the last record the collector answered for.
 */
#define _GNU_SOURCE
#include "ls_forward_int.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/sockios.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <unistd.h>

#define PUNCH_UNIT LS_SPOOL_PUNCH_UNIT

/* ---------------------------------------------------------------------------------------- */
/* the file                                                                                   */

/* Read [off, off + min(SCAN_BUF, limit - off)) into b. Returns bytes (> 0), -ENODATA if the file
 * ends first (it was truncated under us), or -errno. Counted in bytes_copied. */
int fwd_pread_all(struct ls_forward *f, char *dst, uint32_t len, uint64_t off)
{
    uint32_t have = 0;
    while (have < len) {
        ssize_t n = pread(f->fd, dst + have, len - have, (off_t)(off + have));
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (n == 0)
            return -ENODATA;
        have += (uint32_t)n;
        f->c.bytes_copied += (uint64_t)n;
    }
    return 0;
}

static int fill_upto(struct ls_forward *f, struct fbuf *b, uint64_t off, uint64_t limit, uint32_t max)
{
    uint64_t want = limit - off;
    if (want > max)
        want = max;
    b->len = 0;
    int r = fwd_pread_all(f, b->p, (uint32_t)want, off);
    if (r < 0)
        return r;
    b->off = off;
    b->len = (uint32_t)want;
    return (int)want;
}

static int fill(struct ls_forward *f, struct fbuf *b, uint64_t off, uint64_t limit)
{
    return fill_upto(f, b, off, limit, SCAN_BUF);
}

/* The offset just after the first '\n' in [from, limit): 1 and *out set; 0 if there is none;
 * -errno. Uses the search buffer, whose bytes stay valid (the file below `end` never changes), so
 * walking record by record reads each byte about once. Shared: ls_forward_plan.c finds windows' ends. */
int fwd_next_boundary(struct ls_forward *f, uint64_t from, uint64_t limit, uint64_t *out)
{
    struct fbuf *b = &f->search;
    uint32_t chunk = 4096; /* most searches need one record: start small, grow */
    while (from < limit) {
        if (!(from >= b->off && from < b->off + b->len)) {
            int r = fill_upto(f, b, from, limit, chunk);
            chunk = chunk < SCAN_BUF / 2 ? chunk * 2 : SCAN_BUF;
            if (r < 0)
                return r;
        }
        uint64_t stop = b->off + b->len < limit ? b->off + b->len : limit;
        const char *nl = memchr(b->p + (from - b->off), '\n', (size_t)(stop - from));
        if (nl) {
            *out = b->off + (uint64_t)(nl - b->p) + 1;
            return 1;
        }
        from = stop;
    }
    return 0;
}

/* The largest record boundary in [lo, hi] (lo itself is one): scans backwards from hi. */
static int64_t prev_boundary(struct ls_forward *f, uint64_t lo, uint64_t hi)
{
    struct fbuf *b = &f->search;
    while (hi > lo) {
        uint64_t start = hi - lo > SCAN_BUF ? hi - SCAN_BUF : lo;
        int r = fill(f, b, start, hi);
        if (r < 0)
            return r;
        const char *nl = memrchr(b->p, '\n', (size_t)r);
        if (nl)
            return (int64_t)(start + (uint64_t)(nl - b->p) + 1);
        hi = start;
    }
    return (int64_t)lo;
}

static uint32_t digits(uint64_t v)
{
    uint32_t d = 1;
    while (v >= 10) {
        v /= 10;
        d++;
    }
    return d;
}

static uint64_t wire_len(const struct ls_forward *f, uint64_t rec_len)
{
    return f->framing == LS_FWD_OCTET ? digits(rec_len) + 1 + rec_len : rec_len;
}

/* ---------------------------------------------------------------------------------------- */
/* checkpoints and rewinding                                                                  */

static void checkpoint_push(struct ls_forward *f, uint64_t wire, uint64_t file)
{
    if (f->nck == CHECKPOINTS) { /* thin out: keep the oldest (it may be the only one ACKed) */
        uint32_t j = 1;
        for (uint32_t i = 2; i < f->nck; i += 2)
            f->ck[j++] = f->ck[i];
        f->nck = j;
    }
    f->ck[f->nck++] = (struct checkpoint){wire, file};
}

/* Wire bytes the peer has not ACKed. A socket that cannot say (not TCP, ioctl refused) is taken
 * to have ACKed nothing since the oldest checkpoint: a resend, never a loss. */
static uint64_t unacked(const struct ls_forward *f)
{
    int q = 0;
    if (f->sock < 0)
        return 0;
    if (ioctl(f->sock, SIOCOUTQ, &q) < 0 || q < 0)
        return f->wire - f->ck[0].wire;
    return (uint64_t)q > f->wire ? f->wire : (uint64_t)q;
}

/* Forget checkpoints older than the newest one the peer has ACKed (it becomes ck[0]). */
static void checkpoint_prune(struct ls_forward *f, uint64_t acked)
{
    uint32_t k = 0;
    while (k + 1 < f->nck && f->ck[k + 1].wire <= acked)
        k++;
    if (k) {
        memmove(f->ck, f->ck + k, (f->nck - k) * sizeof f->ck[0]);
        f->nck -= k;
    }
    f->c.acked_cursor = f->ck[0].file;
}

/* The start of the first record the peer has not ACKed whole, given `acked` wire bytes. */
static int64_t acked_boundary(struct ls_forward *f, uint64_t acked)
{
    checkpoint_prune(f, acked);
    uint64_t w = f->ck[0].wire, pos = f->ck[0].file;
    if (f->framing == LS_FWD_NEWLINE) {
        uint64_t hi = pos + (acked - w);
        if (hi > f->cursor)
            hi = f->cursor;
        return prev_boundary(f, pos, hi);
    }
    while (pos < f->cursor) {
        uint64_t next;
        int r = fwd_next_boundary(f, pos, f->cursor, &next);
        if (r <= 0)
            return r < 0 ? r : (int64_t)pos;
        uint64_t wl = wire_len(f, next - pos);
        if (w + wl > acked)
            break;
        w += wl;
        pos = next;
    }
    return (int64_t)pos;
}

static void plan_clear(struct ls_forward *f)
{
    f->plan_active = 0;
    f->npieces = f->pi = f->poff = 0;
    f->plan_end = 0;
}

/* Stop using the socket: rewind to the first record its peer did not ACK whole. Shared: RELP's
 * attach, read and close end a session with it. */
void fwd_detach(struct ls_forward *f)
{
    if (f->sock < 0)
        return;
    fwd_uring_settle(f); /* a ring send in flight: count what it sent before asking SIOCOUTQ */
    uint64_t back;
    if (f->framing == LS_FWD_RELP) { /* the collector answered for everything before acked_cursor */
        back = f->c.acked_cursor;
        f->rcount = f->rhead = 0;
        f->rxlen = 0;
        f->close_sent = 0;
        f->planned_wire = f->acked_wire = 0;
    } else {
        int64_t b = acked_boundary(f, f->wire - unacked(f));
        back = b < 0 ? f->ck[0].file : (uint64_t)b; /* a read error: resend from the checkpoint */
    }
    if (back < f->cursor)
        f->c.rewound_bytes += f->cursor - back;
    f->cursor = back;
    f->c.acked_cursor = back;
    plan_clear(f);
    f->sock = -1;
    f->wire = 0;
    f->nck = 0;
    f->c.unacked_bytes = 0;
    f->c.disconnects++;
}

/* ---------------------------------------------------------------------------------------- */
/* zeros: holes and NUL bytes never go on the wire (see ls_forward.h, "Zeros")                */

/* The first data at or after `off`, at most `limit`: `off` itself unless it is in a hole. A file
 * system without SEEK_DATA reports everything as data, and ENXIO (only a hole up to the file's end,
 * or the file shrank under us) is left to the reads: they see the zeros, or the end (-ENODATA). */
static uint64_t data_from(const struct ls_forward *f, uint64_t off, uint64_t limit)
{
    off_t d = lseek(f->fd, (off_t)off, SEEK_DATA);
    if (d < 0)
        return off;
    return (uint64_t)d < limit ? (uint64_t)d : limit;
}

/* The first hole at or after `off` (the file's end counts as one; UINT64_MAX if unknown). */
static uint64_t hole_from(const struct ls_forward *f, uint64_t off)
{
    off_t h = lseek(f->fd, (off_t)off, SEEK_HOLE);
    return h < 0 ? UINT64_MAX : (uint64_t)h;
}

/* Move the cursor from `from` to `to` without sending what lies between (counted as skipped). */
static void skip_to(struct ls_forward *f, uint64_t to)
{
    f->c.skipped_bytes += to - f->cursor;
    f->cursor = to;
    if (f->sock >= 0)
        checkpoint_push(f, f->wire, to); /* skipped bytes never go on the wire */
    else
        f->c.acked_cursor = to;
}

/* The cursor is at zeros (a hole, or NUL bytes written as data): move it to the first non-NUL byte,
 * and on to the next record boundary if that byte is where a punch ended. Returns 1 if it moved, 0
 * if the cursor was at data, or -errno. */
static int skip_zero_run(struct ls_forward *f)
{
    uint64_t p = f->cursor;
    int in_hole = 0;
    while (p < f->end) {
        uint64_t d = data_from(f, p, f->end);
        if (d > p) {
            in_hole = 1;
            p = d;
            continue;
        }
        if (p == f->cursor) { /* the usual case: one byte says it is data (not counted as copied) */
            char c;
            ssize_t n = pread(f->fd, &c, 1, (off_t)p);
            if (n < 0 && errno == EINTR)
                continue;
            if (n < 0)
                return -errno;
            if (n == 0)
                return -ENODATA;
            if (c != '\0')
                break;
            p++;
            continue;
        }
        int r = fill(f, &f->search, p, f->end);
        if (r < 0)
            return r;
        uint32_t i = 0;
        while (i < (uint32_t)r && f->search.p[i] == '\0')
            i++;
        p += i;
        if (i < (uint32_t)r)
            break;
    }
    if (p == f->cursor)
        return 0;
    if (p < f->end && in_hole && p % PUNCH_UNIT == 0) { /* mid-record: its start was punched with the rest */
        uint64_t next;
        int r = fwd_next_boundary(f, p, f->end, &next);
        if (r < 0)
            return r;
        p = r ? next : f->end;
    }
    skip_to(f, p);
    return 1;
}

/* Before a window: the cursor at data, and f->stop at end or the last record boundary before the
 * first hole in [cursor, end). A record a hole cuts is skipped with the hole. Returns 0 or -errno. */
static int guard_window(struct ls_forward *f)
{
    for (;;) {
        int r = skip_zero_run(f);
        if (r < 0)
            return r;
        f->stop = f->end;
        if (f->cursor >= f->end)
            return 0;
        uint64_t h = hole_from(f, f->cursor);
        if (h >= f->end)
            return 0;
        int64_t b = prev_boundary(f, f->cursor, h);
        if (b < 0)
            return (int)b;
        if ((uint64_t)b > f->cursor) {
            f->stop = (uint64_t)b;
            return 0;
        }
        skip_to(f, h); /* the record at the cursor runs into the hole: skip it, then the hole */
    }
}

/* ---------------------------------------------------------------------------------------- */
/* windows (laid out and sent by ls_forward_plan.c)                                          */

static void apply_drop(struct ls_forward *f);

/* A window is handed over completely. */
static void plan_done(struct ls_forward *f)
{
    f->cursor = f->plan_end;
    if (f->framing != LS_FWD_RELP)
        checkpoint_push(f, f->wire, f->cursor);
    plan_clear(f);
    if (f->drop_to > f->cursor)
        apply_drop(f);
}

/* ---------------------------------------------------------------------------------------- */
/* API                                                                                        */

/* Our own open file description of `fd` (lseek(SEEK_DATA/SEEK_HOLE) moves a description's position;
 * the daemon's writes use explicit offsets, but a dup would still share it), or a dup if the file
 * cannot be reopened through /proc. */
static int own_fd(int fd)
{
    char path[64];
    snprintf(path, sizeof path, "/proc/self/fd/%d", fd);
    int own = open(path, O_RDONLY | O_CLOEXEC);
    struct stat a, b;
    if (own >= 0 && fstat(own, &a) == 0 && fstat(fd, &b) == 0 && a.st_dev == b.st_dev && a.st_ino == b.st_ino)
        return own;
    if (own >= 0)
        close(own);
    own = fcntl(fd, F_DUPFD_CLOEXEC, 0);
    return own < 0 ? -errno : own;
}

int ls_forward_new(int file_fd, uint64_t cursor, int framing, struct ls_forward **out)
{
    if (framing != LS_FWD_NEWLINE && framing != LS_FWD_OCTET && framing != LS_FWD_RELP)
        return -EINVAL;
    struct ls_forward *f = calloc(1, sizeof *f);
    if (!f)
        return -ENOMEM;
    f->fd = own_fd(file_fd);
    if (f->fd < 0) {
        int err = f->fd;
        free(f);
        return err;
    }
    f->win.p = malloc(SCAN_BUF);
    f->search.p = malloc(SCAN_BUF);
    f->pieces = malloc(2 * PLAN_RECORDS * sizeof *f->pieces);
    f->prefixes = malloc((size_t)PLAN_RECORDS * PREFIX_MAX);
    if (framing == LS_FWD_RELP) {
        f->window = LS_RELP_WINDOW_DEFAULT;
        f->ring = malloc(f->window * sizeof *f->ring);
        f->rx = malloc(RX_BUF);
    }
    if (!f->win.p || !f->search.p || !f->pieces || !f->prefixes || (framing == LS_FWD_RELP && (!f->ring || !f->rx))) {
        ls_forward_free(f);
        return -ENOMEM;
    }
    f->sock = -1;
    f->framing = framing;
    f->path = LS_FWD_PATH_SENDFILE;
    snprintf(f->path_reason, sizeof f->path_reason, "the default (no ls_forward_use_path)");
    f->cursor = f->end = cursor;
    f->c.acked_cursor = cursor;
    *out = f;
    return 0;
}

int ls_forward_set_socket(struct ls_forward *f, int sock_fd)
{
    if (sock_fd == f->sock)
        return 0;
    if (sock_fd >= 0 && f->framing == LS_FWD_RELP)
        return -EINVAL; /* a RELP socket needs its open handshake: ls_forward_relp_attach */
    fwd_detach(f);
    if (sock_fd < 0)
        return 0;
    f->sock = sock_fd;
    f->wire = 0;
    f->nck = 0;
    checkpoint_push(f, 0, f->cursor);
    f->c.acked_cursor = f->cursor;
    f->c.connects++;
    return 0;
}

int ls_forward_advance(struct ls_forward *f, uint64_t end)
{
    if (end < f->end)
        return -ERANGE;
    f->end = end;
    return 0;
}

int64_t ls_forward_pump(struct ls_forward *f)
{
    if (f->sock < 0)
        return -ENOTCONN;
    if (f->close_sent)
        return -ENOBUFS; /* no command may follow `close` */
    uint64_t before = f->c.bytes_sent;
    int r = 0;
    for (;;) {
        if (!f->plan_active) {
            if (f->cursor >= f->end)
                break;
            if (f->framing == LS_FWD_RELP && f->rcount >= f->window) {
                r = -ENOBUFS; /* the window is full: responses first */
                break;
            }
            r = guard_window(f);
            if (r < 0 || f->cursor >= f->end)
                break;
            r = f->framing == LS_FWD_NEWLINE ? fwd_plan_newline(f) : fwd_plan_octet(f);
            if (r <= 0)
                break; /* 0: the file does not have a whole record yet (cannot happen after advance) */
        }
        if (f->framing != LS_FWD_NEWLINE)
            r = fwd_send_octet(f);
        else
            r = f->u ? fwd_send_newline_uring(f) : fwd_send_newline(f);
        if (r < 0)
            break;
        plan_done(f);
    }
    if (r < 0 && r != -EAGAIN && r != -ENODATA && r != -ENOBUFS && r != -EINPROGRESS) {
        fwd_detach(f); /* the connection is gone: rewind to what its peer ACKed */
        return r;
    }
    if (f->framing != LS_FWD_RELP)
        checkpoint_prune(f, f->wire - unacked(f));
    if (r < 0)
        return r;
    return (int64_t)(f->c.bytes_sent - before);
}

static void apply_drop(struct ls_forward *f)
{
    uint64_t target = f->drop_to > f->end ? f->end : f->drop_to;
    f->drop_to = 0;
    uint64_t pos = f->cursor, records = 0;
    while (pos < target) {
        uint64_t next;
        int r = fwd_next_boundary(f, pos, f->end, &next);
        if (r <= 0)
            break;
        pos = next;
        records++;
    }
    f->c.dropped_bytes += pos - f->cursor;
    f->c.dropped_records += records;
    f->cursor = pos;
    if (f->sock < 0)
        f->c.acked_cursor = pos;
    else if (f->framing != LS_FWD_RELP)
        checkpoint_push(f, f->wire, pos); /* skipped bytes never go on the wire */
    else if (f->rcount == 0)
        f->c.acked_cursor = pos;
    else /* the rsp to the last command in flight acknowledges the skipped bytes too (a connection
          * lost before it replays them: sent again, never lost) */
        f->ring[(f->rhead + f->rcount - 1) % f->window].rec_end = pos;
}

int64_t ls_forward_drop(struct ls_forward *f, uint64_t min_cursor)
{
    if (min_cursor <= f->cursor)
        return 0;
    if (min_cursor > f->drop_to)
        f->drop_to = min_cursor;
    if (f->plan_active)
        return 0;
    uint64_t before = f->cursor;
    apply_drop(f);
    return (int64_t)(f->cursor - before);
}

int64_t ls_forward_skip_zeros(struct ls_forward *f)
{
    if (f->plan_active || f->cursor >= f->end)
        return 0; /* a window in flight was checked when it was planned */
    uint64_t before = f->c.skipped_bytes;
    int r = guard_window(f);
    if (r < 0)
        return r;
    return (int64_t)(f->c.skipped_bytes - before);
}

int64_t ls_forward_sync_acked(struct ls_forward *f)
{
    if (f->sock < 0 || f->framing == LS_FWD_RELP) /* RELP's is exact: what the collector answered */
        return (int64_t)f->c.acked_cursor;
    int64_t b = acked_boundary(f, f->wire - unacked(f));
    if (b < 0)
        return b;
    f->c.acked_cursor = (uint64_t)b;
    return b;
}

int ls_forward_reset(struct ls_forward *f, int file_fd, uint64_t cursor)
{
    if (file_fd >= 0) {
        int fd = own_fd(file_fd);
        if (fd < 0)
            return fd;
        close(f->fd);
        f->fd = fd;
    }
    fwd_uring_reset(f); /* the old window's send in flight ends first; the old mapping goes */
    plan_clear(f);
    f->search.len = f->win.len = 0; /* the bytes may have changed (truncated and rewritten) */
    f->cursor = f->end = cursor;
    f->drop_to = 0;
    f->c.acked_cursor = cursor;
    if (f->framing == LS_FWD_RELP) { /* responses still due for the old bytes: they ack up to here */
        for (uint32_t i = 0; i < f->rcount; i++)
            f->ring[(f->rhead + i) % f->window].rec_end = cursor;
    } else if (f->sock >= 0) { /* rewinds can no longer reach the old bytes: start a fresh checkpoint */
        f->nck = 0;
        checkpoint_push(f, f->wire, cursor);
    }
    return 0;
}

int ls_forward_counters(struct ls_forward *f, struct ls_forward_counters *out)
{
    f->c.cursor = f->cursor;
    f->c.end = f->end;
    f->c.relp_inflight = f->rcount;
    if (f->framing == LS_FWD_RELP)
        f->c.unacked_bytes = f->planned_wire - f->acked_wire;
    else
        f->c.unacked_bytes = unacked(f);
    if (f->sock >= 0 && f->framing != LS_FWD_RELP)
        checkpoint_prune(f, f->wire - f->c.unacked_bytes); /* ACKs arrive while we are idle too */
    *out = f->c;
    return 0;
}

void ls_forward_free(struct ls_forward *f)
{
    if (!f)
        return;
    fwd_uring_free(f);
    if (f->fd >= 0)
        close(f->fd);
    free(f->win.p);
    free(f->search.p);
    free(f->pieces);
    free(f->prefixes);
    free(f->ring);
    free(f->rx);
    free(f);
}

int64_t ls_spool_punch(int fd, uint64_t from, uint64_t upto)
{
    uint64_t to = upto - upto % PUNCH_UNIT;
    if (to <= from)
        return (int64_t)from;
    if (fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)from, (off_t)(to - from)) < 0)
        return -errno;
    return (int64_t)to;
}
