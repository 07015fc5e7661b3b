"""Controlling a workspace's daemon from another process: start, stop, status, pause, resume.

The daemon holds an ``flock`` on ``.syncengine/daemon.pid`` for its whole
life and writes its pid there. The lock, not the file, says whether a
daemon runs: the kernel drops it when the process dies, so a pid file left
by a killed daemon is stale by construction and simply reused
(RELIABILITY §2 rule 10).

``start`` does not fork: it launches ``syncengine daemon run --detached``
as a new process in its own session. The daemon opens its databases only
in that fresh process, so no SQLite connection ever crosses a fork
(SQLite's "How To Corrupt" list), and the child reports its start-up
errors on a pipe the parent reads until the child says it is ready.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import select
import signal
import sys
import time
from pathlib import Path
from typing import Any

from syncengine.errors import BusyError, SyncEngineError
from syncengine.locks import is_locked
from syncengine.models import DaemonInfo
from syncengine.workspace import Layout

STATE_FILE = "daemon.json"
READY_TIMEOUT = 30.0


def state_path(layout: Layout) -> Path:
    return layout.state / STATE_FILE


# ---------------------------------------------------------------- the pid file


class PidFile:
    """The daemon's side: hold the lock, write the pid, release on exit."""

    def __init__(self, layout: Layout) -> None:
        self.path = layout.daemon_pid
        self.fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise BusyError naming the running daemon.

        A few retries: ``status`` in another process probes the lock for an
        instant, and that must not make a starting daemon give up.
        """
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        for attempt in range(40):
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if attempt == 39:
                    os.close(fd)
                    pid = running_pid(self.path)
                    raise BusyError(f"a daemon is already running for this workspace (pid {pid or '?'})",
                                    hint="`syncengine daemon stop` ends it")
                time.sleep(0.05)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        os.fsync(fd)
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self.fd, 0)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def running_pid(pid_path: Path) -> int | None:
    """The running daemon's pid, or None (no daemon, or a stale pid file)."""
    for _attempt in range(20):
        if not is_locked(pid_path):
            return None
        try:
            text = pid_path.read_text().strip()
        except FileNotFoundError:
            return None
        if text.isdigit():
            return int(text)
        time.sleep(0.02)  # locked but not yet written: a daemon starting up
    return None


# ---------------------------------------------------------------- state and status


def write_state(layout: Layout, state: dict[str, Any]) -> None:
    """Replace daemon.json atomically (informative only: no fsync, a crash loses nothing that matters)."""
    target = state_path(layout)
    tmp = target.with_name(f".{STATE_FILE}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(state, sort_keys=True))
    os.replace(tmp, target)


def read_state(layout: Layout) -> dict[str, Any]:
    try:
        return json.loads(state_path(layout).read_text())
    except (OSError, ValueError):
        return {}


def info(layout: Layout, *, paused: bool = False, tasks=()) -> DaemonInfo:
    """What `status` and `daemon status` show: running or not, and what it is doing."""
    pid = running_pid(layout.daemon_pid)
    state = read_state(layout) if pid else {}
    if state.get("pid") != pid:
        state = {}
    return DaemonInfo(
        running=pid is not None, pid=pid, paused=paused, tasks=tuple(tasks),
        state=state.get("state"), watcher=state.get("watcher"), live=state.get("live"),
        sync=state.get("sync"), started_at=state.get("started_at"), last_rescan_at=state.get("last_rescan_at"),
        warning=state.get("warning"), log=str(layout.daemon_log))


def stall_reason(state: dict[str, Any], oldest_pending_ns: int | None, stall_after: float,
                 now_ns: int | None = None) -> str | None:
    """Why syncing looks stalled (said loudly by `status`), from the journal's sync_state, or None.

    A guard holding and a long-unreachable server are stalls whatever the
    age of the changes; otherwise it is a stall when a local change has
    waited longer than ``stall_after`` seconds (a quiet workspace with an
    old last sync is simply up to date).
    """
    from syncengine.history import iso

    now_ns = now_ns or time.time_ns()
    limit = int(stall_after * 1e9)
    if state.get("guard"):
        return f"a safety guard is holding syncs: {state['guard']} (check, then `syncengine sync --force`)"
    since = state.get("unreachable_since")
    if since and now_ns - since > limit:
        return (f"the server has been unreachable since {iso(since)} ({_ago(now_ns - since)}); "
                f"changes stay queued")
    if oldest_pending_ns and now_ns - oldest_pending_ns > limit:
        why = f"local changes have waited {_ago(now_ns - oldest_pending_ns)} to be synced"
        why += f" (last successful sync: {iso(state.get('last_sync_at')) or 'never'})"
        if state.get("paused"):
            why += "; the daemon is paused (`syncengine daemon resume`)"
        elif state.get("last_sync_ok") is False and state.get("last_error"):
            why += f"; last error: {state['last_error']}"
        return why
    return None


def _ago(ns: int) -> str:
    seconds = ns / 1e9
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit}"
    return f"{seconds:.0f} s"


def set_paused(layout: Layout, journal, paused: bool) -> bool:
    """Hold or release the daemon's syncing (kept in the journal, so it outlives restarts); True if one runs."""
    journal.update_state(paused=paused)
    return nudge(layout)


# ---------------------------------------------------------------- start and stop


# Started through a throwaway intermediate process that exits at once, so the
# daemon is adopted by init (or the session's subreaper) and never becomes the
# zombie child of whoever started it.
_SHIM = "import os, subprocess, sys; subprocess.Popen(sys.argv[1:], start_new_session=True); os._exit(0)"


def start(root: Path, *, timeout: float = READY_TIMEOUT, extra_env: dict[str, str] | None = None) -> tuple[int, bool]:
    """Launch a detached daemon; returns (pid, already_running).

    Waits until the daemon says it is ready (it closes its stderr) or died;
    a daemon that could not start raises with the last line it printed.
    """
    import subprocess  # not at import (~0.7 ms): `status` loads this module only to read the daemon's state

    layout = Layout(Path(root).absolute())
    pid = running_pid(layout.daemon_pid)
    if pid is not None:
        return pid, True
    env = dict(os.environ, **(extra_env or {}))
    env.setdefault("PYTHONUNBUFFERED", "1")
    cmd = [sys.executable, "-m", "cli", "-C", str(layout.root), "daemon", "run", "--detached"]
    shim = subprocess.Popen([sys.executable, "-I", "-c", _SHIM, *cmd], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd="/", env=env, close_fds=True)
    assert shim.stderr is not None
    fd = shim.stderr.fileno()
    shim.wait()
    deadline = time.monotonic() + timeout
    chunks: list[bytes] = []
    while time.monotonic() < deadline:
        if select.select([fd], [], [], 0.1)[0]:
            data = os.read(fd, 65536)
            if not data:
                break  # EOF: the daemon is ready (it closed its stderr) or dead
            chunks.append(data)
    shim.stderr.close()
    message = b"".join(chunks).decode("utf-8", "replace").strip()
    got = running_pid(layout.daemon_pid)
    if got is not None:
        # Ours, or another `start` won the race (ours then said "already running").
        return got, "already running" in message
    if time.monotonic() >= deadline:
        raise SyncEngineError(f"the daemon did not get ready within {timeout:g}s", hint=f"see {layout.daemon_log}")
    line = message.splitlines()[-1] if message else "it exited without a word"
    raise SyncEngineError(f"the daemon failed to start: {line}", title="Daemon failed",
                          hint=f"see {layout.daemon_log}")


def stop(root: Path, *, timeout: float = 10.0) -> int | None:
    """Ask the daemon to stop (SIGTERM), wait, SIGKILL after ``timeout``; returns its pid or None.

    Returns once the process is gone, not merely once it let go of its lock
    (it still has threads to join and files to close after that).
    """
    layout = Layout(Path(root).absolute())
    pid = running_pid(layout.daemon_pid)
    if pid is None:
        return None
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    if not _wait(lambda: not is_locked(layout.daemon_pid) and exited(pid), deadline):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        _wait(lambda: not is_locked(layout.daemon_pid) and exited(pid), time.monotonic() + 5.0)
    return pid


def exited(pid: int) -> bool:
    """The process is gone: no such pid, or a zombie nobody reaped yet (a container's pid 1 may never)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    except OSError:  # no /proc: ask the kernel (a zombie then still counts as running)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def _wait(done, deadline: float) -> bool:
    while time.monotonic() < deadline:
        if done():
            return True
        time.sleep(0.03)
    return bool(done())


def nudge(layout: Layout) -> bool:
    """Tell a running daemon to re-read its settings now (pause/resume); False when none runs."""
    pid = running_pid(layout.daemon_pid)
    if pid is None:
        return False
    try:
        os.kill(pid, signal.SIGUSR1)
    except ProcessLookupError:
        return False
    return True
