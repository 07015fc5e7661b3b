"""The watchdog observer on a workspace: file-system events in, :class:`RawEvent` lists out.

Events are hints, and the watcher says so when it knows some were lost:

* inotify's queue overflowed (``IN_Q_OVERFLOW``). Older watchdog releases
  dropped that event silently (watchdog#654); the installed ones log
  "Inotify queue overflowed" from ``watchdog.observers.inotify_c`` and carry
  on. That log record is the only signal, so a logging handler catches it
  and reports a loss; the daemon answers with a full rescan and a warning;
* the watch could not be set up at all (``max_user_watches`` or
  ``max_user_instances`` reached: ENOSPC / EMFILE): :class:`WatchUnavailable`,
  and the daemon falls back to periodic full scans;
* the observer's threads died: :meth:`Watcher.alive` turns false and the
  daemon restarts the watcher and rescans.

Known gap, covered by the tracker walking every new folder and by the
periodic rescan: when the watch limit is reached while the daemon runs,
watchdog skips a new subfolder's watch without telling anyone.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path

from syncengine.paths import STATE_DIR
from syncengine.tracker import RawEvent

log = logging.getLogger("syncengine.watcher")

OnEvents = Callable[[list[RawEvent]], None]
OnLost = Callable[[str], None]


class WatchUnavailable(Exception):
    """The OS refused the watch (limits, unsupported file system); polling scans must do."""


class _LossHook(logging.Handler):
    """Hears watchdog's own log records that say events were lost, and tells every live watcher."""

    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.listeners: set[Watcher] = set()
        self.guard = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage().lower()
        except Exception:
            return
        if "overflow" in text or "unable to rebuild" in text:
            with self.guard:
                listeners = list(self.listeners)
            for watcher in listeners:
                watcher.lost("inotify queue overflow: file-system events were lost")


_HOOK = _LossHook()
_HOOK_LOGGER = logging.getLogger("watchdog.observers")
if _HOOK not in _HOOK_LOGGER.handlers:
    _HOOK_LOGGER.addHandler(_HOOK)
if _HOOK_LOGGER.level == logging.NOTSET or _HOOK_LOGGER.level > logging.WARNING:
    _HOOK_LOGGER.setLevel(logging.WARNING)


# watchdog holds each IN_MOVED_FROM for 0.5 s to pair it with its IN_MOVED_TO, and its reader
# sleeps out that whole delay even once the pair is made, holding back every later event: each
# rename in the tree (an editor's atomic save, our own daemon.json and blob writes) stalled the
# watcher for half a second. The kernel queues both halves of a rename together, and the tracker
# pairs an unpaired delete + create by hash anyway, so a short wait is enough.
MOVE_PAIRING = 0.02


def _shorten_move_pairing() -> None:
    try:
        from watchdog.observers.inotify_move_event_grouper import InotifyMoveEventGrouper
    except ImportError:  # watchdog < 6 (InotifyBuffer) or not Linux
        try:
            from watchdog.observers.inotify_buffer import InotifyBuffer
        except ImportError:
            return
        InotifyBuffer.delay = MOVE_PAIRING
        return
    InotifyMoveEventGrouper.delay = MOVE_PAIRING


def _event_classes() -> list[type]:
    from watchdog import events as ev

    return [ev.FileCreatedEvent, ev.FileDeletedEvent, ev.FileModifiedEvent, ev.FileMovedEvent,
            ev.FileClosedEvent, ev.FileAttribEvent, ev.DirCreatedEvent, ev.DirDeletedEvent, ev.DirMovedEvent]


class Watcher:
    """A recursive watch on ``root`` that hands every batch of events to ``on_events``."""

    def __init__(self, root: Path, on_events: OnEvents, on_lost: OnLost) -> None:
        self.root = Path(root)
        self.on_events = on_events
        self.on_lost = on_lost
        self._observer = None
        self._prefix = os.fspath(self.root) + os.sep
        self._state_prefix = self._prefix + STATE_DIR

    def _rel(self, path: str | bytes) -> str | None:
        path = os.fsdecode(path)
        if path == os.fspath(self.root):
            return ""
        if not path.startswith(self._prefix):
            return None  # moved out of the workspace: only the other end counts
        return path[len(self._prefix):].replace(os.sep, "/")

    def dispatch(self, event) -> None:
        """watchdog's handler entry point (runs on the observer's thread)."""
        src = os.fsdecode(event.src_path)
        dest = os.fsdecode(getattr(event, "dest_path", "") or "")
        if src.startswith(self._state_prefix) and (not dest or dest.startswith(self._state_prefix)):
            return  # the engine's own journal, logs and trash
        kind = event.event_type
        if kind in ("opened", "closed_no_write"):
            return
        rel_src = self._rel(src) if src else None
        rel_dest = self._rel(dest) if dest else None
        if kind == "moved" and rel_src is None:
            kind, rel_src, rel_dest = "created", rel_dest, None  # moved in from outside
        if rel_src is None:
            return
        self.on_events([RawEvent(kind, rel_src, rel_dest, bool(event.is_directory))])

    def lost(self, reason: str) -> None:
        self.on_lost(reason)

    def start(self) -> None:
        """Start watching; WatchUnavailable when the OS refuses (limits reached)."""
        from watchdog.observers import Observer

        _shorten_move_pairing()
        observer = Observer()
        try:
            observer.schedule(self, os.fspath(self.root), recursive=True, event_filter=_event_classes())
            observer.start()
        except OSError as exc:
            with _suppress():
                observer.stop()
            if exc.errno in (errno.ENOSPC, errno.EMFILE, errno.ENFILE):
                raise WatchUnavailable(
                    f"the OS refused the watch ({exc.strerror}); raise fs.inotify.max_user_watches "
                    "or max_user_instances") from exc
            raise WatchUnavailable(f"cannot watch {self.root}: {exc.strerror or exc}") from exc
        with _HOOK.guard:
            _HOOK.listeners.add(self)
        self._observer = observer

    def alive(self) -> bool:
        """False once the observer or one of its emitters died (events would be lost silently)."""
        observer = self._observer
        if observer is None or not observer.is_alive():
            return False
        return all(emitter.is_alive() for emitter in observer.emitters)

    def stop(self) -> None:
        with _HOOK.guard:
            _HOOK.listeners.discard(self)
        observer, self._observer = self._observer, None
        if observer is not None:
            with _suppress():
                observer.stop()
                observer.join(5)


class _suppress:
    """Shutdown of a half-started observer may raise anything; it must not hide the real error."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc is not None:
            log.debug("ignored while stopping the observer: %r", exc)
        return True
