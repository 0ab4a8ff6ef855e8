/* ls_frame.h - the 32-byte batch frame header, shared by the engine and the producer transport.
 *
 * The reference for these bytes is logsink/protocol.py (pack_frame_header/unpack_frame_header);
 * docs/protocol.md describes them. All fields little-endian.
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

#define LS_FRAME_MAGIC "LSK1"
#define LS_FRAME_VERSION 1
#define LS_FRAME_HEADER_SIZE 32
/* Mirrors protocol.MAX_BATCH_PAYLOAD: a bad header cannot make us splice gigabytes. */
#define LS_MAX_BATCH_PAYLOAD (64u << 20)

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

/* Returns 0 if the header is valid, else a negative LS_EFRAME_* code (same checks as the Python). */
#define LS_EFRAME_MAGIC (-1)
#define LS_EFRAME_VERSION (-2)
#define LS_EFRAME_LENGTH (-3)
#define LS_EFRAME_RECORDS (-4)
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
