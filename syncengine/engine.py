"""The facade: one object per workspace that the CLI, the daemon and scripts use.

Every public method returns plain values from :mod:`syncengine.models`.
Opening is lazy and cheap; the journal is opened on first use, after any
apply a killed process left half-done has been finished (fsops.recover_trash),
so no scan ever mistakes that gap for a deletion.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from syncengine import scanner, workspace
from syncengine.config import Config
from syncengine.credentials import save_token
from syncengine.errors import SyncEngineError, UsageError
from syncengine.fsops import failpoint, recover_trash
from syncengine.journal import EventLog, Journal
from syncengine.locks import FileLock
from syncengine.models import ConflictInfo, InitReport, ScanReport
from syncengine.paths import IgnoreRules, check_path

if TYPE_CHECKING:
    from syncengine.blobs import BlobStore
    from syncengine.views import (
        DocDiff,
        LogEntry,
        PendingItem,
        RepairReport,
        RestoreReport,
        SnapshotInfo,
        Status,
        SyncInfo,
    )

def _history():
    """syncengine.history on first use: it loads the blob store's stack, which a no-op sync never needs."""
    from syncengine import history

    return history


def _views():
    """syncengine.views on first use: a sync round shows none of them (see syncengine.models)."""
    from syncengine import views

    return views


MAX_PARSE = 8 << 20  # status checks that pending documents parse up to this size ...
MAX_PARSE_DOCS = 200  # ... and up to this many of them


class Workspace:
    """A synced folder: its files, journal, blob store and settings."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root).expanduser().absolute()
        self.layout = workspace.Layout(self.root)
        self.config = Config.load(self.layout.config)
        self.ignore = IgnoreRules(self.root)
        self._journal: Journal | None = None
        self._events: EventLog | None = None
        self._blobs: BlobStore | None = None
        self.scan_lock = FileLock(self.layout.state / "scan.lock", "scan")

    # ------------------------------------------------------------ opening

    @classmethod
    def find(cls, start: Path | str = ".") -> Workspace:
        """The workspace containing ``start`` (like git); NotAWorkspace otherwise."""
        return cls(workspace.find_root(Path(start).expanduser()))

    @classmethod
    def init(
        cls,
        path: Path | str = ".",
        *,
        server: str | None = None,
        name: str | None = None,
        token: str | None = None,
        config: Config | None = None,
    ) -> tuple[Workspace, InitReport]:
        """Create a workspace at ``path`` and record every file already there.

        With a server, ``name`` is the workspace's name there (default: the
        folder's name) and ``token`` is stored with mode 0600. A workspace
        made without a server is connected to one the same way (its history
        stays; the report says ``created=False``); one that has a server
        already is refused.
        """
        path = Path(path).expanduser()
        config = config or Config()
        if server:
            config.server.url = server.rstrip("/")
            config.server.workspace = name or Path(path).absolute().name
        elif name or token:
            raise UsageError("--workspace and a token need --server")
        existing = workspace.Layout(Path(path).absolute())
        if server and existing.config.is_file():
            return cls._connect(existing, config.server.url, config.server.workspace, token)
        layout = workspace.create(Path(path), config)
        if token:
            save_token(layout.token, token)
        ws = cls(layout.root)
        report = ws.scan()
        return ws, InitReport(str(ws.root), True, ws.config.server.url or None,
                              ws.config.server.workspace or None, report.files)

    @classmethod
    def _connect(cls, layout: workspace.Layout, url: str, name: str, token: str | None
                 ) -> tuple[Workspace, InitReport]:
        ws = cls(layout.root)
        try:
            if ws.config.server.url or ws.config.server.workspace:
                raise workspace.WorkspaceExists(
                    f"{layout.root} is already a workspace of {ws.config.server.url or 'a server'}",
                    hint="its server is set in .syncengine/config.toml")
            ws.config.server.url, ws.config.server.workspace = url, name
            if token:
                save_token(layout.token, token)
            ws.config.save(layout.config)
            report = ws.scan()
        except BaseException:
            ws.close()
            raise
        return ws, InitReport(str(ws.root), False, url, name, report.files)

    @property
    def journal(self) -> Journal:
        if self._journal is None:
            if not self.root.is_dir():
                raise workspace.NotAWorkspace(f"{self.root} is gone")
            self._recover()
            self._journal = Journal.open(self.layout.journal)
            self._check_identity(self._journal)
        return self._journal

    def _recover(self) -> None:
        """Put back files a killed apply set aside — only while no sync runs.

        A sync mid-apply has files in the trash on purpose; putting one back
        under its feet would resurrect a file it is deleting.
        """
        from syncengine.errors import BusyError

        lock = FileLock(self.layout.sync_lock, "sync")
        try:
            lock.acquire(timeout=0)
        except (BusyError, OSError):
            return
        try:
            recover_trash(self.root)
        finally:
            lock.release()

    @property
    def events(self) -> EventLog:
        if self._events is None:
            self._events = EventLog(self.layout.events)
        return self._events

    @property
    def blobs(self) -> BlobStore:
        if self._blobs is None:
            from syncengine.blobs import BlobStore  # the blob store's stack, loaded by what reads or writes blobs

            self._blobs = BlobStore(self.layout.objects)
        return self._blobs

    def _check_identity(self, journal: Journal) -> None:
        """A copied workspace is a new replica: it takes a new client id."""
        dev, ino = workspace.root_identity(self.root)
        state = journal.state()
        if state["root_dev"] is None:
            journal.update_state(root_dev=dev, root_ino=ino)
        elif (state["root_dev"], state["root_ino"]) != (dev, ino):
            import uuid

            journal.update_state(root_dev=dev, root_ino=ino, client_id=uuid.uuid4().hex)

    def close(self) -> None:
        """Close the journal, the events database and the blob table: a long-lived process (the daemon, a
        test, a script opening workspaces in turn) keeps no descriptor of a workspace it is done with."""
        for db in (self._journal, self._events):
            if db is not None:
                db.close()
        self._journal = self._events = None
        if self._blobs is not None:
            self._blobs.close()

    def __enter__(self) -> Workspace:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ paths

    def rel(self, path: str | Path, cwd: Path | None = None) -> str:
        """A user-typed path (relative to ``cwd`` or absolute) as a workspace path."""
        raw = Path(path)
        absolute = raw if raw.is_absolute() else (cwd or Path.cwd()) / raw
        resolved = Path(os.path.normpath(absolute))
        try:
            rel = resolved.relative_to(self.root).as_posix()
        except ValueError:
            raise UsageError(f"{path} is outside the workspace {self.root}")
        if rel in (".", ""):
            return ""
        check_path(rel)
        return rel

    # ------------------------------------------------------------ scanning and status

    def scan(self, progress=None) -> ScanReport:
        """Journal whatever changed on disk since the last scan; ``progress(done, total)`` as files are hashed."""
        with self.scan_lock.acquire(timeout=self.config.sync.wait):
            return scanner.scan(self.root, self.journal, self.ignore, progress=progress)

    def status(self) -> Status:
        """Scan, then summarise pending changes, conflicts, snapshots and sync."""
        failpoint("status.start")
        report = self.scan()
        journal = self.journal
        pending = self._pending()
        counts = _views().PendingCounts(**{op: sum(1 for p in pending if p.op == op)
                                  for op in ("created", "modified", "deleted", "moved")})
        snaps = journal.snapshots(limit=1)
        return _views().Status(
            root=str(self.root),
            files=report.files,
            pending=counts,
            pending_paths=tuple(pending[:200]),
            since_snapshot=journal.unsnapshotted_count(),
            conflicts=tuple(self.conflicts()),
            last_snapshot=_history().snapshot_info(snaps[0]) if snaps else None,
            sync=self._sync_info(stalled=True),
            scan=report,
            daemon=self.daemon_info(),
            errors=report.problems + self._document_errors() + self._unparsable(pending),
        )

    def _unparsable(self, pending: list[PendingItem]) -> tuple:
        """Pending structured documents that do not parse (RELIABILITY E1: flag it).

        They sync as they are, byte for byte, but a concurrent edit cannot
        merge field by field and keeps both versions; a person saving a
        half-typed file wants to hear that before the other side edits.
        Only pending documents are read, the first ``MAX_PARSE_DOCS`` of them
        (as many as status lists), so it costs O(changes) and stays bounded
        on a first sync of a large folder.
        """
        from syncengine.documents import parse
        from syncengine.errors import DocumentError
        from syncengine.models import Kind, ScanProblem

        wanted = [item.path for item in pending if item.op != "deleted" and item.path][:MAX_PARSE_DOCS]
        if not wanted:
            return ()
        kinds = dict(self.journal.execute(
            f"SELECT path, kind FROM document WHERE path IN ({','.join('?' * len(wanted))})", wanted))
        problems = []
        for path in wanted:
            kind = Kind(kinds[path]) if path in kinds else None
            if kind is None or not kind.structured:
                continue
            try:
                with open(self.root / path, "rb") as fh:
                    data = fh.read(MAX_PARSE + 1)
                if len(data) > MAX_PARSE:
                    continue
                parse(kind, data)
            except DocumentError as exc:
                problems.append(ScanProblem(path, f"{exc.message}; it syncs as it is, and a concurrent edit "
                                                  "keeps both versions instead of merging"))
            except OSError:
                continue
        return tuple(problems)

    def _document_errors(self) -> tuple:
        """Documents the last sync could not apply or push, with why (they stay pending)."""
        from syncengine.models import ScanProblem

        rows = self.journal.execute(
            "SELECT COALESCE(path, remote_path, base_path, doc_id), error FROM document "
            "WHERE error IS NOT NULL ORDER BY 1")
        return tuple(ScanProblem(path, error) for path, error in rows)

    def _pending(self) -> list[PendingItem]:
        """Documents whose local state differs from the last synced base."""
        rows = self.journal.execute(
            "SELECT path, base_rev, base_path, base_hash FROM document "
            "WHERE NOT (path IS base_path AND hash IS base_hash AND base_rev IS NOT NULL) "
            "AND NOT (path IS NULL AND base_hash IS NULL) ORDER BY COALESCE(path, base_path)"
        )
        item = _views().PendingItem
        items = []
        for path, base_rev, base_path, base_hash in rows:
            if path is None:
                items.append(item("deleted", base_path))
            elif base_rev is None or base_hash is None:
                items.append(item("created", path))
            elif path != base_path:
                items.append(item("moved", path, base_path))
            else:
                items.append(item("modified", path))
        return items

    def _sync_info(self, stalled: bool = False) -> SyncInfo:
        state = self.journal.state()
        server = self.config.server.url or state["server_url"]
        why = None
        if stalled and server:
            from syncengine.daemonctl import stall_reason

            oldest = next(iter(self.journal.execute(
                "SELECT MIN(local_at) FROM document WHERE NOT (path IS base_path AND hash IS base_hash "
                "AND base_rev IS NOT NULL) AND NOT (path IS NULL AND base_hash IS NULL)")), (None,))[0]
            why = stall_reason(state, oldest, self.config.daemon.stall_after)
        return _views().SyncInfo(
            server=server,
            workspace=self.config.server.workspace or state["workspace"],
            last_sync_at=_history().iso(state["last_sync_at"]),
            last_sync_ok=state["last_sync_ok"],
            last_error=state["last_error"],
            unreachable_since=_history().iso(state["unreachable_since"]),
            guard=state["guard"],
            stalled=why,
        )

    # ------------------------------------------------------------ the daemon and its events

    def daemon_info(self):
        """Whether a daemon runs here, its state, and the tasks in progress (DaemonInfo)."""
        from syncengine import daemonctl, progress

        return daemonctl.info(self.layout, paused=bool(self.journal.state()["paused"]),
                              tasks=progress.running_tasks(self.events))

    def subscribe(self, channels=None, callback=None, *, after: int | None = None):
        """Follow the event channels (zones, processing, progress, log), as the seed's subscribe().

        Without ``callback``: a Subscription to iterate (``for event in sub``)
        or poll (``sub.get(timeout)``). With one: it is called with each
        Event from a thread until ``close()``. Starts after the newest event
        unless ``after`` names an event id.
        """
        from syncengine.progress import Subscription

        return Subscription(self.layout.events, channels, after=after, callback=callback)

    def recent_events(self, limit: int = 20, channels=None):
        """The last ``limit`` events, oldest first."""
        from syncengine.progress import recent

        return recent(self.events, limit, channels)

    def conflicts(self) -> list[ConflictInfo]:
        """Open conflicts (manual ones waiting for `resolve`), with the fields or lines involved.

        The fields are those of the file as it is now: one edited further
        while the conflict waits (a person working towards a resolution)
        is compared again with the base and the server's version, so the
        list never names a field already brought in line, nor misses a new one.
        """
        import json

        rows = self.journal.open_conflicts()
        for row in rows:
            details = self._involved_now(row)
            if details is not None:
                row["details"] = json.dumps(list(details))
        return self.conflict_infos(rows)

    def _involved_now(self, row: dict) -> tuple[str, ...] | None:
        """The fields or lines involved for the file as it is now, or None: unchanged, gone, or a side missing."""
        from syncengine.conflicts import involved
        from syncengine.documents import HEAD_BYTES, kind_for
        from syncengine.fsops import read_bytes, sha256

        try:
            local, _stat = read_bytes(self.root / row["path"])
        except (OSError, SyncEngineError):
            return None
        if sha256(local) == row.get("local_hash") or not row.get("remote_hash"):
            return None
        blobs = self.blobs
        if not blobs.has(row["remote_hash"]) or (row.get("base_hash") and not blobs.has(row["base_hash"])):
            return None
        base = blobs.get(row["base_hash"]) if row.get("base_hash") else None
        return involved(kind_for(row["path"], local[:HEAD_BYTES]), base, local, blobs.get(row["remote_hash"]))

    def resolve(self, path: str, take: str | None = None) -> ConflictInfo:
        """Settle the open conflict at ``path`` (workspace-relative); the next sync pushes the choice.

        ``take`` is ``local``, ``remote``, ``merged``, or None for the file as
        it is now (edited by hand). See :mod:`syncengine.resolution`.
        """
        from syncengine import resolution

        return resolution.resolve(self, path, take)

    def publish_zones(self, touched: dict[str, list[str]], origin: str) -> None:
        """Tell the ``zones`` channel which fields of which documents changed (docs/conflicts.md).

        Best effort: events are hints, so a busy or damaged events.db never
        fails the sync or resolution that already committed.
        """
        if not touched:
            return
        from syncengine.conflicts import zone_event

        docs = self.journal.docs_by_local_paths(touched)
        events = [zone_event(path, docs[path].doc_id, fields, origin)
                  for path, fields in touched.items() if path in docs]
        with contextlib.suppress(SyncEngineError):
            self.events.publish("zones", events)

    # ------------------------------------------------------------ sync

    def open_remote(self):
        """An HttpRemote for this workspace's server (SYNCENGINE_SERVER / _TOKEN override)."""
        from syncengine.credentials import load_token
        from syncengine.errors import AuthError
        from syncengine.remote import HttpRemote

        url = os.environ.get("SYNCENGINE_SERVER") or self.config.server.url
        if not url or not self.config.server.workspace:
            raise UsageError("no server configured for this workspace",
                             hint="connect it: `syncengine init --server URL --workspace NAME --token-file FILE`")
        token = load_token(self.layout.token)
        if not token:
            raise AuthError("no token for the server", hint="store one with --token-file or set SYNCENGINE_TOKEN")
        server = self.config.server
        return HttpRemote(url, server.workspace, token, ca_file=server.ca_file or None,
                          allow_http=server.allow_http, timeout=server.timeout, retries=server.retries,
                          client_id=self.journal.client_id, chunk_index=self._chunk_index)

    def _chunk_index(self):
        from syncengine.chunkindex import ChunkIndex

        return ChunkIndex(self.blobs)

    def sync(self, *, strategy: str | None = None, dry_run: bool = False, force: bool = False,
             max_delete: float | None = None, wait: float | None = None, remote=None, progress=None):
        """One sync round with the server; returns a SyncReport.

        Server unreachable: RemoteError (exit 3), every local change stays
        queued. A failure is remembered for `status` (stalled syncing).
        """
        from syncengine import sync as syncing
        from syncengine.errors import RemoteError

        try:
            report = syncing.sync_once(self, remote=remote, strategy=strategy, dry_run=dry_run, force=force,
                                       max_delete=max_delete, wait=wait, progress=progress)
        except RemoteError as exc:
            if dry_run:  # a dry run writes nothing, its failure included
                raise
            state = self.journal.state()
            self.journal.update_state(last_sync_ok=False, last_error=exc.one_line()[:500],
                                      unreachable_since=state["unreachable_since"] or time.time_ns())
            raise
        return report

    def conflict_infos(self, rows) -> list[ConflictInfo]:
        import json

        return [
            ConflictInfo(c.get("id") or 0, c["path"], c["kind"], c["strategy"], _history().iso(c.get("created_at")),
                         json.loads(c["details"]) if c.get("details") else None, c.get("copy_path"),
                         _history().iso(c.get("resolved_at")), c.get("resolution"))
            for c in rows
        ]

    # ------------------------------------------------------------ history

    def log(self, path: str | None = None, limit: int | None = 20) -> list[LogEntry]:
        return _history().log_entries(self.journal, path or None, limit)

    def snapshot(self, message: str | None = None, *, trigger: str = "manual",
                 skip_if_unchanged: bool = False) -> SnapshotInfo | None:
        """Scan, then record the current state of every file."""
        self.scan()
        with self.scan_lock.acquire(timeout=self.config.sync.wait):
            info, _problems = _history().take_snapshot(self.root, self.journal, self.blobs, message=message,
                                                    trigger=trigger, skip_if_unchanged=skip_if_unchanged)
        return info

    def snapshots(self, limit: int | None = None) -> list[SnapshotInfo]:
        return _history().list_snapshots(self.journal, limit)

    def restore(self, snapshot: str | int, paths: Iterable[str] = ()) -> RestoreReport:
        """Bring back a snapshot (whole, or some paths) after a safety snapshot."""
        journal = self.journal
        sid = _history().resolve_snapshot(journal, snapshot)
        safety = self.snapshot(f"before restoring snapshot {sid}", trigger="safety")
        with self.scan_lock.acquire(timeout=self.config.sync.wait):
            report, problems = _history().restore(self.root, journal, self.blobs, sid, paths,
                                               safety_snapshot_id=safety.id if safety else None)
            changes, restamps, _ = scanner.detect(self.root, journal, self.ignore)
            journal.record_local(changes, restamps, origin="restore")
        if problems:
            from syncengine.errors import FileSystemError

            raise FileSystemError(
                f"{len(problems)} path(s) could not be restored: "
                + "; ".join(f"{p.path}: {p.reason}" for p in problems[:3]),
                paths=[p.path for p in problems],
                title="Restore incomplete",
            )
        return report

    def diff(self, path: str | None = None, since: str | int | None = None) -> list[DocDiff]:
        from syncengine import diffs

        self.scan()
        snapshot_id = _history().resolve_snapshot(self.journal, since) if since is not None else None
        return diffs.diff_workspace(self.root, self.journal, self.blobs, path or None, snapshot_id)

    def gc(self, keep: str | None = None):
        """Prune snapshots older than ``keep`` (default: config) and unreferenced blobs."""
        from syncengine import gc as collector
        from syncengine.config import parse_duration

        seconds = parse_duration(keep or self.config.history.keep)
        with FileLock(self.layout.sync_lock, "sync").acquire(self.config.sync.wait), \
                self.scan_lock.acquire(timeout=self.config.sync.wait):
            return collector.collect(self.journal, self.blobs, keep_seconds=seconds,
                                     keep_last=self.config.history.keep_last)

    # ------------------------------------------------------------ repair

    @classmethod
    def repair(cls, root: Path) -> RepairReport:
        """Set a damaged journal (or blob table) aside and rebuild it from the files: see syncengine.repair."""
        from syncengine import repair

        return repair.repair(cls, root)
