"""The scan's walk, started ahead in a forked child while a fresh `sync` or `status` process imports its stack.

A fresh process spends ~95 ms importing (the HTTP client, peewee, our own
modules) on one core and then walks the workspace (~36 ms for 10,000
files) on that same core, while the other core idles. :func:`start`, called
by the CLI as soon as it knows its command and before those imports, forks
a child that walks then (:func:`syncengine.scanner.walk_ahead`); the scan
takes its result (:func:`take`) instead of walking, only if it provably is
a walk the scan could have made itself (scanner._early_reject), and walks
as usual otherwise.

Why a fork here is safe:

* the process is single-threaded (a fork copies only the calling thread,
  and another's lock would stay held in the child), has opened no SQLite
  connection and taken no file lock (the child would inherit them), has
  two or more CPUs, and no test fault is armed (their Nth-call counts are
  per process); the caller forks only from a fresh CLI process (cli.main's
  start-up), never from a test's or a daemon's;
* the child reads the stamps copy, .syncignore and the tree, and writes
  only its pipe: nothing in the workspace, nor the journal (not even
  SQLite's shared memory: it never opens the journal). It leaves with
  os._exit, dies with its parent (PR_SET_PDEATHSIG; a parent killed by a
  signal would otherwise leave it walking), and a parent that never takes
  its result (an error, an interruption, a command that does not scan)
  kills and reaps it at exit (:func:`discard`, run by atexit).

This module is imported by the CLI before the command's stack: it
imports nothing the interpreter has not loaded already, and :func:`start`
loads only the scanner (the command would), once it knows it forks.
"""

from __future__ import annotations

import atexit
import contextlib
import marshal
import os
import signal
import sys
import threading

STATE_DIR = ".syncengine"  # syncengine.paths.STATE_DIR, not imported (see above)
STAMPS_COPY = "journal.db-stamps"  # Journal.stamps_copy's name
SCANNED = "journal.db-scanned"  # its mtime: the last scan time the scanner committed (scanner._mark_scanned)
# How big the stamps copy (its size is read, not the journal) must be before the early walk pays: ~4,000
# files of the bench's short paths (76 bytes an entry), fewer with longer ones. Measured on two cores
# (medians of alternating fresh no-op syncs, with and without it): 10,000 files -28 ms, while at 2,000
# the walk (~7 ms) hardly outweighs the fork, its copy-on-write faults (~1,500 more in this process) and
# the child's ~13 ms of CPU, which a busy second core turns into a loss (+6 ms).
COPY_BYTES_MIN = 300_000
TRACE = "SYNCENGINE_TRACE_EARLY"  # set: each outcome is written to stderr (tests observe it there)
EARLY_NICE = 10  # the child's niceness, added to the parent's
SWITCH = "SYNCENGINE_EARLY"  # "0": never (to compare, or to rule it out)

_pending: tuple[int, int, str] | None = None  # the child's pid, its pipe's read end, the root it walks
outcomes: list[str] = []  # "used", or "discarded: why", one per taken or discarded walk (for tests and tracing)


def start(start_dir: str) -> bool:
    """Fork a child walking the workspace holding ``start_dir``, if it pays and is safe (see the module)."""
    global _pending
    if _pending is not None or os.environ.get(SWITCH) == "0" or not _may_fork():
        return False
    root = _find_root(start_dir)
    if root is None:
        return False
    try:
        if os.stat(os.path.join(root, STATE_DIR, STAMPS_COPY)).st_size < COPY_BYTES_MIN:
            return False
        os.stat(os.path.join(root, STATE_DIR, SCANNED))  # the child's racy bound (scanner.walk_ahead)
    except OSError:
        return False
    # Imported before the fork, so the child does not import it again: its ~16 ms of imports came on
    # top of the walk, and beside another busy process (two cores) they slowed the parent's own.
    # The command imports it anyway, later; no SQLite connection and no lock come with it.
    from syncengine import scanner

    parent = os.getpid()

    def walk() -> tuple:
        _die_with(parent)
        with contextlib.suppress(OSError):
            # Beside a busy second core, the parent's imports come first: the walk then waits
            # for them instead of slowing them, and costs about what the parent's own would.
            os.nice(EARLY_NICE)
        return scanner.walk_ahead(root)

    child = scanner._forked(walk)  # the scanner's fork-and-pipe, as its own forked walk and hashing use
    if child is None:
        return False
    pid, rfd = child
    _pending = (pid, rfd, root)
    atexit.register(discard)
    return True


def take(root: str) -> tuple | None:
    """The child's walk of ``root`` (see scanner.walk_ahead), or None: no child, another root, or it failed.

    Taken once: whatever comes back, the child is reaped and later scans walk as usual.
    """
    global _pending
    if _pending is None:
        return None
    pid, fd, walked = _pending
    if walked != root:
        discard("another root")
        return None
    _pending = None
    status: int | None = None
    data = b""
    try:
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        data = b"".join(chunks)
        status = _wait(pid)
    finally:
        os.close(fd)
        if status is None:  # interrupted while reading: the child is not wanted any more
            _kill(pid)
    if status != 0:
        note(f"discarded: the child failed (status {status})")
        return None
    try:
        out = marshal.loads(data)
    except (EOFError, ValueError, TypeError):
        out = None
    if type(out) is not tuple or len(out) != 10 or out[0] != "walk-ahead" or out[1] != root:
        note("discarded: the child sent no walk" if out is None else "discarded: the child's walk is malformed")
        return None
    return out


def discard(why: str = "not taken") -> None:
    """Kill and reap the child, if any: its walk is not wanted (an error, an exit, another root)."""
    global _pending
    if _pending is None:
        return
    pid, fd, _root = _pending
    _pending = None
    try:
        os.close(fd)
    finally:
        _kill(pid)
    note(f"discarded: {why}")


def note(outcome: str) -> None:
    outcomes.append(outcome)
    if os.environ.get(TRACE):
        sys.stderr.write(f"syncengine: early walk {outcome}\n")


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except OSError:
        pass
    _wait(pid)


def _wait(pid: int) -> int:
    try:
        return os.waitpid(pid, 0)[1]  # EINTR is retried by Python itself (PEP 475)
    except ChildProcessError:
        return -1


def _may_fork() -> bool:
    """scanner._may_fork's test, without importing fsops: the fault hooks are armed by the environment only
    in a fresh process (their in-process override is a test's)."""
    if not hasattr(os, "fork") or threading.active_count() != 1 or os.environ.get("SYNCENGINE_FSFAULT"):
        return False
    cores = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    return len(cores) > 1


def _find_root(start_dir: str) -> str | None:
    """workspace.find_root's answer as a str, or None (the scan compares it with its workspace's root)."""
    folder = os.path.abspath(start_dir)
    while True:
        state = os.path.join(folder, STATE_DIR)
        if os.path.isfile(os.path.join(state, "config.toml")) or os.path.isfile(os.path.join(state, "journal.db")):
            return folder
        parent = os.path.dirname(folder)
        if parent == folder:
            return None
        folder = parent


def _die_with(parent: int) -> None:
    """Ask Linux to kill this child when its parent dies; leave at once if it already has."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError, ImportError):
        pass  # not Linux: the walk is short, and a write to a closed pipe ends it
    if os.getppid() != parent:
        os._exit(1)
