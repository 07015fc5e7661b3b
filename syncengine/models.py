"""Plain values the engine returns: what the CLI, ``--json``, the daemon render.

Frozen dataclasses and string enums only — no live ORM rows, no integers
with meaning. :func:`to_jsonable` turns any of them into JSON-ready data.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class Op(enum.StrEnum):
    CREATED = "created"
    MODIFIED = "modified"
    DELETED = "deleted"
    MOVED = "moved"


class Kind(enum.StrEnum):
    JSON = "json"
    YAML = "yaml"
    TOML = "toml"
    TEXT = "text"
    BINARY = "binary"

    @property
    def structured(self) -> bool:
        return self in (Kind.JSON, Kind.YAML, Kind.TOML)

    @property
    def mergeable(self) -> bool:
        return self is not Kind.BINARY


@dataclass(frozen=True, slots=True)
class LocalChange:
    """One change the scanner or watcher found on disk, before it is journaled."""

    op: Op
    path: str
    hash: str | None = None
    size: int | None = None
    mtime_ns: int | None = None
    ctime_ns: int | None = None
    inode: int | None = None
    mode: int | None = None
    old_path: str | None = None
    doc_id: str | None = None  # known for modified/deleted/moved
    kind: Kind | None = None


@dataclass(frozen=True, slots=True)
class ScanProblem:
    path: str
    reason: str


@dataclass(frozen=True, slots=True)
class ScanReport:
    created: tuple[str, ...] = ()
    modified: tuple[str, ...] = ()
    deleted: tuple[str, ...] = ()
    moved: tuple[tuple[str, str], ...] = ()  # (old, new)
    problems: tuple[ScanProblem, ...] = ()
    files: int = 0
    hashed: int = 0
    seconds: float = 0.0

    @property
    def changed(self) -> int:
        return len(self.created) + len(self.modified) + len(self.deleted) + len(self.moved)


@dataclass(frozen=True, slots=True)
class SnapshotInfo:
    id: int
    created_at: str  # ISO 8601 UTC
    message: str | None
    trigger: str
    files: int
    bytes: int
    changed: int


@dataclass(frozen=True, slots=True)
class PendingCounts:
    created: int = 0
    modified: int = 0
    deleted: int = 0
    moved: int = 0

    @property
    def total(self) -> int:
        return self.created + self.modified + self.deleted + self.moved


@dataclass(frozen=True, slots=True)
class PendingItem:
    op: Op
    path: str
    old_path: str | None = None


@dataclass(frozen=True, slots=True)
class ConflictInfo:
    id: int
    path: str
    kind: str
    strategy: str
    created_at: str
    details: Any = None
    copy_path: str | None = None
    resolved_at: str | None = None
    resolution: str | None = None


@dataclass(frozen=True, slots=True)
class TaskInfo:
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
class FieldChange:
    """A field-level difference in a structured document (from deepdiff)."""

    path: str  # dotted/bracketed path such as zones[id=z1].text
    change: str  # added | removed | changed
    old: Any = None
    new: Any = None


@dataclass(frozen=True, slots=True)
class DocDiff:
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
    snapshot_id: int
    safety_snapshot_id: int | None
    written: tuple[str, ...] = ()
    deleted: tuple[str, ...] = ()
    unchanged: int = 0


@dataclass(frozen=True, slots=True)
class RepairReport:
    moved_aside: str | None
    files: int
    integrity: str  # ok | damaged | missing


@dataclass(frozen=True, slots=True)
class InitReport:
    root: str
    created: bool
    server: str | None = None
    workspace: str | None = None
    files: int = 0


@dataclass(frozen=True, slots=True)
class Event:
    id: int
    at: str
    channel: str
    payload: dict[str, Any] = field(default_factory=dict)


def to_jsonable(value: Any) -> Any:
    """Dataclasses, enums, paths and tuples to plain JSON-ready values."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out = {f.name: to_jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
        for name in ("changed", "total"):
            if isinstance(getattr(type(value), name, None), property):
                out[name] = getattr(value, name)
        return out
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [to_jsonable(v) for v in value]
    return value


@dataclass(frozen=True, slots=True)
class PlannedAction:
    """One decision of a round, as --dry-run shows it."""

    path: str
    action: str  # push | pull | adopt | forget | merge
    detail: str  # the decision-table rule
    conflict: str | None = None


@dataclass(frozen=True, slots=True)
class SyncReport:
    server: str
    workspace: str
    dry_run: bool
    pulled: int = 0  # feed entries (or listed documents) read
    full_listing: bool = False
    downloaded: tuple[str, ...] = ()
    deleted: tuple[str, ...] = ()
    moved: tuple[tuple[str, str], ...] = ()
    pushed: tuple[str, ...] = ()
    uploaded: int = 0  # blobs sent
    conflicts: tuple[ConflictInfo, ...] = ()  # settled or opened in this round
    open_conflicts: int = 0  # manual conflicts waiting for `resolve`
    copies: tuple[str, ...] = ()
    plan: tuple[PlannedAction, ...] = ()
    problems: tuple[ScanProblem, ...] = ()
    scan: ScanReport | None = None
    passes: int = 0
    seconds: float = 0.0

    @property
    def exit_code(self) -> int:
        return 1 if self.open_conflicts else 0
