"""Applying a round's decisions to the files here, then to the journal.

Order of work for each batch (DESIGN §4 rule 3): write the temp files and
make them durable together (:mod:`syncengine.staging`), rename them into
place (fsops checks each target still holds what the journal says, so an
edit landing mid-apply becomes a conflict, not a loss), fsync every touched
folder once, then commit the journal rows in one transaction. A kill
anywhere in between leaves files that the next round recognises: a file
that already holds the server's bytes is simply adopted.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from syncengine import conflicts as strategies
from syncengine.blobs import BlobStore
from syncengine.documents import kind_for
from syncengine.fsops import (
    ChangedUnderfoot,
    FileStat,
    delete_safe,
    failpoint,
    fsync_dirs,
    lstat,
    move_safe,
    read_bytes,
    set_mode,
    sha256,
    write_atomic,
)
from syncengine.journal import DocRow, Journal, now_ns
from syncengine.leftovers import begin_apply, end_apply, recover  # noqa: F401 - part of this module's API
from syncengine.models import Kind, ScanProblem
from syncengine.reconcile import Action, ConflictKind, Version, versions
from syncengine.staging import Staged

Plan = list[tuple[DocRow, Action]]


@dataclass
class Applied:
    """What the local side of a round did."""

    downloaded: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    moved: list[tuple[str, str]] = field(default_factory=list)
    adopted: int = 0
    resolved: list[dict[str, Any]] = field(default_factory=list)  # conflict rows written
    copies: list[str] = field(default_factory=list)
    touched: dict[str, list[str]] = field(default_factory=dict)  # path -> fields (zones)
    failed: dict[str, ScanProblem] = field(default_factory=dict)  # doc_id -> why it was not applied
    underfoot: list[str] = field(default_factory=list)  # doc_ids whose file changed during the apply

    @property
    def problems(self) -> list[ScanProblem]:
        return list(self.failed.values())


@dataclass
class Context:
    root: Path
    journal: Journal
    blobs: BlobStore
    client_id: str
    strategy_for: Any  # (path, conflict kind) -> (strategy, field_rules): sync._strategy_lookup
    local_is_newer: Any  # (row) -> bool
    result: Applied = field(default_factory=Applied)
    updates: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    changes: list[dict[str, Any]] = field(default_factory=list)
    conflict_rows: list[dict[str, Any]] = field(default_factory=list)
    deletes: list[str] = field(default_factory=list)
    dirty: set[Path] = field(default_factory=set)
    staged: Staged = field(default_factory=Staged)  # downloads written ahead (syncengine.staging)
    progress: Any = None  # (stage, current, total) -> None, the round's progress callback


def exec_mode(mode: int | None, executable: bool) -> int:
    """A file mode with the executable bits set or cleared as the other side has them."""
    mode = mode if mode is not None else 0o644
    if executable:
        return mode | 0o100 | ((mode & 0o040) >> 2) | ((mode & 0o004) >> 2)
    return mode & ~0o111


def _local_values(path: str, digest: str, st: FileStat) -> dict[str, Any]:
    return {"path": path, "hash": digest, "size": st.size, "mtime_ns": st.mtime_ns, "ctime_ns": st.ctime_ns,
            "inode": st.inode, "mode": st.mode}


_NO_LOCAL = {"path": None, "hash": None, "size": None, "mtime_ns": None, "ctime_ns": None, "inode": None,
             "mode": None}


def _base_from_remote(row: DocRow) -> dict[str, Any]:
    return {"base_path": row.remote_path, "base_rev": row.remote_rev, "base_hash": row.remote_hash,
            "base_mode": row.remote_mode, "error": None}


def _change(row: DocRow, op: str, path: str, old_path: str | None = None, digest: str | None = None,
            size: int | None = None, origin: str = "remote") -> dict[str, Any]:
    return {"doc_id": row.doc_id, "path": path, "op": op, "old_path": old_path, "hash": digest, "size": size,
            "origin": origin, "rev": row.remote_rev}


# ---------------------------------------------------------------- the actions


def _pull(ctx: Context, row: DocRow) -> None:
    _base, local, remote = versions(row)
    assert remote is not None
    values = _base_from_remote(row)
    if not remote.present:
        if local is not None and local.present:
            delete_safe(ctx.root, local.path, expect_hash=local.hash, dirty_dirs=ctx.dirty)
            ctx.result.deleted.append(local.path)
            ctx.changes.append(_change(row, "deleted", local.path))
        values.update(_NO_LOCAL)
        ctx.updates.append((row.doc_id, values))
        return
    st = _materialise(ctx, row, local, remote.path, remote.hash, remote.executable)
    values.update(_local_values(remote.path, remote.hash, st))
    values["local_at"] = now_ns()
    if row.kind != (kind := _kind_of(ctx, remote.path)):
        values["kind"] = kind
    ctx.updates.append((row.doc_id, values))


def _materialise(ctx: Context, row: DocRow, local: Version | None, path: str, digest: str,
                 executable: bool) -> FileStat:
    """Make ``path`` hold ``digest`` (moving and/or rewriting the local file); returns its stat.

    A move travels first, as a rename of the file we have, and new bytes are
    written over it afterwards. A kill in between leaves the old bytes at the
    new path, which the next scan reads as the same document moved (its
    inode did not change) — never as a second document created there.
    """
    present = local is not None and local.present
    moved_from = None
    if present and local.path != path:
        move_safe(ctx.root, local.path, path, expect_hash=local.hash)
        failpoint("apply.after_move")
        ctx.result.moved.append((local.path, path))
        moved_from = local.path
        local = Version(path, local.hash, local.executable)
    if present and local.hash == digest:
        if local.executable != executable:
            set_mode(ctx.root, path, exec_mode(row.mode, executable))
        st = lstat(ctx.root / path)
        if st is None:
            raise ChangedUnderfoot("the file vanished", paths=[path])
        if moved_from:
            ctx.changes.append(_change(row, "moved", path, moved_from, digest, st.size))
        return st
    mode = exec_mode(row.mode if present else None, executable)
    staged = ctx.staged.take(path, digest, mode)  # written and made durable ahead, with the others
    st = write_atomic(ctx.root, path, ctx.blobs.iter_verified(digest),
                      expect_hash=local.hash if present else None, mode=mode, dirty_dirs=ctx.dirty, staged=staged)
    failpoint("apply.after_write")
    op = "moved" if moved_from else "modified" if present else "created"
    ctx.changes.append(_change(row, op, path, moved_from, digest, st.size))
    ctx.result.downloaded.append(path)
    return st


def _kind_of(ctx: Context, path: str) -> str:
    """The document kind of the file just put in place.

    Its head is read from the file, not the blob store: a binary keeps no
    local blob, and a rename or chmod of one downloads nothing.
    """
    try:
        with open(ctx.root / path, "rb") as fh:
            head = fh.read(8192)
    except OSError:
        head = b""
    return kind_for(path, head).value


def _adopt(ctx: Context, row: DocRow) -> None:
    values = _base_from_remote(row)
    if row.hash and Kind(row.kind).mergeable and not ctx.blobs.has(row.hash):
        # The base of a mergeable document must be in the store before its row commits.
        digest, _st = ctx.blobs.put_file(ctx.root / row.path)
        if digest != row.hash:
            raise ChangedUnderfoot("changed since the scan", paths=[row.path])
    ctx.updates.append((row.doc_id, values))
    ctx.result.adopted += 1


def _merge(ctx: Context, row: DocRow, action: Action) -> None:
    _base, local, remote = versions(row)
    assert local is not None and remote is not None
    kind = action.conflict
    if kind is ConflictKind.MODIFIED_DELETED:
        # Keep the modified file; it goes back to the server on top of the deletion.
        ctx.updates.append((row.doc_id, _base_from_remote(row)))
        _record_conflict(ctx, row, kind, "keep-modified", "kept")
        return
    if not action.content_conflict:
        assert action.hash is not None and action.path is not None
        st = _materialise(ctx, row, local, action.path, action.hash, action.executable)
        values = _base_from_remote(row)
        values.update(_local_values(action.path, action.hash, st))
        ctx.updates.append((row.doc_id, values))
        return
    _resolve(ctx, row, action, local, remote)


def _resolve(ctx: Context, row: DocRow, action: Action, local: Version, remote: Version) -> None:
    """Settle content changed on both sides, on top of the remote rev, as the rules say.

    Nothing that loses is ever only on disk: the local bytes enter the blob
    store first, a keep-both copy is written before the original is replaced
    (a kill in between leaves both, and the copy's name is a pure function
    of the losing version, so the rerun finds it and makes no second one),
    a local version about to be overwritten is snapshotted first (so
    `restore` brings it back), and the losing version gets a change row with
    origin ``conflict`` (so `log` names it). ``manual`` writes nothing: the
    open conflict keeps the document out of every round until `resolve`.
    """
    path = action.path or remote.path
    kind = action.conflict or ConflictKind.BOTH_MODIFIED
    strategy, field_rules = ctx.strategy_for(path, kind.value)
    open_row = ctx.journal.conflict_for(row.doc_id)
    data, st = read_bytes(ctx.root / local.path)
    if sha256(data) != local.hash:
        raise ChangedUnderfoot("changed since the scan; it will be synced next round", paths=[local.path])
    ctx.blobs.put_bytes(data)  # the local version stays recoverable whatever wins
    remote_bytes = ctx.blobs.get(remote.hash)
    base_bytes = ctx.blobs.get(row.base_hash) if row.base_hash and ctx.blobs.has(row.base_hash) else None
    timed = strategy == "newest" or (strategy == "merge" and "newest" in (field_rules or {}).values())
    outcome = strategies.resolve_content(
        strategy, Kind(row.kind), base_bytes, data, remote_bytes, field_rules=field_rules,
        local_is_newer=bool(timed and ctx.local_is_newer(row)))
    if outcome.open:
        if open_row is None:
            _record_conflict(ctx, row, kind, strategy, None, details=outcome.details, resolved=False)
        return
    copy_path = None
    if outcome.copy:
        copy_path = strategies.copy_name(path, ctx.client_id, row.local_at or now_ns(), local.hash)
        try:
            write_atomic(ctx.root, copy_path, [data], expect_hash=None, mode=st.mode, dirty_dirs=ctx.dirty)
        except ChangedUnderfoot:
            existing, _ = read_bytes(ctx.root / copy_path)
            if sha256(existing) != local.hash:
                raise
        failpoint("apply.after_copy")
        ctx.result.copies.append(copy_path)
    elif outcome.loser and not getattr(ctx, "_safety_snapshot", False):
        # Autosave before an overwrite (DESIGN §2, STYLE 8), and as the state
        # a remote loser's snapshot builds on; once per round.
        from syncengine.history import take_snapshot

        take_snapshot(ctx.root, ctx.journal, ctx.blobs, message="before settling conflicts", trigger="safety",
                      skip_if_unchanged=True)
        ctx._safety_snapshot = True  # type: ignore[attr-defined]
    if outcome.loser == "local":
        lost = _change(row, "modified", local.path, digest=local.hash, size=len(data), origin="conflict")
        ctx.changes.append({**lost, "rev": None})
    elif outcome.loser == "remote":
        lost_size = len(remote_bytes)
        ctx.changes.append(_change(row, "modified", remote.path, digest=remote.hash, size=lost_size, origin="conflict"))
        snapshot_loser(ctx.journal, remote.path, remote.hash, row.remote_mode, lost_size)
    new_hash = local.hash if outcome.data is None else ctx.blobs.put_bytes(outcome.data)
    before = len(ctx.changes)
    st = _materialise(ctx, row, local, path, new_hash, action.executable)
    touched = list(outcome.touched)
    if len(ctx.changes) == before:  # the file stays as it is; the log still says how it was settled
        ctx.changes.append(_change(row, "modified", path, digest=new_hash, size=st.size))
    for change in ctx.changes[before:]:
        change.update(origin="merge", zones=json.dumps(touched) if touched else None)
    values = _base_from_remote(row)
    values.update(_local_values(path, new_hash, st))
    ctx.updates.append((row.doc_id, values))
    if new_hash != local.hash or path != local.path:
        ctx.result.touched[path] = touched
    _record_conflict(ctx, row, kind, strategy, outcome.resolution, details=outcome.details or outcome.touched,
                     copy_path=copy_path, open_id=open_row["id"] if open_row else None)


def snapshot_loser(journal: Journal, path: str, digest: str, mode: int | None, size: int) -> None:
    """A ``conflict`` snapshot: the latest one with the server's losing version at ``path``.

    The server's version never was a file here, so no ordinary snapshot
    holds it; this one makes ``restore SNAPSHOT PATH`` bring it back, and
    keeps its blob from ``gc`` as long as the snapshot lives. It changes
    only ``path``: the rest of it is the safety snapshot the caller took
    just before.
    """
    latest = journal.snapshots(limit=1)
    files, total = (latest[0][4], latest[0][5]) if latest else (1, size)
    journal.add_snapshot([(path, digest, mode, size)], trigger="conflict",
                         message=f"{path}: the server's version, which lost a conflict",
                         files=files, total_bytes=total, upto_seq=journal.last_change_seq())


def _record_conflict(ctx: Context, row: DocRow, kind: ConflictKind, strategy: str, resolution: str | None, *,
                     details=(), copy_path: str | None = None, resolved: bool = True,
                     open_id: int | None = None) -> None:
    """Queue a conflict row (a new one, or settling the open one) with the batch that writes its outcome.

    It commits in the same transaction as the document's new state, so the
    journal never calls a conflict settled before its file is.
    """
    entry = {"doc_id": row.doc_id, "path": row.remote_path or row.path or row.base_path or "",
             "kind": kind.value, "local_hash": row.hash, "remote_hash": row.remote_hash,
             "base_hash": row.base_hash, "remote_rev": row.remote_rev, "strategy": strategy,
             "details": json.dumps(list(details)) if details else None, "copy_path": copy_path,
             "resolved_at": now_ns() if resolved else None, "resolution": resolution}
    if open_id:
        entry["id"] = open_id
    ctx.conflict_rows.append(entry)
    ctx.result.resolved.append(entry)


# ---------------------------------------------------------------- committing


def flush(ctx: Context) -> None:
    """fsync the folders written so far, then commit their journal rows."""
    if not (ctx.updates or ctx.changes or ctx.conflict_rows or ctx.deletes):
        return
    fsync_dirs(ctx.dirty)
    ctx.dirty.clear()
    failpoint("apply.before_journal")
    ctx.journal.batch(updates=ctx.updates, changes=ctx.changes, conflicts=ctx.conflict_rows, deletes=ctx.deletes)
    ctx.updates, ctx.changes, ctx.conflict_rows, ctx.deletes = [], [], [], []
