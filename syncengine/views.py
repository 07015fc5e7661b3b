"""What the commands other than init and sync show: status, log, diff, restore, repair, the daemon's state.

Plain values like those of :mod:`syncengine.models` (frozen dataclasses,
rendered by the CLI and by :func:`syncengine.models.to_jsonable`), kept
apart so that a scan or a sync round, which uses none of them, does not
create them: each frozen dataclass costs 0.5-1 ms of every process start.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from syncengine.models import ConflictInfo, FieldChange, Kind, Op, ScanProblem, ScanReport


@dataclass(frozen=True, slots=True)
class SnapshotInfo:
    """One snapshot as `snapshots` and `status` list it."""

    id: int
    created_at: str  # ISO 8601 UTC
    message: str | None
    trigger: str
    files: int
    bytes: int
    changed: int


@dataclass(frozen=True, slots=True)
class PendingCounts:
    """Local changes not yet synced, by kind (the headline of `status`)."""

    created: int = 0
    modified: int = 0
    deleted: int = 0
    moved: int = 0

    @property
    def total(self) -> int:
        return self.created + self.modified + self.deleted + self.moved


@dataclass(frozen=True, slots=True)
class PendingItem:
    """One local change not yet synced, as `status` lists it."""

    op: Op
    path: str
    old_path: str | None = None


@dataclass(frozen=True, slots=True)
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


@dataclass(frozen=True, slots=True)
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


@dataclass(frozen=True, slots=True)
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


@dataclass(frozen=True, slots=True)
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


@dataclass(frozen=True, slots=True)
class LogEntry:
    """One row of the change journal as `log` shows it."""

    seq: int
    at: str
    op: Op
    path: str
    old_path: str | None
    hash: str | None
    size: int | None
    origin: str
    snapshot_id: int | None
    zones: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class DocDiff:
    """One document's difference as `diff` shows it: fields for structured kinds, a unified diff for text."""

    path: str
    status: str  # added | removed | modified | moved | unchanged
    kind: Kind
    against: str  # base | snapshot N | nothing
    old_path: str | None = None
    fields: tuple[FieldChange, ...] = ()
    unified: str | None = None  # text diff
    old_size: int | None = None
    new_size: int | None = None
    old_hash: str | None = None
    new_hash: str | None = None
    note: str | None = None  # e.g. "does not parse as JSON: compared as text"


@dataclass(frozen=True, slots=True)
class RestoreReport:
    """What a restore wrote and removed, and the safety snapshot that undoes it."""

    snapshot_id: int
    safety_snapshot_id: int | None
    written: tuple[str, ...] = ()
    deleted: tuple[str, ...] = ()
    unchanged: int = 0


@dataclass(frozen=True, slots=True)
class RepairReport:
    """What `repair` did: where the damaged journal went and how many files the rebuilt one holds."""

    moved_aside: str | None
    files: int
    integrity: str  # ok | damaged | missing


@dataclass(frozen=True, slots=True)
class Event:
    """One message of what the daemon and syncs publish (zones, processing, progress, log), as `events` shows it."""

    id: int
    at: str
    channel: str
    payload: dict[str, Any] = field(default_factory=dict)
