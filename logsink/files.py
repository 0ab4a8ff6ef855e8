"""The daemon's own files and directories: opened beneath a directory fd, never through a link, with explicit modes.

The daemon usually runs as root and writes into a directory where others may plant names (a
symlink to /etc/shadow, a FIFO, a hard link to someone's file). Every file it creates or writes
under --dir or the state dir goes through :func:`open_beneath` (native/ls_files.c: openat2 with
RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS), which refuses anything but a regular file with one link.
The configured directories themselves are the admin's choice and are opened as given.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat

from logsink._native import lib

LOCK_NAME = ".logsink.lock"


class FileRefused(OSError):
    """A name in the daemon's directory that logsink will not open; the message says why and what to do."""

    def __str__(self) -> str:
        return str(self.strerror)


def _kind(dirfd: int, name: str) -> str:
    try:
        mode = os.stat(name, dir_fd=dirfd, follow_symlinks=False).st_mode
    except OSError:
        return "special file"
    for test, what in ((stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device")):
        if test(mode):
            return what
    return "special file"


def _refusal(err: int, dirfd: int, name: str, where: str) -> OSError:
    if err == errno.ELOOP:
        return FileRefused(err, f"{where} is a symlink: logsink never follows links in its directory; remove it")
    if err == errno.EXDEV:
        return FileRefused(err, f"{where} leads outside its directory: logsink opens only names beneath it")
    if err == errno.EISDIR:
        return FileRefused(err, f"{where} is a directory, not a regular file: remove or rename it")
    if err == errno.ENOTDIR:
        return FileRefused(err, f"{where} is not a directory: remove or rename it")
    if err == errno.ENXIO:
        return FileRefused(err, f"{where} is not a regular file (it is a {_kind(dirfd, name)}): remove it")
    if err == errno.EMLINK:
        links: int | str
        try:
            links = os.stat(name, dir_fd=dirfd, follow_symlinks=False).st_nlink
        except OSError:
            links = "several"
        return FileRefused(err, f"{where} has {links} hard links: it may be a link to a file elsewhere, so logsink "
                                "will not write it; remove the extra links (or the file)")
    return OSError(err, f"cannot open {where}: {os.strerror(err)}", where)


def open_beneath(dirfd: int, name: str, flags: int, mode: int = 0, where: str | None = None) -> int:
    """``ls_open_beneath`` as an fd or an OSError (FileRefused for names logsink will not open).

    ``where`` is the path to show in messages (defaults to ``name``). O_TRUNC is not allowed: use
    os.ftruncate on the fd, after the checks."""
    fd = lib.ls_open_beneath(dirfd, name.encode(), flags, mode)
    if fd < 0:
        raise _refusal(-fd, dirfd, name, where or name)
    return fd


def make_dirs(path: str, mode: int) -> None:
    """Create ``path`` and missing parents; each directory created here gets exactly ``mode``."""
    path = os.path.abspath(path)
    missing = []
    while not os.path.isdir(path):
        missing.append(path)
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    for p in reversed(missing):
        try:
            os.mkdir(p, 0o700)  # private until chmod: the umask has no say either way
        except FileExistsError:
            if not os.path.isdir(p):
                raise OSError(errno.ENOTDIR, f"{p} exists and is not a directory", p) from None
            continue
        os.chmod(p, mode)


def open_dir(path: str) -> int:
    """An O_PATH-like fd for a configured directory (the admin's path: links in it are followed)."""
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)


def dir_beneath(dirfd: int, name: str, mode: int, where: str) -> int:
    """Open (create with ``mode``) directory ``name`` beneath ``dirfd``, refusing a planted link or file."""
    try:
        os.mkdir(name, 0o700, dir_fd=dirfd)  # mkdirat does not follow a link in the last component
        created = True
    except FileExistsError:
        created = False
    fd = open_beneath(dirfd, name, os.O_RDONLY | os.O_DIRECTORY, where=where)
    if created:
        os.fchmod(fd, mode)
    return fd


def read_beneath(dirfd: int, name: str, where: str) -> bytes | None:
    """The contents of regular file ``name`` beneath ``dirfd``, or None if there is none."""
    try:
        fd = open_beneath(dirfd, name, os.O_RDONLY, where=where)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return None
        raise
    with os.fdopen(fd, "rb") as fh:
        return fh.read()


def replace_durably(dirfd: int, name: str, data: bytes, mode: int, where: str) -> None:
    """Replace ``name`` beneath ``dirfd`` with ``data`` so that a crash (or power loss) at any point
    leaves the old or the new contents: write a temp file, fsync it, rename it over, fsync the directory."""
    tmp = name + ".tmp"
    try:
        fd = open_beneath(dirfd, tmp, os.O_WRONLY | os.O_CREAT, mode, where=where + ".tmp")
    except FileRefused:
        # The temp name is ours alone: something planted there (a link, a FIFO) is removed, not followed.
        os.unlink(tmp, dir_fd=dirfd)
        fd = open_beneath(dirfd, tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode, where=where + ".tmp")
    try:
        os.ftruncate(fd, 0)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, name, src_dir_fd=dirfd, dst_dir_fd=dirfd)  # rename replaces a planted link, never follows it
    os.fsync(dirfd)


class DirLock:
    """``<dir>/.logsink.lock``, flock'ed for the daemon's lifetime: one daemon per directory."""

    def __init__(self, dirfd: int, dirpath: str, mode: int):
        where = os.path.join(dirpath, LOCK_NAME)
        self.fd = open_beneath(dirfd, LOCK_NAME, os.O_RDWR | os.O_CREAT, mode, where=where)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self.fd, 32, 0).decode(errors="replace").strip()
            os.close(self.fd)
            who = f" (pid {holder})" if holder.isdigit() else ""
            raise OSError(errno.EBUSY, f"another logsink daemon{who} is writing to {dirpath} (it holds {where}): two daemons on "
                                       "one directory would overwrite each other's lines; stop it or pass another --dir") from None
        except OSError:
            os.close(self.fd)
            raise
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)

    def close(self) -> None:
        os.close(self.fd)  # releases the flock; the file stays (removing it would race a new daemon's lock)
