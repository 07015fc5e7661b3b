"""Two workspaces through a real `syncengine serve` over the real CLI, on SQLite and on PostgreSQL.

Everything here is a real process, as a person would run it: `serve` (with
``--data`` or ``--db postgresql://...``), `token create`, `init`, and each
`sync`. These are the main paths only — a first sync, a round of every kind of
change each way, a conflict, and a sync killed mid-round then run again; the
many variations run in-process on SQLite in test_sync*.py. Two `serve` processes
on one PostgreSQL carry one workspace too. The PostgreSQL
variants run when SYNCENGINE_TEST_PG_DSN is set (`.ci/run` sets it).
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from syncengine.remote import HttpRemote
from syncengine.testing import make_tree, read_tree
from tests.helpers import CliResult, cli_env, run_proc
from tests.replicas import ServeProcess
from tests.synckit import no_duplicate_revisions

pytestmark = pytest.mark.integration

WS = "team"

DOCS = {
    "notes/today.md": "# Today\n\nbuy milk\n",
    "notes/old.md": "an old note\n",
    "data/config.json": '{\n  "name": "demo",\n  "size": 3,\n  "owner": "ana"\n}\n',
    "data/list.yaml": "items:\n  - one\n  - two\n",
    "image.bin": bytes(range(256)) * 4,
}


class Side:
    """One workspace folder driven through `syncengine` subprocesses."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def run(self, *args: str, **env: str) -> CliResult:
        return run_proc("-C", self.root, *args, env=cli_env(**env))

    def sync(self, *args: str) -> dict[str, Any]:
        """`sync --json` that must succeed; its summary."""
        result = self.run("sync", "--json", *args)
        assert result.code == 0, f"sync in {self.root.name} exited {result.code}: {result.stderr}"
        return result.json()

    def tree(self) -> dict[str, bytes]:
        return read_tree(self.root)

    def journal_ok(self) -> bool:
        con = sqlite3.connect(self.root / ".syncengine" / "journal.db")
        try:
            return con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        finally:
            con.close()


class Served:
    """A `syncengine serve` process on one storage, and workspaces made with the real `init`."""

    def __init__(self, server: ServeProcess, tmp: Path) -> None:
        self.server, self.tmp = server, tmp
        self.token = server.token(WS)

    def workspace(self, name: str, files: dict[str, Any] | None = None, *, via_env: bool = False) -> Side:
        """`syncengine init` with the token in a file (or in SYNCENGINE_TOKEN)."""
        root = self.tmp / name
        make_tree(root, files or {})
        root.mkdir(exist_ok=True)
        args = ["init", str(root), "--server", self.server.url, "--workspace", WS, "--json"]
        if via_env:
            result = run_proc(*args, env=cli_env(SYNCENGINE_TOKEN=self.token))
        else:
            token_file = self.tmp / f"{name}.token"
            token_file.write_text(self.token + "\n")
            result = run_proc(*args, "--token-file", str(token_file))
        assert result.code == 0, result.stderr
        assert result.json()["files"] == len(files or {})
        return Side(root)

    def log(self) -> list[Any]:
        """The server's whole change log for the workspace, oldest first."""
        out: list[Any] = []
        with HttpRemote(self.server.url, WS, self.token) as remote:
            since = 0
            while True:
                page = remote.changes(since, 1000)
                out += page.changes
                if not page.more:
                    return out
                since = page.changes[-1].seq


@pytest.fixture
def served(storage, tmp_path) -> Iterator[Served]:
    """`syncengine serve --data DIR` or `--db postgresql://...` (the ``storage`` parameter)."""
    data = storage.data_dir or tmp_path / "unused-data"
    with ServeProcess(data, tmp_path / "serve.log", "--log-level", "warning", db_url=storage.db_url) as server:
        yield Served(server, tmp_path)


def _nothing_to_do(summary: dict[str, Any]) -> bool:
    return not (summary["pushed"] or summary["downloaded"] or summary["deleted"] or summary["moved"])


def test_two_workspaces_converge_with_every_kind_of_change(served):
    """A first sync fills an empty B; then a create/edit/delete/rename round each way lands on the other side."""
    a = served.workspace("a", DOCS)
    b = served.workspace("b", via_env=True)
    assert sorted(a.sync()["pushed"]) == sorted(DOCS)
    first = b.sync()
    assert sorted(first["downloaded"]) == sorted(DOCS) and b.tree() == a.tree()

    for here, there, gone, moved in ((a, b, "notes/old.md", ("data/list.yaml", "data/list-a.yaml")),
                                     (b, a, "new/a.txt", ("data/list-a.yaml", "data/list-b.yaml"))):
        name = here.root.name
        make_tree(here.root, {f"new/{name}.txt": f"made in {name}\n",
                              "notes/today.md": f"# Today\n\nedited in {name}\n"})
        (here.root / gone).unlink()
        os.rename(here.root / moved[0], here.root / moved[1])
        pushed = here.sync()
        assert not pushed["conflicts"] and not pushed["problems"]
        assert len(pushed["pushed"]) == 4  # created, modified, deleted, moved: one revision each
        pulled = there.sync()
        assert not pulled["conflicts"] and not pulled["problems"]
        assert pulled["downloaded"] and pulled["deleted"] and pulled["moved"] == [list(moved)]
        assert there.tree() == here.tree()

    tree = a.tree()
    assert tree == b.tree() and set(tree) == {"notes/today.md", "data/config.json", "data/list-b.yaml",
                                              "image.bin", "new/b.txt"}
    assert _nothing_to_do(a.sync()) and _nothing_to_do(b.sync())
    log = served.log()
    no_duplicate_revisions(log)
    assert len(log) == len(DOCS) + 2 * 4


def test_concurrent_edits_merge_or_keep_both(served):
    """Different fields of one document merge; the same line edited both ways keeps both versions."""
    a = served.workspace("a", DOCS)
    b = served.workspace("b")
    a.sync()
    b.sync()
    config = json.loads(DOCS["data/config.json"])
    make_tree(a.root, {"data/config.json": json.dumps({**config, "size": 4}, indent=2) + "\n",
                       "notes/today.md": "# Today\n\nbuy oat milk (a)\n"})
    make_tree(b.root, {"data/config.json": json.dumps({**config, "name": "renamed"}, indent=2) + "\n",
                       "notes/today.md": "# Today\n\nbuy soy milk (b)\n"})
    a.sync()
    summary = b.sync()
    assert sorted((c["path"], c["kind"]) for c in summary["conflicts"]) == [
        ("data/config.json", "both-modified"), ("notes/today.md", "both-modified")]
    assert summary["open_conflicts"] == 0
    a.sync()
    b.sync()
    tree = a.tree()
    assert tree == b.tree()
    merged = json.loads(tree["data/config.json"])
    assert (merged["size"], merged["name"]) == (4, "renamed")
    notes = {data for path, data in tree.items() if path.startswith("notes/today")}
    assert notes == {b"# Today\n\nbuy oat milk (a)\n", b"# Today\n\nbuy soy milk (b)\n"}  # a copy beside it
    assert _nothing_to_do(a.sync()) and _nothing_to_do(b.sync())


@pytest.mark.parametrize("point", ["apply.after_temp", "push.after_commit"])
def test_a_sync_killed_mid_round_is_finished_by_the_next(served, point):
    """SIGKILLed while writing a download or right after its commit landed: the next sync converges exactly."""
    files = {"x.md": "x v1\n", "y.md": "y v1\n", "z.md": "z v1\n", "w.md": "w v1\n"}
    a = served.workspace("a", files)
    b = served.workspace("b")
    a.sync()
    b.sync()
    make_tree(b.root, {"x.md": "x v2 by b\n"})
    (b.root / "y.md").unlink()
    b.sync()
    make_tree(a.root, {"z.md": "z v2 by a\n", "n.md": "new by a\n"})
    before = a.tree()
    expected = {"x.md": b"x v2 by b\n", "z.md": b"z v2 by a\n", "w.md": b"w v1\n", "n.md": b"new by a\n"}

    killed = a.run("sync", SYNCENGINE_FAILPOINT=point)
    assert killed.code == -signal.SIGKILL, f"{point} was never reached: {killed.stdout}{killed.stderr}"
    assert a.journal_ok()
    for path, data in a.tree().items():
        assert data in (before.get(path), expected.get(path)), f"{path} holds bytes it never had: {data!r}"
    assert a.tree()["z.md"] == b"z v2 by a\n" and a.tree()["n.md"] == b"new by a\n"

    a.sync()
    b.sync()
    assert a.tree() == b.tree() == expected
    assert _nothing_to_do(a.sync()) and _nothing_to_do(b.sync())
    log = served.log()
    no_duplicate_revisions(log)
    assert len(log) == 4 + 2 + 2  # the first upload, b's edit and deletion, a's edit and creation


def test_tokens_are_stored_hashed_and_open_only_their_workspace(storage):
    """`token create` on either storage keeps no token in the database; a token opens its workspace only."""
    from syncengine.server.storage import Storage

    tokens = {}
    for ws in ("one", "two"):
        result = run_proc("token", "create", "-w", ws, *storage.cli_args())
        assert result.code == 0, result.stderr
        tokens[ws] = result.stdout.strip()
    db = Storage(storage.db_url, storage.data_dir)
    try:
        with db.db.connection_context():
            rows = [str(row) for row in db.m.Token.select().tuples()]
        assert len(rows) == 2 and not any(token in row for row in rows for token in tokens.values())
        assert db.authenticate(tokens["one"])[1] == "one" and db.authenticate(tokens["two"])[1] == "two"
        assert db.authenticate(tokens["one"] + "x") is None
    finally:
        db.close()


@pytest.mark.postgres
def test_two_serve_processes_on_one_postgresql_carry_one_workspace(pg_dsn, tmp_path):
    """A syncs through one `serve`, B through another, both on the same PostgreSQL: they converge exactly."""
    with (
        ServeProcess(tmp_path / "d1", tmp_path / "serve-1.log", "--log-level", "warning", db_url=pg_dsn) as one,
        ServeProcess(tmp_path / "d2", tmp_path / "serve-2.log", "--log-level", "warning", db_url=pg_dsn) as two,
    ):
        served = Served(one, tmp_path)
        a = served.workspace("a", DOCS)
        served.server = two  # B is made against, and syncs through, the second server
        b = served.workspace("b")
        a.sync()
        assert sorted(b.sync()["downloaded"]) == sorted(DOCS)
        make_tree(b.root, {"notes/today.md": "# Today\n\nfrom b via two\n", "b.md": "b\n"})
        (b.root / "notes/old.md").unlink()
        b.sync()
        make_tree(a.root, {"data/list.yaml": "items:\n  - one\n  - two\n  - three (a via one)\n"})
        a.sync()
        b.sync()
        assert a.tree() == b.tree() and b"from b via two" in a.tree()["notes/today.md"]
        assert _nothing_to_do(a.sync()) and _nothing_to_do(b.sync())
        log = served.log()
        no_duplicate_revisions(log)
        assert [c.seq for c in log] == list(range(1, len(DOCS) + 4 + 1))
