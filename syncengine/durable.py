"""Making many small writes durable at once: one ``syncfs`` instead of an fsync each.

An fsync costs about the same whatever the size of the file (a round trip
to the disk), so a first sync that kept 10,000 small files spent most of
its time waiting on 10,000 of them. On Linux one ``syncfs(2)`` on a
descriptor in the file system writes back every dirty page of that file
system in a single pass: measured here, 100 small files written then made
durable with ``syncfs`` took 8–17 ms against 30–37 ms for an fsync each
(docs/performance.md).

Use: open a :class:`Batch` *before* writing the batch's files, write them
(no fsync), ``sync()`` them, rename them, ``sync()`` the folders, then
commit what names them (DESIGN §4 rule 3). The descriptor is opened first
because ``syncfs`` reports a write-back error (EIO, ENOSPC; Linux 5.8 and
later) only if it happened after its descriptor was opened: an error the
kernel's own flusher met on one of our files in between is then still ours.

``syncfs`` also writes back what other programs left dirty on the same file
system. A batch of a handful of files, or a file system whose other writers
make that slow, is better served by fsyncs: ``SYNCENGINE_DURABILITY=fsync``
forces them. Where ``syncfs`` does not exist (not Linux, no libc, a kernel
or sandbox that refuses it) they are the fallback, as they are for any file
that lives on another file system than the batch's anchor (a mount inside
the workspace).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import sys
from collections.abc import Iterable
from types import TracebackType

ENV = "SYNCENGINE_DURABILITY"
# Below this many files the fsyncs cost about what one syncfs does, and they
# never wait on another program's dirty pages.
MIN_BATCH = 4
PathLike = str | os.PathLike[str]

_syncfs: list = []  # resolved once: [function] or [None]


def _libc_syncfs():  # a ctypes function, or None
    if not _syncfs:
        func = None
        if sys.platform.startswith("linux"):
            with contextlib.suppress(OSError, AttributeError):
                libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
                func = libc.syncfs
                func.argtypes = [ctypes.c_int]
                func.restype = ctypes.c_int
        _syncfs.append(func)
    return _syncfs[0]


def syncfs_available() -> bool:
    """Whether a :class:`Batch` of enough files is made durable with one ``syncfs``."""
    return os.environ.get(ENV, "").lower() != "fsync" and _libc_syncfs() is not None


def fsync_path(path: PathLike) -> None:
    """fsync one file or folder by name (the fallback, and the folders of a rename)."""
    flags = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)
    if os.path.isdir(path):
        flags |= getattr(os, "O_DIRECTORY", 0)
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Batch:
    """One batch of writes made durable together; open it before the first write."""

    def __init__(self, anchor: PathLike) -> None:
        self.anchor = os.fspath(anchor)
        self.fd: int | None = None
        if syncfs_available():
            self.fd = os.open(self.anchor, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            self.dev = os.fstat(self.fd).st_dev

    def __enter__(self) -> Batch:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def sync(self, paths: Iterable[PathLike]) -> None:
        """Make these files (or folders: their renames) durable; raises OSError if the write-back failed.

        The files must be closed already: what is still buffered in a
        Python file object is not the kernel's to write back.
        """
        todo = list(paths)
        if self.fd is not None and len(todo) >= MIN_BATCH:
            elsewhere = [path for path in todo if os.stat(path).st_dev != self.dev]
            if self._syncfs():
                todo = elsewhere
        for path in todo:
            fsync_path(path)

    def _syncfs(self) -> bool:
        func = _libc_syncfs()
        if func is None or self.fd is None:
            return False
        if func(self.fd) == 0:
            return True
        err = ctypes.get_errno()
        if err in (0, errno.ENOSYS, errno.EPERM):  # a kernel without it, or a sandbox that refuses it
            return False
        raise OSError(err, os.strerror(err), self.anchor)

