/* logsink.c - liblogsink's public API: thin wrappers over native/ls_producer.c, the producer the
 * Python package uses too. Only logsink_* symbols are exported from the shared library. */
#include "logsink.h"

#include "ls_producer.h"
#include "ls_transport.h"

#define API __attribute__((visibility("default")))

_Static_assert(LOGSINK_TRANSPORT_VMSPLICE == LS_TRANSPORT_VMSPLICE, "transport ids match");
_Static_assert(LOGSINK_TRANSPORT_COPY == LS_TRANSPORT_COPY, "transport ids match");
_Static_assert(LOGSINK_TRANSPORT_SHM == LS_TRANSPORT_SHM, "transport ids match");
_Static_assert(LOGSINK_ON_FULL_BLOCK == LS_ON_FULL_BLOCK, "on_full ids match");
_Static_assert(LOGSINK_ON_FULL_DROP == LS_ON_FULL_DROP, "on_full ids match");
_Static_assert(sizeof(struct logsink_stats) == sizeof(struct ls_producer_stats), "stats layouts match");

/* struct logsink is struct ls_producer under its public name. */
#define P(ls) ((struct ls_producer *)(ls))

API int logsink_opts_init(struct logsink_opts *opts)
{
    struct ls_producer_opts o;
    ls_producer_opts_init(&o);
    opts->transport = o.transport;
    opts->segment_size = o.segment_size;
    opts->segments = o.segments;
    opts->on_full = o.on_full;
    opts->timeout_ms = o.timeout_ms;
    opts->flush_interval_ms = o.flush_interval_ms;
    opts->expected_uid = o.expected_uid;
    opts->reconnect = o.reconnect;
    return 0;
}

API int logsink_open(const char *stream, const char *socket_path, const struct logsink_opts *opts, struct logsink **out)
{
    struct ls_producer_opts o;
    ls_producer_opts_init(&o); /* defaults for what struct logsink_opts does not carry */
    if (opts) {
        o.transport = opts->transport;
        o.segment_size = opts->segment_size;
        o.segments = opts->segments;
        o.on_full = opts->on_full;
        o.timeout_ms = opts->timeout_ms;
        o.flush_interval_ms = opts->flush_interval_ms;
        o.expected_uid = opts->expected_uid;
        o.reconnect = opts->reconnect;
    }
    return ls_producer_open(stream, socket_path, opts ? &o : NULL, (struct ls_producer **)out);
}

API int logsink_write(struct logsink *ls, const void *data, size_t len)
{
    return ls_producer_write(P(ls), data, len);
}

API int logsink_flush(struct logsink *ls, int timeout_ms)
{
    return ls_producer_flush(P(ls), timeout_ms);
}

API int logsink_close(struct logsink *ls)
{
    return ls_producer_close(P(ls));
}

API int logsink_prefault(struct logsink *ls)
{
    return ls_producer_prefault(P(ls));
}

API int logsink_stats(struct logsink *ls, struct logsink_stats *out)
{
    /* Field by field (not a struct copy): the public layout may grow apart from the internal one.
     * Every field of logsink_stats is set; the static assert above catches a field added to one only. */
    struct ls_producer_stats s;
    int r = ls_producer_stats(P(ls), &s);
    if (r < 0)
        return r;
    out->batches = s.batches;
    out->records = s.records;
    out->bytes = s.bytes;
    out->dropped_records = s.dropped_records;
    out->failed_batches = s.failed_batches;
    out->released_through = s.released_through;
    out->handed_over_through = s.handed_over_through;
    out->pinned_segments = s.pinned_segments;
    out->segment_size = s.segment_size;
    out->segments = s.segments;
    out->pipe_size = s.pipe_size;
    out->waits_for_release = s.waits_for_release;
    out->zc_sends = s.zc_sends;
    out->zc_completed = s.zc_completed;
    out->zc_copied = s.zc_copied;
    out->zc_enobufs = s.zc_enobufs;
    out->copied_sends = s.copied_sends;
    out->zc_switched_to_copy = s.zc_switched_to_copy;
    out->reconnects = s.reconnects;
    out->resent_batches = s.resent_batches;
    out->resent_bytes = s.resent_bytes;
    out->disconnected_us = s.disconnected_us;
    out->connected = s.connected;
    out->lost_batches = s.lost_batches;
    out->suppressed_batches = s.suppressed_batches;
    out->suppressed_records = s.suppressed_records;
    return 0;
}

API const char *logsink_last_error(struct logsink *ls)
{
    return ls_producer_last_error(P(ls));
}
