"""The daemon's subscription to the server's live updates (``WS /v1/ws/{ws}/live``).

The WebSocket only says *when* to pull (DESIGN §4 rule 6): every message the
server sends carries its latest change seq (``hello`` on connect,
``changes`` after each commit, ``heartbeat`` every 15 s), and the daemon
compares it with its durable pull checkpoint. A seq ahead of the checkpoint
is a gap, whatever the reason (an announcement lost while reconnecting, a
duplicate, one out of order), and the answer is always the same: pull from
the checkpoint. So a lost or repeated message can delay a pull by at most
one heartbeat and can never skip or repeat work.

Both sides send heartbeats; silence for two heartbeats means the connection
is dead even if TCP has not noticed. Reconnects back off exponentially with
jitter; while the WebSocket is down (or the server has none) the daemon
polls instead (``on_state`` tells it).
"""

from __future__ import annotations

import inspect
import json
import logging
import random
import ssl
import threading
import time
from collections.abc import Callable
from urllib.parse import quote, urlsplit

from syncengine import protocol as p

log = logging.getLogger("syncengine.live")

MAX_FRAME = 64 * 1024  # the server's messages are tiny; anything bigger is refused (close 1009)
USER_AGENT = f"syncengine-daemon (protocol {p.PROTOCOL_VERSION})"

OnSeq = Callable[[int, str], None]  # (last_seq, message type)
OnState = Callable[[str], None]  # connecting | connected | offline | refused


def live_url(server_url: str, workspace: str) -> str:
    """``http(s)://host[:port][/prefix]`` -> ``ws(s)://host[:port][/prefix]/v1/ws/NAME/live``."""
    parts = urlsplit(server_url.rstrip("/"))
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme)
    if scheme is None:
        raise ValueError(f"not an http(s) URL: {server_url!r}")
    return f"{scheme}://{parts.netloc}{parts.path}{p.API_PREFIX}/ws/{quote(workspace, safe='')}/live"


class LiveClient(threading.Thread):
    """Keeps one WebSocket open (reconnecting with backoff) and reports every seq it hears."""

    def __init__(self, server_url: str, workspace: str, token: str, *, on_seq: OnSeq, on_state: OnState,
                 ca_file: str | None = None, heartbeat: float = 15.0, max_backoff: float = 60.0) -> None:
        super().__init__(name="syncengine-live", daemon=True)
        self.url = live_url(server_url, workspace)
        self.token = token
        self.on_seq = on_seq
        self.on_state = on_state
        self.ca_file = ca_file
        self.heartbeat = heartbeat
        self.max_backoff = max_backoff
        self.state = "connecting"
        self.connects = 0
        self.server_heartbeat = 0.0  # from the server's hello
        self._stopping = threading.Event()
        self._wake = threading.Event()
        self._conn = None
        self._lock = threading.Lock()

    # ------------------------------------------------------------ control

    def close(self) -> None:
        """Stop and close the connection; returns once the thread ended (or 5 s passed)."""
        self._stopping.set()
        self._wake.set()
        with self._lock:
            conn = self._conn
        if conn is not None:
            try:
                conn.close()
            except Exception:
                pass
        if self.is_alive() and threading.current_thread() is not self:
            self.join(5)

    def wake(self) -> None:
        """Retry now instead of waiting out the backoff (the server answered HTTP again)."""
        self._wake.set()

    def _set_state(self, state: str) -> None:
        if state != self.state:
            self.state = state
            self.on_state(state)

    # ------------------------------------------------------------ the loop

    def run(self) -> None:
        failures = 0
        while not self._stopping.is_set():
            self._set_state("connecting")
            refused = False
            try:
                self._session()
                failures = 0
            except _Refused as exc:
                refused = True
                log.warning("live updates refused by the server (%s); polling instead", exc)
            except Exception as exc:  # network errors of every kind: back off, then retry
                if not self._stopping.is_set():
                    log.info("live connection lost: %s", _describe(exc))
            if self._stopping.is_set():
                break
            self._set_state("refused" if refused else "offline")
            failures += 1
            ceiling = self.max_backoff * (5 if refused else 1)
            delay = min(ceiling, 0.5 * 2 ** min(failures - 1, 10)) * random.uniform(0.8, 1.2)
            self._wake.clear()
            self._wake.wait(delay)

    def _connect(self):
        from websockets.sync.client import connect

        kwargs = {
            "additional_headers": {"Authorization": f"Bearer {self.token}",
                                   p.PROTOCOL_HEADER: str(p.PROTOCOL_VERSION)},
            "user_agent_header": USER_AGENT,
            "max_size": MAX_FRAME,
            "open_timeout": 10,
            "ping_interval": self.heartbeat,
            "ping_timeout": self.heartbeat,
            "close_timeout": 2,
            "compression": None,
        }
        if self.url.startswith("wss:"):
            kwargs["ssl"] = ssl.create_default_context(cafile=self.ca_file) if self.ca_file \
                else ssl.create_default_context()
        if "proxy" in inspect.signature(connect).parameters:
            kwargs["proxy"] = None  # a sync server is reached directly, as HttpRemote does for loopback
        try:
            return connect(self.url, **kwargs)
        except Exception as exc:
            status = getattr(getattr(exc, "response", None), "status_code", None)
            if status is not None:
                raise _Refused(f"HTTP {status}") from exc
            raise

    def _session(self) -> None:
        # Entered as a context manager: websockets >= 17.1 deprecates using connect()'s result bare.
        with self._connect() as conn:
            self._run_session(conn)

    def _run_session(self, conn) -> None:
        with self._lock:
            self._conn = conn
        try:
            if self._stopping.is_set():
                return
            self.connects += 1
            self._set_state("connected")
            last_heard = time.monotonic()
            next_beat = last_heard + self.heartbeat
            while not self._stopping.is_set():
                now = time.monotonic()
                # Silence for two of the slower side's heartbeats: the server says its own in hello.
                if now - last_heard > 2 * max(self.heartbeat, self.server_heartbeat) + 5:
                    raise TimeoutError(f"no message from the server for {now - last_heard:.0f}s")
                try:
                    raw = conn.recv(timeout=max(0.0, next_beat - now))
                except TimeoutError:
                    conn.send(json.dumps({"type": "heartbeat"}))
                    next_beat = time.monotonic() + self.heartbeat
                    continue
                last_heard = time.monotonic()
                self._handle(raw)
        finally:
            with self._lock:
                self._conn = None
            try:
                conn.close()
            except Exception:
                pass

    def _handle(self, raw: str | bytes) -> None:
        try:
            message = json.loads(raw)
            kind = message["type"]
            seq = message.get("last_seq")
        except (ValueError, KeyError, TypeError):
            log.warning("ignored a malformed live message")
            return
        beat = message.get("heartbeat")
        if kind == "hello" and isinstance(beat, (int, float)) and not isinstance(beat, bool) and 0 < beat <= 3600:
            self.server_heartbeat = float(beat)
        if isinstance(seq, int) and not isinstance(seq, bool) and seq >= 0:
            self.on_seq(seq, str(kind))


class _Refused(Exception):
    """The handshake was answered with an HTTP refusal (auth, no such route): retry slowly."""


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
