/* logsink-blast.c - load generator: P producer processes, each writing N distinct records.
 *
 * Usage: logsink-blast -s STREAM [-S SOCKET] [-n RECORDS] [-r RECORD_SIZE] [-c CHUNK_SIZE]
 *                      [-t copy|vmsplice|shm] [-p PRODUCERS] [-z SEGMENT_SIZE] [-m SEGMENTS] [-P | -C] [-W] [-E]
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
 * Producers connect (and build their record or chunk) first and start writing together (a start
 * barrier), so the summary's time and each producer's "t_start"/"t_end" (CLOCK_MONOTONIC seconds)
 * cover the writes, not the connects.
 * -W (warm): each producer faults in its buffers (logsink_prefault) before the start barrier, as a
 * long-running producer's are: then the writes measure the data path, not first-touch page faults.
 * -E (end barrier): each producer keeps its connection after its flush until every producer has
 * flushed, so no producer's close and exit (nor the daemon's teardown of it) runs while others
 * still write. The summary says how long starting (fork to every producer at the start barrier:
 * "startup_seconds") and ending (-E: end barrier to every producer gone: "teardown_seconds") took.
 * -R (release on stdin): once every producer is at the start barrier, print "logsink-blast: ready"
 * on stderr and start them when a byte (or EOF) arrives on stdin: the caller can prepare the machine
 * last (warm the page cache after the producers took their memory).
 * -D PID: the summary adds "daemon_cpu_seconds": the CPU (user + system, every thread) process PID
 * (the daemon) spent from the start barrier to the last producer's flush (-E) or exit.
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
    int warm;     /* -W: logsink_prefault before the start barrier */
    int hold;     /* -E: the end barrier */
    int daemon_pid; /* -D: whose CPU to read at the start and at the end */
    int release_on_stdin; /* -R */
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

/* utime + stime of pid in seconds (every thread), or -1 if /proc says nothing. */
static double proc_cpu_s(int pid)
{
    char path[64], buf[1024];
    snprintf(path, sizeof path, "/proc/%d/stat", pid);
    FILE *f = fopen(path, "r");
    if (!f)
        return -1;
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = 0;
    char *p = strrchr(buf, ')'); /* the command name may hold spaces and parentheses */
    unsigned long long ut, st;
    if (!p || sscanf(p + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %llu %llu", &ut, &st) != 2)
        return -1;
    return (double)(ut + st) / (double)sysconf(_SC_CLK_TCK);
}

static void usage(void)
{
    fprintf(stderr, "usage: logsink-blast -s STREAM [-S SOCKET] [-n RECORDS] [-r RECORD_SIZE] [-c CHUNK_SIZE]\n"
                    "                     [-t copy|vmsplice|shm] [-p PRODUCERS] [-z SEGMENT_SIZE] [-m SEGMENTS]\n"
                    "                     [-P | -C] [-W] [-E]  (-P: one pre-built record per logsink_write call;\n"
                    "                                 -C: one pre-built chunk, written again and again;\n"
                    "                                 -W: fault in the buffers before starting;\n"
                    "                                 -E: stay connected until every producer has flushed)\n"
                    "                     [-D DAEMON_PID]  (its CPU from the start barrier to the end)\n"
                    "                     [-R]  (at the start barrier say \"logsink-blast: ready\" on stderr, start on a byte on stdin)\n");
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

/* A barrier: tell the parent we got here (or failed) on `tell_fd`, then wait until it closes
 * `wait_fd` (-1: do not wait). Each side sends its byte once (*sent). */
static void barrier_wait(int tell_fd, int wait_fd, int *sent)
{
    char b = 1, x;
    if (!*sent)
        while (write(tell_fd, &b, 1) < 0 && errno == EINTR)
            ;
    *sent = 1;
    while (wait_fd >= 0 && (read(wait_fd, &x, 1) < 0 && errno == EINTR))
        ;
}

/* A producer's ends of the two barriers (end_tell/end_wait -1 without -E). */
struct barriers {
    int ready_fd, go_fd, ready_sent;
    int end_tell, end_wait, end_sent;
};

static int run_producer(const struct config *c, int pr, struct barriers *b)
{
    struct logsink *ls;
    double warm = 0;
    int r = logsink_open(c->stream, c->socket, &c->opts, &ls);
    if (r < 0) {
        barrier_wait(b->ready_fd, -1, &b->ready_sent);
        fprintf(stderr, "logsink-blast[%d]: %s\n", pr, logsink_last_error(NULL));
        return 1;
    }
    long cap = c->chunk_size < c->record_size ? c->record_size : c->chunk_size;
    char *buf = malloc((size_t)cap);
    if (!buf) {
        barrier_wait(b->ready_fd, -1, &b->ready_sent);
        fprintf(stderr, "logsink-blast[%d]: out of memory\n", pr);
        return 1;
    }
    long used = 0, per_chunk = cap / c->record_size;
    if (c->prebuilt == 1)
        make_record(buf, c->record_size, pr, 0);
    else if (c->prebuilt == 2)
        for (long k = 0; k < per_chunk; k++)
            make_record(buf + k * c->record_size, c->record_size, pr, k);
    if (c->warm) {
        double w0 = now_s();
        if ((r = logsink_prefault(ls)) < 0) {
            barrier_wait(b->ready_fd, -1, &b->ready_sent);
            fprintf(stderr, "logsink-blast[%d]: prefault: %s\n", pr, strerror(-r));
            logsink_close(ls);
            return 1;
        }
        warm = now_s() - w0;
    }
    barrier_wait(b->ready_fd, b->go_fd, &b->ready_sent);
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
    if (c->hold) /* -E: connected until every producer has flushed */
        barrier_wait(b->end_tell, b->end_wait, &b->end_sent);
    if ((r = logsink_close(ls)) < 0) {
        fprintf(stderr, "logsink-blast[%d]: close: %s\n", pr, strerror(-r));
        return 1;
    }
    printf("{\"producer\":%d,\"seconds\":%.6f,\"records\":%llu,\"bytes\":%llu,\"batches\":%llu,"
           "\"dropped_records\":%llu,\"failed_batches\":%llu,\"waits_for_release\":%llu,\"segment_size\":%llu,"
           "\"segments\":%llu,\"pipe_size\":%llu,\"cpu_seconds\":%.6f,\"cpu_ns_per_record\":%.2f,"
           "\"t_start\":%.6f,\"t_end\":%.6f,\"warm_seconds\":%.6f}\n",
           pr, secs, (unsigned long long)st.records, (unsigned long long)st.bytes, (unsigned long long)st.batches,
           (unsigned long long)st.dropped_records, (unsigned long long)st.failed_batches,
           (unsigned long long)st.waits_for_release, (unsigned long long)st.segment_size,
           (unsigned long long)st.segments, (unsigned long long)st.pipe_size, cpu,
           c->records ? cpu * 1e9 / (double)c->records : 0.0, t0, t1, warm);
    fflush(stdout);
    free(buf);
    return 0;
}

int main(int argc, char **argv)
{
    struct config c = {.records = 1000000, .record_size = 200, .chunk_size = 65536, .producers = 1};
    logsink_opts_init(&c.opts);
    int opt;
    while ((opt = getopt(argc, argv, "s:S:n:r:c:t:p:z:m:D:PCWERh")) != -1) {
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
        case 'W': c.warm = 1; break;
        case 'R': c.release_on_stdin = 1; break;
        case 'D': c.daemon_pid = (int)parse_num(optarg, "-D DAEMON_PID", 1); break;
        case 'E': c.hold = 1; break;
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
    int ready[2], go[2], ended[2] = {-1, -1}, leave[2] = {-1, -1};
    if (pipe(ready) < 0 || pipe(go) < 0 || (c.hold && (pipe(ended) < 0 || pipe(leave) < 0))) {
        perror("logsink-blast: pipe");
        return 1;
    }
    pid_t *pids = calloc((size_t)c.producers, sizeof *pids);
    int started = 0;
    double t_fork = now_s();
    for (; started < c.producers; started++) {
        pids[started] = fork();
        if (pids[started] < 0) {
            perror("logsink-blast: fork");
            break;
        }
        if (pids[started] == 0) {
            close(ready[0]);
            close(go[1]);
            if (c.hold) {
                close(ended[0]);
                close(leave[1]);
            }
            struct barriers b = {ready[1], go[0], 0, ended[1], leave[0], 0};
            int rc = run_producer(&c, started, &b);
            if (c.hold) /* a producer that failed counts as ended, or the others would wait forever */
                barrier_wait(b.end_tell, -1, &b.end_sent);
            _exit(rc);
        }
    }
    close(ready[1]);
    close(go[0]);
    if (c.hold) {
        close(ended[1]);
        close(leave[0]);
    }
    /* Every producer has connected (or failed) once it wrote its byte: then start them all at once. */
    for (int got = 0; got < started;) {
        char b[256];
        ssize_t n = read(ready[0], b, sizeof b);
        if (n <= 0 && !(n < 0 && errno == EINTR))
            break; /* every child gone */
        got += n > 0 ? (int)n : 0;
    }
    double startup = now_s() - t_fork;
    if (c.release_on_stdin) {
        char x;
        fprintf(stderr, "logsink-blast: ready\n");
        fflush(stderr);
        while (read(0, &x, 1) < 0 && errno == EINTR)
            ;
    }
    double dcpu0 = c.daemon_pid ? proc_cpu_s(c.daemon_pid) : -1;
    double t0 = now_s(), t_end = 0, dcpu1 = -1;
    close(go[1]);
    close(ready[0]);
    if (c.hold) { /* -E: every producer flushed (or failed): let them all close and exit */
        for (int got = 0; got < started;) {
            char b[256];
            ssize_t n = read(ended[0], b, sizeof b);
            if (n <= 0 && !(n < 0 && errno == EINTR))
                break;
            got += n > 0 ? (int)n : 0;
        }
        t_end = now_s();
        dcpu1 = c.daemon_pid ? proc_cpu_s(c.daemon_pid) : -1;
        close(leave[1]);
        close(ended[0]);
    }
    int failed = c.producers - started;
    for (int i = 0; i < started; i++) {
        int status;
        while (waitpid(pids[i], &status, 0) < 0 && errno == EINTR)
            ;
        if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
            failed++;
    }
    double t_gone = now_s(), secs = t_gone - t0, teardown = c.hold ? t_gone - t_end : 0;
    if (c.daemon_pid && !c.hold)
        dcpu1 = proc_cpu_s(c.daemon_pid);
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
           "\"producer_cpu_ns_per_record\":%.2f,\"prebuilt\":%s,\"startup_seconds\":%.6f,"
           "\"teardown_seconds\":%.6f,\"daemon_cpu_seconds\":%.3f}\n",
           c.producers, total, bytes, secs, total / secs, bytes / secs / 1e9, failed, child_cpu,
           total ? child_cpu * 1e9 / total : 0.0, c.prebuilt ? "true" : "false", startup, teardown,
           dcpu0 >= 0 && dcpu1 >= 0 ? dcpu1 - dcpu0 : -1.0);
    free(pids);
    return failed ? 1 : 0;
}
