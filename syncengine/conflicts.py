"""Conflict strategies and conflict-copy names (DESIGN §5).

A strategy turns (base, local, remote) bytes into what the file becomes and,
for keep-both, what is saved beside it. It never touches the disk: the sync
layer writes the outcome, copy first, so a kill between the two leaves both
versions on disk (RELIABILITY A6).
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from datetime import UTC, datetime

from syncengine import merge as merging
from syncengine.errors import UsageError
from syncengine.models import Kind

STRATEGIES = ("merge", "keep-both", "local", "remote", "newest", "manual")


def check_strategy(name: str) -> str:
    if name not in STRATEGIES:
        raise UsageError(f"unknown strategy {name!r} (choose from {', '.join(STRATEGIES)})")
    return name


def split_name(name: str) -> tuple[str, str]:
    """(stem, extensions): 'a.tar.gz' -> ('a', '.tar.gz'); '.syncrules' -> ('.syncrules', '')."""
    head = 1 if name.startswith(".") else 0
    dot = name.find(".", head)
    if dot <= 0:
        return name, ""
    return name[:dot], name[dot:]


def copy_name(path: str, client_id: str, at_ns: int, digest: str) -> str:
    """Where the losing version of ``path`` is saved beside it.

    ``STEM.conflict-<client8>-<YYYYMMDD-HHMMSS>-<hash8><EXTS>``: the loser's
    client, its journal time (UTC) and its hash, so the name is a pure
    function of the losing version — resolving the same conflict again, after
    a crash or on another replica, lands on the same name and makes no second
    copy.
    """
    folder, name = posixpath.split(path)
    stem, exts = split_name(name)
    when = datetime.fromtimestamp(at_ns / 1e9, UTC).strftime("%Y%m%d-%H%M%S")
    new = f"{stem}.conflict-{client_id[:8]}-{when}-{digest[:8]}{exts}"
    return posixpath.join(folder, new) if folder else new


def is_conflict_copy(path: str) -> bool:
    return ".conflict-" in posixpath.basename(path)


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a strategy decided for content changed on both sides.

    ``data`` is the file's new content (None: keep what is on disk, for
    ``local``; or nothing decided, for ``manual``). ``copy`` is the losing local
    version's bytes for keep-both. ``resolution`` is recorded in the journal.
    """

    resolution: str  # merged | keep-both | local | remote | manual
    data: bytes | None = None
    copy: bool = False
    open: bool = False
    touched: tuple[str, ...] = ()
    details: tuple[str, ...] = ()  # fields or lines involved
    note: str | None = None


def resolve_content(
    strategy: str,
    kind: Kind,
    base: bytes | None,
    local: bytes,
    remote: bytes,
    *,
    field_rules: dict[str, str] | None = None,
    local_is_newer: bool = False,
) -> Outcome:
    """Apply ``strategy`` to content that changed on both sides."""
    newer = "local" if local_is_newer else "remote"
    if strategy == "merge":
        if kind.mergeable:
            result = merging.merge(kind, base, local, remote, rules=field_rules or None, newer=newer)
            if result.merged is not None:
                return Outcome("merged", result.merged, touched=result.touched, details=result.conflicts)
            return Outcome("keep-both", remote, copy=True, details=result.conflicts,
                           note=result.reason or "the same fields or lines changed on both sides")
        return Outcome("keep-both", remote, copy=True, note="binary files are not merged")
    if strategy == "keep-both":
        return Outcome("keep-both", remote, copy=True)
    if strategy == "local":
        return Outcome("local", None)
    if strategy == "remote":
        return Outcome("remote", remote)
    if strategy == "newest":
        return Outcome("local", None) if local_is_newer else Outcome("remote", remote)
    if strategy == "manual":
        return Outcome("manual", None, open=True)
    raise UsageError(f"unknown strategy {strategy!r}")
