"""The daemon's sync worker: one round after each change batch, announcement or poll.

Rounds never overlap, with each other or with a `syncengine sync` from the
CLI: both take the flock on ``.syncengine/sync.lock``, and the worker waits
its turn (retrying every second) instead of failing. Triggers that arrive
during a round are folded into one more round.

When the server is unreachable every local change stays queued in the
journal and the worker retries with exponential backoff and jitter (1 s up
to ``max_backoff``); a refused token or a safety guard holding waits much
longer, since retrying cannot fix them — a person must. `syncengine
status` reports those as "stalled".

The worker runs in its own thread with its own Workspace (its own journal
connection); the change tracker keeps journaling meanwhile, and looks at
files only between rounds, so it never mistakes an apply in progress for
edits.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from pathlib import Path

from syncengine import progress
from syncengine.documents import changed_zones
from syncengine.errors import AuthError, BusyError, GuardError, RemoteError, SyncEngineError
from syncengine.models import Kind

log = logging.getLogger("syncengine.autosync")

RETRY_BUSY = 1.0  # another sync holds the lock: try again this soon
WAIT_STUCK = 300.0  # refused token, safety guard: a person must act; retry this rarely


class AutoSync(threading.Thread):
    """Runs sync rounds for the daemon (see the module docstring)."""

    def __init__(self, root: Path, *, on_state: Callable[[str], None], notice: Callable[[str, str, str], None],
                 before_round: Callable[[], None] = lambda: None, on_online: Callable[[], None] = lambda: None) -> None:
        super().__init__(name="syncengine-sync", daemon=True)
        self.root = root
        self.on_state = on_state
        self.notice = notice
        self.before_round = before_round
        self.on_online = on_online
        self.live_state = "off"
        self.checkpoint = 0
        self.rounds = 0
        self.failures = 0
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._reasons: set[str] = set()
        self._guard = threading.Lock()
        self._not_before = 0.0
        self._next_poll = 0.0
        self._state = ""
        self._in_round = False
        self.ws = None

    # ------------------------------------------------------------ triggers (any thread)

    def trigger(self, reason: str) -> None:
        with self._guard:
            self._reasons.add(reason)
        self._wake.set()

    def wants_round(self) -> bool:
        """A round runs, or one is due now (not one waiting out a backoff): others should let it go first."""
        with self._guard:
            return self._in_round or (bool(self._reasons) and time.monotonic() >= self._not_before
                                      and self.is_alive() and not self._stopping.is_set()
                                      and self._state not in ("off", "paused"))

    def on_seq(self, seq: int, kind: str) -> None:
        """A live message: a seq past our durable checkpoint is a gap, and the answer is a pull."""
        if seq > self.checkpoint:
            self.trigger(f"server at seq {seq} ({kind})")

    def on_live(self, state: str) -> None:
        previous, self.live_state = self.live_state, state
        if state == "connected" and previous != "connected":
            self._not_before = 0.0  # the server is back: no need to wait out the backoff
            self.trigger("live connection (re)opened")  # catch up from the checkpoint (DESIGN §4 rule 6)

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()

    # ------------------------------------------------------------ the loop

    def _set_state(self, state: str) -> None:
        if state != self._state:
            self._state = state
            self.on_state(state)

    def run(self) -> None:
        from syncengine.engine import Workspace

        self.ws = ws = Workspace(self.root)
        try:
            if not (ws.config.server.url and ws.config.server.workspace):
                self._set_state("off")
                self._stopping.wait()
                return
            self.checkpoint = ws.journal.state()["last_seq"] or 0
            self.trigger("start")
            self._loop(ws)
        finally:
            ws.close()

    def _poll_interval(self, ws) -> float:
        base = ws.config.daemon.poll_interval
        return base if self.live_state != "connected" else base * 10

    def _loop(self, ws) -> None:
        self._next_poll = time.monotonic() + self._poll_interval(ws)
        while not self._stopping.is_set():
            now = time.monotonic()
            with self._guard:
                deadline = max(now, self._not_before) if self._reasons else self._next_poll
            if deadline > now:
                self._wake.wait(deadline - now)
            self._wake.clear()
            if self._stopping.is_set():
                return
            now = time.monotonic()
            with self._guard:
                if now >= self._next_poll:
                    self._reasons.add("poll")
                if not self._reasons or now < self._not_before:
                    continue
                reasons, self._reasons = self._reasons, set()
                self._in_round = True
            try:
                if ws.journal.state()["paused"]:
                    self._set_state("paused")  # resume (a nudge) triggers a round
                    continue
                self._round(ws, reasons)
            finally:
                with self._guard:
                    self._in_round = False
            self._next_poll = time.monotonic() + self._poll_interval(ws)

    def _round(self, ws, reasons: set[str]) -> None:
        self.before_round()  # let the tracker journal what is due first
        self._set_state("syncing")
        tracker = progress.SyncProgress(ws.events)
        journal = ws.journal
        before = journal.last_change_seq()
        waiting = [row.path or row.base_path for row in journal.unsettled()
                   if row.path != row.base_path or row.hash != row.base_hash]
        progress.publish(ws.events, "processing",
                         [progress.processing_payload(p, "syncing", origin="local") for p in waiting if p])
        failed = True
        started = time.monotonic()
        try:
            report = ws.sync(progress=tracker, wait=0.2)
            failed = False
            log.debug("round for %s: %.3fs, pulled %d, downloaded %d, pushed %d", ", ".join(sorted(reasons)),
                      time.monotonic() - started, report.pulled, len(report.downloaded), len(report.pushed))
        except BusyError:
            self._retry(RETRY_BUSY, "waiting for another sync", reasons)
            return
        except RemoteError as exc:
            self.failures += 1
            delay = min(ws.config.daemon.max_backoff, 2 ** min(self.failures - 1, 10)) * random.uniform(0.8, 1.2)
            if self.failures == 1:
                self.notice("warning", "offline", f"server unreachable, changes stay queued: {exc.one_line()}")
            log.info("sync failed (%s); retrying in %.1fs", exc.one_line(), delay)
            self._retry(delay, "offline", reasons)
            return
        except AuthError as exc:
            self.notice("error", "auth", exc.one_line())
            self._retry(WAIT_STUCK, "auth", reasons)
            return
        except GuardError as exc:
            self.notice("warning", "guard", exc.one_line())
            self._retry(WAIT_STUCK, "guard", set())
            return
        except SyncEngineError as exc:
            self.notice("error", "sync-failed", exc.one_line())
            self._retry(30.0, "error", reasons)
            return
        except Exception as exc:
            log.exception("sync round failed")
            self.notice("error", "sync-failed", f"internal error: {type(exc).__name__}: {exc}")
            self._retry(60.0, "error", reasons)
            return
        finally:
            tracker.close(failed=failed)
        if self.failures:
            self.notice("info", "online", "the server answers again; queued changes were sent")
            self.on_online()  # the live client may be sleeping out a long backoff
        self.failures = 0
        self._not_before = 0.0
        self.rounds += 1
        self.checkpoint = journal.state()["last_seq"] or 0
        self._announce(ws, report, before)
        self._set_state("idle")

    def _retry(self, delay: float, state: str, reasons: set[str]) -> None:
        with self._guard:
            self._not_before = time.monotonic() + delay
            self._reasons |= reasons
        self._set_state(state)

    # ------------------------------------------------------------ events

    def _announce(self, ws, report, before: int) -> None:
        """processing: synced/conflict per path; zones: the fields each pulled document changed."""
        done = [*report.pushed, *report.downloaded, *report.deleted, *(new for _old, new in report.moved)]
        items = [progress.processing_payload(p, "synced", origin="remote" if p in report.downloaded else "local")
                 for p in done]
        items += [progress.processing_payload(c.path, "conflict", detail=f"{c.kind} ({c.strategy})")
                  for c in report.conflicts if c.resolution is None]
        progress.publish(ws.events, "processing", items)
        progress.publish(ws.events, "zones", remote_zones(ws, before))


def remote_zones(ws, after_seq: int) -> list[dict]:
    """Zones payloads for documents a round wrote from the server (journal rows after ``after_seq``)."""
    rows = list(ws.journal.execute(
        "SELECT c.seq, c.doc_id, c.path, c.hash, d.kind, c.op, "
        " (SELECT p.hash FROM change p WHERE p.doc_id = c.doc_id AND p.seq < c.seq AND p.hash IS NOT NULL "
        "  ORDER BY p.seq DESC LIMIT 1) "
        "FROM change c JOIN document d ON d.doc_id = c.doc_id "
        "WHERE c.seq > ? AND c.origin = 'remote' AND c.hash IS NOT NULL ORDER BY c.seq", (after_seq,)))
    out = []
    for seq, doc_id, path, new_hash, kind, op, old_hash in rows:
        try:
            kind = Kind(kind)
        except ValueError:
            continue
        if not kind.structured or old_hash == new_hash:
            continue
        fields = ["$"]
        if op != "created" and old_hash and ws.blobs.has(old_hash) and ws.blobs.has(new_hash):
            try:
                fields = changed_zones(kind, ws.blobs.get(old_hash), ws.blobs.get(new_hash)) or []
            except SyncEngineError:
                fields = ["$"]
        if fields:
            out.append(progress.zones_payload(path, fields, origin="remote", doc_id=doc_id, kind=kind.value, seq=seq))
    return out
