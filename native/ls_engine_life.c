/* ls_engine_life.c - the engine's life and what it reports: creating it (the io_uring -> splice ->
 * readwrite ladder), its events and counters, freeing it (see ls_engine.h for the contract).
 *
 * The producer state machine and the stream/producer requests live in ls_engine.c; the backends in
 * ls_engine_uring.c and ls_engine_epoll.c (the seam is ls_engine_int.h).
 */
#include "ls_engine_int.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <unistd.h>

int ls_engine_new(int kind, uint32_t max_streams, uint32_t max_producers, uint32_t max_batch,
                  struct ls_engine **out)
{
    if (kind < LS_ENGINE_AUTO || kind > LS_ENGINE_READWRITE || max_streams == 0 || max_producers == 0 ||
        max_producers >= UINT32_MAX / HDR_STRIDE || max_batch == 0 || max_batch > LS_MAX_BATCH_PAYLOAD)
        return -EINVAL;
    struct ls_engine *e = calloc(1, sizeof *e);
    if (!e)
        return -ENOMEM;
    e->ep = -1;
    e->notify_fd = e->wake_fd = e->devnull = -1;
    e->max_streams = max_streams;
    e->max_producers = max_producers;
    e->max_batch = max_batch;
    e->prod = calloc(max_producers, sizeof *e->prod);
    e->streams = calloc(max_streams, sizeof *e->streams);
    e->hdrbuf = aligned_alloc(4096, ((size_t)max_producers * HDR_STRIDE + 4095) & ~(size_t)4095);
    int r = -ENOMEM;
    if (!e->prod || !e->streams || !e->hdrbuf)
        goto fail;
    for (uint32_t i = 0; i < max_producers; i++) {
        e->prod[i].id = i;
        e->prod[i].fd = -1;
        e->prod[i].sync_fd = -1;
        e->prod[i].ctl_fd = -1;
        e->prod[i].hdr = e->hdrbuf + (size_t)i * HDR_STRIDE;
    }
    for (uint32_t i = 0; i < max_streams; i++)
        e->streams[i].fd = -1;
    pthread_mutex_init(&e->mu, NULL);
    pthread_cond_init(&e->cond, NULL);
    e->notify_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    e->wake_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    e->devnull = open("/dev/null", O_WRONLY | O_CLOEXEC);
    if (e->notify_fd < 0 || e->wake_fd < 0 || e->devnull < 0) {
        r = -errno;
        goto fail;
    }

    /* The ladder: io_uring, then splice, then readwrite; AUTO steps down and says why. */
    static const struct ls_backend *const ladder[] = {&ls_backend_uring, &ls_backend_splice, &ls_backend_readwrite};
    r = -EINVAL;
    for (unsigned i = 0; i < sizeof ladder / sizeof ladder[0] && !e->be; i++) {
        const struct ls_backend *be = ladder[i];
        if (kind != LS_ENGINE_AUTO && kind != be->kind)
            continue;
        char before[sizeof e->reason];
        snprintf(before, sizeof before, "%s", e->reason);
        e->reason[0] = '\0';
        r = be->setup(e);
        if (r == 0) {
            e->be = be;
            e->kind = be->kind;
            snprintf(e->reason, sizeof e->reason, "%s", before);
            break;
        }
        be->teardown(e);
        if (kind != LS_ENGINE_AUTO)
            goto fail; /* asked for this one: its error, not another engine's */
        char why[sizeof e->reason];
        snprintf(why, sizeof why, "%s", e->reason);
        snprintf(e->reason, sizeof e->reason, "%s", before);
        size_t l = strlen(e->reason); /* "io_uring_setup: ...; splice: ..." */
        snprintf(e->reason + l, sizeof e->reason - l, "%s%.*s", l ? "; " : "", (int)(sizeof e->reason - l), why);
    }
    if (!e->be)
        goto fail;
    r = -pthread_create(&e->thread, NULL, e->be->thread, e);
    if (r < 0)
        goto fail;
    (void)pthread_setname_np(e->thread, "logsink-engine"); /* ps -L, top -H, perf: who moves the bytes */
    e->thread_started = 1;
    *out = e;
    return 0;
fail:
    ls_engine_free(e);
    return r;
}

int ls_engine_kind(struct ls_engine *e) { return e->kind; }

const char *ls_engine_fallback_reason(struct ls_engine *e) { return e->reason; }

int ls_engine_notify_fd(struct ls_engine *e) { return e->notify_fd; }

int ls_engine_poll_events(struct ls_engine *e, struct ls_event *out, int max)
{
    uint64_t v;
    (void)!read(e->notify_fd, &v, sizeof v);
    pthread_mutex_lock(&e->mu);
    size_t n = e->ev_len < (size_t)max ? e->ev_len : (size_t)max;
    memcpy(out, e->ev, n * sizeof *out);
    memmove(e->ev, e->ev + n, (e->ev_len - n) * sizeof *out);
    e->ev_len -= n;
    if (e->ev_len) {
        uint64_t one = 1;
        (void)!write(e->notify_fd, &one, sizeof one);
    }
    pthread_mutex_unlock(&e->mu);
    return (int)n;
}

int ls_engine_events_lost(struct ls_engine *e)
{
    pthread_mutex_lock(&e->mu);
    int lost = e->events_lost;
    e->events_lost = 0;
    pthread_mutex_unlock(&e->mu);
    return lost;
}

int ls_engine_failed(struct ls_engine *e)
{
    pthread_mutex_lock(&e->mu);
    int r = e->failed;
    pthread_mutex_unlock(&e->mu);
    return r;
}

int ls_engine_stream_counters(struct ls_engine *e, uint32_t id, struct ls_counters *out)
{
    if (id >= e->max_streams)
        return -EINVAL;
    pthread_mutex_lock(&e->mu);
    *out = e->streams[id].c;
    out->offset = e->streams[id].offset;
    pthread_mutex_unlock(&e->mu);
    return 0;
}

int ls_engine_producer_counters(struct ls_engine *e, uint32_t id, struct ls_counters *out)
{
    if (id >= e->max_producers)
        return -EINVAL;
    pthread_mutex_lock(&e->mu);
    struct producer *p = &e->prod[id];
    *out = p->c;
    int avail = p->state != P_FREE && p->fd >= 0 ? eng_pipe_avail(p->fd) : 0;
    out->offset = avail > 0 ? (uint64_t)avail : 0;
    pthread_mutex_unlock(&e->mu);
    return p->state == P_FREE ? -ENOENT : 0;
}

int ls_engine_total_counters(struct ls_engine *e, struct ls_counters *out)
{
    pthread_mutex_lock(&e->mu);
    *out = e->total;
    pthread_mutex_unlock(&e->mu);
    return 0;
}

void ls_engine_free(struct ls_engine *e)
{
    if (!e)
        return;
    if (e->thread_started) {
        pthread_mutex_lock(&e->mu);
        e->stop = 1;
        pthread_cond_broadcast(&e->cond);
        pthread_mutex_unlock(&e->mu);
        eng_wake(e);
        pthread_join(e->thread, NULL);
    }
    /* A batch cut short by the stop must not stay behind as a torn tail. */
    for (uint32_t i = 0; e->streams && i < e->max_streams; i++) {
        struct stream *s = &e->streams[i];
        if (s->busy)
            eng_truncate_back(s, s->busy->batch_start);
    }
    for (uint32_t i = 0; e->prod && i < e->max_producers; i++) {
        struct producer *p = &e->prod[i];
        if (p->state != P_FREE && p->fd >= 0)
            close(p->fd);
        if (p->state != P_FREE && p->is_sock) {
            close(p->stage_r);
            close(p->stage_w);
        }
        if (p->state != P_FREE && p->ctl_fd >= 0)
            close(p->ctl_fd);
        /* After the thread: no write reads it now - unless the io_uring thread ended on an error with
         * operations still in flight (an io-wq WRITE may still read the arena; closing the ring does
         * not wait for it): then the mapping stays, so no other memory can ever appear at its address. */
        if (p->state != P_FREE && p->arena && !(e->failed && p->inflight))
            munmap((void *)p->arena, p->arena_len);
    }
    if (e->be)
        e->be->teardown(e);
    if (e->notify_fd >= 0)
        close(e->notify_fd);
    if (e->wake_fd >= 0)
        close(e->wake_fd);
    if (e->devnull >= 0)
        close(e->devnull);
    free(e->rwbuf);
    free(e->buckets);
    free(e->ev);
    free(e->prod);
    free(e->streams);
    free(e->hdrbuf);
    free(e);
}
