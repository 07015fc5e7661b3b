"""The blob store: named by sha256, compressed when it pays, written atomically, verified on every read."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from syncengine import Workspace
from syncengine.blobs import BlobStore
from syncengine.errors import HashMismatch
from tests.helpers import run_cli

TEXT = b'{"zones": [' + b'{"id": "z1", "text": "total"}, ' * 400 + b"{}]}\n"


@pytest.fixture
def store(tmp_path: Path) -> BlobStore:
    return BlobStore(tmp_path / "objects")


def test_a_blob_is_named_by_the_sha256_of_its_bytes_and_reads_back_exactly(store: BlobStore):
    digest = store.put_bytes(TEXT)
    assert digest == hashlib.sha256(TEXT).hexdigest()
    assert store.path(digest) == store.dir / digest[:2] / digest[2:] and store.has(digest)
    assert store.get(digest) == TEXT and store.size(digest) == len(TEXT)
    assert store.put_stream([TEXT[:100], TEXT[100:]]) == digest  # same bytes, same blob
    assert store.put_bytes(b"") == hashlib.sha256(b"").hexdigest() and store.get(hashlib.sha256(b"").hexdigest()) == b""


def test_documents_are_stored_compressed_and_media_raw(store: BlobStore):
    """Text compresses; random bytes are kept raw (reads skip the inflate), both read back exactly."""
    text = store.put_bytes(TEXT)
    assert store.path(text).stat().st_size < len(TEXT) // 5
    noise = os.urandom(64 * 1024)
    raw = store.put_bytes(noise)
    assert store.path(raw).read_bytes()[:5] == b"SEB1r" and store.get(raw) == noise


@pytest.mark.parametrize("damage", ["flip", "truncate", "header", "flip-raw"])
def test_a_damaged_blob_is_reported_never_served(store: BlobStore, damage: str):
    """Every read re-hashes: a flipped bit, a cut file or a foreign header raises HashMismatch, and the
    damaged copy is set aside so the store heals (it never did: the same bytes stored again found the name taken)."""
    original = os.urandom(8192) if damage == "flip-raw" else TEXT
    digest = store.put_bytes(original)
    path = store.path(digest)
    data = bytearray(path.read_bytes())
    if damage in ("flip", "flip-raw"):
        data[len(data) // 2] ^= 0x01
    elif damage == "truncate":
        del data[len(data) // 2 :]
    else:
        data[:4] = b"XXXX"
    path.write_bytes(bytes(data))
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
    path = sample_ws.blobs.path(digest)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    (root / "notes" / "todo.md").write_text("changed\n")
    sample_ws.close()
    result = run_cli("-C", root, "restore", str(snap.id), "notes/todo.md")
    assert result.code == 8 and result.stderr.count("\n") == 1 and "damaged" in result.stderr
    assert (root / "notes" / "todo.md").read_bytes() == b"changed\n"
