/* ls_render.h - render a log record as a JSON line straight into an arena segment.
 *
 * For logsink.logging.LogsinkHandler's default format: the record goes from Python strings to
 * the bytes the daemon splices, with no intermediate str/bytes objects. The output is
 * byte-identical to logsink.logging.JsonFormatter (the tests compare them).
 */
#ifndef LS_RENDER_H
#define LS_RENDER_H

#include <stddef.h>

/* {"timestamp":"TS","level":"LEVEL","logger":"LOGGER","message":"MSG"[,"exception":"EXC"]}\n
 * into dst (cap bytes). Strings are UTF-8, escaped as JSON requires (\" \\ \b \f \n \r \t, other
 * control bytes as \u00XX; everything else as is, like json.dumps(ensure_ascii=False)).
 * exc may be NULL. Returns the bytes written, or 0 if the record does not fit (dst holds no
 * partial record that counts). Worst case: 6 bytes per input byte plus 96. */
size_t ls_render_log_json(char *dst, size_t cap, const char *ts, size_t ts_len, const char *level, size_t level_len,
                          const char *logger, size_t logger_len, const char *msg, size_t msg_len, const char *exc,
                          size_t exc_len);

#endif
