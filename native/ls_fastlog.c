/* ls_fastlog.c - logsink._fastlog: structlog's default logsink pipeline in C.
 *
 * logsink.structlog.configure() installs, by default: merge_contextvars, add_log_level,
 * TimeStamper(fmt="iso", utc=True), StackInfoRenderer, format_exc_info and
 * JSONRenderer(serializer=orjson.dumps(default=str)). Stage.emit does what those do, fused: it
 * builds the event dict, merges the structlog contextvars, sets level and timestamp, renders the
 * dict to the JSON line orjson would write and hands it to the producer (ls_producer_try_write,
 * called through the pointer logsink._core gives us). Stack and exception text stay the Python
 * processors' job (rare, and traceback formatting costs more than the call).
 *
 * Correctness first: a value this renderer cannot write exactly as orjson does (an int beyond 64
 * bits, a str with lone surrogates, a non-str dict key, a datetime, an enum, a subclass, ...) makes
 * the whole event go through the Python renderer instead, counted in Stage.fallbacks. Rendering
 * happens into a scratch buffer, not under the producer's lock: default=str runs arbitrary Python
 * code, which may itself log to the same producer.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <stddef.h>
#include <limits.h>
#include <stdint.h>
#include <math.h>
#include <string.h>
#include <time.h>

/* An error from user code (__str__, default=, %-formatting) sends the event to the Python path,
 * which raises or reports it as the stdlib and structlog do. But KeyboardInterrupt, SystemExit
 * (not Exception subclasses) and RecursionError must not be swallowed and retried: keep them, and
 * the entry point raises them instead of falling back. */
static PyObject *kept_type, *kept_value, *kept_tb;

static void clear_exc(void)
{
    if (!PyErr_Occurred())
        return;
    if (!kept_type && (!PyErr_ExceptionMatches(PyExc_Exception) || PyErr_ExceptionMatches(PyExc_RecursionError))) {
        PyErr_Fetch(&kept_type, &kept_value, &kept_tb);
        return;
    }
    PyErr_Clear();
}

/* 1 (with the kept exception set again) if user code raised one that must propagate. */
static int reraise_kept(void)
{
    if (!kept_type)
        return 0;
    PyErr_Restore(kept_type, kept_value, kept_tb);
    kept_type = kept_value = kept_tb = NULL;
    return 1;
}


typedef int (*ls_write_fn)(void *p, const void *data, size_t len);

/* -- growable output buffer ------------------------------------------------------------------- */

struct buf {
    char *p;
    size_t len, cap;
    int heap;
    char stack[2048];
};

static void buf_init(struct buf *b)
{
    b->p = b->stack;
    b->len = 0;
    b->cap = sizeof b->stack;
    b->heap = 0;
}

static void buf_free(struct buf *b)
{
    if (b->heap)
        PyMem_Free(b->p);
}

/* Room for n more bytes: 0, or -1 (out of memory; no Python error left set). */
static int buf_reserve(struct buf *b, size_t n)
{
    if (b->cap - b->len >= n)
        return 0;
    size_t cap = b->cap * 2;
    while (cap - b->len < n)
        cap *= 2;
    char *p = b->heap ? PyMem_Realloc(b->p, cap) : PyMem_Malloc(cap);
    if (!p)
        return -1;
    if (!b->heap)
        memcpy(p, b->p, b->len);
    b->p = p;
    b->cap = cap;
    b->heap = 1;
    return 0;
}

static int buf_put(struct buf *b, const char *s, size_t n)
{
    if (buf_reserve(b, n) < 0)
        return -1;
    memcpy(b->p + b->len, s, n);
    b->len += n;
    return 0;
}

/* Any byte of w that JSON escapes (< 0x20, '"', '\\')? Exact as a yes/no for the 8 bytes. */
static inline int word_needs_escape(uint64_t w)
{
    const uint64_t ones = 0x0101010101010101ULL, high = 0x8080808080808080ULL;
    uint64_t q = w ^ (ones * '"'), bs = w ^ (ones * '\\');
    return (((w - ones * 0x20) & ~w) | ((q - ones) & ~q) | ((bs - ones) & ~bs)) & high ? 1 : 0;
}

/* s as a JSON string body into dst (room for 6 * n): the escaping of ls_render.c, which orjson and
 * json.dumps(ensure_ascii=False) share, with clean 8-byte runs copied whole. Returns the bytes written. */
static size_t escape_into(char *dst, const char *s, size_t n)
{
    static const char hex[] = "0123456789abcdef";
    char *o = dst;
    size_t i = 0;
    while (i < n) {
        if (i + 8 <= n) {
            uint64_t w;
            memcpy(&w, s + i, 8);
            if (!word_needs_escape(w)) {
                memcpy(o, &w, 8);
                o += 8;
                i += 8;
                continue;
            }
        }
        unsigned char c = (unsigned char)s[i++];
        if (c >= 0x20 && c != '"' && c != '\\') {
            *o++ = (char)c;
            continue;
        }
        *o++ = '\\';
        switch (c) {
        case '"': *o++ = '"'; break;
        case '\\': *o++ = '\\'; break;
        case '\b': *o++ = 'b'; break;
        case '\f': *o++ = 'f'; break;
        case '\n': *o++ = 'n'; break;
        case '\r': *o++ = 'r'; break;
        case '\t': *o++ = 't'; break;
        default:
            *o++ = 'u';
            *o++ = '0';
            *o++ = '0';
            *o++ = hex[c >> 4];
            *o++ = hex[c & 15];
        }
    }
    return (size_t)(o - dst);
}

static int buf_string(struct buf *b, const char *s, size_t n)
{
    if (buf_reserve(b, 6 * n + 2) < 0)
        return -1;
    char *o = b->p + b->len;
    *o++ = '"';
    o += escape_into(o, s, n);
    *o++ = '"';
    b->len = (size_t)(o - b->p);
    return 0;
}

/* -- orjson-compatible rendering --------------------------------------------------------------- */

/* Types orjson serializes natively in ways this renderer does not reproduce (subclasses of
 * str/int/dict/list, float and tuple subclasses orjson hands to default, datetime, UUID, Enum,
 * orjson.Fragment): set by logsink.structlog; values of these types make the event fall back. */
#define MAX_DEPTH 200 /* orjson stops at 255 (an error): leave that case to it */

enum { RN_OK = 0, RN_FALLBACK = -1 };

/* How to render: orjson.dumps(default=deflt), or (stdlib) json.dumps(separators=(",", ":"),
 * ensure_ascii=False, default=deflt) - what logsink.structlog.json_serializer() picks. */
struct rctx {
    PyObject *deflt;  /* NULL: none (a value needing it falls back) */
    PyObject *native; /* tuple of the types the serializer handles itself (see goes_to_default) */
    int stdlib;
};

static int render(struct buf *b, PyObject *o, const struct rctx *c, int depth);

static int render_str(struct buf *b, PyObject *o)
{
    Py_ssize_t n;
    const char *s = PyUnicode_AsUTF8AndSize(o, &n);
    if (!s) { /* lone surrogates: orjson raises, and so will the Python path */
        PyErr_Clear();
        return RN_FALLBACK;
    }
    return buf_string(b, s, (size_t)n) < 0 ? RN_FALLBACK : RN_OK;
}

/* orjson writes the shortest round-trip digits (repr's), in repr's layout except: exponents
 * -5 written out in full (2.5e-05 -> 0.000025) and no zero padding in negative exponents
 * (1e-07 -> 1e-7); inf and nan are null. Checked against orjson over 400k values in the tests. */
static int render_float(struct buf *b, double v, int stdlib)
{
    if (stdlib && !isfinite(v)) { /* json.dumps: float.__repr__ but for these */
        const char *t = isnan(v) ? "NaN" : v > 0 ? "Infinity" : "-Infinity";
        return buf_put(b, t, strlen(t)) < 0 ? RN_FALLBACK : RN_OK;
    }
    if (!isfinite(v))
        return buf_put(b, "null", 4) < 0 ? RN_FALLBACK : RN_OK;
    char *r = PyOS_double_to_string(v, 'r', 0, Py_DTSF_ADD_DOT_0, NULL);
    if (!r) {
        PyErr_Clear();
        return RN_FALLBACK;
    }
    char out[64];
    size_t n = 0;
    char *e = stdlib ? NULL : strchr(r, 'e');
    if (!e) {
        n = strlen(r);
        if (n < sizeof out)
            memcpy(out, r, n);
        else
            n = 0;
    } else if (e[1] == '-') {
        int exp = atoi(e + 2);
        const char *m = r;
        int neg = 0;
        if (*m == '-') {
            neg = 1;
            m++;
        }
        if (exp == 5) { /* d.ddde-05 -> 0.0000dddd */
            if (neg)
                out[n++] = '-';
            memcpy(out + n, "0.0000", 6);
            n += 6;
            for (const char *c = m; c < e && n < sizeof out - 1; c++)
                if (*c != '.')
                    out[n++] = *c;
        } else {
            size_t ml = (size_t)(e - r);
            n = (size_t)snprintf(out, sizeof out, "%.*se-%d", (int)ml, r, exp);
        }
    } else {
        n = strlen(r);
        if (n < sizeof out)
            memcpy(out, r, n);
        else
            n = 0;
    }
    PyMem_Free(r);
    if (n == 0 || n >= sizeof out)
        return RN_FALLBACK;
    return buf_put(b, out, n) < 0 ? RN_FALLBACK : RN_OK;
}

static int render_raw_str(struct buf *b, PyObject *t)
{
    Py_ssize_t n;
    const char *s = PyUnicode_AsUTF8AndSize(t, &n);
    if (!s) {
        PyErr_Clear();
        return RN_FALLBACK;
    }
    return buf_put(b, s, (size_t)n) < 0 ? RN_FALLBACK : RN_OK;
}

static int render_int(struct buf *b, PyObject *o, int stdlib)
{
    char tmp[32];
    int overflow;
    long long v = PyLong_AsLongLongAndOverflow(o, &overflow);
    int n;
    if (overflow && stdlib) { /* json.dumps writes any int */
        PyObject *t = PyObject_Str(o);
        int r = t ? render_raw_str(b, t) : RN_FALLBACK;
        Py_XDECREF(t);
        if (!t)
            clear_exc();
        return r;
    }
    if (overflow > 0) {
        unsigned long long u = PyLong_AsUnsignedLongLong(o);
        if (u == (unsigned long long)-1 && PyErr_Occurred()) { /* beyond 64 bits: orjson raises */
            PyErr_Clear();
            return RN_FALLBACK;
        }
        n = snprintf(tmp, sizeof tmp, "%llu", u);
    } else if (overflow < 0) {
        return RN_FALLBACK;
    } else {
        if (v == -1 && PyErr_Occurred()) {
            PyErr_Clear();
            return RN_FALLBACK;
        }
        /* digits by hand: snprintf is most of an int's cost */
        unsigned long long m = v < 0 ? 0ULL - (unsigned long long)v : (unsigned long long)v;
        char *e = tmp + sizeof tmp, *q = e;
        do {
            *--q = (char)('0' + m % 10);
            m /= 10;
        } while (m);
        if (v < 0)
            *--q = '-';
        return buf_put(b, q, (size_t)(e - q)) < 0 ? RN_FALLBACK : RN_OK;
    }
    return buf_put(b, tmp, (size_t)n) < 0 ? RN_FALLBACK : RN_OK;
}

static int render_dict(struct buf *b, PyObject *o, const struct rctx *c, int depth)
{
    Py_ssize_t pos = 0;
    PyObject *k, *v;
    int first = 1, r = RN_OK;
    if (buf_put(b, "{", 1) < 0)
        return RN_FALLBACK;
    while (PyDict_Next(o, &pos, &k, &v)) {
        if (!PyUnicode_CheckExact(k))
            return RN_FALLBACK;
        if (!first && buf_put(b, ",", 1) < 0)
            return RN_FALLBACK;
        first = 0;
        /* default() may run Python code that mutates the dict: hold what we render. */
        Py_INCREF(k);
        Py_INCREF(v);
        r = render_str(b, k);
        if (r == RN_OK)
            r = buf_put(b, ":", 1) < 0 ? RN_FALLBACK : render(b, v, c, depth + 1);
        Py_DECREF(k);
        Py_DECREF(v);
        if (r != RN_OK)
            return r;
    }
    return buf_put(b, "}", 1) < 0 ? RN_FALLBACK : RN_OK;
}

static int render_seq(struct buf *b, PyObject *o, const struct rctx *c, int depth)
{
    int is_list = PyList_CheckExact(o);
    if (buf_put(b, "[", 1) < 0)
        return RN_FALLBACK;
    for (Py_ssize_t i = 0; i < (is_list ? PyList_GET_SIZE(o) : PyTuple_GET_SIZE(o)); i++) {
        if (i && buf_put(b, ",", 1) < 0)
            return RN_FALLBACK;
        PyObject *item = is_list ? PyList_GET_ITEM(o, i) : PyTuple_GET_ITEM(o, i);
        Py_INCREF(item);
        int r = render(b, item, c, depth + 1);
        Py_DECREF(item);
        if (r != RN_OK)
            return r;
    }
    return buf_put(b, "]", 1) < 0 ? RN_FALLBACK : RN_OK;
}

/* A value orjson hands to default(), and this renderer may too: not one of the natively
 * serialized types (nor a dataclass, nor numpy's). */
static int goes_to_default(PyObject *o, const struct rctx *c)
{
    PyTypeObject *t = Py_TYPE(o);
    if (strncmp(t->tp_name, "numpy.", 6) == 0)
        return 0;
    if (!c->native)
        return 0;
    int r = PyObject_IsInstance(o, c->native);
    if (r != 0) {
        if (r < 0)
            clear_exc();
        return 0;
    }
    return c->stdlib || !PyObject_HasAttrString((PyObject *)t, "__dataclass_fields__");
}

static int render(struct buf *b, PyObject *o, const struct rctx *c, int depth)
{
    if (depth > MAX_DEPTH)
        return RN_FALLBACK;
    if (PyUnicode_CheckExact(o))
        return render_str(b, o);
    if (o == Py_None)
        return buf_put(b, "null", 4) < 0 ? RN_FALLBACK : RN_OK;
    if (o == Py_True)
        return buf_put(b, "true", 4) < 0 ? RN_FALLBACK : RN_OK;
    if (o == Py_False)
        return buf_put(b, "false", 5) < 0 ? RN_FALLBACK : RN_OK;
    if (PyLong_CheckExact(o))
        return render_int(b, o, c->stdlib);
    if (PyFloat_CheckExact(o))
        return render_float(b, PyFloat_AS_DOUBLE(o), c->stdlib);
    if (PyDict_CheckExact(o))
        return render_dict(b, o, c, depth);
    if (PyList_CheckExact(o) || PyTuple_CheckExact(o))
        return render_seq(b, o, c, depth);
    if (!c->deflt || !goes_to_default(o, c))
        return RN_FALLBACK;
    PyObject *d = c->deflt == (PyObject *)&PyUnicode_Type ? PyObject_Str(o) : PyObject_CallOneArg(c->deflt, o);
    if (!d) { /* orjson raises; let the Python path raise it */
        clear_exc();
        return RN_FALLBACK;
    }
    int r = render(b, d, c, depth + 1);
    Py_DECREF(d);
    return r;
}

/* render(obj, default, native_types, stdlib) -> bytes (orjson.dumps(obj, default=default), or
 * with stdlib true json.dumps's compact form), or None when this renderer cannot produce exactly
 * those bytes. For the tests and for callers outside structlog. */
static PyObject *py_render(PyObject *mod, PyObject *args)
{
    (void)mod;
    PyObject *o, *deflt, *native;
    int stdlib;
    if (!PyArg_ParseTuple(args, "OOO!p:render", &o, &deflt, &PyTuple_Type, &native, &stdlib))
        return NULL;
    struct rctx c = {deflt == Py_None ? NULL : deflt, native, stdlib};
    struct buf b;
    buf_init(&b);
    int r = render(&b, o, &c, 0);
    PyObject *out = r == RN_OK ? PyBytes_FromStringAndSize(b.p, (Py_ssize_t)b.len) : Py_NewRef(Py_None);
    buf_free(&b);
    return out;
}

/* -- timestamps: datetime.now(timezone.utc).isoformat().replace("+00:00", "Z") ---------------- */

/* datetime.now floors the system clock to microseconds; isoformat drops a zero fraction. */
static size_t iso_utc(char *out, time_t sec, long usec, time_t *cached_sec, char *cached)
{
    if (sec != *cached_sec) {
        struct tm tm;
        gmtime_r(&sec, &tm);
        snprintf(cached, 80, "%04d-%02d-%02dT%02d:%02d:%02d", tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday, tm.tm_hour,
                 tm.tm_min, tm.tm_sec);
        *cached_sec = sec;
    }
    size_t n = strlen(cached);
    memcpy(out, cached, n);
    if (usec > 0 && usec < 1000000) {
        out[n++] = '.';
        for (int i = 5; i >= 0; i--, usec /= 10)
            out[n + (size_t)i] = (char)('0' + usec % 10);
        n += 6;
    }
    out[n++] = 'Z';
    out[n] = 0;
    return n;
}

static PyObject *py_iso_utc(PyObject *mod, PyObject *args)
{
    (void)mod;
    long long sec;
    long usec;
    if (!PyArg_ParseTuple(args, "Ll:iso_utc", &sec, &usec))
        return NULL;
    char out[128], cached[80];
    time_t cs = (time_t)-1;
    size_t n = iso_utc(out, (time_t)sec, usec, &cs, cached);
    return PyUnicode_FromStringAndSize(out, (Py_ssize_t)n);
}

/* -- Stage: the fused default pipeline ----------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    PyObject *procs;       /* the processors list configure() installed */
    PyObject *snapshot;    /* tuple of its items when installed: a changed list is not fused */
    PyObject *logger_type; /* LogsinkLogger */
    struct rctx rc;        /* the renderer's default (str), native types (owned), stdlib json or orjson */
    PyObject *stack_proc, *exc_proc, *renderer; /* the Python processors, for what is not fused */
    PyObject *interpolate; /* structlog._native._maybe_interpolate */
    PyObject *resolve;     /* resolve(client) -> (p_cdata, address) */
    PyObject *failed;      /* failed(client, ret, data): fork reopen or the Python exception */
    PyObject *var_keys;    /* ContextVar -> event dict key (str), or None: not structlog's */
    PyObject *last_p;      /* the client's _p object the cached address belongs to */
    uintptr_t last_addr;
    ls_write_fn try_write, write;
    time_t ts_sec;
    char ts_text[80];
    unsigned long long fused, fallbacks;
} Stage;

static unsigned long long stages_fused, stages_fallbacks; /* over every Stage, for native_stats() */

static PyObject *s_context, *s_processors, *s_logger, *s_client, *s_p, *s_msg, *s_level, *s_timestamp, *s_event,
    *s_stack_info, *s_exc_info, *s_name, *s_proxy, *s_prefix, *s_warning, *s_error, *s_warn, *s_exception;

static int stage_init(Stage *s, PyObject *args, PyObject *kw)
{
    static char *names[] = {"processors", "logger_type", "default", "native_types", "stdlib", "stack_proc", "exc_proc",
                            "renderer", "interpolate", "resolve", "failed", "try_write", "write", NULL};
    PyObject *procs, *lt, *df, *nt, *sp, *ep, *rn, *ip, *rs, *fl;
    int stdlib;
    unsigned long long tw, w;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O!OOO!pOOOOOOKK:Stage", names, &PyList_Type, &procs, &lt, &df,
                                     &PyTuple_Type, &nt, &stdlib, &sp, &ep, &rn, &ip, &rs, &fl, &tw, &w))
        return -1;
    if (!tw || !w) {
        PyErr_SetString(PyExc_ValueError, "Stage needs the addresses of ls_producer_try_write and ls_producer_write");
        return -1;
    }
    PyObject *snap = PyList_AsTuple(procs), *vk = PyDict_New();
    if (!snap || !vk) {
        Py_XDECREF(snap);
        Py_XDECREF(vk);
        return -1;
    }
    Py_XSETREF(s->procs, Py_NewRef(procs));
    Py_XSETREF(s->snapshot, snap);
    Py_XSETREF(s->logger_type, Py_NewRef(lt));
    Py_XSETREF(s->rc.deflt, Py_NewRef(df));
    Py_XSETREF(s->rc.native, Py_NewRef(nt));
    s->rc.stdlib = stdlib;
    Py_XSETREF(s->stack_proc, Py_NewRef(sp));
    Py_XSETREF(s->exc_proc, Py_NewRef(ep));
    Py_XSETREF(s->renderer, Py_NewRef(rn));
    Py_XSETREF(s->interpolate, Py_NewRef(ip));
    Py_XSETREF(s->resolve, Py_NewRef(rs));
    Py_XSETREF(s->failed, Py_NewRef(fl));
    Py_XSETREF(s->var_keys, vk);
    Py_CLEAR(s->last_p);
    s->try_write = (ls_write_fn)(uintptr_t)tw;
    s->write = (ls_write_fn)(uintptr_t)w;
    s->ts_sec = (time_t)-1;
    return 0;
}

static int stage_traverse(Stage *s, visitproc visit, void *arg)
{
    Py_VISIT(s->procs);
    Py_VISIT(s->snapshot);
    Py_VISIT(s->logger_type);
    Py_VISIT(s->rc.deflt);
    Py_VISIT(s->rc.native);
    Py_VISIT(s->stack_proc);
    Py_VISIT(s->exc_proc);
    Py_VISIT(s->renderer);
    Py_VISIT(s->interpolate);
    Py_VISIT(s->resolve);
    Py_VISIT(s->failed);
    Py_VISIT(s->var_keys);
    Py_VISIT(s->last_p);
    return 0;
}

static int stage_clear(Stage *s)
{
    Py_CLEAR(s->procs);
    Py_CLEAR(s->snapshot);
    Py_CLEAR(s->logger_type);
    Py_CLEAR(s->rc.deflt);
    Py_CLEAR(s->rc.native);
    Py_CLEAR(s->stack_proc);
    Py_CLEAR(s->exc_proc);
    Py_CLEAR(s->renderer);
    Py_CLEAR(s->interpolate);
    Py_CLEAR(s->resolve);
    Py_CLEAR(s->failed);
    Py_CLEAR(s->var_keys);
    Py_CLEAR(s->last_p);
    return 0;
}

static void stage_dealloc(Stage *s)
{
    PyObject_GC_UnTrack(s);
    stage_clear(s);
    Py_TYPE(s)->tp_free((PyObject *)s);
}

/* The processors are still the ones configure() installed, unchanged. */
static int stage_matches(Stage *s, PyObject *procs)
{
    if (procs != s->procs)
        return 0;
    Py_ssize_t n = PyTuple_GET_SIZE(s->snapshot);
    if (PyList_GET_SIZE(procs) != n)
        return 0;
    for (Py_ssize_t i = 0; i < n; i++)
        if (PyList_GET_ITEM(procs, i) != PyTuple_GET_ITEM(s->snapshot, i))
            return 0;
    return 1;
}

/* merge_contextvars: for each context variable set in this context whose name starts with
 * "structlog_" and whose value is not Ellipsis, setdefault(name without the prefix, value), in
 * the context's iteration order. The key of each variable is looked up once. */
static int merge_contextvars(Stage *s, PyObject *d)
{
    PyObject *ctx = PyContext_CopyCurrent();
    if (!ctx)
        return -1;
    PyObject *it = PyObject_GetIter(ctx);
    if (!it) {
        Py_DECREF(ctx);
        return -1;
    }
    PyObject *var;
    int rc = 0;
    while (rc == 0 && (var = PyIter_Next(it))) {
        PyObject *key = PyDict_GetItemWithError(s->var_keys, var);
        if (key) {
            Py_INCREF(key);
        } else if (!PyErr_Occurred()) {
            PyObject *name = PyObject_GetAttr(var, s_name);
            if (name && PyUnicode_Check(name) && PyUnicode_Tailmatch(name, s_prefix, 0, 10, -1) == 1)
                key = PyUnicode_Substring(name, 10, PyUnicode_GET_LENGTH(name));
            else if (name)
                key = Py_NewRef(Py_None);
            Py_XDECREF(name);
            /* Context variables live as long as their module: a bounded cache of their keys. */
            if (key && PyDict_GET_SIZE(s->var_keys) < 4096 && PyDict_SetItem(s->var_keys, var, key) < 0)
                rc = -1;
        }
        if (!key)
            rc = -1;
        if (rc == 0 && key != Py_None) {
            PyObject *v = PyObject_GetItem(ctx, var);
            if (!v)
                rc = -1;
            else {
                if (v != Py_Ellipsis && !PyDict_SetDefault(d, key, v))
                    rc = -1;
                Py_DECREF(v);
            }
        }
        Py_XDECREF(key);
        Py_DECREF(var);
    }
    if (rc == 0 && PyErr_Occurred())
        rc = -1;
    Py_DECREF(it);
    Py_DECREF(ctx);
    return rc;
}

static PyObject *level_name(PyObject *name)
{
    /* structlog.processors.add_log_level: map_method_name */
    if (name != s_warn && name != s_exception && PyUnicode_CHECK_INTERNED(name))
        return name; /* interned and neither: a different string */
    if (PyUnicode_Compare(name, s_warn) == 0)
        return s_warning;
    if (PyUnicode_Compare(name, s_exception) == 0)
        return s_error;
    return name;
}

/* The fallback for events emit() does not fuse: structlog's own path. */
static PyObject *proxy(PyObject *self, PyObject *name, PyObject *event, PyObject *kw)
{
    PyObject *meth = PyObject_GetAttr(self, s_proxy);
    if (!meth)
        return NULL;
    PyObject *args = PyTuple_Pack(2, name, event);
    PyObject *r = args ? PyObject_Call(meth, args, kw) : NULL;
    Py_XDECREF(args);
    Py_DECREF(meth);
    return r;
}

/* Hand the line to the producer of logger._client. */
static PyObject *stage_write(Stage *s, PyObject *logger, const char *data, size_t len)
{
    PyObject *client = PyObject_GetAttr(logger, s_client);
    if (!client)
        return NULL;
    PyObject *p = PyObject_GetAttr(client, s_p);
    if (!p) {
        Py_DECREF(client);
        return NULL;
    }
    if (p != s->last_p) { /* a new connection (fork, first use), or closed (NULL: address 0) */
        PyObject *addr = PyObject_CallOneArg(s->resolve, client);
        unsigned long long a = addr ? PyLong_AsUnsignedLongLong(addr) : 0;
        Py_XDECREF(addr);
        if (PyErr_Occurred()) {
            Py_DECREF(p);
            Py_DECREF(client);
            return NULL;
        }
        Py_XSETREF(s->last_p, Py_NewRef(p));
        s->last_addr = (uintptr_t)a;
    }
    Py_DECREF(p);
    int r = -EBADF;
    void *prod = (void *)s->last_addr;
    if (prod) {
        r = s->try_write(prod, data, len);
        if (r == (int)len)
            r = 0;
        else if (r == -EAGAIN) { /* every segment pinned: wait for a release without the GIL */
            Py_BEGIN_ALLOW_THREADS
            r = s->write(prod, data, len);
            Py_END_ALLOW_THREADS
        }
    }
    PyObject *ret;
    if (r == 0) {
        ret = Py_NewRef(Py_None);
    } else {
        PyObject *bytes = PyBytes_FromStringAndSize(data, (Py_ssize_t)len);
        ret = bytes ? PyObject_CallFunction(s->failed, "OiO", client, r, bytes) : NULL;
        Py_XDECREF(bytes);
    }
    Py_DECREF(client);
    return ret;
}

static PyObject *stage_emit_dict(Stage *s, PyObject *logger, PyObject *name, PyObject *d)
{
    PyObject *lvl = level_name(name);
    if (PyDict_SetItem(d, s_level, lvl) < 0)
        return NULL;
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    char tbuf[128];
    size_t tn = iso_utc(tbuf, ts.tv_sec, ts.tv_nsec / 1000, &s->ts_sec, s->ts_text);
    PyObject *tstr = PyUnicode_FromStringAndSize(tbuf, (Py_ssize_t)tn);
    if (!tstr)
        return NULL;
    int rc = PyDict_SetItem(d, s_timestamp, tstr);
    Py_DECREF(tstr);
    if (rc < 0)
        return NULL;
    Py_INCREF(d);
    if ((rc = PyDict_Contains(d, s_stack_info)) != 0) {
        PyObject *nd = rc < 0 ? NULL : PyObject_CallFunctionObjArgs(s->stack_proc, logger, name, d, NULL);
        Py_DECREF(d);
        if (!nd)
            return NULL;
        d = nd;
    }
    if (PyDict_CheckExact(d) && (rc = PyDict_Contains(d, s_exc_info)) != 0) {
        PyObject *nd = rc < 0 ? NULL : PyObject_CallFunctionObjArgs(s->exc_proc, logger, name, d, NULL);
        Py_DECREF(d);
        if (!nd)
            return NULL;
        d = nd;
    }
    struct buf b;
    buf_init(&b);
    PyObject *ret;
    if (PyDict_CheckExact(d) && render(&b, d, &s->rc, 0) == RN_OK && buf_put(&b, "\n", 1) == 0) {
        s->fused++;
        stages_fused++;
        ret = stage_write(s, logger, b.p, b.len);
    } else if (reraise_kept()) {
        ret = NULL;
    } else {
        s->fallbacks++;
        stages_fallbacks++;
        PyObject *line = PyObject_CallFunctionObjArgs(s->renderer, logger, name, d, NULL);
        ret = line ? PyObject_CallMethodOneArg(logger, s_msg, line) : NULL;
        Py_XDECREF(line);
    }
    buf_free(&b);
    Py_DECREF(d);
    return ret;
}

/* A call's keyword arguments: a dict (emit) or vectorcall's values and names (LevelMethod). */
struct kwargs {
    PyObject *dict;
    PyObject *const *values;
    PyObject *names;
};

static int kwargs_into(PyObject *d, const struct kwargs *kw)
{
    if (kw->dict)
        return PyDict_Update(d, kw->dict);
    Py_ssize_t n = kw->names ? PyTuple_GET_SIZE(kw->names) : 0;
    for (Py_ssize_t i = 0; i < n; i++)
        if (PyDict_SetItem(d, PyTuple_GET_ITEM(kw->names, i), kw->values[i]) < 0)
            return -1;
    return 0;
}

/* What the filtering bound logger's level method does with the default processors, fused;
 * anything else goes through structlog's own path (self._proxy_to_logger). */
static PyObject *stage_call(Stage *s, PyObject *self, PyObject *name, PyObject *event, PyObject *eargs,
                            const struct kwargs *kw)
{
    PyObject *procs = PyObject_GetAttr(self, s_processors);
    if (!procs)
        return NULL;
    int ok = PyList_CheckExact(procs) && stage_matches(s, procs);
    Py_DECREF(procs);
    PyObject *logger = PyObject_GetAttr(self, s_logger);
    if (!logger)
        return NULL;
    if (eargs && PyTuple_GET_SIZE(eargs)) { /* structlog's _maybe_interpolate */
        event = PyObject_CallFunctionObjArgs(s->interpolate, event, eargs, NULL);
        if (!event) {
            Py_DECREF(logger);
            return NULL;
        }
    } else {
        Py_INCREF(event);
    }
    PyObject *ret = NULL;
    if (!ok || (PyObject *)Py_TYPE(logger) != s->logger_type) {
        PyObject *kwd = kw->dict ? Py_NewRef(kw->dict) : PyDict_New();
        if (kwd && (kw->dict || kwargs_into(kwd, kw) == 0))
            ret = proxy(self, name, event, kwd);
        Py_XDECREF(kwd);
        goto out;
    }
    PyObject *ctx = PyObject_GetAttr(self, s_context);
    if (!ctx)
        goto out;
    if (!PyDict_CheckExact(ctx)) { /* a context_class of the user's: its copy() is structlog's business */
        Py_DECREF(ctx);
        PyObject *kwd = kw->dict ? Py_NewRef(kw->dict) : PyDict_New();
        if (kwd && (kw->dict || kwargs_into(kwd, kw) == 0))
            ret = proxy(self, name, event, kwd);
        Py_XDECREF(kwd);
        goto out;
    }
    /* structlog: event_dict = context.copy(); event_dict.update(**kw); event_dict["event"] = event */
    PyObject *d = PyDict_Copy(ctx);
    Py_DECREF(ctx);
    if (!d)
        goto out;
    if (kwargs_into(d, kw) < 0 || (event != Py_None && PyDict_SetItem(d, s_event, event) < 0) ||
        merge_contextvars(s, d) < 0) {
        Py_DECREF(d);
        goto out;
    }
    ret = stage_emit_dict(s, logger, name, d);
    Py_DECREF(d);
out:
    Py_DECREF(event);
    Py_DECREF(logger);
    return ret;
}

/* emit(bound_logger, method_name, event, args, kw) */
static PyObject *stage_emit(Stage *s, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 5 || !PyTuple_Check(args[3]) || !PyDict_Check(args[4])) {
        PyErr_SetString(PyExc_TypeError, "emit(bound_logger, method_name, event, args, kw)");
        return NULL;
    }
    struct kwargs kw = {args[4], NULL, NULL};
    return stage_call(s, args[0], args[1], args[2], args[3], &kw);
}

/* -- LevelMethod: a bound logger's level method (info, warning, ...) as a C method --------------- */

/* stage.method(name) makes one: a method descriptor (no bound-method object on obj.info(...)),
 * called with vectorcall, so the keyword arguments go into the event dict with no **kw dict. */
typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    Stage *stage;
    PyObject *name;
} LevelMethod;

static PyObject *lm_vectorcall(PyObject *callable, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    LevelMethod *m = (LevelMethod *)callable;
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    int event_kw = 0;
    for (Py_ssize_t i = 0; kwnames && i < PyTuple_GET_SIZE(kwnames) && !event_kw; i++)
        event_kw = PyUnicode_CompareWithASCIIString(PyTuple_GET_ITEM(kwnames, i), "event") == 0;
    if (nargs < 2 && !event_kw) {
        PyErr_Format(PyExc_TypeError, "%U() missing 1 required positional argument: 'event'", m->name);
        return NULL;
    }
    if (event_kw) {
        /* info(event="x", ...) or a duplicate event: structlog's own path writes it (or raises its
         * TypeError for a duplicate), as the Python level methods would. */
        PyObject *meth = PyObject_GetAttr(args[0], s_proxy);
        if (!meth)
            return NULL;
        PyObject *pos[3] = {NULL, m->name, nargs > 1 ? args[1] : NULL};
        size_t n = nargs > 1 ? 2 : 1;
        PyObject *r = NULL;
        if (nargs > 2) {
            PyErr_Format(PyExc_TypeError, "%U() got multiple values for argument 'event'", m->name);
        } else {
            PyObject *call[2 + 1 + 64];
            Py_ssize_t nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
            if (nkw > 64) {
                PyObject *kwd = PyDict_New();
                for (Py_ssize_t i = 0; kwd && i < nkw; i++)
                    if (PyDict_SetItem(kwd, PyTuple_GET_ITEM(kwnames, i), args[nargs + i]) < 0)
                        Py_CLEAR(kwd);
                PyObject *tup = kwd ? PyTuple_New((Py_ssize_t)n) : NULL;
                for (size_t i = 0; tup && i < n; i++)
                    PyTuple_SET_ITEM(tup, (Py_ssize_t)i, Py_NewRef(pos[1 + i]));
                if (tup)
                    r = PyObject_Call(meth, tup, kwd);
                Py_XDECREF(tup);
                Py_XDECREF(kwd);
            } else {
                for (size_t i = 0; i < n; i++)
                    call[1 + i] = pos[1 + i];
                for (Py_ssize_t i = 0; i < nkw; i++)
                    call[1 + n + (size_t)i] = args[nargs + i];
                r = PyObject_Vectorcall(meth, call + 1, n | PY_VECTORCALL_ARGUMENTS_OFFSET, kwnames);
            }
        }
        Py_DECREF(meth);
        return r;
    }
    PyObject *eargs = NULL;
    if (nargs > 2 && !(eargs = PyTuple_New(nargs - 2)))
        return NULL;
    for (Py_ssize_t i = 2; i < nargs; i++)
        PyTuple_SET_ITEM(eargs, i - 2, Py_NewRef(args[i]));
    struct kwargs kw = {NULL, args + nargs, kwnames};
    PyObject *r = stage_call(m->stage, args[0], m->name, args[1], eargs, &kw);
    Py_XDECREF(eargs);
    return r;
}

static PyObject *lm_descr_get(PyObject *self, PyObject *obj, PyObject *type)
{
    (void)type;
    if (!obj || obj == Py_None)
        return Py_NewRef(self);
    return PyMethod_New(self, obj);
}

static int lm_traverse(LevelMethod *m, visitproc visit, void *arg)
{
    Py_VISIT(m->stage);
    Py_VISIT(m->name);
    return 0;
}

static int lm_clear(LevelMethod *m)
{
    Py_CLEAR(m->stage);
    Py_CLEAR(m->name);
    return 0;
}

static void lm_dealloc(LevelMethod *m)
{
    PyObject_GC_UnTrack(m);
    lm_clear(m);
    Py_TYPE(m)->tp_free((PyObject *)m);
}

static PyObject *lm_repr(LevelMethod *m)
{
    return PyUnicode_FromFormat("<logsink fused structlog method %U>", m->name);
}

static PyTypeObject LevelMethodType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "logsink._fastlog.LevelMethod",
    .tp_basicsize = sizeof(LevelMethod),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL | Py_TPFLAGS_METHOD_DESCRIPTOR,
    .tp_doc = "a structlog level method running the fused pipeline (see logsink.structlog)",
    .tp_vectorcall_offset = offsetof(LevelMethod, vectorcall),
    .tp_call = PyVectorcall_Call,
    .tp_descr_get = lm_descr_get,
    .tp_dealloc = (destructor)lm_dealloc,
    .tp_traverse = (traverseproc)lm_traverse,
    .tp_clear = (inquiry)lm_clear,
    .tp_repr = (reprfunc)lm_repr,
};

static PyObject *stage_method(Stage *s, PyObject *name)
{
    if (!PyUnicode_CheckExact(name)) {
        PyErr_SetString(PyExc_TypeError, "method(name): name is a level name (str)");
        return NULL;
    }
    LevelMethod *m = PyObject_GC_New(LevelMethod, &LevelMethodType);
    if (!m)
        return NULL;
    m->vectorcall = lm_vectorcall;
    m->stage = (Stage *)Py_NewRef(s);
    Py_INCREF(name);
    PyUnicode_InternInPlace(&name);
    m->name = name;
    PyObject_GC_Track(m);
    return (PyObject *)m;
}

static PyObject *stage_get_fused(Stage *s, void *c)
{
    (void)c;
    return PyLong_FromUnsignedLongLong(s->fused);
}

static PyObject *stage_get_fallbacks(Stage *s, void *c)
{
    (void)c;
    return PyLong_FromUnsignedLongLong(s->fallbacks);
}

static PyMethodDef stage_methods[] = {
    {"emit", (PyCFunction)(void (*)(void))stage_emit, METH_FASTCALL,
     "emit(bound_logger, method_name, event, args, kw): log one event through the fused pipeline"},
    {"method", (PyCFunction)stage_method, METH_O, "method(name): the level method `name` for a bound logger class"},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef stage_getset[] = {
    {"fused", (getter)stage_get_fused, NULL, "events rendered and written in C", NULL},
    {"fallbacks", (getter)stage_get_fallbacks, NULL, "events the C renderer handed to the Python renderer", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject StageType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "logsink._fastlog.Stage",
    .tp_basicsize = sizeof(Stage),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "structlog's default logsink pipeline, fused (see logsink.structlog)",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)stage_init,
    .tp_dealloc = (destructor)stage_dealloc,
    .tp_traverse = (traverseproc)stage_traverse,
    .tp_clear = (inquiry)stage_clear,
    .tp_methods = stage_methods,
    .tp_getset = stage_getset,
};

/* -- logging: LogsinkHandler.handle, and Logger._log, for the default JsonFormatter ------------- */

/* Set once by logsink.logging (handler_setup): what a record must be for the C path, and how to
 * reach the producer. Anything else - filters, another formatter, a LogRecord subclass, exception
 * or stack text, a message that is not valid UTF-8 - goes to the handler's Python path. */
static struct {
    PyObject *handler_type, *formatter_type, *record_type, *logging_mod, *resolve, *failed;
    PyObject *levels; /* levelname -> its lower-case str */
    PyObject *last_p;
    uintptr_t last_addr;
    ls_write_fn try_write, write;
    time_t ts_sec;
    char ts_text[80];
    unsigned long long direct, records; /* Logger._log calls that made no LogRecord; handle() in C */
} H;

static PyObject *s_filters, *s_formatter, *s_extra_fields, *s_created, *s_levelname, *s_msg_attr, *s_args, *s_exc_info_attr,
    *s_exc_text, *s_stack_info_attr, *s_client_attr, *s_emit, *s_disabled, *s_handlers, *s_propagate, *s_parent,
    *s_level_attr, *s_factory, *s_level_to_name;

static PyObject *py_handler_setup(PyObject *mod, PyObject *args)
{
    (void)mod;
    PyObject *ht, *ft, *rt, *lm, *rs, *fl;
    unsigned long long tw, w;
    if (!PyArg_ParseTuple(args, "OOOOOOKK:handler_setup", &ht, &ft, &rt, &lm, &rs, &fl, &tw, &w))
        return NULL;
    PyObject *levels = PyDict_New();
    if (!levels)
        return NULL;
    Py_XSETREF(H.handler_type, Py_NewRef(ht));
    Py_XSETREF(H.formatter_type, Py_NewRef(ft));
    Py_XSETREF(H.record_type, Py_NewRef(rt));
    Py_XSETREF(H.logging_mod, Py_NewRef(lm));
    Py_XSETREF(H.resolve, Py_NewRef(rs));
    Py_XSETREF(H.failed, Py_NewRef(fl));
    Py_XSETREF(H.levels, levels);
    Py_CLEAR(H.last_p);
    H.try_write = (ls_write_fn)(uintptr_t)tw;
    H.write = (ls_write_fn)(uintptr_t)w;
    H.ts_sec = (time_t)-1;
    Py_RETURN_NONE;
}

/* The attribute, or NULL with no error set when it is missing. */
static PyObject *attr(PyObject *o, PyObject *name)
{
    PyObject *v = PyObject_GetAttr(o, name);
    if (!v)
        clear_exc();
    return v;
}

/* Is the attribute missing, None, or false? (-1: error) */
static int attr_false(PyObject *o, PyObject *name)
{
    PyObject *v = attr(o, name);
    if (!v)
        return 1;
    int t = v == Py_None ? 0 : PyObject_IsTrue(v);
    Py_DECREF(v);
    return t < 0 ? -1 : !t;
}

static int utf8(PyObject *s, const char **out, Py_ssize_t *n)
{
    if (!PyUnicode_Check(s))
        return -1;
    *out = PyUnicode_AsUTF8AndSize(s, n);
    if (!*out) {
        PyErr_Clear(); /* lone surrogates: the Python path writes them backslash-escaped */
        return -1;
    }
    return 0;
}

/* The handler takes the C path: exactly LogsinkHandler (subclasses may override emit), no
 * filters, the default JsonFormatter without extra fields. 1 yes, 0 no, -1 error. */
static int handler_plain(PyObject *self)
{
    if (!H.formatter_type)
        return 0;
    int f = attr_false(self, s_filters);
    if (f <= 0)
        return f;
    PyObject *fmt = attr(self, s_formatter);
    if (!fmt)
        return 0;
    int ok = (PyObject *)Py_TYPE(fmt) == H.formatter_type ? attr_false(fmt, s_extra_fields) : 0;
    Py_DECREF(fmt);
    return ok;
}

/* LogRecord.getMessage: str(msg), then % args if there are any. New reference or NULL (error). */
static PyObject *get_message(PyObject *msg, PyObject *args)
{
    PyObject *text = PyUnicode_CheckExact(msg) ? Py_NewRef(msg) : PyObject_Str(msg);
    if (!text)
        return NULL;
    int has_args = args == Py_None ? 0 : PyObject_IsTrue(args);
    if (has_args < 0) {
        Py_DECREF(text);
        return NULL;
    }
    if (has_args)
        Py_SETREF(text, PyUnicode_Format(text, args));
    return text;
}

/* JsonFormatter.format's line for (created, levelname, name, message), handed to the handler's
 * producer: 1 done, 0 not for this path (nothing written), -1 error set. */
static int handler_write(PyObject *self, double created, PyObject *levelname, PyObject *name, PyObject *text)
{
    PyObject *level = PyDict_GetItemWithError(H.levels, levelname), *client = NULL, *p = NULL;
    int r = 0;
    if (level) {
        Py_INCREF(level);
    } else {
        if (PyErr_Occurred() || !(level = PyObject_CallMethod(levelname, "lower", NULL)))
            return -1;
        if (PyDict_GET_SIZE(H.levels) < 256 && PyDict_SetItem(H.levels, levelname, level) < 0) {
            Py_DECREF(level);
            return -1;
        }
    }
    const char *ls, *ns, *ms_text;
    Py_ssize_t ln, nn, mn;
    if (utf8(level, &ls, &ln) < 0 || utf8(name, &ns, &nn) < 0 || utf8(text, &ms_text, &mn) < 0 ||
        !(created >= 0 && created < 1e15)) {
        Py_DECREF(level);
        return 0;
    }
    /* JsonFormatter._timestamp: int(created), int((created - sec) * 1000), strftime per second */
    int64_t sec = (int64_t)created;
    if ((time_t)sec != H.ts_sec) {
        time_t t = (time_t)sec;
        struct tm tm;
        gmtime_r(&t, &tm);
        strftime(H.ts_text, sizeof H.ts_text, "%Y-%m-%dT%H:%M:%S", &tm);
        H.ts_sec = (time_t)sec;
    }
    int ms = (int)((created - (double)sec) * 1000);
    /* {"timestamp":"TS","level":"L","logger":"N","message":"M"}\n, as ls_render_log_json writes it */
    struct buf b;
    buf_init(&b);
    if (buf_reserve(&b, 6 * ((size_t)ln + (size_t)nn + (size_t)mn) + 160) < 0) {
        buf_free(&b);
        Py_DECREF(level);
        return 0;
    }
    char *o = b.p;
#define LIT(t) (memcpy(o, t, sizeof(t) - 1), o += sizeof(t) - 1)
    LIT("{\"timestamp\":\"");
    size_t tl = strlen(H.ts_text);
    memcpy(o, H.ts_text, tl);
    o += tl;
    *o++ = '.';
    *o++ = (char)('0' + ms / 100 % 10);
    *o++ = (char)('0' + ms / 10 % 10);
    *o++ = (char)('0' + ms % 10);
    LIT("Z\",\"level\":\"");
    o += escape_into(o, ls, (size_t)ln);
    LIT("\",\"logger\":\"");
    o += escape_into(o, ns, (size_t)nn);
    LIT("\",\"message\":\"");
    o += escape_into(o, ms_text, (size_t)mn);
    LIT("\"}\n");
#undef LIT
    b.len = (size_t)(o - b.p);
    Py_DECREF(level);

    client = attr(self, s_client_attr);
    p = client ? attr(client, s_p) : NULL;
    if (!p)
        goto out;
    if (p != H.last_p) { /* a new connection (fork, first use), or closed (NULL: address 0) */
        PyObject *addr = PyObject_CallOneArg(H.resolve, client);
        unsigned long long a = addr ? PyLong_AsUnsignedLongLong(addr) : 0;
        Py_XDECREF(addr);
        if (PyErr_Occurred()) {
            r = -1;
            goto out;
        }
        Py_XSETREF(H.last_p, Py_NewRef(p));
        H.last_addr = (uintptr_t)a;
    }
    void *prod = (void *)H.last_addr;
    int w = -EBADF;
    if (prod) {
        w = H.try_write(prod, b.p, b.len);
        if (w == (int)b.len)
            w = 0;
        else if (w == -EAGAIN) { /* every segment pinned: wait for a release without the GIL */
            Py_BEGIN_ALLOW_THREADS
            w = H.write(prod, b.p, b.len);
            Py_END_ALLOW_THREADS
        }
    }
    if (w == 0) {
        r = 1;
    } else {
        PyObject *bytes = PyBytes_FromStringAndSize(b.p, (Py_ssize_t)b.len);
        PyObject *res = bytes ? PyObject_CallFunction(H.failed, "OiO", client, w, bytes) : NULL;
        Py_XDECREF(bytes);
        Py_XDECREF(res);
        r = res ? 1 : -1;
    }
out:
    buf_free(&b);
    Py_XDECREF(client);
    Py_XDECREF(p);
    return r;
}

/* handle(record) in C: 1 done, 0 not for this path, -1 error set. */
static int handler_fast(PyObject *self, PyObject *record)
{
    if ((PyObject *)Py_TYPE(record) != H.record_type)
        return 0;
    int r = handler_plain(self);
    if (r <= 0)
        return r;
    if (attr_false(record, s_exc_info_attr) != 1 || attr_false(record, s_exc_text) != 1 ||
        attr_false(record, s_stack_info_attr) != 1)
        return PyErr_Occurred() ? -1 : 0;
    PyObject *created = attr(record, s_created), *levelname = attr(record, s_levelname), *name = attr(record, s_name),
             *msg = attr(record, s_msg_attr), *args = attr(record, s_args), *text = NULL;
    r = 0;
    if (created && PyFloat_CheckExact(created) && levelname && PyUnicode_CheckExact(levelname) && name && msg && args) {
        text = get_message(msg, args);
        r = text ? handler_write(self, PyFloat_AS_DOUBLE(created), levelname, name, text) : -1;
    }
    Py_XDECREF(created);
    Py_XDECREF(levelname);
    Py_XDECREF(name);
    Py_XDECREF(msg);
    Py_XDECREF(args);
    Py_XDECREF(text);
    if (r == 1)
        H.records++;
    return r;
}

/* LogsinkHandler.handle(record): the C path when it applies, else the handler's Python
 * _handle_slow(record) (filters, formatters, handleError: the stdlib's behaviour). An error on
 * the C path (a bad % format, a lost daemon) goes there too, which reports it through
 * handleError as logging does. */
static PyObject *py_handler_handle(PyObject *mod, PyObject *const *args, Py_ssize_t nargs)
{
    (void)mod;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "handle(record)");
        return NULL;
    }
    int r = handler_fast(args[0], args[1]);
    if (r == 1)
        Py_RETURN_TRUE;
    clear_exc();
    if (reraise_kept())
        return NULL;
    return PyObject_CallMethodOneArg(args[0], s_emit, args[1]);
}

/* logger_log(logger, level, msg, args) -> bool: Logger._log without the LogRecord, when nothing
 * could tell: the record would reach exactly one handler, a plain LogsinkHandler (see
 * handler_plain) whose level lets it through; the logger has no filters and is not disabled;
 * the record factory is logging.LogRecord. The caller checked exc_info, extra and stack_info are
 * absent. False (nothing done, no error) means: make the record as usual. */
static PyObject *py_logger_log(PyObject *mod, PyObject *const *args, Py_ssize_t nargs)
{
    (void)mod;
    if (nargs != 4 || !H.logging_mod)
        Py_RETURN_FALSE;
    PyObject *logger = args[0], *lvl = args[1], *msg = args[2], *margs = args[3];
    if (!PyLong_CheckExact(lvl) || !PyTuple_CheckExact(margs))
        Py_RETURN_FALSE;
    long level = PyLong_AsLong(lvl);
    PyObject *handler = NULL, *c = Py_NewRef(logger), *factory = NULL, *names = NULL, *levelname = NULL, *name = NULL,
             *text = NULL, *mapping = NULL;
    int ok = 0, r = 0;
    if (attr_false(logger, s_disabled) != 1 || attr_false(logger, s_filters) != 1)
        goto out;
    /* Logger.callHandlers: the handlers of the logger and its ancestors up to one that does not propagate */
    while (c && c != Py_None) {
        PyObject *hs = attr(c, s_handlers);
        if (!hs || !PyList_CheckExact(hs)) {
            Py_XDECREF(hs);
            goto out;
        }
        Py_ssize_t n = PyList_GET_SIZE(hs);
        if (n && (handler || n > 1)) {
            Py_DECREF(hs);
            goto out;
        }
        if (n)
            handler = Py_NewRef(PyList_GET_ITEM(hs, 0));
        Py_DECREF(hs);
        int pf = attr_false(c, s_propagate);
        if (pf < 0)
            goto out;
        if (pf)
            break;
        Py_SETREF(c, attr(c, s_parent));
    }
    if (!handler || (PyObject *)Py_TYPE(handler) != H.handler_type)
        goto out;
    PyObject *hl = attr(handler, s_level_attr);
    long hlevel = hl && PyLong_Check(hl) ? PyLong_AsLong(hl) : LONG_MAX;
    Py_XDECREF(hl);
    if (level < hlevel || handler_plain(handler) != 1)
        goto out;
    factory = PyObject_GetAttr(H.logging_mod, s_factory);
    names = PyObject_GetAttr(H.logging_mod, s_level_to_name);
    if (!factory || factory != H.record_type || !names || !PyDict_CheckExact(names))
        goto out;
    levelname = PyDict_GetItemWithError(names, lvl);
    Py_XINCREF(levelname);
    name = attr(logger, s_name);
    if (!levelname || !PyUnicode_CheckExact(levelname) || !name || !PyUnicode_Check(name))
        goto out;
    /* LogRecord.__init__: a lone non-empty mapping argument is the mapping itself */
    PyObject *fargs = margs;
    if (PyTuple_GET_SIZE(margs) == 1) {
        PyObject *a0 = PyTuple_GET_ITEM(margs, 0);
        if (PyDict_Check(a0)) {
            if (PyDict_GET_SIZE(a0))
                fargs = mapping = Py_NewRef(a0);
        } else if (!PyUnicode_Check(a0) && !PyLong_Check(a0) && !PyFloat_Check(a0) && PyMapping_Check(a0)) {
            goto out; /* another Mapping, maybe: leave the isinstance test to LogRecord */
        }
    }
    /* LogRecord.created: time.time() (3.11/3.12) or time_ns() / 1e9 (3.13): the same double */
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    long long ns = (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
    double created = ns % 1000000000LL == 0 ? (double)(ns / 1000000000LL) : (double)ns / 1e9;
    text = get_message(msg, fargs);
    if (!text)
        goto out;
    r = handler_write(handler, created, levelname, name, text);
    ok = r == 1;
out:
    clear_exc(); /* any error: the stdlib path makes the record and reports it as logging does */
    Py_XDECREF(handler);
    Py_XDECREF(c);
    Py_XDECREF(factory);
    Py_XDECREF(names);
    Py_XDECREF(levelname);
    Py_XDECREF(name);
    Py_XDECREF(text);
    Py_XDECREF(mapping);
    if (ok)
        H.direct++;
    if (reraise_kept())
        return NULL;
    return PyBool_FromLong(ok);
}

static PyObject *py_structlog_stats(PyObject *mod, PyObject *unused)
{
    (void)mod;
    (void)unused;
    return Py_BuildValue("{sKsK}", "fused", stages_fused, "fallbacks", stages_fallbacks);
}

static PyObject *py_logging_stats(PyObject *mod, PyObject *unused)
{
    (void)mod;
    (void)unused;
    return Py_BuildValue("{sKsK}", "direct", H.direct, "handled", H.records);
}

static PyMethodDef module_methods[] = {
    {"render", py_render, METH_VARARGS,
     "render(obj, default, native_types, stdlib) -> bytes as the serializer writes them, or None if not exactly"},
    {"handler_setup", py_handler_setup, METH_VARARGS,
     "handler_setup(LogsinkHandler, JsonFormatter, LogRecord, logging, resolve, failed, try_write, write)"},
    {"logger_log", (PyCFunction)(void (*)(void))py_logger_log, METH_FASTCALL,
     "logger_log(logger, level, msg, args) -> bool: Logger._log without a LogRecord when nothing could tell"},
    {"logging_stats", py_logging_stats, METH_NOARGS, "records the C paths of logsink.logging took"},
    {"structlog_stats", py_structlog_stats, METH_NOARGS, "events every Stage fused or handed to Python"},
    {"iso_utc", py_iso_utc, METH_VARARGS, "iso_utc(sec, usec) -> str: TimeStamper(fmt='iso', utc=True)'s text"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, .m_name = "logsink._fastlog", .m_doc = "structlog's default logsink pipeline in C",
    .m_size = -1, .m_methods = module_methods,
};

#define INTERN(var, text)                                                                                              \
    do {                                                                                                               \
        if (!(var = PyUnicode_InternFromString(text)))                                                                 \
            return NULL;                                                                                               \
    } while (0)

PyMODINIT_FUNC PyInit__fastlog(void)
{
    INTERN(s_context, "_context");
    INTERN(s_processors, "_processors");
    INTERN(s_logger, "_logger");
    INTERN(s_client, "_client");
    INTERN(s_p, "_p");
    INTERN(s_msg, "msg");
    INTERN(s_level, "level");
    INTERN(s_timestamp, "timestamp");
    INTERN(s_event, "event");
    INTERN(s_stack_info, "stack_info");
    INTERN(s_exc_info, "exc_info");
    INTERN(s_name, "name");
    INTERN(s_proxy, "_proxy_to_logger");
    INTERN(s_prefix, "structlog_");
    INTERN(s_warning, "warning");
    INTERN(s_error, "error");
    INTERN(s_warn, "warn");
    INTERN(s_exception, "exception");
    INTERN(s_filters, "filters");
    INTERN(s_formatter, "formatter");
    INTERN(s_extra_fields, "extra_fields");
    INTERN(s_created, "created");
    INTERN(s_levelname, "levelname");
    INTERN(s_msg_attr, "msg");
    INTERN(s_args, "args");
    INTERN(s_exc_info_attr, "exc_info");
    INTERN(s_exc_text, "exc_text");
    INTERN(s_stack_info_attr, "stack_info");
    INTERN(s_client_attr, "client");
    INTERN(s_emit, "_handle_slow");
    INTERN(s_disabled, "disabled");
    INTERN(s_handlers, "handlers");
    INTERN(s_propagate, "propagate");
    INTERN(s_parent, "parent");
    INTERN(s_level_attr, "level");
    INTERN(s_factory, "_logRecordFactory");
    INTERN(s_level_to_name, "_levelToName");
    if (PyType_Ready(&StageType) < 0 || PyType_Ready(&LevelMethodType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (!m)
        return NULL;
    /* handler_handle binds like a Python function (instancemethod): a class attribute that is a
     * method of the instance, with no Python frame in between. */
    static PyMethodDef handle_def = {"handle", (PyCFunction)(void (*)(void))py_handler_handle, METH_FASTCALL,
                                     "LogsinkHandler.handle(record) in C (see logsink.logging)"};
    PyObject *fn = PyCFunction_New(&handle_def, NULL);
    PyObject *im = fn ? PyInstanceMethod_New(fn) : NULL;
    Py_XDECREF(fn);
    if (!im || PyModule_AddObjectRef(m, "Stage", (PyObject *)&StageType) < 0 || PyModule_AddObject(m, "handler_handle", im) < 0) {
        Py_XDECREF(im);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
