"""Conflicts end to end through the API: zones, .syncrules, newest, fallbacks, history of losers.

Replicas are real workspaces on a real server (tests/conflictkit.py); the
replica that syncs second is the one that resolves.
"""

from __future__ import annotations

import hashlib
import itertools
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conflictkit import Net, copies, jtext, load, write

pytestmark = pytest.mark.integration

ZONES = {"title": "plan", "tags": ["x", "y"], "meta": {"updated_at": "2024-01", "owner": "ann"},
         "zones": [{"id": "z1", "text": "one"}, {"id": "z2", "text": "two"}, {"id": "z3", "text": "three"}]}
KEEP = {"keep.md": "untouched\n"}  # a second file, so no test trips the "delete everything" guard


@pytest.fixture
def net(server, tmp_path):
    net = Net(server, tmp_path)
    yield net
    net.close()


def edited(doc: dict, **changes) -> dict:
    """A deep copy of ``doc`` with dotted-path changes applied (zone ids as ``zones.z2.text``)."""
    out = json.loads(json.dumps(doc))
    for dotted, value in changes.items():
        *parents, last = dotted.split("__")
        target = out
        for key in parents:
            target = next(z for z in target if z["id"] == key) if isinstance(target, list) else target[key]
        target[last] = value
    return out


def zone_events(ws) -> list[dict]:
    return [json.loads(payload) for _id, _at, _ch, payload in ws.events.read(channels=("zones",))]


def test_different_zones_on_three_replicas_all_survive(net):
    """Three people editing three zones of one JSON document all keep their work, with no copy."""
    a, b, c = net.replicas_of({**KEEP, "plan.json": jtext(ZONES)}, 3)
    write(a, "plan.json", edited(ZONES, zones__z1__text="ONE"))
    write(b, "plan.json", edited(ZONES, zones__z2__text="TWO"))
    write(c, "plan.json", edited(ZONES, zones__z3__text="THREE", meta__owner="cy"))
    tree = net.settle(a, b, c)
    assert copies(tree) == {}
    doc = json.loads(tree["plan.json"])
    assert [z["text"] for z in doc["zones"]] == ["ONE", "TWO", "THREE"] and doc["meta"]["owner"] == "cy"


def test_merge_publishes_touched_fields_to_the_zones_channel(net):
    """A merge tells the zones channel which fields of which document it changed here."""
    a, b = net.replicas_of({**KEEP, "plan.json": jtext(ZONES)}, 2)
    write(a, "plan.json", edited(ZONES, zones__z1__text="ONE"))
    write(b, "plan.json", edited(ZONES, title="PLAN"))
    a.sync()
    b.sync()
    (event,) = zone_events(b)
    assert event == {"path": "plan.json", "doc_id": b.journal.doc_by_path("plan.json").doc_id,
                     "fields": ["zones[id=z1].text"], "origin": "merge"}
    entry = b.log("plan.json", limit=1)[0]
    assert entry.origin == "merge" and entry.zones == ("zones[id=z1].text",)


def test_identical_changes_are_no_conflict(net):
    """The same edit, or the same new file, on both sides settles with no conflict and no copy."""
    a, b = net.replicas_of({**KEEP, "plan.json": jtext(ZONES)}, 2)
    for ws in (a, b):
        write(ws, "plan.json", edited(ZONES, title="same"))
        write(ws, "fresh.md", "same bytes\n")
    a.sync()
    report = b.sync()
    assert report.conflicts == () and report.copies == ()
    assert copies(net.settle(a, b)) == {}


def test_the_same_conflict_copy_from_two_replicas_is_one_file(net):
    """Two replicas holding the same conflict copy with the same bytes make one identical create."""
    a, b, c = net.replicas_of({**KEEP, "plan.json": jtext(ZONES)}, 3)
    write(a, "plan.json", edited(ZONES, title="A"))
    write(b, "plan.json", edited(ZONES, title="B"))
    a.sync()
    (name,) = b.sync(strategy="keep-both").copies
    write(c, name, (b.root / name).read_bytes())  # as if c had settled the same conflict
    report = c.sync()
    assert report.conflicts == () and report.copies == ()
    assert list(copies(net.settle(a, b, c))) == [name]


def edit_in_order(a, b, docs: dict, first: str) -> None:
    """A's edit is pushed, B's is journaled; ``first`` says which happens first on the server's clock."""
    if first == "b":
        write(b, "plan.json", docs["b"])
        b.scan()
    write(a, "plan.json", docs["a"])
    a.sync()
    if first == "a":
        write(b, "plan.json", docs["b"])
        b.scan()


@pytest.mark.parametrize(("first", "winner"), [("a", "B"), ("b", "A")])
def test_newest_goes_by_server_received_time(net, first, winner):
    """newest compares A's server-received time with B's journal time on the server's clock."""
    a, b = net.replicas_of({**KEEP, "plan.json": jtext(ZONES)}, 2)
    edit_in_order(a, b, {"a": edited(ZONES, title="A"), "b": edited(ZONES, title="B")}, first)
    b.sync(strategy="newest")
    assert json.loads(net.settle(a, b)["plan.json"])["title"] == winner


@pytest.mark.parametrize(("first", "stamp"), [("a", "B"), ("b", "A")])
def test_syncrules_field_rules_union_tags_and_newest_timestamp(net, first, stamp):
    """Per-field rules settle what collides: tags merge as a set, updated_at takes the newest."""
    rules = '[[rule]]\npath = "*.json"\nfields = { tags = "union", meta.updated_at = "newest" }\n'
    a, b = net.replicas_of({**KEEP, "plan.json": jtext(ZONES), ".syncrules": rules}, 2)
    ours = {"a": edited(ZONES, tags=["y", "a"], meta__updated_at="A"),
            "b": edited(ZONES, tags=["x", "y", "b"], meta__updated_at="B", title="B's title")}
    edit_in_order(a, b, ours, first)
    report = b.sync()
    assert [c.resolution for c in report.conflicts] == ["merged"]
    tree = net.settle(a, b)
    doc = json.loads(tree["plan.json"])
    assert sorted(doc["tags"]) == ["a", "b", "y"]  # x removed by A stays removed
    assert doc["meta"]["updated_at"] == stamp and doc["title"] == "B's title"
    assert copies(tree) == {}


def test_syncrules_first_matching_glob_and_kind_rules_win(net):
    """The first rule matching path and kind picks the strategy; unmatched paths take the default."""
    rules = ('[[rule]]\npath = "notes/**"\nstrategy = "remote"\n\n'
             '[[rule]]\nkind = "both-created"\nstrategy = "local"\n\n'
             '[[rule]]\npath = "*.md"\nstrategy = "local"\n')
    base = {**KEEP, ".syncrules": rules, "notes/n.md": "base\n", "top.md": "base\n", "other.txt": "base\n"}
    a, b = net.replicas_of(base, 2)
    for ws, who in ((a, "A"), (b, "B")):
        for rel in ("notes/n.md", "top.md", "other.txt", "new.txt"):
            write(ws, rel, f"{who}\n")
    a.sync()
    b.sync()
    tree = net.settle(a, b)
    assert tree["notes/n.md"] == b"A\n" and tree["top.md"] == b"B\n" and tree["new.txt"] == b"B\n"
    assert tree["other.txt"] == b"A\n"  # default merge: text colliding on a line -> keep-both
    assert list(copies(tree).values()) == [b"B\n"]


def test_strategy_flag_overrides_syncrules_for_one_run(net):
    """--strategy replaces what .syncrules picks, for that run only."""
    a, b = net.replicas_of({**KEEP, ".syncrules": '[[rule]]\npath = "*.md"\nstrategy = "local"\n',
                            "top.md": "base\n"}, 2)
    write(a, "top.md", "A\n")
    write(b, "top.md", "B\n")
    a.sync()
    b.sync(strategy="remote")
    assert net.settle(a, b)["top.md"] == b"A\n"


def test_unparsable_document_falls_back_to_keep_both(net):
    """merge keeps both versions when one side does not parse; the broken one is the copy."""
    a, b = net.replicas_of({**KEEP, "plan.json": jtext(ZONES)}, 2)
    write(a, "plan.json", edited(ZONES, title="A"))
    write(b, "plan.json", '{"title": broken')
    a.sync()
    (conflict,) = b.sync().conflicts
    assert conflict.resolution == "keep-both"
    tree = net.settle(a, b)
    assert list(copies(tree).values()) == [b'{"title": broken'] and json.loads(tree["plan.json"])["title"] == "A"


def test_text_edits_on_different_lines_merge(net):
    """Text changed on different lines on both sides merges by lines, with no copy."""
    a, b = net.replicas_of({**KEEP, "notes.md": "one\ntwo\nthree\nfour\n"}, 2)
    write(a, "notes.md", "ONE\ntwo\nthree\nfour\n")
    write(b, "notes.md", "one\ntwo\nthree\nFOUR\n")
    tree = net.settle(a, b)
    assert tree["notes.md"] == b"ONE\ntwo\nthree\nFOUR\n" and copies(tree) == {}


def test_the_losing_version_is_in_log_and_restorable(net):
    """When the remote wins, the local loser is logged (origin conflict) and a safety snapshot restores it."""
    a, b = net.replicas_of({**KEEP, "plan.json": jtext(ZONES)}, 2)
    write(a, "plan.json", edited(ZONES, title="A"))
    write(b, "plan.json", edited(ZONES, title="B"))
    lost = (b.root / "plan.json").read_bytes()
    a.sync()
    b.sync(strategy="remote")
    assert load(b, "plan.json")["title"] == "A"
    digest = hashlib.sha256(lost).hexdigest()
    assert any(e.origin == "conflict" and e.hash == digest for e in b.log("plan.json"))
    safety = next(s for s in b.snapshots() if s.trigger == "safety")
    b.restore(safety.id, ["plan.json"])
    assert (b.root / "plan.json").read_bytes() == lost


def test_local_wins_logs_the_remote_loser(net):
    """When local wins, the remote version that lost gets a conflict row and stays in the blob store."""
    a, b = net.replicas_of({**KEEP, "plan.json": jtext(ZONES)}, 2)
    write(a, "plan.json", edited(ZONES, title="A"))
    write(b, "plan.json", edited(ZONES, title="B"))
    a.sync()
    b.sync(strategy="local")
    remote_hash = hashlib.sha256((a.root / "plan.json").read_bytes()).hexdigest()
    assert any(e.origin == "conflict" and e.hash == remote_hash for e in b.log("plan.json"))
    assert b.blobs.has(remote_hash)
    assert json.loads(net.settle(a, b)["plan.json"])["title"] == "B"


@pytest.mark.parametrize("strategy", ["local", "newest"])
def test_a_remote_loser_is_restorable(net, strategy):
    """When the local version wins, a conflict snapshot names the server's version: restore brings it back."""
    a, b = net.replicas_of({**KEEP, "plan.json": jtext(ZONES)}, 2)
    write(a, "plan.json", edited(ZONES, title="A"))
    a.sync()
    write(b, "plan.json", edited(ZONES, title="B"))  # after A's push: the newer one
    b.sync(strategy=strategy)
    assert load(b, "plan.json")["title"] == "B"
    lost = next(s for s in b.snapshots() if s.trigger == "conflict")
    assert "plan.json" in lost.message
    b.restore(lost.id, ["plan.json"])
    assert (b.root / "plan.json").read_bytes() == (a.root / "plan.json").read_bytes()
    assert (b.root / "keep.md").read_text() == KEEP["keep.md"]


_EXAMPLES = itertools.count()  # a fresh server workspace per example
FIELDS = ["title", "meta__owner", "meta__updated_at", "zones__z1__text", "zones__z2__text", "zones__z3__text"]


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(picks=st.lists(st.sampled_from(FIELDS), min_size=2, max_size=4, unique=True),
       split=st.integers(min_value=1, max_value=3), words=st.lists(st.text("abcdef", min_size=1), min_size=4,
                                                                    max_size=4))
def test_property_disjoint_field_edits_converge_with_both_present(server, tmp_path_factory, picks, split, words):
    """Random non-colliding field edits on two replicas always converge with every edit present."""
    net = Net(server, tmp_path_factory.mktemp("prop"), name=f"prop{next(_EXAMPLES)}")
    try:
        a, b = net.replicas_of({**KEEP, "plan.json": jtext(ZONES)}, 2)
        split = min(split, len(picks) - 1)
        mine, theirs = picks[:split], picks[split:]
        values = dict(zip(picks, words, strict=False))
        write(a, "plan.json", edited(ZONES, **{f: values[f] for f in mine}))
        write(b, "plan.json", edited(ZONES, **{f: values[f] for f in theirs}))
        tree = net.settle(a, b)
        assert copies(tree) == {}
        assert json.loads(tree["plan.json"]) == edited(ZONES, **values)
    finally:
        net.close()


@pytest.mark.parametrize(("strategy", "newer_side", "fields"), [
    ("merge", "a", ["title"]), ("keep-both", "a", ["title"]), ("remote", "a", ["title"]),
    ("newest", "a", ["title"]), ("newest", "b", None), ("local", "a", None)])
def test_every_strategy_that_changes_the_file_publishes_its_zones(net, strategy, newer_side, fields):
    """A strategy that rewrites the local file tells the zones channel which fields; one that keeps it: nothing."""
    a, b = net.replicas_of({**KEEP, "plan.json": jtext(ZONES)}, 2)
    edit_in_order(a, b, {"a": edited(ZONES, title="A"), "b": edited(ZONES, title="B")},
                  "b" if newer_side == "a" else "a")
    b.sync(strategy=strategy)
    events = [e for e in zone_events(b) if e["path"] == "plan.json"]
    assert events == ([] if fields is None else [{"path": "plan.json", "fields": fields, "origin": "merge",
                                                  "doc_id": b.journal.doc_by_path("plan.json").doc_id}])



SEPARATE = {  # name: (base, A's edit, B's edit elsewhere, the merge)
    "doc.yaml": ("# plan\ntitle: plan  # shown\nowner: ann\nn: 1\n", "# plan\ntitle: A  # shown\nowner: ann\nn: 1\n",
                 "# plan\ntitle: plan  # shown\nowner: bo\nn: 1\n",
                 "# plan\ntitle: A     # shown\nowner: bo\nn: 1\n"),  # comments keep the base's column
    "doc.toml": ('# plan\ntitle = "plan"\n\n[meta]\nn = 1\n', '# plan\ntitle = "A"\n\n[meta]\nn = 1\n',
                 '# plan\ntitle = "plan"\n\n[meta]\nn = 2\n', '# plan\ntitle = "A"\n\n[meta]\nn = 2\n'),
    "doc.md": ("# Plan\n\none\ntwo\n", "# Plan A\n\none\ntwo\n", "# Plan\n\none\nTWO\n", "# Plan A\n\none\nTWO\n"),
}


@pytest.mark.parametrize("name", list(SEPARATE))
def test_separate_edits_merge_in_every_format(net, name):
    """YAML, TOML and text edited in different places on two replicas merge, comments and layout kept."""
    base, a_edit, b_edit, merged = SEPARATE[name]
    a, b = net.replicas_of({**KEEP, name: base}, 2)
    write(a, name, a_edit)
    write(b, name, b_edit)
    tree = net.settle(a, b)
    assert tree[name].decode() == merged and copies(tree) == {}


COLLIDING = {"doc.yaml": ("title: plan\n", "title: A\n", "title: B\n"),
             "doc.toml": ('title = "plan"\n', 'title = "A"\n', 'title = "B"\n'),
             "doc.md": ("plan\n", "A\n", "B\n"),
             "doc.bin": (b"\x00plan", b"\x00A", b"\x00B")}


@pytest.mark.parametrize("name", list(COLLIDING))
def test_colliding_edits_keep_both_in_every_format(net, name):
    """The default strategy on a collision, in every format: the server's version at the path, the other beside it."""
    base, a_edit, b_edit = COLLIDING[name]
    a, b = net.replicas_of({**KEEP, name: base}, 2)
    write(a, name, a_edit)
    write(b, name, b_edit)
    tree = net.settle(a, b)
    as_bytes = [x.encode() if isinstance(x, str) else x for x in (a_edit, b_edit)]
    assert tree[name] == as_bytes[0] and list(copies(tree).values()) == [as_bytes[1]]


def _at_failpoint(monkeypatch, point: str, action) -> None:
    """Run ``action()`` the first time a round reaches failpoint ``point`` (another replica acting right then)."""
    from syncengine import fsops
    from syncengine import sync as syncing

    real, done = fsops.failpoint, []

    def hook(name: str) -> None:
        if name == point and not done:
            done.append(name)
            action()
        real(name)

    monkeypatch.setattr(syncing, "failpoint", hook)


@pytest.mark.parametrize(("b_change", "resolution"), [({"title": "B"}, "keep-both"),
                                                      ({"meta__owner": "bo"}, "merged")])
def test_the_replica_whose_push_is_refused_settles_on_top_of_the_winner(net, monkeypatch, b_change, resolution):
    """A commits between B's pull and B's push: B's push is refused, B settles on top of A's rev in the same round."""
    a, b = net.replicas_of({**KEEP, "plan.json": jtext(ZONES)}, 2)
    write(b, "plan.json", edited(ZONES, **b_change))

    def a_gets_there_first():
        write(a, "plan.json", edited(ZONES, title="A"))
        assert a.sync().pushed == ("plan.json",)

    _at_failpoint(monkeypatch, "sync.after_pull", a_gets_there_first)
    report = b.sync()
    assert report.passes >= 2 and [(c.kind, c.resolution) for c in report.conflicts] == [("both-modified", resolution)]
    monkeypatch.undo()
    tree = net.settle(a, b)
    assert net.pushed[a.root] == []  # A never settles it again
    assert json.loads(tree["plan.json"])["title"] == "A"
    if resolution == "merged":
        assert json.loads(tree["plan.json"])["meta"]["owner"] == "bo" and copies(tree) == {}
    else:
        assert [json.loads(d)["title"] for d in copies(tree).values()] == ["B"]


def test_a_modification_brought_back_over_a_local_deletion_publishes_its_zones(net):
    """deleted-modified writes the server's modified document back here: the zones channel hears of it, whole."""
    a, b = net.replicas_of({**KEEP, "plan.json": jtext(ZONES)}, 2)
    write(a, "plan.json", edited(ZONES, title="A"))
    a.sync()
    (b.root / "plan.json").unlink()
    report = b.sync()
    assert [(c.kind, c.resolution) for c in report.conflicts] == [("deleted-modified", "remote")]
    assert load(b, "plan.json")["title"] == "A"
    (event,) = [e for e in zone_events(b) if e["path"] == "plan.json"]
    assert (event["fields"], event["origin"]) == (["$"], "merge")


def test_a_merge_is_published_even_when_the_round_fails_after_it(net, monkeypatch):
    """The merge is committed before the push; a round that then fails still tells the zones channel."""
    a, b = net.replicas_of({**KEEP, "plan.json": jtext(ZONES)}, 2)
    write(a, "plan.json", edited(ZONES, title="A"))
    a.sync()
    write(b, "plan.json", edited(ZONES, meta__owner="bo"))
    monkeypatch.setenv("SYNCENGINE_FAILPOINT", "push.before_commit=raise")
    with pytest.raises(RuntimeError):
        b.sync()
    monkeypatch.delenv("SYNCENGINE_FAILPOINT")
    assert load(b, "plan.json")["title"] == "A"
    (event,) = [e for e in zone_events(b) if e["path"] == "plan.json"]
    assert (event["fields"], event["origin"]) == (["title"], "merge")
    assert json.loads(net.settle(a, b)["plan.json"])["meta"]["owner"] == "bo"
