"""Snapshots and restore bring back exact bytes; log and diff explain what changed."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from syncengine import Workspace
from syncengine.testing import read_tree


def test_restore_brings_back_exact_bytes_including_deleted_files(sample_ws: Workspace):
    """After edits, deletions and additions, restoring a snapshot gives back the exact tree."""
    root = sample_ws.root
    original = read_tree(root)
    snap = sample_ws.snapshot("before")
    (root / "invoices" / "doc-001.json").write_text("{}")
    (root / "assets" / "logo.png").write_bytes(b"\x00" * 7)
    os.unlink(root / "notes" / "todo.md")
    os.unlink(root / "contracts" / "doc-010.json")
    (root / "extra.txt").write_text("made later")
    report = sample_ws.restore(snap.id)
    assert read_tree(root) == original
    assert "notes/todo.md" in report.written and "extra.txt" in report.deleted
    assert report.safety_snapshot_id is not None


def test_restore_can_be_undone_with_the_safety_snapshot(sample_ws: Workspace):
    """The safety snapshot taken before a restore holds the state the restore replaced."""
    root = sample_ws.root
    snap = sample_ws.snapshot()
    (root / "notes" / "todo.md").write_text("edited after the snapshot\n")
    edited = read_tree(root)
    report = sample_ws.restore(snap.id)
    sample_ws.restore(report.safety_snapshot_id)
    assert read_tree(root) == edited


def test_restore_some_paths_only(sample_ws: Workspace):
    """Restoring PATHS leaves every other file as it is."""
    root = sample_ws.root
    snap = sample_ws.snapshot()
    (root / "notes" / "todo.md").write_text("changed")
    (root / "notes" / "README.md").write_text("changed too")
    sample_ws.restore(snap.id, ["notes/todo.md"])
    assert (root / "notes" / "todo.md").read_text().startswith("# To do")
    assert (root / "notes" / "README.md").read_text() == "changed too"


def test_snapshot_records_only_changes(sample_ws: Workspace):
    """A second snapshot stores only the paths changed since the first."""
    first = sample_ws.snapshot()
    assert first.changed == first.files
    (sample_ws.root / "notes" / "todo.md").write_text("x")
    second = sample_ws.snapshot()
    assert second.changed == 1 and second.files == first.files


def test_a_snapshot_ahead_of_the_journal_leaves_no_change_unsaved(sample_ws: Workspace):
    """A snapshot stores a file as it is when read, ahead of the journal; the change the next scan journals is
    then in it, so an autosave that finds nothing new marks it saved instead of counting it unsaved for ever."""
    from syncengine.history import take_snapshot

    ws = sample_ws
    ws.snapshot()
    (ws.root / "notes" / "todo.md").write_text("journaled")
    ws.scan()  # the journal holds "journaled", whose blob no snapshot stored yet
    (ws.root / "notes" / "todo.md").write_text("saved last")  # not journaled yet
    first, _ = take_snapshot(ws.root, ws.journal, ws.blobs, trigger="auto", skip_if_unchanged=True)
    assert first is not None and ws.journal.unsnapshotted_count() == 0
    ws.scan()  # journals "saved last": a change after the snapshot that already holds it
    assert ws.journal.unsnapshotted_count() == 1
    again, _ = take_snapshot(ws.root, ws.journal, ws.blobs, trigger="auto", skip_if_unchanged=True)
    assert again is None  # nothing differs from the snapshot
    assert ws.journal.unsnapshotted_count() == 0
    assert ws.snapshots()[0].id == first.id


def test_every_snapshotted_version_is_in_the_blob_store(sample_ws: Workspace):
    """Each snapshot entry's bytes are stored and verify against their hash."""
    snap = sample_ws.snapshot()
    manifest = sample_ws.journal.snapshot_manifest(snap.id)
    for _path, (digest, _mode, _size) in manifest.items():
        assert hashlib.sha256(sample_ws.blobs.get(digest)).hexdigest() == digest


def test_log_follows_a_document_across_a_move(sample_ws: Workspace):
    """`log PATH` shows the history of the document now at PATH, before its rename too."""
    root = sample_ws.root
    os.rename(root / "notes" / "todo.md", root / "notes" / "done.md")
    sample_ws.scan()
    (root / "notes" / "done.md").write_text("# done\n")
    sample_ws.scan()
    ops = [(e.op.value, e.path) for e in sample_ws.log("notes/done.md")]
    assert ops[0] == ("modified", "notes/done.md")
    assert ("moved", "notes/done.md") in ops and ("created", "notes/todo.md") in ops


def test_diff_json_is_field_level(sample_ws: Workspace):
    """A JSON edit shows as changed fields, zones matched by id."""
    import json

    sample_ws.snapshot()
    path = sample_ws.root / "invoices" / "doc-002.json"
    doc = json.loads(path.read_text())
    doc["zones"][1]["text"] = "EDITED"
    doc["title"] = "New title"
    path.write_text(json.dumps(doc, indent=2) + "\n")
    diffs = sample_ws.diff()
    assert [d.path for d in diffs] == ["invoices/doc-002.json"]
    fields = {f.path: f for f in diffs[0].fields}
    zone_id = doc["zones"][1]["id"]
    assert fields["title"].new == "New title"
    assert fields[f"zones[id={zone_id}].text"].new == "EDITED"
    assert diffs[0].unified is None


def test_diff_text_is_unified(sample_ws: Workspace):
    """A Markdown edit shows as a unified diff."""
    sample_ws.snapshot()
    (sample_ws.root / "notes" / "todo.md").write_text("# To do\n\n- [x] everything\n")
    (d,) = sample_ws.diff("notes/todo.md")
    assert d.kind.value == "text" and "+- [x] everything" in d.unified


def test_diff_binary_shows_sizes_and_hashes(sample_ws: Workspace):
    """A binary edit shows sizes and hashes, no content."""
    sample_ws.snapshot()
    (sample_ws.root / "assets" / "logo.png").write_bytes(b"\x89PNG\x00\x00\x00")
    (d,) = sample_ws.diff("assets")
    assert d.kind.value == "binary" and d.new_size == 7 and d.old_hash != d.new_hash and d.unified is None


def test_malformed_json_is_journaled_and_diff_falls_back_to_text(sample_ws: Workspace):
    """A JSON file that does not parse is still a document, and diff compares it as text."""
    sample_ws.snapshot()
    path = sample_ws.root / "invoices" / "doc-003.json"
    path.write_text('{"id": "doc-003", "title": ')  # truncated mid-edit
    report = sample_ws.scan()
    assert report.modified == ("invoices/doc-003.json",)
    (d,) = sample_ws.diff("invoices/doc-003.json")
    assert d.unified and d.note and "text" in d.note


def test_diff_since_snapshot(sample_ws: Workspace):
    """--since compares with a given snapshot, not the latest."""
    first = sample_ws.snapshot()
    (sample_ws.root / "notes" / "todo.md").write_text("a\n")
    sample_ws.snapshot()
    (sample_ws.root / "notes" / "README.md").write_text("b\n")
    paths = [d.path for d in sample_ws.diff(since=first.id)]
    assert paths == ["notes/README.md", "notes/todo.md"]


def test_workspace_is_found_from_a_subfolder(sample_ws: Workspace):
    """Workspace.find walks up like git does."""
    found = Workspace.find(sample_ws.root / "invoices")
    assert found.root == sample_ws.root
    found.close()


def test_restore_reports_a_concurrent_edit_instead_of_overwriting(sample_ws: Workspace, tmp_path: Path):
    """If a file changes between the scan and the write, restore refuses that path."""
    from syncengine import history

    snap = sample_ws.snapshot()
    target = sample_ws.root / "notes" / "todo.md"
    target.write_text("v2\n")
    sample_ws.scan()
    target.write_text("v3 typed during the restore\n")  # journal still says v2
    _report, problems = history.restore(sample_ws.root, sample_ws.journal, sample_ws.blobs, snap.id)
    assert [p.path for p in problems] == ["notes/todo.md"]
    assert target.read_text() == "v3 typed during the restore\n"
