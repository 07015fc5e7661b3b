"""One document that cannot be written, or that a person edits mid-apply, never costs data or stalls the rest."""

from __future__ import annotations

import errno

import pytest

from syncengine import apply, fsops, staging, sync
from syncengine.errors import FileSystemError
from syncengine.fsops import inject_fault
from tests.synckit import assert_converged, converge

pytestmark = pytest.mark.integration


OLD = {"one.md": b"1\n", "two.md": b"2\n", "three.md": b"3\n"}


@pytest.fixture
def pulled(kit):
    """Replicas a and b in step; a then changed three files and pushed, so b has three to apply."""
    a = kit.replica(OLD)
    b = kit.replica()
    converge(a, b)
    for name in ("one.md", "two.md", "three.md"):
        a.write(name, f"{name} v2\n")
    a.sync()
    return a, b


@pytest.mark.parametrize("op,err", [("write", errno.ENOSPC), ("write", errno.EACCES), ("replace", errno.EACCES)])
def test_a_file_that_cannot_be_written_stays_pending_and_the_rest_proceeds(pulled, op, err):
    """A failed write keeps that file's old bytes and an error in status; the others land; the next round ends it."""
    a, b = pulled
    with inject_fault(op, 1, err):
        report = b.sync()
    tree = b.tree()
    failed = [p.path for p in report.problems]
    assert len(failed) == 1 and tree[failed[0]] == OLD[failed[0]]
    assert sum(1 for v in tree.values() if v.endswith(b" v2\n")) == 2 and b.leftovers() == []
    errors = b.status().errors
    assert [e.path for e in errors] == failed and fsops.os_error(OSError(err, "x")).title in errors[0].reason
    assert b.cli("sync").code == 0 and not b.status().errors
    assert_converged(a, b)


def test_a_pulled_deletion_that_fails_keeps_the_file_until_the_next_sync(pulled):
    """A deletion that cannot be done leaves the file whole and pending; the next round deletes it."""
    a, b = pulled
    a.delete("two.md")
    a.sync()
    with inject_fault("delete", 1, errno.EACCES):
        report = b.sync()
    assert b.read("two.md") == b"2\n" and [p.path for p in report.problems] == ["two.md"]
    assert b.sync().deleted == ("two.md",)
    assert_converged(a, b)


def test_a_fault_via_the_environment_reaches_the_cli(pulled):
    """SYNCENGINE_FSFAULT makes a real `syncengine sync` fail one write; the round still finishes the others."""
    a, b = pulled
    result = b.proc("sync", "--json", SYNCENGINE_FSFAULT="write:1:ENOSPC")
    assert result.code == 0, result.stderr
    assert len(result.json()["problems"]) == 1 and len(result.json()["downloaded"]) == 2
    assert b.leftovers() == []
    b.sync()
    assert_converged(a, b)


def _edit_at(monkeypatch, point: str, edit) -> list[str]:
    """Run ``edit()`` the first time the round reaches failpoint ``point`` (a person typing at that moment)."""
    done: list[str] = []
    real = fsops.failpoint

    def hook(name: str) -> None:
        if name == point and not done:
            done.append(name)
            edit()
        real(name)

    for module in (fsops, apply, staging, sync):
        monkeypatch.setattr(module, "failpoint", hook)
    return done


@pytest.mark.parametrize("point", ["apply.after_temp", "apply.after_stage"])
@pytest.mark.parametrize("content", [b"\x00binary edit during apply", b"text edit during apply\n"])
def test_an_edit_landing_while_a_download_replaces_the_file_becomes_a_conflict(kit, monkeypatch, content, point):
    """C8: the user saves while the remote version is being put in place (or staged ahead of it); both survive."""
    a = kit.replica({"doc.txt": "base\n"})
    b = kit.replica()
    converge(a, b)
    a.write("doc.txt", "remote version\n")
    a.sync()
    done = _edit_at(monkeypatch, point, lambda: b.write("doc.txt", content))
    report = b.sync()
    assert done and report.conflicts and not report.problems
    converge(a, b)
    tree = assert_converged(a, b)
    merged = b"".join(tree.values())
    assert (content in merged or content.rstrip(b"\n") in merged) and b"remote version" in merged


def test_a_failed_write_back_of_staged_downloads_fails_each_and_writes_nothing(pulled):
    """The staged downloads' shared write-back reports EIO: none is placed, each is reported; the next round ends it."""
    a, b = pulled
    # The 1st write-back is the blob store's (the small downloaded blobs' commit to objects/small.db).
    with inject_fault("sync", 2, errno.EIO):
        report = b.sync()
    assert sorted(p.path for p in report.problems) == sorted(OLD) and "Input/output error" in report.problems[0].reason
    assert b.tree() == OLD and b.leftovers() == []
    assert not b.sync().problems
    assert_converged(a, b)


def test_a_failed_write_back_of_downloaded_blobs_stops_the_round_before_any_file(pulled):
    """A blob that cannot be made durable is never the base of anything: the round stops with nothing written."""
    a, b = pulled
    with inject_fault("sync", 1, errno.EIO), pytest.raises(FileSystemError):
        b.sync()
    assert b.tree() == OLD and b.leftovers() == []
    assert not b.sync().problems
    assert_converged(a, b)


def test_an_edit_landing_before_a_pulled_deletion_keeps_the_file(kit, monkeypatch):
    """C8: a file deleted on the server but edited here during the round comes back edited everywhere."""
    a = kit.replica({"doc.txt": "base\n", "other.txt": "o\n"})
    b = kit.replica()
    converge(a, b)
    a.delete("doc.txt")
    a.sync()
    done = _edit_at(monkeypatch, "sync.after_pull", lambda: b.write("doc.txt", "edited as it was deleted\n"))
    report = b.sync()
    assert done and not report.deleted and b.read("doc.txt") == b"edited as it was deleted\n"
    converge(a, b)
    assert assert_converged(a, b)["doc.txt"] == b"edited as it was deleted\n"


def test_the_fault_hooks_follow_the_environment_as_it_changes(tmp_path, monkeypatch):
    """SYNCENGINE_FSFAULT and SYNCENGINE_FAILPOINT are read at each operation (the cheap way), set or unset."""
    doc = tmp_path / "doc.md"
    doc.write_bytes(b"x")
    digest = fsops.sha256(b"x")
    monkeypatch.delenv("SYNCENGINE_FSFAULT", raising=False)
    assert fsops.read_hashed(doc, 1, digest) == b"x"
    monkeypatch.setenv("SYNCENGINE_FSFAULT", "read:1:EIO")
    fsops._fault_counts.clear()
    with pytest.raises(OSError) as failed:
        fsops.read_hashed(doc, 1, digest)
    assert failed.value.errno == errno.EIO
    monkeypatch.delenv("SYNCENGINE_FSFAULT")
    fsops._fault_counts.clear()
    assert fsops.read_hashed(doc, 1, digest) == b"x"
    monkeypatch.setenv("SYNCENGINE_FAILPOINT", "hooks.test=raise")
    with pytest.raises(RuntimeError):
        fsops.failpoint("hooks.test")
    monkeypatch.delenv("SYNCENGINE_FAILPOINT")
    fsops.failpoint("hooks.test")
