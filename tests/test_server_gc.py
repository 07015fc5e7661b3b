"""Server-side gc (syncengine/server/gc.py): old history and blobs go; current versions and replicas stay whole."""

from __future__ import annotations

import hashlib
import os
import time

import pytest

from syncengine.remote import BlobSource
from syncengine.server.gc import GRACE_NS, collect
from tests.helpers import run_cli
from tests.synckit import Kit, assert_converged, converge

HOUR = 3600 * 10**9
FILES = {"a.md": "alpha v1\n", "b/b.json": '{"b": 1}\n', "d.txt": "delta\n", "keep.txt": "kept as it is\n"}


def _blob_hashes(storage, ws: str) -> set[str]:
    with storage.db.connection_context():
        rows = storage.db.execute_sql(
            'SELECT b."hash" FROM "blob" b JOIN "workspace" w ON w."id" = b."workspace_id" WHERE w."name" = '
            + storage.db.param, (ws,)).fetchall()
    return {row[0] for row in rows}


def _later() -> int:
    """A clock past every stored blob's grace: what gc sees once an hour and more has gone by."""
    return time.time_ns() + GRACE_NS + HOUR


@pytest.fixture
def gc_kit(tmp_path, server_factory, storage):
    return Kit(tmp_path, server_factory(storage))


def test_gc_drops_old_revisions_and_every_replica_still_converges(gc_kit):
    """History older than --keep goes with the blobs only it named; current versions stay; replicas behind it list
    everything and lose nothing; a new replica gets the whole workspace."""
    kit = gc_kit
    a = kit.replica(FILES)
    behind = kit.replica()
    converge(a, behind)
    a.write("a.md", "alpha v2\n")
    a.sync()
    a.write("a.md", "alpha v3\n")
    a.delete("d.txt")
    a.write("b/b.json", '{"b": 2}\n')
    a.sync()
    storage = kit.server.storage
    before = _blob_hashes(storage, kit.ws)
    log = kit.log()

    dry = collect(storage, 3600, workspace=kit.ws, dry_run=True, now_ns=_later()).workspaces[0]
    assert _blob_hashes(storage, kit.ws) == before and kit.log() == log  # a dry run changes nothing
    done = collect(storage, 3600, workspace=kit.ws, now_ns=_later()).workspaces[0]
    assert (dry.changes_dropped, dry.blobs_dropped, dry.bytes_freed, dry.min_seq) == \
        (done.changes_dropped, done.blobs_dropped, done.bytes_freed, done.min_seq)
    current = a.tree()
    assert done.changes_dropped == len(log) and done.min_seq == log[-1].seq + 1 and kit.log() == []
    kept = {hashlib.sha256(data).hexdigest() for data in current.values()}
    assert _blob_hashes(storage, kit.ws) == kept  # alpha v1, v2, delta and {"b": 1} are gone
    assert done.blobs_dropped == len(before - kept) == 4
    assert done.bytes_freed == sum(len(x) for x in (b"alpha v1\n", b"alpha v2\n", b"delta\n", b'{"b": 1}\n'))

    fresh = kit.replica()
    report = fresh.sync()
    assert report.full_listing and fresh.tree() == current
    report = behind.sync()  # its checkpoint is below the log's start now: a full listing
    assert report.full_listing and not report.conflicts and not report.problems
    assert behind.read("a.md") == b"alpha v3\n" and behind.read("b/b.json") == b'{"b": 2}\n'
    # The deletion it never saw in the feed: not listed by the same server, whose revs still hold, so
    # deleted there (pull.py), under the mass-delete guard as any deletion pulled.
    assert "d.txt" not in behind.tree() and report.deleted == ("d.txt",)
    converge(a, behind, fresh)
    assert "d.txt" not in assert_converged(a, behind, fresh)


def test_gc_keeps_what_keep_covers_and_blobs_within_their_grace(gc_kit):
    """Nothing younger than --keep goes; a blob uploaded for a commit still to come stays for GRACE_NS."""
    kit = gc_kit
    a = kit.replica(FILES)
    a.sync()
    a.write("a.md", "alpha v2\n")
    a.sync()
    storage = kit.server.storage
    remote = kit.server.remote(kit.ws)
    waiting = BlobSource.from_bytes(b"uploaded, its commit not sent yet\n")
    remote.upload([waiting])
    before, log = _blob_hashes(storage, kit.ws), kit.log()

    kept = collect(storage, 30 * 86400, workspace=kit.ws).workspaces[0]
    assert (kept.changes_dropped, kept.blobs_dropped, kept.ops_dropped) == (0, 0, 0) and kit.log() == log
    now = collect(storage, 0, workspace=kit.ws).workspaces[0]  # no history kept, but within the grace
    assert now.changes_dropped == len(log) and now.blobs_dropped == 0
    assert _blob_hashes(storage, kit.ws) == before
    later = collect(storage, 0, workspace=kit.ws, now_ns=_later()).workspaces[0]
    assert later.blobs_dropped == 2  # alpha v1, and the blob no commit named
    assert waiting.hash not in _blob_hashes(storage, kit.ws)
    remote.close()


def test_content_that_comes_back_after_gc_is_uploaded_again(gc_kit):
    """A file deleted, its blob collected, then written again with the same bytes: the push uploads it again
    (the server is asked, never assumed to still hold it), and another replica gets it."""
    kit = gc_kit
    a = kit.replica(FILES)
    b = kit.replica()
    converge(a, b)
    a.delete("d.txt")
    a.sync()
    assert collect(kit.server.storage, 0, workspace=kit.ws, now_ns=_later()).workspaces[0].blobs_dropped == 1
    a.write("d.txt", "delta\n")
    report = a.sync()
    assert report.pushed == ("d.txt",) and not report.problems
    converge(a, b)
    assert b.read("d.txt") == b"delta\n"
    assert_converged(a, b)


def test_gc_of_a_large_file_keeps_the_parts_its_current_version_shares(gc_kit):
    """A file stored as a chunk manifest: the old manifest and the parts only it named go, shared parts stay."""
    kit = gc_kit
    data = bytearray(os.urandom(6 << 20))
    a = kit.replica({"big.bin": bytes(data)})
    b = kit.replica()
    converge(a, b)
    data[100:200] = os.urandom(100)  # one chunk near the start changes; the rest are shared
    a.write("big.bin", bytes(data))
    a.sync()
    storage = kit.server.storage
    before = _blob_hashes(storage, kit.ws)
    done = collect(storage, 0, workspace=kit.ws, now_ns=_later()).workspaces[0]
    after = _blob_hashes(storage, kit.ws)
    assert done.blobs_dropped == len(before - after) >= 2  # the old manifest and its changed chunk(s)
    assert len(after) >= 3  # the current manifest and its parts
    assert 0 < done.bytes_freed < 2 << 20  # a chunk or two, never the manifest's 6 MiB again
    b.sync()
    assert b.read("big.bin") == bytes(data)
    fresh = kit.replica()
    fresh.sync()
    assert fresh.read("big.bin") == bytes(data)


def test_server_gc_cli(tmp_path, server_factory, storage):
    """`syncengine server gc`: one JSON document, a human line per workspace; bad flags exit 2 in one line."""
    server = server_factory(storage)
    kit = Kit(tmp_path, server)
    a = kit.replica(FILES)
    a.sync()
    a.write("a.md", "alpha v2\n")
    a.sync()
    flags = storage.cli_args()
    result = run_cli("server", "gc", "--keep", "0", "--workspace", kit.ws, "--dry-run", "--json", *flags)
    assert result.code == 0, result.stderr
    report = result.json()
    assert report["dry_run"] is True and [w["workspace"] for w in report["workspaces"]] == [kit.ws]
    assert report["workspaces"][0]["changes_dropped"] == 5 and kit.log() != []
    result = run_cli("server", "gc", "--keep", "0", *flags)
    assert result.code == 0 and f"{kit.ws}: dropped 5 change(s)" in result.stdout and kit.log() == []
    for bad, words in ((["--keep", "soon"], "bad duration"), (["--keep", "-1d"], "negative"),
                       (["--workspace", "nope"], "no workspace")):
        result = run_cli("server", "gc", *bad, *flags)
        assert result.code == 2 and words in result.stderr and len(result.stderr.strip().splitlines()) == 1
        assert "Traceback" not in result.stderr
    nowhere = tmp_path / "mistyped-data"  # a mistyped --data: refused, and no empty database made there
    result = run_cli("server", "gc", "--data", nowhere)
    assert result.code == 2 and "no server database" in result.stderr and not nowhere.exists()


def test_a_manifest_whose_part_gc_dropped_meanwhile_stores_nothing(tmp_path, storage):
    """The manifest's parts were checked, then a gc dropped one before the manifest was written: nothing is
    stored (the route answers 409 blob_not_found, and the client uploads the part again next round)."""
    from syncengine.server.storage import Storage

    server_storage = Storage(storage.db_url, storage.data_dir)
    try:
        ws_id = server_storage.ensure_workspace("w")
        parts = []
        for data in (b"part one " * 100, b"part two " * 100):
            digest = hashlib.sha256(data).hexdigest()
            server_storage.put_blob(ws_id, digest, len(data), [(False, data)])
            parts += server_storage.blob_infos(ws_id, [digest]).values()
        whole = hashlib.sha256(b"part one " * 100 + b"part two " * 100).hexdigest()
        assert collect(server_storage, 0, now_ns=_later()).workspaces[0].blobs_dropped == 2  # nothing names them
        assert server_storage.put_manifest(ws_id, whole, 1800, parts) is None
        assert server_storage.blob_infos(ws_id, [whole]) == {}
    finally:
        server_storage.close()
