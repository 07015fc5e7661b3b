"""gc prunes by retention without breaking any remaining snapshot or base."""

from __future__ import annotations

import hashlib
import os
import time

from syncengine import Workspace
from syncengine import blobs as blobstore
from syncengine import gc as collector
from syncengine.blobs import BlobStore
from syncengine.testing import read_tree


def _age_blobs(ws: Workspace, seconds: float = 7200) -> None:
    old = time.time() - seconds
    for digest in ws.blobs.iter_digests():
        ws.blobs.set_stored_at(digest, old)


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


def test_gc_deletes_old_unreferenced_blobs_of_both_places_and_keeps_young_ones(sample_ws: Workspace):
    """Small blobs (the table), large ones (files) and an older store's small file: old and unreferenced go,
    young ones stay, whatever place they are in; the bytes freed count each copy."""
    store = sample_ws.blobs
    old_small, young_small = store.put_bytes(b"old small"), store.put_bytes(b"young small")
    big = os.urandom(blobstore.SMALL + 1)
    old_large, young_large = store.put_bytes(big), store.put_bytes(big[::-1])
    legacy = b"an older store kept every blob as a file"
    old_legacy = _loose(store, legacy)
    assert store.small.has(old_small) and not store.small.has(old_large) and not store.small.has(old_legacy)
    for digest in (old_small, old_large, old_legacy):
        store.set_stored_at(digest, time.time() - 2 * collector.GRACE_SECONDS)
    report = collector.collect(sample_ws.journal, store, keep_seconds=0, keep_last=1)
    assert report.blobs_deleted == 3 and report.bytes_freed >= len(big)
    assert not any(store.has(d) for d in (old_small, old_large, old_legacy))
    assert store.get(young_small) == b"young small" and store.get(young_large) == big[::-1]


def _loose(store: BlobStore, data: bytes) -> str:
    """A small blob as a store written before the table kept it: a file objects/ab/cdef."""
    digest = hashlib.sha256(data).hexdigest()
    store.path(digest).parent.mkdir(exist_ok=True)
    store.path(digest).write_bytes(b"SEB1r" + data)
    return digest
