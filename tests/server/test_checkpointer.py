"""WAL checkpoints on a thread of their own, once writes pause: not inside a writer's COMMIT.

Counted, never timed: the connections' ``wal_autocheckpoint``, the thread's
checkpoints and what the last one copied (``PRAGMA wal_checkpoint``'s answer).
"""

from __future__ import annotations

import hashlib

import syncengine.server.checkpointer as checkpointer_module
import syncengine.server.db as db_module
from syncengine.server.db import WAL_AUTOCHECKPOINT
from syncengine.server.storage import Storage, compress_chunk
from syncengine.testing import wait_until
from tests.server.conftest import item


def _commits(storage: Storage, n: int) -> int:
    ws = storage.ensure_workspace("w")
    data = b"content"
    digest = hashlib.sha256(data).hexdigest()
    storage.put_prepared_blobs(ws, [(digest, len(data), *compress_chunk(data))])
    for k in range(n):
        storage.commit(ws, "c1", [item(f"d{k}-{i}", f"d{k}/{i}.txt", None, digest) for i in range(20)])
    return ws


def test_writers_leave_checkpoints_to_the_thread_which_copies_the_whole_wal_once_writes_pause(traced, monkeypatch):
    storage, _ = traced
    monkeypatch.setattr(checkpointer_module, "QUIET", 0.0)
    with storage.db.connection_context():
        assert storage.db.execute_sql("PRAGMA wal_autocheckpoint").fetchone()[0] == WAL_AUTOCHECKPOINT > 1000
    _commits(storage, 5)
    ckpt = storage._checkpointer
    wait_until(lambda: ckpt.idle() and ckpt.runs, message="the checkpointer to run")
    busy, frames, copied = ckpt.last
    assert busy == 0 and frames > 0 and copied == frames  # everything the writers wrote is in the database file


def test_no_checkpoint_while_writes_keep_coming_and_closing_keeps_the_wal(tmp_path, monkeypatch):
    """Writes not yet paused for QUIET: nothing checkpointed; close() stops the thread; the data is all there."""
    monkeypatch.setattr(checkpointer_module, "QUIET", 3600.0)
    storage = Storage(data_dir=tmp_path)
    try:
        ws = _commits(storage, 3)
        assert storage._checkpointer.runs == 0 and not storage._checkpointer.idle()
    finally:
        storage.close()
    again = Storage(data_dir=tmp_path)
    try:
        assert [c["seq"] for c in again.changes(ws, 0, 100)["changes"]] == list(range(1, 61))
    finally:
        again.close()


def test_a_checkpointed_wal_is_cut_back_to_the_size_limit_when_it_is_next_reused(tmp_path, monkeypatch):
    """The WAL keeps its peak size on disk after a checkpoint unless journal_size_limit cuts it at its reset."""
    limit = 256 << 10
    monkeypatch.setattr(db_module, "JOURNAL_SIZE_LIMIT", limit)
    monkeypatch.setattr(checkpointer_module, "QUIET", 0.0)
    storage = Storage(data_dir=tmp_path)
    try:
        ws = _commits(storage, 40)
        wal = tmp_path / (db_module.DB_FILE + "-wal")
        peak = wal.stat().st_size
        assert peak > limit
        ckpt = storage._checkpointer
        wait_until(lambda: ckpt.idle() and ckpt.runs, message="the checkpointer to run")
        storage.commit(ws, "c1", [item("after", "after.txt", None, hashlib.sha256(b"content").hexdigest())])
        assert wal.stat().st_size <= limit < peak
    finally:
        storage.close()
