/* ls_msgpack.h - the msgpack subset of logsink's control frames, for C producers.
 *
 * The reference codec is logsink/protocol.py (msgpack.packb(use_bin_type=True) and
 * msgpack.unpackb(raw=False, strict_map_key=True)); docs/protocol.md describes the frames:
 * a 4-byte big-endian length (1 .. LS_MAX_CONTROL_MESSAGE), then one msgpack map.
 *
 * Encoder: writes the same bytes as Python's packb for nil, bool, ints, str, arrays and maps (the
 * smallest encoding of each), so a C HELLO is byte-identical to a Python one.
 *
 * Decoder: parses one complete msgpack value into a flat, pre-order node array (a "document").
 * Every msgpack type is accepted so that unknown extra keys of a newer daemon are skipped (forward
 * compatibility), but anything malformed - truncated, trailing bytes, the never-used byte 0xc1,
 * map keys that are not str/bin, invalid UTF-8 in a str, nesting deeper than LS_MP_MAX_DEPTH -
 * is -EPROTO (Python's decoder refuses the same bytes, except for the depth limit).
 *
 * Functions return >= 0 or -errno; none leaves meaning in errno.
 */
#ifndef LS_MSGPACK_H
#define LS_MSGPACK_H

#include <stddef.h>
#include <stdint.h>

#include "ls_protocol_gen.h"

/* protocol.MAX_CONTROL_MESSAGE: a garbage length prefix cannot make us buffer GBs. */
#define LS_MAX_CONTROL_MESSAGE LS_PROTO_MAX_CONTROL_MESSAGE
/* Control messages nest 3 deep (release.failed[i]); 32 leaves room for growth and bounds the
 * decoder's recursion. */
#define LS_MP_MAX_DEPTH 32

enum ls_mp_type {
    LS_MP_NIL = 1,
    LS_MP_BOOL,
    LS_MP_INT,   /* fits int64_t: v.i (both signed and unsigned encodings land here when they fit) */
    LS_MP_UINT,  /* > INT64_MAX: v.u */
    LS_MP_FLOAT, /* v.f */
    LS_MP_STR,   /* v.s, len bytes, valid UTF-8, NOT NUL-terminated */
    LS_MP_BIN,   /* v.s, len bytes */
    LS_MP_ARRAY, /* len elements follow */
    LS_MP_MAP,   /* len key/value pairs follow, key first */
    LS_MP_EXT,   /* v.s, len bytes of data (type byte skipped) */
};

struct ls_mp_node {
    uint8_t type;  /* enum ls_mp_type */
    uint32_t len;  /* str/bin/ext bytes, array elements, map pairs */
    uint32_t next; /* index of the first node after this one's subtree (skips children) */
    union {
        int64_t i;
        uint64_t u;
        double f;
        int b;
        const char *s; /* points into the decoded buffer: keep it alive while using the doc */
    } v;
};

struct ls_mp_doc {
    struct ls_mp_node *nodes; /* nodes[0] is the root */
    uint32_t count;
    uint32_t cap;
};

/* Decode exactly one msgpack value filling buf[0..len) into *doc (which must be zeroed or reused
 * from an earlier decode: its node array is grown as needed and reused). Returns 0, -EPROTO for
 * malformed input (see above), -ENOMEM. */
int ls_mp_decode(const void *buf, size_t len, struct ls_mp_doc *doc);
void ls_mp_doc_free(struct ls_mp_doc *doc);

/* In map node `map` (an index into doc->nodes), the value node index for str key `key`, or
 * -ENOENT (also when `map` is not a map). With duplicate keys the last one wins, as in Python. */
int ls_mp_map_get(const struct ls_mp_doc *doc, uint32_t map, const char *key);
/* 1 if node `i` is a str equal to the NUL-terminated `s`, else 0. */
int ls_mp_str_eq(const struct ls_mp_doc *doc, uint32_t i, const char *s);

/* Encoder: appends to a caller-owned buffer. Errors are sticky: after the first overflow every
 * call is a no-op and ls_mp_enc_finish reports -EMSGSIZE. */
struct ls_mp_enc {
    uint8_t *buf;
    size_t cap;
    size_t len;
    int err;
};

void ls_mp_enc_init(struct ls_mp_enc *e, void *buf, size_t cap);
void ls_mp_put_nil(struct ls_mp_enc *e);
void ls_mp_put_bool(struct ls_mp_enc *e, int v);
void ls_mp_put_int(struct ls_mp_enc *e, int64_t v);
void ls_mp_put_uint(struct ls_mp_enc *e, uint64_t v);
void ls_mp_put_str(struct ls_mp_enc *e, const char *s, size_t len);
void ls_mp_put_cstr(struct ls_mp_enc *e, const char *s);
void ls_mp_put_array(struct ls_mp_enc *e, uint32_t n);
void ls_mp_put_map(struct ls_mp_enc *e, uint32_t n);
/* Returns the encoded length (>= 0) or the first error (-EMSGSIZE). */
int64_t ls_mp_enc_finish(struct ls_mp_enc *e);

/* Control frames. Begin reserves the 4-byte length; finish fills it in and returns the frame's
 * total length, or -EMSGSIZE if the body is empty, over LS_MAX_CONTROL_MESSAGE or overflowed. */
void ls_mp_frame_begin(struct ls_mp_enc *e, void *buf, size_t cap);
int64_t ls_mp_frame_finish(struct ls_mp_enc *e);

/* The body length of the frame starting at buf (>= 4 bytes available): 1 .. LS_MAX_CONTROL_MESSAGE,
 * else -EPROTO (protocol: "length out of range" is bad-message). */
int64_t ls_mp_frame_body_len(const void *buf);

#endif
