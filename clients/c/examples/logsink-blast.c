/* logsink-blast.c - load generator: P producer processes, each writing N distinct records.
 *
 * Usage: logsink-blast -s STREAM [-S SOCKET] [-n RECORDS] [-r RECORD_SIZE] [-c CHUNK_SIZE]
 *                      [-t copy|vmsplice] [-p PRODUCERS] [-z SEGMENT_SIZE] [-m SEGMENTS]
 *
 * Record K of producer P is {"p":P,"k":K,"pad":"xxx..."} plus '\n', padded with 'x' to exactly
 * RECORD_SIZE bytes; records are written in chunks of at most CHUNK_SIZE bytes (whole records).
 * Each producer is a forked child with its own connection; it prints its stats as one JSON line.
 * The parent prints records/s and GB/s over all producers, then a JSON summary line (stdout).
 * Exit status: 0 if every producer wrote and flushed everything, else 1.
 *
 * -P (pre-built): every producer builds ONE record before it starts and hands it over with one
 * logsink_write call per record (no snprintf, no chunking): what the library itself costs per
 * record. With or without -P, each producer's JSON line has "cpu_seconds" and "cpu_ns_per_record"
 * (CLOCK_PROCESS_CPUTIME_ID of that producer, every thread, over its writes and flush), and the
 * summary adds the producers' CPU per record (from getrusage(RUSAGE_CHILDREN): includes connecting).
 * -C (pre-built chunk): every producer builds ONE chunk of whole records before it starts and writes
 * it again and again (the last write may be a shorter prefix): the client's cost without snprintf.
 * Producers connect first and start writing together (a start barrier), so the summary's time and
 * each producer's "t_start"/"t_end" (CLOCK_MONOTONIC seconds) cover the writes, not the connects.
 */
#include <logsink.h>

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

struct config {
    const char *stream, *socket;
    long long records;
    long record_size, chunk_size;
    int producers;
    int prebuilt; /* -P: one pre-built record per logsink_write; 2 (-C): one pre-built chunk, rewritten */
    struct logsink_opts opts;
};

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

/* CPU of this whole process (every thread, the library's background thread too). */
static double cpu_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

static void usage(void)
{
    fprintf(stderr, "usage: logsink-blast -s STREAM [-S SOCKET] [-n RECORDS] [-r RECORD_SIZE] [-c CHUNK_SIZE]\n"
                    "                     [-t copy|vmsplice] [-p PRODUCERS] [-z SEGMENT_SIZE] [-m SEGMENTS]\n"
                    "                     [-P | -C]  (-P: one pre-built record per logsink_write call;\n"
                    "                                 -C: one pre-built chunk, written again and again)\n");
    exit(2);
}

static long long parse_num(const char *s, const char *what, long long min)
{
    char *end;
    errno = 0;
    long long v = strtoll(s, &end, 10);
    if (errno || *end || v < min) {
        fprintf(stderr, "logsink-blast: %s must be an integer >= %lld, got '%s'\n", what, min, s);
        exit(2);
    }
    return v;
}

/* Write record k of producer pr at dst (exactly size bytes). Returns 0, or -1 if size is too small. */
static int make_record(char *dst, long size, int pr, long long k)
{
    char head[64];
    int n = snprintf(head, sizeof head, "{\"p\":%d,\"k\":%lld,\"pad\":\"", pr, k);
    long pad = size - n - 3; /* "}\n */
    if (pad < 0)
        return -1;
    memcpy(dst, head, (size_t)n);
    memset(dst + n, 'x', (size_t)pad);
    memcpy(dst + n + pad, "\"}\n", 3);
    return 0;
}

/* The start barrier: tell the parent we are connected (or failed), then wait until it closes `go`. */
static void barrier_wait(int ready_fd, int go_fd)
{
    char b = 1, x;
    while (write(ready_fd, &b, 1) < 0 && errno == EINTR)
        ;
    while (go_fd >= 0 && (read(go_fd, &x, 1) < 0 && errno == EINTR))
        ;
}

static int run_producer(const struct config *c, int pr, int ready_fd, int go_fd)
{
    struct logsink *ls;
    int r = logsink_open(c->stream, c->socket, &c->opts, &ls);
    barrier_wait(ready_fd, r < 0 ? -1 : go_fd);
    if (r < 0) {
        fprintf(stderr, "logsink-blast[%d]: %s\n", pr, logsink_last_error(NULL));
        return 1;
    }
    long cap = c->chunk_size < c->record_size ? c->record_size : c->chunk_size;
    char *buf = malloc((size_t)cap);
    if (!buf) {
        fprintf(stderr, "logsink-blast[%d]: out of memory\n", pr);
        return 1;
    }
    long used = 0, per_chunk = cap / c->record_size;
    if (c->prebuilt == 1)
        make_record(buf, c->record_size, pr, 0);
    else if (c->prebuilt == 2)
        for (long k = 0; k < per_chunk; k++)
            make_record(buf + k * c->record_size, c->record_size, pr, k);
    double t0 = now_s(), cpu0 = cpu_s();
    if (c->prebuilt == 1) {
        for (long long k = 0; k < c->records && r >= 0; k++)
            r = logsink_write(ls, buf, (size_t)c->record_size);
    } else if (c->prebuilt == 2) {
        for (long long k = 0; k < c->records && r >= 0; k += per_chunk) {
            long n = c->records - k < per_chunk ? (long)(c->records - k) : per_chunk;
            r = logsink_write(ls, buf, (size_t)(n * c->record_size));
        }
    } else {
        for (long long k = 0; k < c->records && r >= 0; k++) {
            if (used + c->record_size > cap) {
                r = logsink_write(ls, buf, (size_t)used);
                used = 0;
            }
            make_record(buf + used, c->record_size, pr, k);
            used += c->record_size;
        }
    }
    if (r >= 0 && used)
        r = logsink_write(ls, buf, (size_t)used);
    if (r < 0) {
        fprintf(stderr, "logsink-blast[%d]: write: %s (%s)\n", pr, logsink_last_error(ls), strerror(-r));
        logsink_close(ls);
        return 1;
    }
    if ((r = logsink_flush(ls, -1)) < 0) {
        fprintf(stderr, "logsink-blast[%d]: flush: %s (%s)\n", pr, logsink_last_error(ls), strerror(-r));
        logsink_close(ls);
        return 1;
    }
    double t1 = now_s(), secs = t1 - t0, cpu = cpu_s() - cpu0;
    struct logsink_stats st;
    logsink_stats(ls, &st);
    if ((r = logsink_close(ls)) < 0) {
        fprintf(stderr, "logsink-blast[%d]: close: %s\n", pr, strerror(-r));
        return 1;
    }
    printf("{\"producer\":%d,\"seconds\":%.6f,\"records\":%llu,\"bytes\":%llu,\"batches\":%llu,"
           "\"dropped_records\":%llu,\"failed_batches\":%llu,\"waits_for_release\":%llu,\"segment_size\":%llu,"
           "\"segments\":%llu,\"pipe_size\":%llu,\"cpu_seconds\":%.6f,\"cpu_ns_per_record\":%.2f,"
           "\"t_start\":%.6f,\"t_end\":%.6f}\n",
           pr, secs, (unsigned long long)st.records, (unsigned long long)st.bytes, (unsigned long long)st.batches,
           (unsigned long long)st.dropped_records, (unsigned long long)st.failed_batches,
           (unsigned long long)st.waits_for_release, (unsigned long long)st.segment_size,
           (unsigned long long)st.segments, (unsigned long long)st.pipe_size, cpu,
           c->records ? cpu * 1e9 / (double)c->records : 0.0, t0, t1);
    fflush(stdout);
    free(buf);
    return 0;
}

int main(int argc, char **argv)
{
    struct config c = {.records = 1000000, .record_size = 200, .chunk_size = 65536, .producers = 1};
    logsink_opts_init(&c.opts);
    int opt;
    while ((opt = getopt(argc, argv, "s:S:n:r:c:t:p:z:m:PCh")) != -1) {
        switch (opt) {
        case 's': c.stream = optarg; break;
        case 'S': c.socket = optarg; break;
        case 'n': c.records = parse_num(optarg, "-n RECORDS", 0); break;
        case 'r': c.record_size = (long)parse_num(optarg, "-r RECORD_SIZE", 1); break;
        case 'c': c.chunk_size = (long)parse_num(optarg, "-c CHUNK_SIZE", 1); break;
        case 'p': c.producers = (int)parse_num(optarg, "-p PRODUCERS", 1); break;
        case 'z': c.opts.segment_size = (uint32_t)parse_num(optarg, "-z SEGMENT_SIZE", 4096); break;
        case 'm': c.opts.segments = (uint32_t)parse_num(optarg, "-m SEGMENTS", 1); break;
        case 'P': c.prebuilt = 1; break;
        case 'C': c.prebuilt = 2; break;
        case 't':
            if (strcmp(optarg, "copy") == 0)
                c.opts.transport = LOGSINK_TRANSPORT_COPY;
            else if (strcmp(optarg, "vmsplice") == 0)
                c.opts.transport = LOGSINK_TRANSPORT_VMSPLICE;
            else if (strcmp(optarg, "shm") == 0)
                c.opts.transport = LOGSINK_TRANSPORT_SHM;
            else {
                fprintf(stderr, "logsink-blast: -t must be copy, vmsplice or shm, got '%s'\n", optarg);
                return 2;
            }
            break;
        default: usage();
        }
    }
    if (!c.stream || optind != argc)
        usage();
    {
        char head[64];
        int need = snprintf(head, sizeof head, "{\"p\":%d,\"k\":%lld,\"pad\":\"", c.producers, c.records) + 3;
        if (c.record_size < need) {
            fprintf(stderr, "logsink-blast: -r %ld is too small: records need at least %d bytes\n", c.record_size, need);
            return 2;
        }
    }

    fflush(stdout);
    int ready[2], go[2];
    if (pipe(ready) < 0 || pipe(go) < 0) {
        perror("logsink-blast: pipe");
        return 1;
    }
    pid_t *pids = calloc((size_t)c.producers, sizeof *pids);
    int started = 0;
    for (; started < c.producers; started++) {
        pids[started] = fork();
        if (pids[started] < 0) {
            perror("logsink-blast: fork");
            break;
        }
        if (pids[started] == 0) {
            close(ready[0]);
            close(go[1]);
            _exit(run_producer(&c, started, ready[1], go[0]));
        }
    }
    close(ready[1]);
    close(go[0]);
    /* Every producer has connected (or failed) once it wrote its byte: then start them all at once. */
    for (int got = 0; got < started;) {
        char b[256];
        ssize_t n = read(ready[0], b, sizeof b);
        if (n <= 0 && !(n < 0 && errno == EINTR))
            break; /* every child gone */
        got += n > 0 ? (int)n : 0;
    }
    double t0 = now_s();
    close(go[1]);
    close(ready[0]);
    int failed = c.producers - started;
    for (int i = 0; i < started; i++) {
        int status;
        while (waitpid(pids[i], &status, 0) < 0 && errno == EINTR)
            ;
        if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
            failed++;
    }
    double secs = now_s() - t0;
    double total = (double)c.records * c.producers, bytes = total * (double)c.record_size;
    struct rusage ru;
    getrusage(RUSAGE_CHILDREN, &ru);
    double child_cpu = (double)ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + (double)ru.ru_stime.tv_sec +
                       ru.ru_stime.tv_usec / 1e6;
    printf("logsink-blast: %d producer(s) x %lld records of %ld bytes: %.0f records/s, %.3f GB/s (%.3f s)%s\n",
            c.producers, c.records, c.record_size, total / secs, bytes / secs / 1e9, secs,
            failed ? ", SOME PRODUCERS FAILED" : "");
    printf("{\"summary\":true,\"producers\":%d,\"records\":%.0f,\"bytes\":%.0f,\"seconds\":%.6f,"
           "\"records_per_s\":%.0f,\"gb_per_s\":%.6f,\"failed_producers\":%d,\"producer_cpu_seconds\":%.6f,"
           "\"producer_cpu_ns_per_record\":%.2f,\"prebuilt\":%s}\n",
           c.producers, total, bytes, secs, total / secs, bytes / secs / 1e9, failed, child_cpu,
           total ? child_cpu * 1e9 / total : 0.0, c.prebuilt ? "true" : "false");
    free(pids);
    return failed ? 1 : 0;
}
