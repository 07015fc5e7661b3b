"""WAL checkpoints of the server's SQLite database, on a thread of their own, once writes pause.

SQLite's automatic checkpoint runs inside the COMMIT that takes the WAL past
``wal_autocheckpoint`` pages (1,000 by default): that writer copies ~4 MB of
pages into the database file and fsyncs it while it holds this process's
writers' gate, and every commit and pack waits behind it. In a 10k first
sync that was ~0.25 s of the ~0.55 s the server spent in COMMITs, and the
pages every commit rewrites (index leaves, the tails of the tables) were
copied again at each of ~25 checkpoints. Here a thread runs one PASSIVE
checkpoint when no write has come for ``QUIET`` s. Checkpointing beside the
writers instead (50 ms after a write) made their COMMITs slower still: the
two fought over the disk. The connections keep a high ``wal_autocheckpoint``
(:data:`.db.WAL_AUTOCHECKPOINT`) as the net for writes that never pause.

Durability does not depend on it: a transaction is durable once its COMMIT
has fsynced the WAL (``synchronous=FULL``); a checkpoint only copies
committed pages into the database file, and SQLite recovers one cut short.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

log = logging.getLogger("syncengine.server")

QUIET = 0.3  # seconds without a write before checkpointing


class Checkpointer:
    """One per SQLite Storage: ``poke()`` after each write transaction; ``close()`` before the pool closes."""

    def __init__(self, db: Any) -> None:
        self._db = db
        self._cond = threading.Condition()
        self._dirty = False
        self._closing = False
        self._busy = False  # a checkpoint runs now
        self._last = 0.0  # monotonic time of the last write
        self._thread: threading.Thread | None = None
        self.runs = 0  # checkpoints run, and the last one's answer (tests read them)
        self.last: tuple[int, int, int] | None = None

    def poke(self) -> None:
        """A write transaction has committed: checkpoint soon (starts the thread on first use)."""
        with self._cond:
            if self._closing:
                return
            self._dirty, self._last = True, time.monotonic()
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="sqlite-checkpointer", daemon=True)
                self._thread.start()
            self._cond.notify()

    def close(self) -> None:
        """Stop the thread; a checkpoint in progress finishes first."""
        with self._cond:
            self._closing = True
            self._cond.notify()
            thread = self._thread
        if thread is not None:
            thread.join(30)

    def idle(self) -> bool:
        """No write waits for a checkpoint and none runs (tests wait for this)."""
        with self._cond:
            return not self._dirty and not self._busy

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._dirty and not self._closing:
                    self._cond.wait()
                while not self._closing and (left := self._last + QUIET - time.monotonic()) > 0:
                    self._cond.wait(left)  # until no write has come for QUIET s
                if self._closing:
                    return
                self._dirty, self._busy = False, True
            try:
                self.checkpoint()
            except Exception:  # the next write pokes again; SQLite's own checkpoint is the net
                log.warning("background WAL checkpoint failed", exc_info=True)
            finally:
                with self._cond:
                    self._busy = False

    def checkpoint(self) -> tuple[int, int, int]:
        """One PASSIVE checkpoint: (busy, frames in the WAL, frames copied to the database)."""
        with self._db.connection_context():
            row = tuple(self._db.execute_sql("PRAGMA wal_checkpoint(PASSIVE)").fetchone())
        self.runs += 1
        self.last = row
        return row
