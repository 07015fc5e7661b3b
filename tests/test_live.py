"""Live updates over ``WS /v1/ws/{ws}/live`` against real servers: what the server announces and
refuses, the daemon's client (heartbeats, reconnects, gap detection), the polling fallback, and
announcements across server processes sharing one PostgreSQL (LISTEN/NOTIFY)."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from syncengine import protocol as p
from syncengine.autosync import AutoSync
from syncengine.live import LiveClient, live_url
from syncengine.testing import wait_until
from tests import daemonkit
from tests.daemonkit import Daemons, make_ws
from tests.helpers import REPO
from tests.server.conftest import Api, item, sha

pytestmark = pytest.mark.integration
daemons = daemonkit.daemons  # the fixture

PROTO = {p.PROTOCOL_HEADER: str(p.PROTOCOL_VERSION)}


def _ws(server, workspace: str, token: str | None, **headers: str):
    extra = dict(PROTO, **headers)
    if token:
        extra["Authorization"] = f"Bearer {token}"
    return connect(live_url(server.url, workspace), additional_headers=extra, open_timeout=10, proxy=None)


def _commit(api: Api, doc_id: str, path: str, data: bytes) -> int:
    digest = api.put_blob(data)
    result = api.commit([item(doc_id, path, None, digest)])
    assert result[0]["status"] == "ok", result
    return api.changes()["last_seq"]


def _expect(q: queue.Queue, predicate: Callable, timeout: float = 15.0, what: str = "a message"):
    seen = []
    with contextlib.suppress(queue.Empty):
        while True:
            value = q.get(timeout=timeout)
            if predicate(value):
                return value
            seen.append(value)
    raise AssertionError(f"no {what} within {timeout:g}s; saw {seen}")


def test_server_says_hello_announces_commits_and_sends_heartbeats(server):
    """hello carries the current seq; a commit is announced with its seq; a heartbeat follows silence."""
    token = server.token("docs")
    api = Api(server.url, "docs", token)
    try:
        _commit(api, "d1", "a.txt", b"a")
        server.app.state.live.heartbeat = 0.3  # read per connection: no 15 s wait in a test
        with _ws(server, "docs", token) as conn:
            hello = json.loads(conn.recv(timeout=10))
            assert hello["type"] == "hello" and hello["last_seq"] == 1 and hello["heartbeat"] == 0.3
            seq = _commit(api, "d2", "b.txt", b"b")
            message = json.loads(conn.recv(timeout=10))
            while message["type"] == "heartbeat":
                message = json.loads(conn.recv(timeout=10))
            assert message == {"type": "changes", "last_seq": seq}
            beat = json.loads(conn.recv(timeout=10))
            assert beat == {"type": "heartbeat", "last_seq": seq}
            conn.send(json.dumps({"type": "heartbeat"}))  # the client's own heartbeat is accepted
            assert json.loads(conn.recv(timeout=10))["type"] == "heartbeat"
    finally:
        api.close()


@pytest.mark.parametrize(("workspace", "token", "headers", "query", "status"), [
    ("docs", None, {}, "", 401),
    ("docs", "not-a-token", {}, "", 401),
    ("other", "good", {}, "", 404),
    ("docs", "good", {}, "?token=x", 400),
    ("docs", "good", {"Origin": "https://evil.example"}, "", 403),
], ids=["no-token", "unknown-token", "another-workspace", "token-in-query", "foreign-origin"])
def test_server_refuses_a_handshake_like_any_http_call(server, workspace, token, headers, query, status):
    """Refused handshakes get the HTTP status the REST routes would give; nothing is subscribed."""
    good = server.token("docs")
    server.token("other")
    extra = dict(PROTO, **headers)
    if token:
        extra["Authorization"] = f"Bearer {good if token == 'good' else token}"
    with pytest.raises(InvalidStatus) as refused:
        connect(live_url(server.url, workspace) + query, additional_headers=extra, open_timeout=10, proxy=None)
    assert refused.value.response.status_code == status
    assert not server.app.state.live.subs


def test_client_hears_every_seq_and_reconnects_after_the_server_returns(server):
    """LiveClient reports hello/changes/heartbeat seqs, goes offline with the server and reconnects."""
    token = server.token("docs")
    seqs: queue.Queue = queue.Queue()
    states: queue.Queue = queue.Queue()
    server.app.state.live.heartbeat = 0.3
    client = LiveClient(server.url, "docs", token, on_seq=lambda seq, kind: seqs.put((seq, kind)),
                        on_state=states.put, heartbeat=0.5, max_backoff=0.5)
    client.start()
    api = Api(server.url, "docs", token)
    try:
        _expect(states, lambda s: s == "connected", what="a connection")
        assert _expect(seqs, lambda m: m[1] == "hello") == (0, "hello")
        assert client.server_heartbeat == 0.3  # silence is judged by the slower side's heartbeat
        seq = _commit(api, "d1", "a.txt", b"a")
        _expect(seqs, lambda m: m == (seq, "changes"), what="the announcement")
        _expect(seqs, lambda m: m == (seq, "heartbeat"), what="a heartbeat")
        server.stop()
        _expect(states, lambda s: s == "offline", what="the loss to be noticed")
        server.restart()
        _expect(states, lambda s: s == "connected", what="the reconnection")
        _expect(seqs, lambda m: m == (seq, "hello"), what="hello again")
        assert client.connects == 2 and client.server_heartbeat == 15.0  # the new server's default
    finally:
        client.close()
        api.close()


def test_only_a_seq_past_the_checkpoint_is_a_gap_that_asks_for_a_pull(tmp_path: Path):
    """Repeated, old or out-of-order announcements ask for nothing; any seq past the checkpoint does."""
    worker = AutoSync(tmp_path, on_state=lambda state: None, notice=lambda *args: None)
    worker.checkpoint = 5
    for seq, kind in ((3, "changes"), (5, "heartbeat"), (5, "changes"), (0, "hello")):
        worker.on_seq(seq, kind)
    assert not worker._reasons
    worker.on_seq(9, "heartbeat")  # the "changes" for 6..9 were lost: the heartbeat tells
    assert worker._reasons == {"server at seq 9 (heartbeat)"}


def test_without_the_websocket_daemons_fall_back_to_polling(tmp_path: Path, server, daemons: Daemons):
    """A server without the live route (an older or proxied one): daemons poll, and edits still flow."""
    server.app.router.routes[:] = [r for r in server.app.router.routes
                                   if not getattr(r, "path", "").endswith("/live")]
    token = server.token("docs")
    a = make_ws(tmp_path / "A", server=server, token=token)
    b = make_ws(tmp_path / "B", server=server, token=token)
    daemons.start(a)
    daemons.start(b)
    wait_until(lambda: daemons.state(a).get("live") == "refused" and daemons.state(b).get("live") == "refused",
               timeout=20, message="both daemons to find live updates unavailable")
    (a / "polled.txt").write_text("by polling")
    wait_until(lambda: (b / "polled.txt").exists() and (b / "polled.txt").read_text() == "by polling",
               timeout=20, message="the edit in B by polling")


# ---------------------------------------------------------------- PostgreSQL: several server processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _serve(dsn: str) -> Iterator[str]:
    """`syncengine serve --db DSN` as a real process; yields its URL."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "cli", "serve", "--port", str(port), "--db", dsn,
                             "--log-level", "warning"], cwd=REPO, env=os.environ.copy(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        def up() -> bool:
            assert proc.poll() is None, "serve exited"
            with contextlib.suppress(requests.RequestException):
                return requests.get(url + "/v1/health", timeout=1).status_code == 200
            return False

        wait_until(up, timeout=30, interval=0.1, message="serve to answer")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@pytest.mark.postgres
def test_a_commit_through_one_server_process_is_announced_by_another(pg_dsn):
    """Two `serve` processes on one PostgreSQL: a daemon's client on B hears a commit made through A."""
    from syncengine.server.admin import create_token
    from syncengine.server.storage import Storage

    storage = Storage(pg_dsn)
    try:
        token = create_token(storage, "shared", None)[1]
    finally:
        storage.close()
    with _serve(pg_dsn) as url_a, _serve(pg_dsn) as url_b:
        seqs: queue.Queue = queue.Queue()
        client = LiveClient(url_b, "shared", token, on_seq=lambda seq, kind: seqs.put((seq, kind)),
                            on_state=lambda state: None, max_backoff=0.5)
        client.start()
        api = Api(url_a, "shared", token)
        try:
            _expect(seqs, lambda m: m == (0, "hello"), what="hello from B")
            data = b"through A"
            api.put_blob(data)
            assert api.commit([item("d1", "a.txt", None, sha(data))])[0]["status"] == "ok"
            _expect(seqs, lambda m: m == (1, "changes"), what="B's announcement of A's commit")
        finally:
            client.close()
            api.close()
