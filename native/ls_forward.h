/* ls_forward.h - forward a stream's file (or spool) to a downstream TCP socket, from the page cache.
 *
 * One forwarder per (stream, downstream). It reads only a file the daemon owns -- the stream's
 * output or its spool, both append-only -- never a producer's pipe, so no producer page is ever
 * referenced by a socket (see docs/architecture.md, "Release only after the file has the bytes").
 *
 *   [0 ............ acked_cursor ....... cursor ............ end) ....... file grows
 *    peer has it     handed to the kernel, not yet ACKed   complete records not yet sent
 *
 * Framing:
 *   LS_FWD_NEWLINE  records as they are: sendfile(sock, file, [cursor, end)), or through the
 *                   forwarder's own io_uring from a mapping of the file (ls_forward_use_path,
 *                   native/ls_forward_uring.c).
 *   LS_FWD_OCTET    RFC 6587 octet counting, "LEN SP RECORD" per record (the record keeps its '\n').
 *                   Lengths need the record boundaries, so the forwarder preads the bytes into its
 *                   own 256 KiB buffer and scans them for '\n' (counted in bytes_copied). Records of
 *                   at least LS_FWD_SENDFILE_MIN bytes go out with sendfile after their prefix; smaller
 *                   ones leave from the scan buffer in one sendmsg per window (one copy beats two
 *                   syscalls per record).
 *
 *   LS_FWD_RELP     RELP (rsyslog's imrelp, librelp's doc/relp.md): one `syslog` command per record,
 *                   "TXNR SP syslog SP DATALEN SP DATA LF" where DATA is the record without its '\n'
 *                   and the record's own '\n' is the trailer, so the wire carries the file's bytes
 *                   with a header in front of each record, sent exactly like octet counting. At
 *                   most `window` commands await their `rsp`; acked_cursor moves only on "rsp 200",
 *                   to the end of the record that txnr carried. The caller does the `open`
 *                   handshake (txnr 1) before ls_forward_relp_attach, reads the collector's
 *                   responses with ls_forward_relp_read, and sends `close` with ls_forward_relp_close.
 *
 * Connection loss: the caller owns the socket. When a send fails, or the caller detaches the
 * socket (ls_forward_set_socket(f, -1)), the forwarder asks the kernel how much of what it handed
 * over the peer has not ACKed (SIOCOUTQ) and rewinds the cursor to the start of the first record
 * the peer did not ACK in full. A record is never split across connections: the next connection
 * starts with a whole record (prefix included). The caller then closes the socket with an abortive
 * close (SO_LINGER 0), so the kernel does not deliver, behind our back, bytes we will send again.
 * What the peer's kernel ACKed but the peer application never read (it was SIGKILLed) is beyond
 * what plain TCP can tell a sender; RELP exists for that: a RELP forwarder rewinds to acked_cursor,
 * the end of the last record the collector answered "rsp 200" for, and replays the rest.
 *
 * Zeros: the forwarder never sends bytes of a hole and never starts a window at a NUL byte. A
 * spool's forwarded prefix is punched out and reads as zeros; a cursor that points there (a cursor
 * file lost, or left by a version that punched past it) or a hole inside what is to be sent
 * (SEEK_HOLE) is skipped: up to the first non-NUL byte, and on to the next record boundary when that
 * byte is where a punch ended (a multiple of LS_SPOOL_PUNCH_UNIT: the middle of a record whose start
 * was punched). A window ends at the last record boundary before a hole; a record a hole cuts is
 * skipped. All of it is counted in skipped_bytes. Checking costs one lseek(SEEK_HOLE) and, for
 * newline framing, a one-byte read per window: NUL bytes inside a record written as data are not
 * looked for (sendfile never reads them).
 *
 * Threading: not thread-safe; the daemon drives every forwarder from its control thread.
 * Contract: every function returns >= 0 on success or -errno; errno is never the channel.
 */
#ifndef LS_FORWARD_H
#define LS_FORWARD_H

#include <stdint.h>

#define LS_FWD_NEWLINE 0
#define LS_FWD_OCTET 1
#define LS_FWD_RELP 2

/* RELP: commands awaiting their rsp at most (the window), default and bound. A collector killed
 * mid-stream can have processed up to a window of records whose rsp never came back: those are
 * sent again (duplicates), never lost. */
#define LS_RELP_WINDOW_DEFAULT 1024
#define LS_RELP_WINDOW_MAX 65536
/* Transaction numbers run 1..LS_RELP_TXNR_MAX, then wrap to 1 (0 is for hints). */
#define LS_RELP_TXNR_MAX 999999999

/* Records at least this long go out with sendfile (zero-copy from the page cache) after their
 * prefix; smaller ones are sent from the scan buffer. Two syscalls cost about as much as copying
 * 16 KiB at the ~10 GB/s these machines copy at (docs/design.md measurements). */
#define LS_FWD_SENDFILE_MIN (16u << 10)

/* ls_spool_punch works in whole units of this (1 MiB): whole pages, and few fallocate calls. */
#define LS_SPOOL_PUNCH_UNIT (1u << 20)

struct ls_forward_counters {
    uint64_t cursor;         /* next file byte to hand to the kernel (a record boundary between sends) */
    uint64_t end;            /* bytes of complete records in the file (last ls_forward_advance) */
    uint64_t acked_cursor;   /* a record boundary the peer has ACKed everything before (at most one
                                send window behind the exact point; exact after ls_forward_sync_acked) */
    uint64_t unacked_bytes;  /* wire bytes in the socket's send queue not yet ACKed (SIOCOUTQ) */
    uint64_t bytes_sent;     /* wire bytes handed to the kernel, octet-counting prefixes included */
    uint64_t payload_sent;   /* file bytes of whole records handed to the kernel */
    uint64_t records_sent;   /* records handed to the kernel (octet-counted only; newline framing never
                                looks at records) */
    uint64_t bytes_sendfile; /* payload bytes moved by sendfile from the page cache (no copy) */
    uint64_t bytes_copied;   /* payload bytes read into the forwarder's buffer (scanned for '\n') */
    uint64_t framing_bytes;  /* octet-counting prefix bytes sent */
    uint64_t connects;       /* sockets attached */
    uint64_t disconnects;    /* sockets detached or failed */
    uint64_t rewound_bytes;  /* payload handed to a connection that died before the peer ACKed it: sent again */
    uint64_t dropped_bytes;  /* skipped by ls_forward_drop (the drop-oldest spool policy) */
    uint64_t dropped_records;
    uint64_t relp_acked;     /* RELP: records the collector answered "rsp 200" for */
    uint64_t relp_inflight;  /* RELP: commands sent (or being sent) awaiting their rsp */
    uint64_t relp_refused;   /* RELP: rsp codes other than 200 (each ended its connection) */
    uint64_t skipped_bytes;  /* zeros never sent: a hole (a punched spool prefix) or NUL bytes where a
                                window would start, plus the record a hole cut (see "Zeros" above) */
    uint64_t bytes_uring;    /* payload bytes sent through the forwarder's io_uring (SEND or SEND_ZC) */
    uint64_t uring_sends;    /* io_uring send completions */
    uint64_t zc_notifs;      /* SEND_ZC: notifications (the kernel let go of the pages) */
    uint64_t zc_copied;      /* SEND_ZC: notifications saying the kernel copied after all (loopback) */
};

struct ls_forward;

/* How a newline window leaves (ls_forward_use_path). Octet-counted and RELP windows always leave
 * with sendmsg from the scan buffer plus sendfile for long records (LS_FWD_PATH_SENDFILE).
 *   SENDFILE    sendfile(socket, file): page cache pages handed to the socket.
 *   URING_SEND  io_uring SEND from a read-only shared mapping of the file: one copy into the
 *               socket, no page references, the completion on the forwarder's ring.
 *   URING_ZC    io_uring SEND_ZC from that mapping: the socket references the page cache pages
 *               until the IORING_CQE_F_NOTIF completion. */
#define LS_FWD_PATH_AUTO (-1)
#define LS_FWD_PATH_SENDFILE 0
#define LS_FWD_PATH_URING_SEND 1
#define LS_FWD_PATH_URING_ZC 2

/* A forwarder reading `file_fd` from `cursor` (a record boundary) with `framing` (LS_FWD_*). It
 * reopens the file through /proc/self/fd for a file position of its own (lseek(SEEK_HOLE)), or
 * dup()s it; O_RDONLY is enough. No socket yet, end = cursor. Returns 0 and *out, -EINVAL (unknown
 * framing), -ENOMEM, or the reopen/dup's -errno (-EBADF, -EMFILE, ...). */
int ls_forward_new(int file_fd, uint64_t cursor, int framing, struct ls_forward **out);
/* Attach a connected, nonblocking stream socket (the caller keeps owning it), or -1 to detach.
 * Detaching (or replacing) a socket first rewinds to what its peer ACKed (see above), so call it
 * BEFORE closing the old socket. Returns 0, or -EINVAL for a RELP forwarder given a socket (use
 * ls_forward_relp_attach). */
int ls_forward_set_socket(struct ls_forward *f, int sock_fd);
/* Bytes up to `end` are complete records in the file. -ERANGE if `end` < the last end (the file
 * was truncated under us: ls_forward_reset). */
int ls_forward_advance(struct ls_forward *f, uint64_t end);
/* Hand the socket as much of [cursor, end) as it takes now, never blocking. Returns the wire bytes
 * handed over (>= 0) once cursor == end; -EAGAIN when the socket is full and data remains (wait
 * for writability, call again); -EINPROGRESS (an io_uring path) when a send is in flight on the
 * ring (wait for ls_forward_ring_fd, ls_forward_ring_reap, call again); -ENOBUFS (RELP) when the window is full and data remains (wait for
 * responses: ls_forward_relp_read, then call again); -ENOTCONN without a socket; -ENODATA if the file ended before
 * `end` (truncated under us); any other -errno: the connection failed, the forwarder rewound
 * and detached the socket (close it, reconnect). */
int64_t ls_forward_pump(struct ls_forward *f);
/* Drop-oldest: move the cursor to the first record boundary >= min_cursor (at most `end`),
 * counting the records skipped. While a send window is in flight the drop is applied when it
 * completes. Returns the bytes dropped now (>= 0). */
int64_t ls_forward_drop(struct ls_forward *f, uint64_t min_cursor);
/* Move the cursor off zeros now (see "Zeros"; pump does it before every window): for validating
 * a resumed cursor before any socket is attached. Returns the bytes skipped (>= 0) or -errno. */
int64_t ls_forward_skip_zeros(struct ls_forward *f);
/* Make acked_cursor exact: the start of the first record the peer has not ACKed in full (one
 * SIOCOUTQ and a scan of at most one send window). For persisting the cursor on a clean stop. */
int64_t ls_forward_sync_acked(struct ls_forward *f);
/* Read from another file (rotation) or start over in the same one (it was truncated), at
 * `cursor`. Forgets the in-flight window. file_fd is dup()ed; -1 keeps the current file. Returns 0
 * or the reopen/dup's -errno (the forwarder then keeps its old file). */
int ls_forward_reset(struct ls_forward *f, int file_fd, uint64_t cursor);
/* A snapshot of the counters. Returns 0. */
int ls_forward_counters(struct ls_forward *f, struct ls_forward_counters *out);

/* RELP (framing LS_FWD_RELP only, else -EINVAL). The window: 1..LS_RELP_WINDOW_MAX commands in
 * flight; set it while no socket is attached. Returns 0, -EINVAL (not RELP, or window outside
 * 1..LS_RELP_WINDOW_MAX), -EBUSY (a socket is attached), -ENOMEM. */
int ls_forward_relp_window(struct ls_forward *f, uint32_t window);
/* Attach a socket on which the caller completed the `open` handshake; syslog commands start at
 * `next_txnr` (1..LS_RELP_TXNR_MAX, normally 2). Replaces ls_forward_set_socket(f, fd) for RELP;
 * detaching is ls_forward_set_socket(f, -1) as for the other framings (rewinds to acked_cursor).
 * Returns 0 or -EINVAL (not RELP, no socket, or next_txnr out of range). */
int ls_forward_relp_attach(struct ls_forward *f, int sock_fd, uint32_t next_txnr);
/* Read and apply the collector's responses now on the socket, never blocking. Returns the records
 * acknowledged by this call (>= 0) once the socket has nothing more to read; otherwise the
 * session is over and the forwarder has detached (rewound to acked_cursor; close the socket):
 *   -ESHUTDOWN     the rsp to our `close` came (the normal end)
 *   -ECONNABORTED  the collector sent the `serverclose` hint
 *   -EPIPE         the collector closed the connection (EOF)
 *   -EREMOTEIO     an rsp code other than 200 (ls_forward_relp_error has its text)
 *   -EPROTO        a malformed frame, or an rsp to a txnr we are not waiting for
 *   other -errno   recv failed
 * -ENOTCONN without a socket. Acknowledgements read before the end still count. */
int64_t ls_forward_relp_read(struct ls_forward *f);
/* Send `close` (only with nothing in flight: -EBUSY otherwise). Returns its txnr; its rsp makes
 * ls_forward_relp_read return -ESHUTDOWN. -EAGAIN if the socket cannot take the 20 bytes now;
 * -EINVAL (not RELP), -ENOTCONN (no socket), -EIO (sent in part: the session is unusable), or
 * send's -errno. */
int64_t ls_forward_relp_close(struct ls_forward *f);
/* The last refusal or protocol error, as text ("500 ..." from the collector, or what was wrong
 * with its frame), NUL-terminated in buf. Returns its length. */
int ls_forward_relp_error(struct ls_forward *f, char *buf, uint32_t size);
/* io_uring forwarding (newline framing). Choose the path before attaching a socket: `want` is
 * LS_FWD_PATH_AUTO or a LS_FWD_PATH_*; the environment variable LOGSINK_FORWARD_PATH (auto, sendfile,
 * uring-send, uring-zc) overrides it (an operator's and the tests' knob). AUTO takes
 * LS_FWD_PATH_URING_SEND. A path the kernel refuses (io_uring_setup fails: kernel.io_uring_disabled,
 * seccomp, gVisor; or the op is missing from the probe) steps down: uring-zc -> uring-send ->
 * sendfile. Returns the path now in use (>= 0); ls_forward_path_reason says why in words. -EBUSY
 * with a socket attached. With an io_uring path, ls_forward_pump returns -EINPROGRESS while a send
 * is in flight on the ring: wait for ls_forward_ring_fd to be readable, call
 * ls_forward_ring_reap, then pump again. A ring send is never cancelled half-counted: detaching,
 * resetting or freeing first waits (at most 2 s) for its completion and counts what it sent. */
int ls_forward_use_path(struct ls_forward *f, int want);
int ls_forward_path_reason(struct ls_forward *f, char *buf, uint32_t size);
/* The ring's fd (readable when completions are due), or -1 on the sendfile path. */
int ls_forward_ring_fd(struct ls_forward *f);
/* 1 while a ring send is in flight (its completion will pump on: a new `end` needs no pump now),
 * else 0. */
int ls_forward_ring_busy(struct ls_forward *f);
/* Apply the completions on the ring now (send results, SEND_ZC notifications), never blocking.
 * Returns the completions applied (>= 0). Works with or without a socket attached. */
int ls_forward_ring_reap(struct ls_forward *f);

/* Free the forwarder and its dup of the file (not the socket). */
void ls_forward_free(struct ls_forward *f);

/* Release disk blocks of [0, upto) of a spool file whose bytes were forwarded, keeping its size
 * and offsets (fallocate PUNCH_HOLE|KEEP_SIZE). `upto` is rounded down to a 1 MiB boundary: whole
 * pages only (a partial page would be zeroed in place while a retransmission may still read it)
 * and few calls. Returns the new punched-through offset (>= 0) or -errno (-EOPNOTSUPP: the file
 * system cannot punch holes). */
int64_t ls_spool_punch(int fd, uint64_t from, uint64_t upto);

#endif
