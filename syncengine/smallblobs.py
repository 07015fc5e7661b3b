"""Small blobs in one SQLite table (``objects/small.db``) instead of a file each.

A first sync keeps a merge base for every document, and most documents are
1-4 KB. As files, each base cost five syscalls (open, write, close, stat,
rename), each of which gives up the GIL; inside the pipelined push, where
four other threads run Python, each waits to get it back, and 10,000 bases
took ~2.5 s there against 0.25 s alone. One table takes a whole batch in a
single statement (``INSERT ... SELECT`` over ``json_each``: one
``sqlite3_step``, so one GIL release per batch; ``executemany`` releases it
once per row and, measured against four busy threads, took 5-14 s for
10,000 rows where the single statement took 1.5-1.9 s). Reads of blobs up
to 16 KiB are faster from the table than from files (6-10 us against
11-12 us here), slower above (25 against 16 us at 64 KiB), so the store
keeps only those in the table (:data:`syncengine.blobs.SMALL`).

Durability: WAL with ``synchronous=FULL``, so a committed row is on disk
when ``put`` returns, before the caller commits a journal row that names it
(DESIGN §4 rule 3). A killed writer leaves an uncommitted transaction that
SQLite discards on the next open: a blob is either whole and named or absent.

The CLI and the daemon may share a store, so writes wait for each other
(busy timeout) rather than fail; one connection per store and process,
guarded by a lock, because a push thread writes while the main thread reads.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence

from syncengine.errors import BlobStoreDamaged

BUSY_SECONDS = 60.0  # another process's batch commits in milliseconds; a minute means it is stuck
# Pages of a new store (an existing one keeps its own). With SQLite's 4 KiB, a 1-4 KB blob took a page
# to itself (one over 4,061 bytes two): 10,000 of them were ~12,000 WAL frames of two writes each, and
# as many again copied by the checkpoints. 16 KiB pages hold four or five: storing them took 0.31-0.33
# -> 0.17-0.19 s CPU and the file 40 -> 36 MB, reads unchanged (docs/performance.md).
PAGE_SIZE = 16384
_SCHEMA = "CREATE TABLE IF NOT EXISTS blob (digest TEXT PRIMARY KEY, stored_at REAL NOT NULL, data BLOB NOT NULL)"
# One statement for a whole batch: the rows' names and places in one JSON array, their bytes in one blob.
_PUT_ONE_STEP = (
    "INSERT INTO blob (digest, stored_at, data)"
    " SELECT json_extract(value, '$[0]'), ?3, substr(?2, json_extract(value, '$[1]'), json_extract(value, '$[2]'))"
    " FROM json_each(?1) WHERE true"  # WHERE: the parser needs it before an upsert clause
    " ON CONFLICT (digest) DO UPDATE SET stored_at = excluded.stored_at"
)
_PUT_ROW = ("INSERT INTO blob (digest, stored_at, data) VALUES (?, ?, ?)"
            " ON CONFLICT (digest) DO UPDATE SET stored_at = excluded.stored_at")
# sqlite's primary result codes -> the errno a person reads as the same trouble (11 and 26: _DAMAGED, below)
_ERRNO = {3: errno.EACCES, 5: errno.EBUSY, 6: errno.EBUSY, 8: errno.EROFS, 10: errno.EIO, 13: errno.ENOSPC,
          14: errno.EACCES}


_DAMAGED = (11, 26)  # SQLITE_CORRUPT, SQLITE_NOTADB: no retry helps, `repair` does


def os_error(exc: sqlite3.Error, path: str) -> OSError | BlobStoreDamaged:
    """An sqlite error as the OSError the rest of the store reports (a full disk is ENOSPC either way).

    A table that is no database, or a damaged one, is the workspace's trouble
    rather than one file's (exit 5, naming `repair`), never an internal error.
    """
    code = (getattr(exc, "sqlite_errorcode", None) or 0) & 0xFF
    if code in _DAMAGED:
        return BlobStoreDamaged(f"{path} is damaged: {exc}", paths=[path])
    err = _ERRNO.get(code, errno.EIO)
    return OSError(err, f"{exc} in {os.path.basename(path)}", path)


def check(path: str) -> str:
    """"ok", "missing" or "damaged": whether the table at ``path`` passes SQLite's quick check (for `repair`)."""
    if not os.path.exists(path):
        return "missing"
    try:
        con = sqlite3.connect(path, timeout=BUSY_SECONDS, isolation_level=None)
    except sqlite3.Error:
        return "damaged"
    try:
        rows = con.execute("PRAGMA quick_check").fetchall()
        con.execute("SELECT count(*) FROM blob").fetchone()
    except sqlite3.Error:
        return "damaged"
    finally:
        con.close()
    return "ok" if rows == [("ok",)] else "damaged"


def _close(con: sqlite3.Connection, pid: int) -> None:
    """Close a store's connection when the store goes or the process exits.

    A connection sits in a reference cycle (its statement cache), and the
    CLI skips the final garbage collection (``gc.freeze``): left to that, it
    never closed, and every process left ``small.db-wal`` behind. The last
    connection to close folds the WAL back into the table and removes it.
    Never in a forked child: the connection is its parent's.
    """
    if os.getpid() == pid:
        con.close()


def _set_up(con: sqlite3.Connection) -> None:
    """WAL, full sync, the page size of a new store and the table, waiting out another process doing the same.

    Two processes opening a new store at once meet while it is still in
    rollback mode, where SQLite answers "database is locked" at once,
    without its busy handler, to whichever would otherwise deadlock (one
    holds a read lock the other's write needs): retried here, as the busy
    timeout would.
    """
    deadline = time.monotonic() + BUSY_SECONDS
    pause = 0.001
    while True:
        try:
            if con.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                con.execute(f"PRAGMA page_size={PAGE_SIZE}")  # before the file is made; a no-op after
                con.execute("PRAGMA journal_mode=WAL")
            con.execute("PRAGMA synchronous=FULL")
            con.execute(_SCHEMA)
            return
        except sqlite3.OperationalError as exc:
            busy = (getattr(exc, "sqlite_errorcode", 0) or 0) & 0xFF in (5, 6)  # SQLITE_BUSY, SQLITE_LOCKED
            if not busy or time.monotonic() >= deadline:
                raise
            time.sleep(pause)
            pause = min(pause * 2, 0.05)


class SmallBlobs:
    """The table of one store: encoded blobs by name, with when each was last stored."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._con: sqlite3.Connection | None = None
        self._pid = 0
        self._one_step = True  # json_each available (SQLite's JSON functions are built in since 3.38)

    def _open(self, create: bool) -> sqlite3.Connection | None:
        """The connection (held lock); None when reading a store that never had a small blob."""
        if self._con is not None and self._pid == os.getpid():
            return self._con
        self._con = None  # a forked child opens its own; the parent's is not for it to use
        if not create and not os.path.exists(self.path):
            return None
        con = sqlite3.connect(self.path, timeout=BUSY_SECONDS, isolation_level=None, check_same_thread=False)
        try:
            _set_up(con)
            try:
                con.execute("SELECT count(*) FROM json_each('[]')").fetchone()
            except sqlite3.OperationalError:
                self._one_step = False
        except BaseException:
            con.close()
            raise
        self._con, self._pid = con, os.getpid()
        weakref.finalize(self, _close, con, self._pid)  # also runs at exit
        return con

    def _query(self, sql: str, params: Sequence[object] = ()) -> list[tuple]:
        with self._lock:
            try:
                con = self._open(create=False)
                return [] if con is None else con.execute(sql, params).fetchall()
            except sqlite3.Error as exc:
                raise os_error(exc, self.path) from exc

    def put(self, rows: Sequence[tuple[str, bytes]], stamp: float, before_commit: Callable[[], None]) -> None:
        """Store ``(name, encoded bytes)`` rows in one transaction; durable on return.

        ``before_commit`` runs inside the transaction (failpoints, injected
        faults); if it or the commit raises, nothing of the batch is stored.
        A name already present keeps its bytes and takes the new stamp, so gc's
        grace period counts from the latest store.
        """
        with self._transaction(create=True) as con:
            assert con is not None
            if self._one_step:
                places, offset = [], 1
                for name, data in rows:
                    places.append((name, offset, len(data)))
                    offset += len(data)
                con.execute(_PUT_ONE_STEP, (json.dumps(places), b"".join(data for _n, data in rows), stamp))
            else:
                con.executemany(_PUT_ROW, [(name, stamp, data) for name, data in rows])
            before_commit()

    def get(self, digest: str) -> bytes | None:
        found = self._query("SELECT data FROM blob WHERE digest = ?", (digest,))
        return found[0][0] if found else None

    def has(self, digest: str) -> bool:
        return bool(self._query("SELECT 1 FROM blob WHERE digest = ?", (digest,)))

    def stored_size(self, digest: str) -> int | None:
        found = self._query("SELECT length(data) FROM blob WHERE digest = ?", (digest,))
        return found[0][0] if found else None

    def stored_at(self, digest: str) -> float | None:
        found = self._query("SELECT stored_at FROM blob WHERE digest = ?", (digest,))
        return found[0][0] if found else None

    def entries(self) -> list[tuple[str, float, int]]:
        """Every blob as (name, stored at, bytes it takes)."""
        return self._query("SELECT digest, stored_at, length(data) FROM blob ORDER BY digest")

    @contextlib.contextmanager
    def _transaction(self, create: bool) -> Iterator[sqlite3.Connection | None]:
        """One write transaction (BEGIN IMMEDIATE: writers of other processes wait); rolled back on any error.

        Yields None, and writes nothing, when ``create`` is false and the
        store never had a small blob.
        """
        with self._lock:
            try:
                con = self._open(create=create)
                if con is None:
                    yield None
                    return
                con.execute("BEGIN IMMEDIATE")
                try:
                    yield con
                    con.execute("COMMIT")
                except BaseException:
                    if con.in_transaction:
                        con.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:
                raise os_error(exc, self.path) from exc

    def _write(self, sql: str, rows: Iterable[Sequence[object]]) -> None:
        with self._transaction(create=False) as con:
            if con is not None:
                con.executemany(sql, rows)

    def set_stored_at(self, digest: str, when: float) -> None:
        self._write("UPDATE blob SET stored_at = ? WHERE digest = ?", [(when, digest)])

    def delete(self, digests: Iterable[str]) -> None:
        self._write("DELETE FROM blob WHERE digest = ?", [(d,) for d in digests])

    def close(self) -> None:
        with self._lock:
            if self._con is not None and self._pid == os.getpid():
                self._con.close()
            self._con = None
