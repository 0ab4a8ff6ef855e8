/* minimal.c - open stream "app", write three records, close (which flushes them into app.log).
 *
 * Usage: minimal [SOCKET]   (default: $LOGSINK_SOCKET, $XDG_RUNTIME_DIR/logsink.sock, /run/logsink/logsink.sock, /tmp/logsink-<uid>.sock) */
#include <logsink.h>

#include <stdio.h>
#include <string.h>

int main(int argc, char **argv)
{
    struct logsink *ls;
    int r = logsink_open("app", argc > 1 ? argv[1] : NULL, NULL, &ls);
    if (r < 0) {
        fprintf(stderr, "minimal: %s (%s)\n", logsink_last_error(NULL), strerror(-r));
        return 1;
    }
    const char *lines[] = {"hello from liblogsink\n", "second record\n", "third record\n"};
    for (int i = 0; i < 3; i++) {
        if ((r = logsink_write(ls, lines[i], strlen(lines[i]))) < 0) {
            fprintf(stderr, "minimal: write: %s (%s)\n", logsink_last_error(ls), strerror(-r));
            logsink_close(ls);
            return 1;
        }
    }
    if ((r = logsink_close(ls)) < 0) {
        fprintf(stderr, "minimal: close: %s\n", strerror(-r));
        return 1;
    }
    return 0;
}
