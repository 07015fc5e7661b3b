"""Snapshots, restore and the change log: any earlier state can come back.

A snapshot records only what changed since the previous one (path -> hash,
or removed), and stores the bytes of every version it names in the blob
store first, so a snapshot row never points at a blob that is not there
(RELIABILITY A7). Restoring takes a safety snapshot first, so a restore can
itself be undone.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from syncengine.errors import FileSystemError, UsageError
from syncengine.fsops import ChangedUnderfoot, delete_safe, fsync_dirs, write_atomic
from syncengine.journal import Journal
from syncengine.models import Op, ScanProblem, SnapshotInfo

if TYPE_CHECKING:  # the blob store's stack (ctypes, subprocess, protocol): not for `status`, which needs iso()
    from syncengine.blobs import BlobStore
    from syncengine.reports import LogEntry, RestoreReport


def iso(ns: int | None) -> str | None:
    if ns is None:
        return None
    return datetime.fromtimestamp(ns / 1e9, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def snapshot_info(row: tuple) -> SnapshotInfo:
    sid, created_at, message, trigger, files, total, changed = row
    return SnapshotInfo(sid, iso(created_at), message, trigger, files, total, changed)


def take_snapshot(
    root: Path,
    journal: Journal,
    blobs: BlobStore,
    *,
    message: str | None = None,
    trigger: str = "manual",
    skip_if_unchanged: bool = False,
) -> tuple[SnapshotInfo | None, list[ScanProblem]]:
    """Record the journal's view of every file as a new snapshot.

    The caller scans first. A file that cannot be read keeps its previous
    snapshot entry and is reported; one that changed since the scan is
    stored as it is now (the next scan journals the edit).
    """
    upto = journal.last_change_seq()
    current = journal.current_manifest()
    previous_rows = journal.snapshots(limit=1)
    previous = journal.snapshot_manifest(previous_rows[0][0]) if previous_rows else {}
    entries: list[tuple[str, str | None, int | None, int | None]] = []
    problems: list[ScanProblem] = []
    for path, (digest, mode, size) in sorted(current.items()):
        if path in previous and previous[path][:2] == (digest, mode):
            continue
        if not blobs.has(digest):
            try:
                digest, st = blobs.put_file(root / path)
                mode, size = st.mode, st.size
            except (OSError, FileSystemError) as exc:
                problems.append(ScanProblem(path, f"not snapshotted: {getattr(exc, 'strerror', exc)}"))
                continue
        entries.append((path, digest, mode, size))
    for path in sorted(set(previous) - set(current)):
        entries.append((path, None, None, None))
    if skip_if_unchanged and not entries:
        if previous_rows:
            journal.attach_changes(previous_rows[0][0], upto)
        return None, problems
    files = len(current)
    total = sum(size or 0 for _h, _m, size in current.values())
    sid = journal.add_snapshot(entries, message=message, trigger=trigger, files=files,
                               total_bytes=total, upto_seq=upto)
    return snapshot_info(journal.snapshot_row(sid)), problems


def list_snapshots(journal: Journal, limit: int | None = None) -> list[SnapshotInfo]:
    return [snapshot_info(row) for row in journal.snapshots(limit)]


def resolve_snapshot(journal: Journal, ref: str | int) -> int:
    """A snapshot id from what a person typed: an id, or 'latest' / 'last'."""
    text = str(ref).strip().lstrip("#")
    if text in ("latest", "last"):
        rows = journal.snapshots(limit=1)
        if not rows:
            raise UsageError("there are no snapshots yet", hint="take one with `syncengine snapshot`")
        return rows[0][0]
    if not text.isdigit() or journal.snapshot_row(int(text)) is None:
        raise UsageError(f"no snapshot {ref!r}", hint="`syncengine snapshots` lists them")
    return int(text)


def _selected(path: str, prefixes: list[str]) -> bool:
    return not prefixes or any(path == p or path.startswith(p.rstrip("/") + "/") for p in prefixes)


def restore(
    root: Path,
    journal: Journal,
    blobs: BlobStore,
    snapshot_id: int,
    paths: Iterable[str] = (),
    *,
    safety_snapshot_id: int | None = None,
) -> tuple[RestoreReport, list[ScanProblem]]:
    """Make the files (all, or those under ``paths``) what they were in a snapshot.

    Files created since are removed too when restoring everything — they are
    in the safety snapshot the caller took. Each write checks that the file
    still holds what the journal says, so an edit racing the restore is
    reported, not overwritten.
    """
    from syncengine.reports import RestoreReport  # not at import: `status` loads this module for iso() alone

    prefixes = list(paths)
    target = journal.snapshot_manifest(snapshot_id)
    current = journal.current_manifest()
    if prefixes and not any(_selected(p, prefixes) for p in set(target) | set(current)):
        raise UsageError(f"nothing under {', '.join(prefixes)} in snapshot {snapshot_id} or on disk")
    written: list[str] = []
    deleted: list[str] = []
    problems: list[ScanProblem] = []
    unchanged = 0
    dirty: set[Path] = set()
    for path, (digest, mode, _size) in sorted(target.items()):
        if not _selected(path, prefixes):
            continue
        now = current.get(path)
        if now is not None and now[0] == digest and (now[1] or 0) & 0o111 == (mode or 0) & 0o111:
            unchanged += 1
            continue
        try:
            write_atomic(root, path, blobs.iter_verified(digest), expect_hash=now[0] if now else None,
                         mode=mode, dirty_dirs=dirty)
            written.append(path)
        except (ChangedUnderfoot, FileSystemError) as exc:
            problems.append(ScanProblem(path, f"not restored: {exc.message}"))
    for path, (digest, _mode, _size) in sorted(current.items()):
        if path in target or not _selected(path, prefixes):
            continue
        try:
            delete_safe(root, path, expect_hash=digest, dirty_dirs=dirty)
            deleted.append(path)
        except (ChangedUnderfoot, FileSystemError) as exc:
            problems.append(ScanProblem(path, f"not removed: {exc.message}"))
    fsync_dirs(dirty)
    report = RestoreReport(snapshot_id, safety_snapshot_id, tuple(written), tuple(deleted), unchanged)
    return report, problems


def log_entries(journal: Journal, path: str | None = None, limit: int | None = 20) -> list[LogEntry]:
    """The journal, newest first; for a path, also the history of the document now there."""
    from syncengine.reports import LogEntry  # not at import: `status` loads this module for iso() alone

    doc_ids = [d.doc_id for d in journal.docs_touching(path)] if path else []
    entries = []
    for seq, at, op, p, old, digest, size, origin, sid, zones, _doc in journal.changes(path, limit, doc_ids):
        entries.append(LogEntry(seq, iso(at), Op(op), p, old, digest, size, origin, sid,
                                tuple(json.loads(zones)) if zones else ()))
    return entries
