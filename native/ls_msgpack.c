/* ls_msgpack.c - the msgpack subset of logsink's control frames (see ls_msgpack.h). */
#include "ls_msgpack.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

/* -- decoder ------------------------------------------------------------------------------------ */

struct reader {
    const uint8_t *p;
    const uint8_t *end;
    struct ls_mp_doc *doc;
};

static uint64_t be(const uint8_t *p, int n)
{
    uint64_t v = 0;
    for (int i = 0; i < n; i++)
        v = v << 8 | p[i];
    return v;
}

/* Strict UTF-8, as Python's decoder: no overlongs, no surrogates, nothing above U+10FFFF. */
static int utf8_valid(const uint8_t *s, size_t n)
{
    size_t i = 0;
    while (i < n) {
        uint8_t c = s[i];
        if (c < 0x80) {
            i++;
            continue;
        }
        size_t need;
        uint8_t lo = 0x80, hi = 0xbf; /* allowed range of the second byte */
        if (c >= 0xc2 && c <= 0xdf)
            need = 1;
        else if (c >= 0xe0 && c <= 0xef) {
            need = 2;
            if (c == 0xe0)
                lo = 0xa0; /* overlong */
            if (c == 0xed)
                hi = 0x9f; /* surrogates */
        } else if (c >= 0xf0 && c <= 0xf4) {
            need = 3;
            if (c == 0xf0)
                lo = 0x90; /* overlong */
            if (c == 0xf4)
                hi = 0x8f; /* > U+10FFFF */
        } else
            return 0;
        if (n - i <= need)
            return 0;
        if (s[i + 1] < lo || s[i + 1] > hi)
            return 0;
        for (size_t k = 2; k <= need; k++)
            if ((s[i + k] & 0xc0) != 0x80)
                return 0;
        i += need + 1;
    }
    return 1;
}

static int new_node(struct reader *r, uint8_t type, uint32_t *idx)
{
    struct ls_mp_doc *d = r->doc;
    if (d->count == d->cap) {
        /* Every node consumes at least one input byte, so the array never outgrows the input
         * (which is bounded by LS_MAX_CONTROL_MESSAGE). */
        uint32_t cap = d->cap ? d->cap * 2 : 32;
        struct ls_mp_node *n = realloc(d->nodes, (size_t)cap * sizeof *n);
        if (!n)
            return -ENOMEM;
        d->nodes = n;
        d->cap = cap;
    }
    *idx = d->count++;
    memset(&d->nodes[*idx], 0, sizeof d->nodes[*idx]);
    d->nodes[*idx].type = type;
    return 0;
}

static int take(struct reader *r, size_t n, const uint8_t **out)
{
    if ((size_t)(r->end - r->p) < n)
        return -EPROTO; /* truncated */
    *out = r->p;
    r->p += n;
    return 0;
}

static int parse(struct reader *r, int depth, int is_key);

static int parse_bytes(struct reader *r, uint8_t type, size_t n, uint32_t idx_unused)
{
    (void)idx_unused;
    const uint8_t *s;
    int ret = take(r, n, &s);
    if (ret < 0)
        return ret;
    if (type == LS_MP_STR && !utf8_valid(s, n))
        return -EPROTO;
    uint32_t idx;
    if ((ret = new_node(r, type, &idx)) < 0)
        return ret;
    r->doc->nodes[idx].len = (uint32_t)n;
    r->doc->nodes[idx].v.s = (const char *)s;
    r->doc->nodes[idx].next = idx + 1;
    return 0;
}

static int parse_container(struct reader *r, uint8_t type, uint64_t n, int depth)
{
    if (depth >= LS_MP_MAX_DEPTH)
        return -EPROTO;
    /* Each element needs at least one byte: a count larger than what is left is garbage, and
     * rejecting it early keeps a 4-byte header from promising 4 billion nodes. */
    uint64_t min_bytes = type == LS_MP_MAP ? n * 2 : n;
    if (min_bytes > (uint64_t)(r->end - r->p))
        return -EPROTO;
    uint32_t idx;
    int ret = new_node(r, type, &idx);
    if (ret < 0)
        return ret;
    r->doc->nodes[idx].len = (uint32_t)n;
    for (uint64_t i = 0; i < n; i++) {
        if (type == LS_MP_MAP && (ret = parse(r, depth + 1, 1)) < 0)
            return ret;
        if ((ret = parse(r, depth + 1, 0)) < 0)
            return ret;
    }
    r->doc->nodes[idx].next = r->doc->count;
    return 0;
}

static int parse_int(struct reader *r, int64_t i)
{
    uint32_t idx;
    int ret = new_node(r, LS_MP_INT, &idx);
    if (ret < 0)
        return ret;
    r->doc->nodes[idx].v.i = i;
    r->doc->nodes[idx].next = idx + 1;
    return 0;
}

static int parse_uint(struct reader *r, uint64_t u)
{
    if (u <= INT64_MAX)
        return parse_int(r, (int64_t)u);
    uint32_t idx;
    int ret = new_node(r, LS_MP_UINT, &idx);
    if (ret < 0)
        return ret;
    r->doc->nodes[idx].v.u = u;
    r->doc->nodes[idx].next = idx + 1;
    return 0;
}

static int parse_simple(struct reader *r, uint8_t type, int b, double f)
{
    uint32_t idx;
    int ret = new_node(r, type, &idx);
    if (ret < 0)
        return ret;
    r->doc->nodes[idx].v.b = b;
    if (type == LS_MP_FLOAT)
        r->doc->nodes[idx].v.f = f;
    r->doc->nodes[idx].next = idx + 1;
    return 0;
}

static int parse_ext(struct reader *r, size_t n)
{
    const uint8_t *t;
    int ret = take(r, 1, &t);
    if (ret < 0)
        return ret;
    /* Type -1 is the timestamp extension: Python decodes it and refuses other lengths. */
    if ((int8_t)t[0] == -1 && n != 4 && n != 8 && n != 12)
        return -EPROTO;
    return parse_bytes(r, LS_MP_EXT, n, 0);
}

/* is_key: strict_map_key - a map key must be str or bin. */
static int parse(struct reader *r, int depth, int is_key)
{
    const uint8_t *h, *x;
    int ret = take(r, 1, &h);
    if (ret < 0)
        return ret;
    uint8_t c = h[0];
    if (is_key && !((c >= 0xa0 && c <= 0xbf) || (c >= 0xc4 && c <= 0xc6) || (c >= 0xd9 && c <= 0xdb)))
        return -EPROTO;
    if (c <= 0x7f)
        return parse_int(r, c);
    if (c >= 0xe0)
        return parse_int(r, (int8_t)c);
    if (c >= 0x80 && c <= 0x8f)
        return parse_container(r, LS_MP_MAP, c & 0x0f, depth);
    if (c >= 0x90 && c <= 0x9f)
        return parse_container(r, LS_MP_ARRAY, c & 0x0f, depth);
    if (c >= 0xa0 && c <= 0xbf)
        return parse_bytes(r, LS_MP_STR, c & 0x1f, 0);
    switch (c) {
    case 0xc0:
        return parse_simple(r, LS_MP_NIL, 0, 0);
    case 0xc2:
    case 0xc3:
        return parse_simple(r, LS_MP_BOOL, c == 0xc3, 0);
    case 0xc4: case 0xc5: case 0xc6: { /* bin 8/16/32 */
        int w = 1 << (c - 0xc4);
        if ((ret = take(r, (size_t)w, &x)) < 0)
            return ret;
        return parse_bytes(r, LS_MP_BIN, (size_t)be(x, w), 0);
    }
    case 0xc7: case 0xc8: case 0xc9: { /* ext 8/16/32 */
        int w = 1 << (c - 0xc7);
        if ((ret = take(r, (size_t)w, &x)) < 0)
            return ret;
        return parse_ext(r, (size_t)be(x, w));
    }
    case 0xca: { /* float 32 */
        if ((ret = take(r, 4, &x)) < 0)
            return ret;
        uint32_t bits = (uint32_t)be(x, 4);
        float f;
        memcpy(&f, &bits, 4);
        return parse_simple(r, LS_MP_FLOAT, 0, f);
    }
    case 0xcb: { /* float 64 */
        if ((ret = take(r, 8, &x)) < 0)
            return ret;
        uint64_t bits = be(x, 8);
        double f;
        memcpy(&f, &bits, 8);
        return parse_simple(r, LS_MP_FLOAT, 0, f);
    }
    case 0xcc: case 0xcd: case 0xce: case 0xcf: { /* uint 8/16/32/64 */
        int w = 1 << (c - 0xcc);
        if ((ret = take(r, (size_t)w, &x)) < 0)
            return ret;
        return parse_uint(r, be(x, w));
    }
    case 0xd0: case 0xd1: case 0xd2: case 0xd3: { /* int 8/16/32/64: sign-extend */
        int w = 1 << (c - 0xd0);
        if ((ret = take(r, (size_t)w, &x)) < 0)
            return ret;
        uint64_t u = be(x, w);
        int shift = 64 - 8 * w;
        int64_t v = shift ? (int64_t)(u << shift) >> shift : (int64_t)u;
        return parse_int(r, v);
    }
    case 0xd4: case 0xd5: case 0xd6: case 0xd7: case 0xd8: /* fixext 1/2/4/8/16 */
        return parse_ext(r, (size_t)1 << (c - 0xd4));
    case 0xd9: case 0xda: case 0xdb: { /* str 8/16/32 */
        int w = 1 << (c - 0xd9);
        if ((ret = take(r, (size_t)w, &x)) < 0)
            return ret;
        return parse_bytes(r, LS_MP_STR, (size_t)be(x, w), 0);
    }
    case 0xdc: case 0xdd: { /* array 16/32 */
        int w = c == 0xdc ? 2 : 4;
        if ((ret = take(r, (size_t)w, &x)) < 0)
            return ret;
        return parse_container(r, LS_MP_ARRAY, be(x, w), depth);
    }
    case 0xde: case 0xdf: { /* map 16/32 */
        int w = c == 0xde ? 2 : 4;
        if ((ret = take(r, (size_t)w, &x)) < 0)
            return ret;
        return parse_container(r, LS_MP_MAP, be(x, w), depth);
    }
    default: /* 0xc1: never used */
        return -EPROTO;
    }
}

int ls_mp_decode(const void *buf, size_t len, struct ls_mp_doc *doc)
{
    if (len > LS_MAX_CONTROL_MESSAGE)
        return -EPROTO;
    struct reader r = {.p = buf, .end = (const uint8_t *)buf + len, .doc = doc};
    doc->count = 0;
    int ret = parse(&r, 0, 0);
    if (ret < 0)
        return ret;
    if (r.p != r.end)
        return -EPROTO; /* extra data after the value */
    return 0;
}

void ls_mp_doc_free(struct ls_mp_doc *doc)
{
    free(doc->nodes);
    doc->nodes = NULL;
    doc->count = doc->cap = 0;
}

int ls_mp_str_eq(const struct ls_mp_doc *doc, uint32_t i, const char *s)
{
    if (i >= doc->count || doc->nodes[i].type != LS_MP_STR)
        return 0;
    size_t n = strlen(s);
    return doc->nodes[i].len == n && memcmp(doc->nodes[i].v.s, s, n) == 0;
}

int ls_mp_map_get(const struct ls_mp_doc *doc, uint32_t map, const char *key)
{
    if (map >= doc->count || doc->nodes[map].type != LS_MP_MAP)
        return -ENOENT;
    int found = -ENOENT;
    uint32_t k = map + 1;
    for (uint32_t i = 0; i < doc->nodes[map].len; i++) {
        uint32_t v = doc->nodes[k].next;
        if (ls_mp_str_eq(doc, k, key))
            found = (int)v;
        k = doc->nodes[v].next;
    }
    return found;
}

/* -- encoder ------------------------------------------------------------------------------------ */

void ls_mp_enc_init(struct ls_mp_enc *e, void *buf, size_t cap)
{
    e->buf = buf;
    e->cap = cap;
    e->len = 0;
    e->err = 0;
}

static void put(struct ls_mp_enc *e, const void *src, size_t n)
{
    if (e->err)
        return;
    if (e->cap - e->len < n) {
        e->err = -EMSGSIZE;
        return;
    }
    memcpy(e->buf + e->len, src, n);
    e->len += n;
}

/* Tag byte then v as a w-byte big-endian number. */
static void put_tagged(struct ls_mp_enc *e, uint8_t tag, uint64_t v, int w)
{
    uint8_t b[9];
    b[0] = tag;
    for (int i = 0; i < w; i++)
        b[1 + i] = (uint8_t)(v >> (8 * (w - 1 - i)));
    put(e, b, (size_t)w + 1);
}

void ls_mp_put_nil(struct ls_mp_enc *e)
{
    put_tagged(e, 0xc0, 0, 0);
}

void ls_mp_put_bool(struct ls_mp_enc *e, int v)
{
    put_tagged(e, v ? 0xc3 : 0xc2, 0, 0);
}

void ls_mp_put_uint(struct ls_mp_enc *e, uint64_t v)
{
    if (v <= 0x7f)
        put_tagged(e, (uint8_t)v, 0, 0);
    else if (v <= 0xff)
        put_tagged(e, 0xcc, v, 1);
    else if (v <= 0xffff)
        put_tagged(e, 0xcd, v, 2);
    else if (v <= 0xffffffffu)
        put_tagged(e, 0xce, v, 4);
    else
        put_tagged(e, 0xcf, v, 8);
}

/* Python's packer: non-negative ints use the unsigned formats, negative ones the smallest signed. */
void ls_mp_put_int(struct ls_mp_enc *e, int64_t v)
{
    if (v >= 0)
        ls_mp_put_uint(e, (uint64_t)v);
    else if (v >= -32)
        put_tagged(e, (uint8_t)(int8_t)v, 0, 0);
    else if (v >= INT8_MIN)
        put_tagged(e, 0xd0, (uint64_t)v & 0xff, 1);
    else if (v >= INT16_MIN)
        put_tagged(e, 0xd1, (uint64_t)v & 0xffff, 2);
    else if (v >= INT32_MIN)
        put_tagged(e, 0xd2, (uint64_t)v & 0xffffffffu, 4);
    else
        put_tagged(e, 0xd3, (uint64_t)v, 8);
}

void ls_mp_put_str(struct ls_mp_enc *e, const char *s, size_t len)
{
    if (len > 0xffffffffu) {
        e->err = e->err ? e->err : -EMSGSIZE;
        return;
    }
    if (len <= 31)
        put_tagged(e, (uint8_t)(0xa0 | len), 0, 0);
    else if (len <= 0xff)
        put_tagged(e, 0xd9, len, 1);
    else if (len <= 0xffff)
        put_tagged(e, 0xda, len, 2);
    else
        put_tagged(e, 0xdb, len, 4);
    put(e, s, len);
}

void ls_mp_put_cstr(struct ls_mp_enc *e, const char *s)
{
    ls_mp_put_str(e, s, strlen(s));
}

void ls_mp_put_array(struct ls_mp_enc *e, uint32_t n)
{
    if (n <= 15)
        put_tagged(e, (uint8_t)(0x90 | n), 0, 0);
    else if (n <= 0xffff)
        put_tagged(e, 0xdc, n, 2);
    else
        put_tagged(e, 0xdd, n, 4);
}

void ls_mp_put_map(struct ls_mp_enc *e, uint32_t n)
{
    if (n <= 15)
        put_tagged(e, (uint8_t)(0x80 | n), 0, 0);
    else if (n <= 0xffff)
        put_tagged(e, 0xde, n, 2);
    else
        put_tagged(e, 0xdf, n, 4);
}

int64_t ls_mp_enc_finish(struct ls_mp_enc *e)
{
    return e->err ? e->err : (int64_t)e->len;
}

void ls_mp_frame_begin(struct ls_mp_enc *e, void *buf, size_t cap)
{
    ls_mp_enc_init(e, buf, cap);
    put(e, "\0\0\0\0", 4);
}

int64_t ls_mp_frame_finish(struct ls_mp_enc *e)
{
    if (e->err)
        return e->err;
    size_t body = e->len - 4;
    if (body == 0 || body > LS_MAX_CONTROL_MESSAGE)
        return -EMSGSIZE;
    e->buf[0] = (uint8_t)(body >> 24);
    e->buf[1] = (uint8_t)(body >> 16);
    e->buf[2] = (uint8_t)(body >> 8);
    e->buf[3] = (uint8_t)body;
    return (int64_t)e->len;
}

int64_t ls_mp_frame_body_len(const void *buf)
{
    uint64_t n = be(buf, 4);
    if (n == 0 || n > LS_MAX_CONTROL_MESSAGE)
        return -EPROTO;
    return (int64_t)n;
}
