"""Helpers for the server tests: a raw API client and a fault-injecting HTTP proxy.

The server fixtures themselves (``server``, ``server_factory``, ``storage``,
``pg_dsn``) come from the plugin ``tests/fixtures_server.py``, registered by
the root conftest, so every test folder gets the same ones.
"""

from __future__ import annotations

import hashlib
import http.server
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests

from syncengine import protocol as p

PROTO = {p.PROTOCOL_HEADER: str(p.PROTOCOL_VERSION)}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Api:
    """Raw HTTP calls to a test server, with the protocol header and a token."""

    def __init__(self, url: str, ws: str, token: str | None) -> None:
        self.url, self.ws, self.token = url, ws, token
        self.session = requests.Session()

    def headers(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        out = dict(PROTO)
        if self.token is not None:
            out["Authorization"] = f"Bearer {self.token}"
        out.update(extra or {})
        return out

    def call(self, method: str, path: str, **kw: Any) -> requests.Response:
        url = self.url + path.replace("{ws}", self.ws)
        headers = self.headers(kw.pop("headers", None))
        return self.session.request(method, url, headers=headers, timeout=30, **kw)

    def put_blob(self, data: bytes) -> str:
        digest = sha(data)
        r = self.call("PUT", f"/v1/ws/{{ws}}/blobs/{digest}", data=data)
        assert r.status_code == 201, r.text
        return digest

    def commit(self, items: list[p.CommitItem], client_id: str = "c1") -> list[dict[str, Any]]:
        body = {"client_id": client_id, "items": [p.to_dict(i) for i in items]}
        r = self.call("POST", "/v1/ws/{ws}/commit", json=body)
        assert r.status_code == 200, r.text
        return r.json()["results"]

    def changes(self, since: int = 0, limit: int = 1000) -> dict[str, Any]:
        r = self.call("GET", "/v1/ws/{ws}/changes", params={"since": since, "limit": limit})
        assert r.status_code == 200, r.text
        return r.json()

    def close(self) -> None:
        self.session.close()


@pytest.fixture
def traced(tmp_path: Path) -> Iterator[tuple[Any, list[str]]]:
    """A SQLite Storage whose connections report every statement they run into a list."""
    from syncengine.server.storage import Storage

    storage = Storage(data_dir=tmp_path / "srv")
    statements: list[str] = []
    trace_sqlite(storage, statements.append)
    yield storage, statements
    storage.close()


def trace_sqlite(storage: Any, callback: Callable[[str], None]) -> None:
    """Have the storage's SQLite connections opened from now on call ``callback`` with each statement."""
    connect = storage.db._connect

    def traced_connect(*args: Any, **kwargs: Any) -> Any:
        conn = connect(*args, **kwargs)
        conn.set_trace_callback(callback)
        return conn

    storage.db.close_all()  # the connections opened before (the migration's) are untraced
    storage.db._connect = traced_connect


def transactions(statements: list[str]) -> list[str]:
    """BEGIN and COMMIT statements, first word upper-cased (each COMMIT is one fsync of the WAL)."""
    return [s.split()[0].upper() for s in statements if s.lstrip().upper().startswith(("BEGIN", "COMMIT"))]


@pytest.fixture
def api_for() -> Iterator[Callable[..., Api]]:
    """``api_for(server, ws, token=...)``: a raw client (token made if not given)."""
    made: list[Api] = []

    def make(server: Any, ws: str = "alpha", token: str | None = "new") -> Api:
        api = Api(server.url, ws, server.token(ws) if token == "new" else token)
        made.append(api)
        return api

    yield make
    for api in made:
        api.close()


def item(
    doc_id: str,
    path: str,
    base_rev: int | None,
    digest: str | None,
    executable: bool = False,
    client_id: str = "c1",
) -> p.CommitItem:
    return p.CommitItem.make(client_id, doc_id, path, base_rev, digest, executable)


# ---------------------------------------------------------------- fault proxy


Rewrite = Callable[[str, str, int, dict[str, str], bytes], tuple[int, dict[str, str], bytes] | None]


@dataclass
class FaultProxy:
    """An HTTP proxy in a thread between a client and the real server.

    ``fail(n, status, headers)`` answers the next n requests itself;
    ``rewrites`` may replace an upstream answer (method, path, status,
    headers, body) -> (status, headers, body) or None to keep it.
    ``seen`` lists what reached the proxy (method, path); ``received`` the
    same with the request's headers and raw body, as the client sent them.
    """

    upstream: str
    failures: list[tuple[int, dict[str, str]]] = field(default_factory=list)
    rewrites: list[Rewrite] = field(default_factory=list)
    seen: list[tuple[str, str]] = field(default_factory=list)
    received: list[tuple[str, str, dict[str, str], bytes]] = field(default_factory=list)
    port: int = 0
    _httpd: Any = None
    _thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def fail(self, n: int, status: int = 503, headers: dict[str, str] | None = None) -> None:
        self.failures.extend([(status, headers or {})] * n)

    def calls(self, method: str, part: str) -> int:
        """Requests seen with ``method`` whose path (query left out) contains ``part``."""
        return sum(1 for m, path in self.seen if m == method and part in path.split("?")[0])

    def start(self) -> FaultProxy:
        proxy = self
        session = requests.Session()

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True

            def log_message(self, *args: Any) -> None:
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    out = bytearray()
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            self.rfile.readline()
                            return bytes(out)
                        out += self.rfile.read(size)
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _handle(self) -> None:
                body = self._body()
                proxy.seen.append((self.command, self.path))
                proxy.received.append((self.command, self.path, dict(self.headers.items()), body))
                if proxy.failures:
                    status, headers = proxy.failures.pop(0)
                    payload = b'{"error":"injected","message":"injected failure"}'
                    self._answer(status, {"Content-Type": "application/json", **headers}, payload)
                    return
                fwd = {
                    k: v
                    for k, v in self.headers.items()
                    if k.lower()
                    not in ("host", "accept-encoding", "transfer-encoding", "content-length")
                }
                fwd["Accept-Encoding"] = "identity"  # rewrites see plain bodies
                resp = session.request(
                    self.command,
                    proxy.upstream + self.path,
                    data=body,
                    headers=fwd,
                    timeout=30,
                    stream=True,
                    allow_redirects=False,
                )
                data = resp.raw.read(decode_content=False)
                headers = {
                    k: v
                    for k, v in resp.headers.items()
                    if k.lower() not in ("content-length", "transfer-encoding", "connection")
                }
                status = resp.status_code
                for rewrite in proxy.rewrites:
                    changed = rewrite(self.command, self.path, status, headers, data)
                    if changed is not None:
                        status, headers, data = changed
                self._answer(status, headers, data)

            def _answer(self, status: int, headers: dict[str, str], data: bytes) -> None:
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = _handle

        class Server(http.server.ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request: Any, client_address: Any) -> None:
                # A client that gave up on an answer (its retry, a kill) is part of the
                # game; printed, it would land in the stderr of an in-process CLI run.
                if isinstance(sys.exc_info()[1], ConnectionError):
                    return
                super().handle_error(request, client_address)

        self._httpd = Server(("127.0.0.1", 0), Handler)
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.02},
            name="fault-proxy",
            daemon=True,
        )
        self._thread.start()
        self._session = session
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5)
        self._session.close()


@pytest.fixture
def fault_proxy() -> Iterator[Callable[[str], FaultProxy]]:
    """``fault_proxy(upstream_url) -> FaultProxy``, stopped after the test."""
    made: list[FaultProxy] = []

    def make(upstream: str) -> FaultProxy:
        proxy = FaultProxy(upstream).start()
        made.append(proxy)
        return proxy

    yield make
    for proxy in made:
        proxy.stop()
