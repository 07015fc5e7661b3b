"""The journal's schema: numbered migrations recorded in user_version, each whole or not at all."""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from pathlib import Path

import pytest

from syncengine.errors import JournalDamaged
from syncengine.journal.db import migrate, open_sqlite, schema_version
from tests.helpers import run_cli


def _tables(path: Path) -> set[str]:
    con = sqlite3.connect(path)
    try:
        return {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    finally:
        con.close()


def test_migrations_run_once_in_order_and_record_their_number(tmp_path: Path):
    path = tmp_path / "j.db"
    ran: list[int] = []

    def step(n: int):
        def run(db):
            ran.append(n)
            db.execute_sql(f"CREATE TABLE t{n} (x INTEGER)")

        return run

    db = open_sqlite(path)
    assert migrate(db, [step(1), step(2)], path) == 2 and schema_version(db) == 2
    assert migrate(db, [step(1), step(2)], path) == 2  # nothing to do the second time
    assert migrate(db, [step(1), step(2), step(3)], path) == 3
    db.close()
    assert ran == [1, 2, 3] and {"t1", "t2", "t3"} <= _tables(path)


def test_a_migration_that_fails_leaves_the_previous_version_whole(tmp_path: Path):
    """Migration 2 creates a table, then fails: version stays 1 and the table is gone with it."""
    path = tmp_path / "j.db"

    def first(db):
        db.execute_sql("CREATE TABLE t1 (x INTEGER)")

    def broken(db):
        db.execute_sql("CREATE TABLE t2 (x INTEGER)")
        raise RuntimeError("killed midway")

    db = open_sqlite(path)
    migrate(db, [first], path)
    with pytest.raises(RuntimeError):
        migrate(db, [first, broken], path)
    assert schema_version(db) == 1
    db.close()
    assert "t1" in _tables(path) and "t2" not in _tables(path)


def test_a_journal_from_a_newer_syncengine_exits_5_and_is_left_alone(sample_tree: Path):
    """A schema version this syncengine does not know: exit 5 naming repair, the file untouched."""
    assert run_cli("init", sample_tree).code == 0
    journal = sample_tree / ".syncengine" / "journal.db"
    con = sqlite3.connect(journal)
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.execute("PRAGMA user_version = 999")
    con.close()
    before = journal.read_bytes()
    result = run_cli("-C", sample_tree, "status")
    assert result.code == 5 and result.stderr.count("\n") == 1
    assert "999" in result.stderr and "syncengine repair" in result.stderr
    assert journal.read_bytes() == before
    with pytest.raises(JournalDamaged):
        migrate(open_sqlite(journal), [lambda db: None], journal)


def test_events_live_in_their_own_database(sample_tree: Path):
    """journal.db holds the documents; progress and events go to events.db beside it."""
    assert run_cli("init", sample_tree).code == 0
    assert run_cli("-C", sample_tree, "status").code == 0  # reads running tasks from events.db
    state = sample_tree / ".syncengine"
    journal_tables, events_tables = _tables(state / "journal.db"), _tables(state / "events.db")
    assert journal_tables and events_tables and not journal_tables & events_tables


def test_one_batch_that_deletes_a_file_and_creates_it_again_is_one_document(tmp_path: Path):
    """record_local sends its row updates in runs, but before any query that must see them: a deletion and a
    creation of the same path in one batch (how some editors save) keep the document, beside an edit of another."""
    from syncengine.journal import Journal
    from syncengine.models import LocalChange, Op

    journal = Journal.open(tmp_path / "journal.db")
    try:
        stamp = {"size": 3, "mtime_ns": 1, "ctime_ns": 1, "inode": 7, "mode": 0o644}
        journal.record_local([LocalChange(Op.CREATED, name, hash=name[0] * 64, kind="text", **stamp)
                              for name in ("a.md", "b.md")])
        a, b = journal.doc_by_path("a.md"), journal.doc_by_path("b.md")
        journal.update_doc(a.doc_id, base_path="a.md", base_rev=1, base_hash=a.hash)
        journal.record_local([
            LocalChange(Op.MODIFIED, "b.md", hash="c" * 64, doc_id=b.doc_id, kind="text", **stamp),
            LocalChange(Op.DELETED, "a.md", doc_id=a.doc_id, kind="text"),
            LocalChange(Op.CREATED, "a.md", hash="d" * 64, kind="text", **{**stamp, "inode": 8}),
        ])
        assert journal.doc_by_path("a.md").doc_id == a.doc_id and journal.doc_by_path("a.md").hash == "d" * 64
        assert journal.doc_by_path("b.md").hash == "c" * 64
        assert journal.count_present() == 2
    finally:
        journal.close()


def test_bulk_writes_store_what_each_field_would_make_of_a_value(tmp_path: Path):
    """Bulk inserts and updates pass a value of its field's plain type as it is and any other through the
    field's db_value, row by row: a bool in an integer column, an int in a text one, a str enum, a str
    subclass, rows of mixed types in one run, and the key itself given as an int."""
    from syncengine.journal import Journal
    from syncengine.journal.api import _insert_rows
    from syncengine.models import Kind, LocalChange, Op

    class Name(str):
        pass

    journal = Journal.open(tmp_path / "journal.db")
    try:
        stamp = {"size": 3, "mtime_ns": 1, "ctime_ns": 1, "inode": 7, "mode": 0o644}
        journal.record_local([LocalChange(Op.CREATED, "a.json", hash="a" * 64, kind=Kind.JSON, **stamp),
                              LocalChange(Op.CREATED, "b.md", hash="b" * 64, kind="text", **{**stamp, "size": True})])
        a, b = journal.doc_by_path("a.json"), journal.doc_by_path("b.md")
        journal.batch(updates=[(a.doc_id, {"remote_path": Name("a.json"), "remote_rev": True, "error": 5}),
                               (b.doc_id, {"remote_path": "b.md", "remote_rev": 2, "error": None})])
        journal.batch(updates=[(123, {"error": "none has this id"})])
        rows = list(journal.execute("SELECT path, kind, typeof(kind), size, typeof(size), remote_path, remote_rev,"
                                    " typeof(remote_rev), error, typeof(error) FROM document ORDER BY path"))
        assert rows == [("a.json", "json", "text", 3, "integer", "a.json", 1, "integer", "5", "text"),
                        ("b.md", "text", "text", 1, "integer", "b.md", 2, "integer", None, "null")]
        # A field left out gets peewee's Python-side default, as insert_many would give it.
        journal.batch(changes=[{"doc_id": a.doc_id, "path": "a.json", "op": "modified"}])
        with journal.writing():
            _insert_rows(journal.db, journal.m.Change, [{"doc_id": b.doc_id, "path": "b.md", "op": "moved", "at": 9}])
        changes = list(journal.execute("SELECT doc_id, op, origin, at > 0 FROM change ORDER BY seq"))
        assert changes == [(a.doc_id, "created", "local", 1), (b.doc_id, "created", "local", 1),
                           (a.doc_id, "modified", "remote", 1), (b.doc_id, "moved", "local", 1)]
    finally:
        journal.close()


def test_new_document_ids_are_time_ordered_unique_and_wire_safe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Document ids increase in the order they are minted (the server's id index takes them as appends), within
    a millisecond, when the clock goes back, and from one generator to the next made after it (each
    record_local makes one); each is 32 hex digits with UUIDv7's version and variant, which the protocol
    accepts."""
    import uuid

    from syncengine import protocol
    from syncengine.journal import Journal, api
    from syncengine.models import LocalChange, Op

    first = api._doc_ids()
    ids = [first() for _ in range(5000)]
    second = api._doc_ids(batch=3)
    ids += [second() for _ in range(10)]
    monkeypatch.setattr(api.time, "time_ns", lambda: 0)  # a clock that went back: still increasing
    stuck = api._doc_ids()
    ids += [stuck() for _ in range(5000)]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    for doc_id in ids[::97]:
        parsed = uuid.UUID(doc_id)
        assert parsed.hex == doc_id and parsed.version == 7 and parsed.variant == uuid.RFC_4122
        assert protocol.check_id(doc_id, "doc_id") == doc_id
    monkeypatch.undo()

    journal = Journal.open(tmp_path / "journal.db")
    try:
        stamp = {"size": 3, "mtime_ns": 1, "ctime_ns": 1, "inode": 7, "mode": 0o644, "kind": "text"}
        for batch in (["b.md", "a.md"], ["c.md"]):
            journal.record_local([LocalChange(Op.CREATED, name, hash="a" * 64, **stamp) for name in batch])
        rows = [(row.path, row.doc_id) for row in journal.documents()]
        assert [path for path, _ in rows] == ["b.md", "a.md", "c.md"]
        assert [doc_id for _, doc_id in rows] == sorted(doc_id for _, doc_id in rows)
    finally:
        journal.close()


def test_the_unsettled_documents_are_read_through_their_partial_index(tmp_path: Path):
    """Migration 2 indexes the documents out of step; a journal made before it gains the index on open, and the
    round's read of them (Journal.unsettled) uses it — reading only those rows — and finds the same documents."""
    from syncengine.journal import Journal
    from syncengine.journal.api import MIGRATIONS, UNSETTLED
    from syncengine.models import LocalChange, Op

    path = tmp_path / "journal.db"
    db = open_sqlite(path)
    migrate(db, MIGRATIONS[:1], path)  # a journal as the first schema made it
    db.close()
    journal = Journal.open(path)  # runs migration 2
    try:
        assert schema_version(journal.db) == len(MIGRATIONS) >= 2
        stamp = {"size": 3, "mtime_ns": 1, "ctime_ns": 1, "inode": 7, "mode": 0o644}
        journal.record_local([LocalChange(Op.CREATED, f"d{i}.md", hash=f"{i:064x}", kind="text", **stamp)
                              for i in range(6)])
        docs = {row.path: row for row in journal.documents()}
        for name in ("d0.md", "d1.md", "d2.md"):  # in step: base = remote = local
            row = docs[name]
            journal.update_doc(row.doc_id, base_path=name, base_rev=1, base_hash=row.hash, base_mode=0o644,
                               remote_path=name, remote_rev=1, remote_hash=row.hash, remote_mode=0o644)
        journal.update_doc(docs["d3.md"].doc_id, remote_path="d3.md", remote_rev=2, base_rev=1, base_path="d3.md",
                           base_hash=docs["d3.md"].hash, remote_hash="f" * 64)  # changed on the server
        assert [row.path for row in journal.unsettled()] == ["d3.md", "d4.md", "d5.md"]
        scanned = journal.execute(f"SELECT path FROM document WHERE {UNSETTLED} ORDER BY id")  # same WHERE
        assert [path for (path,) in scanned] == ["d3.md", "d4.md", "d5.md"]
        sent: list[str] = []
        journal.db.connection().set_trace_callback(sent.append)
        journal.unsettled()
        journal.db.connection().set_trace_callback(None)
        (query,) = [sql for sql in sent if sql.startswith("SELECT")]
        plan = journal.execute(f"EXPLAIN QUERY PLAN {query}")
        assert any("USING INDEX document_unsettled" in step[-1] for step in plan), plan
    finally:
        journal.close()


def test_the_journal_is_read_through_a_memory_map_only_for_whole_table_reads(tmp_path: Path):
    """A read of every document's stamps or index goes through a map (no pread per page in a fresh process);
    other reads and every write do not (SQLite preads a page it changes after faulting it in). Writes go
    through the WAL, synchronous=FULL."""
    from syncengine.journal import Journal
    from syncengine.journal.api import JOURNAL_MMAP
    from syncengine.models import Kind, LocalChange, Op

    journal = Journal.open(tmp_path / "journal.db")
    try:
        assert journal.db.execute_sql("PRAGMA mmap_size").fetchone()[0] == 0
        assert journal.db.execute_sql("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert journal.db.execute_sql("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        journal.record_local([LocalChange(Op.CREATED, f"d/{i}.txt", hash=f"{i}" * 64, size=3, mtime_ns=i,
                                          ctime_ns=i, inode=i, mode=0o644, kind=Kind.TEXT) for i in range(3)])
        seen: list[int] = []
        real = journal.db.execute_sql

        def watching(sql, *args, **kwargs):
            if "FROM document" in sql.replace('"', ''):
                seen.append(real("PRAGMA mmap_size").fetchone()[0])
            return real(sql, *args, **kwargs)

        journal.db.execute_sql = watching
        journal.drop_stamps()
        with contextlib.suppress(FileNotFoundError):
            journal.stamps_copy.unlink()
        with journal.reading():
            assert len(journal.local_stamps()) == 3
        assert len(journal.local_index()) == 3
        assert seen == [JOURNAL_MMAP, JOURNAL_MMAP]
        assert len(journal.local_index(["d/1.txt"])) == 1
        assert seen[2:] == [0] and real("PRAGMA mmap_size").fetchone()[0] == 0
    finally:
        journal.close()


def test_the_stamps_copy_is_used_while_no_stamp_changed_and_never_after(tmp_path: Path):
    """local_stamps reads the rows once, then its copy (journal.db-stamps) while the token every write transaction
    that changes a stamp draws (migration 3) is unchanged: after such a write, here or through another process's
    connection, it reads the rows again; a torn copy is never believed."""
    from syncengine.journal import Journal
    from syncengine.models import LocalChange, Op

    path = tmp_path / "journal.db"
    journal = Journal.open(path)
    sent: list[str] = []
    journal.db.connection().set_trace_callback(sent.append)

    def stamps() -> dict:
        sent.clear()
        with journal.reading():
            got = journal.local_stamps()
        return got if any("FROM document" in sql for sql in sent) else {"(from the copy)": got}

    try:
        stamp = {"size": 3, "mtime_ns": 1, "ctime_ns": 1, "inode": 7, "mode": 0o644}
        journal.record_local([LocalChange(Op.CREATED, f"d{i}.md", hash=f"{i:064x}", kind="text", **stamp)
                              for i in range(3)])
        rows = {f"d{i}.md": (3, 1, 1, 7, 0o644) for i in range(3)}
        assert stamps() == rows and journal.stamps_copy.exists()
        assert stamps() == {"(from the copy)": rows}
        st = type("St", (), {"size": 4, "mtime_ns": 2, "ctime_ns": 2, "inode": 7, "mode": 0o644})
        journal.record_local([], [("d1.md", st)])  # a restamp, from the stamps just read: the copy is carried
        rows["d1.md"] = (4, 2, 2, 7, 0o644)
        assert stamps() == {"(from the copy)": rows}
        other = Journal.open(path)  # another process's connection
        try:
            doc = other.doc_by_path("d2.md")
            other.update_doc(doc.doc_id, mtime_ns=5)
            other.batch(deletes=[other.doc_by_path("d0.md").doc_id])
        finally:
            other.close()
        rows["d2.md"] = (3, 5, 1, 7, 0o644)
        del rows["d0.md"]
        assert stamps() == rows
        data = journal.stamps_copy.read_bytes()
        journal.stamps_copy.write_bytes(data[:len(data) // 2] + bytes(len(data) - len(data) // 2))  # torn
        assert stamps() == rows
        assert stamps() == {"(from the copy)": rows}
        journal.update_state(guard="a write of no stamp")  # keeps the token: the copy stays valid
        assert stamps() == {"(from the copy)": rows}
    finally:
        journal.close()


def test_only_a_write_that_changes_a_stamp_draws_a_new_token(tmp_path: Path):
    """The copy of the stamps outlives a push's or a pull's writes (base and remote columns, a document
    known only to the server, sync_state), on any connection; a change of any stamp column, a document
    coming or going with a path, or a renamed path draws a new token, as does any write on a connection
    whose watch is gone (fail safe)."""
    from syncengine.journal import Journal
    from syncengine.models import LocalChange, Op

    path = tmp_path / "journal.db"
    journal = Journal.open(path)
    stamp = {"size": 3, "mtime_ns": 1, "ctime_ns": 1, "inode": 7, "mode": 0o644}
    journal.record_local([LocalChange(Op.CREATED, f"d{i}.md", hash=f"{i:064x}", kind="text", **stamp)
                          for i in range(3)])
    ids = {row.path: row.doc_id for row in journal.documents()}

    def token() -> str:
        return journal.db.execute_sql("SELECT stamps_token FROM sync_state").fetchone()[0]

    try:
        kept = token()
        journal.batch(updates=[(ids["d0.md"], {"base_rev": 1, "base_hash": "0" * 64, "base_path": "d0.md",
                                              "remote_rev": 1, "remote_hash": "0" * 64, "remote_path": "d0.md"})],
                      inserts=[{"doc_id": "remote-only", "kind": "text", "remote_path": "r.md", "remote_rev": 2}],
                      state={"last_seq": 9})
        journal.update_doc(ids["d1.md"], error="refused", size=3)  # a stamp column set to the value it had
        journal.batch(deletes=["remote-only"])
        assert token() == kept
        other = Journal.open(path)  # another process's connection, and a second thread's
        try:
            other.update_doc(ids["d2.md"], base_rev=4)
            worker = threading.Thread(target=lambda: journal.update_doc(ids["d2.md"], remote_rev=4))
            worker.start()
            worker.join()
            assert token() == kept
            for column, value in (("size", 4), ("mtime_ns", 2), ("ctime_ns", 2), ("inode", 8), ("mode", 0o755),
                                  ("path", "moved.md")):
                before = token()
                other.update_doc(ids["d2.md"], **{column: value})
                assert token() != before, column
            before = token()
            other.batch(inserts=[{"doc_id": "new", "kind": "text", "path": "n.md", "hash": "1" * 64}])
            assert token() != before
            before = token()
            other.batch(deletes=["new"])
            assert token() != before
        finally:
            other.close()
        journal.db.execute_sql("DROP TRIGGER temp.stamps_updated")  # an unwatched connection draws on every write
        before = token()
        journal.update_doc(ids["d1.md"], base_rev=7)
        assert token() != before
    finally:
        journal.close()


def test_a_new_journal_has_16k_pages_and_an_old_one_keeps_its_own(tmp_path: Path):
    """JOURNAL_PAGE_SIZE is set before the WAL mode makes the file; a 4 KiB journal made before opens as it is."""
    from syncengine.journal import Journal
    from syncengine.models import LocalChange, Op

    fresh = Journal.open(tmp_path / "new.db")
    try:
        assert fresh.db.execute_sql("PRAGMA page_size").fetchone()[0] == 16384
        assert fresh.db.execute_sql("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        fresh.close()
    old = tmp_path / "old.db"
    con = sqlite3.connect(old)
    con.execute("PRAGMA page_size = 4096")
    con.execute("PRAGMA journal_mode = wal")
    con.close()
    for _ in range(2):
        journal = Journal.open(old)
        try:
            assert journal.db.execute_sql("PRAGMA page_size").fetchone()[0] == 4096
            with journal.writing():
                journal.record_local([LocalChange(Op.CREATED, f"{len(journal.documents())}.txt", hash="a" * 64,
                                                  size=1, mtime_ns=1, ctime_ns=1, inode=1, mode=0o644, kind="text")])
        finally:
            journal.close()
    journal = Journal.open(old)
    try:
        assert sorted(row.path for row in journal.documents()) == ["0.txt", "1.txt"]
        assert journal.integrity_ok()
    finally:
        journal.close()
