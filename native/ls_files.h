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

/* The engine wrote bytes [start, start+len) of fd, but logrotate's copytruncate (or `: > file`)
 * cut the file between the engine's fstat and that write, so the bytes landed past the new end
 * behind a hole that reads as NULs. The byte before a batch is the '\n' that ended the one before;
 * a NUL there means exactly this: move the bytes down to just after the file's last whole line
 * (copy_file_range) and cut the file after them. Returns the bytes of hole closed (0: no hole) or
 * -errno; *new_start gets where the bytes start now (on error: where to cut back to). */
int64_t ls_close_truncation_hole(int fd, uint64_t start, uint64_t len, uint64_t *new_start);

/* 1 if the byte at end-1 is '\n', 0 if not, -errno if it could not be read. One byte from the page
 * cache; a file cut shorter meanwhile (copytruncate) cannot be checked and counts as 1. */
int ls_ends_in_newline(int fd, uint64_t end);

#endif
