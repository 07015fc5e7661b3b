"""events.db: progress tasks and live events, readable by any process.

Kept apart from journal.db with ``synchronous=NORMAL``: losing the last
progress tick in a power cut is harmless, and a chatty progress bar must
never slow the journal down.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

from syncengine.journal.db import migrate, open_sqlite, translate
from syncengine.journal.orm import pw
from syncengine.journal.tables import make_event_models

KEEP_EVENTS = 20_000  # pruned beyond this many, oldest first
KEEP_TASK_SECONDS = 3600


def _migration_1(db: pw.Database) -> None:
    db.create_tables(make_event_models(db).all)


MIGRATIONS = [_migration_1]


class EventLog:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.db = open_sqlite(path, synchronous="NORMAL")
        migrate(self.db, MIGRATIONS, path)
        self.m = make_event_models(self.db)
        self._lock = threading.Lock()
        self._since_prune = 0

    def close(self) -> None:
        if not self.db.is_closed():
            self.db.close()

    # ------------------------------------------------------------ events

    def publish(self, channel: str, payloads: list[dict[str, Any]]) -> None:
        """Append events on one channel in one transaction."""
        if not payloads:
            return
        at = time.time_ns()
        rows = [{"at": at, "channel": channel, "payload": json.dumps(p, sort_keys=True)} for p in payloads]
        with translate(self.path), self._lock, self.db.atomic("IMMEDIATE"):
            self.m.Event.insert_many(rows).execute()
        self._since_prune += len(rows)
        if self._since_prune > 1000:
            self.prune()

    def read(self, after_id: int = 0, channels: tuple[str, ...] = (), limit: int = 1000) -> list[tuple]:
        """(id, at, channel, payload-json) after ``after_id``, oldest first."""
        E = self.m.Event
        query = E.select(E.id, E.at, E.channel, E.payload).where(E.id > after_id)
        if channels:
            query = query.where(E.channel.in_(channels))
        with translate(self.path):
            return list(query.order_by(E.id).limit(limit).tuples())

    def latest(self, limit: int, channels: tuple[str, ...] = ()) -> list[tuple]:
        """The newest ``limit`` events as (id, at, channel, payload-json), oldest first."""
        E = self.m.Event
        query = E.select(E.id, E.at, E.channel, E.payload)
        if channels:
            query = query.where(E.channel.in_(channels))
        with translate(self.path):
            return list(reversed(query.order_by(E.id.desc()).limit(limit).tuples()))

    def last_id(self) -> int:
        E = self.m.Event
        with translate(self.path):
            return E.select(pw.fn.MAX(E.id)).scalar() or 0

    def prune(self) -> None:
        E, T = self.m.Event, self.m.Task
        self._since_prune = 0
        with translate(self.path), self._lock, self.db.atomic("IMMEDIATE"):
            cutoff = (E.select(pw.fn.MAX(E.id)).scalar() or 0) - KEEP_EVENTS
            if cutoff > 0:
                E.delete().where(E.id <= cutoff).execute()
            old = time.time_ns() - KEEP_TASK_SECONDS * 1_000_000_000
            T.delete().where((T.state != "running") & (T.updated_at < old)).execute()

    # ------------------------------------------------------------ tasks

    def start_task(self, kind: str, title: str, total: int | None) -> int:
        now = time.time_ns()
        with translate(self.path), self._lock, self.db.atomic("IMMEDIATE"):
            return self.m.Task.insert(kind=kind, title=title, total=total, current=0, state="running",
                                      pid=os.getpid(), started_at=now, updated_at=now).execute()

    def update_task(self, task_id: int, *, current: int | None = None, total: int | None = None,
                    state: str | None = None) -> None:
        values: dict[str, Any] = {"updated_at": time.time_ns()}
        if current is not None:
            values["current"] = current
        if total is not None:
            values["total"] = total
        if state is not None:
            values["state"] = state
        T = self.m.Task
        with translate(self.path), self._lock, self.db.atomic("IMMEDIATE"):
            T.update(**values).where(T.id == task_id).execute()

    def tasks(self, running_only: bool = True) -> list[tuple]:
        """(id, kind, title, total, current, state, pid, started_at, updated_at)."""
        T = self.m.Task
        query = T.select(T.id, T.kind, T.title, T.total, T.current, T.state, T.pid, T.started_at, T.updated_at)
        if running_only:
            query = query.where(T.state == "running")
        with translate(self.path):
            return list(query.order_by(T.id).tuples())
