"""The blob store: named by sha256, compressed when it pays, written atomically, verified on every read."""

from __future__ import annotations

import hashlib
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from syncengine import Workspace
from syncengine.blobs import SMALL, BlobStore
from syncengine.errors import HashMismatch
from tests.helpers import REPO, cli_env, run_cli

TEXT = b'{"zones": [' + b'{"id": "z1", "text": "total"}, ' * 400 + b"{}]}\n"  # 12 KB: a small blob
LARGE_TEXT = TEXT * 4  # 48 KB: a file


@pytest.fixture
def store(tmp_path: Path) -> BlobStore:
    return BlobStore(tmp_path / "objects")


def _stored(store: BlobStore, digest: str) -> bytes:
    """A blob's stored form (header + bytes), wherever it lives."""
    found = store.small.get(digest)
    return store.path(digest).read_bytes() if found is None else found


def _overwrite(store: BlobStore, digest: str, data: bytes) -> None:
    """Rot on disk: the stored form replaced behind the store's back."""
    if store.small.has(digest):
        with sqlite3.connect(store.small.path) as con:
            con.execute("UPDATE blob SET data = ? WHERE digest = ?", (data, digest))
        con.close()
    else:
        store.path(digest).write_bytes(data)


@pytest.mark.parametrize("data", [TEXT, LARGE_TEXT, os.urandom(SMALL), os.urandom(SMALL + 1)],
                         ids=["small", "large", "small-raw", "large-raw"])
def test_a_blob_is_named_by_the_sha256_of_its_bytes_and_reads_back_exactly(store: BlobStore, data: bytes):
    """Up to SMALL bytes a blob is a row of small.db, above it a file objects/ab/cdef; either reads back."""
    digest = store.put_bytes(data)
    assert digest == hashlib.sha256(data).hexdigest() and store.has(digest)
    assert store.small.has(digest) == (len(data) <= SMALL) and store.path(digest).exists() == (len(data) > SMALL)
    assert store.path(digest) == store.dir / digest[:2] / digest[2:]
    assert store.get(digest) == data and store.size(digest) == len(data)
    assert store.stored_size(digest) == len(_stored(store, digest))
    assert store.put_stream([data[:100], data[100:]]) == digest  # same bytes, same blob
    assert store.put_many([data]) == [digest] and list(store.iter_digests()) == [digest]
    assert store.put_bytes(b"") == hashlib.sha256(b"").hexdigest() and store.get(hashlib.sha256(b"").hexdigest()) == b""
    assert list(store.tmp.iterdir()) == []


def test_documents_are_stored_compressed_and_media_raw(store: BlobStore):
    """Text compresses; random bytes are kept raw (reads skip the inflate), both read back exactly."""
    for text in (TEXT, LARGE_TEXT):
        digest = store.put_bytes(text)
        assert store.stored_size(digest) < len(text) // 5 and store.get(digest) == text
    noise = os.urandom(64 * 1024)
    raw = store.put_bytes(noise)
    assert store.path(raw).read_bytes()[:5] == b"SEB1r" and store.get(raw) == noise
    small_noise = os.urandom(8192)
    raw = store.put_bytes(small_noise)
    assert store.small.get(raw)[:5] == b"SEB1r" and store.get(raw) == small_noise


def test_a_store_written_before_the_table_is_read_as_it_was(store: BlobStore):
    """An older store kept small blobs as files: they are found, read, listed and deleted like the table's."""
    digest = hashlib.sha256(TEXT).hexdigest()
    store.path(digest).parent.mkdir()
    store.path(digest).write_bytes(b"SEB1r" + TEXT)
    other = store.put_bytes(b"stored now")
    assert store.has(digest) and not store.small.has(digest) and store.get(digest) == TEXT
    assert store.stored_at(digest) == store.path(digest).stat().st_mtime
    assert sorted(store.iter_digests()) == sorted([digest, other])
    assert store.put_many([TEXT]) == [digest] and store.small.has(digest)  # stored again: now in the table too
    assert list(store.iter_digests()).count(digest) == 1
    store.delete(digest)
    assert not store.has(digest) and not store.path(digest).exists() and list(store.iter_digests()) == [other]


@pytest.mark.parametrize("damage", ["flip", "truncate", "header", "flip-raw", "flip-large", "flip-large-raw"])
def test_a_damaged_blob_is_reported_never_served(store: BlobStore, damage: str):
    """Every read re-hashes: a flipped bit, a cut blob or a foreign header raises HashMismatch, and the
    damaged copy is set aside so the store heals (it never did: the same bytes stored again found the name taken).
    Small blobs (rows of small.db) and large ones (files) alike."""
    original = {"flip-raw": os.urandom(8192), "flip-large": LARGE_TEXT, "flip-large-raw": os.urandom(SMALL * 2)}
    original = original.get(damage, TEXT)
    digest = store.put_bytes(original)
    assert store.small.has(digest) == ("large" not in damage)
    data = bytearray(_stored(store, digest))
    if damage.startswith("flip"):
        data[len(data) // 2] ^= 0x01
    elif damage == "truncate":
        del data[len(data) // 2 :]
    else:
        data[:4] = b"XXXX"
    _overwrite(store, digest, bytes(data))
    with pytest.raises(HashMismatch):
        store.get(digest)
    # ... and the store heals: the damaged copy is set aside, the same bytes stored again read back.
    assert not store.has(digest) and (store.dir / "damaged" / digest).read_bytes() == bytes(data)
    assert store.put_bytes(original) == digest and store.get(digest) == original


def test_a_missing_blob_is_a_hash_mismatch(store: BlobStore):
    with pytest.raises(HashMismatch):
        store.get("ab" * 32)


def test_a_stream_that_does_not_match_its_expected_hash_stores_nothing(store: BlobStore):
    """A download whose bytes hash differently is refused: no blob under either name, no temp file left."""
    expected = hashlib.sha256(b"what the server promised").hexdigest()
    with pytest.raises(HashMismatch):
        store.put_stream([b"what arrived"], expect=expected)
    assert not store.has(expected) and not store.has(hashlib.sha256(b"what arrived").hexdigest())
    assert list(store.tmp.iterdir()) == []


def test_bytes_the_caller_has_hashed_are_stored_under_its_names(store: BlobStore):
    """put_many(hashed=True) takes the caller's names (a push has just checked them); unnamed items are hashed."""
    small, large = TEXT, LARGE_TEXT
    names = [hashlib.sha256(small).hexdigest(), hashlib.sha256(large).hexdigest(), None]
    got = store.put_many([small, large, b"unnamed"], names, hashed=True)
    assert got == [*names[:2], hashlib.sha256(b"unnamed").hexdigest()]
    assert [store.get(name) for name in got] == [small, large, b"unnamed"]
    # Without it, bytes that do not match their name are refused as before.
    (refused,) = store.put_many([b"other bytes"], [names[0]])
    assert isinstance(refused, HashMismatch)


def test_a_write_cut_short_leaves_no_named_blob(store: BlobStore):
    """A stream that fails midway (a killed download) leaves no blob and no temp file."""

    class Lost(Exception):
        pass

    def chunks():
        yield b"first half"
        raise Lost("connection lost")

    with pytest.raises(Lost):
        store.put_stream(chunks())
    assert list(store.iter_digests()) == [] and list(store.tmp.iterdir()) == []


def test_restore_from_a_damaged_blob_leaves_the_file_alone(sample_ws: Workspace):
    """A snapshot whose blob was damaged on disk: restore exits 8 naming it, and the file keeps its bytes."""
    root = sample_ws.root
    snap = sample_ws.snapshot()
    digest = sample_ws.journal.doc_by_path("notes/todo.md").hash
    data = bytearray(_stored(sample_ws.blobs, digest))
    data[-3] ^= 0xFF
    _overwrite(sample_ws.blobs, digest, bytes(data))
    (root / "notes" / "todo.md").write_text("changed\n")
    sample_ws.close()
    result = run_cli("-C", root, "restore", str(snap.id), "notes/todo.md")
    assert result.code == 8 and result.stderr.count("\n") == 1 and "damaged" in result.stderr
    assert (root / "notes" / "todo.md").read_bytes() == b"changed\n"


_WRITER = """
import sys
from pathlib import Path
from syncengine.blobs import BlobStore
store, me = BlobStore(Path(sys.argv[1])), sys.argv[2].encode()
for batch in range(20):
    shared = [b'{"shared": %d}' % (batch * 50 + i) for i in range(25)]
    own = [b'{"by": "%s", "n": %d}' % (me, batch * 50 + i) for i in range(25)]
    results = store.put_many(shared + own)
    assert all(isinstance(r, str) for r in results), results
    assert all(store.get(r) for r in results)
print("done")
"""


def test_two_processes_write_one_store_at_once(tmp_path: Path):
    """The CLI and the daemon share a store: two writers of overlapping batches both succeed (each waits for
    the other's commit instead of failing), and every blob either stored reads back whole."""
    objects = tmp_path / "objects"
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, str(objects), me], cwd=REPO, env=cli_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for me in ("a", "b")]
    outs = [proc.communicate(timeout=120) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], outs
    store = BlobStore(objects)
    names = list(store.iter_digests())
    assert len(names) == 20 * 25 * 3 and all(hashlib.sha256(store.get(n)).hexdigest() == n for n in names)


def test_two_stores_on_one_folder_in_one_process_see_each_others_blobs(tmp_path: Path):
    """A second BlobStore (another thread's, another Workspace) reads what the first committed at once."""
    first, second = BlobStore(tmp_path / "objects"), BlobStore(tmp_path / "objects")
    assert not second.has(hashlib.sha256(b"x").hexdigest())  # before small.db exists
    digest = first.put_bytes(b"x")
    assert second.has(digest) and second.get(digest) == b"x"
    first.close()
    assert first.get(digest) == b"x"  # closing only drops the connection; the next use reopens it


def test_a_batch_goes_in_row_by_row_where_sqlite_has_no_json_each(store: BlobStore):
    """One statement per batch needs SQLite's JSON functions (built in since 3.38); without them, one per row."""
    docs = [b'{"n": %d}' % i for i in range(30)]
    first = store.put_many(docs[:10])
    store.small._one_step = False  # as _open finds it on an SQLite without json_each
    assert store.put_many(docs) == [hashlib.sha256(d).hexdigest() for d in docs] and first == store.put_many(docs[:10])
    assert sorted(store.iter_digests()) == sorted(hashlib.sha256(d).hexdigest() for d in docs)
    assert all(store.get(hashlib.sha256(d).hexdigest()) == d for d in docs)


def test_a_new_table_holds_several_documents_a_page_and_an_older_one_keeps_its_pages(tmp_path: Path):
    """16 KiB pages for a new store (a 1-4 KB blob no longer takes a 4 KiB page to itself); an existing store,
    made with SQLite's default pages, is used as it is: a page size never changes under a store's data."""
    from syncengine.smallblobs import PAGE_SIZE

    docs = [b'{"n": %d, "text": "%s"}' % (i, b"x" * 3000) for i in range(40)]
    new = BlobStore(tmp_path / "new")
    new.put_many(docs)
    (tmp_path / "old").mkdir()
    with sqlite3.connect(tmp_path / "old" / "small.db") as con:
        con.execute("PRAGMA journal_mode=WAL")
        con.execute("CREATE TABLE blob (digest TEXT PRIMARY KEY, stored_at REAL NOT NULL, data BLOB NOT NULL)")
    con.close()
    old = BlobStore(tmp_path / "old")
    old.put_many(docs)
    pages = {}
    for name, blobs in (("new", new), ("old", old)):
        blobs.close()
        with sqlite3.connect(blobs.small.path) as con:
            pages[name] = tuple(con.execute(f"PRAGMA {what}").fetchone()[0] for what in ("page_size", "page_count"))
        con.close()
        assert [blobs.get(hashlib.sha256(d).hexdigest()) for d in docs] == docs
    assert pages["new"][0] == PAGE_SIZE and pages["old"][0] == 4096
    assert pages["new"][1] * 3 < pages["old"][1]  # fewer pages: fewer WAL frames to write and checkpoint


def test_a_process_that_stored_blobs_leaves_no_wal_behind(tmp_path: Path):
    """The CLI skips the final garbage collection (gc.freeze) and a connection sits in a reference cycle: the store
    still closes it when it goes, or at exit, so the WAL is folded back and no small.db-wal is left."""
    objects = tmp_path / "objects"
    script = ("import gc, sys\nfrom pathlib import Path\nfrom syncengine.blobs import BlobStore\n"
              "kept = BlobStore(Path(sys.argv[1]))\nkept.put_bytes(b'kept to the end')\n"
              "BlobStore(Path(sys.argv[1])).put_bytes(b'dropped at once')\ngc.freeze()\n")
    proc = subprocess.run([sys.executable, "-c", script, str(objects)], cwd=REPO, env=cli_env(),
                          capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in objects.iterdir()) == ["small.db", "tmp"]
    assert len(list(BlobStore(objects).iter_digests())) == 2
