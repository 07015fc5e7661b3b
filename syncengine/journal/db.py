"""Opening SQLite files, numbered migrations, and peewee errors turned into ours."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path

from syncengine.errors import BusyError, FileSystemError, JournalDamaged, SyncEngineError
from syncengine.journal.orm import pw

Migration = Callable[[pw.Database], None]

_DAMAGED = ("malformed", "not a database", "file is encrypted", "disk image", "no such table")


def open_sqlite(path: Path, *, synchronous: str = "FULL", mmap: int = 0,
                page_size: int | None = None) -> pw.SqliteDatabase:
    """A WAL-mode database with the settings RELIABILITY §2 rule 10 asks for.

    ``mmap`` bytes of the file are read through a memory map instead of one
    ``pread`` per page (writes still go through the WAL): a fresh process's
    first full read of a large table is a page fault per page, not a syscall.
    ``page_size`` applies to a database this call creates (it is set before
    the WAL mode makes the file); an existing one keeps its own.
    """
    db = pw.SqliteDatabase(
        str(path),
        pragmas={
            **({"page_size": page_size} if page_size else {}),
            "journal_mode": "wal",
            "synchronous": synchronous,
            "foreign_keys": 1,
            "busy_timeout": 10_000,
            "cache_size": -16_000,
            "mmap_size": mmap,
        },
        timeout=10,
        check_same_thread=False,
    )
    with translate(path):
        db.connect(reuse_if_open=True)
    return db


@contextlib.contextmanager
def translate(path: Path | None = None) -> Iterator[None]:
    """Turn sqlite/peewee failures into our errors, once, at the journal's edge."""
    try:
        yield
    except (pw.DatabaseError, sqlite3.DatabaseError) as exc:
        raise map_error(exc, path) from exc


def map_error(exc: BaseException, path: Path | None) -> SyncEngineError:
    text = str(exc).lower()
    where = str(path) if path else "journal"
    if "locked" in text or "busy" in text:
        return BusyError(f"the database is busy ({where})", hint="another process holds it; retry")
    if "disk" in text and "full" in text:
        return FileSystemError(f"disk full while writing {where}", title="Disk full")
    if "readonly" in text or "read-only" in text:
        return FileSystemError(f"{where} is read-only", title="Read-only file system")
    if any(word in text for word in _DAMAGED):
        return JournalDamaged(f"{where} is damaged ({exc})", paths=[where])
    if "unable to open" in text:
        return FileSystemError(f"cannot open {where} ({exc})")
    return SyncEngineError(f"database error in {where}: {exc}")


def schema_version(db: pw.Database) -> int:
    return db.execute_sql("PRAGMA user_version").fetchone()[0]


def migrate(db: pw.Database, migrations: list[Migration], path: Path) -> int:
    """Apply the numbered migrations this file lacks; returns the version reached.

    Migration N (1-based) brings the schema from N-1 to N and records N in
    ``user_version`` inside the same transaction, so a kill mid-migration
    leaves the previous version intact.
    """
    with translate(path):
        current = schema_version(db)
        if current > len(migrations):
            raise JournalDamaged(
                f"{path.name} has schema version {current}, newer than this syncengine knows ({len(migrations)})",
                hint="upgrade syncengine, or run `syncengine repair` to rebuild it",
            )
        for number in range(current + 1, len(migrations) + 1):
            with db.atomic("IMMEDIATE"):
                migrations[number - 1](db)
                db.execute_sql(f"PRAGMA user_version = {number}")
        return len(migrations)


def integrity_ok(db: pw.Database) -> bool:
    try:
        rows = db.execute_sql("PRAGMA integrity_check").fetchall()
    except (pw.DatabaseError, sqlite3.DatabaseError):
        return False
    return rows == [("ok",)]
