"""Running the local side of a plan: in an order that frees paths, retrying what waits on another.

The actions themselves (download, move, delete, adopt, merge) live in
:mod:`syncengine.apply`; this module decides their order, gives a document
whose destination another document is about to leave a second chance,
breaks crossing moves (a -> b while b -> a), and keeps per-document failures
from stopping the rest (RELIABILITY C7, D4, C8).
"""

from __future__ import annotations

import dataclasses
import posixpath

from syncengine import staging
from syncengine.apply import Applied, Context, Plan, _adopt, _merge, _pull, _record_conflict, flush
from syncengine.conflicts import split_name
from syncengine.errors import FileSystemError, SyncEngineError
from syncengine.fieldpaths import ROOT
from syncengine.fsops import ChangedUnderfoot, failpoint, mapped, move_safe
from syncengine.journal import DocRow
from syncengine.leftovers import begin_apply, end_apply
from syncengine.models import Kind, ScanProblem
from syncengine.reconcile import LOCAL_WORK, Action, Do


def _order(item: tuple[DocRow, Action]) -> tuple[int, str]:
    """Deletions, then moves, then the rest; by path within each group.

    The path order keeps a folder's files together: a flush fsyncs each
    folder written since the last one, and in the plan's own (doc id) order
    a batch of 200 downloads touched about 90 folders instead of 2 or 3.
    """
    row, action = item
    path = row.remote_path or row.path or row.base_path or ""
    if action.do is Do.PULL and row.remote_hash is None:
        return 0, row.path or path  # deletions first: they free paths
    if action.do is Do.PULL and row.path and row.remote_path != row.path:
        return 1, path  # then moves
    return 2, path


def apply_plan(ctx: Context, plan: Plan, flush_every: int = 200) -> Applied:
    """Run every local-side action; a failing document is reported and left for the next pass or round.

    Documents whose file changed under us (an edit landing mid-apply, C8)
    are listed in ``result.underfoot``: the round rescans them and decides
    again, so the edit becomes a conflict in the same round, never a loss.
    """
    work = [item for item in plan if item[1].do in LOCAL_WORK]
    if not work:
        return ctx.result
    begin_apply(ctx.root)
    pending = sorted(work, key=_order)
    parked: dict[str, str] = {}
    try:
        _attempts(ctx, pending, parked, flush_every)
    finally:
        ctx.staged.discard()
    flush(ctx)
    end_apply(ctx.root)
    if parked:
        ctx.result.moved[:] = [(parked.get(old, old), new) for old, new in ctx.result.moved]
    return ctx.result


def _attempts(ctx: Context, pending: Plan, parked: dict[str, str], flush_every: int) -> None:
    for attempt in (0, 1, 2):
        if attempt == 2:
            pending = _park_cycles(ctx, pending, parked)
        blocked: Plan = []
        for done, (row, action) in enumerate(pending, 1):
            if done % staging.AHEAD == 1:
                # The next downloads' bytes are written and made durable together before any is placed.
                ctx.staged.discard()
                staging.stage(ctx, pending[done - 1:done - 1 + staging.AHEAD])
            if ctx.progress and attempt == 0 and (done % 50 == 0 or done == len(pending)):
                ctx.progress("apply", done, len(pending))
            try:
                # Reads of the local file and the blob store fail here too (a
                # full disk, a denied open): one document's problem, not the round's.
                with mapped(row.path or row.remote_path):
                    _run(ctx, row, action)
                ctx.result.failed.pop(row.doc_id, None)
            except ChangedUnderfoot as exc:
                if attempt < 2 and _path_taken(exc):
                    blocked.append((row, action))  # a path another document frees later in the round
                else:
                    _problem(ctx, row, exc)
                    ctx.result.underfoot.append(row.doc_id)
            except (FileSystemError, SyncEngineError) as exc:
                _problem(ctx, row, exc)
            if len(ctx.updates) >= flush_every:
                flush(ctx)
        ctx.staged.discard()
        if not blocked:
            break
        pending = blocked


def _run(ctx: Context, row: DocRow, action: Action) -> None:
    if action.do is Do.PULL:
        _pull(ctx, row)
        if action.conflict:  # deleted here, modified on the server: the modification comes back
            _record_conflict(ctx, row, action.conflict, "modification-wins", "remote")
            if row.remote_path:
                ctx.result.touched[row.remote_path] = [ROOT] if Kind(row.kind).structured else []
    elif action.do is Do.ADOPT:
        _adopt(ctx, row)
    elif action.do is Do.FORGET:
        ctx.deletes.append(row.doc_id)
    else:
        _merge(ctx, row, action)


def _target(row: DocRow, action: Action) -> str | None:
    return action.path if action.do is Do.MERGE else row.remote_path


def _park_cycles(ctx: Context, blocked: Plan, parked_from: dict[str, str]) -> Plan:
    """Crossing moves wait on each other forever: move each one's file to a parking name first.

    Only documents whose destination is the current path of another blocked
    document are parked, so a destination taken by some unrelated file is
    never worked around. A parking name is visible and synced like any name:
    a kill while a file is parked leaves it there, whole, and the next round
    reads it as a move of the same document (its inode did not change).
    """
    sources = {row.path for row, _action in blocked if row.path}
    out: Plan = []
    for row, action in blocked:
        target = _target(row, action)
        if row.path and row.hash and target in sources and target != row.path:
            folder, name = posixpath.split(row.path)
            stem, exts = split_name(name)
            parked = posixpath.join(folder, f"{stem}.moving-{row.doc_id[:8]}{exts}")
            try:
                move_safe(ctx.root, row.path, parked, expect_hash=row.hash)
            except (FileSystemError, SyncEngineError) as exc:
                _problem(ctx, row, exc)
                continue
            failpoint("apply.after_park")
            ctx.updates.append((row.doc_id, {"path": parked}))
            parked_from[parked] = row.path
            row = dataclasses.replace(row, path=parked)
        out.append((row, action))
    # The journal learns the parking names before any file leaves parking: a
    # kill halfway then finds each document where the journal says, or moved
    # on (same inode) — never one document's name holding another's bytes.
    flush(ctx)
    return out


def _path_taken(exc: ChangedUnderfoot) -> bool:
    return "appeared" in exc.message or "is taken" in exc.message


def _problem(ctx: Context, row: DocRow, exc: SyncEngineError) -> None:
    path = row.path or row.remote_path or row.base_path or row.doc_id
    ctx.result.failed[row.doc_id] = ScanProblem(path, exc.message)
    ctx.updates.append((row.doc_id, {"error": f"{exc.title}: {exc.message}"[:500]}))
