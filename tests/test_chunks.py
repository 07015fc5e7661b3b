"""Chunk manifests (DESIGN §4): an edit to a large file travels as the chunks that changed.

Real server on loopback, real replicas; what crossed the wire is counted on
the server's database (blob rows) and by a proxy between a replica and the
server (the chunk hashes it asked for), or by HttpRemote's chunk_stats.
"""

from __future__ import annotations

import gzip
import hashlib
import itertools
import json
import random

import pytest

from syncengine import Workspace, chunked
from syncengine import protocol as p
from syncengine.blobs import BlobStore
from syncengine.chunkindex import ChunkIndex
from syncengine.errors import BadServerAnswer
from syncengine.remote import BlobSource
from tests.server.conftest import Api, FaultProxy

pytestmark = pytest.mark.integration

_ws = itertools.count(1)
MB = 1 << 20


def _random(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _edit(data: bytes, at: int, new: bytes, insert: bool = False) -> bytes:
    return data[:at] + new + data[at + (0 if insert else len(new)) :]


def _blob_rows(server) -> int:
    m = server.storage.m
    with server.storage.db.connection_context():
        return m.Blob.select().count()


def _unpacked(proxy: FaultProxy) -> list[str]:
    """Every hash a replica asked for in blobs/unpack, through the proxy."""
    out: list[str] = []
    for method, path, headers, body in proxy.received:
        if method == "POST" and path.endswith("/blobs/unpack"):
            if headers.get("Content-Encoding") == "gzip":
                body = gzip.decompress(body)
            out += json.loads(body)["hashes"]
    return out


@pytest.fixture
def api(storage, server_factory):
    """A raw client on a fresh server: SQLite, and PostgreSQL under .ci/run (migration 2 on both)."""
    server = server_factory(storage)
    api = Api(server.url, "chunks", server.token("chunks"))
    yield api
    api.close()


# ---------------------------------------------------------------- cutting


def test_chunking_is_deterministic_bounded_and_local():
    """Same bytes, same cuts; no chunk over 1 MiB; a small edit or insert changes 1-2 chunks."""
    data = _random(20 * MB, 1)
    whole, chunks = chunked.cut(BlobSource.from_bytes(data))
    assert whole == _sha(data) and chunked.cut(BlobSource.from_bytes(data))[1] == chunks
    assert sum(n for _, n in chunks) == len(data) and max(n for _, n in chunks) <= p.SMALL_BLOB
    assert 20 <= len(chunks) <= 80
    zeros = chunked.cut(BlobSource.from_bytes(bytes(6 * MB)))[1]
    assert max(n for _, n in zeros) == p.CDC_MAX  # no cut point in zeros: the max holds
    old = {h for h, _ in chunks}
    for edited in (_edit(data, 10 * MB, b"0123456789"), _edit(data, 1000, b"hello", insert=True)):
        new = [h for h, _ in chunked.cut(BlobSource.from_bytes(edited))[1] if h not in old]
        assert 1 <= len(new) <= 2


def test_a_pack_header_names_manifests_among_large_blobs_only():
    big, small = _sha(b"big"), _sha(b"small")
    header = p.PackHeader((), large=(big,), manifests=(big,))
    assert p.PackHeader.decode(header.encode()) == header
    assert b"manifests" not in p.PackHeader((), large=(big,)).encode()  # as older servers wrote it
    with pytest.raises(p.ProtocolError):
        p.PackHeader.decode(p.PackHeader((), missing=(small,), manifests=(small,)).encode())


# ---------------------------------------------------------------- end to end


def test_an_edit_to_a_large_file_moves_only_the_changed_chunks(kit, proxy, shared_server):
    """20 MB synced once; a 10-byte edit then a 7-byte insert each send and fetch a couple of chunks."""
    data = _random(20 * MB, 2)
    a = kit.replica({"big.bin": data})
    b = kit.replica(url=proxy.url)
    before = _blob_rows(shared_server)
    a.sync()
    first = _blob_rows(shared_server) - before
    assert first >= 20  # the chunks and the manifest blob
    b.sync()
    assert b.read("big.bin") == data
    assert len(_unpacked(proxy)) >= first - 1 and proxy.calls("GET", "/manifests/") == 1
    for edited in (_edit(data, 10 * MB, b"0123456789"), _edit(data, 100_000, b"INSERT!", insert=True)):
        a.write("big.bin", edited)
        rows = _blob_rows(shared_server)
        assert a.sync().pushed
        assert 2 <= _blob_rows(shared_server) - rows <= 3  # the new blob and one or two chunks
        proxy.received.clear()
        proxy.seen.clear()
        assert b.sync().downloaded == ("big.bin",)
        asked = [h for h in _unpacked(proxy) if h != _sha(edited)]
        assert 1 <= len(asked) <= 2, asked  # the rest came out of b's copy of the old version
        assert not any(m == "GET" and "/blobs/" in path for m, path in proxy.seen)  # never whole
        assert b.read("big.bin") == edited
        data = edited
    sidecars = b.root / ".syncengine" / "objects" / "manifests"
    assert len(list(sidecars.iterdir())) == 3  # one per version b fetched
    with Workspace(b.root) as ws:
        ws.gc("0s")  # local gc walks the store around the sidecars' folder
        assert ws.blobs.has(_sha(data)) and len(list(sidecars.iterdir())) == 3


def test_a_local_copy_is_reused_and_a_damaged_one_is_fetched_instead(shared_server, tmp_path):
    """HttpRemote with a ChunkIndex: chunks come out of the old local blob; damaged, from the server."""
    ws = f"chunks{next(_ws)}"
    v1 = _random(6 * MB, 3)
    v2 = _edit(v1, 3 * MB, b"changed")
    store = BlobStore(tmp_path / "objects")
    store.put_bytes(v1)
    index = ChunkIndex(store)
    up = shared_server.remote(ws, chunk_index=index)
    assert up.upload([BlobSource.from_bytes(v1)]).uploaded == (_sha(v1),)
    assert up.chunk_stats.manifests_put == 1 and index.chunks_of(_sha(v1))
    assert up.upload([BlobSource.from_bytes(v2)]).uploaded == (_sha(v2),)
    assert 1 <= up.chunk_stats.chunks_sent - len(index.chunks_of(_sha(v1))) <= 2
    down = shared_server.remote(ws, chunk_index=index)
    assert down.get(_sha(v2)) == v2
    assert down.chunk_stats.chunks_fetched <= 2 and down.chunk_stats.chunks_reused >= 5
    raw = store.path(_sha(v1))
    stored = raw.read_bytes()  # random bytes: stored raw after a 5-byte header
    raw.write_bytes(stored[:105] + b"x" * 100 + stored[205:])  # the old version rots on disk
    again = shared_server.remote(ws, chunk_index=index)
    assert again.get(_sha(v2)) == v2
    assert again.chunk_stats.chunks_fetched == down.chunk_stats.chunks_fetched + 1  # the rotten one too
    assert not store.has(_sha(v1))  # set aside by the store: its sidecar goes when next read
    assert index.chunks_of(_sha(v1)) is None and not (index.dir / _sha(v1)).exists()


# ---------------------------------------------------------------- the server's checks


def _put_chunks(api: Api, n: int = 3, size: int = 600_000, seed: int = 4) -> tuple[bytes, list[list]]:
    parts = [_random(size, seed + i) for i in range(n)]
    for part in parts:
        api.put_blob(part)
    return b"".join(parts), [[_sha(x), len(x)] for x in parts]


def _put_manifest(api: Api, digest: str, body: dict):
    return api.call("PUT", f"/v1/ws/{{ws}}/manifests/{digest}", json=body)


def test_the_server_refuses_bad_manifests_and_stores_nothing(api):
    whole, chunks = _put_chunks(api)
    digest, size = _sha(whole), len(whole)
    ghost = _sha(b"never uploaded")
    bad = [
        (409, "blob_not_found", {"size": size, "chunks": [*chunks[:2], [ghost, 600_000]]}),
        (400, "hash_mismatch", {"size": size, "chunks": [chunks[1], chunks[0], chunks[2]]}),
        (400, "bad_request", {"size": size, "chunks": [*chunks[:2], [chunks[2][0], 2 * MB]]}),
        (400, "bad_request", {"size": size + 1, "chunks": chunks}),
        (400, "bad_request", {"size": size, "chunks": [*chunks[:2], [chunks[2][0], 599_999], [chunks[0][0], 1]]}),
        (400, "bad_request", {"size": 600_000, "chunks": chunks[:1]}),  # not over SMALL_BLOB
        (400, "bad_request", {"size": size, "chunks": "nope"}),
    ]
    for status, code, body in bad:
        r = _put_manifest(api, digest, body)
        assert (r.status_code, r.json()["error"]) == (status, code), (body, r.text)
        assert api.call("GET", f"/v1/ws/{{ws}}/blobs/{digest}").status_code == 404
    assert _put_manifest(api, digest, bad[0][2]).json()["missing"] == [ghost]
    r = _put_manifest(api, digest, {"size": size, "chunks": chunks})
    assert r.status_code == 201 and r.json()["stored"] is True
    assert _put_manifest(api, digest, {"size": size, "chunks": chunks}).json()["stored"] is False
    got = api.call("GET", f"/v1/ws/{{ws}}/manifests/{digest}").json()
    assert got == {"hash": digest, "size": size, "chunks": chunks}
    r = api.call("GET", f"/v1/ws/{{ws}}/blobs/{digest}")
    assert r.status_code == 200 and r.content == whole
    assert api.call("POST", "/v1/ws/{ws}/blobs/missing", json={"hashes": [digest]}).json() == {"missing": []}
    r = api.call("GET", f"/v1/ws/{{ws}}/manifests/{chunks[0][0]}")
    assert (r.status_code, r.json()["error"]) == (404, "not_a_manifest")
    r = api.call("GET", f"/v1/ws/{{ws}}/manifests/{ghost}")
    assert (r.status_code, r.json()["error"]) == (404, "blob_not_found")


def test_a_blob_stored_whole_is_fetched_whole(shared_server, proxy):
    """Stored whole (a PUT of the whole blob): unpack does not list it in manifests, one whole GET."""
    ws = f"chunks{next(_ws)}"
    token = shared_server.token(ws)
    data = _random(5 * MB, 5)
    Api(shared_server.url, ws, token).put_blob(data)
    remote = chunked.r.HttpRemote(proxy.url, ws, token, backoff=0.01)
    try:
        assert remote.get(_sha(data)) == data
    finally:
        remote.close()
    assert proxy.calls("GET", "/manifests/") == 0 and proxy.calls("GET", "/blobs/") == 1


def test_a_server_without_manifests_gets_the_whole_blob(shared_server, proxy):
    """PUT manifests answered 404 as by an older server: the blob goes up whole, once."""
    ws = f"chunks{next(_ws)}"
    data = _random(5 * MB, 6)

    def old_server(method, path, status, headers, body):
        if "/manifests/" in path:
            return 404, {"Content-Type": "application/json"}, b'{"error":"not_found","message":"Not Found"}'
        return None

    proxy.rewrites.append(old_server)
    remote = chunked.r.HttpRemote(proxy.url, ws, shared_server.token(ws), backoff=0.01)
    try:
        assert remote.upload([BlobSource.from_bytes(data)]).uploaded == (_sha(data),)
        assert remote.get(_sha(data)) == data
    finally:
        remote.close()
    assert proxy.calls("PUT", "/blobs/") == 1


@pytest.mark.parametrize("fault", ["sizes", "order", "other_hash"])
def test_a_bad_manifest_from_the_server_is_refused(shared_server, proxy, fault):
    """Sizes that do not add up, or chunks that do not hash to the whole: nothing is handed over."""
    ws = f"chunks{next(_ws)}"
    data = _random(5 * MB, 7)
    remote = chunked.r.HttpRemote(proxy.url, ws, shared_server.token(ws), backoff=0.01, retries=0)

    def lie(method, path, status, headers, body):
        if method != "GET" or "/manifests/" not in path or status != 200:
            return None
        info = json.loads(gzip.decompress(body) if headers.get("Content-Encoding") == "gzip" else body)
        if fault == "sizes":
            info["size"] += 1
        elif fault == "order":
            info["chunks"].reverse()
        else:
            info["hash"] = _sha(b"another")
        out = {k: v for k, v in headers.items() if k.lower() not in ("content-encoding", "content-length")}
        return 200, out, json.dumps(info).encode()

    try:
        assert remote.upload([BlobSource.from_bytes(data)]).uploaded == (_sha(data),)
        proxy.rewrites.append(lie)
        if fault == "order":
            [blob] = list(remote.fetch([_sha(data)]))
            assert blob.status == "corrupt" and "does not match" in blob.message
        else:
            with pytest.raises(BadServerAnswer):
                list(remote.fetch([_sha(data)]))
    finally:
        remote.close()


def test_a_file_that_changed_since_it_was_hashed_is_not_sent(shared_server, tmp_path):
    """The cut re-hashes the file: bytes other than the hashed ones fail that blob, nothing is stored."""
    ws = f"chunks{next(_ws)}"
    path = tmp_path / "big.bin"
    path.write_bytes(_random(5 * MB, 8))
    hashed = _sha(_random(5 * MB, 9))  # what the scan saw, before the file changed
    remote = shared_server.remote(ws)
    report = remote.upload([BlobSource.from_path(path, hashed)])
    assert [(f.hash, f.reason) for f in report.failed] == [(hashed, "content changed since it was hashed")]
    assert remote.chunk_stats.chunks_sent == 0 and remote.missing([hashed]) == [hashed]
