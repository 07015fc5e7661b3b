"""The push of many new documents: waves of blobs running ahead of the commits, seen on the wire.

A push sends its blobs in waves of up to 1,000 documents (one ``missing``
call, a pack or so) on a thread of its own while the commits of 100 go out; these
tests hold it to the issue's "O(changes / batch) requests", to DESIGN §4's
order (every blob before the commit that names it), and to the exit-code
contract when that thread meets a failing server or a refused token.
"""

from __future__ import annotations

import gzip
import json
import random
import signal

import pytest

from syncengine import protocol as p
from tests.server.conftest import FaultProxy
from tests.synckit import Kit, assert_converged, converge, no_duplicate_revisions

pytestmark = pytest.mark.integration

N = 2500  # five waves: 100, 200, 400, 800, 1000


def _files(n: int) -> dict[str, str]:
    return {f"d{i % 7}/doc{i:05d}.json": json.dumps({"n": i, "text": "zone " * (i % 40)}) + "\n"
            for i in range(n)}


def _plain(headers: dict[str, str], body: bytes) -> bytes:
    gzipped = {k.lower(): v for k, v in headers.items()}.get("content-encoding") == "gzip"
    return gzip.decompress(body) if gzipped else body


def _fail_big_packs(least: int, status: int):
    """A rewrite answering ``status`` to every pack of at least ``least`` blobs (the waves may overlap in time)."""

    def rewrite(method, path, _status, headers, body):
        if method == "POST" and path.endswith("/blobs/pack") and len(json.loads(body)["stored"]) >= least:
            return status, {"Content-Type": "application/json"}, b'{"error": "injected", "message": "injected"}'
        return None

    return rewrite


def test_a_first_push_costs_a_commit_per_100_and_a_pack_per_1000(kit: Kit, proxy: FaultProxy):
    """2,500 new documents: 25 commits, 5 packs, a listing; each blob is up before its commit.

    The workspace never had a change, so the server holds no blob a commit
    named: no wave asks which blobs it lacks. A later push does (one
    ``missing`` call per wave).
    """
    a = kit.replica(_files(N), url=proxy.url)
    report = a.sync()
    assert len(report.pushed) == N and not report.problems
    commits, missing = proxy.calls("POST", "/commit"), proxy.calls("POST", "/blobs/missing")
    packs = proxy.calls("POST", "/blobs/pack")
    # Waves of 100, 200, 400, 800, 1000 documents: a pack each.
    assert (commits, missing, packs) == (N // 100, 0, 5)
    assert len(proxy.seen) - commits - missing - packs <= 2, proxy.seen  # the first look at the server
    uploaded: set[str] = set()
    named = 0
    for method, path, headers, body in proxy.received:
        if method != "POST":
            continue
        if path.endswith("/blobs/pack"):
            plain = _plain(headers, body)
            header = p.PackHeader.decode(plain[:plain.index(b"\n")])
            uploaded.update(entry.hash for entry in header.blobs)
        elif path.endswith("/commit"):
            items = json.loads(_plain(headers, body))["items"]
            assert len(items) <= p.MAX_COMMIT_ITEMS
            assert {item["hash"] for item in items} <= uploaded, "a commit named a blob not yet uploaded"
            named += len(items)
    assert named == N and len(uploaded) == N
    log = kit.log()
    assert len(log) == N
    no_duplicate_revisions(log)
    for i in range(300):  # a second push: one wave, over BLIND_BYTES, which asks first
        a.write(f"more/doc{i:05d}.json", json.dumps({"more": i, "noise": random.randbytes(1200).hex()}) + "\n")
    assert len(a.sync().pushed) == 300
    assert proxy.calls("POST", "/blobs/missing") == 1 and proxy.calls("POST", "/blobs/pack") == 6


def test_a_small_push_sends_its_blobs_without_asking_which_the_server_lacks(kit: Kit, proxy: FaultProxy):
    """Edits, a creation, a move and a deletion within BLIND_BYTES: one pack, no ``missing`` call, one commit.

    The move's blob is on the server already: it goes in the pack all the
    same, and the server keeps its own copy. The other replica gets it all.
    """
    files = _files(40)
    a = kit.replica(files, url=proxy.url)
    assert len(a.sync().pushed) == 40
    b = kit.replica({}, url=proxy.url)
    b.sync()
    missing, packs, commits = (proxy.calls("POST", "/blobs/missing"), proxy.calls("POST", "/blobs/pack"),
                               proxy.calls("POST", "/commit"))
    paths = sorted(files)
    for path in paths[:10]:
        a.write(path, json.dumps({"edited": path}) + "\n")
    a.write("new/one.json", json.dumps({"new": 1}) + "\n")
    a.move(paths[10], "moved/here.json")
    a.delete(paths[11])
    report = a.sync()
    assert len(report.pushed) == 13 and not report.problems
    assert proxy.calls("POST", "/blobs/missing") == missing
    assert (proxy.calls("POST", "/blobs/pack"), proxy.calls("POST", "/commit")) == (packs + 1, commits + 1)
    b.sync()
    assert b.tree() == a.tree()
    no_duplicate_revisions(kit.log())


def test_a_push_over_blind_bytes_asks_first_and_sends_only_what_is_lacking(kit: Kit, proxy: FaultProxy,
                                                                          monkeypatch: pytest.MonkeyPatch):
    """With BLIND_BYTES lowered under the wave, the push asks, and the pack holds only the new blobs."""
    from syncengine import push

    a = kit.replica(_files(40), url=proxy.url)
    a.sync()
    monkeypatch.setattr(push, "BLIND_BYTES", 0)
    missing = proxy.calls("POST", "/blobs/missing")
    a.write("new/one.json", json.dumps({"new": 1, "text": "x" * 300}) + "\n")
    a.write("new/two.json", json.dumps({"new": 2, "text": "y" * 300}) + "\n")
    a.move("d0/doc00000.json", "moved/zero.json")
    start = len(proxy.received)
    assert len(a.sync().pushed) == 3
    assert proxy.calls("POST", "/blobs/missing") == missing + 1
    sent: list[str] = []
    for method, path, headers, body in proxy.received[start:]:
        if method == "POST" and path.endswith("/blobs/pack"):
            plain = _plain(headers, body)
            sent += [entry.hash for entry in p.PackHeader.decode(plain[:plain.index(b"\n")]).blobs]
    assert len(sent) == 2  # the moved file's blob is on the server: not sent


@pytest.mark.parametrize("status,code", [(503, 3), (401, 4)])
def test_a_failure_met_by_the_blob_thread_keeps_its_exit_code_and_the_rest_queued(kit: Kit, proxy: FaultProxy,
                                                                                   status, code):
    """The third wave's pack answered 503 (exit 3) or 401 (exit 4): the first two are committed, the rest queued."""
    files = _files(1500)  # waves of 100, 200, 400, 800
    a = kit.replica(files, url=proxy.url)
    proxy.rewrites.append(_fail_big_packs(400, status))
    result = a.proc("sync")
    assert result.code == code and result.stderr.count("\n") == 1, result.stderr
    assert a.tree() == {path: data.encode() for path, data in files.items()}
    assert len(kit.log()) == 300 and a.status().pending.created == 1200
    proxy.rewrites.clear()
    assert a.proc("sync").code == 0
    log = kit.log()
    assert sorted(c.path for c in log) == sorted(files)
    no_duplicate_revisions(log)


def test_a_commit_failing_mid_push_stops_the_commits_queued_behind_it(kit: Kit, proxy: FaultProxy):
    """The 4th commit's answer lost (503, retried): exit 3, nothing sent after the one beside it; replayed next.

    Two commits are in flight at once: the 5th may have gone out beside the
    4th (its answer lost too); the 6th never goes.
    """
    files = _files(1500)
    a = kit.replica(files, url=proxy.url)
    commits: list[str] = []

    def lose_after_three(method, path, status, headers, body):
        if method == "POST" and path.endswith("/commit"):
            commits.append(path)
            if len(commits) > 3:
                return 503, {"Content-Type": "application/json"}, b'{"error": "injected", "message": "injected"}'
        return None

    proxy.rewrites.append(lose_after_three)
    result = a.proc("sync")
    assert result.code == 3 and result.stderr.count("\n") == 1, result.stderr
    # The 4th and its one retry (the replica's retries = 1), and maybe the 5th and its retry; the 6th never went.
    assert len(commits) in (3 + 2, 3 + 2 + 2), commits
    # The 4th (and the 5th if it went) committed, their answers lost.
    assert len(kit.log()) == (400 if len(commits) == 5 else 500) and a.status().pending.created == 1200
    proxy.rewrites.clear()
    assert a.proc("sync").code == 0
    log = kit.log()
    assert sorted(c.path for c in log) == sorted(files)
    no_duplicate_revisions(log)


@pytest.mark.parametrize("point", [
    "push.after_upload:1",  # the first wave's blobs up, nothing committed: sent again without asking
    "push.after_upload:3",  # the third wave's blobs up, the second wave's commits under way
    "push.before_commit:4",  # the first two waves committed, the third's blobs up (or on their way)
    "push.after_commit:9",  # a commit of the fourth wave answered, not yet recorded
    "blobs.after_temp:2",  # the second wave's bases written, not yet durable
])
def test_a_push_killed_while_blobs_run_ahead_is_finished_by_the_next(kit: Kit, point):
    """SIGKILL between the waves: the next round pushes the rest, each document exactly once."""
    files = _files(1500)
    a = kit.replica(files)
    killed = a.proc("sync", SYNCENGINE_FAILPOINT=point)
    assert killed.code == -signal.SIGKILL, f"{point} was never reached: {killed.stderr}"
    assert a.journal_ok() and a.tree() == {path: data.encode() for path, data in files.items()}
    assert len(kit.log()) < 1500
    report = a.sync()
    assert not report.problems
    assert a.leftovers() == []
    log = kit.log()
    assert sorted(c.path for c in log) == sorted(files)
    no_duplicate_revisions(log)
    b = kit.replica()
    converge(a, b)
    assert_converged(a, b)


def test_a_pack_of_blobs_that_do_not_compress_goes_plain(kit: Kit, proxy: FaultProxy):
    """400 KB of random bytes in one pack: sent as is (gzip would cost CPU to save nothing); commits still gzipped."""
    rng = random.Random(7)
    files = {f"r/{i:03d}.bin": rng.randbytes(4096) for i in range(100)}
    a = kit.replica(files, url=proxy.url)
    assert len(a.sync().pushed) == 100
    encodings = {path.rsplit("/", 1)[-1]: {k.lower(): v for k, v in headers.items()}.get("content-encoding")
                 for method, path, headers, _body in proxy.received if method == "POST"}
    assert encodings["pack"] is None and encodings["commit"] == "gzip"
    b = kit.replica()
    b.sync()
    assert_converged(a, b)


def test_the_push_threads_leave_no_connection_behind(kit: Kit):
    """A remote kept across rounds (the daemon's) holds no session of a push's finished worker threads."""
    import threading

    from syncengine import Workspace
    from syncengine.sync import sync_once

    a = kit.replica(_files(1200))
    with Workspace(a.root) as ws:
        remote = ws.open_remote()
        try:
            assert len(sync_once(ws, remote=remote).pushed) == 1200
            assert list(remote._sessions) == [threading.current_thread()]
        finally:
            remote.close()


def test_a_first_push_with_two_commits_in_flight_moves_the_checkpoint_past_its_echoes(kit: Kit):
    """The commits' seqs may come back out of order; the checkpoint still ends at the last of them."""
    a = kit.replica(_files(N))
    assert len(a.sync().pushed) == N
    assert a.rows("SELECT last_seq FROM sync_state") == [(N,)]


def test_a_batch_sharing_a_path_with_the_one_in_flight_waits_for_it(kit: Kit):
    """Files renamed, and new files taking their old paths (up to case): the new ones go after the moves.

    Rows go out in path order: the batches moving ``F000``... away come
    first, those creating ``f000``... (the same path keys) after. Sent
    beside a move, a create could reach the server first and be refused as
    a conflict with a file nobody else touched: such a batch waits instead.
    """
    files = {f"a/F{i:03d}.json": json.dumps({"n": i}) + "\n" for i in range(150)}
    a = kit.replica(files)
    a.sync()
    for i in range(150):
        a.move(f"a/F{i:03d}.json", f"a/E{i:03d}.json")
        a.write(f"a/f{i:03d}.json", json.dumps({"new": i}) + "\n")
    report = a.sync()
    assert not report.problems and a.copies() == []
    b = kit.replica()
    b.sync()
    tree = assert_converged(a, b)
    assert len(tree) == 300
    no_duplicate_revisions(kit.log())


def test_seqs_answered_out_of_order_are_carried_to_the_next_record():
    """A batch numbered after the next one leaves a gap, which the next record fills."""
    from syncengine.push import _past_echoes

    def ok(*seqs: int) -> list[p.CommitResult]:
        return [p.CommitResult("ok", f"d{s}", rev=s, seq=s) for s in seqs]

    carried: list[int] = []
    assert _past_echoes(10, ok(13, 14), carried) is None and carried == [13, 14]
    assert _past_echoes(10, ok(11, 12), carried) == {"last_seq": 14} and carried == []
    # A replayed answer below the checkpoint is dropped; someone else's change at 15 holds the rest.
    assert _past_echoes(14, ok(3, 16), carried) is None and carried == [16]
    assert _past_echoes(14, ok(17), carried) is None and carried == [16, 17]


def test_documents_edited_after_the_scan_go_next_round_with_their_new_bytes(kit: Kit, proxy: FaultProxy):
    """Edited while the first waves go up (same size, longer, shorter): each is held back, the rest pushed.

    A push reads a document once and checks it against the scan's hash
    (fsops.read_hashed); bytes that no longer match are neither sent nor
    kept as a base, and the next round sends what the file holds then.
    """
    files = _files(N)
    a = kit.replica(files, url=proxy.url)
    late = sorted(files)[-3:]  # rows go out in path order: these are in the last wave
    edits = {late[0]: files[late[0]].replace('"n"', '"m"'), late[1]: files[late[1]] + " ",
             late[2]: files[late[2]][:-2] + "\n"}

    edited: list[str] = []

    def edit_once(method, path, _status, _headers, _body):
        if path.endswith("/blobs/pack") and not edited:  # the first wave's, long before the last is read
            for rel, text in edits.items():
                a.write(rel, text)
            edited.extend(edits)
        return None

    proxy.rewrites.append(edit_once)
    report = a.sync()
    assert sorted(problem.path for problem in report.problems) == sorted(edits)
    assert len(report.pushed) == N - 3
    assert all("changed since the scan" in problem.reason for problem in report.problems)
    report = a.sync()
    assert sorted(report.pushed) == sorted(edits) and not report.problems
    b = kit.replica()
    b.sync()
    tree = assert_converged(a, b)
    assert {rel: tree[rel].decode() for rel in edits} == edits
    no_duplicate_revisions(kit.log())


def test_a_pushed_document_is_read_with_one_read_and_checked_against_its_hash(tmp_path, monkeypatch):
    """Open, one read of size + 1 bytes, close: no file object, no stat (fewer calls that give up the GIL)."""
    import hashlib
    import os

    from syncengine import fsops

    doc = tmp_path / "doc.json"
    doc.write_bytes(b'{"a": 1}\n')
    digest = hashlib.sha256(b'{"a": 1}\n').hexdigest()
    calls: list[str] = []
    for name in ("read", "fstat", "stat", "lstat"):
        real = getattr(os, name)
        monkeypatch.setattr(os, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    assert fsops.read_hashed(str(doc), 9, digest) == b'{"a": 1}\n'
    assert calls == ["read"]
    monkeypatch.undo()

    for changed in (b'{"a": 2}\n', b'{"a": 1}\n\n', b'{"a":1}\n', b""):
        doc.write_bytes(changed)
        with pytest.raises(fsops.ChangedUnderfoot):
            fsops.read_hashed(str(doc), 9, digest)
    # A FIFO put in its place neither blocks nor passes; a symlink is not followed.
    doc.unlink()
    os.mkfifo(doc)
    with pytest.raises(fsops.ChangedUnderfoot):
        fsops.read_hashed(str(doc), 9, digest)
    doc.unlink()
    (tmp_path / "real.json").write_bytes(b'{"a": 1}\n')
    doc.symlink_to(tmp_path / "real.json")
    with pytest.raises(OSError):
        fsops.read_hashed(str(doc), 9, digest)
    # Without a size (none in the journal) the file is read whole, as before.
    doc.unlink()
    doc.write_bytes(b'{"a": 1}\n')
    assert fsops.read_hashed(doc, None, digest) == b'{"a": 1}\n'


def test_no_document_is_deflated_twice_by_a_push(kit: Kit, monkeypatch):
    """A base the blob store deflates (over one 4 KiB block) goes in the upload pack as the store's zlib stream.

    Counted at protocol.deflate, which both the store and the pack use: one
    call per document, where there were two for every document over 4 KiB.
    """
    from syncengine import blobs, protocol

    files = {f"d/doc{i:03d}.json": json.dumps({"n": i, "text": f"zone {i} " * (i * 7)}) + "\n"
             for i in range(1, 200)}
    assert sum(len(text) > blobs.ONE_BLOCK for text in files.values()) > 50
    a = kit.replica(files)
    calls: list[int] = []
    real = protocol.deflate

    def counted(data: bytes, level: int = 1) -> bytes:
        calls.append(len(data))
        return real(data, level)

    monkeypatch.setattr(protocol, "deflate", counted)
    monkeypatch.setattr(blobs, "deflate", counted)
    assert len(a.sync().pushed) == len(files)
    monkeypatch.undo()
    documents = [size for size in calls if size <= blobs.SMALL]  # leaves out the pack's sample (128 KiB)
    assert sorted(documents) == sorted(len(text) for text in files.values())
    b = kit.replica()
    b.sync()
    assert_converged(a, b)


def test_a_round_collects_garbage_less_often_and_puts_the_collector_back(kit: Kit):
    """During a round the collector's first threshold is raised (each collection holds the GIL and stops
    the push's threads); after it, and after overlapping rounds, it is what it was."""
    import gc

    from syncengine import sync

    before = gc.get_threshold()
    seen: list[tuple[int, ...]] = []
    a = kit.replica(_files(300))
    a.sync(progress=lambda *_args: seen.append(gc.get_threshold()))
    assert seen and all(t[0] == max(sync.ROUND_GC_THRESHOLD, before[0]) and t[1:] == before[1:] for t in seen)
    assert gc.get_threshold() == before
    with sync._fewer_collections():
        with sync._fewer_collections():  # a second round overlapping the first (another workspace, a daemon)
            pass
        assert gc.get_threshold()[0] == max(sync.ROUND_GC_THRESHOLD, before[0])
    assert gc.get_threshold() == before


def test_a_push_keeps_small_bases_deflated_and_reads_them_back(kit: Kit):
    """A base of one 4 KiB block or less is kept in small.db as the zlib stream the push made for its pack.

    A row takes its bytes, not a block, so the deflate the pack needs anyway
    also makes the table's writes ~2.3x smaller; a tiny one (64 bytes or
    less, never deflated for a pack) stays raw. Every form reads back as
    the document's bytes, and the other replica gets them all.
    """
    import os
    import sqlite3

    from syncengine import blobs
    from syncengine.fsops import sha256

    files = {"small.json": json.dumps({"text": "zone " * 300}) + "\n", "tiny.json": '{"a": 1}\n',
             "notes.txt": "line of notes\n" * 100}
    a = kit.replica(files)
    noise = os.urandom(3000)
    a.write("noise.bin", noise)
    assert len(a.sync().pushed) == 4
    con = sqlite3.connect(a.root / ".syncengine" / "objects" / "small.db")
    try:
        stored = dict(con.execute("SELECT digest, data FROM blob").fetchall())
    finally:
        con.close()
    for name in ("small.json", "notes.txt"):
        data = files[name].encode()
        assert len(data) <= blobs.ONE_BLOCK
        assert stored[sha256(data)][:5] == blobs.MAGIC + blobs.ZLIB and len(stored[sha256(data)]) < len(data) / 2
    assert stored[sha256(files["tiny.json"].encode())][:5] == blobs.MAGIC + blobs.RAW
    assert sha256(noise) not in stored  # a binary keeps no local base: the server has it
    store = blobs.BlobStore(a.root / ".syncengine" / "objects")
    try:
        for text in files.values():
            assert store.get(sha256(text.encode())) == text.encode()
    finally:
        store.close()
    b = kit.replica()
    b.sync()
    assert_converged(a, b)
