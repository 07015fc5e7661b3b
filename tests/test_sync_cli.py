"""`syncengine sync` through the real CLI: plan, JSON, progress, and the exit-code contract."""

from __future__ import annotations

import os
import pty
import socket
import sqlite3
import subprocess
import sys

import pytest

from tests.helpers import REPO, cli_env
from tests.synckit import Kit, Replica, assert_converged, converge, no_duplicate_revisions

pytestmark = pytest.mark.integration


def _journal_dump(replica: Replica, *, state: bool = True) -> list[str]:
    """Every row of the journal as SQL; ``state=False`` leaves out sync_state (a scan stamps it)."""
    con = sqlite3.connect(replica.root / ".syncengine" / "journal.db")
    try:
        return [line for line in con.iterdump() if state or not line.startswith('INSERT INTO "sync_state"')]
    finally:
        con.close()


def _state_bytes(replica: Replica) -> dict[str, bytes]:
    """Every file under .syncengine/ (journal.db, its -wal and -shm, events.db, objects/...), byte for byte."""
    state = replica.root / ".syncengine"
    return {str(p.relative_to(state)): p.read_bytes() for p in sorted(state.rglob("*")) if p.is_file()}


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
    state = _state_bytes(b)
    assert "journal.db" in state
    result = b.cli("sync", "--dry-run")
    assert result.code == 0, result.stderr
    for expected in ("push", "new.md", "moved/move.md", "pull", "edit.md", "gone.md"):
        assert expected in result.stdout
    as_json = b.cli("sync", "--dry-run", "--json")
    plan = {(p["path"], p["action"]) for p in as_json.json()["plan"]}
    assert {("new.md", "push"), ("moved/move.md", "push"), ("edit.md", "pull"), ("gone.md", "pull")} <= plan
    assert (b.tree(), _stamps(b)) == files and _journal_dump(b) == journal and kit.log() == log
    assert _state_bytes(b) == state  # the journal files themselves are byte-identical
    assert b.leftovers() == []


def test_json_summary_is_one_document_and_nothing_else(pending):
    """--json prints one JSON document naming what moved each way; stderr stays empty (run from a subfolder)."""
    from tests.helpers import run_cli

    _a, b = pending
    result = run_cli("-C", b.root / "moved", "sync", "--json")
    assert result.code == 0 and result.stderr == ""
    summary = result.json()
    assert sorted(summary["pushed"]) == ["moved/move.md", "new.md"]
    assert summary["downloaded"] == ["edit.md"] and summary["deleted"] == ["gone.md"]
    assert summary["dry_run"] is False and summary["open_conflicts"] == 0 and summary["problems"] == []


def _on_a_terminal(*args: str) -> tuple[int, bytes, bytes]:
    """Run `syncengine ARGS` with stderr on a pseudo-terminal: (exit code, stdout, what the terminal got)."""
    master, slave = pty.openpty()
    try:
        proc = subprocess.run([sys.executable, "-m", "cli", *args], stdout=subprocess.PIPE,
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
    return proc.returncode, proc.stdout, seen


def test_progress_bar_only_on_a_terminal(kit):
    """A terminal on stderr gets a progress bar; --json on a terminal and a pipe get nothing extra."""
    import json

    a = kit.replica({f"f{i}.txt": f"{i}\n" for i in range(5)})
    code, _out, seen = _on_a_terminal("-C", str(a.root), "sync")
    assert code == 0 and b"push" in seen and b"5/5" in seen
    a.write("f1.txt", "json\n")
    code, out, seen = _on_a_terminal("-C", str(a.root), "sync", "--json")
    assert code == 0 and seen.strip() == b"" and json.loads(out)["pushed"] == ["f1.txt"]
    a.write("f0.txt", "again\n")
    piped = a.proc("sync")
    assert piped.code == 0 and piped.stderr == "" and "Synced with" in piped.stdout


def test_unreachable_server_exits_3_and_keeps_every_change_queued(kit):
    """Server unreachable: exit 3 with one line, nothing changes locally, and the next sync sends it all."""
    a = kit.replica({"edit.md": "1\n", "gone.md": "g\n", "move.md": "m\n"})
    b = kit.replica()
    converge(a, b)
    a.write("edit.md", "2\n")
    a.write("new.md", "n\n")
    a.delete("gone.md")
    a.move("move.md", "moved/move.md")
    files = a.tree()
    for _ in range(2):  # still unreachable the second time: nothing is lost or sent twice
        result = a.cli("sync", env={"SYNCENGINE_SERVER": _dead_url()})
        assert result.code == 3 and result.stderr.count("\n") == 1 and "unreachable" in result.stderr.lower()
        assert a.tree() == files
    status = a.status()
    pending = status.pending
    assert (pending.created, pending.modified, pending.deleted, pending.moved) == (1, 1, 1, 1)
    assert status.sync.last_sync_ok is False and status.sync.unreachable_since
    assert a.cli("sync").code == 0
    b.sync()
    assert assert_converged(a, b) == {"edit.md": b"2\n", "new.md": b"n\n", "moved/move.md": b"m\n"}
    no_duplicate_revisions(kit.log())


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


def test_a_dry_run_the_guard_would_stop_exits_6_and_shows_the_plan(kit):
    """--dry-run predicts the real run: the plan, the guard's reason and exit 6; with --force, exit 0."""
    a = kit.replica(_many(20))
    a.sync()
    for i in range(15):
        a.delete(f"d/{i:02d}.txt")
    log = kit.log()
    result = a.cli("sync", "--dry-run")
    assert result.code == 6, result.stderr
    assert "would stop" in result.stdout and "15 of 20" in result.stdout and "d/00.txt" in result.stdout
    as_json = a.cli("sync", "--dry-run", "--json")
    assert as_json.code == 6 and "15 of 20" in as_json.json()["guard"] and len(as_json.json()["plan"]) == 15
    forced = a.cli("sync", "--dry-run", "--force", "--json")
    assert forced.code == 0 and forced.json()["guard"] is None
    assert kit.log() == log and len(a.tree()) == 5 and a.status().sync.guard is None


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
    lock_path = a.root / ".syncengine" / "sync.lock"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from syncengine.locks import FileLock; "
         "FileLock(sys.argv[1], 'sync').acquire(5); print('held', flush=True); time.sleep(60)", str(lock_path)],
        stdout=subprocess.PIPE, cwd=REPO, env=cli_env())
    try:
        assert holder.stdout.readline() == b"held\n"
        result = a.proc("sync", "--wait", "0.3")
        assert result.code == 7 and result.stderr.count("\n") == 1 and "lock" in result.stderr
        assert kit.log() == []
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
    assert a.cli("sync").code == 0 and len(kit.log()) == 1


@pytest.mark.parametrize("flags", [["--strategy", "bogus"], ["--max-delete", "150"], ["--wait", "-1"], ["--bogus"]],
                         ids=["strategy", "max-delete", "wait", "unknown"])
def test_bad_flags_exit_2_with_one_line(kit, flags):
    """A flag sync does not know, or a value out of range: exit 2, one line, nothing synced."""
    a = kit.replica({"a.md": "a\n"})
    result = a.cli("sync", *flags)
    assert result.code == 2 and result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert flags[0] in result.stderr and kit.log() == []


def test_outside_a_workspace_sync_exits_5(tmp_path):
    """`sync` in a folder that is no workspace: exit 5, one line."""
    from tests.helpers import run_cli

    result = run_cli("-C", tmp_path, "sync")
    assert result.code == 5 and result.stderr.count("\n") == 1 and "not inside a syncengine workspace" in result.stderr


def test_a_damaged_blob_store_stops_sync_with_exit_5_and_repair_lets_it_converge(kit):
    """A sync over a damaged objects/small.db exits 5 naming repair; after repair both edits go through."""
    a = kit.replica({"a.md": "a\n", "b.json": '{"b": 1}\n'})
    b = kit.replica()
    converge(a, b)
    table = a.root / ".syncengine" / "objects" / "small.db"
    with sqlite3.connect(table) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    for suffix in ("-wal", "-shm"):
        table.with_name(table.name + suffix).unlink(missing_ok=True)
    table.write_bytes(b"not a database" * 1000)
    a.write("a.md", "a, edited\n")
    b.write("b.json", '{"b": 2}\n')
    b.sync()
    result = a.cli("sync")
    assert result.code == 5 and "syncengine repair" in result.stderr and result.stderr.count("\n") == 1
    assert a.cli("repair").code == 0 and a.cli("sync").code == 0
    converge(a, b)
    assert assert_converged(a, b) == {"a.md": b"a, edited\n", "b.json": b'{"b": 2}\n'}


def test_a_damaged_journal_exits_5_naming_repair_then_repair_and_sync_lose_nothing(kit):
    """A garbage journal.db: sync exits 5 naming `syncengine repair`; after repair, sync keeps every version."""
    a = kit.replica({"same.md": "same\n", "edit.md": "v1\n"})
    b = kit.replica()
    converge(a, b)
    b.write("edit.md", "v2 by b\n")
    b.sync()
    a.write("edit.md", "v2 by a\n")
    a.write("new.md", "new on a\n")
    journal = a.root / ".syncengine" / "journal.db"
    for suffix in ("-wal", "-shm"):
        journal.with_name(journal.name + suffix).unlink(missing_ok=True)
    journal.write_bytes(b"not a database" * 500)
    log = kit.log()
    result = a.cli("sync")
    assert result.code == 5 and result.stderr.count("\n") == 1 and "syncengine repair" in result.stderr
    assert kit.log() == log
    assert a.cli("repair").code == 0
    synced = a.cli("sync", "--json")
    assert synced.code in (0, 1), synced.stderr
    converge(a, b)
    tree = assert_converged(a, b)
    assert {b"v2 by a\n", b"v2 by b\n", b"new on a\n", b"same\n"} <= set(tree.values())
    assert tree["same.md"] == b"same\n" and tree["new.md"] == b"new on a\n"


def test_a_crash_exits_70_with_the_traceback_only_in_crash_log(kit):
    """An internal error mid-round: exit 70, one line naming crash.log, no traceback; the changes stay queued."""
    a = kit.replica({"a.md": "a\n"})
    b = kit.replica()
    converge(a, b)
    a.write("a.md", "a v2\n")
    a.write("new.md", "new\n")
    result = a.proc("sync", SYNCENGINE_FAILPOINT="push.before_commit=raise")
    assert result.code == 70, result.stderr
    assert result.stderr.count("\n") == 1 and "crash.log" in result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    crash = (a.root / ".syncengine" / "crash.log").read_text()
    assert "Traceback" in crash and "failpoint push.before_commit reached" in crash
    assert a.status().pending.total == 2
    assert a.proc("sync").code == 0
    b.sync()
    assert assert_converged(a, b) == {"a.md": b"a v2\n", "new.md": b"new\n"}


def test_a_vanished_root_under_an_open_workspace_is_never_read_as_deletions(kit, tmp_path):
    """The folder moved away (or unmounted) under an open Workspace, as under the daemon: RootMissing, nothing sent."""
    from syncengine import Workspace
    from syncengine.errors import RootMissing

    a = kit.replica({"one.md": "1\n", "two.md": "2\n"})
    b = kit.replica()
    converge(a, b)
    log = kit.log()
    with Workspace(a.root) as ws:
        os.rename(a.root, tmp_path / "away")
        with pytest.raises(RootMissing) as info:
            ws.sync()
        assert info.value.exit_code == 6
        os.rename(tmp_path / "away", a.root)
        assert kit.log() == log
        report = ws.sync()
        assert not (report.pushed or report.deleted)
    b.sync()
    assert assert_converged(a, b) == {"one.md": b"1\n", "two.md": b"2\n"}


@pytest.mark.parametrize("status", [500, 503])
def test_a_failing_server_exits_3_and_the_changes_go_out_next_time(kit, status):
    """A server that answers 5xx every time: exit 3 with one line, nothing lost; once it recovers, all goes out."""
    from tests.server.conftest import FaultProxy

    proxy = FaultProxy(kit.server.url).start()
    try:
        a = kit.replica({"a.md": "a\n"}, url=proxy.url)
        proxy.fail(50, status)
        a.write("b.md", "b\n")
        # A real process: its stderr holds only what sync says (never this process's stray warnings).
        result = a.proc("sync")
        assert result.code == 3 and result.stderr.count("\n") == 1, result.stderr
        assert kit.log() == [] and a.status().pending.created == 2
        proxy.failures.clear()
        assert a.proc("sync").code == 0
    finally:
        proxy.stop()
    assert sorted(c.path for c in kit.log()) == ["a.md", "b.md"]


def test_a_local_workspace_is_connected_to_a_server_later_with_init(kit, tmp_path):
    """`init --server` on a workspace made without one connects it (history kept); a second server is refused."""
    from syncengine.testing import make_tree
    from tests.helpers import run_cli

    root = tmp_path / "local"
    make_tree(root, {"a.md": "a\n", "sub/b.json": '{"b": 1}\n'})
    assert run_cli("init", root).code == 0
    assert run_cli("-C", root, "snapshot", "-m", "before the server").code == 0
    refused = run_cli("-C", root, "sync")
    assert refused.code == 2 and "syncengine init --server" in refused.stderr
    token_file = tmp_path / "token"
    token_file.write_text(kit.server.token(kit.ws) + "\n")
    connect = ["init", root, "--server", kit.url, "--workspace", kit.ws, "--token-file", token_file]
    result = run_cli(*connect, "--json")
    assert result.code == 0, result.stderr
    assert result.json()["created"] is False and result.json()["workspace"] == kit.ws
    assert (root / ".syncengine" / "token").stat().st_mode & 0o777 == 0o600
    assert run_cli("-C", root, "sync").code == 0
    assert sorted(c.path for c in kit.log()) == ["a.md", "sub/b.json"]
    assert [s["message"] for s in run_cli("-C", root, "snapshots", "--json").json()] == ["before the server"]
    again = run_cli(*connect)
    assert again.code == 5 and "already" in again.stderr and again.stderr.count("\n") == 1
    assert run_cli("init", root).code == 5


def test_sync_prints_names_with_brackets_as_they_are(kit):
    """The plan, its conflict marks and the conflicts of a round show `notes [draft].md` verbatim."""
    a = kit.replica({"notes [draft].md": "v1\n"})
    b = kit.replica()
    converge(a, b)
    a.write("notes [draft].md", "v2 by a\n")
    a.sync()
    b.write("notes [draft].md", "v2 by b\n")
    plan = b.cli("sync", "--dry-run")
    assert plan.code == 0 and "notes [draft].md [both-modified]" in plan.stdout, plan.stdout
    done = b.cli("sync")
    assert done.code == 0 and "conflict both-modified notes [draft].md: " in done.stdout, done.stdout


def test_a_file_too_large_for_the_server_is_reported_and_the_rest_syncs(tmp_path, server_factory):
    """The server refuses one blob as too large (413): that file is named as a problem, every other change goes."""
    from syncengine.server.app import ServerSettings
    from syncengine.server.guard import Limits

    server = server_factory(settings=ServerSettings(limits=Limits(blob=(1 << 20) + 4096)))
    kit = Kit(tmp_path, server)
    a = kit.replica({"small.txt": "s\n", "big.bin": os.urandom(3 << 20)})
    b = kit.replica()
    for _ in range(2):  # and again: the refusal is not a reason to stall
        result = a.cli("sync", "--json")
        assert result.code == 0, result.stderr
        summary = result.json()
        assert summary["pushed"] in (["small.txt"], [])
        assert [p["path"] for p in summary["problems"]] == ["big.bin"]
        assert "too large" in summary["problems"][0]["reason"]
    assert [c.path for c in kit.log()] == ["small.txt"]
    assert a.status().pending.created == 1
    b.sync()
    assert b.tree() == {"small.txt": b"s\n"}


def test_a_dry_run_against_an_unreachable_server_exits_3_and_writes_nothing(kit):
    """--dry-run writes nothing even when it fails: the failure is not recorded in the journal."""
    a = kit.replica({"a.md": "a\n"})
    a.sync()
    a.write("a.md", "edited\n")
    a.status()
    state = _state_bytes(a)
    result = a.cli("sync", "--dry-run", env={"SYNCENGINE_SERVER": _dead_url()})
    assert result.code == 3 and result.stderr.count("\n") == 1
    assert _state_bytes(a) == state
    assert a.status().sync.last_sync_ok is True
