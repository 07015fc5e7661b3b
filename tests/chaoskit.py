"""Chaos kit for the convergence tests: a restartable serve process, a wire that drops answers, a ledger of writes.

* :class:`Server` — a real ``syncengine serve`` on a fixed port and data dir,
  so it can be stopped and started again behind the same proxy;
* :class:`Wire` — the fault proxy of the wire tests (``tests/server/conftest.py``),
  armed to close the connection of the Nth matching request after the server
  answered it, so the replica never hears (a reset mid-batch);
* :class:`Ledger` — every token a simulated user wrote, and which must survive.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from tests.replicas import ServeProcess
from tests.server.conftest import FaultProxy

TOKEN = re.compile(rb"T[0-9a-f]+x[0-9]{6}Z")


# ---------------------------------------------------------------- the server and the wire


class Server:
    """A real `syncengine serve` on a fixed port and data dir, so it can be stopped and started again."""

    def __init__(self, tmp: Path) -> None:
        self.data = tmp / "server-data"
        self.data.mkdir(parents=True)
        self.log = tmp / "serve.log"
        self.proc: ServeProcess | None = None
        self.port = 0
        self.restarts = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        proc = ServeProcess(self.data, self.log)
        if self.port:
            proc.port = self.port  # the proxy in front keeps its upstream
        self.port = proc.port
        self.proc = proc.__enter__()

    def stop(self, crash: bool = False) -> None:
        """Stop the server: gracefully (SIGINT), or as a crash (SIGKILL, whatever it was doing)."""
        assert self.proc is not None
        if crash:
            self.proc.proc.kill()
            self.proc.proc.wait(15)
        self.proc.__exit__(None, None, None)
        self.proc = None

    def token(self, workspace: str) -> str:
        assert self.proc is not None
        return self.proc.token(workspace)


class DropAnswer(ConnectionAbortedError):
    """Raised inside the proxy: the connection closes without the upstream's answer."""


class Wire:
    """The fault proxy of the wire tests, armed to drop the connection of the Nth matching request."""

    MIDBATCH = ("/commit", "/blobs/pack", "/blobs/unpack", "/blobs/missing", "/changes", "/docs")

    def __init__(self, upstream: str) -> None:
        self.proxy = FaultProxy(upstream).start()
        self.proxy._httpd.handle_error = lambda *_a: None  # a dropped connection is the point, not news
        self.countdown = 0
        self.suffix = ""
        self.dropped = 0
        self.proxy.rewrites.append(self._rewrite)

    @property
    def url(self) -> str:
        return self.proxy.url

    def arm(self, nth: int, suffix: str) -> None:
        self.countdown, self.suffix = nth, suffix

    def disarm(self) -> None:
        self.countdown = 0

    def _rewrite(self, method: str, path: str, status: int, headers: dict, body: bytes):
        if self.countdown and path.split("?")[0].endswith(self.suffix):
            self.countdown -= 1
            if self.countdown == 0:
                self.dropped += 1
                raise DropAnswer("injected: connection dropped after the server answered")
        return None

    def close(self) -> None:
        self.proxy.stop()


# ---------------------------------------------------------------- the ledger


@dataclass
class Ledger:
    """Every token written, and which of them must survive.

    A token is *pending* on the replica that wrote it until a round of that
    replica completes having started with it there; it is then *required*.
    A pending token that its own user removes (an overwrite or a delete, told
    to the ledger by the user actions themselves, never guessed from what is
    on disk) was undone before any engine could see it. Everything else must
    survive: at the end every replica has synced, so every token still
    pending is required too — one the engine itself clobbered included.
    """

    seed: int
    count: int = 0
    required: set[bytes] = field(default_factory=set)
    pending: dict[str, set[bytes]] = field(default_factory=dict)  # replica -> tokens not yet seen by a round
    undone: int = 0

    def fresh(self) -> str:
        self.count += 1
        return f"T{self.seed:x}x{self.count:06d}Z"

    def token(self, replica: str) -> str:
        tok = self.fresh()
        self.add(replica, tok)
        return tok

    def add(self, replica: str, tok: str) -> None:
        self.pending.setdefault(replica, set()).add(tok.encode())

    def removed(self, replica: str, tokens: set[bytes]) -> None:
        """The user of ``replica`` overwrote or deleted these tokens."""
        mine = self.pending.get(replica, set())
        self.undone += len(mine & tokens)
        mine -= tokens

    def before_sync(self, replica: str) -> set[bytes]:
        return set(self.pending.get(replica, set()))

    def synced(self, replica: str, seen: set[bytes]) -> None:
        self.required |= seen
        self.pending.get(replica, set()).difference_update(seen)

    def must_survive(self) -> set[bytes]:
        return self.required.union(*self.pending.values())
