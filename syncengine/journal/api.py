"""The Journal: every read and write of journal.db goes through these methods.

Writes run in ``BEGIN IMMEDIATE`` transactions behind a per-object lock, so
threads of one process queue up instead of spinning on SQLITE_BUSY and
other processes wait on the busy timeout. Bulk reads return tuples or
:class:`DocRow` values, never live model objects.
"""

from __future__ import annotations

import contextlib
import functools
import json
import marshal
import os
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, TypeVar

from syncengine.journal.db import integrity_ok, migrate, open_sqlite, translate
from syncengine.journal.orm import pw
from syncengine.journal.tables import make_models
from syncengine.models import LocalChange, Op

T = TypeVar("T")

@dataclass(slots=True)
class DocRow:
    """A document's three states as plain values (see tables.Document)."""

    id: int
    doc_id: str
    kind: str
    path: str | None
    hash: str | None
    size: int | None
    mtime_ns: int | None
    ctime_ns: int | None
    inode: int | None
    mode: int | None
    base_path: str | None
    base_rev: int | None
    base_hash: str | None
    base_mode: int | None
    remote_path: str | None
    remote_rev: int | None
    remote_hash: str | None
    remote_mode: int | None
    remote_seq: int | None
    remote_at: int | None
    local_at: int | None
    error: str | None

    @property
    def present(self) -> bool:
        return self.path is not None and self.hash is not None

    @property
    def has_base(self) -> bool:
        return self.base_rev is not None


DOC_FIELDS = [f.name for f in fields(DocRow)]


def now_ns() -> int:
    return time.time_ns()


def _doc_ids(batch: int = 256) -> Callable[[], str]:
    """New document ids: 32 hex digits laid out as a UUIDv7 (RFC 9562), in increasing order.

    Time-ordered, not random (DESIGN §2 says UUIDv4; the protocol takes any
    id of [A-Za-z0-9._-], and nothing reads an id's bits): the server
    indexes documents by id, one transaction per commit of 100, and 100
    random ids touched ~70 of the index's leaves each time (each written
    to its WAL again); ids in the order they were minted land on the last
    one or two. Each id is the time in ms (48 bits), the version (7), a
    12-bit counter that keeps ids minted in one millisecond in order
    (borrowing the next millisecond when it runs out, RFC 9562's method
    1), the variant and 62 random bits, which alone keep two replicas' ids
    apart. One urandom call per ``batch`` ids: 10,000 uuid4() calls were
    10,000 syscalls (~20 ms; this ~7).
    """
    pending: list[str] = []

    def new_id() -> str:
        if not pending:
            raw = os.urandom(8 * batch)
            with _CLOCK_LOCK:
                ms, counter = _clock
                now = time.time_ns() // 1_000_000
                if now > ms:
                    ms, counter = now, -1
                for i in range(0, len(raw), 8):
                    counter += 1
                    if counter > 0xFFF:
                        ms, counter = ms + 1, 0
                    rand = int.from_bytes(raw[i:i + 8]) & _RAND_B
                    pending.append(f"{ms << 80 | (0x7000 | counter) << 64 | _VARIANT | rand:032x}")
                _clock[:] = [ms, counter]
            pending.reverse()
        return pending.pop()

    return new_id


# The last (ms, counter) an id was minted with in this process: a generator made later mints larger ids.
_clock = [0, -1]
_CLOCK_LOCK = threading.Lock()
_RAND_B = (1 << 62) - 1
_VARIANT = 0b10 << 62  # RFC 9562's variant bits


_NEW_DOC = ("doc_id", "kind", "path", "hash", "size", "mtime_ns", "ctime_ns", "inode", "mode", "local_at")
_NEW_CHANGE = ("doc_id", "path", "op", "old_path", "hash", "size", "mode", "at", "origin", "zones")


def _stat(ch: LocalChange, at: int) -> dict[str, Any]:
    """The local stat columns of a document ``ch`` leaves present."""
    return {"hash": ch.hash, "size": ch.size, "mtime_ns": ch.mtime_ns, "ctime_ns": ch.ctime_ns, "inode": ch.inode,
            "mode": ch.mode, "local_at": at}


def _migration_1(db: pw.Database) -> None:
    models = make_models(db)
    db.create_tables(models.all)


# Documents not in step (see Journal.unsettled). IS, not =: every comparison
# must be true or false, never NULL, or a row with a NULL column would
# silently drop out of the sync.
_CLEAN = ("(base_rev IS NOT NULL AND remote_rev IS base_rev AND ("
          " (hash IS NULL AND base_hash IS NULL) OR"
          " (hash IS NOT NULL AND path IS base_path AND hash IS base_hash"
          "  AND (mode & 64) IS (base_mode & 64))))")
_GONE = "(path IS NULL AND base_rev IS NULL AND remote_rev IS NULL)"
UNSETTLED = f"NOT {_CLEAN} AND NOT {_GONE}"


def _migration_2(db: pw.Database) -> None:
    """A partial index of the unsettled documents, ordered by id.

    Every round reads them; without it that read evaluated the predicate on
    every row (22 ms on 50,000 in sync, every round, no-op or not); with it
    it reads only the rows out of step. SQLite uses it when a query's WHERE
    holds this same text, as Journal.unsettled's does.
    """
    db.execute_sql(f"CREATE INDEX document_unsettled ON document (id) WHERE {UNSETTLED}")


def _migration_3(db: pw.Database) -> None:
    """sync_state.stamps_token: a random value, drawn again by every write transaction that changes a stamp.

    (Every one that changed a row, at first; see _STAMP_TRIGGERS.)
    Journal.writing draws it before the transaction commits, and this
    package is the journal's only writer, so equal tokens mean equal
    stamps: the scanner's copy of them (Journal.local_stamps,
    ``journal.db-stamps``) is valid exactly while the token it was read
    with is current. Random, not a counter: a journal restored from a
    backup, or rebuilt, never reaches a token an older copy was written
    with. Not triggers: one per inserted row cost ~10 us (a first scan of
    10,000 files +0.1 s); this is one UPDATE per transaction.
    """
    db.execute_sql("ALTER TABLE sync_state ADD COLUMN stamps_token TEXT")
    db.execute_sql("UPDATE sync_state SET stamps_token = lower(hex(randomblob(8)))")


MIGRATIONS = [_migration_1, _migration_2, _migration_3]

# What the stamps copy holds (Journal.local_stamps): a row changes it only through these columns, or by
# coming or going with a path. So a transaction that changed none of them (a push's answers, a pull's
# remote states, sync_state) keeps the token and the copy stays valid: the no-op round after a push of
# 10,000 read every row again (~13 ms; 50,000: ~60). Updates and deletions are counted by temporary
# triggers calling a Python function; an insertion with a path is found by the ids above the highest
# one at the start (Journal._stamps_moved_since). Not an insert trigger: a statement that fires one
# keeps a statement journal of every page it changes, and a 10,000-file init took +0.13 s of CPU.
_STAMP_COLUMNS = ("path", "size", "mtime_ns", "ctime_ns", "inode", "mode")
_STAMP_TRIGGERS = [
    "CREATE TEMP TRIGGER IF NOT EXISTS stamps_deleted AFTER DELETE ON main.document"
    " WHEN OLD.path IS NOT NULL BEGIN SELECT stamps_moved(); END",
    f"CREATE TEMP TRIGGER IF NOT EXISTS stamps_updated AFTER UPDATE OF {', '.join(_STAMP_COLUMNS)}"
    f" ON main.document WHEN {' OR '.join(f'OLD.{c} IS NOT NEW.{c}' for c in _STAMP_COLUMNS)}"
    " BEGIN SELECT stamps_moved(); END",
]
_WATCHED = ("SELECT (SELECT count(*) FROM temp.sqlite_master WHERE type = 'trigger'"
            " AND name IN ('stamps_deleted', 'stamps_updated')), (SELECT coalesce(max(id), 0) FROM document)")


def _watch_stamps(conn: Any, moved: list[int]) -> None:
    """Count in ``moved[0]`` the rows whose stamps a statement on ``conn`` changed (see _STAMP_TRIGGERS).

    Temporary (this connection's own, nothing in the file), so a journal
    opened by an older syncengine is unchanged, and an older syncengine's
    connection, without them, simply draws a token on every write. A
    rolled-back statement still counts: that only draws a token more.
    Only statements that set a stamp column, or delete, fire them.
    """
    def count() -> None:
        moved[0] += 1

    conn.create_function("stamps_moved", 0, count)
    # A statement that fires a trigger keeps a statement journal (to undo just itself): in memory,
    # not a temporary file written page by page.
    conn.execute("PRAGMA temp_store = MEMORY")
    for sql in _STAMP_TRIGGERS:
        conn.execute(sql)


CARRY_MIN = 1000  # changes a scan's write carries the stamps copy across, whatever the workspace's size
# Address space only: pages are mapped as they are read. Only for reads of the whole table (see _mapped).
JOURNAL_MMAP = 1 << 30
# A new journal's pages (an existing one keeps its own). With SQLite's 4 KiB a first scan of
# 10,000 files wrote 12.7 MB of pages and WAL, with 16 KiB 6.7 MB, in a fifth less time.
JOURNAL_PAGE_SIZE = 16384


def _translated(method):
    @functools.wraps(method)
    def wrapper(self: Journal, *args, **kwargs):
        with translate(self.path):
            return method(self, *args, **kwargs)

    return wrapper


class Journal:
    """journal.db of one workspace."""

    def __init__(self, path: Path, db: pw.SqliteDatabase) -> None:
        self.path = path
        self.db = db
        self.m = make_models(db)
        self._write_lock = threading.RLock()
        # Write transactions that changed a row, in this process: a sync round
        # compares it before and after to know it wrote nothing.
        self.writes = 0
        self._state_sql: str | None = None
        self._moved = [0]  # rows whose stamps changed, on any of its connections (see _watch_stamps)
        # Carrying the stamps copy across a write (record_local, _carry_from): the stamps the
        # last local_stamps returned, with their token; how deep in nested writing() we are and
        # where the stamps stood when the outermost began; the stamps record_local left, with
        # where they stood then, saved when the outermost commits if nothing moved since.
        self._stamps_held: tuple[str | None, dict] | None = None
        self._depth = 0
        self._tx_mark: tuple[int, int] | None = None
        self._carry: tuple[dict, tuple[int, int] | None] | None = None

    @classmethod
    def open(cls, path: Path) -> Journal:
        # Not mapped, but while the whole table is read (see _mapped).
        db = open_sqlite(path, synchronous="FULL", page_size=JOURNAL_PAGE_SIZE)
        journal = cls(path, db)
        migrate(db, MIGRATIONS, path)
        with translate(path):
            _watch_stamps(db.connection(), journal._moved)
        # Every later connection (one per thread) watches too.
        db._initialize_connection = functools.partial(_watch_stamps, moved=journal._moved)
        with translate(path):
            journal._ensure_state()
        return journal

    def close(self) -> None:
        if not self.db.is_closed():
            self.db.close()

    @contextlib.contextmanager
    def _mapped(self) -> Iterator[None]:
        """Read the journal's file through a memory map for the length of a read of the whole table.

        Through a map, a fresh process reads the table's pages without a
        ``pread`` each (the stamps of 50,000 documents: 89 -> 78 ms). But
        SQLite takes a page it is about to change with a ``pread`` even then,
        after the faults of the B-tree descent that found it: a scan's
        journaling of 120 changes spent ~7.9 ms in its UPDATE mapped
        against ~5.6 ms not (medians of six). So the map is on only here.
        SQLite changes the limit only while no mapped page is out, and a
        pragma, not a transaction, sets it: it holds inside one.
        """
        self.db.execute_sql(f"PRAGMA mmap_size = {JOURNAL_MMAP}")
        try:
            yield
        finally:
            self.db.execute_sql("PRAGMA mmap_size = 0")

    def integrity_ok(self) -> bool:
        return integrity_ok(self.db)

    # ------------------------------------------------------------ writing

    def writing(self):
        """Context manager for one write transaction (IMMEDIATE, serialized)."""
        journal = self

        class _Tx:
            def __enter__(self_inner):
                journal._write_lock.acquire()
                try:
                    self_inner.tx = journal.db.atomic("IMMEDIATE")
                    self_inner.tx.__enter__()
                    self_inner.changes = journal.db.connection().total_changes
                    self_inner.mark = journal._stamp_mark()
                except BaseException:
                    journal._write_lock.release()
                    raise
                if journal._depth == 0:
                    journal._tx_mark, journal._carry = self_inner.mark, None
                journal._depth += 1
                return journal

            def __exit__(self_inner, *exc):
                outermost = journal._depth == 1
                try:
                    failed: BaseException | None = None
                    drawn = None
                    if (exc[0] is None and journal.db.connection().total_changes != self_inner.changes
                            and journal._stamps_moved_since(self_inner.mark)):
                        try:
                            with translate(journal.path):
                                drawn = journal._draw_stamps_token()
                        except BaseException as error:  # rolled back below, then raised
                            failed, exc = error, (type(error), error, error.__traceback__)
                    with translate(journal.path):
                        result = self_inner.tx.__exit__(*exc)
                    if failed is not None:
                        raise failed
                    if journal.db.connection().total_changes != self_inner.changes:
                        journal.writes += 1
                    carry = journal._carry
                    if outermost and drawn is not None and carry is not None \
                            and not journal._stamps_moved_since(carry[1]):
                        # Committed, and every stamp this transaction changed was record_local's.
                        journal._save_stamps(drawn, carry[0])
                    return result
                finally:
                    journal._depth -= 1
                    if outermost and journal._carry is not None:  # consumed (saved or not)
                        journal._carry = journal._stamps_held = None
                    journal._write_lock.release()

        return _Tx()

    def _stamp_mark(self) -> tuple[int, int] | None:
        """Where the stamps stand, for _stamps_moved_since: the watch's count and the highest document id.

        None if this connection is not watched (then every write draws a token).
        """
        watched, top = self.db.execute_sql(_WATCHED).fetchone()
        return (self._moved[0], top) if watched == len(_STAMP_TRIGGERS) else None

    def _stamps_moved_since(self, mark: tuple[int, int] | None) -> bool:
        """Whether a statement changed a stamp since ``mark``: an update or a deletion the triggers counted,
        or a document inserted with a path (an id above the mark's: ids only grow, a deletion being counted)."""
        now = self._stamp_mark()
        if mark is None or now is None or now[0] != mark[0]:
            return True
        return now[1] > mark[1] and self.db.execute_sql(
            "SELECT EXISTS (SELECT 1 FROM document WHERE id > ? AND path IS NOT NULL)", (mark[1],)).fetchone()[0]

    def _draw_stamps_token(self) -> str:
        """A new stamps_token for a transaction that changed a stamp, before it commits (migration 3)."""
        token = os.urandom(8).hex()
        self.db.execute_sql("UPDATE sync_state SET stamps_token = ? WHERE id = 1", (token,))
        return token

    # ------------------------------------------------------------ sync state

    def _ensure_state(self) -> None:
        S = self.m.SyncState
        if S.select().where(S.id == 1).exists():
            return
        with self.writing():
            S.insert(id=1, client_id=uuid.uuid4().hex).on_conflict_ignore().execute()

    @_translated
    def state(self) -> dict[str, Any]:
        state = self._stored_state()
        if state["last_sync_at"] is not None:
            with contextlib.suppress(OSError):
                state["last_sync_at"] = max(state["last_sync_at"], os.stat(self.quiet_sync_marker).st_mtime_ns)
        return state

    def _stored_state(self) -> dict[str, Any]:
        # Straight from the cursor, through each field's own python_value (as peewee's dicts() does):
        # a round reads the state six times or more, and peewee built the query each time (~0.25 ms).
        fields = self.m.SyncState._meta.sorted_fields
        if self._state_sql is None:
            columns = ", ".join('"' + f.column_name + '"' for f in fields)
            self._state_sql = f"SELECT {columns} FROM sync_state WHERE id = 1"
        row = self.db.execute_sql(self._state_sql).fetchone()
        if row is None:
            raise self.m.SyncState.DoesNotExist("no sync_state row")
        return {f.name: None if value is None else f.python_value(value)
                for f, value in zip(fields, row, strict=True)}

    @property
    def quiet_sync_marker(self) -> Path:
        """A file whose mtime is the time of the last successful round that changed nothing (see record_sync_ok)."""
        return self.path.with_name(self.path.name + "-quiet-sync")

    def record_sync_ok(self, at: int, *, quiet: bool) -> None:
        """A round succeeded at ``at``: in sync_state, or for a quiet round only by touching a marker.

        A round that wrote nothing (``quiet``) and finds the state already
        saying "last sync ok, no error" sets the marker's mtime instead of
        writing the journal: a no-op sync then writes and fsyncs nothing.
        The marker is not made durable: after a crash ``state()`` may show an
        earlier successful round, never a later one. It counts only once
        the journal itself records a successful sync (a rebuilt journal
        starts from "never").
        """
        ok = {"last_sync_ok": True, "last_error": None, "unreachable_since": None}
        if quiet:
            state = self.state()
            if state["last_sync_at"] is not None and all(state[k] == v for k, v in ok.items()):
                marker = self.quiet_sync_marker
                try:
                    os.utime(marker, ns=(at, at))
                    return
                except FileNotFoundError:
                    with contextlib.suppress(OSError):
                        os.close(os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644))
                        os.utime(marker, ns=(at, at))
                        return
                except OSError:
                    pass
        self.update_state(last_sync_at=at, **ok)

    @_translated
    def update_state(self, **values: Any) -> None:
        """Set sync_state columns; values it already holds are not written (a no-op round writes nothing)."""
        S = self.m.SyncState
        with self.writing():
            current = self._stored_state()
            changed = {k: v for k, v in values.items() if current[k] != v}
            if changed:
                S.update(**changed).where(S.id == 1).execute()

    @property
    def client_id(self) -> str:
        return self.state()["client_id"]

    # ------------------------------------------------------------ documents

    def _rows(self, query: pw.Query) -> list[DocRow]:
        # Straight from the cursor (the columns are plain text and integers):
        # peewee's per-column converters were most of the cost of reading
        # 50,000 rows, as a first sync or a big pull does.
        sql, params = query.sql()
        return [DocRow(*row) for row in self.db.execute_sql(sql, params)]

    def _doc_select(self) -> pw.Query:
        D = self.m.Document
        return D.select(*[getattr(D, name) for name in DOC_FIELDS])

    @_translated
    def documents(self) -> list[DocRow]:
        return self._rows(self._doc_select().order_by(self.m.Document.id))

    @_translated
    def doc_by_path(self, path: str) -> DocRow | None:
        rows = self._rows(self._doc_select().where(self.m.Document.path == path))
        return rows[0] if rows else None

    @_translated
    def doc_by_id(self, doc_id: str) -> DocRow | None:
        rows = self._rows(self._doc_select().where(self.m.Document.doc_id == doc_id))
        return rows[0] if rows else None

    @_translated
    def docs_touching(self, path: str) -> list[DocRow]:
        """Documents whose local, base or remote path is ``path`` (for diff and log)."""
        D = self.m.Document
        return self._rows(
            self._doc_select().where((D.path == path) | (D.base_path == path) | (D.remote_path == path))
        )

    @_translated
    def local_index(self, paths: Iterable[str] | None = None) -> dict[str, tuple]:
        """path -> (doc_id, hash, size, mtime_ns, ctime_ns, inode, mode, kind) of present files (or of ``paths``)."""
        D = self.m.Document
        query = D.select(D.path, D.doc_id, D.hash, D.size, D.mtime_ns, D.ctime_ns, D.inode, D.mode, D.kind)
        # Straight from the cursor: peewee's per-column converters cost more
        # than the whole stat walk on 50,000 files, and these columns are plain.
        if paths is None:
            sql, params = query.where(D.path.is_null(False)).sql()
            with self._mapped():
                return {row[0]: row[1:] for row in self.db.execute_sql(sql, params)}
        out: dict[str, tuple] = {}
        for chunk in _chunks(list(paths), 500):
            sql, params = query.where(D.path.in_(chunk)).sql()
            out.update((row[0], row[1:]) for row in self.db.execute_sql(sql, params))
        return out

    @_translated
    def local_stamps(self) -> dict[str, tuple[int, int, int, int, int]]:
        """path -> (size, mtime_ns, ctime_ns, inode, mode): what a no-op scan compares, and nothing else.

        Leaving out the ids, hashes and kinds (three strings a row) makes this
        read 40% cheaper than :meth:`local_index` on 50,000 files; the scanner
        asks for the full rows of the few paths that differ.

        Read in a transaction (see :meth:`reading`). The stamps come from
        ``journal.db-stamps``, a copy tagged with the ``stamps_token`` it was
        read with (migration 3), while that token is current: loading it
        costs a third of reading 50,000 rows. A push's or a pull's writes
        keep the token (they change no stamp), and a scan's own write
        carries the copy across (record_local). A copy that is missing, stale
        or unreadable is replaced from the rows; it is not made durable (a
        torn one fails to load and is read again).
        """
        (token,) = self.db.execute_sql("SELECT stamps_token FROM sync_state WHERE id = 1").fetchone()
        copy = self.stamps_copy
        if token is not None:
            with contextlib.suppress(OSError, EOFError, ValueError, TypeError):
                with open(copy, "rb") as fh:
                    raw = fh.read()
                # A crc of the whole copy: a torn one (zeroes where a crash lost its
                # blocks) could otherwise load as a shorter dict with the right token.
                if int.from_bytes(raw[:4], "little") == zlib.crc32(memoryview(raw)[4:]):
                    held, stamps = marshal.loads(memoryview(raw)[4:])
                    if held == token and type(stamps) is dict:
                        self._stamps_held = (token, stamps)
                        return stamps
        with self._mapped():
            rows = self.db.execute_sql(
                "SELECT path, size, mtime_ns, ctime_ns, inode, mode FROM document WHERE path IS NOT NULL")
            stamps = {row[0]: row[1:] for row in rows}
        if token is not None:
            self._save_stamps(token, stamps)
        self._stamps_held = (token, stamps)  # None: a new journal no write has drawn a token for yet
        return stamps

    def drop_stamps(self) -> None:
        """Forget the stamps local_stamps last returned (kept for record_local's carry): a daemon
        between two scans of 50,000 files would otherwise hold them (~15 MB)."""
        self._stamps_held = None

    def _save_stamps(self, token: str, stamps: dict) -> None:
        """Write the copy of ``stamps`` (valid while ``token`` is current); a cache, so never durable nor fatal."""
        copy = self.stamps_copy
        # Version 2: no back-references. Version 4 records every object another one also holds
        # (a carried copy's entries all are) and its loads keeps a list of them: loading 10,000
        # stamps took 6.9 ms instead of 3.6.
        data = marshal.dumps((token, stamps), 2)
        tmp = copy.with_name(f"{copy.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        with contextlib.suppress(OSError):
            try:
                with open(tmp, "wb") as fh:
                    fh.write(zlib.crc32(data).to_bytes(4, "little"))
                    fh.write(data)
                os.replace(tmp, copy)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)

    def _carry_from(self, writes: int) -> dict | None:
        """The stamps this transaction starts from, if they are the ones local_stamps last returned.

        Those are known when nothing changed a stamp since that read: the
        token is still the one it was read with (no other transaction did)
        and no statement of this transaction did yet. Called inside
        record_local's transaction, for ``writes`` rows. Not for a batch
        that is most of the copy (a first scan): writing a copy of
        objects just made all over the heap cost more (~1 us an entry,
        10-15 ms for 10,000) than reading the rows in the next process.
        """
        held = self._stamps_held
        if held is None or writes > len(held[1]) // 4 + CARRY_MIN or self._stamps_moved_since(self._tx_mark):
            return None
        (token,) = self.db.execute_sql("SELECT stamps_token FROM sync_state WHERE id = 1").fetchone()
        return dict(held[1]) if token == held[0] else None

    @property
    def stamps_copy(self) -> Path:
        """The scanner's copy of every document's stamps (see local_stamps)."""
        return self.path.with_name(self.path.name + "-stamps")

    @contextlib.contextmanager
    def reading(self) -> Iterator[Journal]:
        """One read transaction: the queries inside see one state of the journal, whatever commits meanwhile."""
        with translate(self.path), self.db.atomic():
            yield self

    @_translated
    def count_present(self) -> int:
        D = self.m.Document
        return D.select().where(D.path.is_null(False)).count()

    @_translated
    def update_doc(self, doc_id: str, **values: Any) -> None:
        D = self.m.Document
        with self.writing():
            D.update(**values).where(D.doc_id == doc_id).execute()

    # ------------------------------------------------------------ recording local changes

    @_translated
    def record_local(
        self,
        changes: Iterable[LocalChange],
        restamps: Iterable[tuple[str, Any]] = (),
        *,
        origin: str = "local",
        at: int | None = None,
        zones: dict[str, list[str]] | None = None,
    ) -> list[int]:
        """Journal a batch of local changes in one transaction; returns their seqs.

        ``restamps`` are (path, FileStat) pairs whose content did not change
        (a touch, a chmod of nothing we sync): only the stat columns move, so
        the next scan does not hash them again.
        """
        at = at or now_ns()
        zones = zones or {}
        D, C = self.m.Document, self.m.Change
        seqs: list[int] = []
        changes = list(changes)
        restamps = list(restamps)
        with self.writing():
            # The stamps copy is carried across this write when the stamps it starts from are
            # known (a scan's): every stamp it changes is read back, so the next process loads the
            # copy instead of reading every row and writing the copy (10,000: ~4 instead of ~13 ms).
            carried = self._carry_from(len(changes) + len(restamps))
            if carried is not None:
                for path in self._paths_of([ch.doc_id for ch in changes if ch.doc_id]):
                    carried.pop(path, None)
            touched: list[str] = []
            # New rows as lists in _NEW_DOC's and _NEW_CHANGE's column order: a first scan
            # journals one of each per file, and a dict per row was a third of its Python.
            new_docs: list[list] = []
            change_rows: list[list] = []
            new_id = _doc_ids()
            # Paths an absent document last had: only those can be revived, so
            # a first scan of N new files runs no per-file query. A deletion in
            # this batch makes another document absent: then every path is asked.
            absent: set[str] | None = None
            deleted_here = False
            # Row updates go out in executemany runs, in order (one peewee query each was
            # most of journaling 120 changes); flushed before a query that must see them.
            updates: list[tuple[str, dict[str, Any]]] = []
            for ch in changes:
                doc_id = ch.doc_id
                op = ch.op
                if op is Op.CREATED:
                    if not doc_id:
                        if updates:
                            _update_rows(self.db, D, "doc_id", updates)
                            updates.clear()
                        if absent is None:
                            absent = self._absent_paths()
                        if deleted_here or ch.path in absent:
                            doc_id = self._revivable(ch.path)
                    if doc_id:
                        updates.append((doc_id, {"path": ch.path, "kind": ch.kind, **_stat(ch, at)}))
                        touched.append(doc_id)
                    else:
                        doc_id = new_id()
                        new_docs.append([doc_id, ch.kind, ch.path, ch.hash, ch.size, ch.mtime_ns, ch.ctime_ns,
                                         ch.inode, ch.mode, at])
                elif op is Op.DELETED:
                    deleted_here = True
                    touched.append(doc_id)
                    updates.append((doc_id, {"path": None, "hash": None, "size": None, "mtime_ns": None,
                                             "ctime_ns": None, "inode": None, "mode": None, "local_at": at}))
                else:  # modified or moved
                    updates.append((doc_id, {"path": ch.path, **_stat(ch, at)}))
                    touched.append(doc_id)
                change_rows.append([doc_id, ch.path, op.value, ch.old_path, ch.hash, ch.size, ch.mode, at, origin,
                                    json.dumps(zones[ch.path]) if ch.path in zones else None])
            _update_rows(self.db, D, "doc_id", updates)
            _insert_run(self.db, D, _NEW_DOC, new_docs)
            _insert_run(self.db, C, _NEW_CHANGE, change_rows)
            if change_rows:
                last = C.select(pw.fn.MAX(C.seq)).scalar()
                seqs = list(range(last - len(change_rows) + 1, last + 1))
            _update_rows(self.db, D, "path", (
                (path, {"size": st.size, "mtime_ns": st.mtime_ns, "ctime_ns": st.ctime_ns, "inode": st.inode,
                        "mode": st.mode}) for path, st in restamps))
            if carried is not None:
                # New rows hold what was inserted; every other row written is read back.
                carried.update((row[2], tuple(row[4:9])) for row in new_docs)
                carried.update(self._stamps_of(touched, [path for path, _st in restamps]))
                self._carry = (carried, self._stamp_mark())
        return seqs

    def _paths_of(self, doc_ids: list[str]) -> list[str]:
        """The present paths of these documents."""
        out: list[str] = []
        for chunk in _chunks(doc_ids, 500):
            sql = f"SELECT path FROM document WHERE path IS NOT NULL AND doc_id IN ({', '.join('?' * len(chunk))})"
            out.extend(path for (path,) in self.db.execute_sql(sql, chunk))
        return out

    def _stamps_of(self, doc_ids: list[str], paths: list[str]) -> Iterator[tuple[str, tuple]]:
        """(path, stamps) of these documents and of the documents at these paths, as local_stamps reads them."""
        for column, keys in (("doc_id", doc_ids), ("path", paths)):
            for chunk in _chunks(keys, 500):
                sql = ("SELECT path, size, mtime_ns, ctime_ns, inode, mode FROM document"
                       f" WHERE path IS NOT NULL AND {column} IN ({', '.join('?' * len(chunk))})")
                yield from ((row[0], row[1:]) for row in self.db.execute_sql(sql, chunk))

    def _absent_paths(self) -> set[str]:
        """The base and remote paths of documents absent here (what `_revivable` can find)."""
        D = self.m.Document
        query = D.select(D.base_path, D.remote_path).where(D.path.is_null()).tuples()
        return {p for row in query for p in row if p is not None}

    def _revivable(self, path: str) -> str | None:
        """A document absent here whose last known path is ``path``.

        Deleting a file and creating it again before a sync is an edit of the
        same document, and a file created where the server already has one is
        the same document seen from two sides (both-created or identical).
        """
        D = self.m.Document
        for column in (D.base_path, D.remote_path):
            row = (D.select(D.doc_id).where(D.path.is_null() & (column == path))
                   .order_by(D.id.desc()).tuples().first())
            if row:
                return row[0]
        return None

    # ------------------------------------------------------------ history

    @_translated
    def changes(self, path: str | None = None, limit: int | None = 20, doc_ids: Iterable[str] = ()) -> list[tuple]:
        """Newest first: (seq, at, op, path, old_path, hash, size, origin, snapshot_id, zones, doc_id)."""
        C = self.m.Change
        query = C.select(C.seq, C.at, C.op, C.path, C.old_path, C.hash, C.size, C.origin,
                         C.snapshot_id, C.zones, C.doc_id)
        ids = list(doc_ids)
        if path is not None:
            cond = (C.path == path) | (C.old_path == path) | C.path.startswith(path.rstrip("/") + "/")
            if ids:
                cond = cond | C.doc_id.in_(ids)
            query = query.where(cond)
        query = query.order_by(C.seq.desc())
        if limit:
            query = query.limit(limit)
        return list(query.tuples())

    @_translated
    def last_paths(self, doc_ids: Iterable[str]) -> dict[str, str]:
        """The path each document had at its latest journaled change (for absent ones)."""
        C = self.m.Change
        out: dict[str, str] = {}
        for chunk in _chunks(list(doc_ids), 500):
            latest = (C.select(C.doc_id, pw.fn.MAX(C.seq).alias("seq")).where(C.doc_id.in_(chunk))
                      .group_by(C.doc_id).alias("latest"))
            query = C.select(C.doc_id, C.path).join(latest, on=(C.seq == latest.c.seq))
            out.update(dict(query.tuples()))
        return out

    @_translated
    def last_change_seq(self) -> int:
        C = self.m.Change
        return C.select(pw.fn.MAX(C.seq)).scalar() or 0

    @_translated
    def unsnapshotted_count(self) -> int:
        C = self.m.Change
        return C.select(pw.fn.COUNT(pw.fn.DISTINCT(C.path))).where(C.snapshot_id.is_null()).scalar() or 0

    @_translated
    def current_manifest(self) -> dict[str, tuple[str, int | None, int | None]]:
        """path -> (hash, mode, size) of every file present, per the journal."""
        D = self.m.Document
        query = D.select(D.path, D.hash, D.mode, D.size).where(D.path.is_null(False) & D.hash.is_null(False))
        return {row[0]: row[1:] for row in query.tuples()}

    @_translated
    def add_snapshot(
        self,
        entries: list[tuple[str, str | None, int | None, int | None]],
        *,
        message: str | None,
        trigger: str,
        files: int,
        total_bytes: int,
        upto_seq: int,
    ) -> int:
        """Record a snapshot of (path, hash|None, mode, size) entries changed since the last one."""
        S, E, C = self.m.Snapshot, self.m.SnapshotEntry, self.m.Change
        with self.writing():
            snap_id = S.insert(created_at=now_ns(), message=message, trigger=trigger, files=files,
                               bytes=total_bytes, changed=len(entries), change_seq=upto_seq).execute()
            rows = [{"snapshot_id": snap_id, "path": p, "hash": h, "mode": m, "size": s} for p, h, m, s in entries]
            for chunk in _chunks(rows, 5000):
                E.insert_many(chunk).execute()
            C.update(snapshot_id=snap_id).where(C.snapshot_id.is_null() & (C.seq <= upto_seq)).execute()
        return snap_id

    @_translated
    def attach_changes(self, snapshot_id: int, upto_seq: int) -> int:
        """Mark the changes up to ``upto_seq`` no snapshot holds yet as held by ``snapshot_id``; how many.

        For a snapshot skipped because nothing differs from ``snapshot_id``:
        the changes journaled since are in it already (it stored a file as it
        was when read, which can be ahead of the journal), and left unmarked
        they would count as unsaved for ever.
        """
        C = self.m.Change
        with self.writing():
            return C.update(snapshot_id=snapshot_id).where(
                C.snapshot_id.is_null() & (C.seq <= upto_seq)).execute()

    @_translated
    def snapshots(self, limit: int | None = None) -> list[tuple]:
        """Newest first: (id, created_at, message, trigger, files, bytes, changed)."""
        S = self.m.Snapshot
        query = S.select(S.id, S.created_at, S.message, S.trigger, S.files, S.bytes, S.changed)
        query = query.order_by(S.id.desc())
        if limit:
            query = query.limit(limit)
        return list(query.tuples())

    @_translated
    def snapshot_row(self, snap_id: int) -> tuple | None:
        S = self.m.Snapshot
        query = S.select(S.id, S.created_at, S.message, S.trigger, S.files, S.bytes, S.changed)
        return query.where(S.id == snap_id).tuples().first()

    @_translated
    def snapshot_manifest(self, snap_id: int) -> dict[str, tuple[str, int | None, int | None]]:
        """Materialise snapshot ``snap_id``: path -> (hash, mode, size) as of then."""
        E = self.m.SnapshotEntry
        latest = (E.select(E.path, pw.fn.MAX(E.snapshot_id).alias("sid"))
                  .where(E.snapshot_id <= snap_id).group_by(E.path).alias("latest"))
        query = (E.select(E.path, E.hash, E.mode, E.size)
                 .join(latest, on=((E.path == latest.c.path) & (E.snapshot_id == latest.c.sid))))
        return {p: (h, m, s) for p, h, m, s in query.tuples() if h is not None}

    @_translated
    def snapshot_hashes(self) -> set[str]:
        E = self.m.SnapshotEntry
        return {h for (h,) in E.select(E.hash).where(E.hash.is_null(False)).distinct().tuples()}

    @_translated
    def fold_snapshots(self, oldest_kept: int) -> int:
        """Drop every snapshot older than ``oldest_kept``, folding them into it.

        Snapshots store deltas, so the oldest kept one is rewritten to hold
        its full materialised state first — every remaining snapshot still
        restores exactly. Returns how many snapshots were dropped.
        """
        S, E = self.m.Snapshot, self.m.SnapshotEntry
        with self.writing():
            dropped = S.select().where(S.id < oldest_kept).count()
            if not dropped:
                return 0
            full = self.snapshot_manifest(oldest_kept)
            E.delete().where(E.snapshot_id <= oldest_kept).execute()
            rows = [{"snapshot_id": oldest_kept, "path": p, "hash": h, "mode": m, "size": z}
                    for p, (h, m, z) in full.items()]
            for chunk in _chunks(rows, 5000):
                E.insert_many(chunk).execute()
            S.delete().where(S.id < oldest_kept).execute()
        return dropped

    @_translated
    def referenced_hashes(self) -> set[str]:
        """Every blob the journal may still need: snapshots, bases, conflicts, current and remote versions."""
        hashes = self.snapshot_hashes()
        D, K = self.m.Document, self.m.Conflict
        for column in (D.base_hash, D.hash, D.remote_hash):
            hashes |= {h for (h,) in D.select(column).where(column.is_null(False)).tuples()}
        for column in (K.local_hash, K.remote_hash, K.base_hash):
            hashes |= {h for (h,) in K.select(column).where(column.is_null(False)).tuples()}
        return hashes

    # ------------------------------------------------------------ conflicts

    @_translated
    def open_conflicts(self) -> list[dict[str, Any]]:
        K = self.m.Conflict
        return list(K.select().where(K.resolved_at.is_null()).order_by(K.id).dicts())

    @_translated
    def conflicts(self, include_resolved: bool = False) -> list[dict[str, Any]]:
        K = self.m.Conflict
        query = K.select().order_by(K.id)
        if not include_resolved:
            query = query.where(K.resolved_at.is_null())
        return list(query.dicts())

    # ------------------------------------------------------------ the sync layer

    @_translated
    def unsettled(self) -> list[DocRow]:
        """Documents not in step: no base, or local or remote differs from the base.

        Clean documents are excluded in SQL, so a no-op sync of a large
        workspace reads nothing it does not need (cost grows with changes).
        """
        D = self.m.Document
        # The partial index document_unsettled (migration 2) answers this WHERE.
        return self._rows(self._doc_select().where(pw.SQL(UNSETTLED)).order_by(D.id))

    @_translated
    def docs_by_ids(self, doc_ids: Iterable[str]) -> dict[str, DocRow]:
        D = self.m.Document
        ids = list(doc_ids)
        out: dict[str, DocRow] = {}
        for chunk in _chunks(ids, 500):
            for row in self._rows(self._doc_select().where(D.doc_id.in_(chunk))):
                out[row.doc_id] = row
        return out

    @_translated
    def docs_by_local_paths(self, paths: Iterable[str]) -> dict[str, DocRow]:
        D = self.m.Document
        out: dict[str, DocRow] = {}
        for chunk in _chunks(list(paths), 500):
            for row in self._rows(self._doc_select().where(D.path.in_(chunk))):
                out[row.path] = row
        return out

    @_translated
    def remote_known_ids(self) -> set[str]:
        D = self.m.Document
        return {d for (d,) in D.select(D.doc_id).where(D.remote_rev.is_null(False)).tuples()}

    @_translated
    def batch(
        self,
        *,
        updates: Iterable[tuple[str, dict[str, Any]]] = (),
        inserts: Iterable[dict[str, Any]] = (),
        renames: Iterable[tuple[str, str]] = (),
        deletes: Iterable[str] = (),
        changes: Iterable[dict[str, Any]] = (),
        conflicts: Iterable[dict[str, Any]] = (),
        state: dict[str, Any] | None = None,
    ) -> None:
        """Apply a set of document writes, change rows and state in ONE transaction.

        The sync layer decides; this only writes, atomically, so a kill at any
        point leaves either all of a step or none of it (RELIABILITY A2).
        ``renames`` give a local document the id the server knows it by.
        """
        D, C, K, S = self.m.Document, self.m.Change, self.m.Conflict, self.m.SyncState
        updates, inserts, renames, deletes, changes, conflicts = (
            list(items) for items in (updates, inserts, renames, deletes, changes, conflicts))
        if state and not (updates or inserts or renames or deletes or changes or conflicts):
            # A pull that found nothing new hands back the checkpoint it had: no transaction, nothing written.
            with translate(self.path):
                current = self._stored_state()
            state = {k: v for k, v in state.items() if current[k] != v}
        if not (state or updates or inserts or renames or deletes or changes or conflicts):
            return
        with self.writing():
            for old, new in renames:
                D.update(doc_id=new).where(D.doc_id == old).execute()
                C.update(doc_id=new).where(C.doc_id == old).execute()
            for doc_id in deletes:
                D.delete().where(D.doc_id == doc_id).execute()
            _insert_rows(self.db, D, inserts)
            _update_rows(self.db, D, "doc_id", updates)
            _insert_rows(self.db, C, ({"at": now_ns(), "origin": "remote", **c} for c in changes))
            for conflict in conflicts:
                if conflict.get("id"):
                    values = dict(conflict)
                    conflict_id = values.pop("id")
                    K.update(**values).where(K.id == conflict_id).execute()
                else:
                    K.insert(created_at=now_ns(), **conflict).execute()
            if state:
                # Straight to executemany (as the documents): peewee built this one-row UPDATE in ~40 us
                # of Python, once per batch of the push's answers, on the main thread.
                _update_rows(self.db, S, "id", [(1, state)])

    @_translated
    def conflict_for(self, doc_id: str) -> dict[str, Any] | None:
        K = self.m.Conflict
        return K.select().where((K.doc_id == doc_id) & K.resolved_at.is_null()).dicts().first()

    # ------------------------------------------------------------ raw access for the sync layer

    def execute(self, sql: str, params: Iterable[Any] = ()) -> Iterator[tuple]:
        """Escape hatch for the few aggregate queries the engine needs (read-only)."""
        with translate(self.path):
            return iter(self.db.execute_sql(sql, tuple(params)).fetchall())


def _chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


# Bulk writes go through sqlite3's executemany: peewee renders SQL value by
# value (about 0.25 ms a row), which made a first scan of 20,000 files spend
# most of its time building INSERT statements. Values still pass through
# each field's own db_value, and peewee's Python-side defaults are filled in
# as insert_many would.


# Field classes whose db_value returns a value of this exact type unchanged (peewee's adapt: int(v), str(v)).
_PLAIN: dict[type, type] = {pw.IntegerField: int, pw.BigIntegerField: int, pw.CharField: str, pw.TextField: str}


def _insert_rows(db: pw.Database, model: type[pw.Model], rows: Iterable[dict[str, Any]]) -> None:
    """INSERT dict rows, one executemany per run of rows with the same keys."""
    for keys, run in _runs(rows, key=lambda row: tuple(row)):
        # A run's rows all have ``keys``, in that order: their values() line up with them.
        _insert_run(db, model, keys, [[*row.values()] for row in run])


def _insert_run(db: pw.Database, model: type[pw.Model], keys: Iterable[str], rows: list[list[Any]]) -> None:
    """INSERT rows of values for the fields named ``keys``, in one executemany; the rows' lists may grow."""
    if not rows:
        return
    meta = model._meta
    keys = tuple(keys)
    fields = [meta.fields[k] for k in keys]
    missing = [(f, d) for f, d in meta.defaults.items() if f.name not in keys]
    names = [f.column_name for f in fields] + [f.column_name for f, _ in missing]
    sql = (f'INSERT INTO "{meta.table_name}" ({", ".join(f"{chr(34)}{n}{chr(34)}" for n in names)}) '
           f'VALUES ({", ".join("?" * len(names))})')
    params = _db_rows(fields, rows)
    if missing:
        for values in params:
            values += [f.db_value(d() if callable(d) else d) for f, d in missing]
    db.connection().executemany(sql, params)


def _update_rows(db: pw.Database, model: type[pw.Model], key: str,
                 updates: Iterable[tuple[Any, dict[str, Any]]]) -> None:
    """UPDATE ... WHERE key = ? for (key value, {column: value}) pairs, in the order given."""
    meta = model._meta
    table = meta.table_name
    where = meta.fields[key]
    for keys, run in _runs((u for u in updates if u[1]), key=lambda u: tuple(u[1])):
        fields = [meta.fields[k] for k in keys]
        assignments = ", ".join(f'"{f.column_name}" = ?' for f in fields)
        sql = f'UPDATE "{table}" SET {assignments} WHERE "{where.column_name}" = ?'
        params = _db_rows([*fields, where], [[*values.values(), ident] for ident, values in run])
        db.connection().executemany(sql, params)


def _db_rows(fields: list[pw.Field], rows: list[list[Any]]) -> list[list[Any]]:
    """Rows of values for ``fields`` as SQLite gets them, each value through its field's db_value.

    peewee's db_value coerces (int(), str()); a value already of the field's
    plain type (or None) comes out of it unchanged, so a row whose value
    types say so is passed as it is, checked once per combination of types.
    The push journals its answers from the sync's main thread, holding the
    GIL while the pipeline's other threads wait: a db_value call per value
    was 120,000 calls for a first push of 10,000 documents (31 ms of Python
    to build the rows; 15 ms this way). A first scan's inserts share it.
    """
    kinds = [_PLAIN.get(type(f)) for f in fields]
    checked: dict[tuple[type, ...], bool] = {}
    out = []
    for row in rows:
        types = tuple(map(type, row))
        plain = checked.get(types)
        if plain is None:
            plain = checked[types] = all(t is _NONE or t is k for t, k in zip(types, kinds, strict=True))
        out.append(row if plain else [v if v is None or type(v) is k else f.db_value(v)
                                      for v, k, f in zip(row, kinds, fields, strict=True)])
    return out


_NONE = type(None)


def _runs(items: Iterable[T], key: Any) -> Iterator[tuple[Any, list[T]]]:
    """Consecutive items sharing ``key(item)``: grouped without reordering anything."""
    current: Any = None
    run: list[T] = []
    for item in items:
        k = key(item)
        if run and k != current:
            yield current, run
            run = []
        current = k
        run.append(item)
    if run:
        yield current, run
