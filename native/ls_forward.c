/* ls_forward.c - forward a stream's file to a downstream socket (see ls_forward.h for the contract).
 *
 * Sending goes in windows ("plans"): a run of whole records starting at the cursor, at most
 * SCAN_BUF bytes or PLAN_RECORDS records (octet-counted), or about NEWLINE_PLAN bytes (newline).
 * Each window ends at a record boundary; when it has been handed to the kernel completely, a
 * checkpoint (wire bytes sent on this connection, file offset) is recorded. On connection loss the
 * newest checkpoint the peer ACKed is the starting point for finding the exact first record it did
 * not get whole: a scan of at most one window.
 *
 * RELP sends like octet counting (a header per record, the bodies from the scan buffer or by
 * sendfile) but keeps a ring of the commands awaiting their rsp (txnr, the record's end, the wire
 * bytes through it): an "rsp 200" for the oldest moves acked_cursor to its record's end, and a lost
 * connection rewinds to acked_cursor. No SIOCOUTQ, no checkpoints: the collector says what it has.
 */
#define _GNU_SOURCE
#include "ls_forward.h"

#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/sockios.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/sendfile.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

/* The scan buffer: a window of small records is one pread and one sendmsg. */
#define SCAN_BUF (256u << 10)
/* Records per octet-counted window: two iovecs each (prefix, body) must fit IOV_MAX (1024). */
#define PLAN_RECORDS 511
/* A newline window ends at the first record boundary past this many bytes (found by scanning one
 * record), so a connection loss rescans at most this much. */
#define NEWLINE_PLAN (4u << 20)
/* Checkpoints kept per connection; when full, every other one is dropped (coarser, still exact). */
#define CHECKPOINTS 256
/* A record's header: "LEN " (octet counting, at most 20 digits + space) or "TXNR syslog DATALEN "
 * (RELP, at most 9 + 8 + 9 + 1 bytes). */
#define PREFIX_MAX 32
/* RELP: the collector's responses are read into this ("TXNR rsp 6 200 OK\n" each). */
#define RX_BUF (64u << 10)
#define PUNCH_UNIT LS_SPOOL_PUNCH_UNIT

enum { PIECE_MEM = 1, PIECE_FILE = 2, PIECE_PREFIX = 4, PIECE_REC_END = 8 };

struct piece {
    const char *mem;   /* PIECE_MEM */
    uint64_t off;      /* PIECE_FILE: file offset */
    uint32_t len;
    uint32_t flags;
    uint64_t rec_end;  /* PIECE_REC_END: the file offset just after the record this piece ends */
};

/* A buffer of file bytes [off, off + len). */
struct fbuf {
    char *p;
    uint64_t off;
    uint32_t len;
};

struct checkpoint {
    uint64_t wire;  /* wire bytes handed to the kernel on this connection */
    uint64_t file;  /* the record boundary they end at */
};

/* A RELP command awaiting its rsp. */
struct relp_txn {
    uint64_t rec_end;   /* the file offset after its record: acked_cursor once it is answered */
    uint64_t wire_end;  /* wire bytes planned on this connection through this command */
    uint32_t txnr;
};

struct ls_forward {
    int fd, sock, framing;
    uint64_t cursor, end;
    uint64_t stop;      /* this window may not pass it: end, or the last record boundary before a hole */
    uint64_t drop_to;   /* a drop requested while a window was in flight */
    /* the current window */
    struct piece *pieces;
    uint32_t npieces, pi, poff;
    uint64_t plan_end;  /* newline: the window ends here; 0 = no window */
    int plan_active;
    struct fbuf win;     /* the window's bytes (small records leave from here) */
    struct fbuf search;  /* boundary searches: rewinds, drops, long records */
    char *prefixes;  /* PREFIX_MAX bytes per record of the window */
    /* connection */
    uint64_t wire;
    struct checkpoint ck[CHECKPOINTS];
    uint32_t nck;
    /* RELP */
    struct relp_txn *ring;   /* `window` slots; rcount in flight from rhead (the oldest) */
    uint32_t window, rhead, rcount;
    uint32_t txnr_next, close_txnr;
    int close_sent;
    uint64_t planned_wire, acked_wire;
    char *rx;                /* responses read, not yet parsed whole */
    uint32_t rxlen;
    char err[128];
    struct ls_forward_counters c;
};

static uint32_t txnr_after(uint32_t t)
{
    return t >= LS_RELP_TXNR_MAX ? 1 : t + 1;
}

/* ---------------------------------------------------------------------------------------- */
/* the file                                                                                   */

/* Read [off, off + min(SCAN_BUF, limit - off)) into b. Returns bytes (> 0), -ENODATA if the file
 * ends first (it was truncated under us), or -errno. Counted in bytes_copied. */
static int fill_upto(struct ls_forward *f, struct fbuf *b, uint64_t off, uint64_t limit, uint32_t max)
{
    uint64_t want = limit - off;
    if (want > max)
        want = max;
    uint32_t have = 0;
    b->len = 0;
    while (have < want) {
        ssize_t n = pread(f->fd, b->p + have, want - have, (off_t)(off + have));
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (n == 0)
            return -ENODATA;
        have += (uint32_t)n;
    }
    b->off = off;
    b->len = have;
    f->c.bytes_copied += have;
    return (int)have;
}

static int fill(struct ls_forward *f, struct fbuf *b, uint64_t off, uint64_t limit)
{
    return fill_upto(f, b, off, limit, SCAN_BUF);
}

/* The offset just after the first '\n' in [from, limit): 1 and *out set; 0 if there is none;
 * -errno. Uses the search buffer, whose bytes stay valid (the file below `end` never changes), so
 * walking record by record reads each byte about once. */
static int next_boundary(struct ls_forward *f, uint64_t from, uint64_t limit, uint64_t *out)
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
        int r = next_boundary(f, pos, f->cursor, &next);
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

/* Stop using the socket: rewind to the first record its peer did not ACK whole. */
static void detach(struct ls_forward *f)
{
    if (f->sock < 0)
        return;
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
        int r = next_boundary(f, p, f->end, &next);
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
/* windows                                                                                    */

static void apply_drop(struct ls_forward *f);

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
    while (w->len < want) {
        ssize_t n = pread(f->fd, w->p + w->len, want - w->len, (off_t)(off + w->len));
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (n == 0)
            return -ENODATA;
        w->len += (uint32_t)n;
        f->c.bytes_copied += (uint64_t)n;
    }
    return 0;
}

/* Write the header of a record of `len` bytes (its '\n' included) ending at file offset `rec_end`
 * into `pre`; RELP also takes a txnr and puts the command in flight. Returns the header's length,
 * or -EMSGSIZE for a record RELP cannot carry (DATALEN has at most 9 digits). */
static int make_prefix(struct ls_forward *f, char *pre, uint64_t len, uint64_t rec_end)
{
    if (f->framing != LS_FWD_RELP)
        return snprintf(pre, PREFIX_MAX, "%llu ", (unsigned long long)len);
    uint64_t dlen = len - 1; /* the record's '\n' is the frame's trailer */
    if (dlen > LS_RELP_TXNR_MAX)
        return -EMSGSIZE;
    uint32_t t = f->txnr_next;
    int pl = dlen ? snprintf(pre, PREFIX_MAX, "%u syslog %llu ", t, (unsigned long long)dlen)
                  : snprintf(pre, PREFIX_MAX, "%u syslog 0", t); /* no data: no SP before the trailer */
    f->txnr_next = txnr_after(t);
    f->planned_wire += (uint64_t)pl + len;
    f->ring[(f->rhead + f->rcount) % f->window] = (struct relp_txn){rec_end, f->planned_wire, t};
    f->rcount++;
    return pl;
}

/* Octet-counted and RELP: lay out prefix + body pieces for the records in one scan buffer from the
 * cursor (RELP: at most the free part of the window). Returns the records planned (> 0), 0 if no
 * complete record is there, or -errno. */
static int plan_octet(struct ls_forward *f)
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
        int found = next_boundary(f, f->win.off + f->win.len, f->stop, &next);
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
static int plan_newline(struct ls_forward *f)
{
    uint64_t stop = f->stop;
    if (stop - f->cursor > NEWLINE_PLAN) {
        uint64_t next;
        int r = next_boundary(f, f->cursor + NEWLINE_PLAN - 1, f->stop, &next);
        if (r < 0)
            return r;
        if (r > 0)
            stop = next;
    }
    f->plan_end = stop;
    f->plan_active = 1;
    return 1;
}

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
static int send_octet(struct ls_forward *f)
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

static int send_newline(struct ls_forward *f)
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
    detach(f);
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
            r = f->framing == LS_FWD_NEWLINE ? plan_newline(f) : plan_octet(f);
            if (r <= 0)
                break; /* 0: the file does not have a whole record yet (cannot happen after advance) */
        }
        r = f->framing == LS_FWD_NEWLINE ? send_newline(f) : send_octet(f);
        if (r < 0)
            break;
        plan_done(f);
    }
    if (r < 0 && r != -EAGAIN && r != -ENODATA && r != -ENOBUFS) {
        detach(f); /* the connection is gone: rewind to what its peer ACKed */
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
        int r = next_boundary(f, pos, f->end, &next);
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

/* ---------------------------------------------------------------------------------------- */
/* RELP                                                                                       */

int ls_forward_relp_window(struct ls_forward *f, uint32_t window)
{
    if (f->framing != LS_FWD_RELP || window < 1 || window > LS_RELP_WINDOW_MAX)
        return -EINVAL;
    if (f->sock >= 0)
        return -EBUSY;
    struct relp_txn *ring = realloc(f->ring, window * sizeof *ring);
    if (!ring)
        return -ENOMEM;
    f->ring = ring;
    f->window = window;
    return 0;
}

int ls_forward_relp_attach(struct ls_forward *f, int sock_fd, uint32_t next_txnr)
{
    if (f->framing != LS_FWD_RELP || sock_fd < 0 || next_txnr < 1 || next_txnr > LS_RELP_TXNR_MAX)
        return -EINVAL;
    detach(f);
    f->sock = sock_fd;
    f->wire = 0;
    f->txnr_next = next_txnr;
    f->c.acked_cursor = f->cursor;
    f->c.connects++;
    return 0;
}

static int relp_protocol_error(struct ls_forward *f, const char *what)
{
    snprintf(f->err, sizeof f->err, "%s", what);
    return -EPROTO;
}

/* One whole frame from the collector. 0, or the end of the session (see ls_forward_relp_read). */
static int relp_frame(struct ls_forward *f, uint32_t txnr, const char *cmd, const char *data, uint32_t dlen)
{
    if (txnr == 0) /* a hint: only serverclose is defined; others are ignorable by definition */
        return strcmp(cmd, "serverclose") == 0 ? -ECONNABORTED : 0;
    if (strcmp(cmd, "rsp") != 0) {
        snprintf(f->err, sizeof f->err, "the collector sent the command \"%.32s\"; a server only sends rsp", cmd);
        return -EPROTO;
    }
    if (f->close_sent && f->rcount == 0 && txnr == f->close_txnr)
        return -ESHUTDOWN;
    if (f->rcount == 0 || txnr != f->ring[f->rhead].txnr) {
        snprintf(f->err, sizeof f->err, "rsp for txnr %u, but the oldest command awaiting one is %s%u", txnr,
                 f->rcount ? "txnr " : "none, next txnr ", f->rcount ? f->ring[f->rhead].txnr : f->txnr_next);
        return -EPROTO;
    }
    if (dlen < 3 || memcmp(data, "200", 3) != 0 || (dlen > 3 && data[3] != ' ' && data[3] != '\n')) {
        uint32_t n = 0;
        while (n < dlen && n < 100 && data[n] != '\n')
            n++;
        snprintf(f->err, sizeof f->err, "%.*s", (int)n, data ? data : "");
        f->c.relp_refused++;
        return -EREMOTEIO;
    }
    struct relp_txn *t = &f->ring[f->rhead];
    f->c.acked_cursor = t->rec_end;
    f->acked_wire = t->wire_end;
    f->rhead = (f->rhead + 1) % f->window;
    f->rcount--;
    f->c.relp_acked++;
    return 0;
}

/* Apply the whole frames in the receive buffer, keep a partial last one. 0 or a session end. */
static int relp_parse(struct ls_forward *f)
{
    uint32_t pos = 0;
    int r = 0;
    while (pos < f->rxlen && r == 0) {
        const char *p = f->rx + pos;
        uint32_t avail = f->rxlen - pos, i = 0, c0, d0;
        uint32_t txnr = 0, dlen = 0;
        char cmd[33];
        while (i < avail && isdigit((unsigned char)p[i])) {
            if (i == 9)
                return relp_protocol_error(f, "a txnr of more than 9 digits");
            txnr = txnr * 10 + (uint32_t)(p[i++] - '0');
        }
        if (i == avail)
            break;
        if (i == 0 || p[i] != ' ')
            return relp_protocol_error(f, "a frame that does not start with TXNR SP");
        c0 = ++i;
        while (i < avail && isalpha((unsigned char)p[i])) {
            if (i - c0 == 32)
                return relp_protocol_error(f, "a command of more than 32 letters");
            i++;
        }
        if (i == avail)
            break;
        if (i == c0 || p[i] != ' ')
            return relp_protocol_error(f, "a frame without COMMAND SP");
        memcpy(cmd, p + c0, i - c0);
        cmd[i - c0] = '\0';
        d0 = ++i;
        while (i < avail && isdigit((unsigned char)p[i])) {
            if (i - d0 == 9)
                return relp_protocol_error(f, "a DATALEN of more than 9 digits");
            dlen = dlen * 10 + (uint32_t)(p[i++] - '0');
        }
        if (i == avail)
            break;
        if (i == d0)
            return relp_protocol_error(f, "a frame without DATALEN");
        const char *data = NULL;
        if (dlen == 0) {
            if (p[i] != '\n')
                return relp_protocol_error(f, "a frame with DATALEN 0 not followed by LF");
            i++;
        } else {
            if (p[i] != ' ')
                return relp_protocol_error(f, "a frame without SP after DATALEN");
            if (dlen > RX_BUF / 2)
                return relp_protocol_error(f, "a response of more than 32 KiB");
            if (avail - i - 1 < dlen + 1)
                break;
            data = p + i + 1;
            i += 1 + dlen;
            if (p[i] != '\n')
                return relp_protocol_error(f, "a frame whose DATA is not followed by the LF trailer");
            i++;
        }
        pos += i;
        r = relp_frame(f, txnr, cmd, data, dlen);
    }
    memmove(f->rx, f->rx + pos, f->rxlen - pos);
    f->rxlen -= pos;
    return r;
}

int64_t ls_forward_relp_read(struct ls_forward *f)
{
    if (f->framing != LS_FWD_RELP)
        return -EINVAL;
    if (f->sock < 0)
        return -ENOTCONN;
    uint64_t before = f->c.relp_acked;
    int r = 0;
    while (r == 0) {
        ssize_t n = recv(f->sock, f->rx + f->rxlen, RX_BUF - f->rxlen, MSG_DONTWAIT);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                break;
            r = -errno;
        } else if (n == 0) {
            r = -EPIPE;
        } else {
            f->rxlen += (uint32_t)n;
            r = relp_parse(f);
        }
    }
    if (r < 0) {
        detach(f); /* the session is over: rewind to the last record the collector answered for */
        return r;
    }
    return (int64_t)(f->c.relp_acked - before);
}

int64_t ls_forward_relp_close(struct ls_forward *f)
{
    if (f->framing != LS_FWD_RELP)
        return -EINVAL;
    if (f->sock < 0)
        return -ENOTCONN;
    if (f->rcount || f->plan_active || f->close_sent)
        return -EBUSY;
    char buf[24];
    int len = snprintf(buf, sizeof buf, "%u close 0\n", f->txnr_next);
    ssize_t n;
    do
        n = send(f->sock, buf, (size_t)len, MSG_DONTWAIT | MSG_NOSIGNAL);
    while (n < 0 && errno == EINTR);
    if (n < 0)
        return errno == EWOULDBLOCK ? -EAGAIN : -errno;
    if (n != len) { /* a torn command cannot be finished later: the session is unusable */
        detach(f);
        return -EIO;
    }
    f->close_sent = 1;
    f->close_txnr = f->txnr_next;
    f->txnr_next = txnr_after(f->txnr_next);
    return f->close_txnr;
}

int ls_forward_relp_error(struct ls_forward *f, char *buf, uint32_t size)
{
    if (size == 0)
        return 0;
    int n = snprintf(buf, size, "%s", f->err);
    return n < (int)size ? n : (int)size - 1;
}

void ls_forward_free(struct ls_forward *f)
{
    if (!f)
        return;
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
