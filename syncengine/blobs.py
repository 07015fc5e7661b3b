"""Content-addressed blob store under ``.syncengine/objects``.

A blob is named by the sha256 of its uncompressed bytes and encoded as a
5-byte header (``SEB1`` + codec) then either zlib-compressed or raw bytes
(raw when compression does not pay, as for media, or when a blob fits one
4 KiB block either way, unless a push deflated it for its upload anyway:
see :func:`encode`). Every read re-hashes what it returns, so a
damaged blob is reported, never served.

Where a blob lives depends on its size. Up to :data:`SMALL` bytes (most
documents) it is a row of ``objects/small.db`` (:mod:`syncengine.smallblobs`:
a batch in one transaction instead of a file each). Larger ones are files
``objects/ab/cdef...``, written to ``objects/tmp`` and renamed into place, so
a half-written blob never has a real name (A7). Stores written before the
table existed keep their small blobs as files; every reader looks in both.

Many blobs at once (a batch's bases, a pack of downloads) go through
:meth:`BlobStore.put_many`: the small ones commit in one durable
transaction; the large ones' temp files are written, made durable together
(one ``syncfs``, see :mod:`syncengine.durable`), renamed and the renames made
durable, all before the caller commits anything that names them.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import os
import secrets
import time
import zlib
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import cast

from syncengine.durable import Batch
from syncengine.errors import HashMismatch, SyncEngineError
from syncengine.fsops import (
    CHUNK,
    FileStat,
    _open_nofollow,
    check_fault,
    failpoint,
    faults_armed,
    mapped,
    os_error,
)
from syncengine.protocol import deflate
from syncengine.smallblobs import SmallBlobs

MAGIC = b"SEB1"
ZLIB = b"z"
RAW = b"r"
_LEVEL = 1  # documents compress well even at level 1; higher levels cost CPU for little
ONE_BLOCK = 4096 - len(MAGIC) - 1  # blobs up to this size are stored raw: a 4 KiB block either way
# Blobs up to this size live in objects/small.db. Measured here (docs/performance.md): reading a blob
# from the table takes 6 us at 1-4 KiB and 10 us at 16 KiB against 11-12 us for a file; at 64 KiB the
# table is slower (25 against 16 us), and writes stop gaining too.
SMALL = 16 * 1024


def encode(data: bytes, *, deflate_small: bool = False) -> bytes:
    """A blob's stored form (header + bytes), the same in the table and in a file.

    Public so that a push can make a base's stored form itself and send its
    deflated bytes in the upload pack too (:func:`deflated_part`), instead
    of deflating the same document twice; it hands the form to
    :meth:`BlobStore.put_many` (``encoded``). Such a caller deflates every
    document for the pack anyway, so it asks for ``deflate_small``: a blob
    of one 4 KiB block or less is then stored deflated too where that saves
    5% (it lives in objects/small.db, where a row takes its bytes, not a
    block: a first push's 10,000 bases write 15 MB there instead of 34).
    """
    if len(data) <= ONE_BLOCK:
        if not deflate_small or len(data) <= 64:
            # It takes one 4 KiB block of disk compressed or not: the deflate (a third
            # of storing a first push's bases) would buy nothing, and reads skip the inflate.
            return MAGIC + RAW + data
        packed = deflate(data, _LEVEL)
        return MAGIC + ZLIB + packed if len(packed) < len(data) * 0.95 else MAGIC + RAW + data
    packed = deflate(data, _LEVEL)
    raw = len(data) >= 4096 and len(packed) > len(data) * 0.95  # as put_stream decides
    return MAGIC + RAW + data if raw else MAGIC + ZLIB + packed


def deflated_part(stored: bytes) -> bytes | None:
    """The zlib stream (protocol.deflate) inside a stored form, or None if it is stored raw."""
    return stored[len(MAGIC) + 1:] if stored[len(MAGIC):len(MAGIC) + 1] == ZLIB else None


def _decode(stored: bytes) -> bytes:
    """The bytes of a stored form; HashMismatch if it cannot be one."""
    if stored[:4] != MAGIC:
        raise HashMismatch("blob has no valid header")
    if stored[4:5] == RAW:
        return stored[5:]
    try:
        return zlib.decompress(stored[5:])
    except zlib.error as exc:
        raise HashMismatch(f"blob is damaged: {exc}") from exc


class BlobStore:
    """Blobs of one workspace (or of a test); safe for several processes."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.tmp = directory / "tmp"
        self.tmp.mkdir(parents=True, exist_ok=True)
        self._dir, self._tmp = str(directory), str(self.tmp)
        self._folders: set[str] = set()  # objects/ab folders known to exist (put_many)
        self.small = SmallBlobs(os.path.join(self._dir, "small.db"))

    def close(self) -> None:
        """Close the table's connection (it reopens on the next use)."""
        self.small.close()

    def path(self, digest: str) -> Path:
        """Where the blob is, or would be, a file (a large blob, or a small one of an older store)."""
        return self.dir / digest[:2] / digest[2:]

    def has(self, digest: str) -> bool:
        return self.small.has(digest) or self.path(digest).exists()

    def stored_size(self, digest: str) -> int | None:
        """Bytes the blob takes in the store (compressed), or None if it is not stored whole."""
        size = self.small.stored_size(digest)
        if size is None:
            try:
                size = os.stat(self.path(digest)).st_size
            except FileNotFoundError:
                return None
        return size

    def stored_at(self, digest: str) -> float | None:
        """When the blob was last stored (gc's grace period counts from it), or None if absent."""
        when = self.small.stored_at(digest)
        if when is None:
            try:
                when = os.stat(self.path(digest)).st_mtime
            except FileNotFoundError:
                return None
        return when

    def set_stored_at(self, digest: str, when: float) -> None:
        """Back-date (or move) a blob's store time: for tests and tools that age a store."""
        self.small.set_stored_at(digest, when)
        with contextlib.suppress(FileNotFoundError):
            os.utime(self.path(digest), (when, when))

    # ------------------------------------------------------------ writing

    def put_bytes(self, data: bytes) -> str:
        """Store ``data``; returns its sha256."""
        return self.put_stream([data])

    def put_stream(self, chunks: Iterable[bytes], expect: str | None = None) -> str:
        """Store a stream, hashing it on the way; refuses it if ``expect`` differs.

        A stream that ends within :data:`SMALL` bytes goes to the table like
        a batch of one; a longer one is written to a temp file as it comes.
        """
        stream = iter(chunks)
        head: list[bytes] = []
        held = 0
        for chunk in stream:
            head.append(chunk)
            held += len(chunk)
            if held > SMALL:
                break
        else:
            data = b"".join(head)
            (result,) = self.put_many([data], [expect])
            if isinstance(result, SyncEngineError):
                raise result
            return result
        tmp = self.tmp / f"{secrets.token_hex(8)}.part"
        digest = hashlib.sha256()
        with mapped("objects"):
            try:
                check_fault("store", tmp)  # tests: a full disk or a denied write in the blob store
                with open(tmp, "wb") as out:
                    out.write(MAGIC + ZLIB)
                    comp = zlib.compressobj(_LEVEL)
                    raw_size = 0
                    packed_size = 0
                    for chunk in itertools.chain(head, stream):
                        digest.update(chunk)
                        raw_size += len(chunk)
                        packed = comp.compress(chunk)
                        packed_size += len(packed)
                        out.write(packed)
                    tail = comp.flush()
                    packed_size += len(tail)
                    out.write(tail)
                    out.flush()
                    os.fsync(out.fileno())
                name = digest.hexdigest()
                if expect is not None and name != expect:
                    raise HashMismatch(f"content hashes to {name[:12]}, expected {expect[:12]}")
                if raw_size >= 4096 and packed_size > raw_size * 0.95:
                    # Incompressible: rewrite raw so reads skip the inflate.
                    self._rewrite_raw(tmp)
                return self._commit(tmp, name)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)

    def put_many(self, items: Sequence[bytes], expect: Sequence[str | None] | None = None,
                 *, hashed: bool = False, encoded: Sequence[bytes] | None = None) -> list[str | SyncEngineError]:
        """Store blobs together; per item, its sha256 or why it was not stored.

        One item's failure (a full disk, bytes that do not match ``expect``)
        is that item's answer and never stops the others, so a caller keeps
        the per-document semantics it had storing them one by one. A failure
        of a shared step (the table's commit, the temp files' write-back)
        fails every item that depended on it: nothing is named whose bytes
        may not be on disk. Each item is held whole in memory, as it already
        is by the caller; large files go through :meth:`put_stream`.

        With ``hashed``, the caller has just hashed each item to its name in
        ``expect`` (a push checks what it reads against the journal): the
        store takes those names instead of hashing them all again. With
        ``encoded``, each item's stored form (:func:`encode` of it) is
        given too, made by a caller that needed its deflate anyway.
        """
        results: list[str | SyncEngineError | None] = [None] * len(items)
        small: dict[str, list[int]] = {}  # name -> the items with these bytes, for the table
        rows: list[tuple[str, bytes]] = []
        # name -> (temp file, the items with these bytes); plain strings, as pathlib
        # costs more than the writes here
        pending: dict[str, tuple[str, list[int]]] = {}
        armed = faults_armed()  # once, not a look at the environment per blob
        with contextlib.ExitStack() as stack:
            batch: Batch | None = None
            try:
                for i, data in enumerate(items):
                    wanted = expect[i] if expect else None
                    name = wanted if hashed and wanted is not None else hashlib.sha256(data).hexdigest()
                    if wanted is not None and name != wanted:
                        results[i] = HashMismatch(f"content hashes to {name[:12]}, expected {wanted[:12]}")
                    elif len(data) <= SMALL:
                        # No look for it first: storing it again costs nothing here and
                        # restarts gc's grace period, as a sync about to name it needs.
                        if name in small:
                            small[name].append(i)
                            continue
                        if armed:
                            try:
                                check_fault("store", self.small.path)  # tests: a full disk or a denied write
                            except OSError as exc:
                                results[i] = os_error(exc, "objects")
                                continue
                        small[name] = [i]
                        rows.append((name, encoded[i] if encoded else encode(data)))
                    elif name in pending:
                        pending[name][1].append(i)
                    elif os.path.exists(os.path.join(self._dir, name[:2], name[2:])):
                        results[i] = name
                    else:
                        if batch is None:  # opened before the first write (see durable.Batch)
                            batch = stack.enter_context(Batch(self._dir))
                        try:
                            pending[name] = (self._write_temp(encoded[i] if encoded else encode(data)), [i])
                        except OSError as exc:
                            results[i] = os_error(exc, "objects")
                stored = self._put_small(rows, small, results) if rows else False
                if pending:
                    assert batch is not None
                    if not rows:
                        failpoint("blobs.after_temp")
                    # Before the renames: if the write-back fails, nothing is renamed and
                    # the finally below removes the temp files.
                    if not self._write_back(batch, [tmp for tmp, _ in pending.values()], pending, results):
                        return self._answers(results)
                renamed: dict[str, tuple[str, list[int]]] = {}
                for name, (tmp, indices) in list(pending.items()):
                    try:
                        self._rename(tmp, name)
                        renamed[name] = pending.pop(name)
                    except OSError as exc:
                        for i in indices:
                            results[i] = os_error(exc, "objects")
                if renamed or stored:
                    failpoint("blobs.after_rename")
                if renamed:
                    assert batch is not None
                    # After them: each named blob is whole, but its name may not survive a
                    # crash, so its items fail and the caller commits nothing that names them.
                    folders = sorted({os.path.join(self._dir, name[:2]) for name in renamed})
                    if self._write_back(batch, folders, renamed, results):
                        for name, (_tmp, indices) in renamed.items():
                            for i in indices:
                                results[i] = name
            finally:
                for tmp, _ in pending.values():
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(tmp)
        return self._answers(results)

    def _put_small(self, rows: list[tuple[str, bytes]], small: dict[str, list[int]],
                   results: list[str | SyncEngineError | None]) -> bool:
        """Commit the batch's small blobs in one transaction; if that fails, all of them fail."""

        def before_commit() -> None:
            failpoint("blobs.after_temp")  # written, not committed: a kill here stores none of them
            check_fault("sync", self.dir)  # tests: a commit whose write-back reports EIO or ENOSPC

        try:
            self.small.put(rows, time.time(), before_commit)
        except OSError as exc:
            error = os_error(exc, "objects")
            for indices in small.values():
                for i in indices:
                    results[i] = error
            return False
        for name, indices in small.items():
            for i in indices:
                results[i] = name
        return True

    @staticmethod
    def _answers(results: list[str | SyncEngineError | None]) -> list[str | SyncEngineError]:
        """Every item has its answer by now: a name or an error."""
        assert None not in results
        return cast("list[str | SyncEngineError]", results)

    def _write_temp(self, stored: bytes) -> str:
        """One item's temp file, its stored form (no fsync: put_many makes the batch durable at once)."""
        tmp = os.path.join(self._tmp, f"{secrets.token_hex(8)}.part")
        try:
            check_fault("store", tmp)  # tests: a full disk or a denied write in the blob store
            view = memoryview(stored)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o644)
            try:
                while view:
                    view = view[os.write(fd, view):]
            finally:
                os.close(fd)
        except OSError:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        return tmp

    def _rename(self, tmp: str, name: str) -> None:
        folder = os.path.join(self._dir, name[:2])
        final = os.path.join(folder, name[2:])
        check_fault("store", final)
        if name[:2] not in self._folders:
            os.makedirs(folder, exist_ok=True)
            self._folders.add(name[:2])
        try:
            os.replace(tmp, final)
        except FileNotFoundError:
            if not os.path.exists(tmp):
                raise
            os.makedirs(folder, exist_ok=True)  # the folder went since we made it
            os.replace(tmp, final)

    def _write_back(self, batch: Batch, paths: list[str], items: dict[str, tuple[str, list[int]]],
                    results: list[str | SyncEngineError | None]) -> bool:
        """Make ``paths`` durable; if that fails, every one of ``items`` fails (which is at fault is unknowable)."""
        try:
            check_fault("sync", self.dir)  # tests: a write-back that reports EIO or ENOSPC
            batch.sync(paths)
        except OSError as exc:
            error = os_error(exc, "objects")
            for _tmp, indices in items.values():
                for i in indices:
                    results[i] = error
            return False
        return True

    def put_file(self, path: Path) -> tuple[str, FileStat]:
        """Store a file's current bytes; returns (hash, stat of those bytes).

        Like fsops.hash_file, the file is stat'ed around the read so the
        hash returned provably belongs to the stat returned.
        """
        for _attempt in range(3):
            fd = _open_nofollow(path)
            with os.fdopen(fd, "rb") as fh:
                before = FileStat.of(os.fstat(fh.fileno()))
                digest = self.put_stream(iter(lambda: fh.read(CHUNK), b""))
                after = FileStat.of(os.fstat(fh.fileno()))
            if before == after:
                return digest, after
        raise OSError(16, "file kept changing while it was read", str(path))

    def _rewrite_raw(self, tmp: Path) -> None:
        raw = tmp.with_suffix(".raw")
        with open(raw, "wb") as out:
            out.write(MAGIC + RAW)
            for chunk in self._inflate(tmp):
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        os.replace(raw, tmp)

    def _commit(self, tmp: Path, name: str) -> str:
        final = self.path(name)
        if final.exists():
            return name
        final.parent.mkdir(exist_ok=True)
        check_fault("store", final)
        os.replace(tmp, final)
        return name

    # ------------------------------------------------------------ reading

    def _inflate(self, path: Path) -> Iterator[bytes]:
        with open(path, "rb") as fh:
            header = fh.read(5)
            if header[:4] != MAGIC:
                raise HashMismatch("blob has no valid header", paths=[path.name])
            if header[4:5] == RAW:
                while chunk := fh.read(CHUNK):
                    yield chunk
                return
            decomp = zlib.decompressobj()
            try:
                while chunk := fh.read(CHUNK):
                    out = decomp.decompress(chunk)
                    if out:
                        yield out
                tail = decomp.flush()
            except zlib.error as exc:
                raise HashMismatch(f"blob is damaged: {exc}") from exc
            if tail:
                yield tail

    def iter_verified(self, digest: str) -> Iterator[bytes]:
        """Stream a blob; raises HashMismatch at the end if it was damaged.

        Callers write what they receive to a temp file and rename only after
        the stream ends, so a damaged blob never reaches a user's file. A
        small blob is checked whole before any of it is given out.
        """
        stored = self.small.get(digest)
        if stored is not None:
            try:
                data = _decode(stored)
                if hashlib.sha256(data).hexdigest() != digest:
                    raise HashMismatch(f"blob {digest[:12]} is damaged")
            except HashMismatch:
                self._set_aside_small(digest, stored)
                raise
            yield data
            return
        path = self.path(digest)
        if not path.exists():
            raise HashMismatch(f"blob {digest[:12]} is missing from the store")
        check = hashlib.sha256()
        try:
            for chunk in self._inflate(path):
                check.update(chunk)
                yield chunk
            if check.hexdigest() != digest:
                raise HashMismatch(f"blob {digest[:12]} is damaged")
        except HashMismatch:
            self._set_aside(digest)
            raise

    def _set_aside(self, digest: str) -> None:
        """Move a damaged blob to ``objects/damaged/`` so the store heals.

        Left in place, it would be damaged for good: storing the same bytes
        again finds the name taken, and a sync never fetches a blob the store
        says it has. Set aside (kept for a person to look at), the next put or
        download writes a good copy.
        """
        damaged = self.dir / "damaged"
        with contextlib.suppress(OSError):
            damaged.mkdir(exist_ok=True)
            os.replace(self.path(digest), damaged / digest)

    def _set_aside_small(self, digest: str, stored: bytes) -> None:
        """A damaged row: its bytes to ``objects/damaged/`` as a file, then the row goes (as :meth:`_set_aside`)."""
        damaged = self.dir / "damaged"
        with contextlib.suppress(OSError):
            damaged.mkdir(exist_ok=True)
            (damaged / digest).write_bytes(stored)
            self.small.delete([digest])

    def get(self, digest: str) -> bytes:
        return b"".join(self.iter_verified(digest))

    def size(self, digest: str) -> int:
        return sum(len(c) for c in self.iter_verified(digest))

    # ------------------------------------------------------------ upkeep

    def iter_digests(self) -> Iterator[str]:
        """Every stored name, once, in order (a small blob may be in both places in an older store)."""
        names = {name for name, _at, _size in self.small.entries()}
        for sub in self._folders_on_disk():
            names.update(sub.name + item.name for item in sub.iterdir())
        yield from sorted(names)

    def iter_stamped(self) -> Iterator[tuple[str, float, int]]:
        """Every stored copy as (name, when stored, bytes it takes): what gc weighs."""
        yield from self.small.entries()
        yield from self._loose()

    def _folders_on_disk(self) -> list[Path]:
        return [sub for sub in sorted(self.dir.iterdir()) if len(sub.name) == 2 and sub.is_dir()]

    def _loose(self) -> Iterator[tuple[str, float, int]]:
        for sub in self._folders_on_disk():
            for item in sub.iterdir():
                try:
                    st = item.stat()
                except FileNotFoundError:
                    continue
                yield sub.name + item.name, st.st_mtime, st.st_size

    def delete(self, digest: str) -> None:
        self.delete_many([digest])

    def delete_many(self, digests: Iterable[str]) -> None:
        """Drop these blobs wherever they are (the table's in one transaction)."""
        names = list(digests)
        self.small.delete(names)
        for digest in names:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path(digest))

    def clean_tmp(self) -> None:
        """Drop partial blobs a killed process left; none of them is referenced.

        The table needs no cleaning: SQLite drops a killed writer's
        uncommitted rows itself.
        """
        for item in self.tmp.iterdir():
            with contextlib.suppress(OSError):
                item.unlink()
