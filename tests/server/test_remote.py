"""HttpRemote against the real server, with faults injected by an in-test proxy."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from syncengine import protocol as p
from syncengine.errors import (
    AuthError,
    BadServerAnswer,
    HashMismatch,
    ProtocolMismatch,
    RemoteError,
    ServerFailed,
    ServerUnreachable,
    UsageError,
)
from syncengine.remote import BlobSource, HttpRemote
from tests.server.conftest import sha

SENTINEL = "sentinel-token-6f1c0e"


def _blobs(n: int, size: int = 200) -> list[BlobSource]:
    return [BlobSource.from_bytes(f"{i:04d}".encode() * (size // 4)) for i in range(n)]


def _seed(remote: HttpRemote, n: int = 3) -> list[BlobSource]:
    blobs = _blobs(n)
    remote.upload(blobs)
    remote.commit(
        [
            p.CommitItem.make(remote.client_id, f"d{i}", f"docs/{i}.md", None, b.hash)
            for i, b in enumerate(blobs)
        ]
    )
    return blobs


def test_a_full_round_trip_through_the_client(server, tmp_path):
    """Upload small and large blobs, commit, read the feed and listing, download: all verified."""
    remote = server.remote("alpha", client_id="laptop")
    assert remote.health().protocol == p.PROTOCOL_VERSION
    small = _blobs(120)
    big_path = tmp_path / "big.bin"
    big_path.write_bytes(os.urandom(3 << 20))
    big = BlobSource.from_path(big_path, sha(big_path.read_bytes()))
    report = remote.upload([*small, big])
    assert len(report.uploaded) == 121 and not report.failed
    assert remote.upload(small[:5]).present == tuple(b.hash for b in small[:5])
    items = [
        p.CommitItem.make("laptop", f"d{i:03d}", f"f/{i}.txt", None, b.hash)
        for i, b in enumerate([*small, big])
    ]
    results = remote.commit(items)  # 121 items: two requests of at most 100
    assert [r.status for r in results] == ["ok"] * 121 and results[-1].seq == 121
    page = remote.changes(0, limit=1000)
    assert page.last_seq == 121 and not page.more and page.changes[0].client_id == "laptop"
    listing = remote.docs(limit=100)
    assert len(listing.docs) == 100 and listing.next == "d099"
    assert len(remote.docs(after=listing.next).docs) == 21
    out = tmp_path / "out"
    done = remote.download([big.hash, small[0].hash, "f" * 64], lambda h: out / h)
    assert set(done.done) == {big.hash, small[0].hash} and done.missing == ("f" * 64,)
    assert (out / big.hash).read_bytes() == big_path.read_bytes()
    assert [b.hash for b in remote.fetch(b.hash for b in small) if b.ok] == [b.hash for b in small]


def test_conflicts_come_back_as_dataclasses(server):
    """A stale base rev returns CommitResult(conflict) with the occupant as CurrentDoc."""
    remote = server.remote("alpha")
    blobs = _seed(remote)
    stale = p.CommitItem.make(remote.client_id, "d9", "docs/0.md", None, blobs[1].hash)
    (result,) = remote.commit([stale])
    assert result.status == "conflict" and result.current.doc_id == "d0" and result.current.rev == 1


def test_connection_refused_is_retried_then_server_unreachable(server):
    """A stopped server: retries with backoff, then ServerUnreachable, never showing the token."""
    remote = server.remote("alpha", token=SENTINEL + "x" * 10, retries=3, backoff=0.05)
    server.stop()
    started = time.monotonic()
    with pytest.raises(ServerUnreachable) as caught:
        remote.changes(0)
    assert "4 attempts" in caught.value.message and time.monotonic() - started < 5
    assert SENTINEL not in str(caught.value) and SENTINEL not in repr(remote)


def test_the_environments_proxy_is_read_once_when_the_remote_is_made(server, monkeypatch):
    """HTTP_PROXY and NO_PROXY count as requests reads them, but once per remote: requests read them (walking
    os.environ) on every request, ~0.5 ms of Python each beside a push's other threads."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead = probe.getsockname()[1]  # nobody listens there once the socket is closed
    for name in ("http_proxy", "HTTP_PROXY", "no_proxy", "NO_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{dead}")
    through_proxy = server.remote("alpha", retries=0)
    with pytest.raises(ServerUnreachable):
        through_proxy.changes(0)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    direct = server.remote("alpha", retries=0)
    assert direct.changes(0).changes == ()
    monkeypatch.delenv("NO_PROXY")  # a remote already made keeps what it read
    assert direct.changes(0).changes == ()


def test_503_then_200_succeeds_and_honours_retry_after(server, fault_proxy):
    """Two 503s with Retry-After: 1 are each retried a second later; the third try works."""
    token = server.token("alpha")
    upstream = server.remote("alpha", token=token)
    _seed(upstream)
    proxy = fault_proxy(server.url)
    remote = HttpRemote(proxy.url, "alpha", token, retries=4, backoff=0.01)
    proxy.fail(2, 503, {"Retry-After": "1"})
    started = time.monotonic()
    assert remote.changes(0).last_seq == 3
    assert time.monotonic() - started >= 2 and len(proxy.seen) == 3
    remote.close()


@pytest.mark.parametrize("status", [500, 502, 429])
def test_persistent_server_failures_give_up_with_server_failed(server, fault_proxy, status):
    """5xx and 429 are retried `retries` times, then ServerFailed."""
    proxy = fault_proxy(server.url)
    remote = HttpRemote(proxy.url, "alpha", server.token("alpha"), retries=2, backoff=0.01)
    proxy.fail(10, status)
    with pytest.raises(ServerFailed):
        remote.missing(["a" * 64])
    assert len(proxy.seen) == 3
    remote.close()


@pytest.mark.parametrize(
    "status,error",
    [
        (400, RemoteError),
        (409, RemoteError),
        (401, AuthError),
        (403, AuthError),
        (413, RemoteError),
    ],
)
def test_other_4xx_are_never_retried(server, fault_proxy, status, error):
    """A 4xx other than 429 is raised at once, after exactly one request."""
    proxy = fault_proxy(server.url)
    remote = HttpRemote(proxy.url, "alpha", server.token("alpha"), retries=4, backoff=0.01)
    proxy.fail(1, status)
    with pytest.raises(error):
        remote.changes(0)
    assert len(proxy.seen) == 1
    remote.close()


def test_bad_revoked_and_foreign_tokens_raise_auth_error(server):
    """Unknown and revoked tokens, and a token for another workspace, raise AuthError."""
    with pytest.raises(AuthError):
        server.remote("alpha", token="A" * 43).changes(0)
    token = server.token("alpha")
    server.storage.revoke_token(server.storage.list_tokens("alpha")[-1].id)
    with pytest.raises(AuthError):
        server.remote("alpha", token=token).changes(0)
    with pytest.raises(AuthError, match="no workspace 'beta'"):
        server.remote("beta", token=server.token("alpha")).changes(0)


def test_a_protocol_mismatch_is_reported_as_such(server, fault_proxy):
    """Another version in health, or a 400 protocol_mismatch, raises ProtocolMismatch."""
    proxy = fault_proxy(server.url)
    remote = HttpRemote(proxy.url, "alpha", server.token("alpha"), backoff=0.01)

    def newer_health(method, path, status, headers, body):
        if path.startswith("/v1/health"):
            return (
                200,
                {"Content-Type": "application/json"},
                json.dumps(
                    {"protocol": 2, "supported": [2], "server_id": "abc", "time": 1}
                ).encode(),
            )
        return None

    proxy.rewrites.append(newer_health)
    with pytest.raises(ProtocolMismatch):
        remote.health()
    mismatch = {"error": "protocol_mismatch", "message": "no", "supported": [2]}
    proxy.rewrites.append(
        lambda m, path, s, h, b: (
            400,
            {"Content-Type": "application/json"},
            json.dumps(mismatch).encode(),
        )
    )
    with pytest.raises(ProtocolMismatch):
        remote.changes(0)
    remote.close()


def _flip_blob_bytes(method, path, status, headers, body):
    """Rewrite an unpack answer so the first blob's bytes no longer match its hash."""
    if not path.endswith("/blobs/unpack") or status != 200:
        return None
    line, _, rest = body.partition(b"\n")
    rest = bytes([rest[0] ^ 1]) + rest[1:]
    return status, headers, line + b"\n" + rest


def test_a_blob_that_does_not_match_its_hash_is_refused_and_not_written(
    server, fault_proxy, tmp_path
):
    """A corrupted download is reported (and get() raises HashMismatch); nothing reaches disk."""
    token = server.token("alpha")
    upstream = server.remote("alpha", token=token)
    blobs = _seed(upstream, 2)
    proxy = fault_proxy(server.url)
    proxy.rewrites.append(_flip_blob_bytes)
    remote = HttpRemote(proxy.url, "alpha", token, backoff=0.01)
    out = tmp_path / "out"
    out.mkdir()
    report = remote.download([blobs[0].hash], lambda h: out / h)
    assert report.done == () and report.failed[0].hash == blobs[0].hash
    assert list(out.iterdir()) == []
    with pytest.raises(HashMismatch):
        remote.get(blobs[0].hash)
    remote.close()


def test_a_large_blob_that_does_not_match_is_refused_too(server, fault_proxy, tmp_path):
    """A streamed GET whose bytes do not hash to the name is reported corrupt."""
    token = server.token("alpha")
    upstream = server.remote("alpha", token=token)
    data = os.urandom(p.SMALL_BLOB + 100)
    upstream.upload([BlobSource.from_bytes(data)])
    proxy = fault_proxy(server.url)

    def corrupt(method, path, status, headers, body):
        if method == "GET" and "/blobs/" in path and status == 200:
            return status, headers, b"\0" + body[1:]
        return None

    proxy.rewrites.append(corrupt)
    remote = HttpRemote(proxy.url, "alpha", token, backoff=0.01)
    (blob,) = list(remote.fetch([sha(data)]))
    assert blob.status == "corrupt"
    with pytest.raises(HashMismatch):
        blob.read()
    remote.close()


def test_an_unsafe_path_in_the_feed_is_dropped_and_reported(server, fault_proxy):
    """A change whose path escapes the workspace is dropped into `rejected`; others pass."""
    token = server.token("alpha")
    upstream = server.remote("alpha", token=token)
    _seed(upstream, 3)
    proxy = fault_proxy(server.url)

    def hostile(method, path, status, headers, body):
        if "/changes" in path and status == 200:
            page = json.loads(body)
            page["changes"][1]["path"] = "../../etc/passwd"
            return status, headers, json.dumps(page).encode()
        return None

    proxy.rewrites.append(hostile)
    remote = HttpRemote(proxy.url, "alpha", token, backoff=0.01)
    page = remote.changes(0)
    assert [c.doc_id for c in page.changes] == ["d0", "d2"]
    assert page.rejected[0].doc_id == "d1" and "../../etc/passwd" in page.rejected[0].path
    remote.close()


@pytest.mark.parametrize(
    "answer",
    [
        b"<html>oops</html>",
        b'{"server_id": "x"}',
        b'{"server_id":"s","min_seq":1,"last_seq":1,"changes":[{"seq":"1"}],"more":false}',
    ],
    ids=["not-json", "missing-fields", "wrong-type"],
)
def test_malformed_answers_raise_bad_server_answer(server, fault_proxy, answer):
    """An answer that is not JSON or breaks the schema raises BadServerAnswer, not a crash."""
    proxy = fault_proxy(server.url)
    proxy.rewrites.append(
        lambda m, path, s, h, b: (200, {"Content-Type": "application/json"}, answer)
    )
    remote = HttpRemote(proxy.url, "alpha", server.token("alpha"), backoff=0.01)
    with pytest.raises(BadServerAnswer):
        remote.changes(0)
    remote.close()


def test_an_oversized_answer_is_cut_off(server):
    """An answer above the client's cap raises BadServerAnswer instead of being buffered."""
    remote = server.remote("alpha", max_answer=2000)
    _seed(remote, 20)
    with pytest.raises(BadServerAnswer, match="exceeds"):
        remote.changes(0)


def test_items_with_unsafe_paths_are_never_sent(server):
    """commit() rejects an item with an unsafe path locally and sends the others."""
    remote = server.remote("alpha")
    (blob,) = _blobs(1)
    remote.upload([blob])
    results = remote.commit(
        [
            p.CommitItem.make(remote.client_id, "bad", "../x", None, blob.hash),
            p.CommitItem.make(remote.client_id, "good", "x", None, blob.hash),
        ]
    )
    assert [r.status for r in results] == ["rejected", "ok"] and results[0].error == "unsafe_path"
    assert remote.changes(0).last_seq == 1


def test_plain_http_is_refused_beyond_loopback():
    """http:// to another host needs allow_http; loopback names and addresses are fine."""
    with pytest.raises(UsageError, match="plain HTTP"):
        HttpRemote("http://sync.example.com", "alpha", "t0ken")
    HttpRemote("http://sync.example.com", "alpha", "t0ken", allow_http=True).close()
    for url in (
        "http://localhost:1",
        "http://127.0.0.2:1",
        "http://[::1]:1",
        "https://example.com",
    ):
        HttpRemote(url, "alpha", "t0ken").close()
    with pytest.raises(UsageError):
        HttpRemote("http://user:pw@localhost", "alpha", "t0ken")
    with pytest.raises(UsageError):
        HttpRemote("ftp://localhost", "alpha", "t0ken")


def test_tls_is_verified_with_the_configured_ca(server_factory, tmp_path):
    """An HTTPS server with a private CA is refused by default and trusted with ca_file."""
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    certfile, keyfile, cafile = tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "ca.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(certfile))
    cert.private_key_pem.write_to_path(str(keyfile))
    ca.cert_pem.write_to_path(str(cafile))
    server = server_factory(tls=(certfile, keyfile))
    token = server.token("alpha")
    with pytest.raises(ServerUnreachable, match="TLS"):
        HttpRemote(server.url, "alpha", token, retries=3, backoff=0.01).health()
    with HttpRemote(server.url, "alpha", token, ca_file=cafile) as remote:
        assert remote.changes(0).last_seq == 0


def test_importing_the_client_does_not_load_the_server_stack():
    """`import syncengine.remote` loads no FastAPI, Starlette, uvicorn or pydantic."""
    code = (
        "import sys, time; t = time.perf_counter(); import syncengine.remote; "
        "print(time.perf_counter() - t); "
        "heavy = ('fastapi', 'starlette', 'uvicorn', 'pydantic'); "
        "print(sorted(m for m in heavy if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[2],
    ).stdout.split("\n")
    assert out[1] == "[]", out
