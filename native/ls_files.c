/* ls_files.c - the daemon's own files: opened beneath its directory fd, never through a link
 * (see ls_files.h for the contract). The daemon runs as root and writes into a directory other
 * users may be able to plant names in; everything here refuses what it did not expect. */
#define _GNU_SOURCE
#include "ls_files.h"

#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <unistd.h>

#ifndef SYS_openat2
#define SYS_openat2 437
#endif
#ifndef RESOLVE_NO_SYMLINKS
#define RESOLVE_NO_SYMLINKS 0x04
#endif
#ifndef RESOLVE_BENEATH
#define RESOLVE_BENEATH 0x08
#endif

struct ls_open_how { /* struct open_how (linux/openat2.h), spelled out for old headers */
    uint64_t flags;
    uint64_t mode;
    uint64_t resolve;
};

static int openat2_unsupported; /* set once the kernel said ENOSYS; a race sets it twice, harmlessly */

/* One open attempt: >= 0 or -errno. */
static int open_once(int dirfd, const char *path, int flags, int mode)
{
    if (!openat2_unsupported) {
        struct ls_open_how how = {
            .flags = (uint64_t)flags,
            .mode = (flags & O_CREAT) ? (uint64_t)mode : 0,
            .resolve = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS,
        };
        long fd = syscall(SYS_openat2, dirfd, path, &how, sizeof how);
        if (fd >= 0)
            return (int)fd;
        if (errno != ENOSYS)
            return -errno;
        openat2_unsupported = 1;
    }
    /* Fallback: O_NOFOLLOW guards only the last component. That is enough here because the daemon
     * passes only single names (stream names cannot contain '/', nor be '.' or '..') or names of
     * directories it opened the same way, one component at a time. */
    if (strchr(path, '/'))
        return -EXDEV;
    int fd = openat(dirfd, path, flags | O_NOFOLLOW, mode);
    return fd >= 0 ? fd : -errno;
}

int ls_open_beneath(int dirfd, const char *path, int flags, int mode)
{
    if (flags & O_TRUNC)
        return -EINVAL;
    int want_dir = (flags & O_DIRECTORY) != 0;
    /* O_NONBLOCK: a planted FIFO must not block the open; O_NOCTTY: a planted tty must not become
     * ours. O_NOFOLLOW also on openat2: a symlink as last component gives ELOOP on both paths. */
    int base = flags | O_CLOEXEC | O_NOCTTY | O_NONBLOCK | O_NOFOLLOW;
    int fd;
    if (flags & O_CREAT) {
        /* Create exclusively so we know whether to fchmod (only files we create get our mode). */
        for (int tries = 0;; tries++) {
            fd = open_once(dirfd, path, base | O_EXCL, mode);
            if (fd >= 0) {
                if (fchmod(fd, (mode_t)mode) < 0) {
                    int err = -errno;
                    close(fd);
                    return err;
                }
                break;
            }
            if (fd != -EEXIST || (flags & O_EXCL))
                return fd;
            fd = open_once(dirfd, path, base & ~O_CREAT, 0);
            if (fd != -ENOENT || tries >= 8) /* ENOENT: removed between the two opens; try again */
                break;
        }
        if (fd < 0)
            return fd;
    } else {
        fd = open_once(dirfd, path, base, 0);
        if (fd == -ENOTDIR && want_dir) { /* O_DIRECTORY|O_NOFOLLOW on a link says ENOTDIR: say link */
            struct stat lst;
            if (fstatat(dirfd, path, &lst, AT_SYMLINK_NOFOLLOW) == 0 && S_ISLNK(lst.st_mode))
                fd = -ELOOP;
        }
        if (fd < 0)
            return fd;
    }
    struct stat st;
    int err = 0;
    if (fstat(fd, &st) < 0)
        err = -errno;
    else if (want_dir && !S_ISDIR(st.st_mode))
        err = -ENOTDIR;
    else if (!want_dir && S_ISDIR(st.st_mode))
        err = -EISDIR;
    else if (!want_dir && !S_ISREG(st.st_mode))
        err = -ENXIO;
    else if (!want_dir && st.st_nlink > 1)
        err = -EMLINK; /* a hard link planted to a file elsewhere: writing it writes there */
    if (!err && !(flags & O_NONBLOCK)) {
        int fl = fcntl(fd, F_GETFL);
        if (fl < 0 || fcntl(fd, F_SETFL, fl & ~O_NONBLOCK) < 0)
            err = -errno;
    }
    if (err) {
        close(fd);
        return err;
    }
    return fd;
}

int64_t ls_repair_tail(int fd, uint64_t *size)
{
    struct stat st;
    if (fstat(fd, &st) < 0)
        return -errno;
    off_t end = st.st_size, pos = end;
    char buf[65536];
    while (pos > 0) {
        size_t n = pos < (off_t)sizeof buf ? (size_t)pos : sizeof buf;
        ssize_t r = pread(fd, buf, n, pos - (off_t)n);
        if (r < 0)
            return -errno;
        if ((size_t)r != n)
            return -EIO;
        for (ssize_t i = r - 1; i >= 0; i--) {
            if (buf[i] == '\n') {
                off_t keep = pos - (off_t)n + i + 1;
                if (keep != end && ftruncate(fd, keep) < 0)
                    return -errno;
                *size = (uint64_t)keep;
                return end - keep;
            }
        }
        pos -= (off_t)n;
    }
    if (end > 0 && ftruncate(fd, 0) < 0)
        return -errno;
    *size = 0;
    return end;
}

/* Copy len bytes of fd from src down to dst < src (no user-space copy where the kernel can). */
static int move_down(int fd, uint64_t src, uint64_t dst, uint64_t len)
{
    uint64_t gap = src - dst;
    while (len) {
        size_t n = len < gap ? (size_t)len : (size_t)gap; /* ranges never overlap */
        if (n > (1u << 30))
            n = 1u << 30;
        loff_t in = (loff_t)src, out = (loff_t)dst;
        ssize_t r = copy_file_range(fd, &in, fd, &out, n, 0);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0) { /* no copy_file_range here: a bounce buffer (a rare repair, not the data path) */
            char buf[65536];
            size_t m = n < sizeof buf ? n : sizeof buf;
            ssize_t got = pread(fd, buf, m, (off_t)src);
            if (got <= 0)
                return got < 0 ? -errno : -EIO;
            ssize_t put = pwrite(fd, buf, (size_t)got, (off_t)dst);
            if (put < 0)
                return -errno;
            r = put;
        }
        src += (uint64_t)r;
        dst += (uint64_t)r;
        len -= (uint64_t)r;
    }
    return 0;
}

int64_t ls_close_truncation_hole(int fd, uint64_t start, uint64_t len, uint64_t *new_start)
{
    *new_start = start;
    char c;
    if (start == 0 || pread(fd, &c, 1, (off_t)(start - 1)) != 1 || c != '\0')
        return 0; /* whole (or cut again since: the next batch's fstat finds the new end) */
    /* Where does the real data end? Before the first hole, and before the run of NULs ending at
     * the batch (the block that holds the new end is allocated and zero-filled past it). */
    uint64_t end = start;
    off_t h = lseek(fd, 0, SEEK_HOLE);
    if (h >= 0 && (uint64_t)h < end)
        end = (uint64_t)h;
    char buf[65536];
    uint64_t t = 0;
    while (end > 0) {
        size_t n = end < sizeof buf ? (size_t)end : sizeof buf;
        ssize_t r = pread(fd, buf, n, (off_t)(end - n));
        if (r != (ssize_t)n)
            return r < 0 ? -errno : -EIO;
        ssize_t i = (ssize_t)n - 1;
        while (i >= 0 && buf[i] != '\n')
            i--; /* data before the hole must end in a whole line too: a cut one goes */
        if (i >= 0) {
            t = end - n + (uint64_t)i + 1;
            break;
        }
        end -= n;
    }
    int r = move_down(fd, start, t, len);
    if (r == 0 && ftruncate(fd, (off_t)(t + len)) < 0)
        r = -errno;
    *new_start = t; /* on failure the caller cuts back to here: the hole goes with the batch */
    return r < 0 ? r : (int64_t)(start - t);
}

int ls_ends_in_newline(int fd, uint64_t end)
{
    char last;
    ssize_t n = pread(fd, &last, 1, (off_t)(end - 1));
    if (n < 0)
        return -errno;
    return n == 0 || last == '\n';
}
