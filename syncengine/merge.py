"""Three-way merge of one document, with the last synced version as the base.

Pure: the merged bytes depend only on (kind, base, local, remote, rules,
newer) — never on clocks, paths or which replica runs it — so every replica
that merges the same versions writes the same bytes and the sync converges.
Where the two sides do not collide the result does not even depend on which
side is called local (``tests/test_merge_properties.py``).

Structured documents merge field by field at any depth; items of lists
whose items all carry an ``id`` are matched by id; a field changed on both
sides to different values is a conflict unless a field rule settles it. A
rule never settles an edit against a deletion: a modification does not lose
to a deletion silently (DESIGN §5). Text merges by lines. Binary never
merges. The full rules, and the rule syntax, are in ``docs/merge.md``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from syncengine.documents import parse, serialize
from syncengine.errors import MalformedDocument, UsageError
from syncengine.fieldpaths import (
    MISSING,
    ROOT,
    canonical,
    child_key,
    id_index,
    id_segment,
    join,
    rule_for,
    same,
)
from syncengine.merge_text import merge_lines, merge_order
from syncengine.models import Kind

__all__ = ["STRATEGIES", "MergeResult", "merge"]

STRATEGIES = frozenset({"newest", "local", "remote", "union"})
SIDES = ("local", "remote")


@dataclass(frozen=True, slots=True)
class MergeResult:
    """What a merge produced.

    ``merged`` is None when the document cannot merge cleanly; ``conflicts``
    then names the field paths (or base line ranges) changed differently on
    both sides, and ``reason`` says why when it is not a field conflict (a
    side that does not parse, binary content, no common base). ``touched``
    lists the field paths whose value in ``merged`` differs from **local** —
    what writing the result changes in this replica's file, for the
    ``zones`` channel. ``settled`` lists the paths a field rule decided.
    """

    merged: bytes | None
    conflicts: tuple[str, ...] = ()
    touched: tuple[str, ...] = ()
    reason: str | None = None
    settled: tuple[str, ...] = ()

    @property
    def clean(self) -> bool:
        """True when there are merged bytes to write."""
        return self.merged is not None


def merge(
    kind: Kind,
    base: bytes | None,
    local: bytes,
    remote: bytes,
    *,
    rules: Mapping[str, str] | None = None,
    newer: str | None = None,
) -> MergeResult:
    """Merge ``local`` and ``remote`` against ``base`` (None: no common base).

    ``rules`` maps field-path patterns to ``newest``/``local``/``remote``/
    ``union``; ``newer`` names the side (``"local"`` or ``"remote"``) whose
    change the server received last, for ``newest``.
    """
    _check_args(rules, newer)
    if local == remote:
        return MergeResult(local)
    if base is not None and local == base:
        return MergeResult(remote, touched=_touched(kind, local, remote))
    if base is not None and remote == base:
        return MergeResult(local)
    if kind is Kind.BINARY:
        return MergeResult(None, (ROOT,), reason="binary documents are never merged")
    if kind is Kind.TEXT:
        return _merge_text(base, local, remote)
    return _merge_structured(kind, base, local, remote, rules, newer)


def _check_args(rules: Mapping[str, str] | None, newer: str | None) -> None:
    if newer is not None and newer not in SIDES:
        raise UsageError(f"newer must be 'local' or 'remote', not {newer!r}")
    for pattern, strategy in (rules or {}).items():
        if strategy not in STRATEGIES:
            raise UsageError(
                f"unknown field rule {pattern} = {strategy!r}",
                hint="use one of: " + ", ".join(sorted(STRATEGIES)),
            )


def _touched(kind: Kind, old: bytes, new: bytes) -> tuple[str, ...]:
    if not kind.structured:
        return ()
    from syncengine.docdiff import diff_values

    try:
        return _paths(diff_values(parse(kind, old), parse(kind, new)))
    except MalformedDocument:
        return ()


def _paths(changes: list) -> tuple[str, ...]:
    return tuple(dict.fromkeys(change.path for change in changes))


def _merge_text(base: bytes | None, local: bytes, remote: bytes) -> MergeResult:
    for side, data in (("base", base), ("local", local), ("remote", remote)):
        if data is not None:
            try:
                data.decode("utf-8")
            except UnicodeDecodeError:
                return MergeResult(None, reason=f"{side} is not UTF-8 text")
    if base is None:
        return MergeResult(None, (ROOT,), reason="created on both sides with no common base")
    merged, conflicts = merge_lines(base, local, remote)
    return MergeResult(merged, conflicts)


def _merge_structured(
    kind: Kind,
    base: bytes | None,
    local: bytes,
    remote: bytes,
    rules: Mapping[str, str] | None,
    newer: str | None,
) -> MergeResult:
    values: dict[str, Any] = {"base": MISSING}
    for side, data in (("base", base), ("local", local), ("remote", remote)):
        if data is not None:
            try:
                values[side] = parse(kind, data)
            except MalformedDocument as exc:
                return MergeResult(None, reason=f"{side} {exc.message}")
    b, lv, rv = values["base"], values["local"], values["remote"]
    fields = _FieldMerge(rules, newer)
    value = fields.value(ROOT, b, lv, rv)
    settled = tuple(fields.settled)
    if fields.conflicts:
        return MergeResult(None, tuple(fields.conflicts), settled=settled)
    # a result equal to one side is that side's bytes: no reformatting, no churn
    if same(value, lv) and same(value, rv):
        return MergeResult(min(local, remote), settled=settled)
    if same(value, lv):
        return MergeResult(local, settled=settled)
    from syncengine.docdiff import diff_values

    touched = _paths(diff_values(lv, value))
    if same(value, rv):
        return MergeResult(remote, touched=touched, settled=settled)
    try:
        data = serialize(kind, value, like=base if base is not None else min(local, remote))
        if not same(parse(kind, data), value):
            raise MalformedDocument("the merged document does not read back as merged")
    except MalformedDocument as exc:
        return MergeResult(None, reason=f"merged {exc.message}", settled=settled)
    return MergeResult(data, touched=touched, settled=settled)


class _FieldMerge:
    """One structured merge: walks the three values, collects conflicts."""

    def __init__(self, rules: Mapping[str, str] | None, newer: str | None) -> None:
        self.rules = rules
        self.newer = newer
        self.conflicts: list[str] = []
        self.settled: list[str] = []

    def value(self, path: str, b: Any, lv: Any, rv: Any) -> Any:
        """The merged value at ``path``; MISSING means the key/item is gone."""
        if same(lv, rv):
            return lv
        if same(b, lv):
            return rv
        if same(b, rv):
            return lv
        rule = rule_for(path, self.rules)
        both = (type(lv), type(rv))
        if both == (dict, dict) and (b is MISSING or type(b) is dict):
            return self.mapping(path, {} if b is MISSING else b, lv, rv)
        if both == (list, list) and (b is MISSING or type(b) is list):
            # Items with ids match by id, even under `union` (which would keep
            # two versions of an item edited on both sides: two items, one id).
            indexes = [id_index([] if b is MISSING else b), id_index(lv), id_index(rv)]
            if all(index is not None for index in indexes) and any(indexes):
                return self.id_list(path, *indexes)
            if rule == "union":
                self.settled.append(path)
                return self.union([] if b is MISSING else b, lv, rv)
        return self.collide(path, rule, lv, rv)

    def collide(self, path: str, rule: str | None, lv: Any, rv: Any) -> Any:
        """Both sides changed ``path`` differently: a rule settles it, or a conflict."""
        side = self.newer if rule == "newest" else rule
        if side in SIDES and lv is not MISSING and rv is not MISSING:
            self.settled.append(path)
            return lv if side == "local" else rv
        self.conflicts.append(path)
        return lv

    def mapping(self, path: str, b: dict, lv: dict, rv: dict) -> dict:
        """Key by key; base keys keep base order, new keys follow in sorted order."""
        new_keys = {k for k in (*lv, *rv) if k not in b}
        out = {}
        for key in [*b, *sorted(new_keys, key=canonical)]:
            merged = self.value(
                child_key(path, key),
                b.get(key, MISSING),
                lv.get(key, MISSING),
                rv.get(key, MISSING),
            )
            if merged is not MISSING:
                out[key] = merged
        return out

    def id_list(self, path: str, b: dict, lv: dict, rv: dict) -> list:
        """Items matched by id, merged one by one; order merged by position."""
        new_ids = {k for k in (*lv, *rv) if k not in b}
        items = {}
        for key in [*b, *sorted(new_ids)]:
            merged = self.value(
                join(path, id_segment(key[1])),
                b.get(key, MISSING),
                lv.get(key, MISSING),
                rv.get(key, MISSING),
            )
            if merged is not MISSING:
                items[key] = merged
        order = [k for k in merge_order(list(b), list(lv), list(rv)) if k in items]
        order += sorted(set(items) - set(order))
        return [items[key] for key in order]

    def union(self, b: list, lv: list, rv: list) -> list:
        """Three-way set merge: removed on one side stays removed, added on either is added."""
        keys = [{canonical(x): x for x in seq} for seq in (b, lv, rv)]
        kb, kl, kr = keys
        kept = {c: x for c, x in {**kl, **kr}.items() if (c in kl and c in kr) or c not in kb}
        order = [c for c in merge_order(list(kb), list(kl), list(kr)) if c in kept]
        order += sorted(set(kept) - set(order))
        return [kept[c] for c in order]
