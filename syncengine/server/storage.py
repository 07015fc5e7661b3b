"""What the server keeps, and every transaction it runs on it.

One :class:`Storage` per server process, safe for the threads of its pool.
Each public method runs in its own connection and transaction, so a method
never spans two threads (Starlette iterates streaming bodies on different
worker threads).

Ordering: :meth:`Storage.commit` takes the workspace row's lock first
(``SELECT ... FOR UPDATE`` on PostgreSQL, ``BEGIN IMMEDIATE`` on SQLite),
allocates seqs from ``workspace.last_seq`` and commits the change rows and
the new ``last_seq`` together. The next committer to the workspace waits for
that lock, so a seq becomes visible only after every smaller one has: no
reader sees seq 11 before seq 10, across threads or processes.

Group commit (SQLite): the commits waiting for the writer when it frees run
in one transaction, each in its own SAVEPOINT, and share its COMMIT (one
fsync instead of one each). Each still reads ``last_seq`` as the one before
it in the group left it, so seqs stay gap-free and in order; none is
answered before the group's COMMIT returns, and if that fails all fail.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import hmac
import json
import secrets
import threading
import time
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from syncengine.errors import BusyError, UsageError
from syncengine.failpoints import failpoint
from syncengine.paths import casefold_key
from syncengine.protocol import CommitItem, CommitResult, CurrentDoc, check_workspace, deflate
from syncengine.server.checkpointer import Checkpointer
from syncengine.server.db import is_postgres, make_models, migrate, op_key, open_database, translated

_ZLIB_LEVEL = 1
_BUSY_TIMEOUT = 30.0  # seconds a writer waits for another, as the connections' busy_timeout
_PATIENCE = 0.1  # seconds a blob writer lets commits go first before it takes its turn anyway
PACK_PIECE = 250  # blobs of a pack stored per transaction: a commit waits for one piece, not the pack
GROUP_MAX = 32  # commits at most in one group transaction (of up to 100 items each: ~0.1 s of work)
_BLOB_HASHES = 'SELECT "hash" FROM "blob" WHERE "workspace_id" = {q} AND "hash" IN ({in_})'


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


@dataclass(frozen=True, slots=True)
class TokenInfo:
    """A token as `token list` shows it: never the token itself."""

    id: str
    workspace: str
    prefix: str
    label: str | None
    created_ns: int
    revoked_ns: int | None

    @property
    def revoked(self) -> bool:
        return self.revoked_ns is not None


@dataclass(frozen=True, slots=True)
class BlobInfo:
    pk: int
    hash: str
    size: int
    chunks: int

    @property
    def manifest(self) -> bool:
        """Stored as parts (BlobPart rows), not as chunks: a non-empty blob with no chunk."""
        return self.chunks == 0 and self.size > 0


@dataclass(frozen=True, slots=True)
class CommitOutcome:
    results: list[dict[str, Any]]
    last_seq: int
    applied: int  # new changes written by this request


@dataclass(eq=False, slots=True)
class _Job:
    """One commit request on SQLite: queued at the gate, then run by whichever thread leads its group."""

    ws_id: int
    client_id: str
    items: list[CommitItem]
    outcome: CommitOutcome | None = None
    error: BaseException | None = None
    taken: bool = False  # in a group's transaction now: it waits for that group, not for the writer
    done: bool = False  # the group ended (committed, or failed): outcome or error is final

    def answer(self) -> CommitOutcome:
        """The outcome; or its error raised again (a copy: one exception object must not unwind two threads)."""
        if self.error is not None:
            raise copy.copy(self.error) from self.error
        assert self.outcome is not None
        return self.outcome


def compress_chunk(data: bytes) -> tuple[bool, bytes]:
    """(compressed?, stored bytes): raw when zlib does not save at least 5%."""
    packed = deflate(data, _ZLIB_LEVEL)
    if len(packed) < len(data) * 0.95:
        return True, packed
    return False, data


_DOC_COLUMNS = ["path", "path_key", "rev", "hash", "deleted", "executable", "size"]  # as put_doc takes them
_json_str = json.encoder.encode_basestring_ascii  # a str as json.dumps writes it


@dataclass(slots=True)
class _Doc:
    """A document as one commit sees it (kept current as its items apply)."""

    doc_id: str
    rev: int
    path: str
    path_key: str | None
    hash: str | None
    deleted: bool
    executable: bool


class _CommitState:
    """What one commit transaction reads up front and the rows it will write."""

    def __init__(self, storage: Storage, ws_id: int, items: list[CommitItem]) -> None:
        self.storage = storage
        self.ws_id = ws_id
        self.ops: dict[str, str] = {}
        self.docs: dict[str, _Doc] = {}
        self.owners: dict[str, _Doc] = {}  # live path_key -> the document holding it
        self.sizes: dict[str, int] = {}
        # ("insert"|"update", doc_id, values in _DOC_COLUMNS order)
        self.doc_writes: list[tuple[str, str, tuple]] = []
        self.change_rows: list[tuple] = []
        self.op_rows: list[tuple] = []
        self.now = time.time_ns()  # received_ns and created_ns of every row this request writes
        doc_ids = list(dict.fromkeys(i.doc_id for i in items))
        # path -> path key, worked out once per request (NFC + casefold), read again by _apply
        self.keys = {i.path: casefold_key(i.path) for i in items if i.hash is not None}
        keys = list(dict.fromkeys(self.keys.values()))
        hashes = list(dict.fromkeys(i.hash for i in items if i.hash is not None))
        db = storage.db
        self.op_keys = {i.op_id: op_key(i.op_id) for i in items}  # read again for the rows written
        # A key may match another op id (60 bits): the full id decides.
        self.ops.update(row for row in _rows_in(db, 'SELECT "op_id", "result" FROM "op" WHERE "workspace_id" = {q} '
                                                   'AND "op_key" IN ({in_})', [ws_id],
                                                   list(dict.fromkeys(self.op_keys.values())))
                        if row[0] in self.op_keys)
        columns = '"doc_id", "rev", "path", "path_key", "hash", "deleted", "executable"'
        for row in _rows_in(db, f'SELECT {columns} FROM "document" WHERE "workspace_id" = {{q}} '
                               'AND "doc_id" IN ({in_})', [ws_id], doc_ids):
            self._remember(_Doc(*row))
        for row in _rows_in(db, f'SELECT {columns} FROM "document" WHERE "workspace_id" = {{q}} '
                               'AND "path_key" IN ({in_})', [ws_id], keys):
            doc = self.docs.get(row[0]) or _Doc(*row)
            self.owners[doc.path_key] = doc
        self.sizes.update(_rows_in(db, 'SELECT "hash", "size" FROM "blob" WHERE "workspace_id" = {q} '
                                      'AND "hash" IN ({in_})', [ws_id], hashes))

    def _remember(self, doc: _Doc) -> None:
        self.docs[doc.doc_id] = doc
        if doc.path_key is not None:
            self.owners[doc.path_key] = doc

    def put_doc(self, doc_id: str, doc: _Doc | None, values: tuple) -> None:
        """Record a document's new state (``values`` as _DOC_COLUMNS): in memory now, in the database at write()."""
        path, path_key, rev, digest, deleted, executable, _size = values
        if doc is None:
            self.doc_writes.append(("insert", doc_id, values))
            self._remember(_Doc(doc_id, rev, path, path_key, digest, deleted, executable))
            return
        self.doc_writes.append(("update", doc_id, values))
        if doc.path_key is not None and self.owners.get(doc.path_key) is doc:
            del self.owners[doc.path_key]
        doc.rev, doc.path, doc.path_key = rev, path, path_key
        doc.hash, doc.deleted, doc.executable = digest, deleted, executable
        if doc.path_key is not None:
            self.owners[doc.path_key] = doc

    def write(self) -> None:
        """The decided rows, in bulk; documents in decision order (path keys are unique)."""
        m, db = self.storage.m, self.storage.db
        D = m.Document
        ws_id = self.ws_id
        run: list[tuple[str, tuple]] = []
        kind = None
        for op, doc_id, values in [*self.doc_writes, ("end", "", ())]:
            if run and op != kind:
                if kind == "insert":
                    _executemany(db, D, ["workspace", "doc_id", *_DOC_COLUMNS],
                                 [(ws_id, doc_id_, *row) for doc_id_, row in run])
                else:
                    _executemany(db, D, _DOC_COLUMNS, [(*row, ws_id, doc_id_) for doc_id_, row in run],
                                 where=["workspace", "doc_id"])
                run = []
            kind = op
            run.append((doc_id, values))
        _executemany(db, m.Change, ["workspace", "seq", "doc_id", "path", "old_path", "hash", "deleted",
                                    "executable", "size", "op_id", "client_id", "received_ns"], self.change_rows)
        _executemany(db, m.Op, ["workspace", "op_id", "op_key", "result", "created_ns"], self.op_rows)


def _chunks(items: list, size: int = 1000) -> Iterable[list]:
    """Runs of at most ``size``: one query per request of MAX_HASHES (SQLite >= 3.32 takes 32766 variables)."""
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _rows_in(db: Any, template: str, head: list, values: list) -> list[tuple]:
    """The rows of ``template``'s SELECT for ``values``, which fill its one ``IN ({in_})``.

    Raw SQL (``{q}`` is the driver's placeholder) rather than a peewee query:
    peewee renders a query node by node and builds each row through field
    converters, which cost more than SQLite's own work for the IN lists of
    the hot paths (commit, missing, pack).
    """
    q = db.param
    cursor = db.cursor()
    out: list[tuple] = []
    for chunk in _chunks(values):
        cursor.execute(template.format(q=q, in_=", ".join([q] * len(chunk))), [*head, *chunk])
        out.extend(cursor.fetchall())
    return out


def _one(db: Any, sql: str, params: tuple) -> tuple | None:
    """Run one raw statement; its first row, if it has rows (psycopg2's execute returns None)."""
    cursor = db.cursor()
    cursor.execute(sql, params)
    return cursor.fetchone() if cursor.description else None


def _executemany(db: Any, model: Any, names: list[str], rows: list, *, where: list[str] | None = None) -> None:
    """INSERT rows (or UPDATE ... WHERE ``where``) with raw values.

    Values go to the driver as they are, not through the fields' db_value
    (a third of a pack's database time): callers pass what both sqlite3 and
    psycopg2 adapt the same way (int, str, bool, bytes, None).
    """
    if not rows:
        return
    meta = model._meta
    fields = [meta.fields[n] for n in names] + [meta.fields[n] for n in where or ()]
    q = db.param
    if where:
        sets = ", ".join(f'"{f.column_name}" = {q}' for f in fields[: len(names)])
        cond = " AND ".join(f'"{f.column_name}" = {q}' for f in fields[len(names) :])
        sql = f'UPDATE "{meta.table_name}" SET {sets} WHERE {cond}'
    else:
        cols = ", ".join(f'"{f.column_name}"' for f in fields)
        sql = f'INSERT INTO "{meta.table_name}" ({cols}) VALUES ({", ".join([q] * len(fields))})'
    if is_postgres(db):
        # psycopg2's executemany is one round trip per row; execute_batch sends them in one.
        from psycopg2.extras import execute_batch

        execute_batch(db.cursor(), sql, rows, page_size=1000)
    else:
        db.cursor().executemany(sql, rows)


class _WriterGate:
    """This process's SQLite writers, one at a time, commits first.

    Left to SQLite, a writer that finds the database locked polls it with
    sleeps of 1, 2, 5, 10, 15... ms: a commit arriving during a pack's
    transaction waited well past its end. Here writers wait on a condition
    and the next one starts as soon as the last ends. A commit (``urgent``)
    is a round's critical path, while packs run ahead of it: a pack piece
    lets the commits waiting go first, for up to ``_PATIENCE`` s. Reentrant
    per thread; a writer that waits ``_BUSY_TIMEOUT`` gives up with
    BusyError (a 503 with Retry-After), as SQLite's busy_timeout did.

    Commits queue here as jobs (:meth:`join`): the first to find the writer
    free leads a group, whose transaction takes the commits queued by then
    (:meth:`take`); the others sleep until the group has ended. A pack's
    transaction takes the commits queued behind it the same way.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._owner: int | None = None
        self._depth = 0
        self._urgent = 0  # urgent writers waiting in held()
        self._queue: list[_Job] = []  # commits waiting for the writer, not yet taken by a group

    @contextlib.contextmanager
    def held(self, urgent: bool) -> Iterator[None]:
        me = threading.get_ident()
        with self._cond:
            if self._owner == me:
                self._depth += 1
            else:
                self._wait(urgent)
                self._owner, self._depth = me, 1
        try:
            yield
        finally:
            with self._cond:
                self._depth -= 1
                if not self._depth:
                    self._owner = None
                    self._cond.notify_all()

    def urgent_waiting(self) -> bool:
        """Whether a commit waits for the writer now (a racy read: a hint for when to let go)."""
        return self._urgent > 0 or bool(self._queue)

    def join(self, job: _Job) -> bool:
        """Queue a commit until the writer is free: True if this thread now holds it and leads a group.

        False when another thread's group ran the commit (its outcome or
        error is set). A leader calls :meth:`take` once its transaction has
        begun and :meth:`finish` when the transaction has ended.
        """
        me = threading.get_ident()
        with self._cond:
            if self._owner == me:
                raise RuntimeError("a commit inside another write transaction of the same thread")
            self._queue.append(job)
            deadline = time.monotonic() + _BUSY_TIMEOUT
            while self._owner is not None and not job.taken:
                left = deadline - time.monotonic()
                if left <= 0:
                    self._queue.remove(job)
                    raise BusyError("the server database is busy: a write transaction held it too long")
                self._cond.wait(left)
            while job.taken and not job.done:
                self._cond.wait()  # a group has it; it answers once its COMMIT is durable (or failed)
            if job.done:
                return False
            self._owner, self._depth = me, 1
            return True

    def take(self, leader: _Job | None, room: int) -> list[_Job]:
        """Commits queued now for a group, in arrival order, at most ``room``; the leader's own always."""
        with self._cond:
            others = [job for job in self._queue if job is not leader][: room - (leader is not None)]
            taken = [job for job in self._queue if job is leader or job in others]
            self._queue = [job for job in self._queue if job not in taken]
            for job in taken:
                job.taken = True
            return taken

    def settle(self, group: list[_Job]) -> None:
        """Commits another writer's transaction ran (see put_prepared_blobs) answer: it has ended."""
        if group:
            with self._cond:
                for job in group:
                    job.done = True
                self._cond.notify_all()

    def finish(self, leader: _Job, group: list[_Job]) -> None:
        """End a group: its commits answer (each thread reads its own), the writer is free."""
        with self._cond:
            if leader in self._queue:  # the transaction failed before take()
                self._queue.remove(leader)
            for job in (leader, *group):
                job.done = True
            self._owner, self._depth = None, 0
            self._cond.notify_all()

    def _wait(self, urgent: bool) -> None:
        now = time.monotonic()
        deadline, patience = now + _BUSY_TIMEOUT, now + _PATIENCE
        self._urgent += urgent
        try:
            while self._owner is not None or (not urgent and self.urgent_waiting() and time.monotonic() < patience):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise BusyError("the server database is busy: a write transaction held it too long")
                self._cond.wait(left if urgent else min(left, _PATIENCE / 4))
        finally:
            self._urgent -= urgent
            if urgent:
                self._cond.notify_all()  # blob writers that yielded to this commit may go when it has


class Storage:
    """The server's state: workspaces, tokens, documents, the change log, blobs."""

    def __init__(self, db_url: str | None = None, data_dir: Path | str | None = None) -> None:
        self.db = open_database(db_url, Path(data_dir) if data_dir else None)
        self.m = make_models(self.db)
        self.postgres = is_postgres(self.db)
        self._writers = _WriterGate()  # SQLite only: see _WriterGate
        self._checkpointer = None if self.postgres else Checkpointer(self.db)  # WAL checkpoints off the writers' path
        migrate(self.db, self.m)
        with self._read():
            self.server_id = self.m.Meta.get(self.m.Meta.key == "server_id").value

    def close(self) -> None:
        if self._checkpointer is not None:
            self._checkpointer.close()
        self.db.close_all()

    # ------------------------------------------------------------ transactions

    @contextlib.contextmanager
    def _txn(self, write: bool, urgent: bool = False) -> Iterator[None]:
        # SQLite: this process's writers queue at a gate of our own before BEGIN IMMEDIATE.
        queue = self._writers.held(urgent) if write and not self.postgres else contextlib.nullcontext()
        with translated(), queue, self.db.connection_context():
            if self.postgres:
                atomic = self.db.atomic(isolation_level=None if write else "REPEATABLE READ")
            else:
                atomic = self.db.atomic(lock_type="IMMEDIATE" if write else "DEFERRED")
            with atomic:
                yield
        if write and self._checkpointer is not None:
            self._checkpointer.poke()

    def _read(self) -> contextlib.AbstractContextManager[None]:
        """A read transaction: one snapshot for every query in it."""
        return self._txn(write=False)

    def _write(self, urgent: bool = False) -> contextlib.AbstractContextManager[None]:
        """A write transaction; on SQLite it holds the write lock from its first statement.

        ``urgent`` (commits) goes before the other writers waiting (see _WriterGate).
        """
        return self._txn(write=True, urgent=urgent)

    # ------------------------------------------------------------ workspaces and tokens

    def ensure_workspace(self, name: str) -> int:
        """The workspace's id, creating it if needed."""
        check_workspace(name)
        W = self.m.Workspace
        with self._write():
            W.insert(name=name, created_ns=time.time_ns()).on_conflict_ignore().execute()
            return W.get(W.name == name).id

    def create_token(self, workspace: str, label: str | None = None) -> tuple[TokenInfo, str]:
        """A new token for ``workspace`` (created if needed); returned once, stored hashed."""
        ws_id = self.ensure_workspace(workspace)
        token = secrets.token_urlsafe(32)
        public_id = "tok_" + secrets.token_hex(6)
        now = time.time_ns()
        with self._write():
            self.m.Token.create(
                public_id=public_id,
                workspace=ws_id,
                token_hash=hash_token(token),
                prefix=token[:6],
                label=label,
                created_ns=now,
            )
        return TokenInfo(public_id, workspace, token[:6], label, now, None), token

    def list_tokens(self, workspace: str | None = None) -> list[TokenInfo]:
        T, W = self.m.Token, self.m.Workspace
        query = (
            T.select(T.public_id, W.name, T.prefix, T.label, T.created_ns, T.revoked_ns)
            .join(W)
            .order_by(W.name, T.created_ns, T.public_id)
        )
        if workspace is not None:
            query = query.where(W.name == workspace)
        with self._read():
            return [TokenInfo(*row) for row in query.tuples()]

    def revoke_token(self, public_id: str) -> TokenInfo:
        """Revoke a token by its id; revoking twice keeps the first time."""
        T = self.m.Token
        with self._write():
            T.update(revoked_ns=time.time_ns()).where(
                (T.public_id == public_id) & T.revoked_ns.is_null()
            ).execute()
        for info in self.list_tokens():
            if info.id == public_id:
                return info
        raise UsageError(f"no token with id {public_id!r} (see `syncengine token list`)")

    def authenticate(self, token: str) -> tuple[int, str] | None:
        """(workspace id, name) of a live token, else None; hashes compared in constant time."""
        digest = hash_token(token)
        q = self.db.param
        sql = ('SELECT t."token_hash", t."revoked_ns", w."id", w."name" FROM "token" t '
               f'JOIN "workspace" w ON w."id" = t."workspace_id" WHERE t."token_hash" = {q}')
        with self._read():
            row = _one(self.db, sql, (digest,))
        if row is None or not hmac.compare_digest(row[0], digest) or row[1] is not None:
            return None
        return row[2], row[3]

    # ------------------------------------------------------------ reading the log

    def changes(self, ws_id: int, since: int, limit: int) -> dict[str, Any]:
        C, W = self.m.Change, self.m.Workspace
        with self._read():
            last_seq, min_seq = W.select(W.last_seq, W.min_seq).where(W.id == ws_id).tuples().get()
            rows = list(
                C.select(
                    C.seq,
                    C.doc_id,
                    C.path,
                    C.old_path,
                    C.hash,
                    C.deleted,
                    C.executable,
                    C.size,
                    C.op_id,
                    C.client_id,
                    C.received_ns,
                )
                .where((C.workspace == ws_id) & (C.seq > since) & (C.seq <= last_seq))
                .order_by(C.seq)
                .limit(limit + 1)
                .tuples()
            )
        more = len(rows) > limit
        changes = [
            {
                "seq": r[0],
                "doc_id": r[1],
                "path": r[2],
                "old_path": r[3],
                "rev": r[0],
                "hash": r[4],
                "deleted": bool(r[5]),
                "executable": bool(r[6]),
                "size": r[7],
                "op_id": r[8],
                "client_id": r[9],
                "received_at": r[10],
            }
            for r in rows[:limit]
        ]
        return {
            "server_id": self.server_id,
            "min_seq": min_seq,
            "last_seq": last_seq,
            "changes": changes,
            "more": more,
        }

    def docs(self, ws_id: int, after: str | None, limit: int) -> dict[str, Any]:
        D, W = self.m.Document, self.m.Workspace
        cond = (D.workspace == ws_id) & (D.deleted == False)  # noqa: E712
        if after is not None:
            cond &= D.doc_id > after
        with self._read():
            last_seq = W.select(W.last_seq).where(W.id == ws_id).scalar()
            rows = list(
                D.select(D.doc_id, D.path, D.rev, D.hash, D.executable, D.size)
                .where(cond)
                .order_by(D.doc_id)
                .limit(limit + 1)
                .tuples()
            )
        docs = [
            {
                "doc_id": r[0],
                "path": r[1],
                "rev": r[2],
                "hash": r[3],
                "executable": bool(r[4]),
                "size": r[5],
            }
            for r in rows[:limit]
        ]
        nxt = docs[-1]["doc_id"] if len(rows) > limit else None
        return {"server_id": self.server_id, "last_seq": last_seq, "docs": docs, "next": nxt}

    # ------------------------------------------------------------ blobs

    def missing(self, ws_id: int, hashes: Iterable[str]) -> list[str]:
        wanted = list(dict.fromkeys(hashes))
        if not wanted:
            return []
        with self._read():
            have = {h for (h,) in _rows_in(self.db, _BLOB_HASHES, [ws_id], wanted)}
        return [h for h in wanted if h not in have]

    def blob_infos(self, ws_id: int, hashes: Iterable[str]) -> dict[str, BlobInfo]:
        wanted = list(dict.fromkeys(hashes))
        if not wanted:
            return {}
        sql = 'SELECT "id", "hash", "size", "chunks" FROM "blob" WHERE "workspace_id" = {q} AND "hash" IN ({in_})'
        with self._read():
            return {r[1]: BlobInfo(*r) for r in _rows_in(self.db, sql, [ws_id], wanted)}

    def blob_chunk(self, info: BlobInfo, idx: int) -> bytes:
        """One chunk of a blob, inflated; its own short transaction."""
        K = self.m.BlobChunk
        with self._read():
            row = (
                K.select(K.compressed, K.data)
                .where((K.blob == info.pk) & (K.idx == idx))
                .tuples()
                .first()
            )
        if row is None:
            raise ValueError(f"blob {info.hash[:12]} lacks chunk {idx}")
        data = bytes(row[1])
        return zlib.decompress(data) if row[0] else data

    def iter_blob(self, info: BlobInfo) -> Iterator[bytes]:
        if info.manifest:
            for part in self.blob_parts(info):
                yield from self.iter_blob(part)
            return
        for idx in range(info.chunks):
            yield self.blob_chunk(info, idx)

    def blob_parts(self, info: BlobInfo) -> list[BlobInfo]:
        """The parts of a manifest blob, in order; [] for a blob stored whole."""
        B, P = self.m.Blob, self.m.BlobPart
        with self._read():
            rows = (
                P.select(B.id, B.hash, B.size, B.chunks)
                .join(B, on=(P.part == B.id))
                .where(P.blob == info.pk)
                .order_by(P.idx)
                .tuples()
            )
            return [BlobInfo(*r) for r in rows]

    def _new_blob(self, ws_id: int, digest: str, size: int) -> Any:
        """The new blob row (inside the caller's write transaction), or None if the workspace has it."""
        B = self.m.Blob
        if B.select().where((B.workspace == ws_id) & (B.hash == digest)).exists():
            return None
        return B.create(workspace=ws_id, hash=digest, size=size, chunks=0, created_ns=time.time_ns())

    def put_manifest(self, ws_id: int, digest: str, size: int, parts: list[BlobInfo]) -> bool | None:
        """Store a verified blob as its parts (blobs of this workspace), in one transaction.

        The caller has checked that the parts exist and hash, in order, to
        ``digest``. Returns False when the workspace already had the blob, and
        None (nothing stored) when a part went away since the check: a server
        gc dropped it (server/gc.py). The parts are locked against deletion
        while the manifest is written (PostgreSQL; SQLite's writer lock does).
        """
        P = self.m.BlobPart
        with self._write():
            ids = sorted({part.pk for part in parts})
            lock = " FOR KEY SHARE" if self.postgres else ""
            if len(_rows_in(self.db, 'SELECT "id" FROM "blob" WHERE "id" IN ({in_})' + lock, [], ids)) != len(ids):
                return None
            blob = self._new_blob(ws_id, digest, size)
            if blob is None:
                return False
            _executemany(self.db, P, ["blob", "idx", "part", "size"],
                         [[blob.id, idx, part.pk, part.size] for idx, part in enumerate(parts)])
        return True

    def put_blob(
        self, ws_id: int, digest: str, size: int, chunks: Iterable[tuple[bool, bytes]]
    ) -> bool:
        """Store a verified blob from (compressed?, bytes) chunks in one transaction.

        Returns False when the workspace already had it (nothing written).
        The caller has checked the hash: the blob row and all its chunks
        appear together or not at all.
        """
        B, K = self.m.Blob, self.m.BlobChunk
        with self._write():
            blob = self._new_blob(ws_id, digest, size)
            if blob is None:
                return False
            count = 0
            for compressed, data in chunks:
                K.insert(blob=blob.id, idx=count, compressed=compressed, data=data).execute()
                count += 1
            B.update(chunks=count).where(B.id == blob.id).execute()
        return True

    def put_prepared_blobs(self, ws_id: int, blobs: list[tuple[str, int, bool, bytes]]) -> None:
        """Store verified one-chunk blobs (hash, size, compressed?, bytes), in pieces of PACK_PIECE.

        Each blob's row and chunk commit together. A pack of 1,000 in one
        transaction held the write lock 25-57 ms, and a commit arriving then
        waited for all of it. On SQLite a transaction goes on to the next
        piece while no commit waits at the gate, and commits when one does:
        a commit waits for one piece at most, and a pack nobody waits behind
        pays one fsync, not one per piece (each ~3 ms, and the pack is the
        first sync's critical path). On PostgreSQL every piece is its own
        transaction: a blob row's foreign key share-locks the workspace row
        a commit locks FOR UPDATE.

        The commits that queued behind a piece run in its transaction before
        its COMMIT, each in a SAVEPOINT (see :meth:`_run_queued`): they would
        have waited for that COMMIT anyway, and now share its fsync. A blob and
        a commit naming it in one transaction become durable together.
        """
        pieces = [blobs[start : start + PACK_PIECE] for start in range(0, len(blobs), PACK_PIECE)]
        done = 0
        while done < len(pieces):
            absorbed: list[_Job] = []
            try:
                with self._write():
                    self._put_prepared(ws_id, pieces[done])
                    done += 1
                    while done < len(pieces) and not self.postgres and not self._writers.urgent_waiting():
                        self._put_prepared(ws_id, pieces[done])
                        done += 1
                    if not self.postgres:
                        self._run_queued(None, absorbed)
            except BaseException as exc:
                for job in absorbed:
                    job.outcome, job.error = None, exc
                raise
            finally:
                self._writers.settle(absorbed)

    def _put_prepared(self, ws_id: int, blobs: list[tuple[str, int, bool, bytes]]) -> None:
        """One piece, inside the caller's write transaction."""
        B, K = self.m.Blob, self.m.BlobChunk
        now = time.time_ns()
        wanted = list(dict.fromkeys(b[0] for b in blobs))
        have = {h for (h,) in _rows_in(self.db, _BLOB_HASHES, [ws_id], wanted)}
        fresh: dict[str, tuple[str, int, bool, bytes]] = {}
        for blob in blobs:
            if blob[0] not in have and blob[0] not in fresh:
                fresh[blob[0]] = blob
        _executemany(self.db, B, ["workspace", "hash", "size", "chunks", "created_ns"],
                     [[ws_id, digest, size, 1 if size else 0, now] for digest, size, _c, _d in fresh.values()])
        sql = 'SELECT "hash", "id" FROM "blob" WHERE "workspace_id" = {q} AND "hash" IN ({in_})'
        ids = dict(_rows_in(self.db, sql, [ws_id], [h for h, b in fresh.items() if b[1]]))
        _executemany(self.db, K, ["blob", "idx", "compressed", "data"],
                     [[ids[digest], 0, compressed, stored]
                      for digest, size, compressed, stored in fresh.values() if size])

    def small_blob_data(self, infos: list[BlobInfo]) -> dict[int, bytes]:
        """The inflated bytes of single-chunk blobs, by blob pk, in one query."""
        K = self.m.BlobChunk
        out = {i.pk: b"" for i in infos if i.chunks == 0}
        wanted = [i.pk for i in infos if i.chunks == 1]
        if any(i.chunks > 1 for i in infos):
            raise ValueError("small_blob_data takes single-chunk blobs only")
        if wanted:
            with self._read():
                rows = (
                    K.select(K.blob, K.compressed, K.data)
                    .where(K.blob.in_(wanted) & (K.idx == 0))
                    .tuples()
                )
                for pk, compressed, data in rows:
                    out[pk] = zlib.decompress(bytes(data)) if compressed else bytes(data)
        return out

    # ------------------------------------------------------------ commits

    def commit(self, ws_id: int, client_id: str, items: Iterable[CommitItem]) -> CommitOutcome:
        """Apply items in order under the workspace lock; see docs/protocol.md for the rules.

        What the items need (their op ids, documents, path owners, blob sizes)
        is read in four queries up front and kept current in memory as items
        apply; the rows are written at the end in bulk, in the order they were
        decided. peewee renders SQL value by value, and one query per rule per
        item made a commit of 100 items cost ~400 ms of server CPU.
        """
        items = list(items)
        if self.postgres:
            # One transaction per commit: its workspace row lock (FOR UPDATE) orders it against
            # the other server processes', which a group in this process could not join.
            with self._write(urgent=True):
                return self._commit_locked(ws_id, client_id, items)
        job = _Job(ws_id, client_id, items)
        if self._writers.join(job):
            self._lead(job)
        return job.answer()

    def _lead(self, leader: _Job) -> None:
        """Run the commits queued now in one transaction, each in a SAVEPOINT, with one COMMIT.

        A commit that fails rolls back to its savepoint and gets its own error;
        the others go on. If SQLite rolled the whole transaction back (a full
        disk, an I/O error) or the COMMIT fails, every commit of the group
        fails: none was answered, and each client retries with the same op ids.
        """
        group: list[_Job] = []
        try:
            with translated(), self.db.connection_context(), self.db.atomic(lock_type="IMMEDIATE"):
                self._run_queued(leader, group)
            if self._checkpointer is not None:
                self._checkpointer.poke()
        except BaseException as exc:
            for job in group or [leader]:
                job.outcome, job.error = None, exc
        finally:
            self._writers.finish(leader, group)

    def _run_queued(self, leader: _Job | None, group: list[_Job]) -> None:
        """Inside a write transaction: the leader's commit and those queued, each in a SAVEPOINT.

        Commits that queue while these run would wait for this COMMIT and then
        pay their own, so they join too, up to GROUP_MAX. ``group`` (the
        caller's) lists every commit taken, even when this raises: each must
        get an answer.
        """
        taken = self._writers.take(leader, GROUP_MAX)
        while taken:
            group += taken
            for job in taken:
                self._run_in_savepoint(job)
            taken = self._writers.take(None, GROUP_MAX - len(group))
        if group:
            failpoint("server.group.before_commit")

    def _run_in_savepoint(self, job: _Job) -> None:
        """One commit of a group: its outcome, or its error with its writes rolled back."""
        try:
            with translated(), self.db.atomic():  # a SAVEPOINT inside the group's transaction
                job.outcome = self._commit_locked(job.ws_id, job.client_id, job.items)
        except Exception as exc:
            job.error = exc
            if not self.db.connection().in_transaction:
                raise  # SQLite ended the group's transaction (a full disk, an I/O error): nothing of it stays

    def _commit_locked(self, ws_id: int, client_id: str, items: list[CommitItem]) -> CommitOutcome:
        """One commit, inside a write transaction that holds the workspace's lock."""
        results: list[dict[str, Any]] = []
        lock = " FOR UPDATE" if self.postgres else ""  # SQLite: BEGIN IMMEDIATE took it
        sql = f'SELECT "last_seq" FROM "workspace" WHERE "id" = {self.db.param}{lock}'
        start = last_seq = _one(self.db, sql, (ws_id,))[0]
        state = _CommitState(self, ws_id, items)
        for item in items:
            prior = state.ops.get(item.op_id)
            if prior is not None:
                results.append(json.loads(prior))
                continue
            result = self._apply(state, client_id, item, last_seq + 1)
            if type(result) is int:
                # ok at that rev (and seq), written by hand: json.dumps of this dict,
                # byte for byte, cost more than the rest of an item's bookkeeping.
                if result == last_seq + 1:
                    last_seq += 1
                answer = {"status": "ok", "doc_id": item.doc_id, "rev": result, "seq": result}
                encoded = (
                    f'{{"status": "ok", "doc_id": {_json_str(item.doc_id)}, "rev": {result}, "seq": {result}}}'
                )
                # Only applied ops are remembered: a refused op changed nothing,
                # and pinning its refusal would keep answering a stale conflict.
                state.ops[item.op_id] = encoded
                state.op_rows.append((ws_id, item.op_id, state.op_keys[item.op_id], encoded, state.now))
            else:
                answer = result.to_dict()
            results.append(answer)
        state.write()
        if last_seq != start:
            sql = f'UPDATE "workspace" SET "last_seq" = {self.db.param} WHERE "id" = {self.db.param}'
            _one(self.db, sql, (last_seq, ws_id))
        return CommitOutcome(results, last_seq, last_seq - start)

    def _current(self, doc: Any) -> CurrentDoc:
        return CurrentDoc(
            doc.doc_id, doc.rev, doc.path, doc.hash, bool(doc.deleted), bool(doc.executable)
        )

    def _apply(self, state: _CommitState, client_id: str, item: CommitItem, seq: int) -> CommitResult | int:
        """The item's refusal, or the rev it is ok at (``seq`` when it wrote a change)."""
        doc = state.docs.get(item.doc_id)
        if item.base_rev is None and doc is not None:
            return CommitResult("conflict", item.doc_id, current=self._current(doc))
        if item.base_rev is not None:
            if doc is None:
                return CommitResult(
                    "rejected",
                    item.doc_id,
                    error="unknown_doc",
                    message="the server has no such document; commit it as new (base_rev null)",
                )
            if doc.rev != item.base_rev:
                return CommitResult("conflict", item.doc_id, current=self._current(doc))
        deleting = item.hash is None
        if deleting and (doc is None or doc.deleted):
            if doc is None:
                return CommitResult(
                    "rejected",
                    item.doc_id,
                    error="unknown_doc",
                    message="cannot delete a document the server does not have",
                )
            return doc.rev  # already deleted: no-op
        if (
            doc is not None
            and not deleting
            and not doc.deleted
            and doc.path == item.path
            and doc.hash == item.hash
            and bool(doc.executable) == item.executable
        ):
            return doc.rev  # identical: no new revision
        size = None
        key = None
        if not deleting:
            key = state.keys[item.path]
            occupant = state.owners.get(key)
            if occupant is not None and occupant.doc_id != item.doc_id:
                return CommitResult("conflict", item.doc_id, current=self._current(occupant))
            size = state.sizes.get(item.hash)
            if size is None:
                return CommitResult(
                    "rejected",
                    item.doc_id,
                    error="missing_blob",
                    message=f"upload blob {item.hash} before committing it",
                )
        path = doc.path if deleting else item.path
        old_path = doc.path if doc is not None and not doc.deleted and doc.path != path else None
        state.put_doc(item.doc_id, doc, (path, key, seq, item.hash, deleting, item.executable, size))
        state.change_rows.append(
            (state.ws_id, seq, item.doc_id, path, old_path, item.hash, deleting,
             item.executable, size, item.op_id, client_id, state.now)
        )
        return seq

    # ------------------------------------------------------------ upkeep

    def workspace_id(self, name: str) -> int | None:
        W = self.m.Workspace
        with self._read():
            return W.select(W.id).where(W.name == name).scalar()

    def workspace_ids(self) -> dict[str, int]:
        """Every workspace's id by name, in name order."""
        W = self.m.Workspace
        with self._read():
            return dict(W.select(W.name, W.id).order_by(W.name).tuples())

    @contextlib.contextmanager
    def locked(self, ws_id: int, *, rollback: bool = False) -> Iterator[None]:
        """A write transaction holding the workspace's lock, as a commit's does: upkeep (gc) runs between
        commits, never beside one. ``rollback``: undo it all at the end (a dry run)."""
        with contextlib.suppress(_RolledBack), self._write():
            lock = " FOR UPDATE" if self.postgres else ""  # SQLite: BEGIN IMMEDIATE took it
            _one(self.db, f'SELECT "id" FROM "workspace" WHERE "id" = {self.db.param}{lock}', (ws_id,))
            yield
            if rollback:
                raise _RolledBack


class _RolledBack(Exception):
    """Raised inside a transaction to undo it (Storage.locked's dry run)."""
