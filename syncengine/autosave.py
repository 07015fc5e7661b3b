"""Autosave: when the daemon takes a snapshot on its own (DESIGN §3, the seed's defaults).

Counting *distinct* pending paths, so one file saved 1,000 times is one
pending path, not 1,000:

* on each recorded change: a snapshot at once when ``max_pending`` (10)
  paths are pending, or when ``min_interval`` (5 s) has passed since the
  last snapshot;
* otherwise an ``idle`` (30 s) timer, restarted by every change, snapshots
  whatever is left pending once changes stop.

So a burst of 1,000 saves of one file over a few seconds yields one
snapshot at its start, one every 5 s while it lasts, and one 30 s after it
ends: a handful, not 1,000. The policy is pure (a clock is passed in) so the
thresholds are tested without waiting; the daemon runs the snapshots.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from syncengine.config import AutosaveConfig


@dataclass
class AutosavePolicy:
    """Decides when to snapshot; knows nothing about files or threads."""

    config: AutosaveConfig
    last_snapshot: float | None = None  # clock time of the last snapshot (None: none yet)
    pending: set[str] = field(default_factory=set)
    idle_deadline: float | None = None

    def note(self, paths: Iterable[str], now: float) -> str | None:
        """Record changed paths; returns why to snapshot at once, or None (the idle timer is armed)."""
        self.pending.update(paths)
        if not self.pending:
            return None
        if len(self.pending) >= self.config.max_pending:
            return f"{len(self.pending)} paths pending"
        if self.last_snapshot is None:
            return "first change since the daemon started"
        if now - self.last_snapshot >= self.config.min_interval:
            return f"{self.config.min_interval:g}s since the last snapshot"
        self.idle_deadline = now + self.config.idle
        return None

    def due(self, now: float) -> str | None:
        """The idle timer's verdict: snapshot what is left pending once changes stopped."""
        if self.pending and self.idle_deadline is not None and now >= self.idle_deadline:
            return f"{self.config.idle:g}s without changes"
        return None

    def next_deadline(self) -> float | None:
        return self.idle_deadline if self.pending else None

    def taken(self, now: float) -> None:
        """A snapshot was taken: nothing is pending any more."""
        self.last_snapshot = now
        self.pending.clear()
        self.idle_deadline = None
