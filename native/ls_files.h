/* ls_files.h - opening and repairing the daemon's own files beneath its directory.
 *
 * Contract: every function returns >= 0 on success or -errno on failure; errno is never the
 * channel.
 */
#ifndef LS_FILES_H
#define LS_FILES_H

#include <stdint.h>

/* Open `path` relative to the directory `dirfd` without following a symlink at any step and
 * without leaving the directory (openat2 RESOLVE_BENEATH|RESOLVE_NO_SYMLINKS; openat + O_NOFOLLOW
 * where openat2 is missing). `flags` are open(2) flags (O_CLOEXEC is always added). What may be
 * opened: with O_DIRECTORY in `flags` a directory, else a regular file with exactly one link.
 * A file this call creates (O_CREAT) gets exactly `mode` (fchmod: the umask does not apply); an
 * existing file keeps its mode. The fd is returned blocking. O_TRUNC is refused (-EINVAL): it
 * would cut a file before the checks ran; ftruncate the returned fd instead.
 * Errors that say why a file was refused: -ELOOP a symlink, -EXDEV a path leaving the directory,
 * -EISDIR a directory where a file was wanted, -ENOTDIR a file where a directory was wanted,
 * -ENXIO neither a regular file nor a directory (FIFO, socket, device), -EMLINK a regular file
 * with more than one hard link. */
int ls_open_beneath(int dirfd, const char *path, int flags, int mode);

/* If the file at fd does not end with '\n' (a crash tore its last batch), truncate it back to
 * just after its last '\n' (or to 0). Returns the bytes cut (>= 0) or -errno; *size gets the
 * resulting size. Reads only the file's tail, in C. */
int64_t ls_repair_tail(int fd, uint64_t *size);

#endif
