/* ls_producer_conn.c - the producer's connection to the daemon, and the background thread.
 *
 * One attempt (prod_connect_once): AF_UNIX - connect, check who runs the daemon (SO_PEERCRED), make
 * the data pipe and pass its read end with HELLO (SCM_RIGHTS); TCP - connect, SO_ZEROCOPY, HELLO on
 * the socket itself; then wait for WELCOME (or ERROR). The background thread reads the control
 * socket (RELEASEs, SHUTDOWN, ERROR: ls_producer_msg.c) - or leaves that to a flushing thread that
 * took it (below, "reading the control socket") - reaps zerocopy completions, hands over a
 * segment that waited flush_interval_ms, and when the connection is lost tears it down, reconnects
 * with jittered backoff and resends the unreleased queue, renumbered (ls_producer_int.h).
 */
#include "ls_producer_int.h"
#include "ls_frame.h"
#include "ls_msgpack.h"
#include "ls_transport.h"
#include "ls_zerocopy.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

/* Reconnect backoff: 50 ms doubling to 2 s, each wait jittered to 50-100 % so producers restarted
 * together do not reconnect in lockstep. */
#define BACKOFF_FIRST_MS 50
#define BACKOFF_MAX_MS 2000

/* -- reading the control socket: the background thread or a flushing thread ---------------------- *
 *
 * See "Reading the control socket" in ls_producer_int.h. The background thread waits in epoll_wait
 * on {wake_fd, the socket}; a flushing thread that takes the socket removes it from that set
 * (EPOLL_CTL_DEL: no wake-up for anyone) and polls it itself; giving it back adds it again, and
 * EPOLL_CTL_ADD reports bytes already waiting, so the background thread wakes at once for them.
 * Without the epoll set (TCP, LOGSINK_FLUSH_WAITS_ON_SOCKET=0, epoll failed) the background thread
 * polls as it always did and flushes wait on p->cond. */

/* epoll_event.data of the background thread's set */
#define EV_SOCK 0u
#define EV_WAKE 1u

/* The connection ended or failed under us: reconnect, or (reconnect = 0) break for good. */
static void conn_lost_locked(struct ls_producer *p, const char *why)
{
    if (p->reconnect && !p->closed)
        prod_go_down_locked(p, p->conn == CONN_DRAINING ? "the daemon shut down" : why);
    else
        prod_lost_locked(p, why);
}

void prod_rx_setup(struct ls_producer *p)
{
    const char *knob = getenv("LOGSINK_FLUSH_WAITS_ON_SOCKET");
    /* TCP: the background thread reaps zerocopy completions off the same socket's error queue, and a
     * network round trip dwarfs the wake-up saved: keep one reader there. */
    if (p->is_tcp || (knob && strcmp(knob, "0") == 0))
        return;
    p->epoll_fd = epoll_create1(EPOLL_CLOEXEC);
    p->flush_wake_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    struct epoll_event ev = {.events = EPOLLIN, .data.u32 = EV_WAKE};
    if (p->epoll_fd < 0 || p->flush_wake_fd < 0 || epoll_ctl(p->epoll_fd, EPOLL_CTL_ADD, p->wake_fd, &ev) < 0) {
        if (p->epoll_fd >= 0)
            close(p->epoll_fd);
        if (p->flush_wake_fd >= 0)
            close(p->flush_wake_fd);
        p->epoll_fd = p->flush_wake_fd = -1;
        return;
    }
    p->flush_reads_sock = 1;
}

/* Put the socket in the background thread's epoll set (on) or take it out. Lock held. */
static void bg_watch_sock_locked(struct ls_producer *p, int on)
{
    if (p->epoll_fd < 0 || p->sock < 0 || on == p->bg_watches_sock)
        return;
    struct epoll_event ev = {.events = EPOLLIN, .data.u32 = EV_SOCK};
    if (epoll_ctl(p->epoll_fd, on ? EPOLL_CTL_ADD : EPOLL_CTL_DEL, p->sock, &ev) == 0)
        p->bg_watches_sock = on;
}

void prod_read_control_locked(struct ls_producer *p)
{
    int got = prod_recv_some(p, p->sock);
    if (got == 0) {
        conn_lost_locked(p, "the logsink daemon closed the connection");
    } else if (got < 0 && got != -EAGAIN && got != -EINTR) {
        char msg[ERRLEN];
        snprintf(msg, sizeof msg, "control socket error: %s", strerror(-got));
        conn_lost_locked(p, msg);
    } else if (got > 0) {
        (void)prod_drain_frames_locked(p);
    }
}

int prod_rx_keep_locked(struct ls_producer *p)
{
    return p->conn != CONN_DOWN && p->sock >= 0 && !p->closed && !p->broken;
}

int prod_rx_take_locked(struct ls_producer *p)
{
    if (!p->flush_reads_sock || p->rx_flusher || !prod_rx_keep_locked(p))
        return 0;
    bg_watch_sock_locked(p, 0);
    if (p->bg_watches_sock)
        return 0; /* epoll_ctl failed: the background thread keeps reading */
    p->rx_flusher = 1;
    return 1;
}

void prod_rx_give_back_locked(struct ls_producer *p)
{
    p->rx_flusher = 0;
    if (p->conn != CONN_DOWN) { /* (down: the background thread is tearing the connection down) */
        bg_watch_sock_locked(p, 1); /* reports bytes already waiting: it wakes for them */
        if (!p->bg_watches_sock)
            prod_wake_background(p); /* EPOLL_CTL_ADD failed: it retries, or polls, next round */
    }
    pthread_cond_broadcast(&p->cond); /* another flush may take the socket; a teardown waits for it */
}

int prod_rx_wait_locked(struct ls_producer *p, int64_t deadline_ms)
{
    int wait = -1;
    if (deadline_ms >= 0) {
        int64_t left = deadline_ms - prod_now_ms();
        if (left <= 0)
            return -ETIMEDOUT;
        wait = left > INT_MAX ? INT_MAX : (int)left;
    }
    /* p->sock stays open while we hold the socket: teardown takes it back first. */
    struct pollfd pfd[2] = {{.fd = p->sock, .events = POLLIN}, {.fd = p->flush_wake_fd, .events = POLLIN}};
    p->rx_flusher_polling = 1;
    pthread_mutex_unlock(&p->lock);
    int pr = poll(pfd, 2, wait);
    int err = errno;
    pthread_mutex_lock(&p->lock);
    p->rx_flusher_polling = 0;
    uint64_t v;
    if (pr > 0 && pfd[1].revents && read(p->flush_wake_fd, &v, sizeof v) < 0) {
    }
    if (pr < 0 && err != EINTR && err != EAGAIN) {
        conn_lost_locked(p, "polling the control socket failed");
        return 0;
    }
    if (pr > 0 && (pfd[0].revents & (POLLIN | POLLHUP | POLLERR)) && prod_rx_keep_locked(p))
        prod_read_control_locked(p);
    return pr == 0 ? -ETIMEDOUT : 0;
}

/* -- background thread ------------------------------------------------------------------------- */

/* How long a dead TCP connection may take to post its zerocopy completions before we give up on
 * the segments it references (after the abort below they come at once; a wedged NIC queue could
 * hold them). */
#define ZC_TEARDOWN_WAIT_MS 10000

/* Close the lost connection. Lock held; may drop it while waiting for zerocopy completions. */
static void teardown_locked(struct ls_producer *p)
{
    /* A flushing thread polling the socket gives it back first (seeing the connection down): nobody
     * may be left polling a closed fd, nor reading rx while we do. */
    while (p->rx_flusher) {
        prod_wake_flusher_locked(p);
        (void)prod_cond_wait_until(p, -1);
    }
    bg_watch_sock_locked(p, 0);
    if (p->sock >= 0) {
        /* RELEASEs the daemon sent before it went: fewer batches to resend. */
        while (!p->broken && prod_recv_some(p, p->sock) > 0)
            if (prod_drain_frames_locked(p) < 0)
                break;
        prod_close_pipe_locked(p);
        if (p->is_tcp && p->zc_done != p->zc_next) {
            /* A page a zerocopy send referenced must not be rewritten (the resend renumbers its
             * header) before the kernel lets go of it: abort the connection (connect AF_UNSPEC
             * purges the send queue) and wait for the completions that follow. */
            struct sockaddr sa = {.sa_family = AF_UNSPEC};
            (void)!connect(p->sock, &sa, sizeof sa);
            int64_t deadline = prod_now_ms() + ZC_TEARDOWN_WAIT_MS;
            for (;;) {
                (void)prod_zc_reap_locked(p);
                if (p->closed || p->zc_done == p->zc_next)
                    break;
                if (prod_now_ms() > deadline) {
                    prod_fail_locked(p, ECONNRESET,
                                "a lost TCP connection never completed its zerocopy sends: the segments they "
                                "reference cannot be reused safely");
                    break;
                }
                pthread_mutex_unlock(&p->lock);
                struct pollfd pfd = {.fd = p->sock, .events = 0}; /* POLLERR: the error queue */
                (void)poll(&pfd, 1, 100);
                pthread_mutex_lock(&p->lock);
            }
        }
        close(p->sock);
        p->sock = -1;
    }
    p->rx_len = 0;
}

/* Every record of `len` bytes of records at `payload` fits a batch of `cap` bytes (a batch larger
 * than cap is cut at record boundaries). Returns 0, or the length of a record that does not fit. */
static uint32_t records_unfit(const char *payload, uint32_t len, uint32_t cap)
{
    for (uint32_t off = 0; len - off > cap;) {
        const char *cut = memrchr(payload + off, '\n', cap);
        if (!cut) {
            const char *end = memchr(payload + off, '\n', len - off);
            return end ? (uint32_t)(end - (payload + off)) + 1 : len - off;
        }
        off = (uint32_t)(cut - payload) + 1;
    }
    return 0;
}

/* Every record waiting to go - the queued batches and the current segment's - fits a batch of `cap`
 * bytes. Returns 0, or the length of a record that does not fit. */
static uint32_t queue_unfit_locked(struct ls_producer *p, uint32_t cap)
{
    for (uint32_t i = 0; i < p->qlen; i++) {
        struct batch *b = prod_q_at(p, i);
        uint32_t r = b->seg < 0 ? 0 : records_unfit(p->arena + (size_t)b->seg * p->segment_size + LS_FRAME_HEADER_SIZE, b->len, cap);
        if (r)
            return r;
    }
    prod_fast_revoke_locked(p); /* the current segment's fill is final only once nobody appends lock-free */
    if (p->active && p->pos > cap) /* filled under a larger capacity: it goes as batches of the new one */
        return records_unfit(p->arena + (size_t)p->cur * p->segment_size + LS_FRAME_HEADER_SIZE, p->pos, cap);
    return 0;
}

/* Batches moved by splice_from are not in the arena: a lost connection took them. Say so (flush
 * reports -EIO) and drop them from the queue. */
static void drop_spliced_locked(struct ls_producer *p)
{
    uint32_t keep = 0;
    for (uint32_t i = 0; i < p->qlen; i++) {
        struct batch *b = prod_q_at(p, i);
        if (b->seg >= 0) {
            p->q[p->qhead + keep++] = *b;
            continue;
        }
        p->st.lost_batches++;
        p->st.failed_batches++;
        if (p->failed_pending++ == 0)
            snprintf(p->failed_first, ERRLEN,
                     "seq %llu: lost: %u records moved by splice were in flight when the connection was lost",
                     (unsigned long long)b->seq, b->nrec);
    }
    p->qlen = keep;
    prod_update_released_locked(p);
}

/* CONN_DOWN: reconnect with backoff, then resend the queue. Returns with the producer CONN_UP,
 * broken (a non-retriable refusal) or closed. Lock held; dropped while waiting and connecting. */
static void reconnect_locked(struct ls_producer *p)
{
    teardown_locked(p);
    int backoff = BACKOFF_FIRST_MS;
    while (!p->closed && !p->broken) {
        int wait = backoff / 2 + (int)(rand_r(&p->rand_state) % (unsigned)(backoff / 2 + 1));
        pthread_mutex_unlock(&p->lock);
        struct pollfd pfd = {.fd = p->wake_fd, .events = POLLIN};
        uint64_t v;
        if (poll(&pfd, 1, wait) > 0 && read(p->wake_fd, &v, sizeof v) < 0) {
        }
        struct conn_parts c;
        int r = __atomic_load_n(&p->closed, __ATOMIC_RELAXED) ? -ECANCELED : prod_connect_once(p, &c);
        pthread_mutex_lock(&p->lock);
        uint32_t unfit = 0;
        if (r == 0 && (p->closed || p->broken || (unfit = queue_unfit_locked(p, c.capacity)) != 0)) {
            close(c.sock);
            close(c.pipe_w);
            if (p->closed || p->broken)
                break;
            prod_set_error(NULL,
                      "a waiting record of %u bytes does not fit this connection's batches of %u bytes (a smaller "
                      "pipe: the uid's pipe-user-pages-soft budget?)",
                      unfit, c.capacity);
            r = -EMSGSIZE;
        }
        if (r == 0) {
            drop_spliced_locked(p);
            prod_install_conn_locked(p, &c);
            p->st.reconnects++;
            p->down_total_ms += (uint64_t)(prod_now_ms() - p->down_since_ms);
            p->last_error[0] = '\0';
            (void)prod_pump_locked(p); /* the resend: every unreleased batch, in order, renumbered */
            if (p->conn == CONN_UP) {
                (void)prod_drain_frames_locked(p); /* anything that came right after WELCOME */
                pthread_cond_broadcast(&p->cond);
                prod_signal_event(p);
                return;
            }
            teardown_locked(p); /* lost again during the resend */
            backoff = BACKOFF_FIRST_MS;
            continue;
        }
        if (r == -ECANCELED)
            break;
        if (r == -EACCES || r == -EPERM || (r == -ECONNREFUSED && p->refused_code[0] && !prod_retriable_code(p->refused_code))) {
            /* The answer will not change: forbidden, a squatter on the socket path, auth, ... */
            prod_fail_locked(p, ECONNRESET, prod_open_error);
            prod_signal_event(p);
            break;
        }
        snprintf(p->last_error, ERRLEN, "lost the logsink daemon; reconnecting: %.400s", prod_open_error);
        backoff = backoff * 2 > BACKOFF_MAX_MS ? BACKOFF_MAX_MS : backoff * 2;
    }
}

/* Wait up to `wait` ms (lock dropped) for wake_fd and - unless a flushing thread took it - the
 * control socket. Returns what poll/epoll_wait did (*err: its errno); *sock_ev gets the socket's
 * events (POLL* bits), 0 if it is not ready. */
static int bg_wait_locked(struct ls_producer *p, int wait, int *sock_ev, int *err)
{
    int use_epoll = p->epoll_fd >= 0, sock = p->sock; /* only this thread replaces sock */
    if (use_epoll && !p->rx_flusher)
        bg_watch_sock_locked(p, 1); /* no-op unless a give-back's EPOLL_CTL_ADD failed: retry */
    if (use_epoll && !p->rx_flusher && !p->bg_watches_sock)
        use_epoll = 0; /* epoll refuses the socket: poll it as before */
    pthread_mutex_unlock(&p->lock);
    int pr, woke = 0;
    *sock_ev = 0;
    if (use_epoll) {
        struct epoll_event ev[2];
        pr = epoll_wait(p->epoll_fd, ev, 2, wait);
        for (int i = 0; i < pr; i++) {
            if (ev[i].data.u32 == EV_SOCK)
                *sock_ev = (int)ev[i].events; /* EPOLLIN/HUP/ERR have the POLL* values */
            else
                woke = 1;
        }
    } else {
        struct pollfd pfd[2] = {{.fd = sock, .events = POLLIN}, {.fd = p->wake_fd, .events = POLLIN}};
        pr = poll(pfd, 2, wait);
        if (pr > 0) {
            *sock_ev = pfd[0].revents;
            woke = pfd[1].revents != 0;
        }
    }
    *err = pr < 0 ? errno : 0;
    uint64_t v;
    if (woke && read(p->wake_fd, &v, sizeof v) < 0) {
    }
    pthread_mutex_lock(&p->lock);
    return pr;
}

void *prod_background(void *arg)
{
    struct ls_producer *p = arg;
    int interval = p->flush_interval_ms;
    pthread_mutex_lock(&p->lock);
    (void)prod_drain_frames_locked(p); /* anything that arrived with WELCOME */
    for (;;) {
        if (p->closed || p->broken)
            break;
        if (p->conn == CONN_DOWN) {
            reconnect_locked(p);
            continue;
        }
        int wait = -1;
        if (interval > 0) {
            wait = interval;
            if (p->conn == CONN_UP && p->active && __atomic_load_n(&p->pos, __ATOMIC_RELAXED)) {
                int64_t left = p->filled_at_ms + interval - prod_now_ms();
                if (left <= 0) {
                    (void)prod_handover_current_locked(p); /* a failure marks us broken or down */
                    continue;
                }
                wait = (int)left;
            }
        }
        int sock_ev = 0, err = 0;
        int pr = bg_wait_locked(p, wait, &sock_ev, &err);
        if (p->closed || p->broken)
            break; /* (broken: a flushing thread read the daemon's refusal; its reason stays last_error) */
        if (p->is_tcp && (sock_ev & POLLERR)) {
            if (prod_zc_reap_locked(p) < 0) {
                conn_lost_locked(p, "the TCP connection to the logsink daemon failed");
                continue;
            }
            prod_signal_event(p);
        }
        if (pr < 0 && err != EINTR)
            conn_lost_locked(p, "polling the control socket failed");
        else if ((sock_ev & (POLLIN | POLLHUP)) && !p->rx_flusher && p->conn != CONN_DOWN)
            prod_read_control_locked(p); /* (a flushing thread that took the socket meanwhile reads it) */
    }
    pthread_mutex_unlock(&p->lock);
    return NULL;
}

/* -- connect: HELLO, WELCOME ------------------------------------------------------------------- */

static const char *transport_name(int t)
{
    return t == LS_TRANSPORT_VMSPLICE ? "vmsplice"
           : t == LS_TRANSPORT_ZEROCOPY ? "zerocopy"
           : t == LS_TRANSPORT_SHM      ? "shm"
                                        : "copy";
}

static int send_hello(struct ls_producer *p, int sock, int rfd, int pipe_size)
{
    uint8_t buf[1024];
    struct ls_mp_enc e;
    const char *token = p->is_tcp ? getenv("LOGSINK_TOKEN") : NULL;
    if (token && strlen(token) > 512)
        token = NULL;
    ls_mp_frame_begin(&e, buf, sizeof buf);
    ls_mp_put_map(&e, token ? 8 : 7);
    ls_mp_put_cstr(&e, "t");
    ls_mp_put_cstr(&e, "hello");
    ls_mp_put_cstr(&e, "v");
    ls_mp_put_int(&e, 1);
    ls_mp_put_cstr(&e, "stream");
    ls_mp_put_cstr(&e, p->stream);
    ls_mp_put_cstr(&e, "pid");
    ls_mp_put_int(&e, getpid());
    ls_mp_put_cstr(&e, "transport");
    ls_mp_put_cstr(&e, transport_name(p->transport));
    ls_mp_put_cstr(&e, "segment_size");
    ls_mp_put_uint(&e, p->segment_size);
    ls_mp_put_cstr(&e, "pipe_size");
    ls_mp_put_int(&e, pipe_size);
    if (token) {
        ls_mp_put_cstr(&e, "token");
        ls_mp_put_cstr(&e, token);
    }
    int64_t n = ls_mp_frame_finish(&e);
    if (n < 0)
        return (int)n;
    if (rfd < 0) { /* TCP: no fd to pass */
        for (size_t done = 0; done < (size_t)n;) {
            ssize_t r = send(sock, buf + done, (size_t)n - done, MSG_NOSIGNAL);
            if (r < 0 && errno == EINTR)
                continue;
            if (r < 0)
                return errno == EAGAIN ? -ETIMEDOUT : -errno;
            done += (size_t)r;
        }
        return 0;
    }

    /* The pipe's read end; for shm then the arena memfd (docs/protocol.md: in this order). */
    int fds[2] = {rfd, p->arena_fd};
    size_t nfds = p->transport == LS_TRANSPORT_SHM ? 2 : 1;
    union {
        char buf[CMSG_SPACE(sizeof fds)];
        struct cmsghdr align;
    } ctl;
    memset(&ctl, 0, sizeof ctl);
    struct iovec iov = {.iov_base = buf, .iov_len = (size_t)n};
    struct msghdr msg = {
        .msg_iov = &iov, .msg_iovlen = 1, .msg_control = ctl.buf, .msg_controllen = CMSG_SPACE(nfds * sizeof(int))};
    struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(nfds * sizeof(int));
    memcpy(CMSG_DATA(c), fds, nfds * sizeof(int));
    size_t done = 0;
    while (done < (size_t)n) {
        ssize_t r = done ? send(sock, buf + done, (size_t)n - done, MSG_NOSIGNAL)
                         : sendmsg(sock, &msg, MSG_NOSIGNAL); /* the fd rides on the first byte */
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0)
            return errno == EAGAIN ? -ETIMEDOUT : -errno; /* SO_SNDTIMEO expired */
        done += (size_t)r;
    }
    return 0;
}

/* Wait for the answer to HELLO. Returns 0 (WELCOME), -ECONNREFUSED (ERROR: its code in
 * p->refused_code), -EACCES (ERROR forbidden), -ETIMEDOUT, -EPROTO, -ECONNRESET (closed),
 * -ECANCELED (the producer is being closed); prod_open_error says which. */
static int await_welcome(struct ls_producer *p, struct conn_parts *c, const char *path)
{
    int64_t deadline = prod_now_ms() + LS_CONNECT_TIMEOUT_MS;
    char why[256];
    for (;;) {
        int r = prod_next_frame(p, why, sizeof why);
        if (r == 1) {
            const char *code_unused;
            int kind = prod_check_message(&p->doc, &code_unused, why, sizeof why);
            if (kind == LS_MSG_WELCOME) {
                const struct ls_mp_node *id = &p->doc.nodes[ls_mp_map_get(&p->doc, 0, "producer")];
                c->producer_id = id->type == LS_MP_UINT ? (int64_t)id->v.u : id->v.i;
                prod_str_of(&p->doc, ls_mp_map_get(&p->doc, 0, "engine"), c->engine, sizeof c->engine);
                /* The daemon refuses a batch larger than it can hold whole before writing it (a
                 * stalled producer must never hold a stream): obey its max_batch. */
                int mb = ls_mp_map_get(&p->doc, 0, "max_batch");
                if (prod_is_int(&p->doc, mb)) {
                    const struct ls_mp_node *n = &p->doc.nodes[mb];
                    int64_t v = n->type == LS_MP_UINT ? (n->v.u > INT64_MAX ? INT64_MAX : (int64_t)n->v.u) : n->v.i;
                    if (v >= 1 && v < (int64_t)c->capacity)
                        c->capacity = (uint32_t)v;
                }
                prod_consume_frame(p);
                return 0;
            }
            if (kind == LS_MSG_ERROR) {
                char code[64], reason[400];
                prod_set_error(NULL, "logsink daemon at %s refused stream '%s': %s: %s", path, p->stream,
                          prod_str_of(&p->doc, ls_mp_map_get(&p->doc, 0, "code"), code, sizeof code),
                          prod_str_of(&p->doc, ls_mp_map_get(&p->doc, 0, "reason"), reason, sizeof reason));
                snprintf(p->refused_code, sizeof p->refused_code, "%s", code);
                prod_consume_frame(p);
                /* forbidden: the access rules say no; retrying will not help, unlike a busy daemon */
                return strcmp(code, LS_PROTO_E_FORBIDDEN) == 0 ? -EACCES : -ECONNREFUSED;
            }
            if (kind >= 0)
                snprintf(why, sizeof why, "unexpected message instead of WELCOME");
            r = -EPROTO;
        }
        if (r < 0) {
            prod_set_error(NULL, "logsink daemon at %s did not answer HELLO properly: %s", path, why);
            return r;
        }
        int64_t left = deadline - prod_now_ms();
        if (left <= 0) {
            prod_set_error(NULL, "logsink daemon at %s did not answer HELLO within %d ms", path, LS_CONNECT_TIMEOUT_MS);
            return -ETIMEDOUT;
        }
        struct pollfd pfd[2] = {{.fd = c->sock, .events = POLLIN}, {.fd = p->wake_fd, .events = POLLIN}};
        int pr = poll(pfd, 2, (int)left);
        if (pr < 0 && errno != EINTR)
            return -errno;
        if (pr > 0 && pfd[1].revents && __atomic_load_n(&p->closed, __ATOMIC_RELAXED)) {
            prod_set_error(NULL, "the producer was closed while connecting");
            return -ECANCELED;
        }
        if (pr <= 0 || !pfd[0].revents)
            continue;
        r = prod_recv_some(p, c->sock);
        if (r == 0 || r == -ECONNRESET) {
            prod_set_error(NULL, "logsink daemon at %s closed the connection during HELLO", path);
            return -ECONNRESET;
        }
        if (r < 0 && r != -EAGAIN && r != -EINTR) {
            prod_set_error(NULL, "logsink daemon at %s: receiving WELCOME failed: %s", path, strerror(-r));
            return r;
        }
    }
}

/* Connect to tcp://HOST:PORT, enable SO_ZEROCOPY (zerocopy transport), send HELLO (no fd). */
static int open_tcp(struct ls_producer *p, const char *address, struct conn_parts *c)
{
    char host[256], port[16];
    const char *rest = address + 6, *colon = strrchr(rest, ':');
    if (!colon || colon == rest || (size_t)(colon - rest) >= sizeof host || strlen(colon + 1) >= sizeof port ||
        !colon[1]) {
        prod_set_error(NULL, "address %s must look like tcp://HOST:PORT", address);
        return -EINVAL;
    }
    memcpy(host, rest, (size_t)(colon - rest));
    host[colon - rest] = '\0';
    if (host[0] == '[' && host[strlen(host) - 1] == ']') { /* [v6]:port */
        memmove(host, host + 1, strlen(host));
        host[strlen(host) - 1] = '\0';
    }
    strcpy(port, colon + 1);
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM}, *res = NULL;
    int g = getaddrinfo(host, port, &hints, &res);
    if (g != 0) {
        prod_set_error(NULL, "cannot resolve %s: %s", address, gai_strerror(g));
        return -EHOSTUNREACH;
    }
    int r = -ECONNREFUSED;
    for (struct addrinfo *ai = res; ai; ai = ai->ai_next) {
        int s = socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC, ai->ai_protocol);
        if (s < 0) {
            r = -errno;
            continue;
        }
        struct timeval tv = {.tv_sec = LS_CONNECT_TIMEOUT_MS / 1000, .tv_usec = LS_CONNECT_TIMEOUT_MS % 1000 * 1000};
        (void)setsockopt(s, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
        if (connect(s, ai->ai_addr, ai->ai_addrlen) == 0) {
            c->sock = s;
            r = 0;
            break;
        }
        r = errno == EINPROGRESS || errno == EAGAIN ? -ETIMEDOUT : -errno;
        close(s);
    }
    freeaddrinfo(res);
    if (r < 0) {
        prod_set_error(NULL, "cannot reach the logsink daemon at %s: %s", address, strerror(-r));
        return r;
    }
    int one = 1;
    (void)setsockopt(c->sock, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    /* (zc_ok = 0: the kernel refuses, every send goes copied) */
    c->zc_ok = p->transport == LS_TRANSPORT_ZEROCOPY && ls_zc_enable(c->sock) == 0;
    c->pipe_w = dup(c->sock); /* the "data pipe" of a TCP producer: closing it ends the data direction */
    c->pipe_size = 0;
    if (c->pipe_w < 0 || (r = send_hello(p, c->sock, -1, 0)) < 0) {
        r = c->pipe_w < 0 ? -errno : r;
        prod_set_error(NULL, "logsink daemon at %s dropped the connection during HELLO: %s", address, strerror(-r));
        return r;
    }
    return 0;
}


/* Refuse a daemon that runs as neither `expected_uid` (-1: our effective uid) nor root: a socket
 * path in a world-writable directory (/tmp) can be squatted by another user, who would then get
 * our records. Called right after connect, before anything is sent. Returns 0, -EPERM or -errno. */
static int check_daemon_uid(int sock, const char *path, int64_t expected_uid)
{
    struct ucred cred;
    socklen_t len = sizeof cred;
    uid_t want = expected_uid < 0 ? geteuid() : (uid_t)expected_uid;
    if (getsockopt(sock, SOL_SOCKET, SO_PEERCRED, &cred, &len) < 0) {
        int r = -errno;
        prod_set_error(NULL, "cannot tell who runs the logsink daemon at %s (SO_PEERCRED): %s", path, strerror(-r));
        return r;
    }
    if (cred.uid == 0 || cred.uid == want)
        return 0;
    prod_set_error(NULL,
              "the daemon at %s (pid %d) runs as uid %u, not uid %u or root: another user may have taken over the "
              "socket path, so nothing was sent; pass expected_uid=%u (C: ls_producer_opts.expected_uid) if that "
              "is intended",
              path, (int)cred.pid, (unsigned)cred.uid, (unsigned)want, (unsigned)cred.uid);
    return -EPERM;
}

/* Connect to the local daemon at path, create the data pipe and send HELLO with its read end. */
static int open_unix(struct ls_producer *p, const char *path, struct conn_parts *c)
{
    int r;
    c->sock = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (c->sock < 0) {
        r = -errno;
        prod_set_error(NULL, "socket(AF_UNIX) failed: %s", strerror(-r));
        return r;
    }
    /* AF_UNIX connect and sendmsg honour SO_SNDTIMEO: a daemon with a full backlog cannot hang us. */
    struct timeval tv = {.tv_sec = LS_CONNECT_TIMEOUT_MS / 1000, .tv_usec = LS_CONNECT_TIMEOUT_MS % 1000 * 1000};
    (void)setsockopt(c->sock, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    strcpy(addr.sun_path, path);
    while ((r = connect(c->sock, (struct sockaddr *)&addr, sizeof addr)) < 0 && errno == EINTR)
        ;
    if (r < 0) {
        r = errno == EAGAIN ? -ETIMEDOUT : -errno;
        prod_set_error(NULL,
                  "cannot reach the logsink daemon at %s: %s; start it with `logsink serve` or point LOGSINK_SOCKET "
                  "at its socket",
                  path, strerror(-r));
        return r;
    }
    if ((r = check_daemon_uid(c->sock, path, p->expected_uid)) < 0)
        return r;
    int rfd, shm = p->transport == LS_TRANSPORT_SHM;
    /* shm: the pipe carries only 32-byte descriptors, one page is plenty (and 1000 producers
     * fit the uid's pipe-user-pages-soft budget). */
    if ((r = ls_pipe_create(shm ? LS_SHM_PIPE_SIZE : LS_DEFAULT_PIPE_SIZE, &rfd, &c->pipe_w, &c->pipe_size)) < 0) {
        prod_set_error(NULL, "creating the data pipe failed: %s", strerror(-r));
        return r;
    }
    /* A batch (header + payload) must fit the pipe whole: the daemon starts writing a batch only
     * once all of it is queued, so a producer that stalls mid-batch holds nobody but itself.
     * Past the uid's pipe budget the pipe is 2 pages: batches shrink with it. (shm: the payload
     * stays in the arena, only WELCOME's max_batch cuts batches.) */
    if (!shm && (uint32_t)c->pipe_size < p->segment_size)
        c->capacity = (uint32_t)c->pipe_size - LS_FRAME_HEADER_SIZE;
    r = send_hello(p, c->sock, rfd, c->pipe_size);
    close(rfd); /* the daemon holds the read end now */
    if (r < 0) {
        prod_set_error(NULL, "logsink daemon at %s dropped the connection during HELLO: %s", path, strerror(-r));
        return r;
    }
    return 0;
}

/* One connection attempt: connect, HELLO, WELCOME. On failure nothing stays open. Uses p->rx and
 * p->doc without the lock: at open nobody else runs, and on a reconnect the producer is CONN_DOWN,
 * so no flushing thread reads them. Returns 0 or -errno (prod_open_error). */
int prod_connect_once(struct ls_producer *p, struct conn_parts *c)
{
    memset(c, 0, sizeof *c);
    c->sock = c->pipe_w = -1;
    c->capacity = p->base_capacity;
    p->rx_len = 0;
    p->refused_code[0] = '\0';
    int r = p->is_tcp ? open_tcp(p, p->path, c) : open_unix(p, p->path, c);
    if (r == 0)
        r = await_welcome(p, c, p->path);
    if (r == 0 && fcntl(c->sock, F_SETFL, fcntl(c->sock, F_GETFL) | O_NONBLOCK) < 0) {
        r = -errno;
        prod_set_error(NULL, "setting up the control socket failed: %s", strerror(-r));
    }
    if (r < 0) {
        if (c->sock >= 0)
            close(c->sock);
        if (c->pipe_w >= 0)
            close(c->pipe_w);
        c->sock = c->pipe_w = -1;
    }
    return r;
}

/* Take a fresh connection into use. Lock held (or no other thread yet). */
void prod_install_conn_locked(struct ls_producer *p, struct conn_parts *c)
{
    p->sock = c->sock;
    p->pipe_w = c->pipe_w;
    p->pipe_size = c->pipe_size;
    __atomic_store_n(&p->capacity, c->capacity, __ATOMIC_RELAXED);
    p->producer_id = c->producer_id;
    memcpy(p->engine, c->engine, sizeof p->engine);
    /* A new socket counts zerocopy notifications from 0. */
    p->zc_on = c->zc_ok && !p->st.zc_switched_to_copy;
    if (p->is_tcp && p->transport == LS_TRANSPORT_ZEROCOPY && !c->zc_ok)
        p->st.zc_switched_to_copy = 1; /* the kernel refuses: every send goes copied */
    p->zc_next = p->zc_done = 0;
    p->zc_npending = 0;
    p->zc_copied_run = 0;
    memset(p->seg_zc, 0, p->segments * sizeof *p->seg_zc);
    p->wire = 0;
    p->qsent = 0;
    p->conn = CONN_UP;
    bg_watch_sock_locked(p, 1); /* (no flushing thread holds a socket: we were down) */
}
