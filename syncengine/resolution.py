"""Settling an open conflict by hand: ``syncengine resolve PATH [--take local|remote|merged]``.

A ``manual`` conflict writes nothing and keeps its document out of every
round (``sync.plan_for`` skips it), so both versions wait untouched. Settling
it picks the content, then records it as an ordinary local edit on top of
the remote version it was settled against — base := that remote version,
local := the chosen bytes — and the next sync pushes it with that rev as its
base like any edit. If the server moved on in the meantime the push is
refused and the round resolves again on top of the newer rev: the server's
compare-and-swap stays the only point of ordering (DESIGN §4 rule 7).

The losing version keeps a change row (origin ``conflict``) and its bytes in
the blob store, so ``log`` still names it.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from syncengine import apply as applying
from syncengine.documents import changed_zones
from syncengine.errors import UsageError
from syncengine.fsops import ChangedUnderfoot, delete_safe, read_bytes, sha256
from syncengine.history import take_snapshot
from syncengine.journal import DocRow, Journal, now_ns
from syncengine.locks import FileLock
from syncengine.models import ConflictInfo, Kind

if TYPE_CHECKING:
    from syncengine.engine import Workspace
    from syncengine.reconcile import Version

TAKES = ("local", "remote", "merged")


def resolve(ws: Workspace, path: str, take: str | None = None) -> ConflictInfo:
    """Settle the open conflict at ``path``; returns it as settled.

    ``take``: ``local`` (this replica's version), ``remote`` (the server's),
    ``merged`` (a three-way merge, refused where both sides changed the same
    fields or lines), or None: the file as it is now, edited by hand.
    """
    if take is not None and take not in TAKES:
        raise UsageError(f"--take must be one of {', '.join(TAKES)}, not {take!r}")
    with FileLock(ws.layout.sync_lock, "sync").acquire(ws.config.sync.wait):
        applying.recover(ws.root)
        ws.scan()  # journal the hand edit
        conflict = _find(ws.journal, path)
        row = ws.journal.doc_by_id(conflict["doc_id"])
        if row is None or row.remote_rev is None:
            raise UsageError(f"{path}: the server's version is not known here",
                             hint="run `syncengine sync`, then resolve again")
        server = _Server(ws)
        try:
            settled, touched = _settle(ws, row, conflict, take, server)
        finally:
            server.close()
    if touched is not None:
        ws.publish_zones(touched, origin="resolve")
    return ws.conflict_infos([settled])[0]


def _find(journal: Journal, path: str) -> dict[str, Any]:
    """The open conflict of the document at ``path`` (or recorded at ``path``)."""
    row = journal.doc_by_path(path)
    for conflict in journal.open_conflicts():
        if (row is not None and conflict["doc_id"] == row.doc_id) or conflict["path"] == path:
            return conflict
    raise UsageError(f"no open conflict at {path}", hint="`syncengine conflicts` lists them")


class _Server:
    """The server, opened only when settling needs it (a blob not here yet, or `newest` times)."""

    def __init__(self, ws: Workspace) -> None:
        self.ws = ws
        self.remote: Any = None

    def open(self) -> Any:
        if self.remote is None:
            self.remote = self.ws.open_remote()
        return self.remote

    def blob(self, digest: str) -> bytes:
        if not self.ws.blobs.has(digest):
            self.ws.blobs.put_bytes(self.open().get(digest))
        return self.ws.blobs.get(digest)

    def local_is_newer(self, row: DocRow) -> bool:
        from syncengine.sync import _newer

        return _newer(self.open())(row)

    def close(self) -> None:
        if self.remote is not None:
            self.remote.close()


def _settle(ws: Workspace, row: DocRow, conflict: dict[str, Any], take: str | None,
            server: _Server) -> tuple[dict[str, Any], dict[str, list[str]] | None]:
    """Write the chosen version and record it; returns the settled conflict row and the zones."""
    base, local, remote = applying.versions(row)
    assert remote is not None
    kind = Kind(row.kind)
    local_bytes = _local_bytes(ws, local)
    remote_bytes = server.blob(remote.hash) if remote.present else None
    if take == "remote":
        chosen, loser = remote_bytes, local
    elif take == "merged":
        chosen, loser = _merged(ws, row, conflict, local_bytes, remote_bytes, server), None
    else:
        chosen, loser = local_bytes, remote
    overwrites = local is not None and local.present and (chosen is None or sha256(chosen) != local.hash)
    remote_lost = loser is remote and remote.present and remote_bytes is not None
    if overwrites or remote_lost:
        # Autosave first, so `restore` brings back a local file about to be
        # overwritten or removed (DESIGN §2, STYLE 8); a losing server
        # version gets a conflict snapshot on top of that state.
        take_snapshot(ws.root, ws.journal, ws.blobs, message=f"before resolving {conflict['path']}",
                      trigger="safety", skip_if_unchanged=True)
    if remote_lost and (chosen is None or sha256(chosen) != remote.hash):
        applying.snapshot_loser(ws.journal, remote.path, remote.hash, row.remote_mode, len(remote_bytes))
    ctx = applying.Context(ws.root, ws.journal, ws.blobs, ws.journal.client_id, None, None)
    if loser is not None and loser.present and (chosen is None or loser.hash != sha256(chosen)):
        lost = applying._change(row, "modified", loser.path, digest=loser.hash, size=ws.blobs.size(loser.hash),
                                origin="conflict")
        ctx.changes.append({**lost, "rev": row.remote_rev if loser is remote else None})
    values: dict[str, Any] = {"base_path": row.remote_path, "base_rev": row.remote_rev,
                              "base_hash": row.remote_hash, "base_mode": row.remote_mode, "error": None}
    touched: dict[str, list[str]] | None = None
    applying.begin_apply(ws.root)
    try:
        before = len(ctx.changes)
        if chosen is None:  # the deletion was chosen
            if local is not None and local.present:
                delete_safe(ws.root, local.path, expect_hash=local.hash, dirty_dirs=ctx.dirty)
                ctx.changes.append(applying._change(row, "deleted", local.path))
            values.update(path=None, hash=None, size=None, mtime_ns=None, ctime_ns=None, inode=None, mode=None)
        else:
            digest = ws.blobs.put_bytes(chosen)
            target, executable = _place(base, local, remote)
            present = local if local is not None and local.present else None
            st = applying._materialise(ctx, row, present, target, digest, executable)
            if len(ctx.changes) == before:
                ctx.changes.append(applying._change(row, "modified", target, digest=digest, size=st.size))
            values.update(path=target, hash=digest, size=st.size, mtime_ns=st.mtime_ns, ctime_ns=st.ctime_ns,
                          inode=st.inode, mode=st.mode)
            if present is None or digest != present.hash or target != present.path:
                fields = changed_zones(kind, local_bytes, chosen) if local_bytes is not None else []
                touched = {target: fields}
                for change in ctx.changes[before:]:
                    change["zones"] = json.dumps(fields) if fields else None
        for change in ctx.changes[before:]:
            change["origin"] = "resolve"
        values["local_at"] = now_ns()
        ctx.updates.append((row.doc_id, values))
        settled = {**conflict, "resolved_at": now_ns(), "resolution": take or "edited"}
        # The server version it was settled against (newer than the conflict's if the
        # server moved on): named here, its blob stays out of gc's reach.
        ctx.conflict_rows.append({"id": conflict["id"], "resolved_at": settled["resolved_at"],
                                  "resolution": settled["resolution"], "remote_hash": row.remote_hash,
                                  "remote_rev": row.remote_rev})
        applying.flush(ctx)
    finally:
        applying.end_apply(ws.root)
    return settled, touched


def _local_bytes(ws: Workspace, local: Version | None) -> bytes | None:
    """This replica's version as the scan just journaled it (None: the file is gone)."""
    if local is None or not local.present:
        return None
    data, _st = read_bytes(ws.root / local.path)
    if sha256(data) != local.hash:
        raise ChangedUnderfoot("changed while resolving; run resolve again", paths=[local.path])
    ws.blobs.put_bytes(data)
    return data


def _merged(ws: Workspace, row: DocRow, conflict: dict[str, Any], local: bytes | None, remote: bytes | None,
            server: _Server) -> bytes:
    """The three-way merge with the .syncrules field rules, or a UsageError saying what collides."""
    from syncengine import merge as merging
    from syncengine import rules as rules_mod

    path = conflict["path"]
    if local is None or remote is None:
        raise UsageError(f"{path} was deleted on one side: there is nothing to merge",
                         hint="use --take local or --take remote")
    kind = Kind(row.kind)
    rules = rules_mod.load(ws.root)
    fields = rules.for_path(row.path or path, conflict["kind"])[1] if rules else None
    newer = None
    if fields and "newest" in fields.values():
        newer = "local" if server.local_is_newer(row) else "remote"
    base = ws.blobs.get(row.base_hash) if row.base_hash and ws.blobs.has(row.base_hash) else None
    result = merging.merge(kind, base, local, remote, rules=fields, newer=newer)
    if result.merged is None:
        what = ", ".join(result.conflicts) or result.reason or "the document"
        raise UsageError(f"{path} does not merge: {what} changed on both sides",
                         hint="use --take local or --take remote, or edit the file and run resolve without --take")
    return result.merged


def _place(base: Version | None, local: Version | None, remote: Version) -> tuple[str, bool]:
    """Where the settled file lives and its executable bit: merged three-way, as a round would."""
    if local is None or not local.present:
        return remote.path, remote.executable
    if base is None or not base.present:
        return local.path, local.executable or remote.executable
    # Moved to two different places: the server's place wins, as in a round (reconcile._merge).
    path = local.path if remote.path == base.path else remote.path
    executable = remote.executable if local.executable == base.executable else local.executable
    return path, executable
