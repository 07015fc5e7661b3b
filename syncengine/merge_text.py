"""Sequence merges through merge3: text by lines, and the order of list items.

Both are three-way and symmetric: swapping ``a`` and ``b`` gives the same
result wherever the two sides do not collide, and where they do collide the
text merge reports it (as base line ranges) while the order merge settles it
by a rule that does not care which side is which.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from difflib import SequenceMatcher
from typing import Any, TypeVar

from merge3 import Merge3

T = TypeVar("T", bound=Hashable)


def merge_order(base: Sequence[T], a: Sequence[T], b: Sequence[T]) -> list[T]:
    """The order of items after a three-way merge of three orderings.

    Where the two sides reordered or inserted at the same place, the side
    whose run sorts first goes first (then the other's items not yet seen),
    so the result is the same whichever side is called ``a``.
    """
    out: list[T] = []
    for region in Merge3(list(base), list(a), list(b)).merge_regions():
        tag = region[0]
        if tag == "unchanged":
            out.extend(base[region[1] : region[2]])
        elif tag in ("a", "same"):
            out.extend(a[region[1] : region[2]])
        elif tag == "b":
            out.extend(b[region[1] : region[2]])
        else:
            runs = sorted([list(a[region[3] : region[4]]), list(b[region[5] : region[6]])])
            out.extend(runs[0] + [x for x in runs[1] if x not in runs[0]])
    return list(dict.fromkeys(out))


def _range(start: int, end: int) -> str:
    if end == start + 1:
        return f"line {end}"
    if end > start:
        return f"lines {start + 1}-{end}"
    return f"after line {start}" if start else "at the start"


def changed_ranges(base: bytes, *sides: bytes) -> tuple[str, ...]:
    """The base line ranges that any of ``sides`` changed, in order, overlapping ones joined.

    What a person must look at in a text conflict that would merge: each
    range is named as :func:`merge_lines` names a collision (``line 3``,
    ``lines 2-4``, ``after line 7`` for an insertion).
    """
    old = base.splitlines(keepends=True)
    spans: list[tuple[int, int]] = []
    for side in sides:
        matcher = SequenceMatcher(None, old, side.splitlines(keepends=True), autojunk=False)
        spans += [(i1, i2) for tag, i1, i2, _j1, _j2 in matcher.get_opcodes() if tag != "equal"]
    joined: list[list[int]] = []
    for start, end in sorted(spans):
        if joined and (start < joined[-1][1] or (start, end) == tuple(joined[-1])):
            joined[-1][1] = max(joined[-1][1], end)
        else:
            joined.append([start, end])
    return tuple(_range(start, end) for start, end in joined)


def merge_lines(base: bytes, local: bytes, remote: bytes) -> tuple[bytes | None, tuple[str, ...]]:
    """``(merged, conflicts)``: merged bytes, or None and the base line ranges in conflict.

    Works on bytes split at line ends (``\\n``, ``\\r\\n``, ``\\r``), so line
    endings pass through untouched.
    """
    lines: list[list[bytes]] = [data.splitlines(keepends=True) for data in (base, local, remote)]
    z, a, b = lines
    out: list[bytes] = []
    conflicts: list[str] = []
    for region in Merge3(z, a, b).merge_regions():
        tag: Any = region[0]
        if tag == "unchanged":
            out.extend(z[region[1] : region[2]])
        elif tag in ("a", "same"):
            out.extend(a[region[1] : region[2]])
        elif tag == "b":
            out.extend(b[region[1] : region[2]])
        else:
            conflicts.append(_range(region[1], region[2]))
    if conflicts:
        return None, tuple(conflicts)
    return b"".join(out), ()
