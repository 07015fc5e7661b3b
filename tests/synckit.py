"""Test kit for sync tests: replicas of one server workspace, driven like a person would.

A :class:`Replica` is a real workspace folder initialised against a real
server. It syncs through the public API (``Workspace.sync``, a fresh
Workspace each time, as each CLI call is), through the real CLI in this
process (:func:`tests.helpers.run_cli`), or as a real subprocess that a
failpoint may kill (:func:`tests.helpers.run_proc`).
"""

from __future__ import annotations

import itertools
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from syncengine import Workspace
from syncengine.config import Config
from syncengine.fsops import is_temp_name
from syncengine.testing import make_tree, read_tree
from tests.helpers import CliResult, cli_env, run_cli, run_proc

_names = itertools.count(1)


class Replica:
    """One replica: its folder, its server, and the ways to sync it."""

    def __init__(self, root: Path, url: str, token: str) -> None:
        self.root = root
        self.url = url
        self.token = token

    # ------------------------------------------------------------ syncing

    def sync(self, **kw: Any):
        """One round through the API; returns the SyncReport."""
        with Workspace(self.root) as ws:
            return ws.sync(**kw)

    def cli(self, *args: str, env: dict[str, str] | None = None) -> CliResult:
        """`syncengine -C ROOT ARGS` in this process."""
        return run_cli("-C", self.root, *args, env=env)

    def proc(self, *args: str, **env: str) -> CliResult:
        """`syncengine -C ROOT ARGS` as a subprocess, with extra environment."""
        return run_proc("-C", self.root, *args, env=cli_env(**env))

    def status(self):
        with Workspace(self.root) as ws:
            return ws.status()

    def repoint(self, url: str, token: str) -> None:
        """Talk to another server from now on (config.toml and the stored token)."""
        from syncengine.credentials import save_token

        config = Config.load(self.root / ".syncengine" / "config.toml")
        config.server.url = url
        config.save(self.root / ".syncengine" / "config.toml")
        save_token(self.root / ".syncengine" / "token", token)
        self.url, self.token = url, token

    # ------------------------------------------------------------ files

    def write(self, rel: str, data: str | bytes) -> None:
        make_tree(self.root, {rel: data})

    def read(self, rel: str) -> bytes:
        return (self.root / rel).read_bytes()

    def delete(self, rel: str) -> None:
        (self.root / rel).unlink()

    def move(self, old: str, new: str) -> None:
        (self.root / new).parent.mkdir(parents=True, exist_ok=True)
        os.rename(self.root / old, self.root / new)

    def chmod_x(self, rel: str, on: bool = True) -> None:
        path = self.root / rel
        mode = path.stat().st_mode
        path.chmod(mode | 0o111 if on else mode & ~0o111)

    def executable(self, rel: str) -> bool:
        return bool((self.root / rel).stat().st_mode & 0o100)

    def tree(self) -> dict[str, bytes]:
        return read_tree(self.root)

    def copies(self) -> list[str]:
        return sorted(p for p in self.tree() if ".conflict-" in p)

    # ------------------------------------------------------------ health

    def journal_ok(self) -> bool:
        con = sqlite3.connect(self.root / ".syncengine" / "journal.db")
        try:
            return con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        finally:
            con.close()

    def leftovers(self) -> list[str]:
        """Temp files anywhere, and files still set aside in the trash."""
        out = [str(p.relative_to(self.root)) for p in self.root.rglob("*") if is_temp_name(p.name)]
        trash = self.root / ".syncengine" / "trash"
        if trash.exists():
            out += [str(p.relative_to(self.root)) for p in trash.rglob("*") if p.is_file()]
        return out

    def rows(self, sql: str) -> list[tuple]:
        con = sqlite3.connect(self.root / ".syncengine" / "journal.db")
        try:
            return con.execute(sql).fetchall()
        finally:
            con.close()


def module_server(tmp_path_factory: Any) -> Iterator[Any]:
    """Body of a module-scoped fixture: one SQLite server for every test of a module.

    Starting a server costs more than most sync tests; each test still gets
    its own workspace on it (a Kit names a fresh one), so nothing is shared.
    """
    from tests.fixtures_server import RunningServer, StorageSpec

    server = RunningServer(StorageSpec("sqlite", data_dir=tmp_path_factory.mktemp("server"))).start()
    yield server
    server.stop()


class Kit:
    """Makes replicas of one fresh server workspace, under one tmp dir."""

    def __init__(self, tmp: Path, server: Any, url: str | None = None) -> None:
        self.tmp = tmp
        self.server = server
        self.url = url or server.url
        self.ws = f"team{next(_names)}"
        self.count = 0

    def replica(self, files: dict[str, Any] | None = None, *, name: str | None = None, url: str | None = None,
                token: str | None = None, retries: int = 1, **sync: Any) -> Replica:
        """A new replica holding ``files``, initialised against the server (not yet synced)."""
        self.count += 1
        root = self.tmp / (name or f"r{self.count}")
        make_tree(root, files or {})
        config = Config()
        config.server.retries = retries
        config.server.timeout = 10.0
        config.sync.wait = 5.0
        for key, value in sync.items():
            setattr(config.sync, key, value)
        token = token or self.server.token(self.ws)
        ws, _report = Workspace.init(root, server=url or self.url, name=self.ws, token=token, config=config)
        ws.close()
        return Replica(root, url or self.url, token)

    def log(self) -> list[Any]:
        """The server's whole change log for the workspace, oldest first."""
        remote = self.server.remote(self.ws)
        out: list[Any] = []
        since = 0
        while True:
            page = remote.changes(since, 1000)
            out += page.changes
            if not page.more:
                return out
            since = page.changes[-1].seq


def converge(*replicas: Replica, rounds: int = 2) -> None:
    """Sync every replica in turn, twice: what one pushed, all have pulled."""
    for _ in range(rounds):
        for replica in replicas:
            replica.sync()


def assert_converged(*replicas: Replica) -> dict[str, bytes]:
    """All replicas hold the same files, and one more round changes nothing anywhere."""
    first = replicas[0].tree()
    for other in replicas[1:]:
        assert other.tree() == first, f"{other.root.name} differs from {replicas[0].root.name}"
    for replica in replicas:
        report = replica.sync()
        assert not (report.downloaded or report.pushed or report.deleted or report.moved), report
    return first


def no_duplicate_revisions(log: list[Any]) -> None:
    """No document has two consecutive revisions with the same state: each user write landed once."""
    last: dict[str, tuple] = {}
    for change in log:
        state = (change.path, change.hash, change.deleted, change.executable)
        assert last.get(change.doc_id) != state, f"duplicated revision of {change.path}"
        last[change.doc_id] = state
