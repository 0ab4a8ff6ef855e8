/* fastpath_stress.c - several threads writing one producer while it hands segments over behind them.
 *
 * Usage: fastpath_stress SOCKET STREAM THREADS RECORDS TRANSPORT FLUSH_INTERVAL_MS
 * Each writer thread t writes RECORDS records "T<t>:<seq>:xxx...\n" of a length fixed by (t, seq)
 * (rec_len below; tests/test_producer_fastpath.py computes the same) in a mix of calls: single
 * records with ls_producer_write, single records with ls_producer_try_write (retried on -EAGAIN),
 * runs of several records in one write, and now and then a flush of its own. A flusher thread
 * calls ls_producer_flush until the writers are done, and the background thread hands segments
 * over every FLUSH_INTERVAL_MS: the lock-free owner of the current segment is revoked constantly.
 * Exits 0 after a final flush, printing "ok <records> <batches>"; else prints the error, exits 1.
 */
#include "ls_producer.h"
#include "ls_transport.h"

#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static struct ls_producer *prod;
static int records_per_thread;
static volatile int writers_left;

static unsigned rec_len(unsigned t, unsigned seq)
{
    return 20 + (t * 1000003u + seq * 7919u) % 281u; /* 20..300 bytes with the newline */
}

static size_t render(char *out, unsigned t, unsigned seq)
{
    unsigned len = rec_len(t, seq);
    int n = snprintf(out, 64, "T%u:%08u:", t, seq);
    memset(out + n, 'x', len - 1 - (unsigned)n);
    out[len - 1] = '\n';
    return len;
}

static int fail(const char *what, int rc)
{
    printf("%s: %s (%s)\n", what, strerror(-rc), ls_producer_last_error(prod));
    fflush(stdout);
    exit(1);
}

static void *writer(void *arg)
{
    unsigned t = (unsigned)(uintptr_t)arg, rnd = t * 2654435761u + 1;
    char buf[8 * 320];
    for (unsigned seq = 0; seq < (unsigned)records_per_thread;) {
        rnd = rnd * 1103515245u + 12345u;
        unsigned kind = (rnd >> 16) % 100;
        int rc;
        if (kind < 60) { /* one record */
            size_t n = render(buf, t, seq);
            if ((rc = ls_producer_write(prod, buf, n)) < 0)
                fail("write", rc);
            seq++;
        } else if (kind < 80) { /* one record, non-blocking */
            size_t n = render(buf, t, seq);
            while ((rc = ls_producer_try_write(prod, buf, n)) == -EAGAIN)
                sched_yield();
            if (rc != (int)n)
                fail("try_write", rc < 0 ? rc : -EIO);
            seq++;
        } else if (kind < 99) { /* several records in one call */
            unsigned k = 2 + (rnd >> 8) % 7;
            size_t n = 0;
            for (unsigned i = 0; i < k && seq < (unsigned)records_per_thread; i++, seq++)
                n += render(buf + n, t, seq);
            if ((rc = ls_producer_write(prod, buf, n)) < 0)
                fail("write of several", rc);
        } else if ((rc = ls_producer_flush(prod, 30000)) < 0) {
            fail("writer's flush", rc);
        }
    }
    __atomic_sub_fetch(&writers_left, 1, __ATOMIC_RELEASE);
    return NULL;
}

static void *flusher(void *arg)
{
    (void)arg;
    int rc;
    while (__atomic_load_n(&writers_left, __ATOMIC_ACQUIRE) > 0) {
        if ((rc = ls_producer_flush(prod, 30000)) < 0)
            fail("flush", rc);
        sched_yield();
    }
    return NULL;
}

int main(int argc, char **argv)
{
    if (argc != 7) {
        fprintf(stderr, "usage: %s SOCKET STREAM THREADS RECORDS TRANSPORT FLUSH_INTERVAL_MS\n", argv[0]);
        return 2;
    }
    int threads = atoi(argv[3]);
    records_per_thread = atoi(argv[4]);
    struct ls_producer_opts o;
    ls_producer_opts_init(&o);
    o.transport = strcmp(argv[5], "shm") == 0 ? LS_TRANSPORT_SHM
                  : strcmp(argv[5], "copy") == 0 ? LS_TRANSPORT_COPY
                                                 : LS_TRANSPORT_VMSPLICE;
    o.segment_size = 64 << 10; /* small segments: many hand-overs, and waits for releases */
    o.segments = 4;
    o.timeout_ms = 30000;
    o.flush_interval_ms = atoi(argv[6]);
    int rc = ls_producer_open(argv[2], argv[1], &o, &prod);
    if (rc < 0) {
        printf("open: %s (%s)\n", strerror(-rc), ls_producer_last_error(NULL));
        return 1;
    }
    writers_left = threads;
    pthread_t tid[64], ftid;
    for (int i = 0; i < threads; i++)
        pthread_create(&tid[i], NULL, writer, (void *)(uintptr_t)i);
    pthread_create(&ftid, NULL, flusher, NULL);
    for (int i = 0; i < threads; i++)
        pthread_join(tid[i], NULL);
    pthread_join(ftid, NULL);
    if ((rc = ls_producer_flush(prod, 30000)) < 0)
        fail("final flush", rc);
    struct ls_producer_stats st;
    ls_producer_stats(prod, &st);
    printf("ok %llu %llu\n", (unsigned long long)st.records, (unsigned long long)st.batches);
    return ls_producer_close(prod) < 0;
}
