"""documents.py: kinds, strict parsing, style-preserving serialisation, diffs."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from syncengine.documents import (
    changed_zones,
    describe_diff,
    field_changes,
    kind_for,
    parse,
    serialize,
    unified_diff,
)
from syncengine.errors import MalformedDocument
from syncengine.fieldpaths import rule_for
from syncengine.models import FieldChange, Kind

BOM = b"\xef\xbb\xbf"
DOC = {
    "id": "doc-7",
    "title": "Invoice",
    "meta": {"updated_at": "2026-01-02", "tags": ["a", "b"]},
    "zones": [
        {"id": "z1", "page": 1, "bbox": [10, 20, 200, 80], "label": "header", "text": "ACME"},
        {"id": "z2", "page": 1, "bbox": [10, 100, 200, 300], "label": "table", "text": "..."},
    ],
}


def js(value, **kw) -> bytes:
    return (json.dumps(value, indent=kw.pop("indent", 2), **kw) + "\n").encode()


# ------------------------------------------------------------------ kind_for


@pytest.mark.parametrize(
    ("path", "head", "kind"),
    [
        ("a.json", None, Kind.JSON),
        ("A.JSON", b"\0\0", Kind.JSON),
        ("a.yaml", None, Kind.YAML),
        ("dir/a.yml", None, Kind.YAML),
        ("a.toml", None, Kind.TOML),
        ("notes.md", None, Kind.TEXT),
        ("notes.md", b"# hi\n", Kind.TEXT),
        ("notes.md", b"\x89PNG\r\n\x1a\n\0\0", Kind.BINARY),
        ("data.csv", "é,ü\n".encode(), Kind.TEXT),
        ("photo.png", b"plain text", Kind.BINARY),
        ("archive.tar.gz", None, Kind.BINARY),
        ("Makefile", b"all:\n\techo hi\n", Kind.TEXT),
        ("Makefile", None, Kind.BINARY),
        ("blob.xyz", b"\xff\xfe\x00a", Kind.BINARY),
        ("cut.txt", "aé".encode()[:2], Kind.TEXT),
        ("big.unknown", b"a" * 9000 + b"\0", Kind.TEXT),
    ],
)
def test_kind_for(path, head, kind):
    """The kind comes from the extension, else from whether the head is UTF-8 without NUL."""
    assert kind_for(path, head) is kind


# ------------------------------------------------------------------ parse


@pytest.mark.parametrize(
    ("kind", "data", "value"),
    [
        (Kind.JSON, b'{"a": 1, "b": [true, null, 1.5]}', {"a": 1, "b": [True, None, 1.5]}),
        (Kind.JSON, BOM + b'{"a": 1}', {"a": 1}),
        (Kind.JSON, b"[]", []),
        (Kind.JSON, b'"\\u00e9"', "é"),
        (Kind.YAML, b"a: 1\nb: [x, y]\n", {"a": 1, "b": ["x", "y"]}),
        (Kind.YAML, BOM + b"a: 1\n", {"a": 1}),
        (Kind.YAML, b"base: &b {x: 1}\nc:\n  <<: *b\n", {"base": {"x": 1}, "c": {"x": 1}}),
        (Kind.TOML, b'a = 1\n[t]\nb = "x"\n', {"a": 1, "t": {"b": "x"}}),
        (Kind.TEXT, "héllo\n".encode(), "héllo\n"),
        (Kind.TEXT, BOM + b"x", "\ufeffx"),
    ],
)
def test_parse_accepts(kind, data, value):
    """Well-formed documents parse to plain values; a BOM is noise in data, content in text."""
    assert parse(kind, data) == value


HOSTILE = [
    (Kind.JSON, b'{"a": 1, "a": 2}', "duplicate key"),
    (Kind.JSON, b'{"a": {"b": 1, "b": 1}}', "duplicate key"),
    (Kind.JSON, b'{"a": NaN}', "NaN"),
    (Kind.JSON, b"[Infinity]", "Infinity"),
    (Kind.JSON, b"[-Infinity]", "Infinity"),
    (Kind.JSON, b"[1e999]", "overflows"),
    (Kind.JSON, b"[" * 10_000 + b"]" * 10_000, "nested"),
    (Kind.JSON, b'{"a":' * 150 + b"1" + b"}" * 150, "nested deeper"),
    (Kind.JSON, b"[" + b"9" * 1_000_000 + b"]", "too many digits"),
    (Kind.JSON, b'{"a": 1} trailing', "Extra data"),
    (Kind.JSON, b'{"a": [1, 2', "Expecting"),
    (Kind.JSON, b"", "Expecting value"),
    (Kind.JSON, b"\xff\xfe{\x00}\x00", "not UTF-8"),
    (Kind.JSON, b'{"a": "\xe9"}', "not UTF-8"),
    (Kind.YAML, b"a: 1\na: 2\n", "duplicate key"),
    (Kind.YAML, b"a: .nan\n", "NaN"),
    (Kind.YAML, b"a: [1, 2\n", "YAML"),
    (Kind.YAML, b"a: 1\n---\nb: 2\n", "document"),
    (Kind.YAML, b"a: " + b"[" * 5000, "nested"),
    (Kind.YAML, b"a: " + b"9" * 100_000 + b"\n", "too many digits"),
    (Kind.TOML, b"a = 1\na = 2\n", "already exists"),
    (Kind.TOML, b"a = inf\n", "Infinity"),
    (Kind.TOML, b"a = [", "TOML"),
    (Kind.TEXT, b"caf\xe9", "not UTF-8"),
    (Kind.BINARY, b"anything", "binary"),
]


@pytest.mark.parametrize(("kind", "data", "message"), HOSTILE)
def test_parse_rejects_hostile_input(kind, data, message):
    """Anything that does not parse, or that a merge could misread, is MalformedDocument."""
    with pytest.raises(MalformedDocument) as info:
        parse(kind, data)
    assert message in info.value.message
    assert "\n" not in info.value.message


def test_parse_rejects_a_yaml_alias_bomb_quickly():
    """A billion-laughs YAML is refused by counting shared nodes once, not by expanding them."""
    lines = ['a: &a ["x","x","x","x","x","x","x","x","x"]']
    for prev, name in zip("abcdefgh", "bcdefghi", strict=True):
        lines.append(f"{name}: &{name} [" + ",".join([f"*{prev}"] * 9) + "]")
    with pytest.raises(MalformedDocument, match="aliases"):
        parse(Kind.YAML, "\n".join(lines).encode())


# ------------------------------------------------------------------ serialize


@pytest.mark.parametrize(
    "like",
    [
        js(DOC),
        js(DOC, indent=4),
        js(DOC, indent="\t"),
        json.dumps(DOC).encode(),
        json.dumps(DOC, separators=(",", ":")).encode(),
        js(DOC).replace(b"\n", b"\r\n"),
        BOM + js(DOC),
        json.dumps(DOC, indent=2).encode(),
    ],
    ids=["indent2", "indent4", "tabs", "compact", "minified", "crlf", "bom", "no-newline"],
)
def test_serialize_json_round_trips_the_style_of_like(like):
    """Re-serialising a parsed JSON document in its own style gives its bytes back."""
    assert serialize(Kind.JSON, parse(Kind.JSON, like), like=like) == like


@pytest.mark.parametrize(
    ("like", "expected"),
    [
        (b'{"a": "\\u00e9"}', b'{"a": "\\u00fc"}'),
        ('{"a": "é"}'.encode(), '{"a": "ü"}'.encode()),
        (b'{"a": "x"}', '{"a": "ü"}'.encode()),
        (None, '{\n  "a": "ü"\n}\n'.encode()),
    ],
)
def test_serialize_json_escapes_non_ascii_only_where_like_did(like, expected):
    """ensure_ascii follows like; without evidence (or without like) output is UTF-8."""
    assert serialize(Kind.JSON, {"a": "ü"}, like=like) == expected


def test_serialize_json_keeps_value_key_order_and_is_deterministic():
    """Keys come out in the value's order, and the same inputs give the same bytes."""
    value = {"z": 1, "a": {"y": 2, "b": 3}}
    first = serialize(Kind.JSON, value, like=js(DOC))
    assert first == serialize(Kind.JSON, dict(value), like=js(DOC))
    assert first.index(b'"z"') < first.index(b'"a"')


def prettier(value, depth: int = 0, unit: str = "  ", pad: str = "") -> str:
    """A Prettier-like layout: arrays of scalars on one line, everything else spread over lines."""
    if isinstance(value, list) and value and not any(isinstance(v, (list, dict)) for v in value):
        return "[" + pad + ", ".join(json.dumps(v, ensure_ascii=False) for v in value) + pad + "]"
    if isinstance(value, list) and value:
        inner = "\n" + unit * (depth + 1)
        return "[" + inner + ("," + inner).join(prettier(v, depth + 1, unit, pad) for v in value) + "\n" \
            + unit * depth + "]"
    if isinstance(value, dict) and value:
        inner = "\n" + unit * (depth + 1)
        return "{" + inner + ("," + inner).join(
            json.dumps(k, ensure_ascii=False) + ": " + prettier(v, depth + 1, unit, pad) for k, v in value.items()
        ) + "\n" + unit * depth + "}"
    return json.dumps(value, ensure_ascii=False)


PRETTY = (prettier(DOC) + "\n").encode()


@pytest.mark.parametrize("pad", ["", " "])
@pytest.mark.parametrize("unit", ["  ", "    ", "\t"])
def test_serialize_json_keeps_arrays_written_on_one_line(unit, pad):
    """An indented document with some arrays on one line (Prettier's, a hand's) is written back as it was."""
    like = (prettier(DOC, unit=unit, pad=pad) + "\n").encode()
    assert serialize(Kind.JSON, parse(Kind.JSON, like), like=like) == like


def test_serialize_json_merge_of_one_field_rewrites_one_line():
    """A changed field moves its own line only; a new zone is laid out as its siblings are."""
    value = parse(Kind.JSON, PRETTY)
    value["zones"][1]["label"] = "totals"
    value["zones"].append({"id": "z3", "page": 2, "bbox": [1, 2, 3, 4], "label": "footer", "text": "end"})
    out = serialize(Kind.JSON, value, like=PRETTY).decode()
    old_lines, new_lines = PRETTY.decode().splitlines(), out.splitlines()
    assert [line for line in old_lines if line not in new_lines] == ['      "label": "table",']
    assert '      "bbox": [1, 2, 3, 4],' in new_lines
    assert parse(Kind.JSON, out.encode()) == value


def test_serialize_json_keeps_objects_written_on_one_line():
    """An object on one line (`{ "a": 1 }`) stays on one line, with its padding and separators."""
    like = b'{\n  "meta": { "pages": 1, "tags": ["a"] },\n  "list": [\n    1\n  ]\n}\n'
    value = parse(Kind.JSON, like)
    value["meta"]["pages"] = 2
    assert serialize(Kind.JSON, value, like=like) == like.replace(b'"pages": 1', b'"pages": 2')


@pytest.mark.parametrize("like", [b'{\n  "a": [1, 2\n', b'{\n  "a": [1, 2]]\n}', b'{\n  "a": ["x\\"]\n}'])
def test_serialize_json_unreadable_layout_falls_back_to_spread(like):
    """A like whose layout cannot be followed gives json.dumps's layout, never a wrong value."""
    value = {"a": [1, 2], "b": {"c": [3]}}
    out = serialize(Kind.JSON, value, like=like)
    assert parse(Kind.JSON, out) == value


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4),
    max_leaves=25,
)


@settings(max_examples=200, deadline=None)
@given(base=JSON_VALUES, value=JSON_VALUES)
def test_serialize_json_in_any_layout_round_trips(base, value):
    """Whatever the layout of like, the bytes written parse back to the value, and like's own value gives like."""
    like = (prettier({"doc": base}) + "\n").encode()
    assert serialize(Kind.JSON, parse(Kind.JSON, like), like=like) == like
    assert parse(Kind.JSON, serialize(Kind.JSON, {"doc": value}, like=like)) == {"doc": value}


def test_serialize_json_escapes_lone_surrogates():
    """A lone surrogate (legal as a JSON escape) is written escaped, never as invalid UTF-8."""
    value = parse(Kind.JSON, b'["\\ud800", "\xc3\xa9"]')
    data = serialize(Kind.JSON, value, like=b'["x"]')
    assert parse(Kind.JSON, data) == value


YAML_BASE = b"""# the invoice
id: doc-7   # never changes
title: Invoice
meta:
  updated_at: 2026-01-02
  tags: [a, b]
zones:
  - id: z1   # header zone
    text: ACME
  - id: z2
    text: |
      line one
      line two
"""


def test_serialize_yaml_edits_like_in_place_keeping_comments():
    """Changed YAML fields are rewritten; comments, flow style and block scalars survive."""
    value = parse(Kind.YAML, YAML_BASE)
    value["title"] = "Invoice 2"
    value["zones"][1]["text"] = "line one\nline 2\n"
    value["zones"].insert(1, {"id": "z9", "text": "new"})
    out = serialize(Kind.YAML, value, like=YAML_BASE).decode()
    for kept in ("# the invoice", "# never changes", "# header zone", "tags: [a, b]", "text: |"):
        assert kept in out
    assert parse(Kind.YAML, out.encode()) == value
    assert out.index("z1") < out.index("z9") < out.index("z2")


def test_serialize_yaml_unchanged_value_gives_like_back():
    """Serialising the parsed value of a YAML document in its own style is the identity."""
    assert serialize(Kind.YAML, parse(Kind.YAML, YAML_BASE), like=YAML_BASE) == YAML_BASE


TOML_BASE = b"""# settings
title = "x" # inline comment

[meta]
tags = ["a", "b"]

[[zones]]
id = "z1"
text = "A"  # zone comment

[[zones]]
id = "z2"
text = "B"
"""


def test_serialize_toml_edits_like_in_place_keeping_comments():
    """Changed TOML fields are rewritten through tomlkit; comments and tables survive."""
    value = parse(Kind.TOML, TOML_BASE)
    value["zones"][1]["text"] = "BB"
    value["zones"].append({"id": "z3", "text": "C"})
    del value["zones"][0]
    value["meta"]["n"] = 1
    out = serialize(Kind.TOML, value, like=TOML_BASE)
    assert b"# settings" in out and b"# inline comment" in out
    assert parse(Kind.TOML, out) == value
    assert serialize(Kind.TOML, parse(Kind.TOML, TOML_BASE), like=TOML_BASE) == TOML_BASE


def test_serialize_toml_refuses_what_toml_cannot_hold():
    """A value TOML cannot represent is MalformedDocument, not a half-written file."""
    with pytest.raises(MalformedDocument):
        serialize(Kind.TOML, ["not", "a", "table"])


# ------------------------------------------------------------------ diffs


def test_field_changes_matches_zones_by_id():
    """Editing one zone and inserting another reports exactly those, by id, in document order."""
    new = json.loads(json.dumps(DOC))
    new["zones"][1]["text"] = "TOTAL"
    new["zones"].insert(0, {"id": "z0", "text": "new"})
    new["meta"]["updated_at"] = "2026-01-03"
    del new["title"]
    assert field_changes(Kind.JSON, js(DOC), js(new)) == [
        FieldChange("title", "removed", "Invoice", None),
        FieldChange("meta.updated_at", "changed", "2026-01-02", "2026-01-03"),
        FieldChange("zones[id=z0]", "added", None, {"id": "z0", "text": "new"}),
        FieldChange("zones[id=z2].text", "changed", "...", "TOTAL"),
    ]


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ({"a": 1}, {"a": 1.0}, [FieldChange("a", "changed", 1, 1.0)]),
        ({"a": 1}, {"a": True}, [FieldChange("a", "changed", 1, True)]),
        ({"a": [1, 2]}, {"a": [1, 3]}, [FieldChange("a[1]", "changed", 2, 3)]),
        ({"a.b": 1}, {"a.b": 2}, [FieldChange('["a.b"]', "changed", 1, 2)]),
        ({"a": 1}, [1], [FieldChange("$", "changed", {"a": 1}, [1])]),
        ({"b": 1, "a": 2}, {"a": 2, "b": 1}, []),
        (
            {"z": [{"id": 1}, {"id": 2}]},
            {"z": [{"id": 2}, {"id": 1}]},
            [FieldChange("z", "changed", [1, 2], [2, 1])],
        ),
    ],
    ids=["int-float", "int-bool", "plain-list", "dotted-key", "root", "key-order", "reorder"],
)
def test_field_changes_table(old, new, expected):
    """Types count, key order does not, and id'd list order changes are one entry."""
    assert field_changes(Kind.JSON, js(old), js(new)) == expected


def test_field_changes_yaml_dates_are_json_ready():
    """Dates in YAML changes come out as ISO text, so --json can print them."""
    changes = field_changes(Kind.YAML, b"d: 2026-01-02\n", b"d: 2026-01-03\n")
    assert changes == [FieldChange("d", "changed", "2026-01-02", "2026-01-03")]


def test_unified_diff_git_style():
    """A text diff names both files and marks a missing final newline."""
    out = unified_diff(b"a\nb\n", b"a\nc", "a/x.md", "b/x.md")
    assert out.startswith("--- a/x.md\n+++ b/x.md\n")
    assert "-b\n+c\n\\ No newline at end of file\n" in out
    assert unified_diff(None, b"x\n", "a", "b").startswith("--- /dev/null\n")
    assert "not UTF-8" in unified_diff(b"\xff", b"x", "a", "b")


@pytest.mark.parametrize(
    ("kind", "old", "new", "fields", "has_unified", "note"),
    [
        (Kind.JSON, b'{"a": 1}', b'{"a": 2}', [FieldChange("a", "changed", 1, 2)], False, None),
        (Kind.JSON, b'{"a": 1}', b'{"a": ', [], True, "does not parse as JSON: compared as text"),
        (Kind.JSON, None, b'{"a": 1}', [], True, None),
        (Kind.TEXT, b"a\n", b"b\n", [], True, None),
        (Kind.TEXT, b"a\n", b"\xff", [], False, "not UTF-8 text: compared by size and hash"),
        (Kind.BINARY, b"\0", b"\1", [], False, "binary: compared by size and hash"),
    ],
    ids=["fields", "unparseable", "added", "text", "undecodable", "binary"],
)
def test_describe_diff(kind, old, new, fields, has_unified, note):
    """Structured docs give fields; otherwise a unified diff or a note, as documented."""
    got_fields, unified, got_note = describe_diff("x", kind, old, new)
    assert got_fields == fields
    assert (unified is not None) is has_unified
    assert got_note == note


@pytest.mark.parametrize(
    ("kind", "old", "new", "zones"),
    [
        (Kind.JSON, b'{"a": 1, "b": 1}', b'{"a": 2, "b": 1}', ["a"]),
        (Kind.JSON, None, b"{}", ["$"]),
        (Kind.JSON, b"{}", b"{", []),
        (Kind.TEXT, b"a", b"b", []),
    ],
)
def test_changed_zones(kind, old, new, zones):
    """The zones channel gets changed field paths, or nothing when there are no fields."""
    assert changed_zones(kind, old, new) == zones


# ------------------------------------------------------------------ rule patterns


@pytest.mark.parametrize(
    ("pattern", "path", "hit"),
    [
        ("meta.updated_at", "meta.updated_at", True),
        ("meta", "meta.updated_at", True),
        ("meta.updated_at", "meta", False),
        ("zones[*].text", "zones[id=z2].text", True),
        ("zones[*].text", "zones[3].text", True),
        ("zones[id=z2]", "zones[id=z2].text", True),
        ("zones[id=z2]", "zones[id=z3].text", False),
        ("zones.*", "zones[id=z2]", False),
        ("meta.*_at", "meta.updated_at", True),
        ("**.text", "zones[id=z1].text", True),
        ("**.text", "text", True),
        ('["a.b"]', '["a.b"].c', True),
    ],
)
def test_rule_patterns(pattern, path, hit):
    """A rule covers a path when its pattern matches the path or one of its ancestors."""
    assert (rule_for(path, {pattern: "newest"}) == "newest") is hit
