"""One sync round (DESIGN §4): capture, pull, reconcile, apply, push, repeat until settled.

Every step is idempotent and records its progress in the journal before the
next starts, so a round killed at any point is finished by the next one.
A round makes a few passes at most: a push refused because the server moved
on records the winner as the remote state, and the next pass resolves on
top of it.
"""

from __future__ import annotations

import contextlib
import gc
import os
import sqlite3
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from syncengine import leftovers, scanner
from syncengine import pull as pulling
from syncengine.config import check_strategy
from syncengine.errors import MassDeleteGuard, RootMissing, SyncEngineError
from syncengine.fsops import failpoint
from syncengine.journal import DocRow, Journal
from syncengine.locks import FileLock
from syncengine.models import PlannedAction, ScanProblem, SyncReport
from syncengine.paths import RULES_FILE
from syncengine.reconcile import FIRST_PUSH, LOCAL_WORK, Action, Do, reconcile, versions
from syncengine.remote import Remote

if TYPE_CHECKING:
    from syncengine.apply import Applied, Context
    from syncengine.blobs import BlobStore
    from syncengine.engine import Workspace

MAX_PASSES = 5
Progress = Callable[[str, int, int | None], None]


def plan_for(journal: Journal, rows: list[DocRow] | None = None) -> list[tuple[DocRow, Action]]:
    """reconcile() for every document not in step, skipping open manual conflicts."""
    rows = journal.unsettled() if rows is None else rows
    if pulling.rejoin(journal, rows):
        rows = journal.unsettled()
    waiting = {c["doc_id"] for c in journal.open_conflicts()}
    plan = []
    for row in rows:
        if row.doc_id in waiting:
            continue
        if row.base_rev is None and row.remote_rev is None and row.path is not None and row.hash is not None:
            # No base, unknown to the server, here: rule N4, as reconcile() says, without
            # building three Versions and an Action per row (a first sync of 10,000: all of them).
            plan.append((row, FIRST_PUSH))
            continue
        action = reconcile(*versions(row))
        if action.do is not Do.NOTHING:
            plan.append((row, action))
    return plan


def check_guard(journal: Journal, plan: list[tuple[DocRow, Action]], *, pct: float, minimum: int) -> str | None:
    """Why this plan must not run without --force (mass deletion), or None.

    Deletions to push and deletions to apply here are counted apart; each
    trips the guard above ``pct`` percent of the files *and* above
    ``minimum`` files. Pushing the deletion of every file there is trips it
    whatever the numbers: that is what an emptied or unmounted root looks
    like, never what a person meant without saying --force.
    """
    push_deletes = pull_deletes = 0
    for row, a in plan:
        if a is FIRST_PUSH:  # a file only here (all of a first sync's 10,000): never a deletion
            continue
        if a.do is Do.PUSH:
            push_deletes += row.path is None and bool(row.base_hash)
        elif a.do is Do.PULL:
            pull_deletes += row.remote_hash is None and bool(row.path)
    present = journal.count_present()
    total = max(present + push_deletes, 1)
    if push_deletes and not present:
        return (f"this sync would delete all {push_deletes} files on the server: "
                "is the workspace folder emptied or unmounted?")
    for count, where in ((push_deletes, "on the server"), (pull_deletes, "here")):
        if count > minimum and count > total * pct / 100:
            return (f"this sync would delete {count} of {total} files {where} "
                    f"({100 * count / total:.0f}%, limit {pct:g}%)")
    return None


def _strategy_lookup(ws: Workspace, override: str | None) -> Callable[..., tuple[str, dict | None]]:
    """``(path, kind) -> (strategy, field rules)``: --strategy, else .syncrules, else config.toml.

    .syncrules is read here, before the lock and the first request, so a bad
    one stops the run with nothing synced (exit 2) — even under --strategy,
    which replaces every strategy and field rule it names for this run.
    """
    default = check_strategy(override or ws.config.sync.strategy)
    rules = None
    # The rules' module (~0.8 ms of imports) only where there may be a file: lexists, so that a dangling or
    # looping link still goes to load(), which reports what it finds.
    if os.path.lexists(ws.root / RULES_FILE):
        with contextlib.suppress(ImportError):
            from syncengine import rules as rules_mod

            rules = rules_mod.load(ws.root)
    if rules is None or override:
        return lambda path, kind=None: (default, None)

    def lookup(path: str, kind: str | None = None) -> tuple[str, dict | None]:
        strategy, fields = rules.for_path(path, kind)
        return (strategy or default), fields

    return lookup


def _newer(remote: Remote) -> Callable[[DocRow], bool]:
    """Is the local change newer? Times are the server's: ours corrected by the measured offset."""
    offset: list[int] = []

    def local_is_newer(row: DocRow) -> bool:
        if not offset:
            before = time.time_ns()
            server_time = remote.health().time
            offset.append(server_time - (before + time.time_ns()) // 2)
        local = (row.local_at or 0) + offset[0]
        # A tie goes by seq: the unsent local change would take a later one.
        return local >= (row.remote_at or 0)

    return local_is_newer


def sync_once(
    ws: Workspace,
    *,
    remote: Remote | None = None,
    strategy: str | None = None,
    dry_run: bool = False,
    force: bool = False,
    max_delete: float | None = None,
    wait: float | None = None,
    progress: Progress | None = None,
) -> SyncReport:
    started = time.monotonic()
    cfg = ws.config
    strategy_for = _strategy_lookup(ws, strategy)
    pct = cfg.sync.max_delete if max_delete is None else max_delete
    _check_root(ws)
    with FileLock(ws.layout.sync_lock, "sync").acquire(cfg.sync.wait if wait is None else wait):
        own_remote = remote is None
        remote = remote or ws.open_remote()
        try:
            if dry_run:
                return _dry_run(ws, remote, pct, force, started)
            with _fewer_collections():
                return _round(ws, remote, strategy_for, pct, force, progress, started)
        finally:
            if own_remote:
                remote.close()


ROUND_GC_THRESHOLD = 20_000  # allocations between two young collections during a round (Python's default: 700)
_gc_lock = threading.Lock()
_gc_rounds = 0
_gc_saved: tuple[int, ...] = ()


@contextlib.contextmanager
def _fewer_collections() -> Iterator[None]:
    """Run a round with the cyclic collector's first threshold raised, then put it back.

    A round allocates rows, answers and items by the ten thousand, nearly
    all freed by their reference counts, yet each 700 allocations start a
    collection, which holds the GIL and so stops every thread of the push:
    a 10k first sync ran 245 young, 22 middle and 2 full collections, 92-128
    ms in all; with 20,000, 27 and none, ~25 ms. Process-wide, so counted:
    the last of overlapping rounds (a daemon's and a test's) restores it.
    """
    global _gc_rounds, _gc_saved
    with _gc_lock:
        if _gc_rounds == 0:
            _gc_saved = gc.get_threshold()
            gc.set_threshold(max(ROUND_GC_THRESHOLD, _gc_saved[0]), *_gc_saved[1:])
        _gc_rounds += 1
    try:
        yield
    finally:
        with _gc_lock:
            _gc_rounds -= 1
            if _gc_rounds == 0:
                gc.set_threshold(*_gc_saved)


def _round(ws: Workspace, remote: Remote, strategy_for, pct: float, force: bool,
           progress: Progress | None, started: float) -> SyncReport:
    journal = ws.journal
    cfg = ws.config
    client_id = journal.client_id
    writes = journal.writes
    _check_root(ws)
    leftovers.recover(ws.root)
    scan = ws.scan(progress=(lambda n, t: progress("hash", n, t)) if progress else None)
    failpoint("sync.after_scan")
    problems: list[ScanProblem] = list(scan.problems)
    pulled = pulling.pull(journal, remote)
    pulled.save(journal)
    failpoint("sync.after_pull")
    problems += pulled.problems
    # The apply's context, and the apply and push modules, are loaded by the first pass that has
    # something to apply or push: a no-op round never imports them (tests/test_cli_imports.py).
    ctx: Context | None = None
    pushed_paths: list[str] = []
    uploaded = 0
    passes = 0
    entries = pulled.entries
    for passes in range(1, MAX_PASSES + 1):
        plan = plan_for(journal)
        reason = check_guard(journal, plan, pct=pct, minimum=cfg.sync.max_delete_min)
        if reason and not force:
            journal.update_state(guard=reason)
            raise MassDeleteGuard(reason, hint="check the files, then run `syncengine sync --force`")
        if passes == 1:
            journal.update_state(guard=None)
        if ctx is not None:
            ctx.result.underfoot.clear()
        if any(action.do in LOCAL_WORK for _row, action in plan):  # a round that only pushes never loads it
            from syncengine import applier
            from syncengine import apply as applying

            if ctx is None:
                ctx = applying.Context(ws.root, journal, ws.blobs, client_id, strategy_for, _newer(remote),
                                       progress=progress)
            _fetch_blobs(ws, remote, plan, progress)
            applier.apply_plan(ctx, plan)
            # What this pass merged is committed: publish it now, whatever the rest of the round does.
            ws.publish_zones(ctx.result.touched, origin="merge")
            ctx.result.touched.clear()
        copies = bool(ctx and ctx.result.copies)
        changed_underfoot = bool(ctx and ctx.result.underfoot) and passes < MAX_PASSES
        if copies or changed_underfoot:
            # Journal the conflict copies (pushed like any file) and the edits
            # that landed during the apply (decided again in the next pass).
            ws.scan()
        if all(action.do is Do.PUSH for _row, action in plan) and not (copies or changed_underfoot):
            # Nothing was applied nor rescanned, so planning again (a tenth of a second
            # for a first push of 10,000) would find these same pushes.
            to_push = [row for row, _action in plan]
        else:
            to_push = [row for row, action in plan_for(journal) if action.do is Do.PUSH]
        if progress:
            progress("push", 0, len(to_push))
        if not to_push:
            if not changed_underfoot:
                break
            continue
        from syncengine import push as pushing

        push_progress = (lambda n, t: progress("push", n, t)) if progress else None
        result = pushing.push(ws.root, journal, ws.blobs, remote, to_push, client_id=client_id,
                              batch=cfg.sync.batch, progress=push_progress,
                              server_empty=passes == 1 and pulled.server_empty)
        pushed_paths += result.committed
        uploaded += result.uploaded
        problems += result.problems
        refused = bool(result.conflicts or result.moved_aside)
        if not refused and not changed_underfoot:
            break
        if refused:
            again = pulling.pull(journal, remote)
            again.save(journal)
            failpoint("sync.after_repull")
            entries += again.entries
    failpoint("sync.before_state")
    # A round that wrote nothing ends without writing either (no fsync): see Journal.record_sync_ok.
    journal.record_sync_ok(time.time_ns(), quiet=journal.writes == writes)
    applied: Applied | None = ctx.result if ctx is not None else None
    if applied is not None:
        problems += applied.problems
    return SyncReport(
        server=remote_url(ws), workspace=ws.config.server.workspace, dry_run=False, pulled=entries,
        full_listing=pulled.full, downloaded=tuple(applied.downloaded) if applied else (),
        deleted=tuple(applied.deleted) if applied else (), moved=tuple(applied.moved) if applied else (),
        pushed=tuple(pushed_paths), uploaded=uploaded,
        conflicts=tuple(ws.conflict_infos(applied.resolved)) if applied else (),
        open_conflicts=len(journal.open_conflicts()), copies=tuple(applied.copies) if applied else (),
        problems=tuple(problems), scan=scan, passes=passes, seconds=round(time.monotonic() - started, 3))


def _check_root(ws: Workspace) -> None:
    """A root that vanished under an open workspace (moved, unmounted) is never read as deletions."""
    if not ws.root.is_dir() or not ws.layout.state.is_dir():
        raise RootMissing(f"the workspace folder {ws.root} is gone", hint="is it unmounted? nothing was synced")


def remote_url(ws: Workspace) -> str:
    return os.environ.get("SYNCENGINE_SERVER") or ws.config.server.url


def _fetch_blobs(ws: Workspace, remote: Remote, plan: list[tuple[DocRow, Action]], progress: Progress | None) -> None:
    """Download, verify and store every remote version this pass needs, in packs."""
    from concurrent.futures import Future, ThreadPoolExecutor  # (~1.5 ms) only a round that downloads

    wanted: list[str] = []
    for row, action in plan:
        digest = row.remote_hash
        if not digest or ws.blobs.has(digest):
            continue
        needs_remote_bytes = action.do is Do.PULL or (
            action.do is Do.MERGE and (action.content_conflict or action.hash == digest))
        if needs_remote_bytes and digest != row.hash:
            wanted.append(digest)
    wanted = list(dict.fromkeys(wanted))
    if not wanted:
        return
    if progress:
        progress("download", 0, len(wanted))
    # Small blobs are stored a pack at a time (BlobStore.put_many: written,
    # made durable at once, renamed) on a thread while the next pack streams
    # in; a fsync each was most of a first download. A large blob is stored
    # at once: its bytes live in a temp file that goes when the fetch moves
    # on. At most two packs of small blobs are held, one filling and one
    # being stored, so memory stays bounded.
    with ThreadPoolExecutor(1, thread_name_prefix="fetch-store") as pool:
        storing: Future | None = None
        pack: list[tuple[bytes, str]] = []
        held = 0
        for done, blob in enumerate(remote.fetch(wanted), 1):
            if blob.ok and blob.data is not None:
                pack.append((blob.data, blob.hash))
                held += len(blob.data)
            elif blob.ok:
                ws.blobs.put_stream(blob.chunks(), expect=blob.hash)
            if len(pack) >= _PACK or held >= _PACK_BYTES:
                if storing is not None:
                    _stored(storing.result())
                storing = pool.submit(_store_pack, ws.blobs, pack)
                pack, held = [], 0
            if progress:
                progress("download", done, len(wanted))
        if storing is not None:
            _stored(storing.result())
        if pack:
            _stored(_store_pack(ws.blobs, pack))


_PACK = 256
_PACK_BYTES = 16 << 20


def _store_pack(blobs: BlobStore, pack: list[tuple[bytes, str]]) -> list[str | SyncEngineError]:
    return blobs.put_many([data for data, _digest in pack], expect=[digest for _data, digest in pack])


def _stored(results: list[str | SyncEngineError]) -> None:
    """A blob that could not be stored stops the round, as it always did (nothing that needs it is applied)."""
    for result in results:
        if isinstance(result, Exception):
            raise result


def _dry_run(ws: Workspace, remote: Remote, pct: float, force: bool, started: float) -> SyncReport:
    """Plan on a throwaway copy of the journal: the workspace is not written at all.

    A plan the safety guard would stop is still shown, and the report
    carries the guard's reason, so the dry run exits 6 as the real run
    would (a script asks "would this sync go through?"), 0 with --force.
    """
    with tempfile.TemporaryDirectory(prefix="syncengine-dry-") as tmp:
        copy = Path(tmp) / "journal.db"
        source = sqlite3.connect(ws.layout.journal)
        try:
            source.execute("VACUUM INTO ?", (str(copy),))
        finally:
            source.close()
        journal = Journal.open(copy)
        try:
            changes, restamps, scan = scanner.detect(ws.root, journal, ws.ignore)
            journal.record_local(changes, restamps)
            pulled = pulling.pull(journal, remote)
            pulled.save(journal)
            plan = plan_for(journal)
            reason = check_guard(journal, plan, pct=pct, minimum=ws.config.sync.max_delete_min)
            planned = tuple(
                PlannedAction(row.path or row.remote_path or row.base_path or row.doc_id, action.do.value,
                              action.rule, action.conflict.value if action.conflict else None)
                for row, action in plan)
            problems = list(scan.problems) + pulled.problems
        finally:
            journal.close()
    return SyncReport(server=remote_url(ws), workspace=ws.config.server.workspace, dry_run=True,
                      pulled=pulled.entries, full_listing=pulled.full, plan=planned, problems=tuple(problems),
                      scan=scan, guard=None if force else reason, seconds=round(time.monotonic() - started, 3))
