/* A thread that wrote through liblogsink exits after the library was dlclose()d: its per-thread
 * state destructor must still be mapped (liblogsink is linked -z nodelete). argv: LIB SOCKET. */
#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>
struct ls_producer;
typedef int (*open_fn)(const char *, const char *, const void *, struct ls_producer **);
typedef int (*write_fn)(struct ls_producer *, const void *, size_t);
typedef int (*close_fn)(struct ls_producer *);
static struct ls_producer *p; static write_fn w;
static pthread_mutex_t m = PTHREAD_MUTEX_INITIALIZER; static pthread_cond_t c = PTHREAD_COND_INITIALIZER; static int phase;
static void *worker(void *a) {
    (void)a;
    printf("thread write: %d\n", w(p, "hello from a thread\n", 20)); fflush(stdout);
    pthread_mutex_lock(&m); phase = 1; pthread_cond_broadcast(&c);
    while (phase < 2) pthread_cond_wait(&c, &m);
    pthread_mutex_unlock(&m);
    return NULL; /* exits after the library is gone: its pthread key destructor runs */
}
int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IONBF, 0);
    void *h = dlopen(argv[1], RTLD_NOW);
    if (!h) { printf("dlopen: %s\n", dlerror()); return 1; }
    open_fn o = (open_fn)dlsym(h, "logsink_open"); w = (write_fn)dlsym(h, "logsink_write");
    close_fn cl = (close_fn)dlsym(h, "logsink_close");
    printf("open: %d\n", o("dl", argv[2], NULL, &p));
    pthread_t t; pthread_create(&t, NULL, worker, NULL);
    pthread_mutex_lock(&m); while (phase < 1) pthread_cond_wait(&c, &m); pthread_mutex_unlock(&m);
    printf("close: %d\n", cl(p));
    printf("dlclose: %d\n", dlclose(h)); fflush(stdout);
    pthread_mutex_lock(&m); phase = 2; pthread_cond_broadcast(&c); pthread_mutex_unlock(&m);
    pthread_join(t, NULL);
    printf("thread exited cleanly\n");
    return 0;
}
