"""merge.py: three-way merges, one table row per case."""

from __future__ import annotations

import copy
import json

import pytest

from syncengine.documents import parse
from syncengine.errors import UsageError
from syncengine.merge import MergeResult, merge
from syncengine.merge_text import merge_order
from syncengine.models import Kind

BASE = {
    "id": "doc-7",
    "title": "Invoice",
    "meta": {"updated_at": "2026-01-02", "tags": ["a", "b"]},
    "zones": [
        {"id": "z1", "page": 1, "bbox": [10, 20, 200, 80], "label": "header", "text": "ACME"},
        {"id": "z2", "page": 1, "bbox": [10, 100, 200, 300], "label": "table", "text": "..."},
    ],
}


def js(value) -> bytes:
    return (json.dumps(value, indent=2) + "\n").encode()


def edit(fn):
    doc = copy.deepcopy(BASE)
    fn(doc)
    return doc


def zone(zones, ident):
    return next(z for z in zones if z["id"] == ident)


def set_path(*steps):
    """An edit setting one value: set_path("meta", "updated_at", "x")."""

    def fn(doc):
        target = doc
        for step in steps[:-2]:
            target = zone(target, step) if isinstance(target, list) else target[step]
        target[steps[-2]] = steps[-1]

    return fn


def both(*fns):
    def fn(doc):
        for f in fns:
            f(doc)

    return fn


def add_zone(z, at=None):
    return lambda doc: doc["zones"].insert(len(doc["zones"]) if at is None else at, z)


def del_zone(ident):
    return lambda doc: doc["zones"].remove(zone(doc["zones"], ident))


def del_key(*steps):
    def fn(doc):
        target = doc
        for step in steps[:-1]:
            target = target[step]
        del target[steps[-1]]

    return fn


ZONE_TEXT = set_path("zones", "z1", "text", "ACME Corp")
Z2_TEXT = set_path("zones", "z2", "text", "TOTAL 12")
Z3 = {"id": "z3", "page": 2, "text": "new"}

# (name, local edit, remote edit, expected merged value or None, conflicts)
CASES = [
    (
        "different top fields",
        set_path("title", "Invoice 7"),
        set_path("meta", "updated_at", "2026-02-01"),
        both(set_path("title", "Invoice 7"), set_path("meta", "updated_at", "2026-02-01")),
        (),
    ),
    ("different zones", ZONE_TEXT, Z2_TEXT, both(ZONE_TEXT, Z2_TEXT), ()),
    (
        "fields of one zone",
        ZONE_TEXT,
        set_path("zones", "z1", "label", "logo"),
        both(ZONE_TEXT, set_path("zones", "z1", "label", "logo")),
        (),
    ),
    ("zone added vs zone edited", add_zone(Z3), Z2_TEXT, both(add_zone(Z3), Z2_TEXT), ()),
    (
        "zone inserted first vs zone edited",
        add_zone(Z3, at=0),
        Z2_TEXT,
        both(add_zone(Z3, at=0), Z2_TEXT),
        (),
    ),
    (
        "zone deleted vs other zone edited",
        del_zone("z1"),
        Z2_TEXT,
        both(del_zone("z1"), Z2_TEXT),
        (),
    ),
    ("zone deleted vs same zone edited", del_zone("z1"), ZONE_TEXT, None, ("zones[id=z1]",)),
    (
        "same field differently",
        ZONE_TEXT,
        set_path("zones", "z1", "text", "X"),
        None,
        ("zones[id=z1].text",),
    ),
    ("identical change", ZONE_TEXT, ZONE_TEXT, both(ZONE_TEXT), ()),
    (
        "identical change plus one-sided",
        ZONE_TEXT,
        both(ZONE_TEXT, Z2_TEXT),
        both(ZONE_TEXT, Z2_TEXT),
        (),
    ),
    ("same zone added on both sides", add_zone(Z3), add_zone(Z3), both(add_zone(Z3)), ()),
    (
        "same id added with different content",
        add_zone(Z3),
        add_zone({**Z3, "text": "other"}),
        None,
        ("zones[id=z3].text",),
    ),
    (
        "plain list changed on both sides",
        set_path("meta", "tags", ["a", "b", "c"]),
        set_path("meta", "tags", ["b"]),
        None,
        ("meta.tags",),
    ),
    (
        "plain list changed on one side, other field on the other",
        set_path("meta", "tags", ["b"]),
        set_path("title", "T"),
        both(set_path("meta", "tags", ["b"]), set_path("title", "T")),
        (),
    ),
    ("key deleted vs untouched", del_key("title"), Z2_TEXT, both(del_key("title"), Z2_TEXT), ()),
    ("key deleted vs edited", del_key("title"), set_path("title", "T"), None, ("title",)),
    ("key deleted on both sides", del_key("title"), del_key("title"), both(del_key("title")), ()),
    (
        "new keys on both sides",
        set_path("z_local", 1),
        set_path("a_remote", 2),
        both(set_path("z_local", 1), set_path("a_remote", 2)),
        (),
    ),
    ("int vs float is a change", set_path("title", 1), set_path("title", 1.0), None, ("title",)),
    (
        "zone moved vs zone edited",
        lambda d: d["zones"].reverse(),
        ZONE_TEXT,
        both(lambda d: d["zones"].reverse(), ZONE_TEXT),
        (),
    ),
]


@pytest.mark.parametrize(
    ("local_edit", "remote_edit", "expected", "conflicts"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_structured_merge_table(local_edit, remote_edit, expected, conflicts):
    """Each row: the merged value (field by field, zones by id) or the conflicting paths."""
    local, remote = js(edit(local_edit)), js(edit(remote_edit))
    result = merge(Kind.JSON, js(BASE), local, remote)
    assert result.conflicts == conflicts
    if expected is None:
        assert result.merged is None
    else:
        assert parse(Kind.JSON, result.merged) == edit(expected)


def test_zone_order_is_merged_by_position():
    """A zone inserted in the middle stays there, and a zone appended stays last."""
    local = edit(add_zone(Z3, at=1))
    remote = edit(add_zone({"id": "z4"}))
    merged = parse(Kind.JSON, merge(Kind.JSON, js(BASE), js(local), js(remote)).merged)
    assert [z["id"] for z in merged["zones"]] == ["z1", "z3", "z2", "z4"]


def test_new_keys_follow_base_keys_in_sorted_order():
    """Base keys keep base order; new keys follow sorted, whichever side is local."""
    local = js(edit(set_path("zeta", 1)))
    remote = js(edit(set_path("alpha", 2)))
    for a, b in ((local, remote), (remote, local)):
        merged = parse(Kind.JSON, merge(Kind.JSON, js(BASE), a, b).merged)
        assert list(merged) == [*BASE, "alpha", "zeta"]


@pytest.mark.parametrize(
    ("rules", "newer", "expected_date", "settled"),
    [
        ({"meta.updated_at": "newest"}, "remote", "R", ("meta.updated_at",)),
        ({"meta.updated_at": "newest"}, "local", "L", ("meta.updated_at",)),
        ({"meta": "local"}, None, "L", ("meta.updated_at",)),
        ({"**.updated_at": "remote"}, None, "R", ("meta.updated_at",)),
        ({"meta.updated_at": "newest"}, None, None, ()),
        ({"title": "local"}, None, None, ()),
    ],
    ids=["newest-remote", "newest-local", "ancestor", "globstar", "newest-unknown", "other-field"],
)
def test_rules_settle_collisions(rules, newer, expected_date, settled):
    """A rule on the path or an ancestor settles a collision there; nothing else changes."""
    local = edit(both(set_path("meta", "updated_at", "L"), ZONE_TEXT))
    remote = edit(both(set_path("meta", "updated_at", "R"), Z2_TEXT))
    result = merge(Kind.JSON, js(BASE), js(local), js(remote), rules=rules, newer=newer)
    assert result.settled == settled
    if expected_date is None:
        assert result.merged is None and result.conflicts == ("meta.updated_at",)
        return
    merged = parse(Kind.JSON, result.merged)
    assert merged == edit(both(set_path("meta", "updated_at", expected_date), ZONE_TEXT, Z2_TEXT))


def test_rule_never_lets_a_deletion_beat_an_edit():
    """Even with a rule, a zone deleted on one side and edited on the other is a conflict."""
    result = merge(
        Kind.JSON,
        js(BASE),
        js(edit(del_zone("z1"))),
        js(edit(ZONE_TEXT)),
        rules={"zones": "remote"},
    )
    assert result.merged is None and result.conflicts == ("zones[id=z1]",)


@pytest.mark.parametrize(
    ("base", "local", "remote", "expected"),
    [
        (["a", "b"], ["a", "b", "c"], ["b"], ["b", "c"]),
        (["a", "b"], ["a", "b", "c"], ["a", "b", "d"], ["a", "b", "c", "d"]),
        (["a", "b"], ["b", "a", "x"], ["a"], ["a", "x"]),
        ([], ["x"], ["x", "y"], ["x", "y"]),
        (["a", "a", "b"], ["a", "b", "c"], ["b"], ["b", "c"]),
    ],
    ids=["removed-stays-removed", "both-add", "reorder-and-remove", "from-empty", "duplicates"],
)
def test_union_rule_is_a_three_way_set_merge(base, local, remote, expected):
    """With `union`, removed on one side stays removed and added on either side is added."""
    docs = [js({"tags": tags, "n": i}) for i, tags in enumerate((base, local, remote))]
    docs[1] = js({"tags": local, "n": 1})
    docs[2] = js({"tags": remote, "n": 0})  # n: one-sided, so the whole doc is a real merge
    result = merge(Kind.JSON, *docs, rules={"tags": "union"})
    assert parse(Kind.JSON, result.merged)["tags"] == expected
    swapped = merge(Kind.JSON, docs[0], docs[2], docs[1], rules={"tags": "union"})
    assert swapped.merged == result.merged


def test_one_side_unchanged_returns_the_other_bytes_exactly():
    """Where one side equals the base, the other side's bytes come back untouched."""
    base = js(BASE)
    odd = b'{"id":"doc-7",   "title": "x"}'  # odd formatting, not even the same document
    assert merge(Kind.JSON, base, base, odd).merged == odd
    assert merge(Kind.JSON, base, odd, base).merged == odd
    garbage = b'{"truncated":'
    assert merge(Kind.JSON, base, base, garbage).merged == garbage


def test_result_equal_to_one_side_is_that_sides_bytes():
    """A merge whose value equals one side's value returns that side's bytes, not a re-dump."""
    local = json.dumps(edit(both(ZONE_TEXT, Z2_TEXT)), indent=4).encode()
    remote = js(edit(Z2_TEXT))
    assert merge(Kind.JSON, js(BASE), local, remote).merged == local


def test_formatting_comes_from_the_base():
    """A real two-sided merge is written in the base's style (here: tabs, no final newline)."""
    base = json.dumps(BASE, indent="\t").encode()
    local = js(edit(ZONE_TEXT))
    remote = json.dumps(edit(Z2_TEXT)).encode()
    merged = merge(Kind.JSON, base, local, remote).merged
    assert merged == json.dumps(edit(both(ZONE_TEXT, Z2_TEXT)), indent="\t").encode()


def test_touched_lists_what_changes_in_the_local_file():
    """touched names the field paths where the merged value differs from local."""
    result = merge(Kind.JSON, js(BASE), js(edit(ZONE_TEXT)), js(edit(both(Z2_TEXT, add_zone(Z3)))))
    assert result.touched == ("zones[id=z2].text", "zones[id=z3]")
    unchanged = merge(Kind.JSON, js(BASE), js(BASE), js(edit(Z2_TEXT)))
    assert unchanged.touched == ("zones[id=z2].text",)


@pytest.mark.parametrize(
    ("side", "bad", "reason"),
    [
        ("local", b'{"a": 1, "a": 2}', "local does not parse as JSON: duplicate key 'a'"),
        ("remote", b'{"a": NaN}', "remote does not parse as JSON: NaN is not a JSON number"),
        ("local", b"\xef\xbb\xbf{", "local does not parse as JSON"),
        ("remote", b"[" * 5000, "remote does not parse as JSON: nested too deeply"),
        ("base", b"{", "base does not parse as JSON"),
    ],
)
def test_unparseable_side_gives_a_reason_not_a_merge(side, bad, reason):
    """A side that does not parse yields merged=None and a reason (the caller keeps both)."""
    docs = {"base": js(BASE), "local": js(edit(ZONE_TEXT)), "remote": js(edit(Z2_TEXT))}
    docs[side] = bad
    result = merge(Kind.JSON, docs["base"], docs["local"], docs["remote"])
    assert result.merged is None
    assert result.reason.startswith(reason)


@pytest.mark.parametrize(
    ("local", "remote", "merged", "conflicts"),
    [
        ({"a": 1}, {"a": 1}, {"a": 1}, ()),
        ({"a": 1}, {"b": 2}, {"a": 1, "b": 2}, ()),
        ({"m": {"x": 1}}, {"m": {"y": 2}}, {"m": {"x": 1, "y": 2}}, ()),
        ({"a": 1}, {"a": 2}, None, ("a",)),
        ([1], [2], None, ("$",)),
    ],
    ids=["identical", "disjoint", "nested-disjoint", "collide", "not-mappings"],
)
def test_no_base_merges_only_disjoint_mappings(local, remote, merged, conflicts):
    """Created on both sides: merged as if the base were {} when no key collides."""
    result = merge(Kind.JSON, None, js(local), js(remote))
    assert result.conflicts == conflicts
    assert (None if result.merged is None else parse(Kind.JSON, result.merged)) == merged


@pytest.mark.parametrize(
    ("base", "local", "remote", "merged", "conflicts"),
    [
        (b"a\nb\nc\n", b"A\nb\nc\n", b"a\nb\nC\n", b"A\nb\nC\n", ()),
        (b"a\nb\nc\n", b"a\nB\nc\n", b"a\nX\nc\n", None, ("line 2",)),
        (b"a\nb\nc\nd\n", b"a\nB\nC\nd\n", b"a\nX\nY\nd\n", None, ("lines 2-3",)),
        (b"a\nb\n", b"a\nx\nb\n", b"a\ny\nb\n", None, ("after line 1",)),
        (b"a\nb\n", b"a\nB\n", b"a\nB\n", b"a\nB\n", ()),
        (b"a\r\nb\r\nc\r\n", b"A\r\nb\r\nc\r\n", b"a\r\nb\r\nC\r\n", b"A\r\nb\r\nC\r\n", ()),
        (b"a\nb\n", b"A\nb\n", b"a\nB\n", None, ("lines 1-2",)),
        (b"a\nb", b"a\nb\nc", b"z\na\nb", b"z\na\nb\nc", ()),
    ],
    ids=[
        "disjoint",
        "one-line",
        "range",
        "same-spot-insert",
        "identical",
        "crlf",
        "adjacent",
        "no-eol",
    ],
)
def test_text_merges_by_lines(base, local, remote, merged, conflicts):
    """Text merges line by line; overlapping edits are conflicts named by base line range."""
    result = merge(Kind.TEXT, base, local, remote)
    assert (result.merged, result.conflicts) == (merged, conflicts)


def test_text_and_binary_special_cases():
    """Undecodable text gives a reason; binary never merges; no base means a conflict."""
    assert merge(Kind.TEXT, b"a\n", b"\xff\n", b"b\n").reason == "local is not UTF-8 text"
    assert merge(Kind.TEXT, None, b"a\n", b"b\n").conflicts == ("$",)
    assert merge(Kind.BINARY, b"\0", b"\1", b"\2") == MergeResult(
        None, ("$",), reason="binary documents are never merged"
    )
    assert merge(Kind.BINARY, b"\0", b"\0", b"\2").merged == b"\2"
    assert merge(Kind.BINARY, None, b"\2", b"\2").merged == b"\2"


def test_yaml_merge_keeps_comments():
    """A two-sided YAML merge is the base edited in place: comments survive."""
    base = b"# doc\ntitle: Invoice  # the title\nzones:\n  - id: z1  # first\n    text: A\n"
    base += b"  - id: z2\n    text: B\n"
    local = base.replace(b"text: A", b"text: AA")
    remote = base.replace(b"text: B", b"text: BB").replace(b"Invoice", b"Bill")
    merged = merge(Kind.YAML, base, local, remote).merged
    for comment in (b"# doc\n", b"# the title\n", b"# first\n"):
        assert comment in merged
    assert parse(Kind.YAML, merged) == {
        "title": "Bill",
        "zones": [{"id": "z1", "text": "AA"}, {"id": "z2", "text": "BB"}],
    }


def test_toml_merge_keeps_comments():
    """A two-sided TOML merge is the base edited in place: comments survive."""
    base = b'# doc\ntitle = "x"  # t\n\n[[zones]]\nid = "z1"\ntext = "A"  # first\n\n'
    base += b'[[zones]]\nid = "z2"\ntext = "B"\n'
    local = base.replace(b'"A"', b'"AA"')
    remote = base.replace(b'"B"', b'"BB"')
    merged = merge(Kind.TOML, base, local, remote).merged
    assert merged == base.replace(b'"A"', b'"AA"').replace(b'"B"', b'"BB"')


def test_bad_arguments_are_usage_errors():
    """An unknown rule strategy or `newer` value is a UsageError, not a silent default."""
    with pytest.raises(UsageError):
        merge(Kind.JSON, b"{}", b"{}", b"{}", rules={"a": "oldest"})
    with pytest.raises(UsageError):
        merge(Kind.JSON, b"{}", b"{}", b"{}", newer="server")


@pytest.mark.parametrize(
    ("base", "a", "b", "expected"),
    [
        ("abc", "abc", "abc", "abc"),
        ("abc", "xabc", "abcy", "xabcy"),
        ("abc", "cab", "abc", "cab"),
        ("ac", "abc", "adc", "abdc"),
        ("ac", "adc", "abc", "abdc"),
    ],
)
def test_merge_order(base, a, b, expected):
    """Orders merge by position; same-spot inserts are ordered the same whichever side is a."""
    assert "".join(merge_order(list(base), list(a), list(b))) == expected


def test_union_on_a_list_of_id_items_still_matches_items_by_id():
    """`union` on a list whose items carry ids never yields two items with one id: a clash is a conflict."""
    def doc(z1, z2):
        return js({"zones": [{"id": "z1", "t": z1}, {"id": "z2", "t": z2}]})

    base = doc("a", "x")
    clash = merge(Kind.JSON, base, doc("b", "x"), doc("c", "x"), rules={"zones": "union"})
    assert clash.merged is None and clash.conflicts == ("zones[id=z1].t",)
    apart = merge(Kind.JSON, base, doc("b", "x"), doc("a", "y"), rules={"zones": "union"})
    assert apart.merged == merge(Kind.JSON, base, doc("b", "x"), doc("a", "y")).merged
