"""Downloads written ahead, a flush's worth at a time, so their bytes are made durable at once.

Every file a pull writes used to wait on its own fsync before its rename; a
second replica's first sync spent most of its time on them. The applier now
stages the temp files of the next documents to download (written from the
blob store, not fsynced), makes them all durable with one write-back
(:class:`syncengine.durable.Batch`), and only then runs the actions one
by one as before: each takes its staged temp file and goes through the same
set-aside, verify and rename (:func:`syncengine.fsops.write_atomic`). The
folders are fsynced and the journal committed at the flush, as always
(DESIGN §4 rule 3). Staging changes when the bytes are written, never what
is checked: a user edit landing after staging is still caught at the rename.

A document whose staging failed (a full disk, a damaged blob) keeps that
error: its action raises it, so it fails alone, as it did when it wrote its
own temp file. A staged file no action took is removed; one left by a kill
is removed by the next round (:mod:`syncengine.leftovers`).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import TYPE_CHECKING

from syncengine.durable import Batch
from syncengine.errors import SyncEngineError
from syncengine.fsops import check_fault, failpoint, os_error, stage_temp
from syncengine.reconcile import Action, Do

if TYPE_CHECKING:
    from syncengine.apply import Context
    from syncengine.journal import DocRow

Key = tuple[str, str, int]  # (path, hash, mode) of the file an action will write
AHEAD = 200  # documents staged at a time: about one flush
MAX_FILE = 1 << 20  # stored size above which a download writes and fsyncs its own temp file
MAX_BYTES = 32 << 20  # stored bytes staged at a time


class Staged:
    """Temp files written ahead for the coming actions, or why one could not be written."""

    def __init__(self) -> None:
        self.files: dict[Key, Path | Exception] = {}

    def take(self, path: str, digest: str, mode: int) -> Path | None:
        """The staged temp file for this write (the caller owns it now), or None to write it itself."""
        found = self.files.pop((path, digest, mode), None)
        if isinstance(found, Exception):
            raise found
        return found

    def discard(self) -> None:
        """Remove what no action took (a document that failed, or that changed its plan)."""
        for found in self.files.values():
            if isinstance(found, Path):
                with contextlib.suppress(OSError):
                    os.unlink(found)
        self.files.clear()


def target(row: DocRow) -> Key | None:
    """What a pull of ``row`` writes, as :func:`syncengine.apply._materialise` decides it; None if nothing."""
    from syncengine.apply import exec_mode, versions

    _base, local, remote = versions(row)
    if remote is None or not remote.present:
        return None
    present = local is not None and local.present
    if present and local.hash == remote.hash:
        return None  # a move or a chmod: no bytes to write
    assert remote.hash is not None
    return remote.path, remote.hash, exec_mode(row.mode if present else None, remote.executable)


def stage(ctx: Context, items: list[tuple[DocRow, Action]]) -> None:
    """Write the temp files of the pulls among ``items`` into ``ctx.staged`` and make them durable together."""
    with Batch(ctx.root) as batch:
        written = _write_all(ctx, items)
        if not written:
            return
        failpoint("apply.after_stage")
        try:
            check_fault("sync", ctx.root)  # tests: a write-back that reports EIO or ENOSPC
            batch.sync(written)
        except OSError as exc:
            # None of them is known to be on disk: each document fails with this, and writes nothing.
            error = os_error(exc, "downloads")
            ours = set(written)
            for key, found in list(ctx.staged.files.items()):
                if isinstance(found, Path) and found in ours:
                    with contextlib.suppress(OSError):
                        os.unlink(found)
                    ctx.staged.files[key] = error


def _write_all(ctx: Context, items: list[tuple[DocRow, Action]]) -> list[Path]:
    staged = ctx.staged
    written: list[Path] = []
    budget = MAX_BYTES
    for row, action in items:
        key = target(row) if action.do is Do.PULL else None
        if key is None or key in staged.files:
            continue
        path, digest, mode = key
        try:
            # Small files only: a large one gains nothing from sharing a write-back,
            # and many staged at once would hold their new bytes beside the old.
            size = ctx.blobs.stored_size(digest)
        except OSError:
            size = None
        if size is None:
            continue  # not in the store as one blob: the action reports or handles it
        if size > MAX_FILE or size > budget:
            continue
        budget -= size
        try:
            staged.files[key] = tmp = stage_temp(ctx.root, path, ctx.blobs.iter_verified(digest), mode)
            written.append(tmp)
        except (OSError, SyncEngineError) as exc:
            staged.files[key] = exc
    return written
