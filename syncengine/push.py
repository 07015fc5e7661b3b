"""Pushing: send local changes in batches, with their base revs, and record the answers.

Per batch of at most 100 changes: one ``missing`` call, one pack upload of
the blobs the server lacks (large files streamed one by one), one commit.
A request costs O(changes / batch), never one per file. Every item's op id
is derived from the change itself, so a retry after a crash is the same op
and the server answers it as it did the first time.

Answers: ``ok`` moves base and remote to the committed rev. ``conflict``
records the occupant as the remote state, so the next pass of the round
resolves on top of it (only the refused replica resolves — no ping-pong).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from syncengine import conflicts as strategies
from syncengine import protocol as p
from syncengine.blobs import BlobStore
from syncengine.errors import FileSystemError
from syncengine.fsops import ChangedUnderfoot, failpoint, move_safe, read_bytes, sha256
from syncengine.journal import DocRow, Journal, now_ns
from syncengine.models import Kind, ScanProblem
from syncengine.pull import remote_mode
from syncengine.remote import BlobSource, Remote

SMALL = 1 << 20


@dataclass
class Pushed:
    committed: list[str] = field(default_factory=list)
    uploaded: int = 0
    conflicts: int = 0
    moved_aside: list[tuple[str, str]] = field(default_factory=list)
    problems: list[ScanProblem] = field(default_factory=list)


def commit_item(row: DocRow, client_id: str) -> p.CommitItem:
    """The commit item for a document's local state on top of its base."""
    base_rev = row.base_rev if row.remote_rev is not None else None
    if row.path is None:
        return p.CommitItem.make(client_id, row.doc_id, row.base_path or row.remote_path or "", base_rev, None, False)
    return p.CommitItem.make(client_id, row.doc_id, row.path, base_rev, row.hash, bool((row.mode or 0) & 0o100))


def _blob_source(root: Path, row: DocRow, blobs: BlobStore, keep: list[bytes] | None = None) -> BlobSource:
    """The bytes to upload, checked against the journal's hash (and kept as the next base).

    With ``keep``, a small mergeable document's bytes are appended to it for
    the caller to store (see :func:`_keep_bases`) instead of stored here.
    """
    path = root / row.path
    if (row.size or 0) <= SMALL:
        data, _st = read_bytes(path)
        if sha256(data) != row.hash:
            raise ChangedUnderfoot("changed since the scan; it will go next round", paths=[row.path])
        if Kind(row.kind).mergeable:
            if keep is None:
                blobs.put_bytes(data)
            else:
                keep.append(data)
        return BlobSource(row.hash, len(data), data=data)
    digest, st = blobs.put_file(path)
    if digest != row.hash:
        raise ChangedUnderfoot("changed since the scan; it will go next round", paths=[row.path])
    return BlobSource.from_path(path, digest, st.size)


def _keep_bases(blobs: BlobStore, keep: dict[str, bytes],
                pool: ThreadPoolExecutor | None) -> Callable[[], dict[str, Exception]]:
    """Start storing the next bases of a batch; the returned wait() gives the hashes that failed, with why.

    A base must be durable before the journal points at it, and an fsync
    costs about a millisecond whatever the size: a batch stored one file
    after another spent most of a first sync waiting on them. The batch goes
    to :meth:`BlobStore.put_many` (all written, made durable at once,
    renamed), on a thread while the batch's blobs go up; all are done before
    the batch is committed, so a base that could not be kept is never
    committed, and one that failed fails alone.
    """
    digests = list(keep)

    def put() -> dict[str, Exception]:
        results = blobs.put_many([keep[digest] for digest in digests], expect=digests)
        return {digest: result for digest, result in zip(digests, results, strict=True)
                if isinstance(result, Exception)}

    if pool is None or not keep:
        failed = put() if keep else {}
        return lambda: failed
    future = pool.submit(put)
    return future.result


def push(
    root: Path,
    journal: Journal,
    blobs: BlobStore,
    remote: Remote,
    rows: list[DocRow],
    *,
    client_id: str,
    batch: int = p.MAX_COMMIT_ITEMS,
    progress: Any = None,
) -> Pushed:
    result = Pushed()
    batch = max(1, min(batch, p.MAX_COMMIT_ITEMS))
    with ThreadPoolExecutor(1, thread_name_prefix="push-bases") if len(rows) > 1 else _no_pool() as pool:
        for start in range(0, len(rows), batch):
            _push_batch(root, journal, blobs, remote, rows[start:start + batch], client_id, result, pool)
            if progress:
                progress(min(start + batch, len(rows)), len(rows))
    return result


@contextlib.contextmanager
def _no_pool() -> Iterator[None]:
    yield None


def _push_batch(root: Path, journal: Journal, blobs: BlobStore, remote: Remote, chunk: list[DocRow],
                client_id: str, result: Pushed, pool: ThreadPoolExecutor | None) -> None:
    """One batch: read and check the files, keep their bases, upload, commit, record."""
    sources: dict[str, BlobSource] = {}
    ready: list[DocRow] = []
    keep: dict[str, bytes] = {}
    for row in chunk:
        try:
            if row.path is not None and row.hash not in sources:
                kept: list[bytes] = []
                sources[row.hash] = _blob_source(root, row, blobs, kept)
                if kept:
                    keep[row.hash] = kept[0]
            ready.append(row)
        except (ChangedUnderfoot, FileSystemError, OSError) as exc:
            result.problems.append(ScanProblem(row.path or "?", getattr(exc, "message", str(exc))))
    kept = _keep_bases(blobs, keep, pool)
    try:
        if sources:
            # upload() asks the server which blobs it lacks and sends only those, in packs.
            # A blob whose base is not kept may go up too: unreferenced, it is harmless.
            report = remote.upload(list(sources.values()))
            result.uploaded += len(report.uploaded)
            failed = {failure.hash for failure in report.failed}
            paths = {row.hash: row.path for row in ready if row.path}
            for failure in report.failed:
                where = paths.get(failure.hash) or failure.hash[:12]
                result.problems.append(ScanProblem(where, f"upload failed: {failure.reason}"))
            ready = [row for row in ready if row.hash not in failed or row.path is None]
    finally:
        unkept = kept()  # never leave a store running behind an error
    if unkept:
        for row in ready:
            if row.path is not None and row.hash in unkept:
                exc = unkept[row.hash]
                result.problems.append(ScanProblem(row.path, getattr(exc, "message", str(exc))))
        ready = [row for row in ready if row.path is None or row.hash not in unkept]
    if sources:
        failpoint("push.after_upload")
    failpoint("push.before_commit")
    items = [commit_item(row, client_id) for row in ready]
    answers = remote.commit(items) if items else []
    failpoint("push.after_commit")
    _record(root, journal, ready, items, answers, result, client_id)
    failpoint("push.after_record")


def _record(root: Path, journal: Journal, rows: list[DocRow], items: list[p.CommitItem],
            answers: list[p.CommitResult], result: Pushed, client_id: str) -> None:
    updates: list[tuple[str, dict[str, Any]]] = []
    inserts: list[dict[str, Any]] = []
    renames: list[tuple[str, str]] = []
    conflict_rows: list[dict[str, Any]] = []
    occupants = [a.current.doc_id for a in answers if a.status == "conflict" and a.current]
    known = journal.docs_by_ids(occupants) if occupants else {}
    now = now_ns()
    for row, item, answer in zip(rows, items, answers, strict=True):
        if answer.status == "ok":
            mode = remote_mode(item.executable) if item.hash else None
            state = {"path": item.path, "rev": answer.rev, "hash": item.hash, "mode": mode}
            updates.append((row.doc_id, {
                "base_path": state["path"], "base_rev": state["rev"], "base_hash": state["hash"], "base_mode": mode,
                "remote_path": state["path"], "remote_rev": state["rev"], "remote_hash": state["hash"],
                "remote_mode": mode, "remote_seq": answer.seq, "remote_at": now, "error": None}))
            result.committed.append(item.path)
            continue
        if answer.status == "rejected":
            if answer.error == "unknown_doc":
                # The server does not know the rev we built on: start again from "no base".
                updates.append((row.doc_id, {"base_rev": None, "base_hash": None, "base_path": None,
                                             "base_mode": None, "remote_rev": None, "remote_hash": None,
                                             "remote_path": None}))
            else:
                updates.append((row.doc_id, {"error": f"refused by the server: {answer.message}"[:500]}))
                result.problems.append(ScanProblem(item.path, f"refused by the server: {answer.message}"))
            continue
        result.conflicts += 1
        current = answer.current
        assert current is not None
        remote_values = {"remote_path": current.path, "remote_rev": current.rev,
                         "remote_hash": None if current.deleted else current.hash,
                         "remote_mode": remote_mode(current.executable), "remote_seq": None, "remote_at": None}
        if current.doc_id == row.doc_id:
            updates.append((row.doc_id, remote_values))  # resolved on the next pass, on top of this rev
            continue
        # Another document holds the path on the server.
        if current.doc_id not in known and row.base_rev is None and row.remote_rev is None:
            renames.append((row.doc_id, current.doc_id))  # created on both sides: one document
            updates.append((current.doc_id, remote_values))
            continue
        if current.doc_id not in known:
            inserts.append({"doc_id": current.doc_id, "kind": row.kind, **remote_values})
        if row.path is not None:
            aside = strategies.copy_name(row.path, client_id, row.local_at or now, row.hash or "0" * 8)
            try:
                st = move_safe(root, row.path, aside, expect_hash=row.hash)
            except (ChangedUnderfoot, FileSystemError) as exc:
                result.problems.append(ScanProblem(row.path, exc.message))
                continue
            result.moved_aside.append((row.path, aside))
            updates.append((row.doc_id, {"path": aside, "size": st.size, "mtime_ns": st.mtime_ns,
                                         "ctime_ns": st.ctime_ns, "inode": st.inode, "mode": st.mode}))
            conflict_rows.append({"doc_id": row.doc_id, "path": row.path, "kind": "both-created",
                                  "local_hash": row.hash, "remote_hash": current.hash, "base_hash": row.base_hash,
                                  "remote_rev": current.rev, "strategy": "keep-both", "copy_path": aside,
                                  "resolved_at": now, "resolution": "keep-both"})
    journal.batch(updates=updates, inserts=inserts, renames=renames, conflicts=conflict_rows,
                  state=_checkpoint_past_echoes(journal, answers))


def _checkpoint_past_echoes(journal: Journal, answers: list[p.CommitResult]) -> dict[str, Any] | None:
    """Move the checkpoint past this batch when the feed holds nothing else there.

    The server numbers a commit's changes in one run under its workspace
    lock. When this batch's changes are exactly the next ones after our
    checkpoint, the feed up to them is our own echoes, which a pull would
    read only to skip: moving the checkpoint now spares the next round from
    paging through them (50,000 of them after a first sync). Any gap — a
    change by someone else, a replayed commit — leaves the checkpoint where
    it is, and the next pull reads the feed as always.
    """
    seqs = sorted(a.seq for a in answers if a.status == "ok" and a.seq is not None)
    if not seqs:
        return None
    last = journal.state().get("last_seq")
    if last is None or seqs != list(range(last + 1, last + 1 + len(seqs))):
        return None
    return {"last_seq": seqs[-1]}
