"""Pytest plugin: real sync servers for tests (uvicorn in a thread, real databases).

Register it from a conftest with ``pytest_plugins = ["tests.fixtures_server"]``.

Fixtures:

* ``storage`` — parametrized ``sqlite`` / ``postgres``: a :class:`StorageSpec`
  naming a fresh database (postgres runs only when ``SYNCENGINE_TEST_PG_DSN``
  is set; each test gets its own database, dropped afterwards).
* ``server_factory`` — ``server_factory(spec=None, **settings) -> RunningServer``;
  every server it started is stopped at teardown.
* ``server`` — one running SQLite server.
* ``pg_dsn`` — a fresh PostgreSQL database's DSN (skips without PostgreSQL).

A :class:`RunningServer` has ``.url``, ``.token(workspace)`` (creates the
workspace if needed and returns a new token), ``.storage`` (the server's own
:class:`~syncengine.server.storage.Storage`), ``.stop()``, ``.restart()``
(same port, same database) and ``.remote(workspace, **kw)`` for an
:class:`~syncengine.remote.HttpRemote` with a fresh token.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest

PG_ENV = "SYNCENGINE_TEST_PG_DSN"


@dataclass(frozen=True)
class StorageSpec:
    """Where a test server keeps its state: a SQLite data dir, or a PostgreSQL DSN."""

    kind: str  # "sqlite" | "postgres"
    data_dir: Path | None = None
    db_url: str | None = None

    def cli_args(self) -> list[str]:
        """The ``--db``/``--data`` flags naming this storage for ``syncengine serve|token``."""
        return ["--db", self.db_url] if self.db_url else ["--data", str(self.data_dir)]


def _free_socket(port: int = 0) -> socket.socket:
    # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY only on sockets that say so,
    # and without it every answer waits ~40 ms for a delayed ACK.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


@dataclass
class RunningServer:
    """A real uvicorn server in a thread, serving a real database."""

    spec: StorageSpec
    settings: Any = None
    announce: Any = None
    tls: tuple[Path, Path] | None = None  # (certfile, keyfile): serve HTTPS
    port: int = 0
    storage: Any = None
    app: Any = None
    _server: Any = None
    _thread: threading.Thread | None = None
    _sock: socket.socket | None = None
    _remotes: list[Any] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def start(self) -> RunningServer:
        import uvicorn

        from syncengine.server.app import create_app
        from syncengine.server.storage import Storage

        self.storage = Storage(self.spec.db_url, self.spec.data_dir)
        self.app = create_app(self.storage, self.settings, announce=self.announce)
        self._sock = _free_socket(self.port)
        self.port = self._sock.getsockname()[1]
        config = uvicorn.Config(
            self.app,
            log_level="warning",
            access_log=False,
            ws="auto",
            ws_max_size=4096,
            lifespan="off",
            timeout_graceful_shutdown=2,
            ssl_certfile=str(self.tls[0]) if self.tls else None,
            ssl_keyfile=str(self.tls[1]) if self.tls else None,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run,
            kwargs={"sockets": [self._sock]},
            name=f"uvicorn-{self.port}",
            daemon=True,
        )
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("test server did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        """Stop serving and close the database pool; the data stays for restart()."""
        for remote in self._remotes:
            with contextlib.suppress(Exception):
                remote.close()
        self._remotes.clear()
        if self._server is not None:
            self._server.should_exit = True
            self._thread.join(10)
            if self._thread.is_alive():
                raise RuntimeError("test server did not stop")
            self._server = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self.storage is not None:
            self.storage.close()
            self.storage = None

    def restart(self) -> RunningServer:
        """Stop, then serve the same database on the same port."""
        self.stop()
        return self.start()

    def token(self, workspace: str, label: str | None = None) -> str:
        """A new token for ``workspace`` (created if needed), via the admin functions."""
        from syncengine.server.admin import create_token

        return create_token(self.storage, workspace, label)[1]

    def remote(self, workspace: str, token: str | None = None, **kw: Any) -> Any:
        """An HttpRemote on this server (closed when the server stops)."""
        from syncengine.remote import HttpRemote

        kw.setdefault("backoff", 0.01)
        remote = HttpRemote(self.url, workspace, token or self.token(workspace), **kw)
        self._remotes.append(remote)
        return remote


# ---------------------------------------------------------------- PostgreSQL


def _pg_admin_dsn() -> str | None:
    return os.environ.get(PG_ENV) or None


@contextlib.contextmanager
def fresh_pg_database(dsn: str) -> Iterator[str]:
    """CREATE a uniquely named database on the DSN's server, yield its DSN, DROP it after."""
    import psycopg2

    name = f"syncengine_test_{secrets.token_hex(6)}"
    admin = psycopg2.connect(dsn)
    admin.autocommit = True
    try:
        with admin.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{name}"')
        parts = urlsplit(dsn)
        yield urlunsplit((parts.scheme, parts.netloc, "/" + name, parts.query, parts.fragment))
    finally:
        with admin.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


@pytest.fixture
def pg_dsn() -> Iterator[str]:
    """The DSN of a fresh, empty PostgreSQL database (dropped after the test)."""
    dsn = _pg_admin_dsn()
    if not dsn:
        pytest.skip(f"PostgreSQL tests need {PG_ENV} (set by .ci/run)")
    with fresh_pg_database(dsn) as url:
        yield url


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StorageSpec]:
    """A fresh server storage: SQLite under tmp_path, or a new PostgreSQL database."""
    if request.param == "sqlite":
        yield StorageSpec("sqlite", data_dir=tmp_path / "server-data")
        return
    dsn = _pg_admin_dsn()
    if not dsn:
        pytest.skip(f"PostgreSQL tests need {PG_ENV} (set by .ci/run)")
    with fresh_pg_database(dsn) as url:
        yield StorageSpec("postgres", db_url=url)


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator[Any]:
    """``make(spec=None, *, settings=None, announce=None, tls=None) -> RunningServer``."""
    started: list[RunningServer] = []
    count = 0

    def make(
        spec: StorageSpec | None = None,
        *,
        settings: Any = None,
        announce: Any = None,
        tls: tuple[Path, Path] | None = None,
    ) -> RunningServer:
        nonlocal count
        count += 1
        spec = spec or StorageSpec("sqlite", data_dir=tmp_path / f"server-{count}")
        server = RunningServer(spec, settings=settings, announce=announce, tls=tls)
        started.append(server)
        return server.start()

    yield make
    for server in started:
        server.stop()


@pytest.fixture
def server(server_factory: Any) -> RunningServer:
    """One running server on a fresh SQLite data dir."""
    return server_factory()
