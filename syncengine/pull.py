"""Pulling: turn the server's feed (or full listing) into each document's remote state.

Only remote states and the checkpoint are written here, in one transaction,
so the checkpoint never moves past something not durably recorded
(RELIABILITY §2 rule 5). Applying those states to files is a separate,
retryable step (apply.py): one file that cannot be written never stalls
the feed.

A feed entry whose rev is not newer than the remote rev we hold is an echo
of our own push (or a replay) and is ignored — judged by rev, never by
client id. A checkpoint from another server (a reset server) or from the
server's future (one restored from a backup) means "list everything and
reconcile without bases": nothing is deleted on that basis, differences
become conflicts. One below the server's ``min_seq`` lists everything too,
keeping the bases: documents the server no longer lists become *unknown*,
never deleted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from syncengine import protocol as p
from syncengine.documents import kind_for
from syncengine.journal import DocRow, Journal
from syncengine.models import ScanProblem
from syncengine.remote import Remote


def remote_mode(executable: bool) -> int:
    return 0o755 if executable else 0o644


@dataclass
class PullResult:
    """What a pull learned: writes to make, and what to report."""

    updates: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    inserts: list[dict[str, Any]] = field(default_factory=list)
    renames: list[tuple[str, str]] = field(default_factory=list)
    state: dict[str, Any] = field(default_factory=dict)
    entries: int = 0
    full: bool = False
    problems: list[ScanProblem] = field(default_factory=list)

    def save(self, journal: Journal) -> None:
        journal.batch(updates=self.updates, inserts=self.inserts, renames=self.renames, state=self.state)

    @property
    def server_empty(self) -> bool:
        """Whether the workspace never had a change on the server (its feed ends at 0, nothing listed).

        Then no commit there names a blob, and a push may send its blobs
        without asking which ones the server lacks: one it holds anyway (left
        by a push killed before its commits) is stored once, as when two
        clients upload the same blob.
        """
        return self.entries == 0 and self.state.get("last_seq") == 0


def _values(path: str, rev: int, digest: str | None, executable: bool, seq: int | None,
            at: int | None) -> dict[str, Any]:
    return {"remote_path": path, "remote_rev": rev, "remote_hash": digest,
            "remote_mode": remote_mode(executable), "remote_seq": seq, "remote_at": at}


_FORGET_REMOTE = {"remote_path": None, "remote_rev": None, "remote_hash": None, "remote_mode": None,
                  "remote_seq": None, "remote_at": None}
_FORGET_BASE = {"base_path": None, "base_rev": None, "base_hash": None, "base_mode": None}


def pull(journal: Journal, remote: Remote, *, page_size: int = p.DEFAULT_PAGE) -> PullResult:
    """Read what changed on the server since our checkpoint; nothing is written."""
    state = journal.state()
    since = state["last_seq"] or 0
    known_server = state["server_id"]
    if known_server is None:
        # Never pulled from any server: the listing is the answer, and its first page
        # says which server this is. Asking the feed first only to learn that was one
        # round trip more at the start of every first sync.
        return _from_listing(journal, remote, page_size, new_server=False)
    page = remote.changes(since, page_size)
    if page.server_id != known_server or since > page.last_seq or since < page.min_seq - 1:
        # Another server, or this one restored from a backup (our checkpoint
        # is from its future, so the revs we hold may be reused for other
        # content): our bases mean nothing there. Below min_seq the revs still
        # hold; only the feed we missed is gone.
        restored = page.server_id != known_server or since > page.last_seq
        return _from_listing(journal, remote, page_size, new_server=restored)
    latest: dict[str, p.Change] = {}
    result = PullResult()
    checkpoint = since
    while True:
        for change in page.changes:
            latest[change.doc_id] = change
            result.entries += 1
        result.problems.extend(ScanProblem(r.path or r.doc_id or "?", f"refused from server: {r.reason}")
                               for r in page.rejected)
        if not page.more:
            checkpoint = page.last_seq
            break
        checkpoint = page.changes[-1].seq if page.changes else page.last_seq
        page = remote.changes(checkpoint, page_size)
    _record(journal, result, [(c.doc_id, c.path, c.rev, None if c.deleted else c.hash, c.executable,
                               c.seq, c.received_at) for c in latest.values()])
    result.state = {"last_seq": checkpoint, "server_id": page.server_id}
    return result


def _from_listing(journal: Journal, remote: Remote, page_size: int, *, new_server: bool) -> PullResult:
    result = PullResult(full=True)
    listed: list[tuple] = []
    after: str | None = None
    checkpoint: int | None = None
    server_id = None
    while True:
        page = remote.docs(after, page_size)
        server_id = page.server_id
        if checkpoint is None:
            # Changes made while we page are replayed from here by the next
            # feed read; replays are harmless (ignored by rev).
            checkpoint = page.last_seq
        listed.extend((d.doc_id, d.path, d.rev, d.hash, d.executable, None, None) for d in page.docs)
        result.problems.extend(ScanProblem(r.path or r.doc_id or "?", f"refused from server: {r.reason}")
                               for r in page.rejected)
        if not page.next:
            break
        after = page.next
    result.entries = len(listed)
    if new_server:
        # Revs from another server mean nothing here: keep no base, delete nothing.
        for row in journal.unsettled() + list(journal.docs_by_ids(journal.remote_known_ids()).values()):
            result.updates.append((row.doc_id, {**_FORGET_REMOTE, **_FORGET_BASE}))
    else:
        listed_ids = {entry[0] for entry in listed}
        for doc_id in journal.remote_known_ids() - listed_ids:
            result.updates.append((doc_id, dict(_FORGET_REMOTE)))
    _record(journal, result, listed, force=new_server)
    result.state = {"last_seq": checkpoint or 0, "server_id": server_id}
    return result


def _record(journal: Journal, result: PullResult, entries: list[tuple], *, force: bool = False) -> None:
    """Turn (doc_id, path, rev, hash|None, executable, seq, at) entries into writes."""
    if not entries:
        return
    rows = journal.docs_by_ids(e[0] for e in entries)
    unknown_paths = [e[1] for e in entries if e[0] not in rows and e[3] is not None]
    candidates = journal.docs_by_local_paths(unknown_paths) if unknown_paths else {}
    adopted: set[str] = set()
    for doc_id, path, rev, digest, executable, seq, at in entries:
        values = _values(path, rev, digest, executable, seq, at)
        row = rows.get(doc_id)
        if row is not None:
            if not force and row.remote_rev is not None and rev <= row.remote_rev:
                continue  # an echo of our own push, or a replayed entry
            result.updates.append((doc_id, values))
            continue
        if digest is None:
            continue  # deleted before we ever knew it: nothing to do
        local = candidates.get(path)
        if local is not None and _adoptable(local) and local.doc_id not in adopted:
            # The same path created here and on the server before either
            # synced: one document seen from two sides. It takes the
            # server's id; reconcile then finds it identical or both-created.
            adopted.add(local.doc_id)
            result.renames.append((local.doc_id, doc_id))
            result.updates.append((doc_id, values))
            continue
        result.inserts.append({"doc_id": doc_id, "kind": kind_for(path).value, **values})


def _adoptable(row: DocRow) -> bool:
    return row.base_rev is None and row.remote_rev is None


def rejoin(journal: Journal, rows: list[DocRow]) -> bool:
    """Give a file a killed apply put in place back to the document it was written for.

    A round killed after a download is renamed into place but before the
    journal commits leaves a file the next scan may read as created here —
    a new document, with the server's bytes at the server's path, beside
    the document that is absent here and waits for exactly those bytes.
    They are one document: it takes the file, and reconcile then finds both
    sides equal (adopt) instead of a both-created conflict and a copy.
    Returns whether anything was rejoined.
    """
    waiting = {(r.remote_path, r.remote_hash): r for r in rows
               if r.path is None and r.remote_hash is not None and r.remote_path is not None}
    if not waiting:
        return False
    deletes: list[str] = []
    updates: list[tuple[str, dict[str, Any]]] = []
    for row in rows:
        if row.base_rev is not None or row.remote_rev is not None or row.path is None:
            continue
        target = waiting.pop((row.path, row.hash), None)
        if target is None:
            continue
        deletes.append(row.doc_id)
        updates.append((target.doc_id, {"path": row.path, "hash": row.hash, "size": row.size,
                                         "mtime_ns": row.mtime_ns, "ctime_ns": row.ctime_ns, "inode": row.inode,
                                         "mode": row.mode, "local_at": row.local_at}))
    if deletes:
        journal.batch(deletes=deletes, updates=updates)
    return bool(deletes)
