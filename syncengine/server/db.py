"""The server's database: opening SQLite or PostgreSQL, the tables, numbered migrations.

The only module of the server that knows peewee's models; :mod:`.storage`
runs the queries. Models are built per database (:func:`make_models`) so two
servers in one process (tests) never share a binding.

Schema version and the server's random id live in the ``meta`` table, so the
same code migrates SQLite and PostgreSQL. Migrations run under a lock
(``BEGIN IMMEDIATE`` / ``pg_advisory_xact_lock``), so two server processes
starting together on one fresh PostgreSQL migrate it once.
"""

from __future__ import annotations

import contextlib
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import urlsplit

import peewee as pw
from playhouse.pool import PooledPostgresqlDatabase, PooledSqliteDatabase

from syncengine.errors import BusyError, RemoteError, UsageError

DB_FILE = "server.db"
WAL_AUTOCHECKPOINT = 20_000  # pages (~80 MB): see the pragmas of _sqlite
JOURNAL_SIZE_LIMIT = 16 << 20  # bytes of WAL kept on disk once checkpointed and reset
_ADVISORY_KEY = 0x5E_C0DE  # pg_advisory_xact_lock key for migrations


class StorageError(RemoteError):
    """The server database failed or is unreachable (500 for requests, exit 3 for admin)."""

    title = "Server storage error"


def open_database(db_url: str | None, data_dir: Path | None) -> pw.Database:
    """A pooled database for ``--db URL`` (PostgreSQL) or ``--data DIR`` (SQLite)."""
    if db_url:
        parts = urlsplit(db_url)
        if parts.scheme in ("postgres", "postgresql"):
            attach_psycopg2()
            db = PooledPostgresqlDatabase(
                None, max_connections=32, stale_timeout=300, timeout=30, autoconnect=False
            )
            db.init(parts.path.lstrip("/") or None, dsn=db_url)
            return db
        if parts.scheme == "sqlite":
            return _sqlite(Path(parts.path))
        raise UsageError(
            f"--db must be a postgresql:// or sqlite:// URL, not {parts.scheme or db_url!r}"
        )
    folder = Path(data_dir or "syncengine-server")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create the data folder {folder}: {exc.strerror}") from exc
    return _sqlite(folder / DB_FILE)


_attach_lock = threading.Lock()


def attach_psycopg2() -> None:
    """Give peewee the psycopg2 driver, if the client's journal imported it without (syncengine/journal/orm.py).

    The same as peewee's own ``try: import psycopg2`` at import: its module
    globals and the transaction states its adapter reads (peewee 4.5's
    source). Idempotent; a no-op when peewee was imported the plain way.
    """
    with _attach_lock:
        if pw.psycopg2 is not None:
            return
        import psycopg2
        from psycopg2 import extensions, extras

        extras.register_uuid()
        pw.psycopg2 = psycopg2
        pw.pg_extensions = extensions
        pw.pg_register_uuid = extras.register_uuid
        pw.Json_pg2 = extras.Json
        adapter = getattr(pw, "Psycopg2Adapter", None)
        if adapter is not None:  # older peewee read the globals in the database class itself
            adapter.txn_idle = extensions.TRANSACTION_STATUS_IDLE
            adapter.txn_inerror = extensions.TRANSACTION_STATUS_INERROR
            adapter.txn_unknown = extensions.TRANSACTION_STATUS_UNKNOWN


def _ensure_wal(path: Path, timeout: float = 30.0) -> None:
    """Put the database in WAL mode once, before any pooled connection opens it.

    WAL is a property of the file, so this is needed once; but as a pragma of
    every connection, servers starting together on a fresh file raced to
    switch it, and SQLite answers a busy journal-mode switch with "database
    is locked" at once, without waiting out busy_timeout. Here it is retried.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            with contextlib.closing(sqlite3.connect(str(path), timeout=timeout)) as conn:
                if conn.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                    conn.execute("PRAGMA journal_mode = wal")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc).lower() and "busy" not in str(exc).lower():
                raise StorageError(f"cannot open the server database {path}: {exc}") from exc
            if time.monotonic() > deadline:
                raise BusyError(f"the server database is busy: {exc}") from exc
            time.sleep(0.05)


def _sqlite(path: Path) -> pw.Database:
    _ensure_wal(path)
    return PooledSqliteDatabase(
        str(path),
        max_connections=64,
        stale_timeout=None,
        timeout=30,
        autoconnect=False,
        check_same_thread=False,
        # FULL: in WAL mode each commit is fsynced before it returns, so a
        # commit the server has answered survives a power cut. NORMAL syncs only
        # at checkpoints and may lose the last answered commits, which clients
        # have already recorded as pushed.
        #
        # temp_store MEMORY: a group commit runs each commit in a SAVEPOINT, whose
        # sub-journal (the pages' old bytes, to roll one commit back alone) went to
        # a temp file, ~10 MB of writes per 10,000 documents; it is never read
        # after a crash (the WAL is), so memory is as safe.
        pragmas={
            "synchronous": "FULL",
            "foreign_keys": 1,
            "busy_timeout": 30_000,
            "temp_store": "MEMORY",
            # Checkpoints run on a thread of their own once writes pause
            # (.checkpointer), not inside the COMMIT of the writer that took the
            # WAL past 1,000 pages; this is the net should writes never pause.
            "wal_autocheckpoint": WAL_AUTOCHECKPOINT,
            # The WAL keeps its peak size on disk after a checkpoint (~43 MB after
            # a 10k first sync); SQLite cuts it back to this when it next resets it.
            "journal_size_limit": JOURNAL_SIZE_LIMIT,
        },
    )


def is_postgres(db: pw.Database) -> bool:
    return isinstance(db, pw.PostgresqlDatabase)


@contextlib.contextmanager
def translated() -> Iterator[None]:
    """Turn driver and peewee errors into StorageError (BusyError when locked)."""
    try:
        yield
    except (pw.OperationalError, sqlite3.OperationalError) as exc:
        if "locked" in str(exc).lower() or "busy" in str(exc).lower():
            raise BusyError(f"the server database is busy: {_first_line(exc)}") from exc
        raise StorageError(f"database error: {_first_line(exc)}") from exc
    except (pw.DatabaseError, pw.InterfaceError, sqlite3.DatabaseError) as exc:
        raise StorageError(f"database error: {_first_line(exc)}") from exc


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def make_models(db: pw.Database) -> SimpleNamespace:
    class Base(pw.Model):
        class Meta:
            database = db
            legacy_table_names = False

    class Meta(Base):
        """Key/value facts about the database: schema_version, server_id."""

        key = pw.CharField(primary_key=True)
        value = pw.TextField()

    class Workspace(Base):
        """One workspace; its row is the lock that orders its commits."""

        name = pw.CharField(unique=True)
        last_seq = pw.BigIntegerField(default=0)
        min_seq = pw.BigIntegerField(default=1)  # raised by a server-side gc
        created_ns = pw.BigIntegerField()

    class Token(Base):
        """A bearer token, scoped to one workspace, stored as its sha256."""

        public_id = pw.CharField(unique=True)  # shown by `token list`, taken by `token revoke`
        workspace = pw.ForeignKeyField(Workspace, on_delete="CASCADE")
        token_hash = pw.CharField(unique=True)
        prefix = pw.CharField()  # first characters, to recognise a token without showing it
        label = pw.TextField(null=True)
        created_ns = pw.BigIntegerField()
        revoked_ns = pw.BigIntegerField(null=True)

    class Document(Base):
        """A document's current state; ``path_key`` is NULL for deleted ones."""

        workspace = pw.ForeignKeyField(Workspace, on_delete="CASCADE")
        doc_id = pw.CharField()
        path = pw.TextField()
        path_key = pw.TextField(null=True)  # casefolded path of a live doc: unique per workspace
        rev = pw.BigIntegerField()
        hash = pw.CharField(null=True)
        deleted = pw.BooleanField(default=False)
        executable = pw.BooleanField(default=False)
        size = pw.BigIntegerField(null=True)

        class Meta:
            indexes = ((("workspace", "doc_id"), True), (("workspace", "path_key"), True))

    class Change(Base):
        """The ordered change log; ``seq`` is gap-free per workspace."""

        workspace = pw.ForeignKeyField(Workspace, on_delete="CASCADE")
        seq = pw.BigIntegerField()
        doc_id = pw.CharField()
        path = pw.TextField()
        old_path = pw.TextField(null=True)
        hash = pw.CharField(null=True)
        deleted = pw.BooleanField(default=False)
        executable = pw.BooleanField(default=False)
        size = pw.BigIntegerField(null=True)
        op_id = pw.CharField(null=True)
        client_id = pw.CharField(null=True)
        received_ns = pw.BigIntegerField()

        class Meta:
            indexes = ((("workspace", "seq"), True),)

    class Op(Base):
        """The first answer given to each op id, replayed verbatim.

        Found by ``op_key`` (:func:`op_key`), the full id checked on a hit:
        op ids are random, so each commit of 100 new ones rewrote most leaves
        of an index on them; an index of 8-byte keys has a fifth as many.
        At most one row per (workspace, op_id): commits hold the workspace's
        write lock and look their op ids up before they insert.
        """

        workspace = pw.ForeignKeyField(Workspace, on_delete="CASCADE")
        op_id = pw.CharField()
        op_key = pw.BigIntegerField(null=True)  # null only in rows from before migration 3 (it fills them)
        result = pw.TextField()  # JSON of the CommitResult
        created_ns = pw.BigIntegerField()

        class Meta:
            indexes = ((("workspace", "op_key"), False),)

    class Blob(Base):
        """A blob of one workspace; its chunks are committed in the same transaction."""

        workspace = pw.ForeignKeyField(Workspace, on_delete="CASCADE")
        hash = pw.CharField()
        size = pw.BigIntegerField()
        chunks = pw.IntegerField()
        created_ns = pw.BigIntegerField()

        class Meta:
            indexes = ((("workspace", "hash"), True),)

    class BlobChunk(Base):
        """At most CHUNK_SIZE bytes of a blob, zlib-compressed when that paid (deflated by the client, for packs)."""

        blob = pw.ForeignKeyField(Blob, on_delete="CASCADE")
        idx = pw.IntegerField()
        compressed = pw.BooleanField()
        data = pw.BlobField()

        class Meta:
            indexes = ((("blob", "idx"), True),)

    class BlobPart(Base):
        """Part ``idx`` of a blob stored as a manifest: another blob of the same workspace.

        A manifest blob has no BlobChunk rows (``chunks`` = 0 with ``size`` > 0);
        its bytes are its parts' bytes in order. Parts are at most SMALL_BLOB,
        so a part is never itself a manifest.
        """

        blob = pw.ForeignKeyField(Blob, on_delete="CASCADE")
        idx = pw.IntegerField()
        part = pw.ForeignKeyField(Blob, backref="+", on_delete="RESTRICT")
        size = pw.BigIntegerField()

        class Meta:
            indexes = ((("blob", "idx"), True),)

    return SimpleNamespace(
        Meta=Meta,
        Workspace=Workspace,
        Token=Token,
        Document=Document,
        Change=Change,
        Op=Op,
        Blob=Blob,
        BlobChunk=BlobChunk,
        BlobPart=BlobPart,
    )


def _m1_initial(db: pw.Database, m: SimpleNamespace) -> None:
    db.create_tables([m.Workspace, m.Token, m.Document, m.Change, m.Op, m.Blob, m.BlobChunk])
    m.Meta.insert(key="server_id", value=secrets.token_hex(16)).on_conflict_ignore().execute()
    m.Meta.insert(key="created_ns", value=str(time.time_ns())).on_conflict_ignore().execute()


def _m2_blob_parts(db: pw.Database, m: SimpleNamespace) -> None:
    """Chunk manifests (DESIGN §4): a large blob may be stored as a list of part blobs."""
    db.create_tables([m.BlobPart])


def op_key(op_id: str) -> int:
    """The index key of an op id: its first 15 hex digits (60 bits, a positive BIGINT)."""
    return int(op_id[:15], 16)


def _m3_op_keys(db: pw.Database, m: SimpleNamespace) -> None:
    """Op rows indexed by op_key instead of the whole op_id (see the Op model)."""
    if "op_key" not in {c.name for c in db.get_columns("op")}:  # a database made before this version
        db.execute_sql('ALTER TABLE "op" ADD COLUMN "op_key" BIGINT')
    q = db.param
    while True:
        rows = db.execute_sql('SELECT "id", "op_id" FROM "op" WHERE "op_key" IS NULL LIMIT 5000').fetchall()
        if not rows:
            break
        cursor = db.cursor()
        for row_id, op_id in rows:
            cursor.execute(f'UPDATE "op" SET "op_key" = {q} WHERE "id" = {q}', (op_key(op_id), row_id))
    db.execute_sql('DROP INDEX IF EXISTS "op_workspace_id_op_id"')
    db.execute_sql('CREATE INDEX IF NOT EXISTS "op_workspace_id_op_key" ON "op" ("workspace_id", "op_key")')


MIGRATIONS: list[Callable[[pw.Database, SimpleNamespace], None]] = [_m1_initial, _m2_blob_parts, _m3_op_keys]


def migrate(db: pw.Database, m: SimpleNamespace) -> int:
    """Bring the schema to the newest version; returns it. Refuses a newer database."""
    with translated(), db.connection_context():
        lock = {} if is_postgres(db) else {"lock_type": "IMMEDIATE"}
        with db.atomic(**lock):
            if is_postgres(db):
                db.execute_sql("SELECT pg_advisory_xact_lock(%s)", (_ADVISORY_KEY,))
            db.create_tables([m.Meta])
            row = m.Meta.get_or_none(m.Meta.key == "schema_version")
            current = int(row.value) if row else 0
            if current > len(MIGRATIONS):
                raise UsageError(
                    f"the server database has schema version {current}, newer than this "
                    f"syncengine knows ({len(MIGRATIONS)}); upgrade syncengine"
                )
            for number in range(current + 1, len(MIGRATIONS) + 1):
                MIGRATIONS[number - 1](db, m)
                m.Meta.insert(key="schema_version", value=str(number)).on_conflict(
                    conflict_target=[m.Meta.key], update={m.Meta.value: str(number)}
                ).execute()
    return len(MIGRATIONS)
