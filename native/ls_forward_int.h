/* ls_forward_int.h - what the forwarder's files share (not a public API: callers use ls_forward.h).
 *
 * ls_forward.c owns the forwarder: the cursor, reading the file (boundary searches), checkpoints and
 * rewinding, the holes/zeros guard, drops, and the public ls_forward_* functions.
 * ls_forward_plan.c lays out one window (newline, octet-counted, RELP) and hands it to the kernel.
 * ls_forward_relp.c is RELP's own part: the command header, the ring of commands awaiting their rsp,
 * the collector's responses, and the ls_forward_relp_* functions. Functions named fwd_* are the
 * only ones shared between these files; everything else is static to its file.
 */
#ifndef LS_FORWARD_INT_H
#define LS_FORWARD_INT_H

#include "ls_forward.h"

#include <stdint.h>

/* The scan buffer: a window of small records is one pread and one sendmsg. */
#define SCAN_BUF (256u << 10)
/* Records per octet-counted window: two iovecs each (prefix, body) must fit IOV_MAX (1024). */
#define PLAN_RECORDS 511
/* Checkpoints kept per connection; when full, every other one is dropped (coarser, still exact). */
#define CHECKPOINTS 256
/* A record's header: "LEN " (octet counting, at most 20 digits + space) or "TXNR syslog DATALEN "
 * (RELP, at most 9 + 8 + 9 + 1 bytes). */
#define PREFIX_MAX 32
/* RELP: the collector's responses are read into this ("TXNR rsp 6 200 OK\n" each). */
#define RX_BUF (64u << 10)

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

struct fwd_uring; /* ls_forward_uring.c: the forwarder's own ring, when a newline window leaves through it */

struct ls_forward {
    int fd, sock, framing;
    struct fwd_uring *u; /* NULL: the sendfile path */
    int path;            /* LS_FWD_PATH_* in use */
    char path_reason[192];
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

/* `v` in decimal at p (at most 20 bytes, no NUL). Returns its length. Record headers are formatted
 * once per record: snprintf cost about 15% of an octet-counted forwarder's CPU (perf, 200-byte
 * records). */
static inline int fwd_put_u64(char *p, uint64_t v)
{
    char tmp[20];
    int n = 0;
    do {
        tmp[n++] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    for (int i = 0; i < n; i++)
        p[i] = tmp[n - 1 - i];
    return n;
}

/* ls_forward.c */

/* The offset just after the first '\n' in [from, limit): 1 and *out set; 0 if none; -errno. */
/* Read exactly len bytes of the file at off into dst (counted in bytes_copied). Returns 0,
 * -ENODATA if the file ends first (it was truncated under us), or -errno. */
int fwd_pread_all(struct ls_forward *f, char *dst, uint32_t len, uint64_t off);
int fwd_next_boundary(struct ls_forward *f, uint64_t from, uint64_t limit, uint64_t *out);
/* Stop using the socket: rewind the cursor to the first record its peer did not ACK whole. */
void fwd_detach(struct ls_forward *f);

/* ls_forward_plan.c */

/* Octet-counted and RELP: plan a window of prefix + body pieces. Records planned (> 0), 0, -errno. */
int fwd_plan_octet(struct ls_forward *f);
/* Newline: plan a window of whole records from the cursor. 1 or -errno. */
int fwd_plan_newline(struct ls_forward *f);
/* Send the rest of the planned window. 0 when all of it is handed over, or -errno. */
int fwd_send_octet(struct ls_forward *f);
int fwd_send_newline(struct ls_forward *f);

/* ls_forward_uring.c */

/* Newline over the ring: send the rest of the window. 0 when all of it is handed over,
 * -EINPROGRESS while a send is in flight (the ring fd turns readable), or -errno. */
int fwd_send_newline_uring(struct ls_forward *f);
/* Wait (bounded) for an in-flight send and count what it sent, before a detach, reset or free. */
void fwd_uring_settle(struct ls_forward *f);
/* The file changes under the forwarder (ls_forward_reset): settle, and forget the old mapping. */
void fwd_uring_reset(struct ls_forward *f);
void fwd_uring_free(struct ls_forward *f);

/* ls_forward_relp.c */

/* RELP: the `syslog` command header of a record, which goes in flight. Its length or -EMSGSIZE. */
int fwd_relp_prefix(struct ls_forward *f, char *pre, uint64_t len, uint64_t rec_end);

#endif
