"""Live updates: ``WS /v1/ws/{ws}/live``, and their fan-out across server processes.

What a client hears (JSON text frames; docs/protocol.md "Live updates")::

    {"type": "hello", "last_seq": N, "heartbeat": 15, "server_id": ...}   on connect
    {"type": "changes", "last_seq": N}                                    after a commit that wrote
    {"type": "heartbeat", "last_seq": N}                                  every ``heartbeat`` seconds

Announcements are hints; every message carries the workspace's latest seq
so a client that missed one notices at the next heartbeat and pulls.
Announcements for one connection are coalesced: only the newest seq is
sent, and never one the connection has already been told.

The handshake is refused like any HTTP call: no or bad token (401), a token
for another workspace (404), credentials in the query string (400), no or
another protocol version (400), and a foreign ``Origin`` (403; a browser
page on another site must not ride on a user's token — CSWSH, RELIABILITY
F6). A client only sends heartbeats: a frame over 4 KiB closes the socket
with 1009, and a message naming another workspace with 1008. The token is
checked again at every heartbeat, so revoking it ends the subscription.

Several server processes may share one PostgreSQL: each commit is announced
with ``NOTIFY syncengine_live`` and every process LISTENs, so a daemon
connected to any process hears of commits made through any other. A
listener that lost its connection re-announces every subscribed
workspace's current seq once it is back, in case a notification fell in
the gap.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import select
import threading
import time
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool
from starlette.responses import JSONResponse
from starlette.websockets import WebSocket, WebSocketDisconnect

from syncengine.protocol import API_PREFIX, PROTOCOL_HEADER, SUPPORTED_VERSIONS

log = logging.getLogger("syncengine.server.live")

HEARTBEAT = 15.0
MAX_MESSAGE = 4096  # clients send heartbeats only
PG_CHANNEL = "syncengine_live"
_QUERY_SECRETS = {"token", "access_token", "auth", "authorization", "bearer", "api_key", "apikey", "key"}
_NO_SEQ = 1 << 62  # a "since" past any seq: the changes query returns only last_seq


class _Subscriber:
    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.newest = -1  # newest seq announced
        self.sent = -1  # newest seq this connection was told


class Hub:
    """The subscribers of one server process, by workspace name."""

    def __init__(self, storage: Any, heartbeat: float = HEARTBEAT) -> None:
        self.storage = storage
        self.heartbeat = heartbeat
        self.loop: asyncio.AbstractEventLoop | None = None
        self.subs: dict[str, set[_Subscriber]] = {}
        self._guard = threading.Lock()
        self._listener: _PgListener | None = None

    # ------------------------------------------------------------ announcing

    def announce(self, ws: str, last_seq: int) -> None:
        """The commit hook (a worker thread): tell this process's subscribers, and the others via NOTIFY."""
        if getattr(self.storage, "postgres", False):
            try:
                with self.storage.db.connection_context():
                    self.storage.db.execute_sql("SELECT pg_notify(%s, %s)",
                                                (PG_CHANNEL, json.dumps({"ws": ws, "last_seq": last_seq})))
            except Exception:
                log.exception("NOTIFY failed; other server processes hear of seq %d at their next heartbeat",
                              last_seq)
        self.deliver_threadsafe(ws, last_seq)

    def deliver_threadsafe(self, ws: str, last_seq: int) -> None:
        loop = self.loop
        if loop is not None and self.subs.get(ws) and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop is shutting down
                loop.call_soon_threadsafe(self._deliver, ws, last_seq)

    def _deliver(self, ws: str, last_seq: int) -> None:
        for sub in list(self.subs.get(ws, ())):
            if last_seq > sub.newest:
                sub.newest = last_seq
                sub.event.set()

    # ------------------------------------------------------------ subscribing

    def subscribe(self, ws: str) -> _Subscriber:
        self.loop = asyncio.get_running_loop()
        sub = _Subscriber()
        self.subs.setdefault(ws, set()).add(sub)
        return sub

    def unsubscribe(self, ws: str, sub: _Subscriber) -> None:
        group = self.subs.get(ws)
        if group is not None:
            group.discard(sub)
            if not group:
                del self.subs[ws]
        if not self.subs:
            self._stop_listener()

    def ensure_listener(self) -> None:
        """With PostgreSQL, LISTEN before the first hello is sent (no commit can slip between)."""
        if not getattr(self.storage, "postgres", False):
            return
        with self._guard:
            if self._listener is None or not self._listener.is_alive():
                self._listener = _PgListener(self)
                self._listener.start()
            listener = self._listener
        listener.ready.wait(10)

    def _stop_listener(self) -> None:
        with self._guard:
            listener, self._listener = self._listener, None
        if listener is not None:
            listener.stop.set()

    def close(self) -> None:
        self._stop_listener()

    def last_seq(self, ws_id: int) -> int:
        return int(self.storage.changes(ws_id, _NO_SEQ, 1)["last_seq"])


class _PgListener(threading.Thread):
    """LISTEN on its own connection; every NOTIFY becomes a local delivery."""

    def __init__(self, hub: Hub) -> None:
        super().__init__(name="syncengine-pg-listen", daemon=True)
        self.hub = hub
        self.stop = threading.Event()
        self.ready = threading.Event()

    def _connect(self):
        import psycopg2

        db = self.hub.storage.db
        params = dict(db.connect_params)
        params.setdefault("dsn" if str(db.database).startswith("postgres") else "dbname", db.database)
        conn = psycopg2.connect(**params)
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(f"LISTEN {PG_CHANNEL}")
        return conn

    def run(self) -> None:
        delay = 0.5
        reconnected = False
        while not self.stop.is_set():
            try:
                conn = self._connect()
            except Exception as exc:
                log.warning("cannot LISTEN for live updates (%s); retrying in %.1fs", exc, delay)
                self.ready.set()  # never keep a client waiting for a listener that may not come
                self.stop.wait(delay)
                delay = min(delay * 2, 30)
                continue
            delay = 0.5
            self.ready.set()
            if reconnected:
                self._catch_up()
            reconnected = True
            try:
                self._listen(conn)
            except Exception as exc:
                if not self.stop.is_set():
                    log.warning("lost the LISTEN connection (%s); reconnecting", exc)
            finally:
                with contextlib.suppress(Exception):
                    conn.close()

    def _listen(self, conn) -> None:
        while not self.stop.is_set():
            if select.select([conn], [], [], 0.5)[0]:
                conn.poll()
                while conn.notifies:
                    note = conn.notifies.pop(0)
                    try:
                        data = json.loads(note.payload)
                        self.hub.deliver_threadsafe(str(data["ws"]), int(data["last_seq"]))
                    except (ValueError, KeyError, TypeError):
                        log.warning("ignored a malformed live notification")

    def _catch_up(self) -> None:
        storage = self.hub.storage
        for ws in list(self.hub.subs):
            with contextlib.suppress(Exception):
                ws_id = storage.workspace_id(ws)
                if ws_id is not None:
                    self.hub.deliver_threadsafe(ws, self.hub.last_seq(ws_id))


# ---------------------------------------------------------------- the route


def _refusal(scope: dict, ws: str) -> tuple[int, str, str] | None:
    """Checks that need no database: query credentials, protocol version, Origin."""
    query = scope.get("query_string", b"").decode("latin-1")
    if query and any(k.lower() in _QUERY_SECRETS for k, _ in parse_qsl(query, keep_blank_values=True)):
        return 400, "token_in_query", "credentials are not accepted in the URL; send Authorization: Bearer"
    headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
    version = headers.get(PROTOCOL_HEADER.lower())
    if version is None or version.strip() not in {str(v) for v in SUPPORTED_VERSIONS}:
        return 400, "protocol_mismatch", f"send {PROTOCOL_HEADER}: {SUPPORTED_VERSIONS[-1]}"
    origin = headers.get("origin")
    if origin is not None and urlsplit(origin).netloc.lower() != headers.get("host", "").lower():
        return 403, "forbidden", "cross-origin WebSocket refused"  # includes Origin: null
    return None


async def _deny(websocket: WebSocket, status: int, code: str, message: str) -> None:
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    body = JSONResponse({"error": code, "message": message}, status_code=status, headers=headers)
    try:
        await websocket.send_denial_response(body)
    except RuntimeError:  # a server without the denial extension: a bare close is a 403
        await websocket.close(code=1008)


async def _receive(websocket: WebSocket, ws: str) -> None:
    """Read what the client sends until it leaves or breaks the rules."""
    while True:
        message = await websocket.receive()
        if message["type"] == "websocket.disconnect":
            return
        data = message.get("text") if message.get("text") is not None else message.get("bytes") or b""
        if len(data) > MAX_MESSAGE:
            await websocket.close(code=1009, reason="message too big")
            return
        try:
            body = json.loads(data)
        except ValueError:
            body = None
        if isinstance(body, dict) and "workspace" in body and body["workspace"] != ws:
            await websocket.close(code=1008, reason="this connection is for one workspace")
            return


class _DenialNoise(logging.Filter):
    """uvicorn logs every handshake refused with a denial response (401/403/404) as
    "returned without completing handshake", though the response went out: drop
    that one line so a refused token does not read as a server error."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "without completing handshake" not in str(record.msg)


_FILTER = _DenialNoise()


def install(app: FastAPI, storage: Any, heartbeat: float = HEARTBEAT) -> Hub:
    """Add the route and the announcer to ``app``; the hub is ``app.state.live``."""
    uvicorn_log = logging.getLogger("uvicorn.error")
    if _FILTER not in uvicorn_log.filters:
        uvicorn_log.addFilter(_FILTER)
    hub = Hub(storage, heartbeat)
    app.state.live = hub
    app.state.announcers.append(hub.announce)

    def token_of(websocket: WebSocket) -> str:
        scheme, _, token = websocket.headers.get("authorization", "").partition(" ")
        return token.strip() if scheme.lower() == "bearer" else ""

    async def authenticate(websocket: WebSocket, ws: str) -> tuple[int | None, tuple[int, str, str] | None]:
        token = token_of(websocket)
        if not token:
            return None, (401, "unauthorized", "missing bearer token")
        found = await run_in_threadpool(storage.authenticate, token)
        if found is None:
            return None, (401, "unauthorized", "token unknown or revoked")
        if found[1] != ws:
            return None, (404, "not_found", "no such workspace")
        return found[0], None

    @app.websocket(API_PREFIX + "/ws/{ws}/live")
    async def live(websocket: WebSocket, ws: str) -> None:
        refusal = _refusal(websocket.scope, ws)
        ws_id = None
        if refusal is None:
            ws_id, refusal = await authenticate(websocket, ws)
        if refusal is not None:
            await _deny(websocket, *refusal)
            return
        await websocket.accept()
        sub = hub.subscribe(ws)
        receiver = None
        try:
            await run_in_threadpool(hub.ensure_listener)
            last = await run_in_threadpool(hub.last_seq, ws_id)
            sub.sent = max(sub.sent, last)
            await websocket.send_text(json.dumps({"type": "hello", "last_seq": last, "heartbeat": hub.heartbeat,
                                                  "server_id": storage.server_id}))
            receiver = asyncio.create_task(_receive(websocket, ws))
            beat = time.monotonic() + hub.heartbeat
            while not receiver.done():
                waiter = asyncio.create_task(sub.event.wait())
                await asyncio.wait({receiver, waiter}, timeout=max(0.0, beat - time.monotonic()),
                                   return_when=asyncio.FIRST_COMPLETED)
                waiter.cancel()
                if receiver.done():
                    break
                if sub.event.is_set():
                    sub.event.clear()
                    if sub.newest > sub.sent:
                        sub.sent = sub.newest
                        await websocket.send_text(json.dumps({"type": "changes", "last_seq": sub.newest}))
                if time.monotonic() >= beat:
                    if await run_in_threadpool(storage.authenticate, token_of(websocket)) is None:
                        await websocket.close(code=1008, reason="token revoked")
                        break
                    last = await run_in_threadpool(hub.last_seq, ws_id)
                    sub.sent = max(sub.sent, last)
                    await websocket.send_text(json.dumps({"type": "heartbeat", "last_seq": last}))
                    beat = time.monotonic() + hub.heartbeat
        except (WebSocketDisconnect, RuntimeError, OSError):
            pass  # the client went away mid-send
        finally:
            hub.unsubscribe(ws, sub)
            if receiver is not None:
                receiver.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await receiver

    return hub
