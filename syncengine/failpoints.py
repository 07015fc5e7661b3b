"""Named failpoints: ``SYNCENGINE_FAILPOINT=name[:N][=raise][,name...]`` (DESIGN §4 rule 10).

A module of its own, with no imports of ours, so the server (which shares
only protocol, errors and paths with the client) can be killed at its steps
as the client is at its (:mod:`syncengine.fsops` re-exports it).
"""

from __future__ import annotations

import os
import signal

_hits: dict[str, int] = {}
# os.environ's own table (bytes on POSIX), which putenv through os.environ, and so tests' monkeypatch,
# keep current. os.environ.get of an absent name raises and catches a KeyError inside (~0.7 us): every
# file operation asks for these two hooks, ~20,000 times in a 10k first sync and ~4% of init's samples.
_RAW_ENV = getattr(os.environ, "_data", None)


def _env(name: str) -> str | None:
    """``os.environ.get(name)``, without the cost of a miss."""
    if isinstance(_RAW_ENV, dict):
        key = os.environ.encodekey(name)
        if key not in _RAW_ENV:
            return None
    return os.environ.get(name)


def failpoint(name: str) -> None:
    """Kill this process here if the environment names this failpoint.

    ``name:N`` fires on the Nth hit; ``name=raise`` raises RuntimeError
    instead of killing (to test the crash path without losing the process).
    """
    spec = _env("SYNCENGINE_FAILPOINT")
    if not spec:
        return
    for item in spec.split(","):
        item, _, action = item.strip().partition("=")
        point, _, nth = item.partition(":")
        if point != name:
            continue
        _hits[name] = _hits.get(name, 0) + 1
        if _hits[name] >= int(nth or 1):
            if action == "raise":
                raise RuntimeError(f"failpoint {name} reached")
            os.kill(os.getpid(), signal.SIGKILL)
