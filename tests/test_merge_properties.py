"""Properties of merge() over generated nested documents with id'd zone lists.

Each example builds a base document, perturbs it twice (local, remote) with
random field edits, key deletions, zone inserts/deletes/moves and tag edits,
writes each version in a random JSON style, and checks what must hold for
every merge: one-sided merges are byte-exact, merges are symmetric and
deterministic, no one-sided change is dropped, identical changes never
conflict.
"""

from __future__ import annotations

import copy
import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from syncengine.documents import parse
from syncengine.fieldpaths import ROOT, child_key, id_index, id_segment, join, same
from syncengine.merge import merge
from syncengine.models import Kind

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

KEYS = ["title", "a", "b", "x.y", "zz"]
ZONE_IDS = [f"z{i}" for i in range(1, 8)]
scalars = st.sampled_from([0, 1, 1.0, True, False, None, "1", "", "é", "text", 2.5, -3])
tags = st.lists(st.sampled_from("abcde"), max_size=4)


@st.composite
def documents(draw: Any) -> dict:
    zone_ids = draw(st.lists(st.sampled_from(ZONE_IDS), unique=True, max_size=4))
    return {
        "id": "doc",
        "title": draw(scalars),
        "meta": draw(st.dictionaries(st.sampled_from(KEYS), scalars, max_size=3)),
        "tags": draw(tags),
        "zones": [
            {"id": z, "text": draw(scalars), "page": draw(st.integers(1, 3))} for z in zone_ids
        ],
    }


edits = st.one_of(
    st.tuples(st.just("set"), st.sampled_from(KEYS), scalars),
    st.tuples(st.just("del"), st.sampled_from(KEYS)),
    st.tuples(st.just("meta_set"), st.sampled_from(KEYS), scalars),
    st.tuples(st.just("meta_del"), st.sampled_from(KEYS)),
    st.tuples(
        st.just("zone_set"), st.integers(0, 5), st.sampled_from(["text", "page", "label"]), scalars
    ),
    st.tuples(st.just("zone_add"), st.sampled_from(ZONE_IDS), st.integers(0, 5), scalars),
    st.tuples(st.just("zone_del"), st.integers(0, 5)),
    st.tuples(st.just("zone_move"), st.integers(0, 5), st.integers(0, 5)),
    st.tuples(st.just("tags"), tags),
)


def apply(doc: dict, ops: list[tuple]) -> dict:
    doc = copy.deepcopy(doc)
    zones = doc["zones"]
    for op, *args in ops:
        if op == "set":
            doc[args[0]] = args[1]
        elif op == "del" and args[0] in doc:
            del doc[args[0]]
        elif op == "meta_set":
            doc["meta"][args[0]] = args[1]
        elif op == "meta_del":
            doc["meta"].pop(args[0], None)
        elif op == "zone_set" and zones:
            zones[args[0] % len(zones)][args[1]] = args[2]
        elif op == "zone_add" and all(z["id"] != args[0] for z in zones):
            zones.insert(args[1] % (len(zones) + 1), {"id": args[0], "text": args[2]})
        elif op == "zone_del" and zones:
            del zones[args[0] % len(zones)]
        elif op == "zone_move" and zones:
            zones.insert(args[1] % len(zones), zones.pop(args[0] % len(zones)))
        elif op == "tags":
            doc["tags"] = args[0]
    return doc


STYLES = [
    lambda v: json.dumps(v, indent=2) + "\n",
    lambda v: json.dumps(v, indent=4),
    lambda v: json.dumps(v),
    lambda v: json.dumps(v, ensure_ascii=False, separators=(",", ":")),
]


@st.composite
def triples(draw: Any) -> tuple[bytes, bytes, bytes, dict | None]:
    base = draw(documents())
    local = apply(base, draw(st.lists(edits, max_size=4)))
    remote = apply(base, draw(st.lists(edits, max_size=4)))
    enc = [draw(st.sampled_from(STYLES))(v).encode() for v in (base, local, remote)]
    rules = draw(st.sampled_from([None, {"tags": "union"}, {"zones[*].text": "union"}]))
    return enc[0], enc[1], enc[2], rules


def flat(value: Any, path: str = ROOT, out: dict | None = None) -> dict[str, Any]:
    """Every field by path (zones by id); containers appear as a type marker."""
    out = {} if out is None else out
    if isinstance(value, dict):
        out[path] = "<mapping>"
        for key, item in value.items():
            flat(item, child_key(path, key), out)
    elif isinstance(value, list) and id_index(value) is not None:
        out[path] = "<id list>"
        for item in value:
            flat(item, join(path, id_segment(item["id"])), out)
    else:
        out[path] = value
    return out


MISSING = object()


def changed(a: dict, b: dict, path: str) -> bool:
    x, y = a.get(path, MISSING), b.get(path, MISSING)
    return not (x is y or (x is not MISSING and y is not MISSING and same(x, y)))


@SETTINGS
@given(triples())
def test_one_side_unchanged_returns_the_other_side_bytes(case):
    """merge(b, b, r) is r's bytes and merge(b, l, b) is l's bytes, exactly."""
    base, local, remote, rules = case
    assert merge(Kind.JSON, base, base, remote, rules=rules).merged == remote
    assert merge(Kind.JSON, base, local, base, rules=rules).merged == local


@SETTINGS
@given(triples())
def test_merge_does_not_depend_on_which_side_is_local(case):
    """Swapping local and remote gives the same bytes (or the same conflicts)."""
    base, local, remote, rules = case
    one = merge(Kind.JSON, base, local, remote, rules=rules)
    two = merge(Kind.JSON, base, remote, local, rules=rules)
    assert one.merged == two.merged
    assert one.conflicts == two.conflicts


@SETTINGS
@given(triples())
def test_no_one_sided_change_is_dropped(case):
    """Every field changed on exactly one side has that side's value in a clean merge."""
    base, local, remote, rules = case
    result = merge(Kind.JSON, base, local, remote, rules=rules)
    if result.merged is None:
        return
    fb, fl, fr = (flat(parse(Kind.JSON, d)) for d in (base, local, remote))
    fm = flat(parse(Kind.JSON, result.merged))
    for path in set(fb) | set(fl) | set(fr):
        if changed(fb, fl, path) and not changed(fb, fr, path):
            assert not changed(fm, fl, path), path
        if changed(fb, fr, path) and not changed(fb, fl, path):
            assert not changed(fm, fr, path), path


@SETTINGS
@given(triples())
def test_identical_changes_never_conflict(case):
    """A conflict path always has local and remote differing at or below it."""
    base, local, remote, rules = case
    result = merge(Kind.JSON, base, local, remote, rules=rules)
    fl, fr = (flat(parse(Kind.JSON, d)) for d in (local, remote))
    for conflict in result.conflicts:
        below = [
            p
            for p in set(fl) | set(fr)
            if p == conflict or p.startswith((conflict + ".", conflict + "["))
        ]
        assert any(changed(fl, fr, p) for p in below), conflict


@SETTINGS
@given(
    documents(), st.lists(edits, max_size=4), st.lists(st.sampled_from(["n1", "n2"]), max_size=2)
)
def test_same_edits_plus_new_fields_merge_cleanly(base, ops, extra):
    """Both sides making the same edits, one side also adding new fields, merges to that side."""
    local = apply(base, ops)
    remote = apply(local, [("set", key, key) for key in extra])
    result = merge(
        Kind.JSON,
        json.dumps(base).encode(),
        json.dumps(local).encode(),
        json.dumps(remote, indent=2).encode(),
    )
    assert result.conflicts == ()
    assert same(parse(Kind.JSON, result.merged), remote)


@SETTINGS
@given(triples())
def test_merge_is_deterministic(case):
    """The same inputs give the same result, however often and from whatever copies."""
    base, local, remote, rules = case
    first = merge(Kind.JSON, base, local, remote, rules=rules)
    again = merge(Kind.JSON, bytes(base), bytes(local), bytes(remote), rules=dict(rules or {}))
    assert first == again


lines = st.lists(st.sampled_from(["a\n", "b\n", "c\n", "d\n", "e\n"]), max_size=6)


@SETTINGS
@given(lines, lines, lines)
def test_text_merge_is_symmetric(base, local, remote):
    """Text merges give the same bytes or the same conflict ranges whichever side is local."""
    b, lo, re = ("".join(x).encode() for x in (base, local, remote))
    one, two = merge(Kind.TEXT, b, lo, re), merge(Kind.TEXT, b, re, lo)
    assert (one.merged, one.conflicts) == (two.merged, two.conflicts)
