"""Field paths inside structured documents, and the small value helpers
that :mod:`syncengine.documents` and :mod:`syncengine.merge` share.

One notation everywhere (diffs, merge conflicts, the ``zones`` channel,
``.syncrules`` field rules), described in ``docs/formats.md``::

    title                  a key of the top-level mapping
    meta.updated_at        dotted keys into nested mappings
    meta["a.b"]            a key that holds ``.``, ``[``, ``]`` or ``"`` (JSON-quoted)
    tags[2]                an index into a plain list
    zones[id=z2].text      an item of a list whose items all carry a unique ``id``
    $                      the whole document

Values are compared *strictly* (:func:`same`): ``1``, ``1.0`` and ``true``
are three different values, because they are three different texts in the
file and a merge that treated them as equal would silently drop an edit.
"""

from __future__ import annotations

import fnmatch
import json
import re
from collections.abc import Iterable, Mapping
from typing import Any

ROOT = "$"


class _Missing:
    """An absent key or list item (not the same as a ``null`` value)."""

    _instance: _Missing | None = None

    def __new__(cls) -> _Missing:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "MISSING"

    def __bool__(self) -> bool:
        return False


MISSING: Any = _Missing()

_PLAIN_KEY = re.compile(r'^[^.\[\]"\s$*][^.\[\]"]*$')


def key_segment(key: Any, first: bool) -> str:
    """A mapping key as a path segment: bare where unambiguous, else ``["..."]``."""
    text = key if isinstance(key, str) else str(key)
    if _PLAIN_KEY.match(text) and text == text.strip():
        return text if first else "." + text
    return "[" + json.dumps(text, ensure_ascii=False) + "]"


def id_segment(ident: Any) -> str:
    """The segment of an id-matched list item: ``[id=z2]``."""
    if isinstance(ident, str) and not re.search(r'[\]"]', ident) and ident == ident.strip():
        return f"[id={ident}]"
    return f"[id={json.dumps(ident, ensure_ascii=False)}]"


def join(path: str, segment: str) -> str:
    """Append a segment made by :func:`key_segment` (first=False) or a bracket."""
    if path == ROOT:
        return segment[1:] if segment.startswith(".") else segment
    return path + segment


def child_key(path: str, key: Any) -> str:
    """The path of ``key`` inside the mapping at ``path``."""
    return join(path, key_segment(key, first=path == ROOT))


def id_key(item: Any) -> tuple[int, Any] | None:
    """A hashable, sortable identity for a list item carrying an ``id``.

    Only strings and integers count as ids (not booleans or floats, which
    compare equal to integers): two items are the same item only if their
    ids are the same text in the file.
    """
    if not isinstance(item, dict):
        return None
    ident = item.get("id", MISSING)
    if type(ident) is int:
        return (0, ident)
    if type(ident) is str:
        return (1, ident)
    return None


def id_index(value: Any) -> dict[tuple[int, Any], Any] | None:
    """``{id_key: item}`` in list order if every item has a unique id, else None.

    An empty list qualifies: whether it is matched by id is decided by the
    other versions of the same list.
    """
    if not isinstance(value, list):
        return None
    out: dict[tuple[int, Any], Any] = {}
    for item in value:
        key = id_key(item)
        if key is None or key in out:
            return None
        out[key] = item
    return out


def same(a: Any, b: Any) -> bool:
    """Strict equality: types must match at every level; mapping order is ignored."""
    if a is b:
        return True
    kind = type(a)
    if kind is not type(b):
        return False
    if kind is dict:
        return len(a) == len(b) and all(k in b and same(v, b[k]) for k, v in a.items())
    if kind is list:
        return len(a) == len(b) and all(map(same, a, b))
    return bool(a == b)


def canonical(value: Any) -> str:
    """A deterministic text for any parsed value: sorts and dedupes set merges."""
    if isinstance(value, dict):
        items = sorted(canonical(k) + ":" + canonical(v) for k, v in value.items())
        return "{" + ",".join(items) + "}"
    if isinstance(value, list):
        return "[" + ",".join(canonical(v) for v in value) + "]"
    return f"{type(value).__name__}:{value!r}"


# --------------------------------------------------------------- rules

_SEGMENT = re.compile(r'\[("(?:[^"\\]|\\.)*"|[^\]]*)\]|\.?([^.\[]+)')


def segments(path: str) -> list[tuple[str, str]]:
    """Split a path or pattern into ``("key", name)`` and ``("item", inner)`` segments."""
    if path in (ROOT, ""):
        return []
    out = []
    for match in _SEGMENT.finditer(path):
        bracket, key = match.groups()
        if key is not None:
            out.append(("key", key))
        elif bracket.startswith('"'):
            out.append(("key", json.loads(bracket)))  # a quoted key is a key
        else:
            out.append(("item", bracket))
    return out


def _match(pat: list[tuple[str, str]], segs: list[tuple[str, str]]) -> bool:
    if not pat:
        return not segs
    if pat[0] == ("key", "**"):
        return any(_match(pat[1:], segs[i:]) for i in range(len(segs) + 1))
    if not segs or pat[0][0] != segs[0][0]:
        return False
    glob = pat[0][1]
    hit = glob == "*" or fnmatch.fnmatchcase(segs[0][1], glob)
    return hit and _match(pat[1:], segs[1:])


def rule_for(path: str, rules: Mapping[str, str] | None) -> str | None:
    """The strategy of the first rule whose pattern matches ``path`` or an ancestor.

    Patterns use the path notation with globs: ``*`` inside a key segment,
    ``[*]`` for any list item (index or id), ``**`` for any number of
    segments. ``zones[*].text`` covers every zone's text; ``meta`` covers
    everything under ``meta``.
    """
    if not rules:
        return None
    segs = segments(path)
    for pattern, strategy in rules.items():
        pat = segments(pattern)
        if any(_match(pat, segs[:n]) for n in range(len(segs), -1, -1)):
            return strategy
    return None


def ordered_union(*sequences: Iterable[Any]) -> list[Any]:
    """Items of all sequences, first occurrence wins, order kept."""
    seen: dict[Any, None] = {}
    for seq in sequences:
        for item in seq:
            seen.setdefault(item, None)
    return list(seen)
