"""The HTTP surface of the sync server, exercised raw against a real server."""

from __future__ import annotations

import gzip
import json
import os
import secrets
import socket
import zlib

import pytest

from syncengine import protocol as p
from syncengine.server.app import ServerSettings
from syncengine.server.guard import Limits
from tests.fixtures_server import RunningServer, StorageSpec
from tests.server.conftest import PROTO, item, sha

X = b"x"
HX = sha(X)


def _pack(*blobs: bytes) -> bytes:
    header = p.PackHeader(tuple(p.PackEntry(sha(b), len(b)) for b in blobs))
    return header.encode() + b"".join(blobs)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One server for this module: tests stay apart by using their own workspaces."""
    srv = RunningServer(StorageSpec("sqlite", data_dir=tmp_path_factory.mktemp("shared"))).start()
    yield srv
    srv.stop()


@pytest.fixture
def alpha() -> str:
    return f"alpha-{secrets.token_hex(4)}"


@pytest.fixture
def beta() -> str:
    return f"beta-{secrets.token_hex(4)}"


ENDPOINTS = [
    ("GET", "/v1/ws/{ws}/changes", {}),
    ("GET", "/v1/ws/{ws}/docs", {}),
    ("POST", "/v1/ws/{ws}/blobs/missing", {"json": {"hashes": [HX]}}),
    ("PUT", f"/v1/ws/{{ws}}/blobs/{HX}", {"data": X}),
    ("GET", f"/v1/ws/{{ws}}/blobs/{HX}", {}),
    ("POST", "/v1/ws/{ws}/blobs/pack", {"data": _pack(b"packed")}),
    ("POST", "/v1/ws/{ws}/blobs/unpack", {"json": {"hashes": [HX]}}),
    (
        "POST",
        "/v1/ws/{ws}/commit",
        {"json": {"client_id": "c1", "items": [p.to_dict(item("d1", "a.txt", None, HX))]}},
    ),
]


def test_health_needs_no_token_and_names_the_protocol(server, api_for, alpha):
    """GET /v1/health answers without a token or header, with protocol, server_id and time."""
    api = api_for(server, alpha, token=None)
    r = api.session.get(server.url + "/v1/health", timeout=10)
    assert r.status_code == 200
    body = r.json()
    assert body["protocol"] == p.PROTOCOL_VERSION and body["supported"] == [1]
    assert body["server_id"] == server.storage.server_id and body["time"] > 0


@pytest.mark.parametrize("version", [None, "2", "one", ""])
def test_a_missing_or_unknown_protocol_version_is_a_clear_400(server, api_for, version, alpha):
    """Without X-Syncengine-Protocol: 1 the answer is 400 protocol_mismatch naming version 1."""
    api = api_for(server, alpha)
    headers = {"Authorization": f"Bearer {api.token}"}
    if version is not None:
        headers[p.PROTOCOL_HEADER] = version
    for path in (f"/v1/ws/{alpha}/changes", "/v1/health" if version is not None else None):
        if path is None:
            continue
        r = api.session.get(server.url + path, headers=headers, timeout=10)
        assert r.status_code == 400
        assert r.json()["error"] == "protocol_mismatch" and r.json()["supported"] == [1]


@pytest.mark.parametrize("key", ["token", "access_token", "Authorization"])
def test_a_token_in_the_query_string_is_refused(server, api_for, key, alpha):
    """Credentials in the URL get 400 token_in_query, even with a good header token."""
    api = api_for(server, alpha)
    r = api.call("GET", "/v1/ws/{ws}/changes", params={key: api.token})
    assert r.status_code == 400 and r.json()["error"] == "token_in_query"


@pytest.mark.parametrize("method,path,kw", ENDPOINTS, ids=[f"{m} {p_}" for m, p_, _ in ENDPOINTS])
@pytest.mark.parametrize("case", ["missing", "malformed", "wrong", "revoked", "other-workspace"])
def test_every_endpoint_refuses_bad_tokens_without_side_effects(
    server, api_for, method, path, kw, case, alpha, beta
):
    """Missing/malformed/wrong/revoked tokens get 401, a foreign token 404; nothing changes."""
    owner = api_for(server, alpha)
    beta_token = server.token(beta)
    revoked = server.token(alpha)
    server.storage.revoke_token(server.storage.list_tokens(alpha)[-1].id)
    headers = {
        "missing": {},
        "malformed": {"Authorization": "Basic YWxhZGRpbjpvcGVuc2VzYW1l"},
        "wrong": {"Authorization": "Bearer " + "A" * 43},
        "revoked": {"Authorization": f"Bearer {revoked}"},
        "other-workspace": {"Authorization": f"Bearer {beta_token}"},
    }[case]
    url = server.url + path.replace("{ws}", alpha)
    r = owner.session.request(method, url, headers={**PROTO, **headers}, timeout=10, **kw)
    expected = 404 if case == "other-workspace" else 401
    assert r.status_code == expected, r.text
    assert r.json()["error"] == ("not_found" if expected == 404 else "unauthorized")
    assert owner.changes()["last_seq"] == 0
    missing = owner.call("POST", "/v1/ws/{ws}/blobs/missing", json={"hashes": [HX, sha(b"packed")]})
    assert missing.json()["missing"] == [HX, sha(b"packed")]


def test_a_workspace_that_does_not_exist_looks_like_a_foreign_one(server, api_for, alpha, beta):
    """A token for alpha on an unknown workspace gets the same 404 as on an existing foreign one."""
    api = api_for(server, alpha)
    server.token(beta)
    for ws in (beta, "nosuch"):
        r = api.session.get(f"{server.url}/v1/ws/{ws}/changes", headers=api.headers(), timeout=10)
        assert r.status_code == 404 and r.json() == {
            "error": "not_found",
            "message": "no such workspace",
        }


def test_changes_and_docs_page_through_the_log(server, api_for, alpha):
    """changes pages by seq (`more`), docs by doc_id (`next`); both agree on last_seq."""
    api = api_for(server, alpha)
    digests = [api.put_blob(f"v{i}".encode()) for i in range(5)]
    results = api.commit([item(f"d{i}", f"f{i}.txt", None, digests[i]) for i in range(5)])
    assert [r["seq"] for r in results] == [1, 2, 3, 4, 5]
    page = api.changes(since=1, limit=2)
    assert [c["seq"] for c in page["changes"]] == [2, 3] and page["more"] is True
    assert (
        page["last_seq"] == 5
        and page["min_seq"] == 1
        and page["server_id"] == server.storage.server_id
    )
    last = api.changes(since=3, limit=10)
    assert [c["seq"] for c in last["changes"]] == [4, 5] and last["more"] is False
    seen, after = [], None
    while True:
        params = {"limit": 2, **({"after": after} if after else {})}
        r = api.call("GET", "/v1/ws/{ws}/docs", params=params).json()
        assert r["last_seq"] == 5
        seen += [d["doc_id"] for d in r["docs"]]
        after = r["next"]
        if after is None:
            break
    assert seen == [f"d{i}" for i in range(5)]
    for bad in ({"limit": 0}, {"limit": 1001}, {"since": -1}, {"since": "x"}):
        r = api.call("GET", "/v1/ws/{ws}/changes", params=bad)
        assert r.status_code == 400 and r.json()["error"] == "bad_request"


def test_missing_names_only_absent_hashes_and_caps_the_list(server, api_for, alpha):
    """blobs/missing answers the absent hashes in order; over 1000 hashes or a bad hash is 400."""
    api = api_for(server, alpha)
    have = api.put_blob(b"have")
    r = api.call("POST", "/v1/ws/{ws}/blobs/missing", json={"hashes": [HX, have, HX]})
    assert r.json() == {"missing": [HX]}
    too_many = [sha(str(i).encode()) for i in range(1001)]
    assert (
        api.call("POST", "/v1/ws/{ws}/blobs/missing", json={"hashes": too_many}).status_code == 400
    )
    assert (
        api.call("POST", "/v1/ws/{ws}/blobs/missing", json={"hashes": ["ABC"]}).status_code == 400
    )


def test_a_5mb_blob_streams_both_ways_and_stays_in_its_workspace(server, api_for, alpha, beta):
    """PUT then GET of a 5 MB blob returns the same bytes; another workspace cannot read it."""
    api = api_for(server, alpha)
    data = os.urandom(3 << 20) + b"\0" * (2 << 20)
    digest = api.put_blob(data)
    r = api.call("GET", f"/v1/ws/{{ws}}/blobs/{digest}", stream=True)
    got = b"".join(r.iter_content(1 << 16))
    assert r.status_code == 200 and sha(got) == digest
    again = api.call("PUT", f"/v1/ws/{{ws}}/blobs/{digest}", data=data)
    assert again.status_code == 201 and again.json()["stored"] is False
    other = api_for(server, beta)
    r = other.call("GET", f"/v1/ws/{{ws}}/blobs/{digest}")
    assert r.status_code == 404 and r.json()["error"] == "blob_not_found"


def test_an_upload_that_does_not_match_its_name_stores_nothing(server, api_for, alpha):
    """PUT with bytes hashing to another name is 400 hash_mismatch and the blob stays missing."""
    api = api_for(server, alpha)
    r = api.call("PUT", f"/v1/ws/{{ws}}/blobs/{HX}", data=b"not x" * 1000)
    assert r.status_code == 400 and r.json()["error"] == "hash_mismatch"
    assert api.call("POST", "/v1/ws/{ws}/blobs/missing", json={"hashes": [HX]}).json()[
        "missing"
    ] == [HX]
    assert api.call("PUT", "/v1/ws/{ws}/blobs/nothex", data=b"x").status_code == 400


def test_pack_and_unpack_round_trip_many_blobs(server, api_for, alpha):
    """A pack stores every blob; unpack returns them with missing and large ones listed apart."""
    api = api_for(server, alpha)
    blobs = [f"small blob {i}".encode() * (i + 1) for i in range(40)] + [b""]
    r = api.call(
        "POST",
        "/v1/ws/{ws}/blobs/pack",
        data=_pack(*blobs),
        headers={"Content-Type": p.PACK_MEDIA_TYPE},
    )
    assert r.status_code == 200 and set(r.json()["stored"]) == {sha(b) for b in blobs}
    large = api.put_blob(os.urandom(p.SMALL_BLOB + 1))
    asked = [sha(b) for b in blobs] + [HX, large]
    r = api.call("POST", "/v1/ws/{ws}/blobs/unpack", json={"hashes": asked})
    assert r.status_code == 200 and r.headers["Content-Type"].startswith(p.PACK_MEDIA_TYPE)
    line, _, rest = r.content.partition(b"\n")
    header = p.PackHeader.decode(line)
    assert header.missing == (HX,) and header.large == (large,) and header.deferred == ()
    offset = 0
    for entry in header.blobs:
        assert sha(rest[offset : offset + entry.size]) == entry.hash
        offset += entry.size
    assert offset == len(rest) and len(header.blobs) == len(blobs)


def test_a_pack_with_one_bad_blob_stores_none_of_it(server, api_for, alpha):
    """One blob not matching its hash, or a short/long pack, refuses the whole pack."""
    api = api_for(server, alpha)
    good = b"good blob"
    bad_header = p.PackHeader((p.PackEntry(sha(good), len(good)), p.PackEntry(HX, 3))).encode()
    for body in (
        bad_header + good + b"abc",
        _pack(good)[:-1],
        _pack(good) + b"extra",
        b"not json\n",
    ):
        r = api.call("POST", "/v1/ws/{ws}/blobs/pack", data=body)
        assert r.status_code == 400, r.text
    r = api.call("POST", "/v1/ws/{ws}/blobs/missing", json={"hashes": [sha(good), HX]})
    assert r.json()["missing"] == [sha(good), HX]


def test_a_pack_of_deflated_blobs_is_stored_as_it_came_and_read_back_whole(server, api_for, alpha):
    """Blobs deflated one by one in a pack (the client's uploads) come back inflated, by unpack and by GET."""
    api = api_for(server, alpha)
    blobs = [f"deflated blob {i} ".encode() * 50 for i in range(20)]
    plain = b"kept as it is"
    entries = [p.PackEntry(sha(b), len(b), len(zlib.compress(b))) for b in blobs]
    header = p.PackHeader((*entries, p.PackEntry(sha(plain), len(plain))))
    body = header.encode() + b"".join(zlib.compress(b) for b in blobs) + plain
    r = api.call("POST", "/v1/ws/{ws}/blobs/pack", data=body, headers={"Content-Type": p.PACK_MEDIA_TYPE})
    assert r.status_code == 200, r.text
    r = api.call("POST", "/v1/ws/{ws}/blobs/unpack", json={"hashes": [sha(b) for b in [*blobs, plain]]})
    line, _, rest = r.content.partition(b"\n")
    got = {}
    for entry in p.PackHeader.decode(line).blobs:
        assert entry.deflated is None  # downloads carry blobs as they are
        got[entry.hash], rest = rest[:entry.size], rest[entry.size:]
    assert got == {sha(b): b for b in [*blobs, plain]}
    assert api.call("GET", f"/v1/ws/{{ws}}/blobs/{sha(blobs[3])}").content == blobs[3]


def test_a_deflated_blob_that_does_not_inflate_to_itself_refuses_the_pack(server, api_for, alpha):
    """Bad zlib, a stream inflating past its size or short of it, trailing bytes, the wrong blob: 400, none stored."""
    api = api_for(server, alpha)
    good = b"good blob " * 20
    blob = b"the blob " * 30
    bomb = zlib.compress(b"\0" * (1 << 20))  # ~1 KB inflating to 1 MiB, announced as len(blob) bytes
    blob *= 10
    cases = [
        (zlib.compress(blob)[:-3] + b"xyz", len(blob)),  # damaged stream
        (bomb, len(blob)),  # inflates past its size: stopped at the size
        (zlib.compress(blob[:-1]), len(blob)),  # inflates short of its size
        (zlib.compress(blob) + b"!", len(blob)),  # trailing bytes after the stream
        (zlib.compress(blob[::-1]), len(blob)),  # a whole stream of other bytes
    ]
    for data, size in cases:
        header = p.PackHeader((p.PackEntry(sha(good), len(good)), p.PackEntry(sha(blob), size, len(data))))
        r = api.call("POST", "/v1/ws/{ws}/blobs/pack", data=header.encode() + good + data)
        assert r.status_code == 400 and r.json()["error"] == "hash_mismatch", r.text
    for entry in ([sha(blob), 10, 10], [sha(blob), 10, 0], [sha(blob), 10, True], [sha(blob), 10, 5, 1]):
        r = api.call("POST", "/v1/ws/{ws}/blobs/pack", data=json.dumps({"blobs": [entry]}).encode() + b"\n")
        assert r.status_code == 400 and r.json()["error"] == "bad_request", (entry, r.text)
    r = api.call("POST", "/v1/ws/{ws}/blobs/missing", json={"hashes": [sha(good), sha(blob)]})
    assert r.json()["missing"] == [sha(good), sha(blob)]


def test_bodies_are_gzipped_both_ways(server, api_for, alpha):
    """A gzip request body is accepted, and a large answer comes back gzipped when asked for."""
    api = api_for(server, alpha)
    digests = [api.put_blob(f"blob {i}".encode()) for i in range(30)]
    body = json.dumps(
        {
            "client_id": "c1",
            "items": [
                p.to_dict(item(f"d{i}", f"dir/file-{i}.txt", None, d))
                for i, d in enumerate(digests)
            ],
        }
    ).encode()
    assert len(body) > p.GZIP_MIN_BYTES
    r = api.call(
        "POST",
        "/v1/ws/{ws}/commit",
        data=gzip.compress(body),
        headers={"Content-Encoding": "gzip", "Content-Type": "application/json"},
    )
    assert r.status_code == 200 and all(x["status"] == "ok" for x in r.json()["results"])
    r = api.call("GET", "/v1/ws/{ws}/changes", headers={"Accept-Encoding": "gzip"}, stream=True)
    assert r.headers.get("Content-Encoding") == "gzip"
    raw = r.raw.read(decode_content=False)
    assert len(json.loads(gzip.decompress(raw))["changes"]) == 30
    r = api.call(
        "GET", "/v1/ws/{ws}/changes", params={"limit": 1}, headers={"Accept-Encoding": "gzip"}
    )
    assert "Content-Encoding" not in r.headers  # small answers are sent as they are
    r = api.call(
        "POST", "/v1/ws/{ws}/commit", data=b"\x1f\x8bnot gzip", headers={"Content-Encoding": "gzip"}
    )
    assert r.status_code == 400
    r = api.call("POST", "/v1/ws/{ws}/commit", data=body, headers={"Content-Encoding": "br"})
    assert r.status_code == 415 and r.json()["error"] == "unsupported_encoding"


def test_oversized_bodies_and_zip_bombs_get_413(server_factory, api_for, alpha):
    """Over the cap (declared, streamed, or inflated from gzip) is 413 and applies nothing."""
    server = server_factory(
        settings=ServerSettings(limits=Limits(json=64 * 1024, pack=1 << 20, blob=1 << 20))
    )
    api = api_for(server, alpha)
    big = json.dumps({"client_id": "c1", "items": [], "pad": "x" * (100 * 1024)}).encode()
    r = api.call(
        "POST", "/v1/ws/{ws}/commit", data=big, headers={"Content-Type": "application/json"}
    )
    assert r.status_code == 413 and r.json()["error"] == "too_large"
    r = api.call("POST", "/v1/ws/{ws}/commit", data=iter([big[:50_000], big[50_000:]]))  # chunked
    assert r.status_code == 413
    bomb = gzip.compress(b" " * (200 << 20), compresslevel=9)
    assert len(bomb) < 300_000
    r = api.call("POST", "/v1/ws/{ws}/commit", data=bomb, headers={"Content-Encoding": "gzip"})
    assert r.status_code == 413 and r.json()["error"] == "too_large"
    blob = os.urandom((1 << 20) + 10)
    r = api.call("PUT", f"/v1/ws/{{ws}}/blobs/{sha(blob)}", data=blob)
    assert r.status_code == 413
    assert api.changes()["last_seq"] == 0
    # a raw socket: the server answers 413 from the declared length, without reading the body
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(
            f"POST /v1/ws/{alpha}/commit HTTP/1.1\r\nHost: x\r\n{p.PROTOCOL_HEADER}: 1\r\n"
            f"Authorization: Bearer {api.token}\r\nContent-Length: 10000000000\r\n\r\n".encode()
        )
        assert sock.recv(200).startswith(b"HTTP/1.1 413")


@pytest.mark.parametrize(
    "body",
    [
        b"{not json",
        b'{"client_id": "c1", "items": [], "items": []}',
        b'{"client_id": "c1", "items": [NaN]}',
        b'{"client_id": 5, "items": []}',
        b'{"client_id": "c1", "items": {}}',
        b'{"client_id": "c1"}',
        b"[" * 100_000,
        json.dumps(
            {
                "client_id": "c1",
                "items": [
                    {
                        "doc_id": "d",
                        "path": "a",
                        "base_rev": "1",
                        "hash": HX,
                        "executable": False,
                        "op_id": HX,
                    }
                ],
            }
        ).encode(),
        json.dumps(
            {
                "client_id": "c1",
                "items": [p.to_dict(item(f"d{i}", f"f{i}", None, HX)) for i in range(101)],
            }
        ).encode(),
    ],
    ids=[
        "syntax",
        "duplicate-key",
        "nan",
        "type",
        "items-object",
        "no-items",
        "deep",
        "rev-string",
        "over-100",
    ],
)
def test_malformed_commits_are_400_json_never_500(server, api_for, body, alpha):
    """Malformed JSON, duplicate keys, NaN, wrong types, over-long batches: 400 bad_request."""
    api = api_for(server, alpha)
    r = api.call(
        "POST", "/v1/ws/{ws}/commit", data=body, headers={"Content-Type": "application/json"}
    )
    assert r.status_code == 400 and r.json()["error"] == "bad_request", r.text


@pytest.mark.parametrize(
    "path",
    [
        "/etc/passwd",
        "../escape",
        "a/../../b",
        "a//b",
        "./a",
        "e\u0301.txt",
        "a\x00b",
        "a\\b",
        "x" * 256,
        "/".join(["d" * 200] * 25),
        ".syncengine/journal.db",
        "C:/x",
        "",
    ],
    ids=[
        "absolute",
        "dotdot",
        "nested-dotdot",
        "empty-part",
        "dot",
        "nfd",
        "nul",
        "backslash",
        "long-name",
        "long-path",
        "state-dir",
        "drive",
        "empty",
    ],
)
def test_unsafe_paths_are_refused_whole_and_nothing_is_applied(server, api_for, path, alpha):
    """An unsafe path makes the whole commit 400 unsafe_path; its good items are not applied."""
    api = api_for(server, alpha)
    good = item("ok-doc", "fine.txt", None, api.put_blob(b"fine"))
    bad = item("bad-doc", path, None, HX)
    r = api.call(
        "POST",
        "/v1/ws/{ws}/commit",
        json={"client_id": "c1", "items": [p.to_dict(good), p.to_dict(bad)]},
    )
    assert r.status_code == 400 and r.json()["error"] == "unsafe_path", r.text
    assert api.changes()["last_seq"] == 0


def test_the_openapi_document_describes_every_route(server, api_for, alpha):
    """/openapi.json lists the /v1 routes with request and answer schemas from protocol.py."""
    api = api_for(server, alpha, token=None)
    doc = api.session.get(server.url + "/openapi.json", timeout=10).json()
    paths = doc["paths"]
    for route in (
        "/v1/health",
        "/v1/ws/{ws}/changes",
        "/v1/ws/{ws}/docs",
        "/v1/ws/{ws}/blobs/missing",
        "/v1/ws/{ws}/blobs/{sha256}",
        "/v1/ws/{ws}/blobs/pack",
        "/v1/ws/{ws}/blobs/unpack",
        "/v1/ws/{ws}/commit",
        "/v1/ws/{ws}/manifests/{sha256}",
    ):
        assert route in paths
    schemas = doc["components"]["schemas"]
    assert {
        "CommitRequest",
        "CommitItem",
        "CommitResponse",
        "ChangesPage",
        "Change",
        "ErrorBody",
    } <= set(schemas)
    assert "rejected" not in schemas["ChangesPage"]["properties"]
    # GET manifests answers with the hash asked beside the PUT body's fields.
    manifest = paths["/v1/ws/{ws}/manifests/{sha256}"]
    put_ref = manifest["put"]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    get_ref = manifest["get"]["responses"]["200"]["content"]["application/json"]["schema"]["$ref"]
    assert put_ref.endswith("/Manifest") and get_ref.endswith("/ManifestAnswer")
    assert "hash" not in schemas["Manifest"]["properties"]
    assert {"hash", "size", "chunks"} <= set(schemas["ManifestAnswer"]["properties"])
    assert "hash" in schemas["ManifestAnswer"]["required"]


def test_unknown_routes_and_methods_answer_json(server, api_for, alpha):
    """An unknown route is a JSON 404 and a wrong method a JSON 405, never HTML."""
    api = api_for(server, alpha)
    r = api.call("GET", "/v1/ws/{ws}/nothing")
    assert r.status_code == 404 and r.json()["error"] == "not_found"
    r = api.call("DELETE", "/v1/ws/{ws}/commit")
    assert r.status_code == 405 and r.json()["error"] == "method_not_allowed"


def test_a_commit_is_one_trip_to_a_worker_thread(server, api_for, alpha, monkeypatch):
    """Token check, body checks, transaction and answer's JSON on one worker thread.

    Each trip, and each stretch of CPU work on the event loop, waited for the
    GIL behind the packs' threads in a first sync: ~8 ms per commit around its
    ~5 ms transaction.
    """
    import syncengine.server.app as app_module

    api = api_for(server, alpha)
    digest = api.put_blob(b"one trip")
    real = app_module.run_in_threadpool
    trips: list[str] = []

    async def counted(fn, *args, **kwargs):
        trips.append(fn.__name__)
        return await real(fn, *args, **kwargs)

    monkeypatch.setattr(app_module, "run_in_threadpool", counted)
    assert api.commit([item("d1", "a.txt", None, digest)])[0]["status"] == "ok"
    assert trips == ["commit_request"]
    # Refusals still come from that thread, in the same order: the token first, then the body.
    bad = api.call("POST", "/v1/ws/{ws}/commit", data=b"{not json", headers={"Authorization": "Bearer " + "A" * 43})
    assert bad.status_code == 401 and bad.json()["error"] == "unauthorized"
    bad = api.call("POST", "/v1/ws/{ws}/commit", data=b"{not json")
    assert bad.status_code == 400 and bad.json()["error"] == "bad_request"
    assert api.changes()["last_seq"] == 1
