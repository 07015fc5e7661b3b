"""Inter-process locks on files (flock): released by the kernel when a process dies.

That is the point over pid files: a sync killed with SIGKILL never leaves a
stale lock behind (RELIABILITY §2 rule 10).
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

from syncengine.errors import BusyError


class FileLock:
    def __init__(self, path: Path, what: str = "workspace") -> None:
        self.path = path
        self.what = what
        self._fd: int | None = None
        self._depth = 0

    def acquire(self, timeout: float = 30.0) -> FileLock:
        """Wait up to ``timeout`` seconds; BusyError (exit 7) after that."""
        if self._fd is not None:
            self._depth += 1
            return self
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        deadline = time.monotonic() + timeout
        delay = 0.01
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(fd)
                    raise BusyError(
                        f"another process holds the {self.what} lock",
                        hint=f"waited {timeout:g}s; retry later or pass a longer --wait",
                    )
                time.sleep(delay)
                delay = min(delay * 2, 0.2)
        self._fd = fd
        self._depth = 1
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        self._depth -= 1
        if self._depth > 0:
            return
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> FileLock:
        # Use as `with lock.acquire(timeout):` — acquire() already took it.
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def is_locked(path: Path) -> bool:
    """True when some process holds the lock (for status displays)."""
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)
