"""The early walk (syncengine.early): a fresh `status` or `sync` process walks in a forked child while it imports.

Real processes on real files: the walk's outcome is read from the trace
line SYNCENGINE_TRACE_EARLY writes, never from timings. The twin tests run
the same edits on two workspaces made alike, one scanned with the early
walk and one without (SYNCENGINE_EARLY=0), and compare what they journal.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from syncengine import Workspace, early, scanner
from syncengine.locks import FileLock
from syncengine.testing import backdate, make_tree
from tests.forkkit import here_or_alone, in_child, open_folder, owned_by_nobody
from tests.helpers import REPO, cli_env

pytestmark = pytest.mark.integration

FILES = early.COPY_BYTES_MIN // 90 + 100  # a stamps copy big enough (~100 bytes an entry with these names)


def _tree() -> dict[str, str]:
    names = {i: f"doc{i:05d}.json" for i in (0, 1, 2, 5)}  # the files _edit changes
    return {f"d{i % 7}/s{i % 3}/{names.get(i, f'a-document-with-a-longer-name-{i:05d}.json')}":
            f'{{"n": {i}, "pad": "{"x" * (i % 50)}"}}\n' for i in range(FILES)}


def _workspace(root: Path) -> Path:
    """A workspace of FILES files, scanned twice (the second writes the stamps copy the child reads)."""
    make_tree(root, _tree())
    backdate(root)
    ws, _report = Workspace.init(root)
    ws.close()
    with Workspace(root) as ws:
        ws.scan()
    time.sleep(0.05)  # the journal's last write well before the next process starts
    return root


def _start(root: Path, *args: str, **env: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "cli", "-C", str(root), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=REPO,
                            env=cli_env(SYNCENGINE_TRACE_EARLY="1", **env))


def _run(root: Path, *args: str, **env: str) -> tuple[int, str, list[str]]:
    """(exit code, stdout, the early walk's outcomes) of `syncengine -C ROOT ARGS` in a fresh process."""
    proc = _start(root, *args, **env)
    out, err = proc.communicate(timeout=120)
    return proc.returncode, out, _outcomes(err)


def _outcomes(err: str) -> list[str]:
    prefix = "syncengine: early walk "
    return [line[len(prefix):] for line in err.splitlines() if line.startswith(prefix)]


def _journaled(root: Path) -> list[tuple]:
    con = sqlite3.connect(root / ".syncengine" / "journal.db")
    try:
        return con.execute("SELECT path, hash, size, kind, mode, base_path FROM document ORDER BY path, base_path"
                           ).fetchall()
    finally:
        con.close()


def _status(out: str) -> dict:
    """What a status says, less its timing and where it ran."""
    status = json.loads(out)
    status["scan"].pop("seconds")
    return {key: status[key] for key in ("files", "pending", "pending_paths", "errors", "scan")}


def _edit(root: Path) -> None:
    """Changes, a deletion, a move, a new file, an ignored file and a newly ignored folder."""
    (root / "d0/s0/doc00000.json").write_text('{"n": 0, "edited": true}\n')
    (root / "d1/s1/doc00001.json").unlink()
    os.rename(root / "d2/s2/doc00002.json", root / "d2/moved.json")
    (root / "d3/new.json").write_text('{"new": 1}\n')
    (root / "d4/scratch.swp").write_text("ignored\n")
    (root / "d5/s2/doc00005.json").chmod(0o755)


def test_a_status_takes_the_early_walk_and_finds_what_a_walk_would(tmp_path: Path):
    """The early walk is used, and the status it gives and the journal it leaves are a plain walk's."""
    mine, plain = _workspace(tmp_path / "a"), _workspace(tmp_path / "b")
    for root in (mine, plain):
        _edit(root)
    time.sleep(0.05)
    code, out, outcomes = _run(mine, "status", "--json")
    assert code == 0 and outcomes == ["used"]
    code, plain_out, plain_outcomes = _run(plain, "status", "--json", SYNCENGINE_EARLY="0")
    assert code == 0 and plain_outcomes == []
    assert _status(out) == _status(plain_out)
    scan = _status(out)["scan"]
    assert scan["moved"] == [["d2/s2/doc00002.json", "d2/moved.json"]] and scan["deleted"] == ["d1/s1/doc00001.json"]
    assert scan["created"] == ["d3/new.json"] and scan["modified"] == ["d0/s0/doc00000.json", "d5/s2/doc00005.json"]
    assert _journaled(mine) == _journaled(plain)
    # And the next one too (its walk compares with the stamps this one journaled).
    time.sleep(0.05)
    code, out, outcomes = _run(mine, "status", "--json")
    assert code == 0 and outcomes == ["used"]
    assert _status(out) == _status(_run(plain, "status", "--json", SYNCENGINE_EARLY="0")[1])
    assert _journaled(mine) == _journaled(plain)


def test_a_sync_with_the_early_walk_pushes_what_one_without_it_pushes(kit, shared_server):
    """Twin replicas on two server workspaces, the same edits: the same round, and the same server state."""
    from tests.synckit import Kit

    twin = Kit(kit.tmp / "twin", shared_server)
    replicas = [kit.replica(_tree()), twin.replica(_tree())]
    for replica in replicas:
        backdate(replica.root)
        replica.sync()
        replica.status()  # this process's round left the stamps copy stale
        _edit(replica.root)
    time.sleep(0.05)
    code, out, outcomes = _run(replicas[0].root, "sync", "--json")
    assert code == 0 and outcomes == ["used"]
    code, plain_out, plain_outcomes = _run(replicas[1].root, "sync", "--json", SYNCENGINE_EARLY="0")
    assert code == 0 and plain_outcomes == []
    mine, plain = json.loads(out), json.loads(plain_out)
    for key in ("pushed", "deleted", "moved", "downloaded", "problems"):
        assert mine[key] == plain[key], key
    assert sorted(mine["pushed"]) == ["d0/s0/doc00000.json", "d1/s1/doc00001.json", "d2/moved.json", "d3/new.json",
                                      "d5/s2/doc00005.json"]
    assert _server_paths(kit) == _server_paths(twin)


def _server_paths(kit) -> list[tuple]:
    return sorted((c.path, c.hash or "", c.deleted, c.executable) for c in kit.log())


def test_an_unreadable_folder_is_reported_and_its_files_kept_as_by_a_plain_walk(request: pytest.FixtureRequest):
    """A folder the walk cannot search: its files are problems, never deletions, early walk or not.

    As root the scans run as `nobody` in forked children (in a folder of /tmp: pytest's tmp_path sits
    in folders closed to others), as in test_scanner; beside another thread, in a fresh pytest process."""
    if not here_or_alone(request):
        return
    with open_folder("se-early-") as top:
        _unreadable_folder(top)


def _unreadable_folder(tmp_path: Path) -> None:
    roots = [_workspace(tmp_path / "a"), _workspace(tmp_path / "b")]
    user = owned_by_nobody(tmp_path)  # root searches any folder: then the scans run as nobody
    for root in roots:
        (root / "d6/s0").chmod(0o444)
    try:
        time.sleep(0.05)
        mine = _scan_as(roots[0], user, ahead=True)
        plain = _scan_as(roots[1], user, ahead=False)
    finally:
        for root in roots:
            (root / "d6/s0").chmod(0o755)
    assert mine.pop("outcomes") == ["used"] and plain.pop("outcomes") == []
    assert mine == plain
    assert mine["deleted"] == [] and mine["problems"]
    assert all(reason == "cannot stat: Permission denied" for _path, reason in mine["problems"])
    assert _journaled(roots[0]) == _journaled(roots[1])


def _scan_as(root: Path, user: int | None, *, ahead: bool) -> dict:
    """A fresh process's scan of ``root`` as ``user``, its walk started ahead or not: a fork of this one."""

    def scan() -> dict:
        if ahead:
            assert early.start(str(root))
        with Workspace(root) as ws:
            report = ws.scan()
        return {"outcomes": early.outcomes, "deleted": list(report.deleted), "files": report.files,
                "problems": sorted([p.path, p.reason] for p in report.problems)}

    out = in_child(scan, user)
    out["problems"] = [tuple(p) for p in out["problems"]]
    return out


def _blocked_then(root: Path, lock: str, change, *args: str) -> tuple[str, list[str]]:
    """Run a command while this test holds ``lock``; once its child has walked, make ``change``, then let it go."""
    with FileLock(root / ".syncengine" / lock, lock).acquire(timeout=0):
        proc = _start(root, *args)
        time.sleep(1.0)  # the child walks in milliseconds; the process waits for the lock
        change()
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    return out, _outcomes(err)


def test_a_walk_made_before_another_process_scanned_is_discarded(kit):
    """Another process journals a change while the walk's process waits for the sync lock: it walks again."""
    replica = kit.replica(_tree())
    backdate(replica.root)
    replica.sync()
    root = replica.root
    replica.status()  # this process's round left the stamps copy stale: the next walk would be refused for it
    time.sleep(0.05)
    code, _out, outcomes = _run(root, "sync")
    assert code == 0 and outcomes == ["used"]

    def another_process_scans() -> None:
        (root / "d0/s0/doc00000.json").write_text('{"edited": 1}\n')
        with Workspace(root) as ws:
            assert ws.scan().modified == ("d0/s0/doc00000.json",)

    out, outcomes = _blocked_then(root, "sync.lock", another_process_scans, "sync", "--json")
    assert outcomes == ["discarded: the journal was written since the child started"]
    assert json.loads(out)["pushed"] == ["d0/s0/doc00000.json"]
    out, outcomes = _blocked_then(root, "scan.lock", lambda: _write_journal(root), "status", "--json")
    assert outcomes == ["discarded: the journal was written since the child started"]
    assert _status(out)["scan"]["modified"] == []


def _write_journal(root: Path) -> None:
    """A commit that moves no stamp (another process saving sync state), as the journal's own writer would."""
    with Workspace(root) as ws:
        ws.journal.update_state(last_error="a commit meanwhile")


def test_a_walk_made_under_other_ignore_rules_is_discarded(tmp_path: Path):
    root = _workspace(tmp_path / "a")
    (root / "d0/s0/doc00000.json").write_text('{"edited": 1}\n')

    def ignore_d0() -> None:
        (root / ".syncignore").write_text("d0/\n")

    out, outcomes = _blocked_then(root, "scan.lock", ignore_d0, "status", "--json")
    assert outcomes == ["discarded: the ignore rules changed"]
    assert _status(out)["scan"]["modified"] == []  # the edit is under a folder now ignored


def test_a_walk_that_saw_the_gap_of_a_killed_apply_is_discarded(tmp_path: Path):
    """A file a killed apply set aside is put back when the journal opens, after the child walked past its gap:
    the walk is refused, and the file is never read as deleted."""
    from syncengine.fsops import trash_dir

    root = _workspace(tmp_path / "a")
    aside = trash_dir(root) / "killed-apply" / "d0/s0/doc00000.json"
    aside.parent.mkdir(parents=True)
    os.rename(root / "d0/s0/doc00000.json", aside)
    time.sleep(0.05)
    code, out, outcomes = _run(root, "status", "--json")
    assert code == 0
    assert outcomes == ["discarded: an apply set files aside or had them put back since the child started"]
    assert _status(out)["scan"]["deleted"] == [] and (root / "d0/s0/doc00000.json").exists()
    time.sleep(0.05)
    assert _run(root, "status")[2] == ["used"]  # the trash is empty and still again


def test_a_child_that_dies_is_reaped_and_the_scan_walks_itself(tmp_path: Path):
    root = _workspace(tmp_path / "a")
    (root / "d0/s0/doc00000.json").write_text('{"edited": 1}\n')
    time.sleep(0.05)
    code, out, outcomes = _run(root, "status", "--json", SYNCENGINE_FAILPOINT="early.walk")
    assert code == 0
    assert outcomes == ["discarded: the child failed (status 9)"]
    assert _status(out)["scan"]["modified"] == ["d0/s0/doc00000.json"]


def test_no_child_for_a_small_workspace_nor_with_armed_faults_nor_without_a_scan_time(tmp_path: Path):
    small = tmp_path / "small"
    make_tree(small, {"a.json": "{}\n"})
    Workspace.init(small)[0].close()
    assert _run(small, "status")[2] == []
    root = _workspace(tmp_path / "a")
    assert _run(root, "status", SYNCENGINE_FSFAULT="write:1000:EIO")[2] == []
    assert _run(root, "status", SYNCENGINE_EARLY="0")[2] == []
    # No scan time left by a writing scan (a journal older than the marker): no racy bound to walk with.
    marker = root / ".syncengine" / early.SCANNED
    marker.unlink()
    assert _run(root, "status")[2] == []
    (root / "d0/s0/doc00000.json").write_text('{"edited": 1}\n')
    assert _run(root, "status")[2] == []  # this scan writes: it leaves the marker
    assert marker.exists()
    time.sleep(0.05)
    assert _run(root, "status")[2] == ["used"]


def test_a_stale_copy_or_a_moved_stamp_rejects_the_walk(tmp_path: Path):
    """The checks themselves, on a walk made here: the copy's token, the racy bound, the shape."""
    root = _workspace(tmp_path / "a")
    ahead = scanner.walk_ahead(str(root))
    assert ahead is not None
    with Workspace(root) as ws:
        journal = ws.journal
        with journal.reading():
            racy = (journal.state()["last_scan_ns"] or 0) - scanner.RACY_NS
            ahead = (*ahead[:3], time.time_ns() + 10**9, *ahead[4:])  # as if the child started just now
            assert scanner._early_reject(ahead, root, journal, ws.ignore, racy) is None
            assert scanner._early_reject(ahead, tmp_path, journal, ws.ignore, racy) == "another root"
            stale = (*ahead[:2], "0123456789abcdef", *ahead[3:])
            assert scanner._early_reject(stale, root, journal, ws.ignore, racy) \
                == "the journal's stamps changed since the child read them"
            assert scanner._early_reject(ahead, root, journal, ws.ignore, racy - 1) \
                == "its racy bound is not the scan's"
            broken = (*ahead[:6], ({}, [], 0), *ahead[7:])
            assert scanner._early_reject(broken, root, journal, ws.ignore, racy) == "the child's walk is malformed"


def test_the_child_never_outlives_a_killed_parent(tmp_path: Path):
    """SIGKILL the parent while it waits for a lock: its child, waiting to hand its walk over, dies with it."""
    root = _workspace(tmp_path / "a")
    # Enough changes that the child's answer fills the pipe: it waits for the parent to read it.
    for rel in list(_tree())[::2]:
        (root / rel).write_text("{}\n")
    with FileLock(root / ".syncengine" / "scan.lock", "scan").acquire(timeout=0):
        proc = _start(root, "status")
        time.sleep(1.0)
        children = _children(proc.pid)
        assert len(children) == 1
        proc.kill()
        proc.communicate(timeout=30)
        deadline = time.monotonic() + 10
        while _alive(children[0]) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(children[0])


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    if not path.exists():
        pytest.skip("no /proc children list")
    return [int(p) for p in path.read_text().split()]


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"
