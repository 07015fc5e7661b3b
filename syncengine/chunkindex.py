"""Which chunks of large files this replica already holds, for chunked downloads to reuse.

Every large blob this replica uploads or downloads as a manifest (see
:mod:`syncengine.chunked`) leaves a sidecar ``objects/manifests/<sha256>``:
the JSON list of its ``[chunk_sha256, size]`` in order. When a new version
of a large file arrives, the chunks it shares with an older version are
copied out of the older blob in the local :class:`BlobStore` instead of
being downloaded again.

The sidecar is only a hint: each copied chunk is hashed before it is used,
and the assembled file is hashed as a whole by the caller. A sidecar whose
blob has left the store (local gc) is dropped the next time it is read; a
damaged or missing blob just means those chunks are fetched. ``BlobStore``
and gc only look at two-character folders, so ``manifests/`` is invisible
to them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
from collections.abc import Callable, Iterable, Mapping

from syncengine import protocol as p
from syncengine.blobs import BlobStore
from syncengine.errors import HashMismatch

_MAX_SIDECAR = 16 << 20  # a sidecar larger than this is not ours


class ChunkIndex:
    """Sidecar manifests of the large blobs in one BlobStore."""

    def __init__(self, blobs: BlobStore) -> None:
        self.blobs = blobs
        self.dir = blobs.dir / "manifests"
        # chunk -> (blob, offset, size): the sidecars are read once per index (one per
        # sync round), not once per large file fetched, which was quadratic in a first sync.
        self._where: dict[str, tuple[str, int, int]] | None = None

    def record(self, digest: str, chunks: Iterable[tuple[str, int]]) -> None:
        """Remember ``digest``'s chunks (atomic: a sidecar is whole or absent)."""
        p.check_hash(digest)
        chunks = list(chunks)
        data = json.dumps([[h, n] for h, n in chunks], separators=(",", ":")).encode()
        with contextlib.suppress(OSError):  # a hint: failing to keep it costs bandwidth only
            self.dir.mkdir(exist_ok=True)
            tmp = self.dir / f".{secrets.token_hex(8)}.tmp"
            try:
                with open(tmp, "wb") as out:
                    out.write(data)
                os.replace(tmp, self.dir / digest)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
        if self._where is not None:
            self._add(digest, chunks, newest=True)

    def _add(self, digest: str, chunks: Iterable[tuple[str, int]], newest: bool = False) -> None:
        assert self._where is not None
        offset = 0
        for chunk, size in chunks:
            if newest or chunk not in self._where:
                self._where[chunk] = (digest, offset, size)
            offset += size

    def chunks_of(self, digest: str) -> list[tuple[str, int]] | None:
        """A blob's chunks, or None (no sidecar, a damaged one, or its blob is gone)."""
        path = self.dir / digest
        if not self.blobs.has(digest):
            with contextlib.suppress(OSError):
                path.unlink()
            return None
        try:
            if path.stat().st_size > _MAX_SIDECAR:
                raise ValueError("too large")
            entries = json.loads(path.read_bytes())
            return [(p.check_hash(h), int(n)) for h, n in entries]
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError):
            with contextlib.suppress(OSError):
                path.unlink()
            return None

    def _load(self) -> dict[str, tuple[str, int, int]]:
        if self._where is None:
            self._where = {}
            try:
                names = sorted(os.listdir(self.dir))
            except OSError:
                names = []
            for name in names:
                if not name.startswith(".") and len(name) == 64:
                    self._add(name, self.chunks_of(name) or ())
        return self._where

    def locate(self, wanted: Iterable[str]) -> dict[str, list[tuple[str, int, int]]]:
        """Local blobs holding wanted chunks: {blob: [(chunk, offset, size)] by offset}."""
        where = self._load()
        found: dict[str, list[tuple[str, int, int]]] = {}
        for chunk in dict.fromkeys(wanted):
            if chunk in where:
                blob, offset, size = where[chunk]
                found.setdefault(blob, []).append((chunk, offset, size))
        for places in found.values():
            places.sort(key=lambda place: place[1])
        return found

    def _forget(self, blob: str) -> None:
        """A blob that failed to give its chunks (gone, damaged): stop offering them."""
        if self._where is not None:
            self._where = {c: w for c, w in self._where.items() if w[0] != blob}

    def reuse(self, sizes: Mapping[str, int], write: Callable[[str, bytes], None]) -> set[str]:
        """Copy the wanted chunks (``{chunk: size}``) found locally to ``write``; the ones done.

        Each source blob is streamed once, in order; a chunk is handed over
        only once its bytes hash to its name.
        """
        done: set[str] = set()
        for source, places in self.locate(sizes).items():
            places = [(c, off, n) for c, off, n in places if sizes.get(c) == n]
            try:
                self._copy(source, places, write, done)
            except (HashMismatch, OSError):
                self._forget(source)
        return done

    def _copy(self, source: str, places: list[tuple[str, int, int]],
              write: Callable[[str, bytes], None], done: set[str]) -> None:
        buf = bytearray()
        base = 0  # offset in the source blob of buf[0]
        i = 0
        damaged = False  # then read to the end: the store sets a damaged blob aside
        for piece in self.blobs.iter_verified(source):
            buf += piece
            while i < len(places):
                chunk, offset, size = places[i]
                if offset + size > base + len(buf):
                    break
                data = bytes(buf[offset - base : offset - base + size])
                if hashlib.sha256(data).hexdigest() == chunk:
                    write(chunk, data)
                    done.add(chunk)
                else:
                    damaged = True
                i += 1
            # keep only what the next wanted chunk still needs
            keep_from = places[i][1] if i < len(places) else base + len(buf)
            drop = min(max(0, keep_from - base), len(buf))
            del buf[:drop]
            base += drop
            if i >= len(places) and not damaged:
                return

