/* ls_producer_msg.c - the producer's control messages: read, decode, check, act on.
 *
 * The control socket carries length-prefixed msgpack frames (docs/protocol.md). This file receives
 * them into p->rx, decodes one at a time into p->doc and checks it as protocol.check_message does
 * (the schema table generated from logsink/protocol.py, plus the rules beyond it; the same checks
 * back ls_check_control_frame and the stream-name rule ls_validate_stream_name), then acts on it:
 * RELEASE pops the queue, SHUTDOWN hands over what is held and ends the pipe, ERROR breaks the
 * producer or (retriable, with reconnect) takes the connection down. Lock rules: ls_producer_int.h.
 */
#include "ls_producer_int.h"
#include "ls_frame.h"
#include "ls_msgpack.h"

#include <errno.h>
#include <limits.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#define RECV_CHUNK 65536

/* -- stream names ------------------------------------------------------------------------------- */

/* protocol.validate_stream_name over n bytes (a msgpack str is not NUL-terminated): 1 ..
 * MAX_STREAM_NAME of STREAM_NAME_CHARS, not starting with '.', without "..". */
static int stream_name_ok(const char *s, size_t n)
{
    if (n == 0 || n > LS_PROTO_MAX_STREAM_NAME || s[0] == '.')
        return 0;
    for (size_t i = 0; i < n; i++) {
        if (s[i] == '\0' || !strchr(LS_PROTO_STREAM_NAME_CHARS, s[i]) || (i && s[i] == '.' && s[i - 1] == '.'))
            return 0;
    }
    return 1;
}

int ls_validate_stream_name(const char *s)
{
    return s && stream_name_ok(s, strnlen(s, LS_MAX_STREAM_NAME + 1)) ? 0 : -EINVAL;
}


/* -- control messages -------------------------------------------------------------------------- */

int prod_is_int(const struct ls_mp_doc *d, int i)
{
    return i >= 0 && (d->nodes[i].type == LS_MP_INT || d->nodes[i].type == LS_MP_UINT);
}

static int is_str(const struct ls_mp_doc *d, int i)
{
    return i >= 0 && d->nodes[i].type == LS_MP_STR;
}

/* RELEASE's optional 'suppressed': [[seq, records], ...], batches dropped over a rate limit. */
static const char *check_suppressed(const struct ls_mp_doc *d, char *why, size_t whylen)
{
    int f = ls_mp_map_get(d, 0, "suppressed");
    if (f < 0)
        return NULL;
    int ok = d->nodes[f].type == LS_MP_ARRAY;
    uint32_t e = (uint32_t)f + 1;
    for (uint32_t i = 0; ok && i < d->nodes[f].len; i++, e = d->nodes[e].next)
        ok = d->nodes[e].type == LS_MP_ARRAY && d->nodes[e].len == 2 && prod_is_int(d, (int)e + 1) &&
             prod_is_int(d, (int)d->nodes[e + 1].next);
    if (!ok) {
        snprintf(why, whylen, "release 'suppressed' must be a list of [seq, records]");
        return LS_PROTO_E_BAD_MESSAGE;
    }
    return NULL;
}

/* The rules of protocol.check_message beyond the schema table, for RELEASE and HELLO. */
static const char *check_rules(const struct ls_mp_doc *d, int kind, char *why, size_t whylen)
{
    if (kind == LS_MSG_RELEASE) {
        const struct ls_mp_node *t = &d->nodes[ls_mp_map_get(d, 0, "through")];
        if (t->type == LS_MP_INT && t->v.i < 0) {
            snprintf(why, whylen, "release 'through' must be >= 0, got %lld", (long long)t->v.i);
            return LS_PROTO_E_BAD_MESSAGE;
        }
        int f = ls_mp_map_get(d, 0, "failed"); /* optional: [[seq, code, reason], ...] */
        if (f < 0)
            return check_suppressed(d, why, whylen);
        int ok = d->nodes[f].type == LS_MP_ARRAY;
        uint32_t e = (uint32_t)f + 1;
        for (uint32_t i = 0; ok && i < d->nodes[f].len; i++, e = d->nodes[e].next) {
            ok = d->nodes[e].type == LS_MP_ARRAY && d->nodes[e].len == 3 && prod_is_int(d, (int)e + 1) &&
                 is_str(d, (int)d->nodes[e + 1].next) && is_str(d, (int)d->nodes[d->nodes[e + 1].next].next);
        }
        if (!ok) {
            snprintf(why, whylen, "release 'failed' must be a list of [seq, code, reason]");
            return LS_PROTO_E_BAD_MESSAGE;
        }
        return check_suppressed(d, why, whylen);
    } else if (kind == LS_MSG_HELLO) {
        const struct ls_mp_node *v = &d->nodes[ls_mp_map_get(d, 0, "v")];
        if (v->type != LS_MP_INT || v->v.i != LS_PROTO_VERSION) {
            if (v->type == LS_MP_INT)
                snprintf(why, whylen, "protocol version %lld is not supported (this daemon speaks %d)",
                         (long long)v->v.i, LS_PROTO_VERSION);
            else
                snprintf(why, whylen, "protocol version %llu is not supported (this daemon speaks %d)",
                         (unsigned long long)v->v.u, LS_PROTO_VERSION);
            return LS_PROTO_E_BAD_VERSION;
        }
        const struct ls_mp_node *s = &d->nodes[ls_mp_map_get(d, 0, "stream")];
        if (!stream_name_ok(s->v.s, s->len)) {
            snprintf(why, whylen, "stream name is invalid: use 1 to %d characters of [A-Za-z0-9._-], not starting "
                     "with '.' and without '..'", LS_PROTO_MAX_STREAM_NAME);
            return LS_PROTO_E_BAD_STREAM;
        }
        static const char *const transports[] = LS_PROTO_TRANSPORTS;
        int t = ls_mp_map_get(d, 0, "transport");
        for (size_t i = 0; i < sizeof transports / sizeof transports[0]; i++)
            if (ls_mp_str_eq(d, (uint32_t)t, transports[i]))
                return NULL;
        snprintf(why, whylen, "transport is not one of the protocol's transports");
        return LS_PROTO_E_BAD_MESSAGE;
    }
    return NULL;
}

/* protocol.check_message: the map, a known "t", the required keys with their types (the table
 * generated from protocol._SCHEMA), then check_rules. Returns the kind (enum ls_msg_kind) or
 * -EPROTO with `why` filled in and *code the protocol error code (E_BAD_MESSAGE, ...). */
int prod_check_message(const struct ls_mp_doc *d, const char **code, char *why, size_t whylen)
{
    static const struct ls_msg_schema schema[] = LS_PROTO_SCHEMA;
    *code = LS_PROTO_E_BAD_MESSAGE;
    if (d->nodes[0].type != LS_MP_MAP) {
        snprintf(why, whylen, "control message is not a map");
        return -EPROTO;
    }
    int t = ls_mp_map_get(d, 0, "t");
    for (size_t k = 0; k < sizeof schema / sizeof schema[0]; k++) {
        if (!ls_mp_str_eq(d, (uint32_t)(t < 0 ? UINT32_MAX : (uint32_t)t), schema[k].name))
            continue;
        for (const struct ls_msg_field *f = schema[k].fields; f->key; f++) {
            int v = ls_mp_map_get(d, 0, f->key);
            if (f->type == LS_FIELD_INT ? !prod_is_int(d, v) : !is_str(d, v)) {
                snprintf(why, whylen, "%s message needs '%s' of type %s", schema[k].name, f->key,
                         f->type == LS_FIELD_INT ? "int" : "str");
                return -EPROTO;
            }
        }
        const char *bad = check_rules(d, schema[k].kind, why, whylen);
        if (bad) {
            *code = bad;
            return -EPROTO;
        }
        return schema[k].kind;
    }
    snprintf(why, whylen, "unknown control message type");
    return -EPROTO;
}

/* A str node as a bounded C string (for messages). */
const char *prod_str_of(const struct ls_mp_doc *d, int i, char *buf, size_t size)
{
    if (!is_str(d, i)) {
        snprintf(buf, size, "?");
        return buf;
    }
    int n = d->nodes[i].len > INT_MAX ? INT_MAX : (int)d->nodes[i].len;
    snprintf(buf, size, "%.*s", n, d->nodes[i].v.s);
    return buf;
}

/* Take the first complete frame off p->rx into p->doc. Returns 1 (decoded), 0 (need more bytes)
 * or -EPROTO (garbage: the connection is unusable). */
int prod_next_frame(struct ls_producer *p, char *why, size_t whylen)
{
    if (p->rx_len < 4)
        return 0;
    int64_t n = ls_mp_frame_body_len(p->rx);
    if (n < 0) {
        snprintf(why, whylen, "control frame length is outside 1..%u", LS_MAX_CONTROL_MESSAGE);
        return -EPROTO;
    }
    if (p->rx_len < 4 + (size_t)n)
        return 0;
    int r = ls_mp_decode(p->rx + 4, (size_t)n, &p->doc);
    /* The doc points into rx: callers use it before the next prod_next_frame, which compacts. Shift
     * lazily: remember how much to drop. */
    if (r < 0) {
        snprintf(why, whylen, "control frame is not valid msgpack");
        return r == -ENOMEM ? r : -EPROTO;
    }
    return 1;
}

void prod_consume_frame(struct ls_producer *p)
{
    size_t n = 4 + (size_t)ls_mp_frame_body_len(p->rx);
    memmove(p->rx, p->rx + n, p->rx_len - n);
    p->rx_len -= n;
}

int ls_check_control_frame(const void *buf, size_t len, char *why, size_t whylen)
{
    char w[256];
    const char *code = LS_PROTO_E_BAD_MESSAGE;
    int r;
    if (len < 4)
        return 0;
    int64_t n = ls_mp_frame_body_len(buf);
    if (n < 0) {
        snprintf(w, sizeof w, "control frame length is outside 1..%u", LS_MAX_CONTROL_MESSAGE);
        r = -EPROTO;
    } else if (len < 4 + (size_t)n) {
        return 0;
    } else {
        struct ls_mp_doc doc = {0};
        r = ls_mp_decode((const char *)buf + 4, (size_t)n, &doc);
        if (r == -ENOMEM)
            return r;
        if (r < 0)
            snprintf(w, sizeof w, "control frame is not valid msgpack");
        else
            r = prod_check_message(&doc, &code, w, sizeof w);
        ls_mp_doc_free(&doc);
    }
    if (r < 0 && why && whylen)
        snprintf(why, whylen, "%s: %s", code, w);
    return r;
}

int ls_check_frame_header(const void *buf, size_t len, uint32_t max_payload)
{
    struct ls_frame_header h;
    if (len != sizeof h)
        return -EINVAL;
    memcpy(&h, buf, sizeof h);
    return ls_frame_check(&h, max_payload);
}

/* Receive what the socket has into rx. Returns bytes read (> 0), 0 on EOF, -errno. */
int prod_recv_some(struct ls_producer *p, int sock)
{
    if (p->rx_cap - p->rx_len < RECV_CHUNK) {
        /* Bounded: rx never holds more than one incomplete frame (<= 4 + LS_MAX_CONTROL_MESSAGE)
         * plus one chunk, as complete frames are consumed right away. */
        size_t cap = p->rx_cap ? p->rx_cap * 2 : 2 * RECV_CHUNK;
        while (cap - p->rx_len < RECV_CHUNK)
            cap *= 2;
        uint8_t *rx = realloc(p->rx, cap);
        if (!rx)
            return -ENOMEM;
        p->rx = rx;
        p->rx_cap = cap;
    }
    ssize_t r = recv(sock, p->rx + p->rx_len, RECV_CHUNK, MSG_DONTWAIT);
    if (r < 0)
        return -errno;
    p->rx_len += (size_t)r;
    return (int)r;
}

/* -- acting on messages (lock held) --------------------------------------------------------------- */

/* ERROR codes worth a reconnect (protocol.RETRIABLE_CODES): the daemon is stopping, full, or
 * failed on its side. The rest (forbidden, bad-stream, auth: the answer will not change;
 * bad-frame, bad-message, bad-fd, bad-version, too-many-fds: our bug; file-refused: the operator
 * must fix the file; codes this client does not know) end the producer. */
int prod_retriable_code(const char *code)
{
    static const char *const retriable[] = LS_PROTO_RETRIABLE_CODES;
    for (size_t i = 0; i < sizeof retriable / sizeof retriable[0]; i++)
        if (strcmp(code, retriable[i]) == 0)
            return 1;
    return 0;
}

/* Act on one control message (p->doc). Lock held. Returns 0 or -EPROTO (why filled in). */
static int on_message_locked(struct ls_producer *p, char *why, size_t whylen)
{
    const struct ls_mp_doc *d = &p->doc;
    const char *code_unused;
    int kind = prod_check_message(d, &code_unused, why, whylen);
    if (kind < 0)
        return kind;
    if (kind == LS_MSG_RELEASE) {
        const struct ls_mp_node *t = &d->nodes[ls_mp_map_get(d, 0, "through")];
        uint64_t through = t->type == LS_MP_UINT ? t->v.u : t->v.i < 0 ? 0 : (uint64_t)t->v.i;
        int f = ls_mp_map_get(d, 0, "failed");
        uint32_t nfailed = 0;
        if (f >= 0) {
            /* [[seq, code, reason], ...]: batches that were NOT written (prod_check_message checked the shape). */
            nfailed = d->nodes[f].len;
            uint32_t e = (uint32_t)f + 1;
            for (uint32_t i = 0; i < nfailed; i++, e = d->nodes[e].next) {
                if (i == 0 && p->failed_pending == 0) {
                    char code[64], reason[256];
                    uint32_t c = d->nodes[e + 1].next, r = d->nodes[c].next;
                    const struct ls_mp_node *s = &d->nodes[e + 1];
                    snprintf(p->failed_first, ERRLEN, "seq %llu: %s: %s",
                             s->type == LS_MP_UINT ? (unsigned long long)s->v.u : (unsigned long long)s->v.i,
                             prod_str_of(d, (int)c, code, sizeof code), prod_str_of(d, (int)r, reason, sizeof reason));
                }
            }
        }
        int sp = ls_mp_map_get(d, 0, "suppressed");
        if (sp >= 0) { /* dropped over the daemon's rate limit: released, not written */
            uint32_t e = (uint32_t)sp + 1;
            for (uint32_t i = 0; i < d->nodes[sp].len; i++, e = d->nodes[e].next) {
                const struct ls_mp_node *r = &d->nodes[d->nodes[e + 1].next];
                p->st.suppressed_records += r->type == LS_MP_UINT ? r->v.u : r->v.i < 0 ? 0 : (uint64_t)r->v.i;
                p->st.suppressed_batches++;
            }
        }
        /* `through` counts this connection's frames: pop the batches whose (last) frame it covers. */
        while (p->qsent > 0 && prod_q_at(p, 0)->wire_last <= through) {
            p->qhead++;
            p->qlen--;
            p->qsent--;
        }
        if (!p->qlen)
            p->qhead = 0;
        prod_update_released_locked(p);
        p->failed_pending += nfailed;
        p->st.failed_batches += nfailed;
        pthread_cond_broadcast(&p->cond);
        prod_signal_event(p);
    } else if (kind == LS_MSG_SHUTDOWN) {
        /* Hand over what we hold and end the pipe: the daemon drains it before it exits. With
         * reconnect, keep reading RELEASEs until the daemon closes, then reconnect. */
        if (p->reconnect) {
            if (p->conn == CONN_UP) {
                if (__atomic_load_n(&p->pos, __ATOMIC_RELAXED) && !p->broken)
                    (void)prod_handover_current_locked(p);
                if (p->conn == CONN_UP) {
                    p->conn = CONN_DRAINING;
                    p->down_since_ms = prod_now_ms();
                    snprintf(p->last_error, ERRLEN, "the logsink daemon is shutting down; will reconnect");
                }
                prod_close_pipe_locked(p);
            }
        } else {
            p->stopping = 1;
            if (__atomic_load_n(&p->pos, __ATOMIC_RELAXED) && !p->broken)
                (void)prod_handover_current_locked(p); /* a failure marks us broken */
            prod_close_pipe_locked(p);
        }
        pthread_cond_broadcast(&p->cond);
        prod_signal_event(p);
    } else if (kind == LS_MSG_ERROR) {
        char code[64], reason[400], msg[ERRLEN];
        snprintf(msg, sizeof msg, "the logsink daemon closed this producer: %s: %s",
                 prod_str_of(d, ls_mp_map_get(d, 0, "code"), code, sizeof code),
                 prod_str_of(d, ls_mp_map_get(d, 0, "reason"), reason, sizeof reason));
        if (p->reconnect && prod_retriable_code(code)) {
            prod_go_down_locked(p, msg);
            return 0;
        }
        if (!p->broken && !p->closed) {
            p->broken = ECONNRESET;
            snprintf(p->last_error, ERRLEN, "%s", msg);
        }
        pthread_cond_broadcast(&p->cond);
        prod_signal_event(p);
    }
    /* welcome, status, hello: valid messages a producer has no use for here; ignored. */
    return 0;
}

/* Decode and act on every complete frame in rx. Lock held. Returns 0 or -EPROTO/-ENOMEM. */
int prod_drain_frames_locked(struct ls_producer *p)
{
    char why[256];
    int r;
    while ((r = prod_next_frame(p, why, sizeof why)) == 1) {
        r = on_message_locked(p, why, sizeof why);
        prod_consume_frame(p);
        if (r < 0)
            break;
    }
    if (r < 0) {
        char msg[ERRLEN];
        snprintf(msg, sizeof msg, "the daemon sent a bad control message: %s", r == -ENOMEM ? "out of memory" : why);
        prod_lost_locked(p, msg);
        return r;
    }
    return 0;
}

