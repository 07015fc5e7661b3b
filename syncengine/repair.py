"""`syncengine repair`: a damaged journal or blob table is set aside, and what the files still say is rebuilt.

The journal is derived from the files (DESIGN §3), so a damaged one is
moved aside (never deleted) and rebuilt by a scan, with no base: the next
sync deletes nothing, and every difference with the server becomes a
conflict (Unison's conservative rule; docs/sync-rules.md). The blob table
(``objects/small.db``: merge bases, snapshots' contents) cannot be rebuilt
from anything but the files: a damaged one is moved aside too, and every
current file whose bytes the journal still names is stored again, so
unchanged files merge and restore as before; the versions only it held are
reported lost.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

from syncengine import smallblobs, workspace
from syncengine.errors import JournalDamaged, SyncEngineError
from syncengine.fsops import clean_temp_files
from syncengine.journal import Journal, integrity_ok
from syncengine.reports import RepairReport

if TYPE_CHECKING:
    from syncengine.engine import Workspace


def repair(open_workspace: type[Workspace], root: Path) -> RepairReport:
    """Repair the workspace at ``root`` (see the module docstring); ``open_workspace`` opens it after."""
    layout = workspace.Layout(root)
    state = _journal_state(layout)
    moved = _set_aside_journal(layout) if state == "damaged" else None
    blobs_moved = _set_aside_damaged_blobs(layout)
    ws = open_workspace(root)
    try:
        if state == "ok":
            files = ws.journal.count_present()
        else:
            clean_temp_files(root)
            files = ws.scan().files
            if not integrity_ok(ws.journal.db):
                raise JournalDamaged("the rebuilt journal failed its integrity check")
        restored = lost = 0
        if blobs_moved is not None:
            restored, lost = _store_current_files(ws)
    finally:
        ws.close()
    return RepairReport(moved, files, state, "damaged" if blobs_moved else "ok", blobs_moved, restored, lost)


def _journal_state(layout: workspace.Layout) -> str:
    """ok, damaged (it does not open, or fails its integrity check) or missing."""
    if not layout.journal.exists():
        return "missing"
    with contextlib.suppress(Exception):
        journal = Journal.open(layout.journal)
        try:
            if journal.integrity_ok():
                return "ok"
        finally:
            journal.close()
    return "damaged"


def _set_aside_journal(layout: workspace.Layout) -> str:
    """Move the journal (and its -wal, -shm) aside; drop the events database, which names its rows."""
    import shutil  # not at import: it loads bz2, lzma and zlib

    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    moved = layout.state / f"journal.db.damaged-{stamp}"
    for suffix in ("", "-wal", "-shm"):
        src = Path(str(layout.journal) + suffix)
        if src.exists():
            shutil.move(src, Path(str(moved) + suffix))
    for suffix in ("", "-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(str(layout.events) + suffix)
    return str(moved)


def _set_aside_damaged_blobs(layout: workspace.Layout) -> str | None:
    """Move a blob table that fails its check aside (with its -wal and -shm); where it went, or None."""
    table = layout.objects / "small.db"
    if smallblobs.check(str(table)) != "damaged":
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    aside = table.with_name(f"small.db.damaged-{stamp}")
    for suffix in ("", "-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.replace(f"{table}{suffix}", f"{aside}{suffix}")
    return str(aside)


def _store_current_files(ws: Workspace) -> tuple[int, int]:
    """After a damaged blob table: store again each file whose bytes the journal still needs (a base, a
    snapshot, a conflict's side), so unchanged files merge and restore as before; (stored, snapshot versions
    lost). Only snapshots count as lost: a base or a remote version missing here is the server's to give."""
    wanted = ws.journal.referenced_hashes()
    stored = 0
    for rel, row in ws.journal.local_index().items():
        digest = row[1]
        if digest not in wanted or ws.blobs.has(digest):
            continue
        with contextlib.suppress(OSError, SyncEngineError):  # gone or unreadable now: its versions stay lost
            if ws.blobs.put_file(ws.root / rel)[0] == digest:
                stored += 1
    lost = sum(1 for digest in ws.journal.snapshot_hashes() if not ws.blobs.has(digest))
    return stored, lost
