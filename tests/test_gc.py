"""gc prunes by retention without breaking any remaining snapshot or base."""

from __future__ import annotations

import os
import time

from syncengine import Workspace
from syncengine import gc as collector
from syncengine.testing import read_tree


def _age_blobs(ws: Workspace, seconds: float = 7200) -> None:
    old = time.time() - seconds
    for digest in ws.blobs.iter_digests():
        os.utime(ws.blobs.path(digest), (old, old))


def test_gc_folds_old_snapshots_and_every_kept_one_still_restores(sample_ws: Workspace):
    """After pruning all but the last two snapshots, both still restore their exact trees."""
    root = sample_ws.root
    trees = {}
    for i in range(4):
        (root / "notes" / "todo.md").write_text(f"version {i}\n")
        if i == 2:
            (root / "notes" / "README.md").unlink()
        snap = sample_ws.snapshot(f"v{i}")
        trees[snap.id] = read_tree(root)
    _age_blobs(sample_ws)
    sample_ws.config.history.keep_last = 2
    report = sample_ws.gc("0s")
    assert report.snapshots_dropped == 2 and report.snapshots_kept == 2
    assert report.blobs_deleted >= 1  # "version 0" and "version 1" of todo.md are gone
    for sid in sorted(trees)[-2:]:
        sample_ws.restore(sid)
        assert read_tree(root) == trees[sid]


def test_gc_keeps_young_snapshots_and_referenced_blobs(sample_ws: Workspace):
    """Snapshots younger than --keep and blobs still referenced are never removed."""
    sample_ws.snapshot()
    _age_blobs(sample_ws)
    before = set(sample_ws.blobs.iter_digests())
    report = sample_ws.gc("30d")
    assert report.snapshots_dropped == 0 and report.blobs_deleted == 0
    assert set(sample_ws.blobs.iter_digests()) == before


def test_gc_spares_fresh_unreferenced_blobs(sample_ws: Workspace):
    """A blob just stored (a sync may be about to reference it) survives gc."""
    digest = sample_ws.blobs.put_bytes(b"not referenced yet")
    collector.collect(sample_ws.journal, sample_ws.blobs, keep_seconds=0, keep_last=1)
    assert sample_ws.blobs.has(digest)
