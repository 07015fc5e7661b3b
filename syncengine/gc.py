"""`gc`: prune old snapshots and the blobs nothing needs any more.

Retention keeps every snapshot younger than ``--keep`` and always the newest
``keep_last``; older ones are folded into the oldest kept snapshot, so
what remains restores exactly as before. A blob is deleted only when no
snapshot, base, current or remote version, or conflict names it, and it is
older than a grace period — a sync running alongside may be about to
reference a blob it has just stored.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from syncengine.blobs import BlobStore
from syncengine.journal import Journal

GRACE_SECONDS = 3600


@dataclass(frozen=True, slots=True)
class GcReport:
    snapshots_dropped: int
    snapshots_kept: int
    blobs_deleted: int
    bytes_freed: int


def collect(journal: Journal, blobs: BlobStore, *, keep_seconds: float, keep_last: int,
            now: float | None = None) -> GcReport:
    now = now or time.time()
    rows = journal.snapshots()  # newest first
    cutoff_ns = int((now - keep_seconds) * 1e9)
    kept = [r for i, r in enumerate(rows) if i < keep_last or r[1] >= cutoff_ns]
    dropped = 0
    if kept and len(kept) < len(rows):
        dropped = journal.fold_snapshots(min(r[0] for r in kept))
    needed = journal.referenced_hashes()
    grace = now - GRACE_SECONDS
    # name -> (latest store time, bytes) over its copies: an older store may hold a small
    # blob both as a file and in the table, and it goes only when neither copy is young.
    found: dict[str, tuple[float, int]] = {}
    for digest, stored_at, size in blobs.iter_stamped():
        if digest not in needed:
            latest, total = found.get(digest, (stored_at, 0))
            found[digest] = (max(latest, stored_at), total + size)
    doomed = [digest for digest, (stored_at, _size) in found.items() if stored_at <= grace]
    blobs.delete_many(doomed)
    blobs.clean_tmp()
    return GcReport(dropped, len(rows) - dropped, len(doomed), sum(found[d][1] for d in doomed))
