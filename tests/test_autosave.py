"""Autosave: the policy's thresholds on a simulated clock (DESIGN §3 defaults, distinct paths), then
the same thresholds holding in a real daemon process."""

from __future__ import annotations

from pathlib import Path

import pytest

from syncengine import Workspace
from syncengine.autosave import AutosavePolicy
from syncengine.config import AutosaveConfig
from syncengine.fsops import sha256
from syncengine.testing import wait_until
from tests import daemonkit
from tests.daemonkit import Daemons, make_ws

daemons = daemonkit.daemons  # the fixture


def _policy(**config) -> AutosavePolicy:
    return AutosavePolicy(AutosaveConfig(**config))


def test_first_change_snapshots_at_once_then_the_idle_timer_takes_the_rest():
    """No snapshot yet: the first change is saved at once; later ones wait for 30 s of quiet."""
    policy = _policy()
    assert policy.note(["a"], 0.0) == "first change since the daemon started"
    policy.taken(0.0)
    assert policy.note(["b"], 1.0) is None
    assert policy.next_deadline() == 31.0
    assert policy.note(["c"], 2.0) is None  # every change restarts the timer
    assert policy.due(31.5) is None
    assert policy.due(32.0) == "30s without changes"
    policy.taken(32.0)
    assert policy.next_deadline() is None and policy.due(100.0) is None


def test_ten_distinct_pending_paths_snapshot_at_once():
    """The count is of distinct paths: one path saved 50 times is one; the tenth distinct one triggers."""
    policy = _policy()
    policy.taken(0.0)
    for t in range(50):
        assert policy.note(["same.txt"], 0.01 * t) is None
    for i in range(8):
        assert policy.note([f"f{i}.txt"], 1.0) is None
    assert policy.note(["f8.txt"], 1.0) == "10 paths pending"


def test_five_seconds_after_the_last_snapshot_a_change_snapshots_at_once():
    """A change at least min_interval after the last snapshot is saved at once."""
    policy = _policy()
    policy.taken(10.0)
    assert policy.note(["a"], 14.9) is None
    assert policy.note(["a"], 15.0) == "5s since the last snapshot"


def test_thresholds_are_configurable():
    """max_pending, min_interval and idle come from the config."""
    policy = _policy(max_pending=2, min_interval=1.0, idle=3.0)
    policy.taken(0.0)
    assert policy.note(["a"], 0.5) is None and policy.next_deadline() == 3.5
    assert policy.note(["b"], 0.6) == "2 paths pending"


def test_a_thousand_saves_of_one_file_make_a_handful_of_snapshots():
    """1,000 saves over 10 s: one at the start, one per 5 s while they last, one once quiet."""
    policy = _policy()
    snapshots = 0
    now = 0.0
    for i in range(1000):
        now = i * 0.01
        if policy.note(["busy.txt"], now):
            policy.taken(now)
            snapshots += 1
    while policy.next_deadline() is not None:
        now = policy.next_deadline()
        if policy.due(now):
            policy.taken(now)
            snapshots += 1
    assert snapshots == 3  # t=0, t=5, then 30 s after the last save (the burst ended before t=10)


@pytest.mark.integration
def test_daemon_burst_of_a_thousand_saves_yields_a_handful_of_snapshots(tmp_path: Path, daemons: Daemons):
    """A real daemon, 1,000 saves of one file: every save ends up snapshotted, in a handful of snapshots."""
    root = make_ws(tmp_path / "w", files={"keep.txt": "k"}, config={"autosave": {"idle": 1.0}})
    with Workspace(root) as ws:
        ws.snapshot("before the daemon")
        before = {s.id for s in ws.snapshots()}
    daemons.start(root)
    wait_until(lambda: daemons.state(root).get("state") == "watching", timeout=30, message="the daemon to watch")
    for i in range(1000):
        (root / "busy.txt").write_text(f"save {i}")
    final = sha256(b"save 999")

    def all_saved() -> bool:
        with Workspace(root) as ws:
            row = ws.journal.doc_by_path("busy.txt")
            return row is not None and row.hash == final and ws.journal.unsnapshotted_count() == 0

    wait_until(all_saved, timeout=60, message="the last save journaled and snapshotted")
    with Workspace(root) as ws:
        auto = [s for s in ws.snapshots() if s.id not in before]
    assert auto and all(s.trigger == "auto" for s in auto)
    assert len(auto) <= 10  # a handful (one per 5 s of burst, plus first and last), never one per save


@pytest.mark.integration
def test_daemon_snapshots_when_ten_distinct_paths_are_pending(tmp_path: Path, daemons: Daemons):
    """With the timers out of reach (1 h), only the tenth distinct pending path triggers a snapshot."""
    root = make_ws(tmp_path / "w", files={"keep.txt": "k"},
                   config={"autosave": {"min_interval": 3600.0, "idle": 3600.0}})
    with Workspace(root) as ws:
        ws.snapshot("before the daemon")
    daemons.start(root)
    wait_until(lambda: daemons.state(root).get("state") == "watching", timeout=30, message="the daemon to watch")

    def snapshots() -> list:
        with Workspace(root) as ws:
            return ws.snapshots()

    start = len(snapshots())
    (root / "first.txt").write_text("1")  # the first change since the daemon started: saved at once
    wait_until(lambda: len(snapshots()) == start + 1, timeout=30, message="the first change's snapshot")
    for i in range(9):
        (root / f"f{i}.txt").write_text(str(i))

    def journaled(count: int) -> bool:
        with Workspace(root) as ws:
            return sum(1 for p in ws.journal.local_index() if p.startswith("f")) >= count

    wait_until(lambda: journaled(10), timeout=30, message="nine files journaled")
    assert len(snapshots()) == start + 1  # nine pending: below the threshold, timers an hour away
    (root / "tenth.txt").write_text("10")
    wait_until(lambda: len(snapshots()) == start + 2, timeout=30, message="the tenth path's snapshot")
    newest = snapshots()[0]
    assert newest.trigger == "auto" and newest.changed == 10 and "10 paths pending" in (newest.message or "")


@pytest.mark.integration
def test_a_failing_autosave_warns_and_the_daemon_goes_on_journaling(tmp_path: Path, daemons: Daemons):
    """A damaged blob table makes autosave fail: a warning (log channel, `daemon status`), and the daemon
    keeps watching and journaling (the failure used to end it)."""
    root = make_ws(tmp_path / "w", files={"keep.txt": "k"})
    with Workspace(root) as ws:
        ws.snapshot("before the daemon")
    table = root / ".syncengine" / "objects" / "small.db"
    table.unlink()
    for suffix in ("-wal", "-shm"):
        table.with_name(table.name + suffix).unlink(missing_ok=True)
    table.write_bytes(b"not a database" * 1000)
    daemons.start(root)
    wait_until(lambda: daemons.state(root).get("state") == "watching", timeout=30, message="the daemon to watch")
    (root / "first.txt").write_text("1")

    def warned() -> dict | None:
        with Workspace(root) as ws:
            notes = [e.payload for e in ws.recent_events(100, "log")]
        return next((n for n in notes if n["code"] == "autosave-failed"), None)

    note = wait_until(warned, timeout=30, message="the autosave's warning")
    assert "Blob store damaged" in note["message"] and "repair" in note["message"]
    (root / "second.txt").write_text("2")

    def journaled() -> bool:
        with Workspace(root) as ws:
            return {"first.txt", "second.txt"} <= set(ws.journal.local_index())

    wait_until(journaled, timeout=30, message="both files journaled while autosave fails")
    assert daemons.state(root).get("state") == "watching"
    with Workspace(root) as ws:
        assert "autosave failed" in (ws.daemon_info().warning or "")
