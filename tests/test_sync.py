"""Sync rounds between real replicas through a real server: every kind of change, both ways.

The main paths run on SQLite and on PostgreSQL (the ``storage`` fixture;
PostgreSQL when SYNCENGINE_TEST_PG_DSN is set, e.g. under `.ci/run`).
"""

from __future__ import annotations

import pytest

from tests.synckit import Kit, assert_converged, converge, no_duplicate_revisions

pytestmark = pytest.mark.integration

DOCS = {
    "notes/today.md": "# Today\n\nbuy milk\n",
    "data/config.json": '{\n  "name": "demo",\n  "size": 3\n}\n',
    "data/list.yaml": "items:\n  - one\n  - two\n",
    "bin/tool.sh": "#!/bin/sh\necho hi\n",
    "image.bin": bytes(range(256)) * 4,
    "empty.txt": "",
}


@pytest.fixture
def pkit(tmp_path, storage, server_factory):
    """Replicas on one server, on SQLite and on PostgreSQL."""
    return Kit(tmp_path, server_factory(storage))


def test_first_sync_fills_an_empty_replica(pkit):
    """A's files reach an empty B byte for byte, executable bit included; a further round does nothing."""
    a = pkit.replica(DOCS)
    a.chmod_x("bin/tool.sh")
    b = pkit.replica()
    assert sorted(a.sync().pushed) == sorted(DOCS)
    report = b.sync()
    assert sorted(report.downloaded) == sorted(DOCS) and report.full_listing
    assert b.tree() == a.tree() and b.executable("bin/tool.sh") and not b.executable("empty.txt")
    assert_converged(a, b)
    assert len(pkit.log()) == len(DOCS)


def test_first_sync_into_a_replica_holding_the_same_files(kit):
    """Files already present alike on B are adopted: nothing downloaded, no conflict, no new revision."""
    a = kit.replica(DOCS)
    a.sync()
    b = kit.replica(DOCS)
    report = b.sync()
    assert not report.downloaded and not report.pushed and not report.conflicts and not b.copies()
    assert_converged(a, b)
    assert len(kit.log()) == len(DOCS)


def test_first_sync_into_a_replica_holding_different_files(kit):
    """Both replicas' files survive a first sync: same path, different bytes is both-created, never a loss."""
    a = kit.replica({"same.txt": "same\n", "clash.bin": b"\x00from a", "only-a.md": "a\n"})
    a.sync()
    b = kit.replica({"same.txt": "same\n", "clash.bin": b"\x00from b", "only-b.md": "b\n"})
    report = b.sync()
    assert [c.kind for c in report.conflicts] == ["both-created"]
    converge(a, b)
    tree = assert_converged(a, b)
    assert {"same.txt", "clash.bin", "only-a.md", "only-b.md"} <= set(tree)
    contents = set(tree.values())
    assert b"\x00from a" in contents and b"\x00from b" in contents


def test_each_kind_of_change_travels_both_ways(pkit):
    """Create, modify, delete, move and the executable bit made on one side appear on the other, each way."""
    a = pkit.replica(DOCS)
    b = pkit.replica()
    converge(a, b)
    for here, there in ((a, b), (b, a)):
        here.write("new/created.txt", f"made on {here.root.name}\n")
        here.write("notes/today.md", f"# Today\n\nedited on {here.root.name}\n")
        here.delete("empty.txt" if here is a else "new/created.txt")
        here.move("data/list.yaml", f"moved/{here.root.name}.yaml")
        here.chmod_x("image.bin", on=here is a)
        report = here.sync()
        assert not report.conflicts and not report.problems
        pulled = there.sync()
        assert not pulled.conflicts and not pulled.problems
        assert there.tree() == here.tree()
        assert there.executable("image.bin") is (here is a)
        here.move(f"moved/{here.root.name}.yaml", "data/list.yaml")
        converge(here, there)
    assert_converged(a, b)
    no_duplicate_revisions(pkit.log())


@pytest.mark.parametrize("deleter_first", [True, False], ids=["deleter-syncs-first", "modifier-syncs-first"])
@pytest.mark.parametrize("deleter", ["a", "b"])
def test_delete_vs_modify_keeps_the_modification(kit, deleter, deleter_first):
    """A file deleted on one side and modified on the other comes back modified everywhere."""
    a = kit.replica({"doc.md": "v1\n", "other.md": "x\n"})
    b = kit.replica()
    converge(a, b)
    killer, editor = (a, b) if deleter == "a" else (b, a)
    killer.delete("doc.md")
    editor.write("doc.md", "v2 edited\n")
    order = (killer, editor) if deleter_first else (editor, killer)
    reports = [r.sync() for r in order]
    converge(a, b)
    tree = assert_converged(a, b)
    assert tree["doc.md"] == b"v2 edited\n"
    kinds = {c.kind for r in reports for c in r.conflicts}
    assert kinds & {"deleted-modified", "modified-deleted"}


@pytest.mark.parametrize("mover_first", [True, False], ids=["mover-first", "editor-first"])
def test_move_vs_modify_lands_the_edit_at_the_new_path(kit, mover_first):
    """One side renames, the other edits: the edit appears under the new name, nothing is left at the old one."""
    a = kit.replica({"draft.md": "line one\n"})
    b = kit.replica()
    converge(a, b)
    a.move("draft.md", "final/essay.md")
    b.write("draft.md", "line one\nline two\n")
    for replica in ((a, b) if mover_first else (b, a)):
        replica.sync()
    converge(a, b)
    tree = assert_converged(a, b)
    assert tree == {"final/essay.md": b"line one\nline two\n"}


def test_both_moved_apart_keeps_one_document(kit):
    """Moved to two different places: one place wins (the first commit's), one copy of the content remains."""
    a = kit.replica({"x.txt": "content\n"})
    b = kit.replica()
    converge(a, b)
    a.move("x.txt", "by-a.txt")
    b.move("x.txt", "by-b.txt")
    a.sync()
    b.sync()
    converge(a, b)
    assert assert_converged(a, b) == {"by-a.txt": b"content\n"}


def test_both_created_identical_is_no_conflict(kit):
    """The same new file made on two replicas becomes one document: no conflict, no copy."""
    a = kit.replica({"base.md": "base\n"})
    b = kit.replica()
    converge(a, b)
    a.write("twin.json", '{"k": 1}\n')
    b.write("twin.json", '{"k": 1}\n')
    reports = [a.sync(), b.sync()]
    converge(a, b)
    assert not any(r.conflicts for r in reports) and not a.copies()
    assert assert_converged(a, b)["twin.json"] == b'{"k": 1}\n'
    assert sum(1 for c in kit.log() if c.path == "twin.json") == 1


def test_both_created_different_keeps_both(kit):
    """Different new files at one path on two replicas: both versions survive on every replica."""
    a = kit.replica({"base.md": "base\n"})
    b = kit.replica()
    converge(a, b)
    a.write("pic.bin", b"\x89PNG a")
    b.write("pic.bin", b"\x89PNG b")
    a.sync()
    report = b.sync()
    assert [c.kind for c in report.conflicts] == ["both-created"]
    converge(a, b)
    tree = assert_converged(a, b)
    assert tree["pic.bin"] == b"\x89PNG a" and b"\x89PNG b" in [tree[p] for p in a.copies()]


def test_identical_edits_are_no_conflict(kit):
    """The same edit made on both sides is adopted silently: no conflict, no copy, one revision."""
    a = kit.replica({"doc.txt": "old\n"})
    b = kit.replica()
    converge(a, b)
    a.write("doc.txt", "new\n")
    b.write("doc.txt", "new\n")
    a.sync()
    report = b.sync()
    assert not report.conflicts and not report.downloaded and not report.pushed
    assert_converged(a, b)
    assert [c.hash is not None for c in kit.log() if c.path == "doc.txt"] == [True, True]


def test_both_modified_binary_keeps_both(kit):
    """A binary changed differently on both sides: the server's version keeps the path, ours a conflict copy."""
    a = kit.replica({"blob.bin": b"\x00base"})
    b = kit.replica()
    converge(a, b)
    a.write("blob.bin", b"\x00by a")
    b.write("blob.bin", b"\x00by b")
    a.sync()
    report = b.sync()
    assert [(c.kind, c.resolution) for c in report.conflicts] == [("both-modified", "keep-both")]
    converge(a, b)
    tree = assert_converged(a, b)
    assert tree["blob.bin"] == b"\x00by a" and [tree[p] for p in a.copies()] == [b"\x00by b"]


def test_three_replicas_converge(pkit):
    """Three replicas editing different files and one shared JSON document end identical."""
    a = pkit.replica({"shared.json": '{\n  "a": 1,\n  "b": 1\n}\n', "a.txt": "a\n"})
    b = pkit.replica()
    c = pkit.replica()
    converge(a, b, c)
    a.write("a.txt", "a2\n")
    b.write("b.txt", "b\n")
    c.write("c/c.txt", "c\n")
    a.write("shared.json", '{\n  "a": 2,\n  "b": 1\n}\n')
    b.write("shared.json", '{\n  "a": 1,\n  "b": 2\n}\n')
    converge(a, b, c)
    tree = assert_converged(a, b, c)
    assert tree["shared.json"] == b'{\n  "a": 2,\n  "b": 2\n}\n'
    assert {"a.txt", "b.txt", "c/c.txt"} <= set(tree) and tree["a.txt"] == b"a2\n"
    no_duplicate_revisions(pkit.log())


def test_own_pushes_come_back_as_echoes(kit):
    """A round that reads the replica's own changes back ignores them: no download, no conflict.

    A push moves the checkpoint past its own changes when nothing else came
    in between; the checkpoint is set back here, as a change by another
    replica in between would leave it, so the echoes are read.
    """
    from syncengine import Workspace

    a = kit.replica(DOCS)
    a.sync()
    a.write("notes/today.md", "changed\n")
    a.move("image.bin", "img/image.bin")
    with Workspace(a.root) as ws:
        since = ws.journal.state()["last_seq"]
    a.sync()
    with Workspace(a.root) as ws:
        ws.journal.update_state(last_seq=since)
    report = a.sync()
    assert report.pulled >= 2 and not report.downloaded and not report.conflicts and not report.pushed


def test_crossing_moves_converge(kit):
    """Files that swap or rotate names on the server (x->y, y->z, z->x) do so here too, without a stall or a copy."""
    a = kit.replica({"x.txt": "X\n", "y.txt": "Y\n", "z.txt": "Z\n"})
    b = kit.replica()
    converge(a, b)
    for old, new in (("x.txt", "tmp"), ("z.txt", "x.txt"), ("y.txt", "z.txt"), ("tmp", "y.txt")):
        a.move(old, new)
        a.sync()
    report = b.sync()
    assert sorted(report.moved) == [("x.txt", "y.txt"), ("y.txt", "z.txt"), ("z.txt", "x.txt")]
    assert not report.problems and not b.copies()
    assert assert_converged(a, b) == {"x.txt": b"Z\n", "y.txt": b"X\n", "z.txt": b"Y\n"}
