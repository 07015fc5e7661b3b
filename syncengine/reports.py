"""What log, diff, restore, repair and `events` show: values no `status` and no sync round creates.

Split from :mod:`syncengine.views` (which still names them, loading this
module on first use) for the same reason views is split from
:mod:`syncengine.models`: every ``syncengine`` call is a fresh process and
each frozen dataclass costs 0.35-1 ms to create; a `status` needs none of
these five.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from syncengine.docdiff import FieldChange
    from syncengine.models import Kind, Op


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
    blobs: str = "ok"  # ok | damaged: the table of small blobs (bases, snapshots' contents)
    blobs_moved_aside: str | None = None
    blobs_restored: int = 0  # blobs stored again from the current files
    blobs_lost: int = 0  # versions only snapshots named, that no file holds any more: restoring them fails


@dataclass(frozen=True, slots=True)
class Event:
    """One message of what the daemon and syncs publish (zones, processing, progress, log), as `events` shows it."""

    id: int
    at: str
    channel: str
    payload: dict[str, Any] = field(default_factory=dict)
