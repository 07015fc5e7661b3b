"""Field-level differences between two parsed values, through deepdiff.

deepdiff compares lists by position. Lists whose items all carry a unique
``id`` are first turned into mappings keyed by that id, so deepdiff sees
"zone z2's text changed" rather than "item 2 changed, item 3 changed, ...",
and matches items in linear time. A change in the order of id'd items is
reported once, on the list, as ``changed`` with the two id orders.

Imported only where a diff is asked for: deepdiff is slow to import.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Any

from deepdiff import DeepDiff
from deepdiff.helper import notpresent

from syncengine.fieldpaths import ROOT, child_key, id_index, id_segment, join


@dataclass(frozen=True, slots=True)
class FieldChange:
    """A field-level difference in a structured document (from deepdiff).

    Defined here, where every one is made, rather than in syncengine.models
    (which still names it): a scan or a sync round without a diff never
    creates it (a dataclass costs ~0.4 ms of a process start).
    """

    path: str  # dotted/bracketed path such as zones[id=z1].text
    change: str  # added | removed | changed
    old: Any = None
    new: Any = None



_CHANGE = {
    "values_changed": "changed",
    "type_changes": "changed",
    "dictionary_item_added": "added",
    "iterable_item_added": "added",
    "set_item_added": "added",
    "dictionary_item_removed": "removed",
    "iterable_item_removed": "removed",
    "set_item_removed": "removed",
}


class _Id(str):
    """A key standing for one id'd list item inside a transformed list.

    A ``str`` so that deepdiff can print it; the text is unique per id and
    type, and the real id rides along in ``key``.
    """

    key: tuple[int, Any]

    def __new__(cls, key: tuple[int, Any]) -> _Id:
        self = super().__new__(cls, f"{key[0]}:{key[1]}")
        self.key = key
        return self


class _IdList(dict):
    """An id'd list seen as a mapping (a distinct type, so it never equals a dict)."""


Orders = list[tuple[tuple, FieldChange]]


def _prep(old: Any, new: Any, path: str, pos: tuple, orders: Orders) -> tuple[Any, Any]:
    """Both values with id'd lists (id'd on both sides) turned into ``_IdList``.

    ``pos`` is the place of ``path`` in ``new`` (a tuple of indexes), so an
    order change sorts just before the changes inside its list.
    """
    if type(old) is dict and type(new) is dict:
        pairs = {
            k: _prep(old[k], new[k], child_key(path, k), (*pos, (i, 1)), orders)
            for i, k in enumerate(new)
            if k in old
        }
        o = {k: pairs[k][0] if k in pairs else v for k, v in old.items()}
        n = {k: pairs[k][1] if k in pairs else v for k, v in new.items()}
        return o, n
    if type(old) is list and type(new) is list:
        have, want = id_index(old), id_index(new)
        if have is not None and want is not None and (have or want):
            if [k for k in have if k in want] != [k for k in want if k in have]:
                ids = ([k[1] for k in have], [k[1] for k in want])
                orders.append((pos, FieldChange(path, "changed", *ids)))
            pairs = {
                k: _prep(have[k], want[k], join(path, id_segment(k[1])), (*pos, (i, 1)), orders)
                for i, k in enumerate(want)
                if k in have
            }
            o = _IdList((_Id(k), pairs[k][0] if k in pairs else v) for k, v in have.items())
            n = _IdList((_Id(k), pairs[k][1] if k in pairs else v) for k, v in want.items())
            return o, n
        pairs = [
            _prep(a, b, join(path, f"[{i}]"), (*pos, (i, 1)), orders)
            for i, (a, b) in enumerate(zip(old, new, strict=False))
        ]
        return [p[0] for p in pairs] + old[len(pairs) :], [p[1] for p in pairs] + new[len(pairs) :]
    return old, new


def diff_values(old: Any, new: Any) -> list[FieldChange]:
    """Changes turning ``old`` into ``new``: dotted/bracketed paths, document order."""
    found: Orders = []
    t1, t2 = _prep(old, new, ROOT, (), found)
    # threshold 0: always descend, never report a whole mapping because much of it changed
    tree = DeepDiff(t1, t2, view="tree", threshold_to_diff_deeper=0, ignore_order=False)
    for report, levels in tree.items():
        change = _CHANGE.get(report)
        if change is None:
            continue  # moves (index shifts only, id'd lists being mappings here)
        for level in levels:
            path, position = _path_of(level)
            before = None if level.t1 is notpresent else _display(level.t1)
            after = None if level.t2 is notpresent else _display(level.t2)
            found.append((position, FieldChange(path, change, before, after)))
    found.sort(key=lambda item: (item[0], item[1].path))
    return [change for _, change in found]


def _path_of(level: Any) -> tuple[str, tuple]:
    """The path of a deepdiff tree level, and a sort key in document order."""
    while level.up is not None:
        level = level.up
    path, position = ROOT, []
    while level.down is not None:
        rel = level.t2_child_rel or level.t1_child_rel
        param = rel.param
        if isinstance(param, _Id):
            path = join(path, id_segment(param.key[1]))
        elif isinstance(level.t1, dict) or isinstance(level.t2, dict):
            path = child_key(path, param)
        else:
            path = join(path, f"[{param}]")
        position.append(_rank(level.t1, level.t2, param))
        level = level.down
    return path, tuple(position)


def _rank(t1: Any, t2: Any, param: Any) -> tuple[int, int]:
    """Where ``param`` sits in the new container; a removed key sorts just
    before the next key of the old container that survived."""
    if isinstance(param, int) and not isinstance(t2, dict):
        return (param, 1)
    new_keys = list(t2) if isinstance(t2, dict) else []
    if param in new_keys:
        return (new_keys.index(param), 1)
    old_keys = list(t1) if isinstance(t1, dict) else []
    later = old_keys[old_keys.index(param) + 1 :] if param in old_keys else []
    survivor = next((k for k in later if k in new_keys), None)
    return (new_keys.index(survivor) if survivor is not None else len(new_keys), 0)


def _display(value: Any) -> Any:
    """Values as they go into a FieldChange: JSON-ready (dates as ISO text)."""
    if isinstance(value, _IdList):
        return [_display(v) for v in value.values()]
    if isinstance(value, dict):
        return {k: _display(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_display(v) for v in value]
    if isinstance(value, datetime.date | datetime.time):
        return value.isoformat()
    return value
