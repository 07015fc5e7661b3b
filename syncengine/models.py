"""Plain values the engine returns: what the CLI, ``--json``, the daemon render.

Frozen dataclasses and string enums only — no live ORM rows, no integers
with meaning. :func:`to_jsonable` turns any of them into JSON-ready data.

The values of a scan, init and a sync round live here; what the other
commands show (status, log, diff, restore, repair, the daemon's state)
lives in :mod:`syncengine.views`, and is found here too, on first use.
Every ``syncengine`` call is a fresh process and each frozen dataclass
costs 0.5-1 ms to create (six generated methods, each compiled): a no-op
sync spent ~13% of its CPU creating dataclasses, 20 of them here, where
it needs 7.

Reports and what the CLI shows (``eq=False``) are read field by field,
never compared whole: without ``__eq__`` and the ``__hash__`` that comes
with it, each is ~0.09 ms cheaper to create. The facts a round reasons
with (a change, a problem) keep their value equality.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from syncengine.lazy import forwarding


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
    """A path a scan, snapshot, restore or round could not handle, and why: reported beside the result, not raised."""

    path: str
    reason: str


@dataclass(frozen=True, slots=True, eq=False)
class ScanReport:
    """What one scan found against the journal: the round's and `status`'s pending changes."""

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


@dataclass(frozen=True, slots=True, eq=False)
class ConflictInfo:
    """A conflict settled or left open by a round, as `conflicts`, `status` and a sync report show it."""

    id: int
    path: str
    kind: str
    strategy: str
    created_at: str
    details: Any = None
    copy_path: str | None = None
    resolved_at: str | None = None
    resolution: str | None = None


@dataclass(frozen=True, slots=True, eq=False)
class InitReport:
    """What `init` did: a new workspace, or one already there (`created` False), and its server."""

    root: str
    created: bool
    server: str | None = None
    workspace: str | None = None
    files: int = 0


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


@dataclass(frozen=True, slots=True, eq=False)
class PlannedAction:
    """One decision of a round, as --dry-run shows it."""

    path: str
    action: str  # push | pull | adopt | forget | merge
    detail: str  # the decision-table rule
    conflict: str | None = None


@dataclass(frozen=True, slots=True, eq=False)
class SyncReport:
    """One round's outcome for the CLI, the daemon and --json; ``exit_code`` says whether a person must act."""

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
    guard: str | None = None  # a dry run's plan the safety guard would stop: why (it exits 6, as the run would)
    seconds: float = 0.0

    @property
    def exit_code(self) -> int:
        return 6 if self.guard else 1 if self.open_conflicts else 0


# Defined in syncengine.views; `from syncengine.models import Status` still works, loading it then.
_VIEWS = frozenset({"SnapshotInfo", "PendingCounts", "PendingItem", "TaskInfo", "DaemonInfo", "SyncInfo", "Status",
                    "LogEntry", "DocDiff", "RestoreReport", "RepairReport", "Event"})


# FieldChange is made by syncengine.docdiff alone, which a diff or a merge loads (with deepdiff).
__getattr__ = forwarding(globals(), {**dict.fromkeys(_VIEWS, "syncengine.views"), "FieldChange": "syncengine.docdiff"})
