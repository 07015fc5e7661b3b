"""Security (RELIABILITY F1-F3, E3-E5): workspace isolation on every route, hostile server answers.

Isolation is checked against the app's own route table, so an endpoint
added later is covered without anyone remembering to list it here. Hostile
answers are planted in the real server's database (as a compromised server
would send them) or rewritten by a proxy, and a real sync round must refuse
them without writing anything outside the workspace, through a symlink, or
with the wrong bytes. TLS and secret leaks live in test_security_tls.py and
test_security_secrets.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest
import requests
from starlette.routing import WebSocketRoute

from syncengine import protocol as p
from syncengine.testing import read_tree
from tests.replicas import Replicas
from tests.server.conftest import PROTO, FaultProxy

pytestmark = pytest.mark.integration


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def replicas(server, tmp_path):
    made = Replicas(server, tmp_path)
    yield made
    made.close()


@pytest.fixture
def fault_proxy():
    made: list[FaultProxy] = []

    def make(upstream: str) -> FaultProxy:
        made.append(FaultProxy(upstream).start())
        return made[-1]

    yield make
    for proxy in made:
        proxy.stop()


# ---------------------------------------------------------------- isolation


def _db_dump(server) -> dict[str, list[tuple]]:
    """Every row of every table of the server's database (SQLite), to prove "no side effect"."""
    path = server.spec.data_dir / "server.db"
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        tables = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table' ORDER BY name")]
        return {t: sorted(con.execute(f'SELECT * FROM "{t}"').fetchall(), key=repr) for t in tables}
    finally:
        con.close()


def _seed(server, ws: str, token: str, name: str) -> dict[str, Any]:
    """One blob and one committed document in ``ws``; returns what a thief would look for."""
    session = requests.Session()
    headers = {**PROTO, "Authorization": f"Bearer {token}"}
    data = f"secret of {name} {os.urandom(8).hex()}".encode()
    digest = sha(data)
    base = f"{server.url}/v1/ws/{ws}"
    assert session.put(f"{base}/blobs/{digest}", data=data, headers=headers, timeout=10).status_code == 201
    doc_id = f"doc-{name}"
    item = p.CommitItem.make("client-" + name, doc_id, f"{name}-secret.txt", None, digest)
    r = session.post(f"{base}/commit", json={"client_id": "client-" + name, "items": [p.to_dict(item)]},
                     headers=headers, timeout=10)
    assert r.json()["results"][0]["status"] == "ok"
    session.close()
    return {"ws": ws, "token": token, "hash": digest, "doc_id": doc_id, "path": f"{name}-secret.txt"}


def _workspace_routes(app) -> list[tuple[str, str]]:
    out = []
    for route in app.routes:
        path = getattr(route, "path", "")
        if isinstance(route, WebSocketRoute) or type(route).__name__ == "APIWebSocketRoute":
            out.append(("WS", path))
        else:
            out.extend((m, path) for m in sorted(getattr(route, "methods", None) or ()) if m != "HEAD")
    return out


def _valid_request(method: str, path: str, victim: dict[str, Any]) -> dict[str, Any]:
    """A request that would change or reveal the victim's data if authorisation let it through."""
    fresh = b"planted by the attacker"
    item = p.CommitItem.make("thief", "planted", "planted.txt", None, victim["hash"])
    pack = p.PackHeader((p.PackEntry(sha(fresh), len(fresh)),)).encode() + fresh
    known = {
        ("GET", "/v1/ws/{ws}/changes"): {"params": {"since": 0}},
        ("GET", "/v1/ws/{ws}/docs"): {},
        ("POST", "/v1/ws/{ws}/blobs/missing"): {"json": {"hashes": [victim["hash"]]}},
        ("PUT", "/v1/ws/{ws}/blobs/{sha256}"): {"data": fresh, "sha256": sha(fresh)},
        ("GET", "/v1/ws/{ws}/blobs/{sha256}"): {},
        ("POST", "/v1/ws/{ws}/blobs/pack"): {"data": pack},
        ("POST", "/v1/ws/{ws}/blobs/unpack"): {"json": {"hashes": [victim["hash"]]}},
        ("POST", "/v1/ws/{ws}/commit"): {"json": {"client_id": "thief", "items": [p.to_dict(item)]}},
    }
    # A route this table does not know yet still gets a request: a JSON body naming the victim's data.
    return dict(known.get((method, path), {"json": {"hashes": [victim["hash"]], "doc_id": victim["doc_id"]}}))


def _fill(path: str, victim: dict[str, Any], extra: dict[str, Any]) -> str:
    out = path.replace("{ws}", victim["ws"]).replace("{sha256}", extra.pop("sha256", victim["hash"]))
    for name in ("doc_id", "id"):
        out = out.replace("{" + name + "}", victim["doc_id"])
    return out


def test_every_route_outside_a_workspace_is_public_on_purpose(server):
    """Only /v1/health and the OpenAPI document live outside /v1/ws/{ws}: nothing else escapes auth."""
    public = {("GET", "/v1/health"), ("GET", "/openapi.json")}
    outside = {(m, path) for m, path in _workspace_routes(server.app) if not path.startswith("/v1/ws/{ws}/")}
    assert outside == public


def test_a_token_never_reaches_another_workspace_on_any_route(server):
    """On every route of the app, a token for A aimed at B's workspace gets 404 and changes nothing."""
    victim = _seed(server, "victim", server.token("victim"), "victim")
    thief = _seed(server, "thief", server.token("thief"), "thief")
    routes = [r for r in _workspace_routes(server.app) if r[1].startswith("/v1/ws/{ws}/")]
    assert len(routes) >= 8  # the eight of docs/protocol.md, at least
    session = requests.Session()
    failures = []
    for method, path in routes:
        before = _db_dump(server)
        kw = _valid_request(method, path, victim)
        url = server.url + _fill(path, victim, kw)
        headers = {**PROTO, "Authorization": f"Bearer {thief['token']}"}
        if method == "WS":
            outcome = _try_subscribe(url, headers)
            if outcome is not None:
                failures.append(f"WS {path}: {outcome}")
        else:
            r = session.request(method, url, headers=headers, timeout=10, **kw)
            body = r.content
            if r.status_code != 404 or r.json().get("error") != "not_found":
                failures.append(f"{method} {path}: {r.status_code} {body[:200]!r}")
            if victim["hash"].encode() in body or victim["doc_id"].encode() in body:
                failures.append(f"{method} {path}: the answer names the victim's data")
        if _db_dump(server) != before:
            failures.append(f"{method} {path}: the server's database changed")
    session.close()
    assert not failures, "\n".join(failures)


def _try_subscribe(url: str, headers: dict[str, str]) -> str | None:
    """None when a WebSocket subscription to a foreign workspace is refused; else what went wrong."""
    from websockets.exceptions import ConnectionClosed, InvalidHandshake
    from websockets.sync.client import connect

    try:
        with connect(url.replace("http", "ws", 1), additional_headers=headers, open_timeout=5) as sock:
            try:
                message = sock.recv(timeout=5)
            except ConnectionClosed:
                return None
            except TimeoutError:
                return "the socket stayed open for a foreign workspace"
            return f"a foreign workspace's socket sent {str(message)[:100]!r}"
    except (InvalidHandshake, OSError):
        return None


def test_guessed_ids_inside_ones_own_workspace_reveal_nothing(server):
    """Naming B's blob hash or doc id from A's own workspace finds nothing and links nothing."""
    victim = _seed(server, "victim", server.token("victim"), "victim")
    thief = _seed(server, "thief", server.token("thief"), "thief")
    before_victim = [r for r in _db_dump(server)["change"] if victim["doc_id"] in r]
    s = requests.Session()
    s.headers.update({**PROTO, "Authorization": f"Bearer {thief['token']}"})
    base = f"{server.url}/v1/ws/thief"
    r = s.get(f"{base}/blobs/{victim['hash']}", timeout=10)
    assert r.status_code == 404 and r.json()["error"] == "blob_not_found"
    assert s.post(f"{base}/blobs/missing", json={"hashes": [victim["hash"]]}, timeout=10).json() == {
        "missing": [victim["hash"]]}
    header = p.PackHeader.decode(
        s.post(f"{base}/blobs/unpack", json={"hashes": [victim["hash"]]}, timeout=10).content.split(b"\n")[0])
    assert header.missing == (victim["hash"],) and header.blobs == ()
    items = [
        p.CommitItem.make("thief", victim["doc_id"], "stolen.txt", 1, victim["hash"]),  # the victim's doc, by id
        p.CommitItem.make("thief", "new-doc", "linked.txt", None, victim["hash"]),  # the victim's blob, by hash
    ]
    results = s.post(f"{base}/commit", json={"client_id": "thief", "items": [p.to_dict(i) for i in items]},
                     timeout=10).json()["results"]
    assert [(r["status"], r["error"]) for r in results] == [("rejected", "unknown_doc"), ("rejected", "missing_blob")]
    listing = s.get(f"{base}/changes", timeout=10).text + s.get(f"{base}/docs", timeout=10).text
    assert victim["doc_id"] not in listing and victim["hash"] not in listing and thief["doc_id"] in listing
    assert [r for r in _db_dump(server)["change"] if victim["doc_id"] in r] == before_victim
    s.close()


# ---------------------------------------------------------------- hostile answers


HOSTILE_PATHS = {
    "dotdot": "../escaped.txt",
    "nested-dotdot": "sub/../../escaped2.txt",
    "absolute": "/tmp/syncengine-escaped.txt",
    "nul": "nul\x00.txt",
    "nfd": "cafe\u0301.txt",
    "backslash": "..\\escaped3.txt",
    "state-dir": ".syncengine/config.toml",
    "dot": "./dot.txt",
    "empty": "",
    "drive": "C:/escaped4.txt",
    "control": "bell\x07.txt",
}


def _plant(server, ws: str, doc_id: str, path: str, digest: str | None, *, old_path: str | None = None) -> None:
    """Write a document state straight into the server's database, past its path checks."""
    m, storage = server.storage.m, server.storage
    with storage._write():
        wid = m.Workspace.get(m.Workspace.name == ws).id
        seq = m.Workspace.get_by_id(wid).last_seq + 1
        size = None if digest is None else m.Blob.get((m.Blob.workspace == wid) & (m.Blob.hash == digest)).size
        fields = {"path": path, "path_key": path.casefold(), "rev": seq, "hash": digest,
                  "deleted": digest is None, "executable": False, "size": size}
        doc = m.Document.get_or_none((m.Document.workspace == wid) & (m.Document.doc_id == doc_id))
        if doc is None:
            m.Document.insert(workspace=wid, doc_id=doc_id, **fields).execute()
        else:
            m.Document.update(**fields).where(m.Document.id == doc.id).execute()
        m.Change.insert(workspace=wid, seq=seq, doc_id=doc_id, path=path, old_path=old_path, hash=digest,
                        deleted=digest is None, executable=False, size=size, op_id=None, client_id="evil",
                        received_ns=time.time_ns()).execute()
        m.Workspace.update(last_seq=seq).where(m.Workspace.id == wid).execute()


def _outside_snapshot(tmp_path: Path, roots: list[Path]) -> set[str]:
    """Every path under tmp_path (outside the replicas' roots), plus /tmp's escape target."""
    seen = set()
    for dirpath, dirnames, filenames in os.walk(tmp_path):
        here = Path(dirpath)
        dirnames[:] = [d for d in dirnames if here / d not in roots and d != "server-1"]
        seen.update(str(here / f) for f in filenames)
    seen.add(str(os.path.lexists("/tmp/syncengine-escaped.txt")))
    return seen


def test_hostile_paths_from_the_server_are_refused_and_nothing_escapes(server, replicas, tmp_path):
    """Planted paths (.., absolute, NUL, NFD, state dir...) are refused; good items still arrive."""
    a = replicas.make("a", {"good.txt": "good\n", "victim.txt": "victim\n"})
    b_old = replicas.make("b_old")
    a.sync()
    b_old.sync()
    payload = b"pwned\n"
    with server.remote("shared", token=replicas.token) as remote:
        from syncengine.remote import BlobSource

        remote.upload([BlobSource.from_bytes(payload)])
        victim_id = next(d.doc_id for d in remote.docs().docs if d.path == "victim.txt")
    for i, path in enumerate(HOSTILE_PATHS.values()):
        _plant(server, "shared", f"evil-{i}", path, sha(payload))
    _plant(server, "shared", victim_id, "../moved-out.txt", sha(b"victim\n"), old_path="victim.txt")
    a.write("late.txt", "late\n")
    a.sync()
    roots = [r.root for r in replicas.made] + [tmp_path / "b_new"]
    outside = _outside_snapshot(tmp_path, roots)
    b_new = replicas.make("b_new")
    for replica in (b_old, b_new):
        report = replica.sync()
        tree = replica.tree()
        assert tree["good.txt"] == b"good\n" and tree["late.txt"] == b"late\n"
        assert payload not in tree.values(), "a hostile entry was written"
        refused = [pr for pr in report.problems if "refused from server" in pr.reason]
        assert len(refused) >= len(HOSTILE_PATHS), report.problems
        assert (replica.root / ".syncengine" / "config.toml").read_bytes() != payload
    assert b_old.tree()["victim.txt"] == b"victim\n"  # the hostile move was not followed
    assert _outside_snapshot(tmp_path, roots) == outside
    assert not (tmp_path / "escaped.txt").exists() and not (tmp_path / "moved-out.txt").exists()


def test_a_pulled_file_is_never_written_through_a_symlinked_folder(replicas, tmp_path):
    """A folder in B that is a symlink to outside stops the pulled file: nothing lands outside."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("not for the server\n")
    a = replicas.make("a", {"docs/evil.txt": "evil\n", "docs/deep/er.txt": "deeper\n", "link.txt": "from a\n",
                            "fine.txt": "fine\n"})
    b = replicas.make("b")
    os.symlink(outside, b.root / "docs")
    os.symlink(outside / "secret.txt", b.root / "link.txt")
    os.symlink(".", b.root / "loop")
    a.sync()
    report = b.sync()
    assert sorted(os.listdir(outside)) == ["secret.txt"]
    assert (outside / "secret.txt").read_text() == "not for the server\n"
    assert (b.root / "docs").is_symlink() and (b.root / "link.txt").is_symlink()
    assert b.tree() == {"fine.txt": b"fine\n"}
    assert {pr.path for pr in report.problems} >= {"docs/evil.txt", "docs/deep/er.txt", "link.txt"}
    with replicas.server.remote("shared", token=replicas.token) as remote:  # nothing outside was uploaded
        assert remote.missing([sha(b"not for the server\n")]) == [sha(b"not for the server\n")]
        assert sorted(d.path for d in remote.docs().docs) == ["docs/deep/er.txt", "docs/evil.txt", "fine.txt",
                                                               "link.txt"]
    os.unlink(b.root / "docs")
    os.unlink(b.root / "link.txt")
    b.sync()  # once the links are gone the files arrive
    assert b.tree() == a.tree()


def _corrupt_blobs(method: str, path: str, status: int, headers: dict[str, str], body: bytes):
    """Flip one byte of every blob the server sends (packs and streamed GETs alike)."""
    if status != 200:
        return None
    if path.endswith("/blobs/unpack"):
        line, _, rest = body.partition(b"\n")
        return status, headers, line + b"\n" + bytes(b ^ 1 for b in rest)
    if method == "GET" and "/blobs/" in path:
        return status, headers, bytes([body[0] ^ 1]) + body[1:]
    return None


def test_blobs_with_wrong_hashes_are_never_written(server, replicas, fault_proxy, monkeypatch):
    """Corrupted downloads (packed and streamed) write nothing: new files stay absent, old ones intact."""
    a = replicas.make("a", {"small.txt": "v1\n", "big.bin": os.urandom(p.SMALL_BLOB + 4096)})
    b = replicas.make("b")
    a.sync()
    b.sync()
    before = b.tree()
    a.write("small.txt", "v2\n")
    a.write("new.txt", "new\n")
    a.write("big.bin", os.urandom(p.SMALL_BLOB + 8192))
    a.sync()
    proxy = fault_proxy(server.url)
    proxy.rewrites.append(_corrupt_blobs)
    monkeypatch.setenv("SYNCENGINE_SERVER", proxy.url)
    report = b.sync()
    assert b.tree() == before
    assert {pr.path for pr in report.problems} >= {"small.txt", "new.txt", "big.bin"}
    proxy.rewrites.clear()
    b.sync()
    assert b.tree() == a.tree()


def test_a_server_that_lies_about_sizes_or_json_stops_the_round_cleanly(server, replicas, fault_proxy, monkeypatch):
    """A feed answer that is not JSON or breaks the schema stops the round with exit 3 and writes nothing."""
    from syncengine.errors import BadServerAnswer

    a = replicas.make("a", {"x.txt": "x\n"})
    b = replicas.make("b")
    a.sync()
    proxy = fault_proxy(server.url)
    bodies = [b"<html>", json.dumps({"server_id": "s", "min_seq": 1, "last_seq": -5, "changes": [],
                                     "more": False}).encode()]
    for body in bodies:
        proxy.rewrites[:] = [lambda m, path, s, h, _b, body=body: (200, {"Content-Type": "application/json"}, body)
                             if "/changes" in path or "/docs" in path else None]
        monkeypatch.setenv("SYNCENGINE_SERVER", proxy.url)
        with pytest.raises(BadServerAnswer) as info:
            b.sync()
        assert info.value.exit_code == 3
        assert read_tree(b.root) == {}
