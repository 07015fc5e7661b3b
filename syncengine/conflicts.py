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
from typing import TYPE_CHECKING

from syncengine.config import STRATEGIES as STRATEGIES  # defined with the settings that name them
from syncengine.config import check_strategy as check_strategy
from syncengine.errors import UsageError
from syncengine.fieldpaths import ROOT

if TYPE_CHECKING:
    from syncengine.models import Kind

# The merge stack (merge, merge_text with difflib and merge3) is imported by the functions that settle content:
# every `sync` needs STRATEGIES (syncengine.config), only a round with a conflict needs this module, and only one
# settling content needs a merge.


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


# eq=False: read field by field, never compared whole (no __eq__/__hash__: ~0.09 ms less at every `sync` start)
@dataclass(frozen=True, slots=True, eq=False)
class Outcome:
    """What a strategy decided for content changed on both sides.

    ``data`` is the file's new content (None: keep what is on disk, for
    ``local``; or nothing decided, for ``manual``). ``copy`` asks for the
    losing local version to be saved beside the file (keep-both). ``loser``
    names the side whose version is dropped from the file without a copy
    (kept in the blob store and the change log). ``touched`` lists the field
    paths the new content changes in the local file (the ``zones``);
    ``details`` the fields or lines involved, for ``conflicts``.
    """

    resolution: str  # merged | keep-both | local | remote | manual
    data: bytes | None = None
    copy: bool = False
    open: bool = False
    touched: tuple[str, ...] = ()
    details: tuple[str, ...] = ()  # fields or lines involved
    note: str | None = None
    loser: str | None = None  # "local" | "remote" | None (nothing lost)


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
    """Apply ``strategy`` to content that changed on both sides.

    Pure: the same versions, rules and ``local_is_newer`` always give the
    same outcome, so a replica that resolves the same conflict again (after
    a crash) lands on the same bytes and the same copy.
    """
    newer = "local" if local_is_newer else "remote"
    if strategy == "merge":
        if kind.mergeable:
            from syncengine import merge as merging

            result = merging.merge(kind, base, local, remote, rules=field_rules or None, newer=newer)
            if result.merged is not None:
                return Outcome("merged", result.merged, touched=result.touched, details=result.settled)
            return Outcome("keep-both", remote, copy=True, details=result.conflicts,
                           touched=_zones(kind, local, remote),
                           note=result.reason or "the same fields or lines changed on both sides")
        return Outcome("keep-both", remote, copy=True, details=(ROOT,), note="binary files are not merged")
    if strategy == "keep-both":
        return Outcome("keep-both", remote, copy=True, touched=_zones(kind, local, remote))
    if strategy == "newest":
        strategy = "local" if local_is_newer else "remote"
    if strategy == "local":
        return Outcome("local", None, loser="remote")
    if strategy == "remote":
        return Outcome("remote", remote, loser="local", touched=_zones(kind, local, remote))
    if strategy == "manual":
        return Outcome("manual", None, open=True, details=involved(kind, base, local, remote))
    raise UsageError(f"unknown strategy {strategy!r}")


def involved(kind: Kind, base: bytes | None, local: bytes, remote: bytes) -> tuple[str, ...]:
    """The fields or lines a person must look at: those changed on both sides, if any.

    For a document that would merge cleanly, every field (text: every base
    line range) either side changed; for one that does not parse, or
    binary, the whole (``$``).
    """
    if not kind.mergeable:
        return (ROOT,)
    from syncengine import merge as merging
    from syncengine.merge_text import changed_ranges

    result = merging.merge(kind, base, local, remote)
    if result.conflicts:
        return result.conflicts
    if result.reason or base is None:
        return (ROOT,)
    if not kind.structured:
        return changed_ranges(base, local, remote) or (ROOT,)
    return tuple(dict.fromkeys([*_zones(kind, base, local), *_zones(kind, base, remote)])) or (ROOT,)


def _zones(kind: Kind, old: bytes, new: bytes) -> tuple[str, ...]:
    """Field paths that differ from ``old`` to ``new`` (none for text, binary, or a side that does not parse)."""
    if old == new:
        return ()
    from syncengine.documents import changed_zones

    return tuple(changed_zones(kind, old, new))


ZONE_ORIGINS = ("merge", "resolve", "local", "remote")


def zone_event(path: str, doc_id: str, fields: list[str] | tuple[str, ...], origin: str) -> dict[str, object]:
    """One payload of the ``zones`` event channel (the shape docs/conflicts.md documents).

    ``fields`` are field paths in the docs/formats.md notation; an empty list
    means the document changed as a whole (text, binary, or not parsing).
    """
    if origin not in ZONE_ORIGINS:
        raise ValueError(f"unknown zone origin {origin!r}")
    return {"path": path, "doc_id": doc_id, "fields": list(fields), "origin": origin}
