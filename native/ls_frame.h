/* ls_frame.h - the 32-byte batch frame header, shared by the engine and the producer transport.
 *
 * The reference for these bytes is logsink/protocol.py (pack_frame_header/unpack_frame_header);
 * the constants come from it (ls_protocol_gen.h) and tests/test_conformance.py runs the same
 * headers through both checks. docs/protocol.md describes them. All fields little-endian.
 *
 *   off size field
 *   0   4    magic "LSK1"
 *   4   1    version (1)
 *   5   1    flags (0)
 *   6   2    header_len (32)
 *   8   4    payload_len   (1 .. max batch)
 *   12  4    record_count  (1 .. payload_len)
 *   16  8    seq           (per producer, 1, 2, 3, ...)
 *   24  8    reserved (0)
 */
#ifndef LS_FRAME_H
#define LS_FRAME_H

#include <stdint.h>
#include <string.h>

#include "ls_protocol_gen.h"

#define LS_FRAME_MAGIC LS_PROTO_FRAME_MAGIC
#define LS_FRAME_VERSION LS_PROTO_VERSION
#define LS_FRAME_HEADER_SIZE LS_PROTO_FRAME_HEADER_SIZE
/* protocol.MAX_BATCH_PAYLOAD: a bad header cannot make us splice gigabytes. */
#define LS_MAX_BATCH_PAYLOAD LS_PROTO_MAX_BATCH_PAYLOAD

struct ls_frame_header {
    char magic[4];
    uint8_t version;
    uint8_t flags;
    uint16_t header_len;
    uint32_t payload_len;
    uint32_t record_count;
    uint64_t seq;
    uint64_t reserved;
} __attribute__((packed));

_Static_assert(sizeof(struct ls_frame_header) == LS_FRAME_HEADER_SIZE, "frame header is 32 bytes");

static inline void ls_frame_fill(void *dst, uint32_t payload_len, uint32_t records, uint64_t seq)
{
    struct ls_frame_header h;
    memcpy(h.magic, LS_FRAME_MAGIC, 4);
    h.version = LS_FRAME_VERSION;
    h.flags = 0;
    h.header_len = LS_FRAME_HEADER_SIZE;
    h.payload_len = payload_len;
    h.record_count = records;
    h.seq = seq;
    h.reserved = 0;
    memcpy(dst, &h, sizeof h);
}

/* Frame verdicts: what is wrong with a batch. Positive and from 1001 up, so that they can never be
 * taken for (or mixed with) a -errno; they travel in LS_EV_BAD_FRAME's err (ls_engine.h adds
 * LS_EBATCH_* after these). 0 means the header is valid. */
#define LS_FRAME_VERDICT_BASE 1000
#define LS_EFRAME_MAGIC (LS_FRAME_VERDICT_BASE + 1)   /* magic is not "LSK1" */
#define LS_EFRAME_VERSION (LS_FRAME_VERDICT_BASE + 2) /* version or header_len unsupported */
#define LS_EFRAME_LENGTH (LS_FRAME_VERDICT_BASE + 3)  /* payload_len 0 or over max_payload */
#define LS_EFRAME_RECORDS (LS_FRAME_VERDICT_BASE + 4) /* record_count 0 or over payload_len */
/* Returns 0 if the header is valid, else its LS_EFRAME_* verdict (the checks of
 * protocol.unpack_frame_header, in the same order). */
static inline int ls_frame_check(const struct ls_frame_header *h, uint32_t max_payload)
{
    if (memcmp(h->magic, LS_FRAME_MAGIC, 4) != 0)
        return LS_EFRAME_MAGIC;
    if (h->version != LS_FRAME_VERSION || h->header_len != LS_FRAME_HEADER_SIZE)
        return LS_EFRAME_VERSION;
    if (h->payload_len == 0 || h->payload_len > max_payload)
        return LS_EFRAME_LENGTH;
    if (h->record_count == 0 || h->record_count > h->payload_len)
        return LS_EFRAME_RECORDS;
    return 0;
}

#endif
