"""`syncengine sync` through the real CLI: plan, JSON, progress, and the exit-code contract."""

from __future__ import annotations

import os
import pty
import socket
import sqlite3
import subprocess
import sys

import pytest

from syncengine.locks import FileLock
from tests.helpers import REPO, cli_env
from tests.synckit import Kit, Replica, assert_converged, converge, module_server

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def shared_server(tmp_path_factory):
    """One SQLite server for the module; each test works in its own workspace on it."""
    yield from module_server(tmp_path_factory)


@pytest.fixture
def kit(tmp_path, shared_server):
    return Kit(tmp_path, shared_server)


def _journal_dump(replica: Replica, *, state: bool = True) -> list[str]:
    """Every row of the journal as SQL; ``state=False`` leaves out sync_state (a scan stamps it)."""
    con = sqlite3.connect(replica.root / ".syncengine" / "journal.db")
    try:
        return [line for line in con.iterdump() if state or not line.startswith('INSERT INTO "sync_state"')]
    finally:
        con.close()


def _stamps(replica: Replica) -> dict[str, tuple[int, int, int]]:
    out = {}
    for path in replica.root.rglob("*"):
        if ".syncengine" not in path.parts and path.is_file():
            st = path.stat()
            out[str(path.relative_to(replica.root))] = (st.st_size, st.st_mtime_ns, st.st_mode)
    return out


def _dead_url() -> str:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return f"http://127.0.0.1:{port}"


@pytest.fixture
def pending(kit):
    """Replicas a and b in step, then changes waiting on both sides: b has edits to push and to pull."""
    a = kit.replica({"keep.md": "k\n", "edit.md": "e1\n", "gone.md": "g\n", "move.md": "m\n"})
    b = kit.replica()
    converge(a, b)
    a.write("edit.md", "e2\n")
    a.delete("gone.md")
    a.sync()
    b.write("new.md", "made on b\n")
    b.move("move.md", "moved/move.md")
    return a, b


def test_dry_run_prints_the_plan_and_writes_nothing(kit, pending):
    """--dry-run lists every planned action and leaves files, journal and server exactly as they were."""
    _a, b = pending
    files, journal, log = (b.tree(), _stamps(b)), _journal_dump(b), kit.log()
    result = b.cli("sync", "--dry-run")
    assert result.code == 0, result.stderr
    for expected in ("push", "new.md", "moved/move.md", "pull", "edit.md", "gone.md"):
        assert expected in result.stdout
    as_json = b.cli("sync", "--dry-run", "--json")
    plan = {(p["path"], p["action"]) for p in as_json.json()["plan"]}
    assert {("new.md", "push"), ("moved/move.md", "push"), ("edit.md", "pull"), ("gone.md", "pull")} <= plan
    assert (b.tree(), _stamps(b)) == files and _journal_dump(b) == journal and kit.log() == log
    assert b.leftovers() == []


def test_json_summary_is_one_document_and_nothing_else(pending):
    """--json prints one JSON document naming what moved each way; stderr stays empty."""
    _a, b = pending
    result = b.cli("sync", "--json")
    assert result.code == 0 and result.stderr == ""
    summary = result.json()
    assert sorted(summary["pushed"]) == ["moved/move.md", "new.md"]
    assert summary["downloaded"] == ["edit.md"] and summary["deleted"] == ["gone.md"]
    assert summary["dry_run"] is False and summary["open_conflicts"] == 0 and summary["problems"] == []


def test_progress_bar_only_on_a_terminal(kit):
    """A terminal on stderr gets a progress bar; a pipe gets nothing extra."""
    a = kit.replica({f"f{i}.txt": f"{i}\n" for i in range(5)})
    master, slave = pty.openpty()
    try:
        proc = subprocess.run([sys.executable, "-m", "cli", "-C", str(a.root), "sync"], stdout=subprocess.PIPE,
                              stderr=slave, env=cli_env(TERM="xterm", COLUMNS="100"), cwd=REPO, timeout=60)
        os.close(slave)
        slave = -1
        seen = b""
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:
                break
            if not chunk:
                break
            seen += chunk
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)
    assert proc.returncode == 0 and b"push" in seen and b"5/5" in seen
    a.write("f0.txt", "again\n")
    piped = a.proc("sync")
    assert piped.code == 0 and piped.stderr == "" and "Synced with" in piped.stdout


def test_unreachable_server_exits_3_and_keeps_every_change_queued(kit):
    """Server unreachable: exit 3 with one line, nothing changes locally, and the next sync sends it all."""
    a = kit.replica({"edit.md": "1\n", "gone.md": "g\n"})
    b = kit.replica()
    converge(a, b)
    a.write("edit.md", "2\n")
    a.write("new.md", "n\n")
    a.delete("gone.md")
    result = a.cli("sync", env={"SYNCENGINE_SERVER": _dead_url()})
    assert result.code == 3 and result.stderr.count("\n") == 1 and "unreachable" in result.stderr.lower()
    status = a.status()
    assert (status.pending.created, status.pending.modified, status.pending.deleted) == (1, 1, 1)
    assert status.sync.last_sync_ok is False and status.sync.unreachable_since
    assert a.cli("sync").code == 0
    b.sync()
    assert assert_converged(a, b) == {"edit.md": b"2\n", "new.md": b"n\n"}


@pytest.mark.parametrize("how", ["wrong", "revoked"])
def test_refused_token_exits_4_and_changes_nothing(kit, how):
    """A wrong or revoked token: exit 4, one line, and the workspace is left exactly as it was."""
    from syncengine.server.admin import create_token, revoke_token

    info, token = create_token(kit.server.storage, kit.ws)
    a = kit.replica({"a.md": "a\n"}, token=token)
    a.sync()
    a.write("a.md", "changed\n")
    env = None
    if how == "wrong":
        env = {"SYNCENGINE_TOKEN": "x" * 43}
    else:
        revoke_token(kit.server.storage, info.id)
    a.status()  # journal the edit first: what we compare is what sync alone would change
    files, journal, log = a.tree(), _journal_dump(a, state=False), kit.log()
    result = a.cli("sync", env=env)
    assert result.code == 4 and result.stderr.count("\n") == 1 and "token" in result.stderr
    assert a.tree() == files and _journal_dump(a, state=False) == journal and kit.log() == log
    assert a.status().pending.modified == 1


def _many(n: int) -> dict[str, str]:
    return {f"d/{i:02d}.txt": f"file {i}\n" for i in range(n)}


@pytest.mark.parametrize("override", ["--force", "--max-delete=80"])
def test_pushing_mass_deletions_stops_with_exit_6(kit, override):
    """Deleting 15 of 20 files locally stops the push (exit 6, server untouched) until --force or a higher limit."""
    a = kit.replica(_many(20))
    b = kit.replica()
    converge(a, b)
    for i in range(15):
        a.delete(f"d/{i:02d}.txt")
    log = kit.log()
    result = a.cli("sync")
    assert result.code == 6 and "15 of 20" in result.stderr and kit.log() == log
    assert a.status().sync.guard and a.cli("sync").code == 6
    assert a.cli("sync", override).code == 0
    b.sync(force=True)
    assert len(b.tree()) == 5 and a.status().sync.guard is None


def test_applying_mass_deletions_from_the_server_stops_with_exit_6(kit):
    """Deletions pulled from the server that would empty most of this replica stop until --force."""
    a = kit.replica(_many(20))
    b = kit.replica()
    converge(a, b)
    for i in range(12):
        a.delete(f"d/{i:02d}.txt")
    assert a.cli("sync", "--force").code == 0
    result = b.cli("sync")
    assert result.code == 6 and "here" in result.stderr and len(b.tree()) == 20
    assert b.cli("sync", "--force").code == 0 and len(b.tree()) == 8


@pytest.mark.parametrize("deleted,trips", [(10, False), (11, True)])
def test_the_guard_needs_more_than_ten_files_too(kit, deleted, trips):
    """Above 50% is not enough: the guard trips only above 10 files as well."""
    a = kit.replica(_many(12))
    a.sync()
    for i in range(deleted):
        a.delete(f"d/{i:02d}.txt")
    assert a.cli("sync").code == (6 if trips else 0)


def test_an_emptied_root_is_never_read_as_deletions(kit):
    """A workspace whose files all vanished (emptied or unmounted) pushes no deletion without --force."""
    a = kit.replica({"one.md": "1\n", "two.md": "2\n", "sub/three.md": "3\n"})
    b = kit.replica()
    converge(a, b)
    for name in ("one.md", "two.md", "sub/three.md"):
        a.delete(name)
    result = a.cli("sync")
    assert result.code == 6 and "emptied" in result.stderr
    b.sync()
    assert len(b.tree()) == 3
    a.write("one.md", "1\n")
    a.write("two.md", "2\n")
    a.write("sub/three.md", "3\n")
    assert a.cli("sync").code == 0
    converge(a, b)
    assert len(assert_converged(a, b)) == 3


def test_a_second_concurrent_sync_exits_7_after_waiting(kit):
    """While another process holds the workspace's sync lock, sync waits --wait seconds, then exits 7."""
    a = kit.replica({"a.md": "a\n"})
    lock = FileLock(a.root / ".syncengine" / "sync.lock", "sync")
    lock_path = a.root / ".syncengine" / "sync.lock"
    assert lock_path.parent.is_dir()
    with lock.acquire(1):
        result = a.cli("sync", "--wait", "0.3")
    assert result.code == 7 and result.stderr.count("\n") == 1
    assert a.cli("sync").code == 0
