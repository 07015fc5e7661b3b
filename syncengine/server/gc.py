"""Server-side gc: the change log, op answers and blobs are kept for a retention period, then dropped.

Without it the server keeps every revision of every file forever (DESIGN
§4: "history and blobs are kept until a server-side gc with a retention
policy"). What a workspace keeps:

* every document's current state (its ``document`` row and its blob), a
  deleted one's row too (its last rev): a replica that was away for any
  time gets everything back from ``/docs``;
* the change log from the first change received within ``keep``; the seqs
  before it are gone and ``min_seq`` says so, so a replica whose checkpoint
  lies below it lists ``/docs`` instead and reconciles with its bases
  (pull.py). A document deleted meanwhile is not listed: the replica
  pushes its copy on its old rev, the server answers with the deletion's
  rev (the row it kept), and the replica deletes its copy then, as it would
  have from the feed (under the mass-delete guard; an edit there wins over
  the deletion, docs/sync-rules.md N5);
* the op answers of the same period (a commit retried later is answered
  from the documents' revs instead: an echo of itself, never a copy);
* the blobs any of those name, the parts of every kept chunk manifest, and
  every blob stored within ``GRACE``, which a client may have uploaded for a
  commit that has not arrived yet.

Each step runs under the workspace's lock, the lock commits take (on
PostgreSQL ``SELECT ... FOR UPDATE`` on its row), so a commit never names a
blob this deletes in between: a commit checks its blobs exist inside that
lock. A blob the server answered ``missing`` for earlier and a gc dropped
since is refused at commit (``missing_blob``): that round keeps the change
queued, and the next one uploads the blob again.

Blobs go in batches of ``BATCH``, each its own transaction, so commits wait
for one batch, never for the whole gc. A SQLite file keeps its size (the
freed pages are reused by later writes); ``VACUUM`` with the server stopped
gives the space back.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from syncengine.errors import UsageError
from syncengine.server.db import StorageError
from syncengine.server.storage import Storage

GRACE_NS = 3600 * 10**9  # blobs stored within the last hour stay (uploaded for a commit still to come)
BATCH = 500  # blobs dropped per transaction
RETRIES = 3  # batches chosen again after a concurrent manifest named one of their blobs


@dataclass(eq=False)
class WorkspaceGc:
    """What gc dropped from one workspace (or would have, in a dry run)."""

    workspace: str
    min_seq: int  # the change log's first seq now; a checkpoint below min_seq - 1 gets the full listing
    last_seq: int
    changes_dropped: int
    ops_dropped: int
    blobs_dropped: int
    bytes_freed: int  # the dropped blobs' own bytes (a manifest's parts counted once, as parts)


@dataclass(eq=False)
class ServerGcReport:
    keep_seconds: float
    dry_run: bool
    workspaces: list[WorkspaceGc]


def collect(storage: Storage, keep_seconds: float, *, workspace: str | None = None, dry_run: bool = False,
            now_ns: int | None = None) -> ServerGcReport:
    """Drop what ``keep_seconds`` no longer covers, in one workspace or all (see the module docstring).

    ``dry_run`` runs the same statements in one transaction per workspace
    and rolls it back: the figures are exact, nothing changes.
    """
    if keep_seconds < 0:
        raise UsageError("--keep must not be negative")
    now_ns = time.time_ns() if now_ns is None else now_ns
    cutoff = now_ns - int(keep_seconds * 1e9)
    grace = now_ns - GRACE_NS
    ids = storage.workspace_ids()
    if workspace is not None:
        if workspace not in ids:
            raise UsageError(f"the server has no workspace {workspace!r}")
        ids = {workspace: ids[workspace]}
    out = []
    for name, ws_id in ids.items():
        if dry_run:
            with storage.locked(ws_id, rollback=True):
                out.append(_collect_one(storage, ws_id, name, cutoff, grace, contextlib.nullcontext))
        else:
            out.append(_collect_one(storage, ws_id, name, cutoff, grace, lambda ws_id=ws_id: storage.locked(ws_id)))
    return ServerGcReport(keep_seconds, dry_run, out)


def _collect_one(storage: Storage, ws_id: int, name: str, cutoff: int, grace: int,
                 txn: Callable[[], contextlib.AbstractContextManager[Any]]) -> WorkspaceGc:
    db = storage.db
    q = db.param

    def one(sql: str, *params: object) -> Any:
        return db.execute_sql(sql, params).fetchone()

    with txn():
        last_seq, min_seq = one(f'SELECT "last_seq", "min_seq" FROM "workspace" WHERE "id" = {q}', ws_id)
        first_kept = one(f'SELECT MIN("seq") FROM "change" WHERE "workspace_id" = {q} AND "received_ns" >= {q}',
                         ws_id, cutoff)[0]
        new_min = max(min_seq, last_seq + 1 if first_kept is None else first_kept)
        changes = db.execute_sql(f'DELETE FROM "change" WHERE "workspace_id" = {q} AND "seq" < {q}',
                                 (ws_id, new_min)).rowcount
        ops = db.execute_sql(f'DELETE FROM "op" WHERE "workspace_id" = {q} AND "created_ns" < {q}',
                             (ws_id, cutoff)).rowcount
        if new_min != min_seq:
            db.execute_sql(f'UPDATE "workspace" SET "min_seq" = {q} WHERE "id" = {q}', (new_min, ws_id))
    # Blobs nothing names any more, oldest first. A manifest is dropped before its parts, which
    # a later batch finds unnamed then (a part is never itself a manifest). SQLite answers NOT IN
    # (subquery) from an index it builds once; PostgreSQL a NOT EXISTS as a hash anti-join (its
    # NOT IN falls back to a scan per row once the hashes outgrow work_mem).
    if storage.postgres:
        unnamed = (
            f'SELECT b."id", b."size", b."chunks" FROM "blob" b WHERE b."workspace_id" = {q} AND b."created_ns" < {q}'
            ' AND NOT EXISTS (SELECT 1 FROM "document" d WHERE d."workspace_id" = b."workspace_id"'
            ' AND d."hash" = b."hash")'
            ' AND NOT EXISTS (SELECT 1 FROM "change" c WHERE c."workspace_id" = b."workspace_id"'
            ' AND c."hash" = b."hash")'
            ' AND NOT EXISTS (SELECT 1 FROM "blob_part" p WHERE p."part_id" = b."id")'
            f' ORDER BY b."id" LIMIT {BATCH}'
        )
        params: tuple = (ws_id, grace)
    else:
        unnamed = (
            f'SELECT "id", "size", "chunks" FROM "blob" WHERE "workspace_id" = {q} AND "created_ns" < {q}'
            f' AND "hash" NOT IN (SELECT "hash" FROM "document" WHERE "workspace_id" = {q} AND "hash" IS NOT NULL)'
            f' AND "hash" NOT IN (SELECT "hash" FROM "change" WHERE "workspace_id" = {q} AND "hash" IS NOT NULL)'
            ' AND "id" NOT IN (SELECT "part_id" FROM "blob_part")'
            f' ORDER BY "id" LIMIT {BATCH}'
        )
        params = (ws_id, grace, ws_id, ws_id)
    blobs = freed = 0
    conflicts = 0
    while True:
        try:
            with txn():
                rows = db.execute_sql(unnamed, params).fetchall()
                if not rows:
                    break
                ids = [row[0] for row in rows]
                marks = ", ".join([q] * len(ids))
                for table, column in (("blob_part", "blob_id"), ("blob_chunk", "blob_id"), ("blob", "id")):
                    db.execute_sql(f'DELETE FROM "{table}" WHERE "{column}" IN ({marks})', ids)
        except StorageError:
            # PostgreSQL: a manifest written meanwhile named one of these as its part (its foreign key
            # refuses the delete); the batch rolled back whole. Choose again, a few times at most.
            conflicts += 1
            if conflicts > RETRIES:
                raise
            continue
        blobs += len(rows)
        freed += sum(size for _id, size, chunks in rows if chunks or not size)  # a manifest's bytes are its parts'
    return WorkspaceGc(name, new_min, last_seq, changes, ops, blobs, freed)
