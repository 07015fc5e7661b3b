"""Group commit on SQLite: the commits waiting for the writer share one transaction and one fsync.

Each commit of a group runs in its own SAVEPOINT, so one that is refused or
fails gets its own answer and the others theirs; none is answered before the
group's COMMIT; if the group's transaction is lost, every commit of it fails
and the clients' retries (same op ids) land exactly once. Groups are made
deterministic by holding the writer (the gate, or SQLite's own lock from
another connection) while the commits queue; transactions are counted with
SQLite's trace callback, never timed.
"""

from __future__ import annotations

import contextlib
import hashlib
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from syncengine import protocol as p
from syncengine.server.db import StorageError
from syncengine.server.storage import Storage, compress_chunk
from syncengine.testing import wait_until
from tests.server.conftest import Api, item, trace_sqlite, transactions
from tests.server.test_concurrency import _serve_cmd


def _blob(storage: Storage, ws: int, text: str) -> str:
    data = text.encode()
    digest = hashlib.sha256(data).hexdigest()
    storage.put_prepared_blobs(ws, [(digest, len(data), *compress_chunk(data))])
    return digest


@contextlib.contextmanager
def _writer_held(storage: Storage) -> Iterator[threading.Event]:
    """Hold the storage's writer from another thread until the yielded event is set (or the block ends)."""
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with storage._write():
            held.set()
            release.wait(30)

    holder = threading.Thread(target=hold)
    holder.start()
    held.wait(10)
    try:
        yield release
    finally:
        release.set()
        holder.join(10)


def _in_threads(calls: list[Callable[[], Any]]) -> tuple[list[threading.Thread], dict[int, Any]]:
    """Start each call in a thread; the dict gets each one's result or exception by index."""
    out: dict[int, Any] = {}

    def run(i: int, call: Callable[[], Any]) -> None:
        try:
            out[i] = call()
        except BaseException as exc:  # the test reads it
            out[i] = exc

    threads = [threading.Thread(target=run, args=(i, c)) for i, c in enumerate(calls)]
    for t in threads:
        t.start()
    return threads, out


def _queued(storage: Storage, n: int) -> None:
    wait_until(lambda: len(storage._writers._queue) >= n, message=f"{n} commits queued at the writer")


def _log(storage: Storage, ws: int) -> list[tuple[int, str]]:
    return [(c["seq"], c["doc_id"]) for c in storage.changes(ws, 0, 1000)["changes"]]


def test_commits_from_clients_and_workspaces_that_wait_together_share_one_transaction(server, api_for):
    """Over HTTP: four commits queued behind the writer (two workspaces, three clients, one refused) -> one COMMIT."""
    storage = server.storage
    alpha, beta = api_for(server, "alpha"), api_for(server, "beta")
    blob_a, blob_b = alpha.put_blob(b"alpha's bytes"), beta.put_blob(b"beta's bytes")
    assert alpha.commit([item("taken", "taken.txt", None, blob_a, client_id="c0")], client_id="c0")[0]["seq"] == 1
    statements: list[str] = []
    trace_sqlite(storage, statements.append)
    batches = [
        (alpha, "c1", [item(f"c1-{i}", f"c1/{i}.txt", None, blob_a, client_id="c1") for i in range(3)]),
        (alpha, "c2", [item(f"c2-{i}", f"c2/{i}.txt", None, blob_a, client_id="c2") for i in range(2)]),
        # refused: a new document on a path another one holds (a conflict), and one on a free path
        (alpha, "c3", [item("c3-0", "taken.txt", None, blob_a, client_id="c3"),
                       item("c3-1", "c3.txt", None, blob_a, client_id="c3")]),
        (beta, "c1", [item(f"b-{i}", f"b/{i}.txt", None, blob_b, client_id="c1") for i in range(4)]),
    ]
    # each thread its own session (a requests.Session is not shared across threads)
    apis = [Api(api.url, api.ws, api.token) for api, _c, _i in batches]
    with _writer_held(storage):
        threads, answers = _in_threads([lambda a=a, c=c, i=i: a.commit(i, client_id=c)
                                        for a, (_api, c, i) in zip(apis, batches, strict=True)])
        _queued(storage, len(batches))
        statements.clear()
    for t in threads:
        t.join(30)
    for api in apis:
        api.close()
    # the holder's COMMIT, then the four commits': one transaction, one fsync
    assert transactions(statements) == ["COMMIT", "BEGIN", "COMMIT"]
    assert all(not isinstance(a, BaseException) for a in answers.values()), answers
    c1, c2, c3, b = (answers[i] for i in range(4))
    assert [r["status"] for r in c3] == ["conflict", "ok"] and c3[0]["current"]["doc_id"] == "taken"
    alpha_seqs = sorted(r["seq"] for r in c1 + c2 + c3[1:])
    assert alpha_seqs == list(range(2, 2 + 6))  # gap-free after seq 1, whatever order the group ran them in
    assert [r["seq"] for r in b] == [1, 2, 3, 4]  # beta has its own seqs
    for answer in (c1, c2, b):
        seqs = [r["seq"] for r in answer]
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))  # one commit's items stay together, in order
    feed = alpha.changes()
    assert [c["seq"] for c in feed["changes"]] == list(range(1, 8)) and feed["last_seq"] == 7
    assert {c["doc_id"]: c["seq"] for c in feed["changes"]} == {r["doc_id"]: r["seq"]
                                                                for r in c1 + c2 + c3[1:]} | {"taken": 1}
    # replays answer as the first time, outside any group too
    assert alpha.commit(batches[0][2], client_id="c1") == c1


def test_a_commit_that_fails_inside_a_group_rolls_back_alone(traced):
    """A statement of one commit fails (a trigger of this test refuses it): that commit errs, the others land."""
    storage, statements = traced
    ws = storage.ensure_workspace("w")
    digest = _blob(storage, ws, "x")
    with storage.db.connection_context():
        storage.db.execute_sql("""CREATE TRIGGER refuse BEFORE INSERT ON "change" WHEN NEW."doc_id" = 'bad'
                                  BEGIN SELECT RAISE(ABORT, 'refused by the test'); END""")
    good1 = [item(f"g1-{i}", f"g1/{i}", None, digest) for i in range(3)]
    bad = [item("fine", "fine", None, digest), item("bad", "bad", None, digest)]
    good2 = [item(f"g2-{i}", f"g2/{i}", None, digest) for i in range(2)]
    with _writer_held(storage):
        threads, answers = _in_threads([lambda b=b: storage.commit(ws, "c1", b) for b in (good1, bad, good2)])
        _queued(storage, 3)
        statements.clear()
    for t in threads:
        t.join(30)
    assert transactions(statements) == ["COMMIT", "BEGIN", "COMMIT"]  # the holder's, then the group's
    assert isinstance(answers[1], StorageError) and "refused by the test" in answers[1].message
    assert answers[0].applied == 3 and answers[2].applied == 2
    log = _log(storage, ws)
    assert [s for s, _ in log] == [1, 2, 3, 4, 5]  # the failed commit's seqs were not used: no gap
    assert {d for _, d in log} == {c.doc_id for c in good1 + good2}  # nothing of the failed commit, not even "fine"
    with storage.db.connection_context():
        storage.db.execute_sql("DROP TRIGGER refuse")
    assert [r["status"] for r in storage.commit(ws, "c1", bad).results] == ["ok", "ok"]  # its retry lands
    assert [s for s, _ in _log(storage, ws)] == [1, 2, 3, 4, 5, 6, 7]


def test_a_group_whose_transaction_is_lost_fails_every_commit_in_it_and_the_retries_land_once(traced):
    """SQLite rolls the whole transaction back: commits that had run in it are not answered ok."""
    storage, _ = traced
    ws = storage.ensure_workspace("w")
    digest = _blob(storage, ws, "x")
    with storage.db.connection_context():
        storage.db.execute_sql("""CREATE TRIGGER doom BEFORE INSERT ON "change" WHEN NEW."doc_id" = 'doom'
                                  BEGIN SELECT RAISE(ROLLBACK, 'the transaction is lost'); END""")
    batches = [[item(f"a{i}", f"a{i}", None, digest)] for i in range(2)]
    batches.insert(1, [item("doom", "doom", None, digest)])
    with _writer_held(storage):
        threads, answers = _in_threads([lambda b=b: storage.commit(ws, "c1", b) for b in batches])
        _queued(storage, 3)
    for t in threads:
        t.join(30)
    assert all(isinstance(answers[i], StorageError) for i in range(3)), answers
    assert _log(storage, ws) == []
    for batch in (batches[0], batches[2]):  # retried alone, the same op ids
        assert storage.commit(ws, "c1", batch).applied == 1
    assert sorted(d for _, d in _log(storage, ws)) == ["a0", "a1"]
    assert storage.commit(ws, "c1", batches[0]).applied == 0  # and a replay is a replay


def _pack(n: int) -> list[tuple[str, int, bool, bytes]]:
    return [(hashlib.sha256(f"blob {i}".encode()).hexdigest(), len(f"blob {i}"), False, f"blob {i}".encode())
            for i in range(n)]


def _commit_behind_the_pack(storage: Storage, statements: list[str], ws: int, batches: list[list]) -> list[Any]:
    """Trace statements; at the pack's first chunk row, commit ``batches`` from threads and wait until they queue.

    Returns where the (threads, answers) of those commits will be, once the pack has started.
    """
    started: list[Any] = []

    def on_statement(sql: str) -> None:
        statements.append(sql)
        if not started and sql.lstrip().upper().startswith('INSERT INTO "BLOB_CHUNK"'):
            started.append(_in_threads([lambda b=b: storage.commit(ws, "c1", b) for b in batches]))
            _queued(storage, len(batches))

    trace_sqlite(storage, on_statement)
    return started


def test_commits_waiting_behind_a_pack_share_its_transaction(traced):
    """A pack piece being stored when commits queue: they run in its transaction, answered after its COMMIT."""
    storage, statements = traced
    ws = storage.ensure_workspace("w")
    digest = _blob(storage, ws, "known")
    pack = _pack(10)
    batches = [[item(f"d{k}-{i}", f"d{k}/{i}", None, digest) for i in range(2)] for k in range(2)]
    started = _commit_behind_the_pack(storage, statements, ws, batches)
    statements.clear()
    storage.put_prepared_blobs(ws, pack)
    threads, answers = started[0]
    for t in threads:
        t.join(30)
    assert transactions(statements) == ["BEGIN", "COMMIT"]  # the pack piece and both commits
    assert sorted(r["seq"] for k in (0, 1) for r in answers[k].results) == [1, 2, 3, 4]
    assert len(storage.blob_infos(ws, [h for h, *_ in pack])) == 10


def test_a_pack_transaction_lost_with_commits_in_it_fails_them_all_and_the_retries_land(traced):
    """A commit in a pack's transaction makes SQLite roll it all back: the pack and every commit in it fail."""
    storage, statements = traced
    ws = storage.ensure_workspace("w")
    digest = _blob(storage, ws, "known")
    with storage.db.connection_context():
        storage.db.execute_sql("""CREATE TRIGGER doom BEFORE INSERT ON "change" WHEN NEW."doc_id" = 'doom'
                                  BEGIN SELECT RAISE(ROLLBACK, 'the transaction is lost'); END""")
    pack = _pack(10)
    batches = [[item("fine", "fine", None, digest)], [item("doom", "doom", None, digest)]]
    started = _commit_behind_the_pack(storage, statements, ws, batches)
    with pytest.raises(StorageError):
        storage.put_prepared_blobs(ws, pack)
    threads, answers = started[0]
    for t in threads:
        t.join(30)
    assert isinstance(answers[0], StorageError) and isinstance(answers[1], StorageError)
    assert storage.blob_infos(ws, [h for h, *_ in pack]) == {} and _log(storage, ws) == []
    storage.put_prepared_blobs(ws, pack)  # the client's retries
    assert storage.commit(ws, "c1", batches[0]).applied == 1
    assert len(storage.blob_infos(ws, [h for h, *_ in pack])) == 10 and _log(storage, ws) == [(1, "fine")]


def test_a_commit_queued_past_the_busy_timeout_gives_up_and_changes_nothing(traced, monkeypatch):
    """Still queued (no group took it) when the busy timeout ends: BusyError (a 503), the queue left clean."""
    import syncengine.server.storage as storage_module
    from syncengine.errors import BusyError

    storage, _ = traced
    ws = storage.ensure_workspace("w")
    digest = _blob(storage, ws, "x")
    monkeypatch.setattr(storage_module, "_BUSY_TIMEOUT", 0.2)
    with _writer_held(storage), pytest.raises(BusyError):
        storage.commit(ws, "c1", [item("d", "d", None, digest)])
    assert storage._writers._queue == [] and _log(storage, ws) == []
    assert storage.commit(ws, "c1", [item("d", "d", None, digest)]).applied == 1


@pytest.mark.integration
def test_a_server_killed_while_a_group_is_open_keeps_what_it_acknowledged_and_the_retries_converge(
        tmp_path, monkeypatch):
    """`serve` SIGKILLed between a group's writes and its COMMIT: nothing of the group, all it answered before."""
    data = tmp_path / "data"
    storage = Storage(data_dir=data)
    try:
        token = storage.create_token("alpha")[1]
        beta_token = storage.create_token("beta")[1]
    finally:
        storage.close()
    clients = [("alpha", token, f"c{n}") for n in range(4)] + [("beta", beta_token, "c0")]
    digest = hashlib.sha256(b"content").hexdigest()
    batches = {(ws, c): [item(f"{ws}-{c}-{i}", f"{c}/{i}.txt", None, digest, client_id=c) for i in range(5)]
               for ws, _t, c in clients}
    # The second group the server opens is killed before its COMMIT.
    monkeypatch.setenv("SYNCENGINE_FAILPOINT", "server.group.before_commit:2")
    with _serve_cmd(["--data", str(data)]) as url:
        monkeypatch.delenv("SYNCENGINE_FAILPOINT")
        first, other = Api(url, "alpha", token), Api(url, "beta", beta_token)
        first.put_blob(b"content")
        other.put_blob(b"content")
        acked = first.commit(batches[("alpha", "c0")], client_id="c0")  # group 1: answered
        assert [r["seq"] for r in acked] == [1, 2, 3, 4, 5]
        first.close()
        other.close()
        wait_until(lambda: _connections(url) == 0, message="the first connections to close")
        apis = {(ws, c): Api(url, ws, t) for ws, t, c in clients}  # a session (a connection) per thread
        # Another connection holds SQLite's write lock: the next leader waits in BEGIN and the others queue.
        lock = sqlite3.connect(data / "server.db", isolation_level=None)
        lock.execute("BEGIN IMMEDIATE")
        rest = [k for k in batches if k != ("alpha", "c0")]

        def send(key: tuple[str, str]) -> int:
            api = apis[key]
            body = {"client_id": key[1], "items": [p.to_dict(i) for i in batches[key]]}
            try:
                return api.call("POST", "/v1/ws/{ws}/commit", json=body).status_code
            except requests.ConnectionError:
                return -1  # the server died with the request unanswered

        threads, answers = _in_threads([lambda k=k: send(k) for k in rest])
        wait_until(lambda: _connections(url) >= len(rest) or len(answers) == len(rest),
                   message="the commits to reach the server")
        # Time for them to be read and queued behind the leader (not asserted: whatever the group
        # holds when the server dies, none of it may survive, and every request dies unanswered).
        time.sleep(0.5)
        lock.rollback()
        lock.close()
        for t in threads:
            t.join(30)
        for api in apis.values():
            api.close()
    assert sorted(answers.values()) == [-1] * len(rest), answers  # killed: none of the group was answered
    # Restarted on the same data: what was answered is there, nothing of the killed group is.
    with _serve_cmd(["--data", str(data)]) as url:
        alpha, beta = Api(url, "alpha", token), Api(url, "beta", beta_token)
        try:
            assert [(c["seq"], c["doc_id"]) for c in alpha.changes()["changes"]] == [
                (r["seq"], r["doc_id"]) for r in acked]
            assert beta.changes()["changes"] == []
            for ws, c in rest:  # the clients retry, with the same op ids
                api = alpha if ws == "alpha" else beta
                assert all(r["status"] == "ok" for r in api.commit(batches[(ws, c)], client_id=c))
            assert alpha.commit(batches[("alpha", "c0")], client_id="c0") == acked  # a replay
            feed = alpha.changes()["changes"]
            assert [c["seq"] for c in feed] == list(range(1, 21)) and len({c["doc_id"] for c in feed}) == 20
            assert [c["seq"] for c in beta.changes()["changes"]] == [1, 2, 3, 4, 5]
        finally:
            alpha.close()
            beta.close()


def _connections(url: str) -> int:
    """TCP connections the server has accepted and not closed (the commits in flight): /proc/net/tcp."""
    port = int(url.rsplit(":", 1)[1])
    count = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, state = fields[1], fields[3]
        if state == "01" and int(local.split(":")[1], 16) == port:
            count += 1
    return count
