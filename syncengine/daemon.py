"""The daemon: watcher -> change tracker -> journal, autosave, auto-sync and live updates.

Start-up order is what makes "nothing is missed" hold:

1. the pid-file lock, so one daemon runs per workspace (:mod:`.daemonctl`);
2. the watcher, *before* the catch-up scan: a file written while the scan
   runs is either seen by the scan or reported by the watcher (usually both;
   the second look finds nothing new);
3. the catch-up scan journals what changed while no daemon ran (A1), and a
   snapshot is taken if anything is unsnapshotted;
4. the sync worker pulls what the server got meanwhile, and the live
   subscription starts.

Threads: one *journal worker* owns every journal write the daemon makes
outside syncs (tracker batches, rescans, autosave snapshots); the *sync
worker* (:mod:`.autosync`) runs rounds with its own connection; the live
client and watchdog's threads only hand over events. The journal worker
touches files and the journal only while no sync holds the workspace: an
apply half-done is never read as edits or deletions, and the daemon's own
writes are then recognised by the stat the apply recorded.

Events are hints, so the daemon rescans on every sign of loss (inotify
overflow, a dead observer) with a warning, hourly (jittered) as a safety net,
and every ``fallback_scan`` seconds when the OS refused a watch.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from collections.abc import Callable
from pathlib import Path

from syncengine import daemonctl, progress, scanner
from syncengine.autosave import AutosavePolicy
from syncengine.autosync import AutoSync
from syncengine.errors import BlobStoreDamaged, BusyError, FileSystemError, SyncEngineError
from syncengine.history import iso
from syncengine.locks import is_locked
from syncengine.tracker import ChangeTracker, root_present
from syncengine.watcher import Watcher, WatchUnavailable
from syncengine.workspace import Layout

log = logging.getLogger("syncengine.daemon")

TICK = 1.0  # the journal worker wakes at least this often (health checks, timers)
RETRY_FIRST, RETRY_MOST = 2.0, 60.0  # seconds before the full rescan that follows a failed tick, doubling


def jittered(interval: float) -> float:
    """``interval`` ±10%, so daemons started together (a login, a reboot) do not rescan in step."""
    return interval * random.uniform(0.9, 1.1)


class Daemon:
    """One workspace's daemon, runnable in-process (tests) or as `syncengine daemon run`."""

    def __init__(self, root: Path) -> None:
        from syncengine.engine import Workspace

        self.root = Path(root).absolute()
        self.layout = Layout(self.root)
        self.ws = Workspace(self.root)  # journal opened lazily, by the journal worker
        cfg = self.ws.config.daemon
        self.cfg = cfg
        self.tracker = ChangeTracker(self.ws, settle=cfg.settle_ms / 1000, cap=cfg.coalesce_ms / 1000)
        self.autosave = AutosavePolicy(self.ws.config.autosave)
        self.watcher = Watcher(self.root, self.tracker.feed, self._lost)
        self.sync = AutoSync(self.root, on_state=lambda s: self._set(sync=s), notice=self.notice,
                             before_round=self._let_tracker_finish,
                             on_online=lambda: self.live.wake() if self.live else None)
        self.live = None
        self.failed: BaseException | None = None
        self.snapshots = 0
        self._stop = threading.Event()
        self._rescan_reason: str | None = None
        self._autosave_reason: str | None = None
        self._next_rescan = 0.0
        self._next_health = 0.0
        self._seen_local = 0  # the newest local change row a sync was asked for
        self._next_local_check = 0.0
        self._guard = threading.Lock()
        self._state = {"pid": os.getpid(), "started_at": iso(time.time_ns()), "state": "starting",
                       "watcher": "none", "live": "off", "sync": "idle"}
        self._thread = threading.Thread(target=self._journal_worker, name="syncengine-journal", daemon=True)

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Start watching (before the catch-up scan), then every worker; returns at once."""
        self._set()
        progress.fail_orphaned_tasks(self.ws.events)
        try:
            self.watcher.start()
            self._set(watcher="inotify")
        except WatchUnavailable as exc:
            self._set(watcher="polling")
            self.notice("warning", "watch-refused", f"{exc}; falling back to a full scan every "
                        f"{self.cfg.fallback_scan:g}s")
        self._thread.start()
        self.sync.start()
        self._start_live()

    def _start_live(self) -> None:
        server = self.ws.config.server
        if not (server.url and server.workspace):
            return
        from syncengine.credentials import load_token
        from syncengine.live import LiveClient

        token = load_token(self.layout.token)
        if not token:
            self.notice("warning", "no-token", "no token for the server: live updates off, syncing will fail")
            return
        url = os.environ.get("SYNCENGINE_SERVER") or server.url

        def on_state(state: str) -> None:
            self._set(live=state)
            self.sync.on_live(state)

        self.live = LiveClient(url, server.workspace, token, on_seq=self.sync.on_seq, on_state=on_state,
                               ca_file=server.ca_file or None, heartbeat=self.cfg.heartbeat,
                               max_backoff=self.cfg.max_backoff)
        self.live.start()

    def request_stop(self) -> None:
        """Signal-safe: ask every worker to wind down."""
        self._stop.set()
        self.tracker.poke()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until a stop is requested (or ``timeout``); True once stopping."""
        return self._stop.wait(timeout)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop and join everything; a round in flight is abandoned (every step is idempotent)."""
        self._set(state="stopping")
        self.request_stop()
        self.watcher.stop()
        if self.live is not None:
            self.live.close()
        self.sync.stop()
        deadline = time.monotonic() + timeout
        for thread in (self._thread, self.sync):
            if thread.is_alive():
                thread.join(max(0.1, deadline - time.monotonic()))
        self.ws.events.close()

    def nudge(self) -> None:
        """Re-read the pause flag (pause/resume from the CLI) and sync if there is anything to do."""
        self.sync.trigger("nudge")

    # ------------------------------------------------------------ state and notices

    def _set(self, **values: str | None) -> None:
        with self._guard:
            if values and all(self._state.get(k) == v for k, v in values.items()):
                return
            self._state.update(values)
            try:
                daemonctl.write_state(self.layout, self._state)
            except OSError as exc:
                log.debug("cannot write daemon.json: %s", exc)

    def notice(self, level: str, code: str, message: str) -> None:
        """Log it, publish it on the ``log`` channel, and show warnings in `status`."""
        log.log(logging.getLevelName(level.upper()), "%s", message)
        if level in ("warning", "error"):
            self._set(warning=f"{iso(time.time_ns())} {message}")
        try:
            progress.publish(self.ws.events, "log", [progress.log_payload(level, code, message)])
        except Exception as exc:  # events.db trouble must not take the daemon down
            log.debug("cannot publish a notice: %s", exc)

    def _lost(self, reason: str) -> None:
        """From the watcher's thread: events were lost, so rescan (never a silent miss)."""
        self._rescan_reason = reason
        self.tracker.poke()

    # ------------------------------------------------------------ the journal worker

    def _journal_worker(self) -> None:
        try:
            if not self._retrying(lambda: self._rescan("catch-up", force=True)):
                return  # stopped before the catch-up could run
            self._warm_up()
            if self.ws.journal.unsnapshotted_count():
                self._snapshot("unsnapshotted changes found at start")
            self._seen_local = self._last_local_seq()  # the sync worker's first round takes these
            self._set(state="watching")
            while not self._stop.is_set():
                self.tracker.wait(self._timeout())
                if self._stop.is_set():
                    break
                self._retrying(self._tick)
        except BaseException as exc:
            self.failed = exc
            log.exception("the journal worker failed; stopping the daemon")
            self.notice("error", "daemon-failed", f"{type(exc).__name__}: {exc}")
            self._stop.set()
        finally:
            self.ws.close()

    def _retrying(self, step: Callable[[], object]) -> bool:
        """Run ``step`` until it goes through; False if the daemon stops first.

        A full disk, a read-only remount, a `syncengine sync` holding the scan
        lock past sync.wait: an error notice, then ``step`` again after a pause
        doubling from RETRY_FIRST to RETRY_MOST. These used to end the journal
        worker, and so the daemon (a long first sync beside its periodic
        rescan was enough).
        """
        pause = RETRY_FIRST
        while True:
            try:
                step()
                return True
            except (FileSystemError, BusyError, BlobStoreDamaged) as exc:
                self.notice("error", "journal-failed", f"{exc.one_line()}; a full rescan in {pause:.0f} s")
                # What a failed tick took from the watcher may not be journaled: the retry rescans.
                self._rescan_reason = "retry after an error"
            if self._stop.wait(pause):
                return False
            pause = min(pause * 2, RETRY_MOST)

    def _warm_up(self) -> None:
        """Import the field differ now, not on the first edit (it costs ~0.2 s of the first change's latency)."""
        from syncengine.documents import changed_zones
        from syncengine.models import Kind

        changed_zones(Kind.JSON, b"{}", b'{"a": 1}')

    def _timeout(self) -> float:
        now = time.monotonic()
        deadlines = [now + TICK, self._next_rescan]
        for deadline in (self.tracker.next_deadline(), self.autosave.next_deadline()):
            if deadline is not None:
                deadlines.append(deadline)
        if self._rescan_reason or self._autosave_reason:
            deadlines.append(now + 0.05)
        return max(0.0, min(deadlines) - now)

    def _tick(self) -> None:
        now = time.monotonic()
        if not root_present(self.root):
            if self._state.get("state") != "root missing":
                self._set(state="root missing")
                self.notice("error", "root-missing", f"{self.root} or its .syncengine folder is gone; "
                            "nothing is journaled (and nothing read as deleted) until it is back")
            return
        if self._state.get("state") == "root missing":
            self._set(state="watching")
            self._rescan_reason = "the workspace root is back"
        if self._rescan_reason:
            self._rescan(self._rescan_reason)
        batch = self.tracker.step()
        hold = self.tracker.hold_reason
        self._set(state=f"holding changes ({hold})" if hold and hold != "sync" else "watching")
        if batch is not None and batch.changes:
            self._changed([c.path for c in batch.changes], now)
        if self.tracker.rules_changed:
            self.tracker.rules_changed = False
            if self.ws.ignore.refresh():
                self._rescan(".syncignore changed")
        reason = self._autosave_reason or self.autosave.due(now)
        if reason:
            self._snapshot(reason)
        if now >= self._next_rescan:
            self._rescan("periodic safety rescan")
        if now >= self._next_health:
            self._health()
        self._others_journaled()

    def _last_local_seq(self) -> int:
        rows = self.ws.journal.execute("SELECT seq FROM change WHERE origin = 'local' ORDER BY seq DESC LIMIT 1")
        return next(iter(rows), (0,))[0]

    def _others_journaled(self, force: bool = False) -> None:
        """Sync local changes journaled past the tracker (`status`, `snapshot`, an autosave's scan).

        They all scan first, and the tracker then finds those files unchanged:
        without this, an edit a `syncengine status` happened to journal would
        wait for the next poll.
        """
        now = time.monotonic()
        if now < self._next_local_check and not force:
            return
        self._next_local_check = now + TICK
        seq = self._last_local_seq()
        if seq > self._seen_local:
            self._seen_local = seq
            self.sync.trigger("local changes journaled outside the tracker")

    def _changed(self, paths: list[str], now: float) -> None:
        self._seen_local = self._last_local_seq()
        self.sync.trigger("local changes")  # syncing never waits for autosave
        reason = self.autosave.note(paths, now)
        if reason:
            self._snapshot(reason)

    def _let_tracker_finish(self, limit: float = 0.5) -> None:
        """Before a round: give the tracker a moment to journal what is due, so rounds cannot starve it."""
        deadline = time.monotonic() + limit
        while not self._stop.is_set() and time.monotonic() < deadline:
            due = self.tracker.next_event_deadline()  # a racy stat's second look can wait for the round
            if due is None or due > time.monotonic() + self.tracker.pending.settle:
                return  # nothing due now (a later second look does not hold the round)
            time.sleep(0.005)

    def _syncing(self) -> bool:
        return is_locked(self.layout.sync_lock)

    def _rescan(self, reason: str, force: bool = False) -> None:
        """A full scan: the truth behind the watcher's hints."""
        if self._syncing() and not force:
            self._rescan_reason = reason  # after the round
            return
        self._rescan_reason = None
        interval = self.cfg.fallback_scan if self._state.get("watcher") == "polling" else self.cfg.rescan_interval
        self._next_rescan = time.monotonic() + jittered(interval)
        ws = self.ws
        hashing: list[progress.Task] = []

        def on_hash(done: int, total: int | None) -> None:
            if not hashing and total and total >= 200:
                hashing.append(progress.Task(ws.events, "hash", f"hash {total} changed file(s)", total))
            if hashing:
                hashing[0].update(done, total)

        with progress.Task(ws.events, "scan", f"full scan ({reason})"), \
                ws.scan_lock.acquire(timeout=ws.config.sync.wait):
            report = scanner.scan(ws.root, ws.journal, ws.ignore, progress=on_hash)
        for task in hashing:
            task.finish()
        self._set(last_rescan_at=iso(time.time_ns()))
        paths = [*report.created, *report.modified, *report.deleted, *(new for _old, new in report.moved)]
        lost = reason not in ("catch-up", "periodic safety rescan", "polling")
        if lost or (report.changed and reason != "polling"):
            self.notice("warning" if lost else "info", "rescan",
                        f"{reason}: full scan found {report.changed} change(s) in {report.files} file(s)")
        if paths:
            progress.publish(ws.events, "processing",
                             [progress.processing_payload(p, "queued", origin="local") for p in paths])
            self._changed(paths, time.monotonic())

    def _snapshot(self, reason: str) -> None:
        # Syncing never waits for autosave (DESIGN §3): a snapshot holds the scan lock a round
        # needs, so while a round runs or is about to, the snapshot waits for it instead.
        if self._syncing() or self.sync.wants_round():
            self._autosave_reason = reason  # after the round
            return
        self._autosave_reason = None
        # The snapshot scans first, and what its scan journals the tracker then finds unchanged:
        # journal what the tracker holds through the tracker (zones, processing), and sync
        # whatever the scan still found, or an edit could wait for the next poll.
        self.tracker.wait(0)
        self.tracker.step(force=True)
        try:
            info = self.ws.snapshot(f"autosave: {reason}", trigger="auto", skip_if_unchanged=True)
        except SyncEngineError as exc:
            # A full disk, a damaged blob table: watching, journaling and syncing go on without the
            # snapshot (it was the whole daemon's end), and the next one comes at the policy's next turn.
            self.autosave.taken(time.monotonic())
            self.notice("warning", "autosave-failed", f"autosave failed: {exc.one_line()}")
            return
        self._others_journaled(force=True)
        self.autosave.taken(time.monotonic())
        if info is not None:
            self.snapshots += 1
            log.info("autosave snapshot #%d (%s): %d path(s) changed", info.id, reason, info.changed)

    def _health(self) -> None:
        self._next_health = time.monotonic() + 2.0
        if self._state.get("watcher") == "inotify" and not self.watcher.alive():
            self.notice("warning", "watcher-died", "the file watcher stopped; restarting it and rescanning")
            self.watcher.stop()
            try:
                self.watcher.start()
            except WatchUnavailable as exc:
                self._set(watcher="polling")
                self.notice("warning", "watch-refused", f"{exc}; falling back to periodic full scans")
            self._rescan("the watcher was restarted")


# ---------------------------------------------------------------- the process


def run(root: Path, *, detached: bool = False) -> int:
    """`syncengine daemon run`: hold the pid lock, run until SIGTERM/SIGINT; returns the exit code."""
    import signal

    layout = Layout(Path(root).absolute())
    pidfile = daemonctl.PidFile(layout)
    pidfile.acquire()  # BusyError (exit 7) when one runs already
    try:
        _setup_logging(layout, to_stderr=not detached)
        daemon = Daemon(layout.root)
        signal.signal(signal.SIGTERM, lambda *_: daemon.request_stop())
        signal.signal(signal.SIGINT, lambda *_: daemon.request_stop())
        signal.signal(signal.SIGUSR1, lambda *_: daemon.nudge())
        signal.signal(signal.SIGHUP, lambda *_: daemon.nudge())
        daemon.start()
        log.info("daemon started (pid %d) on %s", os.getpid(), layout.root)
        if detached:
            _detach_stdio()  # the parent reads our stderr until EOF: we are ready
        while not daemon.wait(1.0):
            pass
        daemon.stop()
        log.info("daemon stopped")
        if daemon.failed is not None:
            return getattr(daemon.failed, "exit_code", 70)
        return 0
    finally:
        pidfile.release()


def _setup_logging(layout: Layout, *, to_stderr: bool) -> None:
    from logging.handlers import RotatingFileHandler

    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    handler = RotatingFileHandler(layout.daemon_log, maxBytes=1 << 20, backupCount=3, encoding="utf-8")
    handler.setFormatter(fmt)
    root_logger = logging.getLogger()
    root_logger.addHandler(handler)
    root_logger.setLevel(logging.WARNING)
    logging.getLogger("syncengine").setLevel(os.environ.get("SYNCENGINE_LOG_LEVEL", "INFO").upper())
    if to_stderr:
        stream = logging.StreamHandler()
        stream.setFormatter(fmt)
        root_logger.addHandler(stream)

    def excepthook(args: threading.ExceptHookArgs) -> None:
        log.error("uncaught error in thread %s", args.thread.name if args.thread else "?",
                  exc_info=(args.exc_type, args.exc_value, args.exc_traceback))

    threading.excepthook = excepthook


def _detach_stdio() -> None:
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)
