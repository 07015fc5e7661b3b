"""Pushing: send local changes in batches, with their base revs, and record the answers.

The blobs go up in waves of up to 1,000 documents (ten commit batches; a
large push starts with one batch and doubles): one ``missing`` call (none
into a workspace that never had a change, nor for a wave of at most
:data:`BLIND_BYTES`, see :func:`_unasked`), packs of the blobs the server
lacks (large files streamed one by one), and the wave's bases kept locally.
Each document is read once and hashed once, against the scan's hash. Two
threads run the waves ahead of the commits, so the server stores the next
waves' blobs while this one is committed; every blob is up before the
commit that names it (DESIGN §4). Commits carry at most 100 changes each,
two in flight on two connections when they commute (see :func:`_touches`),
and a batch's answers are recorded while the server works on the next
ones. A push costs O(changes / 100) commits and O(changes / 1,000) other
requests, never one per file. Every item's op id is derived from the change itself, so a retry
after a crash is the same op and the server answers it as it did the first
time.

Answers: ``ok`` moves base and remote to the committed rev. ``conflict``
records the occupant as the remote state, so the next pass of the round
resolves on top of it (only the refused replica resolves — no ping-pong).
"""

from __future__ import annotations

import collections
import contextlib
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from syncengine import conflicts as strategies
from syncengine import protocol as p
from syncengine.blobs import BlobStore, deflated_part, encode
from syncengine.errors import FileSystemError
from syncengine.fsops import ChangedUnderfoot, failpoint, move_safe, read_hashed
from syncengine.journal import DocRow, Journal, now_ns
from syncengine.models import Kind, ScanProblem
from syncengine.paths import casefold_key
from syncengine.pull import remote_mode
from syncengine.remote import BlobSource, Remote

SMALL = 1 << 20
WAVE_ROWS = p.MAX_HASHES  # documents whose blobs go up together: one missing call
WAVE_BYTES = 16 << 20  # small files' bytes held by one wave
AHEAD = 2  # waves whose blobs may be on their way ahead of the commits
BLOB_THREADS = 2  # of those, sent at once
COMMITS_IN_FLIGHT = 2  # commits sent at once, each on its own connection (see _touches)
RECORD_EVERY = 500  # answered changes journaled in one transaction
# A wave whose blobs all sit in memory and would take at most this many bytes in a pack goes up
# without a ``missing`` call first (see _unasked).
BLIND_BYTES = 256 << 10
_MERGEABLE = frozenset(kind.value for kind in Kind if kind.mergeable)  # a set look-up, not an enum call per document


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


def _large_source(root: Path, row: DocRow, blobs: BlobStore) -> BlobSource:
    """A file over :data:`SMALL`: stored in chunks as it is hashed, and streamed from the file."""
    path = root / row.path
    digest, st = blobs.put_file(path)
    if digest != row.hash:
        raise ChangedUnderfoot("changed since the scan; it will go next round", paths=[row.path])
    return BlobSource.from_path(path, digest, st.size)


def _keep_bases(blobs: BlobStore, keep: dict[str, tuple[bytes, bytes]],
                pool: ThreadPoolExecutor | None) -> Callable[[], dict[str, Exception]]:
    """Start storing the next bases of a wave; the returned wait() gives the hashes that failed, with why.

    A base must be durable before the journal points at it, and an fsync
    costs about a millisecond whatever the size: a batch stored one file
    after another spent most of a first sync waiting on them. The wave goes
    to :meth:`BlobStore.put_many` (all written, made durable at once,
    renamed), on a thread while the wave's blobs go up; all are done before
    any of its batches is committed, so a base that could not be kept is
    never committed, and one that failed fails alone.
    """
    digests = list(keep)

    def put() -> dict[str, Exception]:
        # Each was checked against its digest as it was read (read_hashed): no second hash here.
        results = blobs.put_many([keep[digest][0] for digest in digests], expect=digests, hashed=True,
                                 encoded=[keep[digest][1] for digest in digests])
        return {digest: result for digest, result in zip(digests, results, strict=True)
                if isinstance(result, Exception)}

    if pool is None or not keep:
        failed = put() if keep else {}
        return lambda: failed
    future = pool.submit(put)
    return future.result


@dataclass
class _Sent:
    """A wave whose blobs are up: its documents, what failed, and the wait for its bases."""

    ready: list[DocRow] = field(default_factory=list)
    uploaded: int = 0
    problems: list[ScanProblem] = field(default_factory=list)
    kept: Callable[[], dict[str, Exception]] = dict

    def settle(self) -> set[str]:
        """Wait for the wave's bases; the ids of the documents that may now be committed.

        A document whose base could not be kept is not committed (it goes
        next round), so the journal never points at a base it does not hold.
        """
        unkept = self.kept()
        for row in self.ready:
            if row.path is not None and row.hash in unkept:
                exc = unkept[row.hash]
                self.problems.append(ScanProblem(row.path, getattr(exc, "message", str(exc))))
        return {row.doc_id for row in self.ready if row.path is None or row.hash not in unkept}


# A commit sent or queued: its documents, its items, the wait for its answers, the batch's size,
# and what it touches (see _touches).
_InFlight = tuple[list[DocRow], list[p.CommitItem], Callable[[], list[p.CommitResult]], int, set[str]]


def _touches(rows: list[DocRow], items: list[p.CommitItem]) -> set[str]:
    """What a batch's answers can depend on or change on the server: its documents and path keys.

    The server decides an item from its document and the owner of its path
    key, and changes only those and the old path's key. Two batches that
    touch nothing in common give the same answers in either order, so the
    next one may go out while the one before is in flight, on another
    connection, without waiting for it; one that shares a document or a
    path key (a move into a path another batch frees) waits. Only the seqs
    may come out of order: :func:`_past_echoes` carries them over.
    """
    out: set[str] = set()
    for row, item in zip(rows, items, strict=True):
        out.add("id:" + row.doc_id)
        for path in (item.path, row.base_path, row.remote_path):
            if path:
                out.add("path:" + casefold_key(path))
    return out


def waves(rows: list[DocRow], batch: int, *, most: int = WAVE_ROWS,
          most_bytes: int = WAVE_BYTES) -> list[list[list[DocRow]]]:
    """The commit batches of a push, grouped into waves whose blobs go up together.

    A wave is whole batches, at most ``most`` documents (one ``missing``
    call) and about ``most_bytes`` of small files held in memory (a
    batch's worth at least). A push of more than ``most`` starts with one
    batch and doubles up to ``most``: its first commit waits only for its
    own blobs, not for a thousand documents' worth, while a smaller push
    stays one wave (one ``missing`` call, one pack).
    """
    out: list[list[list[DocRow]]] = []
    rows_in = bytes_in = 0
    limit = batch if len(rows) > most else most
    for start in range(0, len(rows), batch):
        chunk = rows[start:start + batch]
        size = sum(min(row.size or 0, SMALL) for row in chunk if row.path is not None)
        if not out or rows_in + len(chunk) > limit or (bytes_in and bytes_in + size > most_bytes):
            if out:
                limit = min(most, limit * 2)
            out.append([])
            rows_in = bytes_in = 0
        out[-1].append(chunk)
        rows_in += len(chunk)
        bytes_in += size
    return out


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
    server_empty: bool = False,
) -> Pushed:
    """Send ``rows`` and record the answers; see the module docstring for the pipeline.

    ``server_empty`` (the workspace never had a change there, see
    :attr:`syncengine.pull.PullResult.server_empty`) sends the blobs without
    a ``missing`` call per wave: 13 fewer requests for a first push of 10,000.

    Errors of the blob side (the server unreachable, the token refused)
    surface here as they are, when the batch that needed them is reached;
    what was committed before stays recorded, the rest stays queued.
    """
    result = Pushed()
    batch = max(1, min(batch, p.MAX_COMMIT_ITEMS))
    planned = waves(rows, batch)
    if not planned:
        return result
    stop = threading.Event()
    with contextlib.ExitStack() as stack:
        ahead = bases = committer = None
        if len(rows) > 1:
            bases = stack.enter_context(ThreadPoolExecutor(1, thread_name_prefix="push-bases"))
        stack.callback(remote.release_ended_threads)  # once the workers below have ended: their connections
        if len(planned) > 1:
            # Two threads: one reads and hashes a wave while the server takes the other's pack.
            ahead = stack.enter_context(ThreadPoolExecutor(BLOB_THREADS, thread_name_prefix="push-blobs"))
        if len(rows) > batch:
            committer = stack.enter_context(ThreadPoolExecutor(COMMITS_IN_FLIGHT, thread_name_prefix="push-commit"))
        stack.callback(stop.set)  # runs first on the way out: a worker still ahead gives up

        def send(wave: list[list[DocRow]]) -> Callable[[], _Sent]:
            rows_of = [row for chunk in wave for row in chunk]
            if ahead is None:
                return lambda: _send_blobs(root, blobs, remote, rows_of, bases, stop, server_empty)
            return ahead.submit(_send_blobs, root, blobs, remote, rows_of, bases, stop, server_empty).result

        def ready_batches() -> Iterator[tuple[list[DocRow], int]]:
            """Each batch, once its wave's blobs are up: the documents to commit, and the batch's size."""
            queue = collections.deque(send(wave) for wave in planned[:AHEAD])
            for index, wave in enumerate(planned):
                sent = queue.popleft()()
                if index + AHEAD < len(planned):
                    queue.append(send(planned[index + AHEAD]))
                ready = sent.settle()
                result.uploaded += sent.uploaded
                result.problems += sent.problems
                for chunk in wave:
                    yield [row for row in chunk if row.doc_id in ready], len(chunk)

        done = 0
        last_seq = journal.state().get("last_seq")  # only this push moves it until it returns
        held: list[tuple[DocRow, p.CommitItem, p.CommitResult]] = []  # answered, not yet journaled
        carried: list[int] = []  # seqs of ours journaled ahead of a gap (commits answered out of order)

        def record(at_least: int = 1) -> None:
            nonlocal held, last_seq
            if not held or len(held) < at_least:
                return
            ready, items, answers = (list(column) for column in zip(*held, strict=True))
            held = []
            last_seq = _record(root, journal, ready, items, answers, result, client_id, last_seq, carried)
            failpoint("push.after_record")

        refused = threading.Event()

        def commit(items: list[p.CommitItem]) -> list[p.CommitResult]:
            if refused.is_set():  # a commit before this one failed: the push stops there
                return []
            try:
                return remote.commit(items)
            except BaseException:
                refused.set()
                stop.set()
                raise

        def start(items: list[p.CommitItem]) -> Callable[[], list[p.CommitResult]]:
            if not items:
                return list
            if committer is None:
                return (lambda now: lambda: now)(commit(items))
            return committer.submit(commit, items).result

        inflight: collections.deque[_InFlight] = collections.deque()

        def answered() -> None:
            """Take the oldest commit's answers; what came before is journaled meanwhile."""
            nonlocal done, held
            ready, items, answers, size, _touched = inflight.popleft()
            # Journaled a few batches at a time (one transaction, one fsync) while the
            # server works on the commits in flight; a kill before that is answered
            # again by op id.
            record(RECORD_EVERY)
            held += zip(ready, items, answers(), strict=True)
            failpoint("push.after_commit")
            done += size
            if progress:
                progress(done, len(rows))

        try:
            for ready, size in ready_batches():
                failpoint("push.before_commit")
                items = [commit_item(row, client_id) for row in ready]
                touched = _touches(ready, items)
                # A batch that touches what one in flight touches waits for it: order matters there.
                while any(not touched.isdisjoint(other[4]) for other in inflight):
                    answered()
                # The next commits go out beside the one in flight, and one more is queued
                # behind them, so the server never waits for this thread.
                inflight.append((ready, items, start(items), size, touched))
                if len(inflight) > COMMITS_IN_FLIGHT:
                    answered()
            while inflight:
                answered()
            record()
        finally:
            # Whatever stopped the push, the answers to commits already sent are kept
            # (one sent beside a commit that failed may have been answered).
            for ready, items, answers, _size, _touched in inflight:
                try:
                    got = answers()
                except Exception:  # the error that stopped the push is already on its way
                    continue
                if len(got) != len(items):  # not sent: a commit before it failed
                    break
                held += zip(ready, items, got, strict=True)
            record()
    return result


def _send_blobs(root: Path, blobs: BlobStore, remote: Remote, rows: list[DocRow],
                pool: ThreadPoolExecutor | None, stop: threading.Event, server_empty: bool = False) -> _Sent:
    try:
        return _send_wave(root, blobs, remote, rows, pool, stop, server_empty)
    except BaseException:
        stop.set()  # the waves queued behind this one give up at once: the push stops here
        raise


def _send_wave(root: Path, blobs: BlobStore, remote: Remote, rows: list[DocRow],
               pool: ThreadPoolExecutor | None, stop: threading.Event, server_empty: bool = False) -> _Sent:
    """A wave's blob side: read and check the files, keep their bases, upload what the server lacks.

    Runs ahead of the commits on its own thread (and its own connection),
    so the server stores the next wave's blobs while this one is committed;
    every blob is up before the commit that names it (DESIGN §4).
    """
    sent = _Sent()
    sources: dict[str, BlobSource] = {}
    # A small mergeable document's bytes and stored form, stored as the next base (see
    # _keep_bases); a form the store deflates goes in the upload pack as it is, so no
    # document is deflated twice.
    keep: dict[str, tuple[bytes, bytes]] = {}
    ready: list[DocRow] = []
    # A plain string: pathlib's join costs more than the read here (this loop runs once per document).
    prefix = f"{root}/"
    for row in rows:
        if stop.is_set():
            return _Sent()
        try:
            digest = row.hash
            if row.path is not None and digest not in sources:
                if (row.size or 0) > SMALL:
                    sources[digest] = _large_source(root, row, blobs)
                else:
                    data = read_hashed(prefix + row.path, row.size, digest)
                    if row.kind in _MERGEABLE:
                        stored = encode(data, deflate_small=True)  # deflated for the pack anyway
                        keep[digest] = (data, stored)
                        sources[digest] = BlobSource(digest, len(data), data, None, deflated_part(stored))
                    else:
                        sources[digest] = BlobSource(digest, len(data), data)
            ready.append(row)
        except (ChangedUnderfoot, FileSystemError, OSError) as exc:
            sent.problems.append(ScanProblem(row.path or "?", getattr(exc, "message", str(exc))))
    # The bases are stored on their own thread, and waited for only before the wave's
    # first commit: this thread goes on with the next wave's files meanwhile.
    sent.kept = _keep_bases(blobs, keep, pool)
    if stop.is_set():
        return _Sent()
    if sources:
        # upload() asks the server which blobs it lacks and sends only those, in packs.
        # A blob whose base is not kept may go up too: unreferenced, it is harmless.
        report = remote.upload(list(sources.values()), lacking=server_empty or _unasked(sources.values()))
        sent.uploaded += len(report.uploaded)
        failed = {failure.hash for failure in report.failed}
        paths = {row.hash: row.path for row in ready if row.path}
        for failure in report.failed:
            where = paths.get(failure.hash) or failure.hash[:12]
            sent.problems.append(ScanProblem(where, f"upload failed: {failure.reason}"))
        ready = [row for row in ready if row.hash not in failed or row.path is None]
        failpoint("push.after_upload")
    sent.ready = ready
    return sent


def _unasked(sources: Iterable[BlobSource]) -> bool:
    """Whether a wave's blobs may go up without asking the server which of them it lacks.

    Asking is a round trip and a query on the server before the pack can
    leave: 5-12 ms of a push of 120 small edits on loopback, a fifth of it,
    while the server lacks nearly every blob of an edit anyway. A pack may
    carry blobs the server holds (it verifies them and keeps its own copy:
    docs/protocol.md, Packs), so sending them all unasked costs at most
    :data:`BLIND_BYTES` more upload, and only when the server had them (a
    move, a revert, a copy). A file read from disk (over :data:`SMALL`) is
    never sent unasked.
    """
    total = 0
    for source in sources:
        if source.data is None:
            return False
        total += len(source.deflated) if source.deflated is not None else len(source.data)
        if total > BLIND_BYTES:
            return False
    return True


def _record(root: Path, journal: Journal, rows: list[DocRow], items: list[p.CommitItem],
            answers: list[p.CommitResult], result: Pushed, client_id: str, last_seq: int | None,
            carried: list[int] | None = None) -> int | None:
    """Journal a batch's answers in one transaction; returns the checkpoint (``last_seq``) after it.

    ``carried`` is :func:`_past_echoes`'s: seqs of ours already journaled, waiting for a gap to fill.
    """
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
            path, rev, digest = item.path, answer.rev, item.hash
            updates.append((row.doc_id, {
                "base_path": path, "base_rev": rev, "base_hash": digest, "base_mode": mode,
                "remote_path": path, "remote_rev": rev, "remote_hash": digest,
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
    state = _past_echoes(last_seq, answers, carried)
    journal.batch(updates=updates, inserts=inserts, renames=renames, conflicts=conflict_rows, state=state)
    return state["last_seq"] if state else last_seq


def _past_echoes(last: int | None, answers: list[p.CommitResult],
                 carried: list[int] | None = None) -> dict[str, Any] | None:
    """Move the checkpoint past this batch when the feed holds nothing else there.

    The server numbers a commit's changes in one run under its workspace
    lock. When this batch's changes are exactly the next ones after our
    checkpoint, the feed up to them is our own echoes, which a pull would
    read only to skip: moving the checkpoint now spares the next round from
    paging through them (50,000 of them after a first sync). Any gap — a
    change by someone else, a replayed commit — leaves the checkpoint where
    it is, and the next pull reads the feed as always.

    Two commits in flight may be numbered in either order, so one record may
    hold a gap that the next fills: with ``carried``, the seqs above the
    checkpoint that did not fit are kept there (journaled already) and
    counted with the next batch's.
    """
    seqs = sorted([*(carried or ()), *(a.seq for a in answers if a.status == "ok" and a.seq is not None)])
    if not seqs:
        return None
    if last is None or seqs != list(range(last + 1, last + 1 + len(seqs))):
        if carried is not None:
            carried[:] = [seq for seq in seqs if last is None or seq > last]
        return None
    if carried is not None:
        carried.clear()
    return {"last_seq": seqs[-1]}
