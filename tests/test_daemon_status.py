"""What a person sees of the daemon from another terminal: `status` (state, running tasks, a loud
stall warning, in text and --json), the event channels through `workspace.subscribe`, and that a
daemon misses nothing written while it starts up."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from syncengine import Workspace, daemonctl, progress
from syncengine.daemon import jittered
from syncengine.testing import wait_until
from tests import daemonkit
from tests.daemonkit import Daemons, make_ws
from tests.helpers import REPO, run_proc

daemons = daemonkit.daemons  # the fixture

HOUR = 3600 * 10**9


@pytest.mark.parametrize(("state", "oldest_pending_h", "expect"), [
    ({"guard": "would delete 80% of the files"}, None, "safety guard is holding"),
    ({"unreachable_since": "2h"}, None, "unreachable since"),
    ({"unreachable_since": "0h"}, None, None),  # just went offline: not a stall yet
    ({"last_sync_at": "3h"}, 2, "local changes have waited 2 h"),
    ({"last_sync_at": "3h", "paused": True}, 2, "daemon is paused"),
    ({"last_sync_at": "3h", "last_sync_ok": False, "last_error": "HTTP 500"}, 2, "last error: HTTP 500"),
    ({"last_sync_at": "30h"}, None, None),  # an old last sync with nothing waiting is simply up to date
], ids=["guard", "unreachable-long", "unreachable-just-now", "pending-old", "paused", "failing", "quiet"])
def test_stall_reasons(state, oldest_pending_h, expect):
    """Syncing is stalled when a guard holds, the server is long unreachable, or changes wait too long."""
    now = 1_000 * HOUR
    state = {k: now - int(v[:-1]) * HOUR if k in ("unreachable_since", "last_sync_at") else v
             for k, v in state.items()}
    oldest = now - oldest_pending_h * HOUR if oldest_pending_h is not None else None
    why = daemonctl.stall_reason(state, oldest, stall_after=600, now_ns=now)
    assert (why is None) if expect is None else (expect in why)


def test_status_says_loudly_when_syncing_stalled_and_shows_running_tasks(tmp_path: Path, server):
    """`status` prints the stall in text and --json, and any process's running task with its progress."""
    root = make_ws(tmp_path / "w", server=server, token=server.token("docs"), files={"a.txt": "a"})
    with Workspace(root) as ws:
        ws.journal.update_state(unreachable_since=time.time_ns() - 2 * HOUR)
        with progress.Task(ws.events, "upload", "upload 10 item(s)", 10, throttle=0) as task:
            task.update(3)
            text = run_proc("-C", root, "status").stdout
            data = json.loads(run_proc("-C", root, "status", "--json").stdout)
    assert "Syncing has stalled" in text and "unreachable since" in text
    assert "unreachable since" in data["sync"]["stalled"]
    assert "upload 10 item(s) 3/10" in text
    [shown] = data["daemon"]["tasks"]
    assert (shown["kind"], shown["current"], shown["total"], shown["state"]) == ("upload", 3, 10, "running")
    with Workspace(root) as ws:
        assert ws.daemon_info().tasks == ()  # finished


def test_subscribe_with_a_callback_and_as_an_iterator(tmp_path: Path):
    """`workspace.subscribe(channel, callback)` calls back from a thread; without one it iterates."""
    root = make_ws(tmp_path / "w")
    got = []
    with Workspace(root) as ws:
        with ws.subscribe("zones", got.append), ws.subscribe(["processing"]) as sub:
            progress.publish(ws.events, "zones", [progress.zones_payload("doc.json", ["title"], origin="local")])
            progress.publish(ws.events, "log", [progress.log_payload("info", "x", "not subscribed")])
            progress.publish(ws.events, "processing", [progress.processing_payload("doc.json", "queued")])
            wait_until(lambda: got, timeout=10, message="the callback")
            event = sub.get(timeout=10)
        assert [e.channel for e in got] == ["zones"] and got[0].payload["fields"] == ["title"]
        assert event is not None and event.channel == "processing" and event.payload["status"] == "queued"


def test_rescans_are_jittered_around_their_interval():
    """The hourly safety rescan lands within ±10% of the hour, not at the same instant for every daemon."""
    delays = {jittered(3600.0) for _ in range(50)}
    assert all(3240.0 <= d <= 3960.0 for d in delays) and len(delays) > 1


@pytest.mark.integration
def test_nothing_written_during_start_up_is_missed(tmp_path: Path, daemons: Daemons):
    """Files written from the moment the daemon holds its lock until well after it watches are all journaled."""
    root = make_ws(tmp_path / "w", files={f"old/{i}.txt": str(i) for i in range(300)})
    daemons.run(root)  # returns once it holds the lock: watcher and catch-up scan still to come
    written = 0
    while daemons.state(root).get("state") != "watching" or written < 50:
        (root / f"new-{written}.txt").write_text(str(written))
        written += 1
        time.sleep(0.005)  # pacing, not waiting: a few hundred files over the start-up, not tens of thousands

    def all_journaled() -> bool:
        with Workspace(root) as ws:
            return sum(1 for p in ws.journal.local_index() if p.startswith("new-")) == written

    wait_until(all_journaled, timeout=60, message=f"all {written} files written during start-up")


def test_daemon_log_is_rotated(tmp_path: Path):
    """daemon.log rolls over at 1 MiB and keeps three old files, so a long-running daemon cannot fill the disk."""
    root = make_ws(tmp_path / "w")
    script = ("import logging, sys; from pathlib import Path; from syncengine.daemon import _setup_logging; "
              "from syncengine.workspace import Layout; _setup_logging(Layout(Path(sys.argv[1])), to_stderr=False); "
              "log = logging.getLogger('syncengine.daemon'); [log.info('x' * 1000) for _ in range(6000)]")
    subprocess.run([sys.executable, "-c", script, str(root)], cwd=REPO, check=True, timeout=120)
    logs = sorted(p.name for p in (root / ".syncengine").glob("daemon.log*"))
    assert logs == ["daemon.log", "daemon.log.1", "daemon.log.2", "daemon.log.3"]
    assert all((root / ".syncengine" / name).stat().st_size <= 1 << 20 for name in logs)


def test_events_prints_past_events_per_channel(tmp_path: Path):
    """`events -n N [--channel]` prints the last events, one line each (or one JSON object per line)."""
    root = make_ws(tmp_path / "w")
    with Workspace(root) as ws:
        progress.publish(ws.events, "zones", [progress.zones_payload("doc.json", ["title"], origin="local")])
        progress.publish(ws.events, "log", [progress.log_payload("warning", "rescan", "lost events")])
    text = run_proc("-C", root, "events", "-n", "5").stdout
    assert "zones" in text and "doc.json  title  (local)" in text and "warning: lost events" in text
    lines = run_proc("-C", root, "events", "--channel", "log", "--json").stdout.splitlines()
    assert [json.loads(line)["payload"]["code"] for line in lines] == ["rescan"]


@pytest.mark.integration
def test_an_edited_syncignore_applies_at_once(tmp_path: Path, daemons: Daemons):
    """Adding a pattern to .syncignore while the daemon runs: files it names are no longer journaled."""
    root = make_ws(tmp_path / "w", files={"keep.txt": "k"})
    daemons.start(root)
    wait_until(lambda: daemons.state(root).get("state") == "watching", timeout=30, message="the daemon to watch")
    (root / ".syncignore").write_text("*.log\n")

    def journaled(rel: str) -> bool:
        with Workspace(root) as ws:
            return ws.journal.doc_by_path(rel) is not None

    wait_until(lambda: journaled(".syncignore"), timeout=30, message=".syncignore journaled")
    (root / "build.log").write_text("noise")
    (root / "after.txt").write_text("written after the log")
    wait_until(lambda: journaled("after.txt"), timeout=30, message="the file written after the log")
    assert not journaled("build.log")


def test_a_sync_round_reports_hash_download_merge_and_upload_tasks(tmp_path: Path, server):
    """Each stage of a round is a task with total and current on the progress channel, for any process to read."""
    token = server.token("docs")
    a = make_ws(tmp_path / "A", server=server, token=token, files={f"a{i}.json": f'{{"n": {i}}}' for i in range(12)})
    b = make_ws(tmp_path / "B", server=server, token=token, files={"b.txt": "b"})
    with Workspace(a) as ws:
        tracker = progress.SyncProgress(ws.events)
        ws.sync(progress=tracker)
        tracker.close()
    (b / "new.md").write_text("written after init: hashed by the round's scan")
    with Workspace(b) as ws:
        sub = ws.subscribe("progress", after=0)
        tracker = progress.SyncProgress(ws.events)
        ws.sync(progress=tracker)
        tracker.close()
        done = {}
        while (event := sub.get(timeout=1)) is not None:
            if event.payload["state"] == "done":
                done[event.payload["kind"]] = (event.payload["current"], event.payload["total"])
        sub.close()
    assert done["hash"] == (1, 1), done  # new.md
    assert done["download"] == (12, 12) and done["merge"] == (12, 12), done
    assert done["upload"] == (2, 2), done  # b.txt and new.md
