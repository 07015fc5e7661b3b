"""Pure conflict logic: strategies on bytes, conflict-copy names, and the .syncrules parser."""

from __future__ import annotations

import pytest

from syncengine.conflicts import copy_name, involved, resolve_content, split_name, zone_event
from syncengine.errors import UsageError
from syncengine.models import Kind
from syncengine.rules import load, parse

BASE = b'{\n  "title": "t",\n  "n": 1,\n  "tags": ["a"]\n}\n'
LOCAL = b'{\n  "title": "L",\n  "n": 1,\n  "tags": ["a"]\n}\n'
REMOTE = b'{\n  "title": "R",\n  "n": 1,\n  "tags": ["a"]\n}\n'
DISJOINT = b'{\n  "title": "t",\n  "n": 2,\n  "tags": ["a"]\n}\n'


# ---------------------------------------------------------------- strategies

@pytest.mark.parametrize(("strategy", "newer", "resolution", "data", "copy", "loser"), [
    ("merge", False, "keep-both", REMOTE, True, None),
    ("keep-both", False, "keep-both", REMOTE, True, None),
    ("local", False, "local", None, False, "remote"),
    ("remote", False, "remote", REMOTE, False, "local"),
    ("newest", True, "local", None, False, "remote"),
    ("newest", False, "remote", REMOTE, False, "local"),
    ("manual", False, "manual", None, False, None),
])
def test_strategy_outcomes_on_a_colliding_field(strategy, newer, resolution, data, copy, loser):
    """Each strategy settles the same collision as DESIGN §5 says."""
    out = resolve_content(strategy, Kind.JSON, BASE, LOCAL, REMOTE, local_is_newer=newer)
    assert (out.resolution, out.data, out.copy, out.loser, out.open) == (
        resolution, data, copy, loser, strategy == "manual")
    if strategy == "manual":
        assert out.details == ("title",)


def test_merge_combines_disjoint_fields_and_reports_touched():
    """merge writes both sides' fields and lists what changed in the local file."""
    out = resolve_content("merge", Kind.JSON, BASE, LOCAL, DISJOINT)
    assert out.resolution == "merged" and b'"L"' in out.data and b'"n": 2' in out.data
    assert out.touched == ("n",) and not out.copy


def test_field_rules_settle_a_collision_with_newest():
    """A newest field rule takes the newer side's value instead of keeping both."""
    out = resolve_content("merge", Kind.JSON, BASE, LOCAL, REMOTE, field_rules={"title": "newest"},
                          local_is_newer=True)
    assert out.resolution == "merged" and out.data == LOCAL and out.details == ("title",)


@pytest.mark.parametrize("kind", [Kind.BINARY, Kind.TEXT])
def test_unmergeable_content_keeps_both(kind):
    """Binary, and text with no base, fall back to keep-both under merge."""
    out = resolve_content("merge", kind, None, b"\x00local", b"\x00remote")
    assert out.resolution == "keep-both" and out.copy and out.data == b"\x00remote"


def test_unparsable_side_keeps_both_with_a_reason():
    """A side that does not parse is kept as a copy, with why."""
    out = resolve_content("merge", Kind.JSON, BASE, b"{broken", REMOTE)
    assert out.resolution == "keep-both" and out.copy and "does not parse" in out.note


def test_involved_lists_both_sides_fields_when_nothing_collides():
    """For a manual conflict that would merge, every field either side changed is involved."""
    assert involved(Kind.JSON, BASE, LOCAL, DISJOINT) == ("title", "n")
    assert involved(Kind.BINARY, None, b"a", b"b") == ("$",)


def test_zone_event_shape():
    """A zones payload has exactly path, doc_id, fields and origin; origins are checked."""
    assert zone_event("a.json", "d1", ("x",), "merge") == {"path": "a.json", "doc_id": "d1", "fields": ["x"],
                                                           "origin": "merge"}
    with pytest.raises(ValueError):
        zone_event("a.json", "d1", (), "elsewhere")


# ---------------------------------------------------------------- conflict copies

@pytest.mark.parametrize(("path", "expected"), [
    ("doc.json", "doc.conflict-0123abcd-20240102-030405-deadbeef.json"),
    ("a/b.tar.gz", "a/b.conflict-0123abcd-20240102-030405-deadbeef.tar.gz"),
    (".syncrules", ".syncrules.conflict-0123abcd-20240102-030405-deadbeef"),
    ("README", "README.conflict-0123abcd-20240102-030405-deadbeef"),
])
def test_copy_name_is_a_pure_function_of_the_losing_version(path, expected):
    """The copy name comes from the loser's client, journal time and hash only, so reruns agree."""
    at = 1704164645_000_000_000  # 2024-01-02T03:04:05Z
    assert copy_name(path, "0123abcd" + "f" * 24, at, "deadbeef" + "0" * 56) == expected
    assert copy_name(path, "0123abcd" + "f" * 24, at + 999, "deadbeef" + "0" * 56) == expected


def test_split_name():
    """Extensions start at the first dot after a leading one."""
    assert split_name("a.tar.gz") == ("a", ".tar.gz") and split_name(".env.local") == (".env", ".local")


# ---------------------------------------------------------------- .syncrules

EXAMPLE = '''
strategy = "merge"

[[rule]]
path = "notes/**"
strategy = "keep-both"

[[rule]]
kind = "both-created"
strategy = "local"

[[rule]]
path = ["*.json", "*.yaml"]
[rule.fields]
meta.updated_at = "newest"
tags = "union"
"zones[*].text" = "remote"
'''


def test_rules_first_match_by_path_and_kind():
    """The first rule matching the path and kind wins; others fall back to the file's default."""
    rules = parse(EXAMPLE)
    assert rules.for_path("notes/a/b.json", "both-modified") == ("keep-both", None)
    assert rules.for_path("x.json", "both-created") == ("local", None)
    fields = {"meta.updated_at": "newest", "tags": "union", "zones[*].text": "remote"}
    assert rules.for_path("deep/x.json", "both-modified") == ("merge", fields)
    assert rules.for_path("x.md", "both-modified") == ("merge", None)


def test_rules_load_without_a_file_is_none(tmp_path):
    """No .syncrules means no rules (the config default applies)."""
    assert load(tmp_path) is None
    (tmp_path / ".syncrules").write_text(EXAMPLE)
    assert load(tmp_path).default == "merge"


@pytest.mark.parametrize(("text", "says"), [
    ("strategy = ", "not valid TOML"),
    ('strategy = "newset"', "unknown strategy 'newset'"),
    ('colour = "red"', "unknown key 'colour'"),
    ('[[rule]]\npath = "*.md"\nstrategy = "local"\nwhen = 1', "rule 1: unknown key 'when'"),
    ('[[rule]]\npath = "*.md"', "rule 1: says neither a strategy nor fields"),
    ('[[rule]]\npath = 3\nstrategy = "local"', "rule 1: path must be a string"),
    ('[[rule]]\npath = "!*.md"\nstrategy = "local"', "is not a glob"),
    ('[[rule]]\nkind = "modified-deleted"\nstrategy = "local"', "a modification always survives"),
    ('[[rule]]\nkind = "both-edited"\nstrategy = "local"', "unknown conflict kind 'both-edited'"),
    ('[[rule]]\nstrategy = "local"\nfields = { tags = "union" }', "fields apply only to the merge strategy"),
    ('[[rule]]\nfields = { tags = "unite" }', "unknown field strategy 'unite'"),
    ('[[rule]]\nfields = 3', "fields must be a table"),
    ('rule = 3', "array of tables"),
])
def test_bad_syncrules_is_one_clear_usage_error(text, says):
    """Every mistake in .syncrules is a UsageError (exit 2) whose one line says what is wrong."""
    with pytest.raises(UsageError) as info:
        parse(text)
    line = info.value.one_line()
    assert says in line and ".syncrules" in line and "\n" not in line
    assert info.value.exit_code == 2


def test_involved_names_the_lines_either_side_changed_in_text():
    """For text that would merge, the involved lines are the base ranges either side changed, not '$'."""
    base = b"one\ntwo\nthree\nfour\n"
    assert involved(Kind.TEXT, base, b"ONE\ntwo\nthree\nfour\n", b"one\ntwo\nthree\nFOUR\n") == ("line 1", "line 4")
    assert involved(Kind.TEXT, base, b"one\nTWO\nTHREE\nfour\n", base + b"five\n") == ("lines 2-3", "after line 4")


def test_a_rule_with_fields_and_no_strategy_merges_whatever_the_default():
    """Field rules mean something only to merge: a rule with fields and no strategy merges, whatever the default."""
    rules = parse('strategy = "keep-both"\n\n[[rule]]\npath = "*.json"\nfields = { tags = "union" }\n')
    assert rules.for_path("a.json", "both-modified") == ("merge", {"tags": "union"})
    assert rules.for_path("a.md", "both-modified") == ("keep-both", None)
