/* ls_forward_relp.c - RELP for the forwarder: command headers, the commands awaiting their rsp, the
 * collector's responses, and the ls_forward_relp_* functions (see ls_forward.h, LS_FWD_RELP).
 *
 * RELP sends like octet counting (a header per record, the bodies from the scan buffer or by
 * sendfile: ls_forward_plan.c) but keeps a ring of the commands awaiting their rsp (txnr, the
 * record's end, the wire bytes through it): an "rsp 200" for the oldest moves acked_cursor to its
 * record's end, and a lost connection rewinds to acked_cursor (fwd_detach). No SIOCOUTQ, no
 * checkpoints: the collector says what it has.
 */
#define _GNU_SOURCE
#include "ls_forward_int.h"

#include <ctype.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

/* The txnr after `t`: after LS_RELP_TXNR_MAX comes 1 (0 is for hints). */
static uint32_t txnr_after(uint32_t t)
{
    return t >= LS_RELP_TXNR_MAX ? 1 : t + 1;
}

/* The header of a record of `len` bytes (its '\n' included, the frame's trailer) ending at file
 * offset `rec_end`: "TXNR syslog DATALEN " into `pre`; the command goes in flight (the ring).
 * Returns the header's length, or -EMSGSIZE for a record RELP cannot carry (DATALEN has at most 9
 * digits). Shared: ls_forward_plan.c frames RELP windows with it. */
int fwd_relp_prefix(struct ls_forward *f, char *pre, uint64_t len, uint64_t rec_end)
{
    uint64_t dlen = len - 1; /* the record's '\n' is the frame's trailer */
    if (dlen > LS_RELP_TXNR_MAX)
        return -EMSGSIZE;
    uint32_t t = f->txnr_next;
    /* "TXNR syslog DATALEN " (at most 9 + 8 + 9 + 1 bytes); no data: "TXNR syslog 0", no SP before the trailer */
    int pl = fwd_put_u64(pre, t);
    memcpy(pre + pl, " syslog ", 8);
    pl += 8;
    pl += fwd_put_u64(pre + pl, dlen);
    if (dlen)
        pre[pl++] = ' ';
    f->txnr_next = txnr_after(t);
    f->planned_wire += (uint64_t)pl + len;
    f->ring[(f->rhead + f->rcount) % f->window] = (struct relp_txn){rec_end, f->planned_wire, t};
    f->rcount++;
    return pl;
}

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
    fwd_detach(f);
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
        fwd_detach(f); /* the session is over: rewind to the last record the collector answered for */
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
        fwd_detach(f);
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
