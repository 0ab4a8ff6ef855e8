/* ls_render.c - JSON-line rendering of log records into arena memory (see ls_render.h). */
#include "ls_render.h"

#include <string.h>

struct out {
    char *p, *end;
    int full;
};

static void put(struct out *o, const char *s, size_t n)
{
    if (o->full || (size_t)(o->end - o->p) < n) {
        o->full = 1;
        return;
    }
    memcpy(o->p, s, n);
    o->p += n;
}

/* Bytes that need no escaping pass in runs (memcpy), the rest one by one. */
static void put_escaped(struct out *o, const char *s, size_t n)
{
    static const char hex[] = "0123456789abcdef";
    size_t run = 0;
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c >= 0x20 && c != '"' && c != '\\')
            continue;
        put(o, s + run, i - run);
        run = i + 1;
        char esc[6] = {'\\', 0, 0, 0, 0, 0};
        size_t len = 2;
        switch (c) {
        case '"': esc[1] = '"'; break;
        case '\\': esc[1] = '\\'; break;
        case '\b': esc[1] = 'b'; break;
        case '\f': esc[1] = 'f'; break;
        case '\n': esc[1] = 'n'; break;
        case '\r': esc[1] = 'r'; break;
        case '\t': esc[1] = 't'; break;
        default:
            esc[1] = 'u';
            esc[2] = '0';
            esc[3] = '0';
            esc[4] = hex[c >> 4];
            esc[5] = hex[c & 15];
            len = 6;
        }
        put(o, esc, len);
    }
    put(o, s + run, n - run);
}

size_t ls_render_log_json(char *dst, size_t cap, const char *ts, size_t ts_len, const char *level, size_t level_len,
                          const char *logger, size_t logger_len, const char *msg, size_t msg_len, const char *exc,
                          size_t exc_len)
{
    struct out o = {dst, dst + cap, 0};
#define LIT(s) put(&o, s, sizeof(s) - 1)
    LIT("{\"timestamp\":\"");
    put_escaped(&o, ts, ts_len);
    LIT("\",\"level\":\"");
    put_escaped(&o, level, level_len);
    LIT("\",\"logger\":\"");
    put_escaped(&o, logger, logger_len);
    LIT("\",\"message\":\"");
    put_escaped(&o, msg, msg_len);
    if (exc) {
        LIT("\",\"exception\":\"");
        put_escaped(&o, exc, exc_len);
    }
    LIT("\"}\n");
#undef LIT
    return o.full ? 0 : (size_t)(o.p - dst);
}
