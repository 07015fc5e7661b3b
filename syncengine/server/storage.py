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
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import secrets
import time
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from syncengine.errors import UsageError
from syncengine.paths import casefold_key
from syncengine.protocol import CommitItem, CommitResult, CurrentDoc, check_workspace
from syncengine.server.db import is_postgres, make_models, migrate, open_database, translated

_ZLIB_LEVEL = 1


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


@dataclass(frozen=True, slots=True)
class CommitOutcome:
    results: list[dict[str, Any]]
    last_seq: int
    applied: int  # new changes written by this request


def compress_chunk(data: bytes) -> tuple[bool, bytes]:
    """(compressed?, stored bytes): raw when zlib does not save at least 5%."""
    packed = zlib.compress(data, _ZLIB_LEVEL)
    if len(packed) < len(data) * 0.95:
        return True, packed
    return False, data


class Storage:
    """The server's state: workspaces, tokens, documents, the change log, blobs."""

    def __init__(self, db_url: str | None = None, data_dir: Path | str | None = None) -> None:
        self.db = open_database(db_url, Path(data_dir) if data_dir else None)
        self.m = make_models(self.db)
        self.postgres = is_postgres(self.db)
        migrate(self.db, self.m)
        with self._read():
            self.server_id = self.m.Meta.get(self.m.Meta.key == "server_id").value

    def close(self) -> None:
        self.db.close_all()

    # ------------------------------------------------------------ transactions

    @contextlib.contextmanager
    def _txn(self, write: bool) -> Iterator[None]:
        with translated(), self.db.connection_context():
            if self.postgres:
                atomic = self.db.atomic(isolation_level=None if write else "REPEATABLE READ")
            else:
                atomic = self.db.atomic(lock_type="IMMEDIATE" if write else "DEFERRED")
            with atomic:
                yield

    def _read(self) -> contextlib.AbstractContextManager[None]:
        """A read transaction: one snapshot for every query in it."""
        return self._txn(write=False)

    def _write(self) -> contextlib.AbstractContextManager[None]:
        """A write transaction; on SQLite it holds the write lock from its first statement."""
        return self._txn(write=True)

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
        T, W = self.m.Token, self.m.Workspace
        with self._read():
            row = (
                T.select(T.token_hash, T.revoked_ns, W.id, W.name)
                .join(W)
                .where(T.token_hash == digest)
                .tuples()
                .first()
            )
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
        B = self.m.Blob
        with self._read():
            have = (
                {
                    h
                    for (h,) in B.select(B.hash)
                    .where((B.workspace == ws_id) & B.hash.in_(wanted))
                    .tuples()
                }
                if wanted
                else set()
            )
        return [h for h in wanted if h not in have]

    def blob_infos(self, ws_id: int, hashes: Iterable[str]) -> dict[str, BlobInfo]:
        wanted = list(dict.fromkeys(hashes))
        if not wanted:
            return {}
        B = self.m.Blob
        with self._read():
            rows = (
                B.select(B.id, B.hash, B.size, B.chunks)
                .where((B.workspace == ws_id) & B.hash.in_(wanted))
                .tuples()
            )
            return {r[1]: BlobInfo(*r) for r in rows}

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
        for idx in range(info.chunks):
            yield self.blob_chunk(info, idx)

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
            if B.select().where((B.workspace == ws_id) & (B.hash == digest)).exists():
                return False
            blob = B.create(
                workspace=ws_id, hash=digest, size=size, chunks=0, created_ns=time.time_ns()
            )
            count = 0
            for compressed, data in chunks:
                K.insert(blob=blob.id, idx=count, compressed=compressed, data=data).execute()
                count += 1
            B.update(chunks=count).where(B.id == blob.id).execute()
        return True

    def put_prepared_blobs(self, ws_id: int, blobs: list[tuple[str, int, bool, bytes]]) -> None:
        """Store verified one-chunk blobs (hash, size, compressed?, bytes) in one transaction."""
        B, K = self.m.Blob, self.m.BlobChunk
        now = time.time_ns()
        with self._write():
            have = (
                {
                    h
                    for (h,) in B.select(B.hash)
                    .where((B.workspace == ws_id) & B.hash.in_([b[0] for b in blobs]))
                    .tuples()
                }
                if blobs
                else set()
            )
            for digest, size, compressed, stored in blobs:
                if digest in have:
                    continue
                have.add(digest)
                blob = B.create(
                    workspace=ws_id, hash=digest, size=size, chunks=1 if size else 0, created_ns=now
                )
                if size:
                    K.insert(blob=blob.id, idx=0, compressed=compressed, data=stored).execute()

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
        """Apply items in order under the workspace lock; see docs/protocol.md for the rules."""
        W, Ops = self.m.Workspace, self.m.Op
        results: list[dict[str, Any]] = []
        with self._write():
            query = W.select(W.last_seq).where(W.id == ws_id)
            if self.postgres:
                query = query.for_update()
            start = last_seq = query.scalar()
            for item in items:
                prior = (
                    Ops.select(Ops.result)
                    .where((Ops.workspace == ws_id) & (Ops.op_id == item.op_id))
                    .scalar()
                )
                if prior is not None:
                    results.append(json.loads(prior))
                    continue
                result = self._apply(ws_id, client_id, item, last_seq + 1)
                if result.status == "ok" and result.seq == last_seq + 1:
                    last_seq += 1
                if result.status == "ok":
                    # Only applied ops are remembered: a refused op changed nothing,
                    # and pinning its refusal would keep answering a stale conflict.
                    Ops.insert(
                        workspace=ws_id,
                        op_id=item.op_id,
                        result=json.dumps(result.to_dict()),
                        created_ns=time.time_ns(),
                    ).execute()
                results.append(result.to_dict())
            if last_seq != start:
                W.update(last_seq=last_seq).where(W.id == ws_id).execute()
        return CommitOutcome(results, last_seq, last_seq - start)

    def _current(self, doc: Any) -> CurrentDoc:
        return CurrentDoc(
            doc.doc_id, doc.rev, doc.path, doc.hash, bool(doc.deleted), bool(doc.executable)
        )

    def _apply(self, ws_id: int, client_id: str, item: CommitItem, seq: int) -> CommitResult:
        D, B, C = self.m.Document, self.m.Blob, self.m.Change
        doc = D.get_or_none((D.workspace == ws_id) & (D.doc_id == item.doc_id))
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
            return CommitResult(
                "ok", item.doc_id, rev=doc.rev, seq=doc.rev
            )  # already deleted: no-op
        if (
            doc is not None
            and not deleting
            and not doc.deleted
            and doc.path == item.path
            and doc.hash == item.hash
            and bool(doc.executable) == item.executable
        ):
            return CommitResult(
                "ok", item.doc_id, rev=doc.rev, seq=doc.rev
            )  # identical: no new revision
        size = None
        if not deleting:
            key = casefold_key(item.path)
            occupant = D.get_or_none(
                (D.workspace == ws_id) & (D.path_key == key) & (D.doc_id != item.doc_id)
            )
            if occupant is not None:
                return CommitResult("conflict", item.doc_id, current=self._current(occupant))
            size = B.select(B.size).where((B.workspace == ws_id) & (B.hash == item.hash)).scalar()
            if size is None:
                return CommitResult(
                    "rejected",
                    item.doc_id,
                    error="missing_blob",
                    message=f"upload blob {item.hash} before committing it",
                )
        path = doc.path if deleting else item.path
        old_path = doc.path if doc is not None and not doc.deleted and doc.path != path else None
        fields = {
            "path": path,
            "path_key": None if deleting else casefold_key(path),
            "rev": seq,
            "hash": item.hash,
            "deleted": deleting,
            "executable": item.executable,
            "size": size,
        }
        if doc is None:
            D.insert(workspace=ws_id, doc_id=item.doc_id, **fields).execute()
        else:
            D.update(**fields).where(D.id == doc.id).execute()
        C.insert(
            workspace=ws_id,
            seq=seq,
            doc_id=item.doc_id,
            path=path,
            old_path=old_path,
            hash=item.hash,
            deleted=deleting,
            executable=item.executable,
            size=size,
            op_id=item.op_id,
            client_id=client_id,
            received_ns=time.time_ns(),
        ).execute()
        return CommitResult("ok", item.doc_id, rev=seq, seq=seq)

    # ------------------------------------------------------------ upkeep

    def workspace_id(self, name: str) -> int | None:
        W = self.m.Workspace
        with self._read():
            return W.select(W.id).where(W.name == name).scalar()
