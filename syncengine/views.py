"""What `status` and `daemon status` show: pending changes, the last snapshot and sync, the daemon's state.

Plain values like those of :mod:`syncengine.models` (frozen dataclasses,
rendered by the CLI and by :func:`syncengine.models.to_jsonable`), kept
apart so that a scan or a sync round, which uses none of them, does not
create them: each frozen dataclass costs 0.35-1 ms of every process start.
What log, diff, restore, repair and `events` show is in
:mod:`syncengine.reports` (named here too, loaded on first use): `status`,
the most frequent of these commands, shows none of it. They are shown,
never compared whole (``eq=False``, as the reports in models).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from syncengine.lazy import forwarding

if TYPE_CHECKING:
    from syncengine.models import ConflictInfo, Op, ScanProblem, ScanReport


@dataclass(frozen=True, slots=True, eq=False)
class SnapshotInfo:
    """One snapshot as `snapshots` and `status` list it."""

    id: int
    created_at: str  # ISO 8601 UTC
    message: str | None
    trigger: str
    files: int
    bytes: int
    changed: int


@dataclass(frozen=True, slots=True, eq=False)
class PendingCounts:
    """Local changes not yet synced, by kind (the headline of `status`)."""

    created: int = 0
    modified: int = 0
    deleted: int = 0
    moved: int = 0

    @property
    def total(self) -> int:
        return self.created + self.modified + self.deleted + self.moved


@dataclass(frozen=True, slots=True, eq=False)
class PendingItem:
    """One local change not yet synced, as `status` lists it."""

    op: Op
    path: str
    old_path: str | None = None


@dataclass(frozen=True, slots=True, eq=False)
class TaskInfo:
    """A task and its progress (syncengine.progress), as `status` shows it."""

    id: int
    kind: str
    title: str
    total: int | None
    current: int
    state: str
    pid: int
    started_at: str
    updated_at: str


@dataclass(frozen=True, slots=True, eq=False)
class DaemonInfo:
    """The daemon as `status` and `daemon status` show it."""

    running: bool
    pid: int | None = None
    paused: bool = False
    tasks: tuple[TaskInfo, ...] = ()
    state: str | None = None  # starting | watching | stopping
    watcher: str | None = None  # inotify (or the OS's watcher) | polling (watch refused) | none
    live: str | None = None  # connected | connecting | offline | refused | off (no server)
    sync: str | None = None  # idle | syncing | waiting for another sync | offline | paused | guard | auth | error | off
    started_at: str | None = None
    last_rescan_at: str | None = None
    warning: str | None = None  # the last thing a person should know (lost events, stale lock, ...)
    log: str | None = None  # path of daemon.log


@dataclass(frozen=True, slots=True, eq=False)
class SyncInfo:
    """The last sync and why syncing may be stalled, from the journal (the sync part of `status`)."""

    server: str | None
    workspace: str | None
    last_sync_at: str | None
    last_sync_ok: bool | None
    last_error: str | None
    unreachable_since: str | None = None
    guard: str | None = None
    stalled: str | None = None  # why syncing looks stalled, or None


@dataclass(frozen=True, slots=True, eq=False)
class Status:
    """Everything `status` shows: a scan of pending changes, conflicts, snapshots, the last sync, the daemon."""

    root: str
    files: int
    pending: PendingCounts
    pending_paths: tuple[PendingItem, ...]
    since_snapshot: int
    conflicts: tuple[ConflictInfo, ...]
    last_snapshot: SnapshotInfo | None
    sync: SyncInfo
    scan: ScanReport
    daemon: DaemonInfo | None = None
    errors: tuple[ScanProblem, ...] = ()


# Defined in syncengine.reports; `from syncengine.views import LogEntry` still works, loading it then.
_REPORTS = frozenset({"LogEntry", "DocDiff", "RestoreReport", "RepairReport", "Event"})


__getattr__ = forwarding(globals(), dict.fromkeys(_REPORTS, "syncengine.reports"))
