"""Large blobs as chunk manifests on the wire (DESIGN §4), for :class:`~syncengine.remote.HttpRemote`.

A blob over ``MANIFEST_THRESHOLD`` is cut into content-defined chunks
(FastCDC, the sizes in :mod:`syncengine.protocol`): an edit moves only the
cut points near it, so an edit of a few bytes in a 40 MB file changes one
or two ~600 KiB chunks. Up: the chunks the server lacks go in packs, then
``PUT manifests/{sha256}`` names them all. Down: ``GET manifests/{sha256}``,
chunks this replica already holds are copied out of older local blobs
(:class:`~syncengine.chunkindex.ChunkIndex`), the rest come in packs, and
the file assembled at its offsets is hashed whole before anyone sees it.

Memory stays bounded whatever the file's size: the file is cut as a
stream, chunk bytes are read back from it while a pack is sent (one chunk
in memory), and a download holds at most one pack (``_DOWN_PACK_BYTES``).
A server without manifests (404/405) gets the whole-blob PUT/GET.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import tempfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import requests

from syncengine import protocol as p
from syncengine import remote as r
from syncengine.errors import BadServerAnswer

if TYPE_CHECKING:
    from syncengine.chunkindex import ChunkIndex

WHOLE = "whole"  # upload(): this blob goes as one PUT instead (no manifest support, too many chunks)
# Chunk bytes per pack. The server holds an uploaded pack whole (about twice over while
# it stores it), so packs up stay small; a pack down costs the client about its size.
# Measured on a 40 MB file (tests/test_scale.py): 8 MiB up grew the server by 17 MiB.
_UP_PACK_BYTES = 4 << 20
_DOWN_PACK_BYTES = 8 << 20
_CHANGED = "content changed since it was hashed"


@dataclass
class ChunkStats:
    """What chunked transfers did on one HttpRemote (for tests, bench and progress)."""

    manifests_put: int = 0
    chunks_sent: int = 0
    manifests_fetched: int = 0
    chunks_fetched: int = 0
    chunks_reused: int = 0


def _cdc() -> Any:
    import pyfastcdc

    return pyfastcdc.FastCDC(p.CDC_AVG, min_size=p.CDC_MIN, max_size=p.CDC_MAX)


def cut(source: r.BlobSource) -> tuple[str, list[tuple[str, int]]]:
    """(sha256 of the whole, [(chunk sha256, size)]) of the source's bytes as they are now."""
    whole = hashlib.sha256()
    chunks: list[tuple[str, int]] = []
    with _opened(source) as fh:
        for chunk in _cdc().cut_stream(fh):
            whole.update(chunk.data)
            chunks.append((hashlib.sha256(chunk.data).hexdigest(), chunk.length))
    return whole.hexdigest(), chunks


@contextlib.contextmanager
def _opened(source: r.BlobSource) -> Iterator[Any]:
    if source.data is not None:
        yield io.BytesIO(source.data)
    else:
        assert source.path is not None
        with open(source.path, "rb") as fh:
            yield fh


# ---------------------------------------------------------------- up


def upload(remote: r.HttpRemote, source: r.BlobSource, index: ChunkIndex | None) -> str | None:
    """Send one large blob as a manifest: None when stored, WHOLE to PUT it whole, else why not."""
    try:
        whole, chunks = cut(source)
    except OSError as exc:
        return f"cannot read: {exc.strerror or exc}"
    if whole != source.hash:
        return _CHANGED
    if len(chunks) > p.MAX_MANIFEST_CHUNKS:
        return WHOLE
    where: dict[str, tuple[int, int]] = {}
    offset = 0
    for digest, size in chunks:
        where.setdefault(digest, (offset, size))
        offset += size
    needed = remote.missing(where)
    for group in p.pack_groups([(h, where[h][1]) for h in needed], _UP_PACK_BYTES):
        try:
            problem = _send_chunks(remote, source, group, where)
        except OSError as exc:
            return f"cannot read: {exc.strerror or exc}"
        if problem:
            return problem
        remote.chunk_stats.chunks_sent += len(group)
    problem = _put_manifest(remote, source.hash, p.Manifest(offset, tuple(chunks)))
    if problem is None:
        remote.chunk_stats.manifests_put += 1
        if index is not None:
            index.record(source.hash, chunks)
    return problem


def _send_chunks(remote: r.HttpRemote, source: r.BlobSource, group: list[str],
                 where: dict[str, tuple[int, int]]) -> str | None:
    """One pack of chunks, streamed from the file and gzipped on the fly: memory is one chunk.

    A chunk that no longer hashes to its name (the file changed) is sent
    anyway, padded to its size: the server refuses the whole pack
    (hash_mismatch, nothing stored), which says the same as failing here.
    """
    header = p.PackHeader(tuple(p.PackEntry(h, where[h][1]) for h in group)).encode()

    def body() -> Iterator[bytes]:
        deflate = zlib.compressobj(1, zlib.DEFLATED, 31)
        yield deflate.compress(header)
        with _opened(source) as fh:
            for digest in group:
                offset, size = where[digest]
                fh.seek(offset)
                out = deflate.compress(fh.read(size).ljust(size, b"\0"))
                if out:
                    yield out
        yield deflate.flush()

    def handle(resp: requests.Response) -> None:
        answer = r._parsed(p.PackResponse.from_dict, remote._json(resp))
        if set(answer.stored) != set(group):
            raise BadServerAnswer("the server did not store every chunk of a pack")

    def refused(resp: requests.Response) -> str | None:
        return _CHANGED if r._safe_json(resp).get("error") == "hash_mismatch" else None

    headers = {"Content-Type": p.PACK_MEDIA_TYPE, "Content-Encoding": "gzip"}
    return remote._call("POST", f"{remote._base}/blobs/pack", handle, body=body,
                        headers=headers, refusal=refused)


def _put_manifest(remote: r.HttpRemote, digest: str, manifest: p.Manifest) -> str | None:
    def refused(resp: requests.Response) -> str | None:
        info = r._safe_json(resp)
        if resp.status_code in (404, 405) and info.get("error") != "blob_not_found":
            return WHOLE  # a server that predates manifests
        if resp.status_code == 409:
            return "chunks vanished from the server before the manifest named them"
        if resp.status_code == 400 and info.get("error") == "hash_mismatch":
            return _CHANGED
        if resp.status_code == 413:
            return f"too large for the server ({info.get('message') or 'over its limit'})"
        return None

    return remote._call(
        "PUT",
        f"{remote._base}/manifests/{digest}",
        lambda resp: None,
        json_body=manifest.to_dict(),
        ok=(200, 201),
        refusal=refused,
    )


# ---------------------------------------------------------------- down


_NO_MANIFEST = object()


def get_manifest(remote: r.HttpRemote, digest: str) -> p.Manifest | None:
    """The server's manifest of ``digest``; None when it has none (stored whole, older server)."""

    def handle(resp: requests.Response) -> p.Manifest:
        data = remote._json(resp)
        if isinstance(data, dict) and data.get("hash", digest) != digest:
            raise BadServerAnswer(f"the server answered the manifest of another blob than {digest[:12]}")
        manifest = r._parsed(p.Manifest.from_dict, data)
        if manifest.size > r.MAX_BLOB_BYTES:
            raise BadServerAnswer(f"the manifest of {digest[:12]} declares {manifest.size} bytes")
        return manifest

    def refused(resp: requests.Response) -> object | None:
        return _NO_MANIFEST if resp.status_code in (404, 405) else None

    answer = remote._call("GET", f"{remote._base}/manifests/{digest}", handle, refusal=refused)
    return None if answer is _NO_MANIFEST else answer


def fetch(remote: r.HttpRemote, digest: str, index: ChunkIndex | None) -> Iterator[r.FetchedBlob]:
    """One large blob, verified: by its manifest when the server has one, else whole."""
    manifest = get_manifest(remote, digest)
    if manifest is None:
        yield from remote._get_large(digest)
        return
    remote.chunk_stats.manifests_fetched += 1
    tmp_dir = tempfile.mkdtemp(prefix="syncengine-fetch-")
    tmp = Path(tmp_dir) / digest
    try:
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            problem = _assemble(remote, fd, digest, manifest, index)
        finally:
            os.close(fd)
        if problem:
            yield r.FetchedBlob(digest, "corrupt", manifest.size, message=problem)
            return
        yield r.FetchedBlob(digest, "ok", manifest.size, path=tmp)
        if index is not None:  # the caller has stored it by now
            index.record(digest, manifest.chunks)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
        with contextlib.suppress(OSError):
            os.rmdir(tmp_dir)


def _assemble(remote: r.HttpRemote, fd: int, digest: str, manifest: p.Manifest,
              index: ChunkIndex | None) -> str | None:
    """Write the blob's chunks at their offsets in ``fd``; None when it hashes right, else why not."""
    os.ftruncate(fd, manifest.size)
    places: dict[str, list[int]] = {}
    sizes: dict[str, int] = {}
    offset = 0
    for chunk, size in manifest.chunks:
        if sizes.setdefault(chunk, size) != size:
            raise BadServerAnswer(f"the manifest of {digest[:12]} gives one chunk two sizes")
        places.setdefault(chunk, []).append(offset)
        offset += size

    def write(chunk: str, data: bytes) -> None:
        for at in places[chunk]:
            os.pwrite(fd, data, at)

    have = index.reuse(sizes, write) if index is not None else set()
    remote.chunk_stats.chunks_reused += len(have)
    wanted = [(h, n) for h, n in sizes.items() if h not in have]
    for group in p.pack_groups(wanted, _DOWN_PACK_BYTES):
        problem = _fetch_group(remote, group, sizes, write)
        if problem:
            return problem
    whole = hashlib.sha256()
    os.lseek(fd, 0, os.SEEK_SET)
    while data := os.read(fd, r.READ_STEP):
        whole.update(data)
    if whole.hexdigest() != digest:
        return f"blob {digest[:12]} from the server does not match its hash (chunks do not add up)"
    return None


def _fetch_group(remote: r.HttpRemote, group: list[str], sizes: dict[str, int],
                 write: Callable[[str, bytes], None]) -> str | None:
    pending = group
    while pending:
        header, blobs = remote._unpack(pending)
        if header.large:
            raise BadServerAnswer("the server calls a chunk of a manifest large")
        for blob in blobs:
            if not blob.ok:
                return blob.message or f"chunk {blob.hash[:12]} is corrupt"
            if blob.size != sizes[blob.hash]:
                raise BadServerAnswer(f"chunk {blob.hash[:12]} is not the size its manifest says")
            assert blob.data is not None
            write(blob.hash, blob.data)
            remote.chunk_stats.chunks_fetched += 1
        if header.missing:
            return f"the server lacks chunk {header.missing[0][:12]} of its own manifest"
        if header.deferred and not header.blobs:
            raise BadServerAnswer("the server deferred every chunk of a pack")
        pending = list(header.deferred)
    return None
