"""Progress tasks and event channels, kept in events.db so that any process can follow them.

Why a database and not a socket: the daemon may not be running when a
script starts, a reader may start after the event it wants, and several
readers may follow at once. A WAL database gives all three, and the writer
never waits for a slow reader (DESIGN §2, §7).

Channels and their payloads (one JSON object each; docs/daemon.md):

``zones``       which fields of which document changed::

                {"path", "doc_id", "kind", "fields": [...], "origin": "local|remote|merge", "seq"}

``processing``  a document's sync status::

                {"path", "status": "queued|syncing|synced|conflict", "op", "origin", "detail"}

``progress``    long work with a total and a current count::

                {"task", "kind": "scan|hash|upload|download|merge", "title", "current", "total",
                 "state": "running|done|failed"}

``log``         what a person watching the daemon should know (rescans, lost events,
                offline/online, pause)::

                {"level": "info|warning|error", "code", "message"}

Updates are optimised as in the seed's RealtimeSystem: coalesced per target
(one event per path per batch; the last status wins, field lists merge),
redundant ones dropped, written in one transaction per batch, and progress
throttled per task.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from syncengine.journal import EventLog
from syncengine.models import TaskInfo

if TYPE_CHECKING:
    from syncengine.reports import Event

CHANNELS = ("zones", "processing", "progress", "log")
STATUSES = ("queued", "syncing", "synced", "conflict")
TASK_KINDS = ("scan", "hash", "upload", "download", "merge")
THROTTLE = 0.1  # seconds between two progress events of one task (first and last always go out)
_STAGE_KIND = {"push": "upload", "pull": "download", "apply": "merge"}  # sync.py's stage names -> task kinds


def _iso(ns: int) -> str:
    from syncengine.history import iso

    return iso(ns) or ""


# ---------------------------------------------------------------- payloads


def zones_payload(path: str, fields: Iterable[str], *, origin: str, doc_id: str | None = None,
                  kind: str | None = None, seq: int | None = None) -> dict[str, Any]:
    """A ``zones`` event: ``fields`` are field paths in docs/formats.md notation ("$" = whole)."""
    return {"path": path, "doc_id": doc_id, "kind": kind, "fields": list(fields), "origin": origin, "seq": seq}


def processing_payload(path: str, status: str, *, op: str | None = None, origin: str | None = None,
                       detail: str | None = None) -> dict[str, Any]:
    """A ``processing`` event: where one document stands on its way to the server."""
    if status not in STATUSES:
        raise ValueError(f"unknown status {status!r}")
    return {"path": path, "status": status, "op": op, "origin": origin, "detail": detail}


def log_payload(level: str, code: str, message: str) -> dict[str, Any]:
    return {"level": level, "code": code, "message": message}


def coalesce(channel: str, payloads: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One payload per target, in first-seen order: later statuses win, zone field lists merge."""
    if channel not in ("zones", "processing"):
        return list(payloads)
    out: dict[str, dict[str, Any]] = {}
    for payload in payloads:
        key = payload["path"]
        if channel == "zones" and key in out:
            merged = dict(payload)
            merged["fields"] = list(dict.fromkeys([*out[key]["fields"], *payload["fields"]]))
            out[key] = merged
        else:
            out[key] = payload
    return list(out.values())


def publish(events: EventLog, channel: str, payloads: Iterable[dict[str, Any]]) -> None:
    """Coalesce, then write one channel's events in one transaction."""
    if channel not in CHANNELS:
        raise ValueError(f"unknown channel {channel!r} (one of {', '.join(CHANNELS)})")
    events.publish(channel, coalesce(channel, payloads))


# ---------------------------------------------------------------- tasks


class Task:
    """A unit of long work: a ``task`` row other processes read, plus throttled ``progress`` events."""

    def __init__(self, events: EventLog, kind: str, title: str, total: int | None = None,
                 throttle: float = THROTTLE) -> None:
        self.events = events
        self.kind = kind
        self.title = title
        self.total = total
        self.current = 0
        self.throttle = throttle
        self.id = events.start_task(kind, title, total)
        self._last = 0.0
        self._emit("running")

    def update(self, current: int, total: int | None = None) -> None:
        """Record progress; rows and events are written at most every ``throttle`` seconds."""
        self.current = current
        if total is not None:
            self.total = total
        now = time.monotonic()
        if now - self._last < self.throttle and current != self.total:
            return
        self.events.update_task(self.id, current=current, total=self.total)
        self._emit("running")

    def finish(self, state: str = "done") -> None:
        self.events.update_task(self.id, current=self.current, total=self.total, state=state)
        self._emit(state)

    def _emit(self, state: str) -> None:
        self._last = time.monotonic()
        self.events.publish("progress", [{"task": self.id, "kind": self.kind, "title": self.title,
                                          "current": self.current, "total": self.total, "state": state}])

    def __enter__(self) -> Task:
        return self

    def __exit__(self, exc_type, *_exc: object) -> None:
        self.finish("failed" if exc_type else "done")


class SyncProgress:
    """The ``progress(stage, current, total)`` callback sync rounds take, as tasks.

    Each stage (push -> upload, download, merge, ...) becomes one task, so
    `syncengine status` and `events --channel progress` show it from
    another terminal.
    """

    def __init__(self, events: EventLog) -> None:
        self.events = events
        self.tasks: dict[str, Task] = {}

    def __call__(self, stage: str, current: int, total: int | None) -> None:
        kind = _STAGE_KIND.get(stage, stage)
        task = self.tasks.get(kind)
        if task is None:
            if not total:
                return  # nothing to do in this stage: no task worth showing
            task = self.tasks[kind] = Task(self.events, kind, f"{kind} {total} item(s)", total)
        task.update(current, total)

    def close(self, failed: bool = False) -> None:
        for task in self.tasks.values():
            task.finish("failed" if failed else "done")
        self.tasks.clear()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def running_tasks(events: EventLog) -> list[TaskInfo]:
    """Tasks still running, leaving out those whose process died (a killed daemon's)."""
    out = []
    for tid, kind, title, total, current, state, pid, started, updated in events.tasks(running_only=True):
        if _alive(pid):
            out.append(TaskInfo(tid, kind, title, total, current, state, pid, _iso(started), _iso(updated)))
    return out


def fail_orphaned_tasks(events: EventLog) -> int:
    """Mark 'running' tasks of dead processes as failed (run when a daemon starts)."""
    count = 0
    for row in events.tasks(running_only=True):
        if not _alive(row[6]):
            events.update_task(row[0], state="failed")
            count += 1
    return count


# ---------------------------------------------------------------- reading


def to_event(row: tuple) -> Event:
    import json

    from syncengine.reports import Event  # not at import: `status` reads running tasks, never events

    eid, at, channel, payload = row
    return Event(eid, _iso(at), channel, json.loads(payload))


def recent(events: EventLog, limit: int = 20, channels: str | Iterable[str] | None = None) -> list[Event]:
    """The last ``limit`` events (oldest first), optionally of some channels only."""
    if limit <= 0:
        return []
    return [to_event(r) for r in events.latest(limit, _channels(channels))]


def _channels(channels: str | Iterable[str] | None) -> tuple[str, ...]:
    if channels is None or channels in ("*", "all"):
        return ()
    if isinstance(channels, str):
        channels = (channels,)
    wanted = tuple(channels)
    for name in wanted:
        if name not in CHANNELS:
            raise ValueError(f"unknown channel {name!r} (one of {', '.join(CHANNELS)})")
    return wanted


class Subscription:
    """Follow events.db: iterate (blocking) or get a callback per event in a thread.

    ``after`` is an event id; None starts after the newest event at the time
    of the call, so a subscriber sees everything published after it. Polling a WAL database every
    ``poll`` seconds costs one indexed query; the writer never waits for us.
    """

    def __init__(self, path: Path, channels: str | Iterable[str] | None = None, *, after: int | None = None,
                 poll: float = 0.05, callback: Callable[[Event], Any] | None = None) -> None:
        self.path = path
        self.channels = _channels(channels)
        self.after = after
        self.poll = poll
        if after is None:
            # "From now on" means from this call, not from the first poll: an event published
            # right after subscribe() returns must not be missed (the callback thread starts late).
            log = EventLog(path)
            try:
                self.after = log.last_id()
            finally:
                log.close()
        self._stop = threading.Event()
        self._buffer: list[Event] = []
        self._log: EventLog | None = None
        self._thread: threading.Thread | None = None
        if callback is not None:
            self._thread = threading.Thread(target=self._pump, args=(callback,), name="syncengine-subscriber",
                                            daemon=True)
            self._thread.start()

    def _pump(self, callback: Callable[[Event], Any]) -> None:
        try:
            for event in self:
                callback(event)
        finally:
            self._close_log()

    def _fetch(self) -> list[Event]:
        if self._log is None:
            self._log = EventLog(self.path)
        rows = self._log.read(self.after, self.channels, limit=500)
        if rows:
            self.after = rows[-1][0]
        return [to_event(r) for r in rows]

    def get(self, timeout: float | None = None) -> Event | None:
        """The next event, or None after ``timeout`` seconds (or once closed)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._buffer:
            if self._stop.is_set():
                return None
            self._buffer = self._fetch()
            if self._buffer:
                break
            if deadline is not None and time.monotonic() >= deadline:
                return None
            self._stop.wait(self.poll)
        return self._buffer.pop(0)

    def __iter__(self) -> Iterator[Event]:
        while True:
            event = self.get()
            if event is None:
                return
            yield event

    def close(self) -> None:
        """Stop following; a callback thread is joined."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(5)
        elif self._thread is None:
            self._close_log()

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
