"""The change tracker turns raw watcher events into the right journal entries (Maestral's
test_clean_local_events style: one table row per editor habit), and the watcher feeds it."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from syncengine import Workspace
from syncengine.fsops import sha256, write_atomic
from syncengine.models import LocalChange, Op
from syncengine.testing import backdate, make_tree, wait_until
from syncengine.tracker import ChangeTracker, Pending, RawEvent

C, M, D, MV, CL, AT = "created", "modified", "deleted", "moved", "closed", "attrib"


def ev(kind: str, path: str, dest: str | None = None, is_dir: bool = False) -> RawEvent:
    return RawEvent(kind, path, dest, is_dir)


def write(rel: str, data: str = "new") -> Callable[[Path], None]:
    return lambda root: (root / rel).parent.mkdir(parents=True, exist_ok=True) or (root / rel).write_text(data)


def seq(*steps: Callable[[Path], None]) -> Callable[[Path], None]:
    def run(root: Path) -> None:
        for step in steps:
            step(root)
    return run


def rename(a: str, b: str) -> Callable[[Path], None]:
    return lambda root: os.replace(root / a, root / b)


def remove(rel: str) -> Callable[[Path], None]:
    return lambda root: os.unlink(root / rel)


def nothing(root: Path) -> None:
    return None


def many_writes(root: Path) -> None:
    for i in range(300):
        (root / "busy.txt").write_text(f"version {i}")


def move_dir_out(root: Path) -> None:
    shutil.move(root / "d", root.parent / "outside")


def move_dir_in(root: Path) -> None:
    make_tree(root.parent / "incoming", {"a.md": "a", "b.md": "b"})
    shutil.move(root.parent / "incoming", root / "e")


@dataclass
class Case:
    name: str
    act: Callable[[Path], None]
    events: list[RawEvent]
    expect: list[tuple]  # (op, path) or (op, path, old_path)
    before: dict = field(default_factory=lambda: {"doc.json": '{"title": "old"}\n', "a.txt": "a",
                                                   "d/x.txt": "x", "d/y.txt": "y", "run.sh": "echo"})


CASES = [
    Case("atomic save: temp file renamed over the document is one modification (dest_path)",
         seq(write("doc.json.tmp123", '{"title": "new"}\n'), rename("doc.json.tmp123", "doc.json")),
         [ev(C, "doc.json.tmp123"), ev(M, "doc.json.tmp123"), ev(CL, "doc.json.tmp123"),
          ev(MV, "doc.json.tmp123", "doc.json")],
         [(M, "doc.json")]),
    Case("atomic save through an ignored temp name (.swp) still lands on dest_path",
         seq(write(".doc.json.swp", '{"title": "new"}\n'), rename(".doc.json.swp", "doc.json")),
         [ev(C, ".doc.json.swp"), ev(MV, ".doc.json.swp", "doc.json")],
         [(M, "doc.json")]),
    Case("vim backup save (rename to doc~, write doc, delete doc~) is a modification, not a delete",
         seq(rename("a.txt", "a.txt~"), write("a.txt", "vim wrote this"), remove("a.txt~")),
         [ev(MV, "a.txt", "a.txt~"), ev(C, "a.txt"), ev(M, "a.txt"), ev(CL, "a.txt"), ev(D, "a.txt~")],
         [(M, "a.txt")]),
    Case("created then deleted within the window cancels out",
         seq(write("flash.txt"), remove("flash.txt")),
         [ev(C, "flash.txt"), ev(M, "flash.txt"), ev(D, "flash.txt")],
         []),
    Case("300 writes of one file are one look and one entry",
         many_writes, [ev(M, "busy.txt")] * 900, [(C, "busy.txt")]),
    Case("create + write + close is one creation", write("new.json", "{}"),
         [ev(C, "new.json"), ev(M, "new.json"), ev(CL, "new.json")], [(C, "new.json")]),
    Case("a rename is a move (the document keeps its id)", rename("a.txt", "b.txt"),
         [ev(MV, "a.txt", "b.txt")], [(MV, "b.txt", "a.txt")]),
    Case("a delete is journaled after a second look", remove("a.txt"), [ev(D, "a.txt")], [(D, "a.txt")]),
    Case("editor droppings and the engine's folder are ignored",
         seq(write("4913"), write(".a.txt.swp"), write(".#a.txt"), write("~$report.docx"), write("a.txt~"),
             write(".syncengine/scratch")),
         [ev(C, "4913"), ev(C, ".a.txt.swp"), ev(C, ".#a.txt"), ev(C, "~$report.docx"), ev(C, "a.txt~"),
          ev(C, ".syncengine/scratch")],
         []),
    Case("a path .syncignore names is not journaled",
         write("build.log", "noise"), [ev(C, "build.log")], [],
         before={"a.txt": "a", ".syncignore": "*.log\n"}),
    Case("a folder moved out of the workspace deletes what was in it (inotify says only the folder)",
         move_dir_out, [ev(D, "d", is_dir=True)], [(D, "d/x.txt"), (D, "d/y.txt")]),
    Case("a folder moved in creates what is in it", move_dir_in, [ev(C, "e", is_dir=True)],
         [(C, "e/a.md"), (C, "e/b.md")]),
    Case("a folder renamed moves every file in it",
         rename("d", "e"), [ev(MV, "d", "e", is_dir=True), ev(MV, "d/x.txt", "e/x.txt"), ev(MV, "d/y.txt", "e/y.txt")],
         [(MV, "e/x.txt", "d/x.txt"), (MV, "e/y.txt", "d/y.txt")]),
    Case("touch (times only) journals nothing", lambda root: os.utime(root / "a.txt"), [ev(AT, "a.txt")], []),
    Case("an event for a file whose stat matches the journal journals nothing", nothing,
         [ev(M, "a.txt"), ev(CL, "a.txt")], []),
    Case("chmod +x is a modification", lambda root: os.chmod(root / "run.sh", 0o755), [ev(AT, "run.sh")],
         [(M, "run.sh")]),
    Case("directory 'modified' noise alone journals nothing", nothing, [ev(M, "d", is_dir=True)], []),
]


def _workspace(tmp_path: Path, files: dict) -> Workspace:
    root = tmp_path / "ws"
    make_tree(root, files)
    backdate(root)
    ws, _ = Workspace.init(root)
    return ws


def _ops(changes: list[LocalChange]) -> list[tuple]:
    return sorted((c.op.value, c.path, c.old_path) if c.old_path else (c.op.value, c.path) for c in changes)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_coalescing_table(tmp_path: Path, case: Case):
    """Each editor habit's events journal exactly the expected operations, once."""
    ws = _workspace(tmp_path, case.before)
    try:
        case.act(ws.root)
        tracker = ChangeTracker(ws)
        tracker.feed(case.events)
        batch = tracker.flush()
        assert _ops(batch.changes) == sorted(case.expect)
        assert batch.looked <= len(case.before) + 4  # per path, never per event
    finally:
        ws.close()


def test_vim_gap_is_not_a_delete(tmp_path: Path):
    """A look that falls in vim's gap (file renamed away, new one not yet written) journals nothing yet."""
    ws = _workspace(tmp_path, {"a.txt": "old"})
    try:
        tracker = ChangeTracker(ws)
        os.replace(ws.root / "a.txt", ws.root / "a.txt~")
        tracker.feed([ev(MV, "a.txt", "a.txt~")])
        tracker.wait(0)
        assert tracker.step(force=True) is None  # missing: looked at again later, not journaled
        (ws.root / "a.txt").write_text("new")
        os.unlink(ws.root / "a.txt~")
        tracker.feed([ev(C, "a.txt"), ev(D, "a.txt~")])
        assert _ops(tracker.flush().changes) == [(M, "a.txt")]
    finally:
        ws.close()


def test_own_write_is_recognised_by_its_stat(tmp_path: Path):
    """A file the engine wrote and journaled with the stat it wrote raises no change of its own."""
    ws = _workspace(tmp_path, {"a.txt": "v1"})
    try:
        row = ws.journal.doc_by_path("a.txt")
        st = write_atomic(ws.root, "a.txt", [b"v2"], expect_hash=sha256(b"v1"))
        ws.journal.record_local([LocalChange(Op.MODIFIED, "a.txt", hash=sha256(b"v2"), size=st.size,
                                             mtime_ns=st.mtime_ns, ctime_ns=st.ctime_ns, inode=st.inode,
                                             mode=st.mode, doc_id=row.doc_id)], origin="remote")
        before = ws.journal.last_change_seq()
        tracker = ChangeTracker(ws)
        tracker.feed([ev(C, ".syncengine.a.txt.1234.tmp"), ev(MV, ".syncengine.a.txt.1234.tmp", "a.txt")])
        assert tracker.flush().changes == []
        assert ws.journal.last_change_seq() == before
    finally:
        ws.close()


def test_json_edit_reports_its_zones(tmp_path: Path):
    """A JSON edit journals the changed field paths and publishes them on the zones channel."""
    ws = _workspace(tmp_path, {"doc.json": '{"title": "a", "zones": [{"id": "z1", "text": "x"}]}\n'})
    try:
        ws.snapshot("base")  # the old version is in the blob store
        (ws.root / "doc.json").write_text('{"title": "b", "zones": [{"id": "z1", "text": "y"}]}\n')
        tracker = ChangeTracker(ws)
        tracker.feed([ev(M, "doc.json")])
        batch = tracker.flush()
        assert batch.zones == {"doc.json": ["title", "zones[id=z1].text"]}
        events = ws.recent_events(10, "zones")
        assert events[-1].payload["fields"] == ["title", "zones[id=z1].text"]
        assert events[-1].payload["origin"] == "local" and events[-1].payload["doc_id"]
        assert ws.log("doc.json", 1)[0].zones == ("title", "zones[id=z1].text")
    finally:
        ws.close()


def test_checkout_lock_holds_changes_back(tmp_path: Path):
    """While .git/index.lock exists nothing is journaled; once it goes, everything is."""
    ws = _workspace(tmp_path, {"a.txt": "a", ".git/HEAD": "ref"})
    try:
        (ws.root / ".git/index.lock").write_text("")
        (ws.root / "a.txt").write_text("checked out")
        tracker = ChangeTracker(ws)
        tracker.feed([ev(M, "a.txt")])
        tracker.wait(0)
        assert tracker.step(force=True) is None
        assert tracker.hold_reason == ".git/index.lock"
        os.unlink(ws.root / ".git/index.lock")
        assert _ops(tracker.flush().changes) == [(M, "a.txt")]
    finally:
        ws.close()


def test_pending_settles_or_caps():
    """A path is due once quiet for `settle`, or `cap` after its first event even if still busy."""
    pending = Pending(settle=0.04, cap=0.2)
    pending.add("path", "a", 0.0)
    assert pending.take_due(0.03) == []
    assert pending.take_due(0.05) == [("path", "a")]
    for t in range(0, 30):  # an event every 10 ms: never quiet
        pending.add("path", "b", t / 100)
    assert pending.take_due(0.199) == []
    assert pending.take_due(0.2) == [("path", "b")]


def test_real_watcher_feeds_the_tracker(tmp_path: Path):
    """With the real watchdog observer, an atomic save and a new file reach the journal."""
    from syncengine.watcher import Watcher

    ws = _workspace(tmp_path, {"doc.json": "{}"})
    tracker = ChangeTracker(ws)
    watcher = Watcher(ws.root, tracker.feed, lambda reason: None)
    watcher.start()
    try:
        (ws.root / "doc.json.tmp").write_text('{"a": 1}')
        os.replace(ws.root / "doc.json.tmp", ws.root / "doc.json")
        (ws.root / "notes").mkdir()
        (ws.root / "notes/n.md").write_text("n")
        seen: list[LocalChange] = []

        def journaled() -> bool:
            tracker.wait(0.05)
            batch = tracker.step()
            seen.extend(batch.changes if batch else [])
            return {(c.op.value, c.path) for c in seen} >= {(M, "doc.json"), (C, "notes/n.md")}

        wait_until(journaled, timeout=10, message="the watcher's events to be journaled")
        assert watcher.alive()
    finally:
        watcher.stop()
        ws.close()


def test_watchdog_overflow_log_is_reported_as_a_loss(tmp_path: Path):
    """watchdog's 'queue overflowed' warning reaches every running watcher as lost events."""
    import logging

    from syncengine.watcher import Watcher

    lost: list[str] = []
    watcher = Watcher(tmp_path, lambda events: None, lost.append)
    watcher.start()
    try:
        logging.getLogger("watchdog.observers.inotify_c").warning("Inotify queue overflowed; filesystem events "
                                                                 "were lost")
        assert lost and "overflow" in lost[0]
    finally:
        watcher.stop()


def test_a_racy_second_look_does_not_hold_a_sync_round_back():
    """A second look the tracker asked for itself (racy stat) is left out of what a round waits for."""
    pending = Pending(settle=0.04, cap=0.2)
    pending.recheck("path", "a", 0.0, not_before=0.1)
    assert pending.next_deadline() == 0.1 and pending.next_deadline(rechecks=False) is None
    pending.add("path", "a", 0.05)  # a real event on the same path: it counts again
    assert pending.next_deadline(rechecks=False) == 0.1
    assert pending.take_due(0.2) == [("path", "a")] and not pending.rechecks


def test_a_rename_does_not_stall_the_watcher_for_half_a_second(tmp_path: Path):
    """watchdog's 0.5 s move pairing (its reader sleeps it out, holding back every later event) is cut short."""
    from watchdog.observers.inotify_move_event_grouper import InotifyMoveEventGrouper

    from syncengine.watcher import MOVE_PAIRING, Watcher

    watcher = Watcher(tmp_path, lambda events: None, lambda reason: None)
    watcher.start()
    try:
        assert InotifyMoveEventGrouper.delay == MOVE_PAIRING < 0.1
    finally:
        watcher.stop()
