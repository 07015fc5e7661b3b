"""Losing state on either side never deletes: a reset or restored server, pruned history, a lost journal."""

from __future__ import annotations

import shutil
import sqlite3

import pytest

from tests.synckit import Kit, assert_converged, converge

pytestmark = pytest.mark.integration

FILES = {"a.md": "alpha\n", "b/b.json": '{"b": 1}\n', "c.bin": b"\x00\x01c", "d.txt": "delta\n"}


def test_a_reset_server_gets_everything_back_and_nothing_is_deleted(tmp_path, storage, server_factory):
    """A new, empty server (new server_id): replicas list it, re-upload everything, and delete nothing."""
    old = server_factory()
    kit = Kit(tmp_path, old)
    a = kit.replica(FILES)
    b = kit.replica()
    converge(a, b)
    b.write("d.txt", "delta from b, made before the reset\n")
    new = server_factory(storage)
    for replica in (a, b):
        replica.repoint(new.url, new.token(kit.ws))
    first = a.sync()
    assert first.full_listing and sorted(first.pushed) == sorted(FILES) and not first.deleted
    second = b.sync()
    assert second.full_listing and not second.deleted and [c.kind for c in second.conflicts] == ["both-created"]
    converge(a, b)
    tree = assert_converged(a, b)
    assert set(FILES) <= set(tree) and b"delta from b, made before the reset\n" in tree.values()


def test_a_server_restored_from_a_backup_is_reconciled_without_bases(tmp_path, server_factory):
    """Checkpoints from the server's future mean a full listing without bases: what it lost comes back."""
    server = server_factory()
    kit = Kit(tmp_path, server)
    a = kit.replica(FILES)
    b = kit.replica()
    converge(a, b)
    backup = tmp_path / "backup.db"
    source = sqlite3.connect(server.spec.data_dir / "server.db")
    target = sqlite3.connect(backup)
    source.backup(target)
    source.close()
    target.close()
    a.write("a.md", "alpha v2, lost by the restore\n")
    a.write("e.md", "new, lost by the restore\n")
    a.delete("d.txt")
    converge(a, b)
    server.stop()
    for suffix in ("", "-wal", "-shm"):
        (server.spec.data_dir / f"server.db{suffix}").unlink(missing_ok=True)
    shutil.copy(backup, server.spec.data_dir / "server.db")
    server.start()
    report = a.sync()
    assert report.full_listing and not report.deleted and "e.md" in report.pushed
    assert {(c.path, c.kind) for c in report.conflicts} == {("a.md", "both-created")}
    converge(a, b)
    tree = assert_converged(a, b)
    assert tree["e.md"] == b"new, lost by the restore\n" and b"alpha v2, lost by the restore\n" in tree.values()
    assert "d.txt" in tree  # the deletion was lost with the server's state: kept, never guessed


def test_a_checkpoint_below_min_seq_lists_everything_and_keeps_bases(kit):
    """History pruned past a replica's checkpoint: a full listing, then exactly the server's state, no conflict."""
    a = kit.replica(FILES)
    b = kit.replica()
    converge(a, b)
    a.write("a.md", "alpha v2\n")
    a.delete("d.txt")
    a.move("c.bin", "moved/c.bin")
    a.sync()
    storage = kit.server.storage
    W = storage.m.Workspace
    with storage.db.connection_context():
        last = W.select(W.last_seq).where(W.name == kit.ws).scalar()
        W.update(min_seq=last + 1).where(W.name == kit.ws).execute()
    report = b.sync()
    assert report.full_listing and not report.conflicts and not report.problems
    assert b.tree() == a.tree() and "d.txt" not in b.tree()
    assert_converged(a, b)


@pytest.mark.parametrize("damage", ["missing", "garbage"])
def test_a_lost_journal_after_repair_deletes_nothing_and_differences_conflict(kit, damage):
    """After `repair` the next sync deletes nothing anywhere; a file that differs becomes a conflict, both kept."""
    a = kit.replica(FILES)
    b = kit.replica()
    converge(a, b)
    a.delete("d.txt")  # deleted before the journal was lost: ambiguous without a base
    a.write("a.md", "alpha edited while the journal was lost\n")
    b.write("b/b.json", '{"b": 2}\n')
    b.sync()
    journal = a.root / ".syncengine" / "journal.db"
    for suffix in ("-wal", "-shm"):
        (a.root / ".syncengine" / f"journal.db{suffix}").unlink(missing_ok=True)
    if damage == "missing":
        journal.unlink()
    else:
        journal.write_bytes(b"this is not a database" * 100)
        assert a.cli("status").code == 5
    assert a.cli("repair").code == 0
    log = kit.log()
    report = a.sync()
    assert not report.deleted and not any(c.deleted for c in kit.log()[len(log):])
    assert {c.kind for c in report.conflicts} == {"both-created"}
    converge(a, b)
    tree = assert_converged(a, b)
    assert tree["d.txt"] == b"delta\n" and tree["b/b.json"] == b'{"b": 2}\n'
    assert b"alpha edited while the journal was lost\n" in tree.values() and b"alpha\n" in tree.values()
