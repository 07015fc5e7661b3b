"""`diff`: what changed in each document since the last synced base or a snapshot.

The reference for a document is what both sides last agreed (its base);
before the first sync it is the last snapshot. Structured documents are
compared field by field, text by lines, binaries by size and hash.
"""

from __future__ import annotations

from pathlib import Path

from syncengine import documents
from syncengine.blobs import BlobStore
from syncengine.errors import HashMismatch
from syncengine.fsops import read_bytes
from syncengine.journal import Journal
from syncengine.models import DocDiff, Kind

MAX_DIFF_BYTES = 8 << 20  # above this, sizes and hashes only


def _selected(path: str | None, prefix: str | None) -> bool:
    if prefix is None:
        return True
    if path is None:
        return False
    return path == prefix or path.startswith(prefix.rstrip("/") + "/")


def _old_bytes(blobs: BlobStore, digest: str | None) -> bytes | None:
    if digest is None or not blobs.has(digest):
        return None
    try:
        return blobs.get(digest)
    except HashMismatch:
        return None


def _new_bytes(root: Path, path: str | None) -> bytes | None:
    if path is None:
        return None
    try:
        data, _st = read_bytes(root / path)
    except OSError:
        return None
    return data


def _compare(
    root: Path,
    blobs: BlobStore,
    against: str,
    old_path: str | None,
    old_hash: str | None,
    old_size: int | None,
    new_path: str | None,
    new_hash: str | None,
    new_size: int | None,
) -> DocDiff | None:
    if old_path == new_path and old_hash == new_hash:
        return None
    if old_hash is None and new_hash is None:
        return None
    path = new_path or old_path
    assert path is not None
    if old_hash is None:
        status = "added"
    elif new_hash is None:
        status = "removed"
    elif old_path != new_path:
        status = "moved"
    else:
        status = "modified"
    old = _old_bytes(blobs, old_hash) if old_hash != new_hash else None
    new = _new_bytes(root, new_path) if old_hash != new_hash else None
    kind = documents.kind_for(path, (new or old or b"")[:8192])
    fields: tuple = ()
    unified = None
    note = None
    too_big = max(old_size or 0, new_size or 0) > MAX_DIFF_BYTES
    if old_hash == new_hash:
        note = "same content"
    elif kind is Kind.BINARY or too_big:
        note = "binary: sizes and hashes only" if kind is Kind.BINARY else "too large to diff"
    elif old_hash is not None and old is None:
        note = "the earlier version is not in the local store: sizes and hashes only"
    else:
        found, unified, note = documents.describe_diff(path, kind, old, new)
        fields = tuple(found)
    return DocDiff(path=path, status=status, kind=kind, against=against,
                   old_path=old_path if status == "moved" else None,
                   fields=fields, unified=unified, old_size=old_size, new_size=new_size,
                   old_hash=old_hash, new_hash=new_hash, note=note)


def diff_workspace(
    root: Path,
    journal: Journal,
    blobs: BlobStore,
    prefix: str | None = None,
    snapshot_id: int | None = None,
) -> list[DocDiff]:
    """Differences for every document (or those under ``prefix``), sorted by path."""
    out: list[DocDiff] = []
    if snapshot_id is not None:
        ref = journal.snapshot_manifest(snapshot_id)
        now = journal.current_manifest()
        for path in sorted(set(ref) | set(now)):
            if not _selected(path, prefix):
                continue
            old = ref.get(path)
            new = now.get(path)
            item = _compare(root, blobs, f"snapshot {snapshot_id}",
                            path if old else None, old[0] if old else None, old[2] if old else None,
                            path if new else None, new[0] if new else None, new[2] if new else None)
            if item:
                out.append(item)
        return out

    snaps = journal.snapshots(limit=1)
    last = journal.snapshot_manifest(snaps[0][0]) if snaps else {}
    docs = journal.documents()
    # Documents deleted before any sync have no path and no base: their last
    # path comes from the journal, to compare them with the snapshot.
    gone_paths = journal.last_paths(d.doc_id for d in docs if not d.present and not d.has_base) if snaps else {}
    present = {d.path for d in docs if d.present}
    for doc in docs:
        ref_path = doc.path or gone_paths.get(doc.doc_id)
        if not doc.present and not doc.has_base and ref_path in present:
            continue  # the path holds another document now; that one is compared instead
        if not (_selected(ref_path, prefix) or _selected(doc.base_path, prefix)):
            continue
        if doc.has_base:
            against = "base"
            old_path, old_hash = doc.base_path, doc.base_hash
            old_size = None
        elif snaps and ref_path in last:
            against = f"snapshot {snaps[0][0]}"
            old_path = ref_path
            old_hash, _mode, old_size = last[ref_path]
        else:
            against = "nothing"
            old_path = old_hash = old_size = None
        if old_hash is None and not doc.present:
            continue
        item = _compare(root, blobs, against, old_path if old_hash else None, old_hash, old_size,
                        doc.path if doc.present else None, doc.hash, doc.size)
        if item:
            out.append(item)
    return sorted(out, key=lambda d: d.path)
