"""What the server's SQLite storage costs per request: durable commits, and queries per batch, not per item.

A first sync sends hundreds of requests of 100-1000 items; a query per item
made each one cost milliseconds of server CPU. These tests count the SQL
statements SQLite runs (its trace callback), so a per-item query creeping
back into missing, pack or commit fails here rather than in a benchmark.
"""

from __future__ import annotations

import hashlib
import json

from syncengine import protocol as p
from syncengine.server.storage import PACK_PIECE, Storage, compress_chunk
from tests.server.conftest import transactions


def _selects(statements: list[str]) -> list[str]:
    return [s for s in statements if s.lstrip().upper().startswith("SELECT")]


def _blobs(n: int, tag: str = "") -> list[tuple[str, bytes]]:
    out = []
    for i in range(n):
        data = f'{{"doc": {i}, "tag": "{tag}", "text": "{"words " * (i % 50)}"}}'.encode()
        out.append((hashlib.sha256(data).hexdigest(), data))
    return out


def _store(storage: Storage, ws: int, blobs: list[tuple[str, bytes]]) -> None:
    storage.put_prepared_blobs(ws, [(h, len(d), *compress_chunk(d)) for h, d in blobs])


def test_sqlite_commits_are_fsynced_before_the_server_answers(traced):
    """synchronous=FULL on every pooled connection: WAL with NORMAL may lose answered commits on power loss."""
    storage, _ = traced
    with storage.db.connection_context():
        mode = storage.db.execute_sql("PRAGMA journal_mode").fetchone()[0]
        sync = storage.db.execute_sql("PRAGMA synchronous").fetchone()[0]
    assert mode.lower() == "wal" and sync == 2  # 2 = FULL


def test_missing_asks_sqlite_once_for_a_thousand_hashes(traced):
    storage, statements = traced
    ws = storage.ensure_workspace("alpha")
    blobs = _blobs(1000)
    _store(storage, ws, blobs[:400])
    statements.clear()
    missing = storage.missing(ws, [h for h, _ in blobs])
    assert missing == [h for h, _ in blobs[400:]]
    assert len(_selects(statements)) == 1


def test_a_pack_of_a_thousand_blobs_reads_in_a_few_queries_and_stores_each_blob_once(traced):
    storage, statements = traced
    ws = storage.ensure_workspace("alpha")
    blobs = _blobs(1000)
    _store(storage, ws, blobs[:10])
    statements.clear()
    _store(storage, ws, blobs + blobs[:5])  # some known, some twice in the pack
    # Per piece of PACK_PIECE blobs (a transaction each): which are known, then the ids of the new ones;
    # the last piece holds only the five stored by the first, so it has no ids to read.
    assert PACK_PIECE == 250 and len(_selects(statements)) == 2 * 4 + 1
    inserts = [s for s in statements if s.lstrip().upper().startswith("INSERT")]
    assert len(inserts) == 2 * 990  # one blob row and one chunk row per new blob
    infos = storage.blob_infos(ws, [h for h, _ in blobs])
    data = storage.small_blob_data(list(infos.values()))
    assert {h: data[i.pk] for h, i in infos.items()} == dict(blobs)


def test_a_commit_of_100_items_runs_a_fixed_number_of_selects(traced):
    """Op ids, documents, path owners and blob sizes: one query each for the whole batch."""
    storage, statements = traced
    ws = storage.ensure_workspace("alpha")
    blobs = _blobs(200)
    _store(storage, ws, blobs)
    first = [p.CommitItem.make("c1", f"d{i}", f"a/{i}.json", None, h) for i, (h, _) in enumerate(blobs[:100])]
    storage.commit(ws, "c1", first)
    statements.clear()
    edits = [p.CommitItem.make("c1", f"d{i}", f"a/{i}.json", i + 1, blobs[100 + i][0]) for i in range(100)]
    outcome = storage.commit(ws, "c1", edits)
    assert outcome.applied == 100 and [r["rev"] for r in outcome.results] == list(range(101, 201))
    assert len(_selects(statements)) <= 5  # last_seq, ops, docs by id, docs by path, blob sizes
    statements.clear()
    replay = storage.commit(ws, "c1", edits)
    assert replay.applied == 0 and replay.results == outcome.results
    assert len(_selects(statements)) <= 5


def test_an_applied_op_is_stored_as_the_json_of_its_answer_and_replayed_as_it(traced):
    """The op row's text (written by hand, not by json.dumps) is json.dumps of the answer, byte for byte."""
    storage, _ = traced
    ws = storage.ensure_workspace("w")
    blobs = _blobs(3)
    _store(storage, ws, blobs)
    items = [p.CommitItem.make("c1", f"doc-{i}", f"d/{i}.json", None, h) for i, (h, _) in enumerate(blobs)]
    items.append(p.CommitItem.make("c1", "doc-0", "d/0.json", 1, blobs[0][0]))  # identical: ok at rev 1
    first = storage.commit(ws, "c1", items)
    assert [r["rev"] for r in first.results] == [1, 2, 3, 1] and first.applied == 3
    with storage.db.connection_context():
        stored = dict(storage.db.execute_sql('SELECT "op_id", "result" FROM "op"').fetchall())
    assert len(stored) == 4
    for item, answer in zip(items, first.results, strict=True):
        assert stored[item.op_id] == json.dumps(answer)
    again = storage.commit(ws, "c1", items)
    assert again.results == first.results and again.applied == 0


def test_a_pack_nobody_waits_behind_is_one_transaction_and_a_waiting_commit_splits_it(traced, monkeypatch):
    """Each transaction is an fsync (~3 ms): pieces share one until a commit waits at the writers' gate."""
    import syncengine.server.storage as storage_module

    storage, statements = traced
    ws = storage.ensure_workspace("alpha")
    blobs = _blobs(4 * PACK_PIECE)
    statements.clear()
    _store(storage, ws, blobs[: 2 * PACK_PIECE])
    assert transactions(statements) == ["BEGIN", "COMMIT"]
    # A commit waiting (as the gate counts it): the pack lets go after each piece.
    monkeypatch.setattr(storage_module, "_PATIENCE", 0.0)
    storage._writers._urgent = 1
    statements.clear()
    _store(storage, ws, blobs[2 * PACK_PIECE :])
    storage._writers._urgent = 0
    assert transactions(statements) == ["BEGIN", "COMMIT"] * 2
    infos = storage.blob_infos(ws, [h for h, _ in blobs])
    data = storage.small_blob_data(list(infos.values()))
    assert {h: data[i.pk] for h, i in infos.items()} == dict(blobs)
