"""Chunk manifests on the server: storing a large blob as the chunk blobs it is made of.

A client PUTs ``manifests/{sha256}`` after sending the chunks it did not
find on the server (packs): the blob is then stored as a list of parts, so
an edit of a large file costs the changed chunks, not the file. Everything
else keeps seeing one blob: ``blobs/missing``, commits, and the streamed
``GET blobs/{sha256}`` (which streams the parts in order).

Nothing is stored unless every part is a blob of the workspace, the sizes
agree with the stored parts and streaming the parts in order hashes to the
name. The hash check reads one part at a time, so memory stays at about one
part (1 MiB) whatever the blob's size.
"""

from __future__ import annotations

import hashlib
from typing import Any

import syncengine.protocol as p
from syncengine.server.guard import ApiError
from syncengine.server.storage import BlobInfo, Storage

_NAMED = 100  # missing chunks listed in a refusal, at most


def put_manifest(storage: Storage, ws_id: int, digest: str, body: Any, max_blob: int) -> dict[str, Any]:
    """Verify and store a manifest; the JSON answer, or ApiError (4xx, nothing stored)."""
    try:
        manifest = p.Manifest.from_dict(body)
    except p.ProtocolError as exc:
        raise ApiError(400, "bad_request", str(exc)) from None
    if manifest.size > max_blob:
        raise ApiError(413, "too_large", f"blob exceeds the server's limit of {max_blob} bytes")
    if storage.blob_infos(ws_id, [digest]):
        return {"hash": digest, "size": manifest.size, "stored": False}
    infos: dict[str, BlobInfo] = {}
    hashes = list(dict.fromkeys(h for h, _ in manifest.chunks))
    for start in range(0, len(hashes), p.MAX_HASHES):
        infos.update(storage.blob_infos(ws_id, hashes[start : start + p.MAX_HASHES]))
    missing = [h for h in hashes if h not in infos]
    if missing:
        raise ApiError(
            409,
            "blob_not_found",
            f"{len(missing)} chunk(s) of the manifest are not blobs of this workspace; "
            "upload them first (nothing stored)",
            missing=missing[:_NAMED],
        )
    parts = []
    for i, (chunk, size) in enumerate(manifest.chunks):
        info = infos[chunk]
        if info.size != size:
            raise ApiError(
                400, "bad_request", f"chunks[{i}] is {info.size} bytes on the server, not {size}"
            )
        parts.append(info)
    hasher = hashlib.sha256()
    for info in parts:
        for data in storage.iter_blob(info):
            hasher.update(data)
    if hasher.hexdigest() != digest:
        raise ApiError(
            400, "hash_mismatch", "the chunks do not hash to the blob's name; nothing stored"
        )
    stored = storage.put_manifest(ws_id, digest, manifest.size, parts)
    if stored is None:
        raise ApiError(409, "blob_not_found", "a chunk of the manifest left the server meanwhile (server gc); "
                       "upload it again (nothing stored)")
    return {"hash": digest, "size": manifest.size, "stored": stored}


def get_manifest(storage: Storage, ws_id: int, digest: str) -> dict[str, Any]:
    """The manifest of a blob stored as parts; 404 when it is stored whole (fetch it whole)."""
    info = storage.blob_infos(ws_id, [digest]).get(digest)
    if info is None:
        raise ApiError(404, "blob_not_found", "this workspace has no such blob")
    if not info.manifest:
        raise ApiError(404, "not_a_manifest", "this blob is stored whole; GET blobs/{sha256}")
    chunks = tuple((part.hash, part.size) for part in storage.blob_parts(info))
    return p.Manifest(info.size, chunks).to_dict(digest)
