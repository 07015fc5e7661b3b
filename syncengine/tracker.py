"""The change tracker: watcher events in, journaled batches out.

Events are hints (RELIABILITY §2 rule 9). The tracker learns from them only
*which paths to look at*; what changed is decided as the scanner decides it,
by stat and hash against the journal, for just those paths. That is what
makes coalescing simple and safe:

* events on one path within a short window collapse into one look (a save
  that is create + modify + rename; 1,000 writes of one file);
* an editor's atomic save (temp file renamed over the document) is a look at
  the rename's ``dest_path``: one modification, never a delete and a create;
* pairs that cancel out (created, then deleted) leave nothing on disk and
  nothing in the journal, so the look finds nothing;
* a path found missing is looked at once more, a moment later, before it is
  journaled as deleted (vim renames the file to a backup, then writes the new
  one; the gap is not a deletion);
* a file whose (size, mtime, ctime, inode, mode) equal the journal's is
  unchanged. The daemon's own writes are recognised that way: apply records
  the stat of what it wrote, never a time window. The tracker looks only
  while no sync holds the workspace, so it never sees an apply half-done.

Each batch is journaled in one transaction, then announced on the ``zones``
and ``processing`` channels.
"""

from __future__ import annotations

import logging
import queue
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from syncengine import progress, scanner
from syncengine.documents import changed_zones, kind_for
from syncengine.fsops import FileStat, hash_with_head, is_temp_name, lstat, read_bytes, sha256
from syncengine.locks import is_locked
from syncengine.models import Kind, LocalChange, Op
from syncengine.paths import IGNORE_FILE, STATE_DIR, IgnoreRules

log = logging.getLogger("syncengine.tracker")

VCS_LOCKS = (".git/index.lock", ".hg/wlock")  # while one exists, a checkout is half-done: hold back
VCS_HOLD_MAX = 300.0  # a lock older than this is stale (a crashed git): go on, with a warning
ZONES_MAX_BYTES = 1 << 20  # field diffs only for structured documents up to this size
RACY_NS = 50_000_000  # a file written this recently may be written again within the same mtime tick
HASH_TASK_MIN = 200  # batches hashing this many files show a ``hash`` task


@dataclass(frozen=True, slots=True)
class RawEvent:
    """One watcher event, with workspace-relative paths ("" is the root)."""

    kind: str  # created | modified | deleted | moved | closed | attrib
    path: str
    dest: str | None = None
    is_dir: bool = False


@dataclass
class Targets:
    """What a list of events asks the tracker to look at."""

    paths: set[str] = field(default_factory=set)
    folders: set[str] = field(default_factory=set)
    renamed: set[str] = field(default_factory=set)  # sources of renames onto a real path: no second look
    rules_changed: bool = False


def _skipped(rel: str, ignore: IgnoreRules) -> bool:
    if rel in ("", ".") or rel == STATE_DIR or rel.startswith(STATE_DIR + "/"):
        return True
    return is_temp_name(rel.rsplit("/", 1)[-1]) or ignore.ignored(rel)


def classify(events: list[RawEvent], ignore: IgnoreRules) -> Targets:
    """Turn raw events into the paths and folders to look at (pure but for the ignore rules).

    Directory "modified" events only say that an entry changed, and that
    entry has its own event: dropped. A folder created, deleted or moved is
    looked at whole, since inotify reports nothing for the files inside a
    folder moved out of (or into) the workspace.
    """
    out = Targets()
    for ev in events:
        for rel in (ev.path, ev.dest):
            if rel == IGNORE_FILE:
                out.rules_changed = True
        if ev.is_dir:
            if ev.kind in ("created", "deleted", "moved"):
                for rel in (ev.path, ev.dest):
                    if rel is not None and not _skipped(rel, ignore):
                        out.folders.add(rel)
            continue
        if ev.kind == "moved" and ev.dest is not None and not _skipped(ev.dest, ignore):
            out.paths.add(ev.dest)
            out.renamed.add(ev.path)
        if not _skipped(ev.path, ignore):
            out.paths.add(ev.path)
    return out


class Pending:
    """Per-path timers: a path is due once quiet for ``settle`` s, or ``cap`` s after its first event."""

    def __init__(self, settle: float, cap: float) -> None:
        self.settle = settle
        self.cap = max(cap, settle)
        self.entries: dict[tuple[str, str], list[float]] = {}  # (kind, path) -> [first, last, not_before]
        self.rechecks: set[tuple[str, str]] = set()  # second looks no event asked for (racy stats)

    def add(self, kind: str, path: str, now: float, not_before: float = 0.0) -> None:
        self.rechecks.discard((kind, path))
        entry = self.entries.get((kind, path))
        if entry is None:
            self.entries[(kind, path)] = [now, now, not_before]
        else:
            entry[1] = now
            entry[2] = max(entry[2], not_before)

    def _deadline(self, entry: list[float]) -> float:
        first, last, not_before = entry
        return max(not_before, min(last + self.settle, first + self.cap))

    def recheck(self, kind: str, path: str, now: float, not_before: float) -> None:
        """A second look of our own (not asked for by an event): it need not go before a sync round."""
        fresh = (kind, path) not in self.entries
        self.add(kind, path, now, not_before)
        if fresh:
            self.rechecks.add((kind, path))

    def next_deadline(self, rechecks: bool = True) -> float | None:
        # list() copies in one step: the sync worker asks this while the journal worker adds entries.
        entries = list(self.entries.items())
        skip = set(self.rechecks) if not rechecks else set()
        return min((self._deadline(e) for key, e in entries if key not in skip), default=None)

    def take_due(self, now: float) -> list[tuple[str, str]]:
        """Remove and return every (kind, path) whose deadline has passed."""
        due = [key for key, entry in self.entries.items() if self._deadline(entry) <= now]
        for key in due:
            del self.entries[key]
            self.rechecks.discard(key)
        return due

    def __len__(self) -> int:
        return len(self.entries)


@dataclass
class Batch:
    """What one look journaled."""

    changes: list[LocalChange] = field(default_factory=list)
    seqs: list[int] = field(default_factory=list)
    zones: dict[str, list[str]] = field(default_factory=dict)
    restamps: int = 0
    looked: int = 0


class _Recent:
    """The last bytes seen of small structured documents, so the next edit can be diffed by field."""

    def __init__(self, entries: int = 512, budget: int = 64 << 20) -> None:
        self.items: OrderedDict[str, bytes] = OrderedDict()  # hash -> bytes
        self.entries = entries
        self.budget = budget
        self.size = 0

    def put(self, digest: str, data: bytes) -> None:
        if digest in self.items:
            self.items.move_to_end(digest)
            return
        self.items[digest] = data
        self.size += len(data)
        while len(self.items) > self.entries or self.size > self.budget:
            _old, dropped = self.items.popitem(last=False)
            self.size -= len(dropped)

    def get(self, digest: str) -> bytes | None:
        return self.items.get(digest)


class ChangeTracker:
    """Coalesces events per path, looks at due paths, journals what changed.

    Not a thread: the daemon's journal worker drives it (``wait`` then
    ``step``), and tests drive it by hand (``feed`` then ``flush``).
    """

    def __init__(self, ws, *, settle: float = 0.04, cap: float = 0.2, confirm: float = 0.15,
                 clock=time.monotonic) -> None:
        self.ws = ws
        self.clock = clock
        self.confirm = confirm
        self.pending = Pending(settle, cap)
        self.inbox: queue.SimpleQueue[list[RawEvent]] = queue.SimpleQueue()
        self.confirmed: set[str] = set()  # looked at once and found missing: the next look journals it
        self.force_hash: set[str] = set()  # racy at the last look: hash at the next one whatever the stat
        self.recent = _Recent()
        self.rules_changed = False
        self.held_since: float | None = None
        self.hold_reason: str | None = None

    # ------------------------------------------------------------ input

    def feed(self, events: list[RawEvent]) -> None:
        """Thread-safe: called from the watcher's thread."""
        if events:
            self.inbox.put(events)

    def poke(self) -> None:
        """Wake a ``wait`` early (a rescan or a stop was asked for)."""
        self.inbox.put([])

    def wait(self, timeout: float | None) -> None:
        """Block until events arrive or ``timeout`` passes, then take in everything queued."""
        try:
            batches = [self.inbox.get(timeout=timeout) if timeout is None or timeout > 0
                       else self.inbox.get_nowait()]
        except queue.Empty:
            return
        while True:
            try:
                batches.append(self.inbox.get_nowait())
            except queue.Empty:
                break
        now = self.clock()
        targets = classify([ev for batch in batches for ev in batch], self.ws.ignore)
        self.rules_changed |= targets.rules_changed
        for rel in targets.paths:
            self.pending.add("path", rel, now)
        for rel in targets.folders:
            self.pending.add("folder", rel, now)
        self.confirmed |= targets.renamed

    def next_deadline(self) -> float | None:
        return self.pending.next_deadline()

    def next_event_deadline(self) -> float | None:
        """When the next path an event asked about is due (our own second looks left out)."""
        return self.pending.next_deadline(rechecks=False)

    # ------------------------------------------------------------ looking

    def held(self, paths: list[str]) -> str | None:
        """Why the tracker must not look now: a sync applying files, or a checkout in progress."""
        if is_locked(self.ws.layout.sync_lock):
            return "sync"
        root = self.ws.root
        folders = {""}
        for rel in paths:
            parts = rel.split("/")[:-1]
            folders.update("/".join(parts[:i]) for i in range(1, len(parts) + 1))
        for folder in sorted(folders):
            for lock in VCS_LOCKS:
                if (root / folder / lock if folder else root / lock).exists():
                    return f"{folder}/{lock}" if folder else lock
        return None

    def step(self, force: bool = False) -> Batch | None:
        """Look at every due path (all of them with ``force``); journal what changed."""
        now = self.clock()
        first = min((e[0] for e in self.pending.entries.values()), default=now)
        due = self.pending.take_due(float("inf") if force else now)
        if not due:
            return None
        log.debug("%d due, oldest event %.3fs ago", len(due), now - first)
        paths = sorted(p for kind, p in due if kind == "path")
        folders = sorted(p for kind, p in due if kind == "folder")
        reason = self.held(paths + [f + "/x" for f in folders])
        if reason != self.hold_reason:
            self.held_since, self.hold_reason = (now if reason else None), reason
            if reason:
                log.log(logging.DEBUG if reason == "sync" else logging.INFO,
                        "holding %d change(s) back while %s is held", len(due), reason)
        stale = reason not in (None, "sync") and now - (self.held_since or now) > VCS_HOLD_MAX
        if reason is not None and not stale:
            for kind, rel in due:
                self.pending.add(kind, rel, now, not_before=now + 0.05)
            return None
        if stale:
            log.warning("%s has been held for over %.0f s; taking it for stale and journaling anyway",
                        reason, VCS_HOLD_MAX)
        with self.ws.scan_lock.acquire(timeout=self.ws.config.sync.wait):
            return self._look(paths, folders, now)

    def flush(self) -> Batch:
        """Take in what is queued and look at everything now (tests, shutdown)."""
        total = Batch()
        self.wait(0)
        for _attempt in range(3):  # a missing path needs a second look
            batch = self.step(force=True)
            if batch is not None:
                total.changes += batch.changes
                total.seqs += batch.seqs
                total.zones.update(batch.zones)
                total.restamps += batch.restamps
                total.looked += batch.looked
            if not len(self.pending):
                break
        return total

    def _look(self, paths: list[str], folders: list[str], now: float) -> Batch | None:
        ws = self.ws
        journal = ws.journal
        known = {row.path: (row.doc_id, row.hash, row.size, row.mtime_ns, row.ctime_ns, row.inode, row.mode,
                            row.kind) for row in journal.docs_by_local_paths(paths).values()}
        on_disk: dict[str, FileStat | None] = {rel: lstat(ws.root / rel) for rel in paths}
        if folders:
            seen = scanner.walk(ws.root, ws.ignore, only=folders)
            on_disk.update(seen.files)
            for rel, entry in journal.local_index().items():
                if any(rel.startswith(f + "/") for f in folders) and not ws.ignore.ignored(rel):
                    known[rel] = entry
                    on_disk.setdefault(rel, seen.files.get(rel))
        missing = sorted(rel for rel, st in on_disk.items() if st is None and rel in known)
        unconfirmed = [rel for rel in missing if rel not in self.confirmed]
        if unconfirmed:
            # Look again in a moment before journaling a deletion (RELIABILITY D2).
            self.confirmed.update(unconfirmed)
            for rel in paths:
                self.pending.add("path", rel, now, not_before=now + self.confirm)
            for rel in folders:
                self.pending.add("folder", rel, now, not_before=now + self.confirm)
            return None
        self.confirmed.difference_update(on_disk)
        batch = Batch(looked=len(on_disk))
        wall = time.time_ns()
        to_hash = []
        for rel, st in sorted(on_disk.items()):
            if st is None:
                continue
            entry = known.get(rel)
            if wall - st.mtime_ns < RACY_NS:
                # Written within a timestamp tick of this look: a same-size write in that
                # tick would leave the stat as it is now, so look once more, hashing.
                self.force_hash.add(rel)
                self.pending.recheck("path", rel, now, not_before=now + 2 * RACY_NS / 1e9)
            unchanged = entry is not None and (st.size, st.mtime_ns, st.ctime_ns, st.inode, st.mode) == entry[2:7]
            if unchanged and rel not in self.force_hash:
                continue  # our own write, or an event that changed nothing
            to_hash.append(rel)
        self.force_hash.difference_update(to_hash)
        hashed = self._hash(to_hash)
        restamps: list[tuple[str, FileStat]] = []
        created: list[str] = []
        for rel, (digest, st2, _head) in hashed.items():
            entry = known.get(rel)
            if entry is None:
                created.append(rel)
            elif digest != entry[1] or (st2.mode & 0o111) != ((entry[6] or 0) & 0o111):
                batch.changes.append(_change(Op.MODIFIED, rel, digest, st2, doc_id=entry[0], kind=entry[7]))
            elif (st2.size, st2.mtime_ns, st2.ctime_ns, st2.inode, st2.mode) != entry[2:7]:
                restamps.append((rel, st2))
        moves = scanner._match_moves(missing, created, known, hashed)
        for old, new in moves:
            digest, st2, _head = hashed[new]
            batch.changes.append(_change(Op.MOVED, new, digest, st2, doc_id=known[old][0], kind=known[old][7],
                                         old_path=old))
        for rel in sorted(set(created) - {new for _o, new in moves}):
            digest, st2, head = hashed[rel]
            batch.changes.append(_change(Op.CREATED, rel, digest, st2, kind=kind_for(rel, head).value))
        for rel in sorted(set(missing) - {old for old, _n in moves}):
            batch.changes.append(LocalChange(Op.DELETED, rel, doc_id=known[rel][0], kind=known[rel][7]))
        batch.zones = self._zones(batch.changes, known)
        if batch.changes or restamps:
            batch.seqs = journal.record_local(batch.changes, restamps, zones=batch.zones)
        batch.restamps = len(restamps)
        if batch.changes:
            self._announce(batch)
            log.debug("journaled %d change(s) of %d path(s) looked at", len(batch.changes), batch.looked)
        return batch

    def _hash(self, paths: list[str]) -> dict[str, tuple[str, FileStat, bytes]]:
        """Hash files, as a ``hash`` task other processes can watch when there are many."""
        task = progress.Task(self.ws.events, "hash", f"hash {len(paths)} changed file(s)", len(paths)) \
            if len(paths) >= HASH_TASK_MIN else None
        hashed: dict[str, tuple[str, FileStat, bytes]] = {}
        try:
            for done, rel in enumerate(paths, 1):
                try:
                    hashed[rel] = hash_with_head(self.ws.root / rel)
                except FileNotFoundError:
                    pass  # gone since the stat: its own event brings it back here
                except OSError as exc:
                    log.warning("cannot read %s: %s", rel, exc.strerror or exc)
                if task:
                    task.update(done)
        finally:
            if task:
                task.finish()
        return hashed

    # ------------------------------------------------------------ zones and events

    def _zones(self, changes: list[LocalChange], known: dict[str, tuple]) -> dict[str, list[str]]:
        """Field paths that changed, per structured document (``$`` when it appeared or went)."""
        out: dict[str, list[str]] = {}
        for ch in changes:
            kind = Kind(ch.kind) if ch.kind else Kind.BINARY
            if not kind.structured:
                continue
            if ch.op in (Op.CREATED, Op.DELETED):
                out[ch.path] = ["$"]
                if ch.op is Op.CREATED:
                    self._remember(ch)
                continue
            old_hash = known[ch.old_path or ch.path][1]
            if old_hash == ch.hash:
                continue  # a pure move: no field changed
            new = self._remember(ch)
            old = self._bytes_of(old_hash)
            if new is None or old is None:
                out[ch.path] = ["$"]
                continue
            fields = changed_zones(kind, old, new)
            if fields:
                out[ch.path] = fields
        return out

    def _remember(self, ch: LocalChange) -> bytes | None:
        if ch.size is None or ch.size > ZONES_MAX_BYTES or ch.hash is None:
            return None
        try:
            data, _st = read_bytes(self.ws.root / ch.path)
        except OSError:
            return None
        if sha256(data) != ch.hash:
            return None  # written again since: its own event follows
        self.recent.put(ch.hash, data)
        return data

    def _bytes_of(self, digest: str | None) -> bytes | None:
        if digest is None:
            return None
        data = self.recent.get(digest)
        if data is None and self.ws.blobs.has(digest):
            try:
                data = self.ws.blobs.get(digest)
            except Exception:  # a damaged blob only costs the field detail
                return None
        return data

    def _announce(self, batch: Batch) -> None:
        events = self.ws.events
        seq_of = dict(zip((c.path for c in batch.changes), batch.seqs, strict=False))
        doc_of = {c.path: c.doc_id for c in batch.changes}
        new_paths = [c.path for c in batch.changes if c.doc_id is None]
        if new_paths:
            doc_of.update({p: row.doc_id for p, row in self.ws.journal.docs_by_local_paths(new_paths).items()})
        kind_of = {c.path: c.kind for c in batch.changes}
        progress.publish(events, "zones", [
            progress.zones_payload(path, fields, origin="local", doc_id=doc_of.get(path),
                                   kind=str(kind_of.get(path) or "") or None, seq=seq_of.get(path))
            for path, fields in batch.zones.items()])
        progress.publish(events, "processing", [
            progress.processing_payload(c.path, "queued", op=c.op.value, origin="local") for c in batch.changes])


def _change(op: Op, rel: str, digest: str, st: FileStat, **kw) -> LocalChange:
    return LocalChange(op, rel, hash=digest, size=st.size, mtime_ns=st.mtime_ns, ctime_ns=st.ctime_ns,
                       inode=st.inode, mode=st.mode, **kw)


def root_present(root: Path) -> bool:
    """The workspace root and its marker exist: an unmounted or deleted root is never read as deletions."""
    return (root / STATE_DIR / "config.toml").is_file() or (root / STATE_DIR / "journal.db").is_file()
