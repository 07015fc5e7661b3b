"""Batched durability: many small blobs written, made durable at once, renamed; never a named partial blob."""

from __future__ import annotations

import errno
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from syncengine import durable
from syncengine.blobs import SMALL, BlobStore
from syncengine.errors import FileSystemError, HashMismatch
from syncengine.fsops import inject_fault
from tests.helpers import REPO, cli_env

DOCS = [b'{"id": %d, "text": "%s"}\n' % (i, b"total " * (i % 50)) for i in range(40)]
NOISE = os.urandom(8192)  # incompressible and over 4 KiB: stored raw
# Over SMALL: files objects/ab/cdef written, made durable together, renamed
LARGE = [b'{"id": %d, "text": "%s"}\n' % (i, os.urandom(SMALL // 2).hex().encode()) for i in range(8)]


@pytest.fixture
def store(tmp_path: Path) -> BlobStore:
    return BlobStore(tmp_path / "objects")


@pytest.fixture(params=["syncfs", "fsync"])
def durability(request, monkeypatch) -> str:
    """Every put_many test runs on both paths: one syncfs, and the per-file fsync fallback."""
    if request.param == "fsync":
        monkeypatch.setenv(durable.ENV, "fsync")
        return request.param
    monkeypatch.delenv(durable.ENV, raising=False)
    if not durable.syncfs_available():
        pytest.skip("no syncfs here (not Linux)")
    return request.param


def _verified(store: BlobStore) -> list[str]:
    """Every named blob, each read back through its hash check (a partial one would raise)."""
    names = list(store.iter_digests())
    for name in names:
        store.get(name)
    return names


def test_syncfs_is_used_on_linux_and_can_be_turned_off(tmp_path, monkeypatch):
    if not sys.platform.startswith("linux"):
        pytest.skip("syncfs is Linux only")
    monkeypatch.delenv(durable.ENV, raising=False)
    with durable.Batch(tmp_path) as batch:
        assert durable.syncfs_available() and batch.fd is not None and batch._syncfs()
    monkeypatch.setenv(durable.ENV, "fsync")
    with durable.Batch(tmp_path) as batch:
        assert not durable.syncfs_available() and batch.fd is None and not batch._syncfs()


def test_a_batch_with_a_missing_file_raises_instead_of_claiming_durability(tmp_path, durability):
    """A file that is not there is an error on both paths, never silently counted as durable."""
    files = [tmp_path / f"f{i}" for i in range(durable.MIN_BATCH + 1)]
    with durable.Batch(tmp_path) as batch:
        for path in files:
            path.write_bytes(b"x")
        batch.sync(files)
        with pytest.raises(FileNotFoundError):
            batch.sync([*files, tmp_path / "gone"])


def test_a_file_on_another_file_system_is_made_durable_too(tmp_path, durability):
    """A mount inside the workspace: syncfs on the anchor does not cover it; it is fsynced by name (not observable
    from here: this checks such a batch goes through, and that the file is looked at rather than assumed)."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("no second file system at hand")
    elsewhere = shm / f"syncengine-test-{os.getpid()}"
    files = [tmp_path / f"f{i}" for i in range(durable.MIN_BATCH)]
    try:
        with durable.Batch(tmp_path) as batch:
            for path in [*files, elsewhere]:
                path.write_bytes(b"x")
            batch.sync([*files, elsewhere])
            elsewhere.unlink()
            with pytest.raises(FileNotFoundError):
                batch.sync([*files, elsewhere])
    finally:
        elsewhere.unlink(missing_ok=True)


def test_put_many_stores_every_item_under_its_name(store, durability):
    """Larger documents compressed, media and one-block documents raw, a repeat and an already stored blob;
    small ones in the table, large ones as files, in one call."""
    already = store.put_bytes(DOCS[0])
    large_file = store.put_bytes(LARGE[1])
    large = b'{"text": "%s"}' % (b"total " * 1000)
    big_noise = os.urandom(SMALL + 1)
    items = [*DOCS, NOISE, DOCS[3], large, *LARGE[:3], big_noise]
    results = store.put_many(items)
    assert results == [hashlib.sha256(d).hexdigest() for d in items]
    assert results[0] == already and results[-3] == large_file
    assert store.small.get(results[40])[:5] == b"SEB1r" and store.get(results[40]) == NOISE
    assert store.small.get(results[5])[:5] == b"SEB1r"  # fits one 4 KiB block: deflate buys nothing
    assert store.small.get(results[42])[:5] == b"SEB1z" and store.get(results[42]) == large
    assert store.path(results[-2]).read_bytes()[:5] == b"SEB1z" and store.get(results[-2]) == LARGE[2]
    assert store.path(results[-1]).read_bytes()[:5] == b"SEB1r" and store.get(results[-1]) == big_noise
    assert sorted(_verified(store)) == sorted(set(results)) and list(store.tmp.iterdir()) == []


def test_put_many_reports_a_mismatch_for_that_item_only(store, durability):
    expect = [hashlib.sha256(d).hexdigest() for d in DOCS[:3]]
    expect[1] = "ab" * 32
    results = store.put_many(DOCS[:3], expect=expect)
    assert isinstance(results[1], HashMismatch) and results[0] == expect[0] and results[2] == expect[2]
    assert not store.has("ab" * 32) and sorted(_verified(store)) == sorted([expect[0], expect[2]])


@pytest.mark.parametrize("items,nth,fails", [(DOCS, 2, 1), (LARGE, 2, 1), (LARGE, len(LARGE) + 1, 0)],
                         ids=["small", "large-temp-write", "large-rename"])
def test_a_full_disk_fails_one_item_and_the_others_are_stored(store, durability, items, nth, fails):
    """ENOSPC on one item's row or temp file, or on its rename: that item fails as "Disk full", the rest are kept."""
    with inject_fault("store", nth, errno.ENOSPC):
        results = store.put_many(items)
    failed = [i for i, r in enumerate(results) if isinstance(r, Exception)]
    assert failed == [fails]
    assert isinstance(results[fails], FileSystemError) and results[fails].title == "Disk full"
    stored = [r for r in results if isinstance(r, str)]
    assert sorted(_verified(store)) == sorted(stored) and len(stored) == len(items) - 1
    assert list(store.tmp.iterdir()) == []


@pytest.mark.parametrize("items", [DOCS[:5], LARGE[:5], [*DOCS[:3], *LARGE[:2]]], ids=["small", "large", "mixed"])
def test_a_failed_write_back_names_nothing(store, durability, items):
    """If the shared commit or write-back fails, no item it covered is named: none of their bytes is known to be
    on disk. In a mixed batch the table's commit comes first: its failure leaves the large ones to go on."""
    with inject_fault("sync", 1, errno.EIO):
        results = store.put_many(items)
    small = [r for d, r in zip(items, results, strict=True) if len(d) <= SMALL]
    large = [r for d, r in zip(items, results, strict=True) if len(d) > SMALL]
    if small:
        assert all(isinstance(r, FileSystemError) and r.title == "I/O error" for r in small)
        assert all(isinstance(r, str) for r in large)
    else:
        assert all(isinstance(r, FileSystemError) and r.title == "I/O error" for r in large)
    assert sorted(store.iter_digests()) == sorted(r for r in results if isinstance(r, str))
    assert list(store.tmp.iterdir()) == []


def test_a_failed_write_back_of_the_renames_fails_the_items_but_leaves_them_whole(store, durability):
    """The renames' write-back failing: the caller must commit nothing naming them, yet each named blob is whole."""
    with inject_fault("sync", 2, errno.EIO):
        results = store.put_many(LARGE[:5])
    assert all(isinstance(r, FileSystemError) for r in results)
    assert len(_verified(store)) == 5 and list(store.tmp.iterdir()) == []


_KILLED = """
import sys
from pathlib import Path
from syncengine.blobs import SMALL, BlobStore
size = SMALL if sys.argv[2] == "small" else SMALL * 2
docs = [(b'{"id": %d, "text": "' % i).ljust(size - 2, b"w") + b'"}' for i in range(50)]
BlobStore(Path(sys.argv[1])).put_many(docs)
"""


@pytest.mark.parametrize("size", ["small", "large"])
@pytest.mark.parametrize("point,named", [("blobs.after_temp", 0), ("blobs.after_rename", 50)])
def test_a_kill_between_phases_never_leaves_a_named_partial_blob(tmp_path, point, named, size):
    """SIGKILL inside the table's transaction (or after the temp files), or after its commit (or the renames):
    every named blob verifies, and clean_tmp clears the rest."""
    objects = tmp_path / "objects"
    proc = subprocess.run([sys.executable, "-c", _KILLED, str(objects), size], cwd=REPO, capture_output=True,
                          env=cli_env(SYNCENGINE_FAILPOINT=point), timeout=60)
    assert proc.returncode == -9, proc.stderr
    store = BlobStore(objects)
    assert len(_verified(store)) == named
    assert len(list(store.tmp.iterdir())) == (0 if size == "small" else 50 - named)
    store.clean_tmp()
    assert list(store.tmp.iterdir()) == []
    assert len(store.put_many([b"after the kill"])) == 1 and len(_verified(store)) == named + 1  # the store works on


@pytest.mark.integration
def test_a_base_that_cannot_be_kept_holds_back_only_its_document(kit):
    """ENOSPC storing one base during a first push: that document is reported and not committed, the rest are."""
    files = {f"doc{i}.md": f"document {i}\n" for i in range(6)}
    a = kit.replica(files)
    with inject_fault("store", 2, errno.ENOSPC):
        report = a.sync()
    assert len(report.problems) == 1 and "No space" in report.problems[0].reason
    assert sorted(report.pushed) == sorted(set(files) - {report.problems[0].path})
    assert a.sync().pushed == (report.problems[0].path,)
    b = kit.replica()
    b.sync()
    assert b.tree() == {name: text.encode() for name, text in files.items()}


@pytest.mark.integration
def test_only_small_downloads_are_staged_and_all_land(kit, monkeypatch):
    """A large download writes its own temp file (staging it would hold its bytes beside the old ones); all land."""
    from syncengine import staging

    staged: list[list[str]] = []
    real = staging._write_all

    def spy(ctx, items):
        written = real(ctx, items)
        staged.append(sorted(p.name for p in written))
        return written

    monkeypatch.setattr(staging, "_write_all", spy)
    big = os.urandom(staging.MAX_FILE + 1000)
    a = kit.replica({"big.bin": big, **{f"doc{i}.md": f"document {i}\n" for i in range(5)}})
    a.sync()
    b = kit.replica()
    b.sync()
    assert b.read("big.bin") == big and len(b.tree()) == 6 and b.leftovers() == []
    assert len(staged) == 1 and len(staged[0]) == 5 and not any("big.bin" in name for name in staged[0])
