"""Real daemons on temp folders and a real server: live sync with no command typed, kill -9 and
catch up, lifecycle (start/stop/status, stale pid), pause/resume, offline queueing, lost events."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from syncengine import Workspace, daemonctl
from syncengine.locks import FileLock
from syncengine.testing import wait_until
from syncengine.workspace import Layout
from tests import daemonkit
from tests.daemonkit import Daemons, Follower, make_ws
from tests.helpers import REPO, run_proc

pytestmark = pytest.mark.integration
daemons = daemonkit.daemons  # the fixture


def _text(path: Path) -> str | None:
    try:
        return path.read_text()
    except FileNotFoundError:
        return None


def _pair(tmp_path: Path, server, daemons: Daemons, files: dict | None = None) -> tuple[Path, Path]:
    token = server.token("docs")
    a = make_ws(tmp_path / "A", server=server, token=token, files=files)
    b = make_ws(tmp_path / "B", server=server, token=token)
    daemons.start(a)
    daemons.start(b)
    wait_until(lambda: daemons.state(a).get("live") == "connected" and daemons.state(b).get("live") == "connected",
               timeout=15, message="both daemons to subscribe to live updates")
    return a, b


def test_lifecycle_start_twice_status_stop_and_stale_pid(tmp_path: Path, daemons: Daemons):
    """start detaches; a second start says it runs; run refuses (exit 7); stop ends it in seconds;
    a stale pid file does not block the next start."""
    root = make_ws(tmp_path / "w", files={"a.txt": "a"})
    pid = daemons.start(root)
    again = run_proc("-C", root, "daemon", "start")
    assert again.code == 0 and f"already running (pid {pid})" in again.stdout
    busy = subprocess.run([sys.executable, "-m", "cli", "-C", str(root), "daemon", "run"], cwd=REPO,
                          capture_output=True, text=True, timeout=30)
    assert busy.returncode == 7 and "already running" in busy.stderr
    # The daemon says "starting" until its watcher runs; status answers at once either way.
    wait_until(lambda: json.loads(run_proc("-C", root, "status", "--json").stdout)["daemon"]["watcher"]
               == "inotify", timeout=10, message="the daemon's watcher in status")
    status = json.loads(run_proc("-C", root, "status", "--json").stdout)["daemon"]
    assert status["running"] and status["pid"] == pid and status["watcher"] == "inotify"
    assert json.loads(run_proc("-C", root, "daemon", "status", "--json").stdout)["pid"] == pid
    assert f"(pid {pid}" in run_proc("-C", root, "daemon", "status").stdout
    assert run_proc("-C", root, "daemon", "stop").code == 0
    assert daemonctl.running_pid(Layout(root).daemon_pid) is None and daemonctl.exited(pid)
    assert "daemon stopped" in Layout(root).daemon_log.read_text()  # ended cleanly, not SIGKILLed
    assert "Daemon: not running" in run_proc("-C", root, "daemon", "status").stdout
    Layout(root).daemon_pid.write_text("999999\n")  # a pid file a killed daemon left behind
    new_pid = daemons.start(root)
    assert new_pid != 999999
    wait_until(lambda: "Daemon: watching" in run_proc("-C", root, "status").stdout, timeout=10,
               message="the restarted daemon watching")
    assert "daemon started" in Layout(root).daemon_log.read_text()


def test_an_edit_in_a_appears_in_b_with_no_command_typed(tmp_path: Path, server, daemons: Daemons):
    """Two daemons stay in step live: create, edit, delete on either side reach the other."""
    a, b = _pair(tmp_path, server, daemons, files={"notes/first.md": "one"})
    wait_until(lambda: _text(b / "notes/first.md") == "one", timeout=10, message="the initial file in B")
    (a / "doc.json").write_text('{"title": "hello"}\n')
    wait_until(lambda: _text(b / "doc.json") == '{"title": "hello"}\n', timeout=10, message="A's new file in B")
    for i in range(3):
        (a / "doc.json").write_text(f'{{"title": "v{i}"}}\n')
        wait_until(lambda i=i: _text(b / "doc.json") == f'{{"title": "v{i}"}}\n', timeout=10,
                   message=f"edit {i} in B")
    (b / "from-b.txt").write_text("b")
    wait_until(lambda: _text(a / "from-b.txt") == "b", timeout=10, message="B's file in A")
    os.unlink(a / "notes/first.md")
    wait_until(lambda: not (b / "notes/first.md").exists(), timeout=10, message="the deletion in B")
    with Workspace(a) as ws:
        status = ws.status()
    assert status.pending.total == 0 and status.sync.stalled is None and status.daemon.live == "connected"
    with Workspace(b) as ws:  # B's daemon knew its own writes by their stat: nothing echoed back as local
        assert {e.origin for e in ws.log("doc.json", None)} == {"remote"}


def test_events_follow_shows_zone_updates_for_a_json_edit(tmp_path: Path, server, daemons: Daemons):
    """`events --follow --channel zones` shows the fields a JSON edit changed, locally and on the other side."""
    doc = '{"title": "a", "zones": [{"id": "z1", "text": "x"}, {"id": "z2", "text": "y"}]}\n'
    a, b = _pair(tmp_path, server, daemons, files={"doc.json": doc})
    wait_until(lambda: _text(b / "doc.json") == doc, timeout=10, message="the document in B")
    here, there = Follower(a, "--channel", "zones"), Follower(b, "--channel", "zones")
    try:
        (a / "doc.json").write_text(doc.replace('"text": "y"', '"text": "edited"'))
        local = here.expect(lambda e: e["payload"]["path"] == "doc.json" and e["payload"]["fields"] != ["$"])
        remote = there.expect(lambda e: e["payload"]["path"] == "doc.json" and e["payload"]["fields"] != ["$"])
    finally:
        here.close()
        there.close()
    assert local["channel"] == "zones" and local["payload"]["fields"] == ["zones[id=z2].text"]
    assert local["payload"]["origin"] == "local"
    assert remote["payload"]["fields"] == ["zones[id=z2].text"] and remote["payload"]["origin"] == "remote"


def test_a_daemon_killed_with_sigkill_catches_up_on_restart(tmp_path: Path, server, daemons: Daemons):
    """After kill -9, edits made here and on the server meanwhile are exchanged once it runs again."""
    token = server.token("docs")
    a = make_ws(tmp_path / "A", server=server, token=token, files={"a.txt": "v1", "b.txt": "v1"})
    b = make_ws(tmp_path / "B", server=server, token=token)
    proc = daemons.run(a)
    daemons.start(b)
    wait_until(lambda: _text(b / "a.txt") == "v1", timeout=10, message="the first sync")
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    (a / "a.txt").write_text("edited while A's daemon was dead")
    (a / "new.txt").write_text("created while dead")
    (b / "b.txt").write_text("edited in B meanwhile")
    wait_until(lambda: server.storage.changes(server.storage.workspace_id("docs"), 0, 100)["last_seq"] >= 3,
               timeout=10, message="B's edit on the server")
    daemons.start(a)  # the dead daemon's pid file is stale; its lock went with it
    wait_until(lambda: _text(b / "a.txt") == "edited while A's daemon was dead" and _text(b / "new.txt")
               == "created while dead", timeout=15, message="A's offline edits in B")
    wait_until(lambda: _text(a / "b.txt") == "edited in B meanwhile", timeout=15, message="B's edit in A")


def test_pause_holds_syncing_and_resume_releases_it(tmp_path: Path, server, daemons: Daemons):
    """`daemon pause` keeps changes queued (still journaled); `daemon resume` sends them at once."""
    a, b = _pair(tmp_path, server, daemons)
    assert run_proc("-C", a, "daemon", "pause").code == 0
    wait_until(lambda: daemons.state(a).get("sync") in ("paused", "idle"), timeout=5, message="the pause")
    (a / "held.txt").write_text("queued")
    with Workspace(a) as ws:
        sub = ws.subscribe("processing")
        with sub:
            (a / "held2.txt").write_text("queued too")
            event = sub.get(timeout=10)
    assert event is not None and event.payload["status"] == "queued"
    wait_until(lambda: daemons.state(a).get("sync") == "paused", timeout=5, message="the daemon to hold")
    assert not (b / "held.txt").exists()
    status = json.loads(run_proc("-C", a, "status", "--json").stdout)
    assert status["daemon"]["paused"] and status["pending"]["created"] == 2
    assert run_proc("-C", a, "daemon", "resume").code == 0
    wait_until(lambda: _text(b / "held2.txt") == "queued too", timeout=10, message="the queued changes in B")


def test_never_two_syncs_at_once_with_the_cli(tmp_path: Path, server, daemons: Daemons):
    """While another process holds the sync lock the daemon neither syncs nor reads files (an apply
    may be half-done); it waits its turn, then journals and sends what changed meanwhile."""
    a, b = _pair(tmp_path, server, daemons)
    lock = FileLock(Layout(a).sync_lock, "sync").acquire(timeout=5)
    try:
        (a / "x.txt").write_text("waits for the lock")
        assert run_proc("-C", a, "daemon", "resume").code == 0  # a nudge: the daemon tries a round now
        wait_until(lambda: daemons.state(a).get("sync") == "waiting for another sync", timeout=15,
                   message="the daemon to wait for the lock")
        assert not (b / "x.txt").exists()
        with Workspace(a) as ws:
            assert ws.journal.doc_by_path("x.txt") is None  # held back, not journaled mid-sync
    finally:
        lock.release()
    wait_until(lambda: _text(b / "x.txt") == "waits for the lock", timeout=15, message="the sync after release")


def test_offline_changes_stay_queued_and_go_out_when_the_server_returns(tmp_path: Path, server, daemons: Daemons):
    """With the server down the daemon keeps journaling, says it is offline, and catches up after."""
    a, b = _pair(tmp_path, server, daemons)
    server.stop()
    (a / "offline.txt").write_text("written offline")
    wait_until(lambda: daemons.state(a).get("sync") == "offline", timeout=15, message="A to notice")
    assert daemons.state(a).get("live") in ("offline", "connecting")
    server.restart()
    wait_until(lambda: _text(b / "offline.txt") == "written offline", timeout=20, message="the queued edit in B")
    wait_until(lambda: daemons.state(a).get("live") == "connected", timeout=15, message="live updates again")


def test_inotify_overflow_leads_to_a_rescan_and_a_warning(tmp_path: Path, daemons: Daemons):
    """A stopped daemon misses a storm (kernel queue overflow); it warns, rescans, and misses nothing."""
    limit = int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())
    if limit > 65536:
        pytest.skip(f"fs.inotify.max_queued_events is {limit}: too many files to write for an overflow")
    # The storm's folder exists (and is watched) before the daemon stops reading its queue: a
    # folder created meanwhile would be walked whole on its creation event, overflow or not.
    root = make_ws(tmp_path / "w", files={"keep.txt": "k", "storm/seed.txt": "s"})
    pid = daemons.start(root)
    wait_until(lambda: daemons.state(root).get("state") == "watching", timeout=30, message="the daemon to watch")
    count = limit // 3 + 500  # each file: create, modify, close: more events than the queue holds
    os.kill(pid, signal.SIGSTOP)  # nothing reads the inotify queue now
    try:
        for i in range(count):
            (root / "storm" / f"f{i}.txt").write_text(str(i))
    finally:
        os.kill(pid, signal.SIGCONT)
    count += 1  # seed.txt

    def all_journaled() -> bool:
        with Workspace(root) as ws:
            return len([p for p in ws.journal.local_index() if p.startswith("storm/")]) == count

    wait_until(all_journaled, timeout=60, message="every file of the storm journaled")

    def rescan_warning() -> dict | None:
        with Workspace(root) as ws:
            notes = [e.payload for e in ws.recent_events(200, "log")]
        return next((n for n in notes if n["code"] == "rescan" and n["level"] == "warning"), None)

    # The rescan journals first and warns after, so the warning may trail the last file a moment.
    warning = wait_until(rescan_warning, timeout=30, message="the rescan's warning on the log channel")
    assert "overflow" in warning["message"]
    assert "overflow" in Layout(root).daemon_log.read_text().lower()
    with Workspace(root) as ws:
        info = ws.daemon_info()
    assert info.warning and "overflow" in info.warning


def test_an_edit_another_process_journaled_is_synced_at_once(tmp_path: Path, server, daemons: Daemons):
    """`status` scans first: an edit it journals before the watcher's look (the tracker then finds the
    file unchanged) is still synced at once, not at the next poll an hour later."""
    token = server.token("docs")
    slow_poll = {"daemon": {"poll_interval": 3600.0}}
    a = make_ws(tmp_path / "A", server=server, token=token, files={".syncignore": ".git/\n"}, config=slow_poll)
    b = make_ws(tmp_path / "B", server=server, token=token, config=slow_poll)
    daemons.start(a)
    daemons.start(b)
    wait_until(lambda: daemons.state(a).get("live") == "connected" and daemons.state(b).get("live") == "connected",
               timeout=15, message="both daemons to subscribe to live updates")
    # Past its start-up autosave (whose scan would journal x.txt before `status` does).
    wait_until(lambda: daemons.state(a).get("state") == "watching", timeout=15, message="A's daemon to watch")
    (a / ".git").mkdir()
    (a / ".git/index.lock").write_text("")  # the tracker holds the edit back; `status` does not
    (a / "x.txt").write_text("journaled by status")
    assert json.loads(run_proc("-C", a, "status", "--json").stdout)["errors"] == []
    # Journaled now, by this `status` (or by the daemon's start-up autosave scan when it raced the
    # writes above), never by the tracker, which is held back; `status` may even find it pushed
    # already, by the daemon that saw the journal move: that is the behaviour under test.
    with Workspace(a) as ws:
        assert ws.journal.doc_by_path("x.txt") is not None
    os.unlink(a / ".git/index.lock")
    wait_until(lambda: _text(b / "x.txt") == "journaled by status", timeout=20, message="the edit in B")


@pytest.mark.parametrize("when", ["periodic rescan", "start-up catch-up"])
def test_a_scan_that_cannot_journal_is_retried_and_the_daemon_goes_on(tmp_path: Path, daemons: Daemons, when):
    """A full scan kept waiting for the scan lock past sync.wait (a long CLI sync), at start-up or later, is
    an error notice and a retry, never the daemon's end: once the lock is free, what was written meanwhile is
    journaled."""
    root = make_ws(tmp_path / "w", files={"keep.txt": "k"},
                   config={"sync": {"wait": 0.5}, "daemon": {"rescan_interval": 1.0}})
    lock = FileLock(root / ".syncengine" / "scan.lock", "scan")

    def failed() -> dict | None:
        with Workspace(root) as ws:
            notes = [e.payload for e in ws.recent_events(100, "log")]
        return next((n for n in notes if n["code"] == "journal-failed"), None)

    if when == "periodic rescan":
        daemons.start(root)
        wait_until(lambda: daemons.state(root).get("state") == "watching", timeout=30, message="the daemon to watch")
    with lock.acquire(timeout=0):
        if when == "start-up catch-up":
            daemons.start(root)
        note = wait_until(failed, timeout=30, message=f"the {when}'s failure to get the scan lock")
        assert "Busy" in note["message"] and "rescan" in note["message"]
        (root / "during.txt").write_text("written while the daemon could not journal\n")

    def journaled() -> bool:
        with Workspace(root) as ws:
            return "during.txt" in ws.journal.local_index()

    wait_until(journaled, timeout=60, message="the file written meanwhile journaled after the retry")
    wait_until(lambda: daemons.state(root).get("state") == "watching", timeout=30, message="the daemon to watch")
    os.kill(daemons.state(root)["pid"], 0)  # still running
