"""`sync --strategy`, `conflicts`, `resolve` and `.syncrules` through the real CLI, plus a crash mid keep-both.

The CLI runs in this process (tests/helpers.run_cli) except where a
failpoint must kill a real `syncengine sync` (run_proc).
"""

from __future__ import annotations

import hashlib
import json
import os

import pytest

from tests.conflictkit import COPY, Net, copies, jtext, load, write
from tests.helpers import cli_env, run_cli, run_proc

pytestmark = pytest.mark.integration

DOC = {"title": "plan", "tags": ["x"], "zones": [{"id": "z1", "text": "one"}, {"id": "z2", "text": "two"}]}
BASE = {"keep.md": "untouched\n", "plan.json": jtext(DOC)}


@pytest.fixture
def net(server, tmp_path):
    net = Net(server, tmp_path)
    yield net
    net.close()


def cli(ws, *args: str):
    return run_cli("-C", ws.root, *args)


def manual_conflict(net, a_doc: dict, b_doc: dict):
    """A pushes ``a_doc``; B meets it with ``b_doc`` under --strategy manual (exit 1)."""
    a, b = net.replicas_of(BASE, 2)
    write(a, "plan.json", a_doc)
    write(b, "plan.json", b_doc)
    assert cli(a, "sync").code == 0
    result = cli(b, "sync", "--strategy", "manual", "--json")
    assert result.code == 1, result.stderr
    assert result.json()["open_conflicts"] == 1
    return a, b


def test_manual_lists_fields_then_resolve_remote_converges(net):
    """manual writes nothing and exits 1; conflicts --json names the field; resolve --take remote settles it."""
    a, b = manual_conflict(net, {**DOC, "title": "A"}, {**DOC, "title": "B"})
    assert load(b, "plan.json")["title"] == "B"
    listed = cli(b, "conflicts", "--json")
    assert listed.code == 0
    (conflict,) = listed.json()
    assert (conflict["path"], conflict["kind"], conflict["details"]) == ("plan.json", "both-modified", ["title"])
    assert cli(b, "sync").code == 1  # still open: the document sits out every round
    assert "title" in cli(b, "conflicts").stdout
    settled = cli(b, "resolve", "plan.json", "--take", "remote", "--json")
    assert settled.code == 0, settled.stderr
    assert settled.json()["resolution"] == "remote"
    events = [json.loads(p) for *_x, p in b.events.read(channels=("zones",))]
    assert {"path": "plan.json", "fields": ["title"], "origin": "resolve"}.items() <= events[-1].items()
    assert cli(b, "conflicts", "--json").json() == []
    assert cli(b, "sync").code == 0
    assert json.loads(net.settle(a, b)["plan.json"])["title"] == "A"


def test_conflicts_lists_the_fields_of_the_file_as_it_is_now(net):
    """An open manual conflict edited further by hand: `conflicts` compares the file as it is now, so a field
    brought in line leaves the list, and once nothing collides it lists what either side changed."""
    _a, b = manual_conflict(net, {**DOC, "title": "A", "tags": ["a"]}, {**DOC, "title": "B", "tags": ["b"]})
    (conflict,) = cli(b, "conflicts", "--json").json()
    assert sorted(conflict["details"]) == ["tags", "title"]
    write(b, "plan.json", {**DOC, "title": "A", "tags": ["b"]})  # the title brought in line with A's
    (conflict,) = cli(b, "conflicts", "--json").json()
    assert conflict["details"] == ["tags"]
    # Now nothing collides: every field either side changed is listed, as for any clean merge (involved()).
    write(b, "plan.json", {**DOC, "title": "A", "tags": ["a"], "zones": [{"id": "z1", "text": "uno"}]})
    (conflict,) = cli(b, "conflicts", "--json").json()
    assert conflict["details"] == ["title", "tags[0]", "zones[id=z1].text", "zones[id=z2]"]


def test_resolve_merged_combines_disjoint_edits(net):
    """resolve --take merged writes the three-way merge, which the next sync pushes everywhere."""
    a_doc = {**DOC, "zones": [{"id": "z1", "text": "ONE"}, {"id": "z2", "text": "two"}]}
    b_doc = {**DOC, "zones": [{"id": "z1", "text": "one"}, {"id": "z2", "text": "TWO"}]}
    a, b = manual_conflict(net, a_doc, b_doc)
    assert cli(b, "resolve", "plan.json", "--take", "merged").code == 0
    tree = net.settle(a, b)
    assert [z["text"] for z in json.loads(tree["plan.json"])["zones"]] == ["ONE", "TWO"] and copies(tree) == {}
    events = [json.loads(p) for *_x, p in b.events.read(channels=("zones",))]
    assert {"path": "plan.json", "fields": ["zones[id=z1].text"], "origin": "resolve"}.items() <= events[-1].items()


def test_resolve_merged_is_refused_where_fields_collide(net):
    """resolve --take merged exits 2 naming the colliding field, and leaves the conflict open."""
    _a, b = manual_conflict(net, {**DOC, "title": "A"}, {**DOC, "title": "B"})
    result = cli(b, "resolve", "plan.json", "--take", "merged")
    assert result.code == 2 and "title" in result.stderr and result.stderr.count("\n") == 1
    assert len(b.conflicts()) == 1


def test_resolve_by_hand_pushes_the_edited_file_on_top_of_the_winner(net):
    """Without --take the file as edited by hand wins, pushed on top of the rev it was resolved against."""
    a, b = manual_conflict(net, {**DOC, "title": "A"}, {**DOC, "title": "B"})
    write(b, "plan.json", {**DOC, "title": "A and B"})
    assert cli(b, "resolve", "plan.json").code == 0
    assert b.log("plan.json", limit=2)[0].origin == "resolve"
    assert json.loads(net.settle(a, b)["plan.json"])["title"] == "A and B"


def test_resolve_after_the_server_moved_on_resolves_again(net):
    """A resolution pushed after the server moved on meets the newer rev and is settled again, not lost."""
    a, b = manual_conflict(net, {**DOC, "title": "A"}, {**DOC, "title": "B"})
    write(a, "plan.json", {**DOC, "title": "A2", "tags": ["x", "a"]})
    assert cli(a, "sync").code == 0
    assert cli(b, "resolve", "plan.json", "--take", "local").code == 0
    result = cli(b, "sync", "--strategy", "keep-both", "--json")
    assert result.code == 0, result.stderr
    tree = net.settle(a, b)
    assert json.loads(tree["plan.json"])["title"] == "A2"
    assert [json.loads(d)["title"] for d in copies(tree).values()] == ["B"]


def test_resolve_without_an_open_conflict_is_a_usage_error(net):
    """resolve on a path with no open conflict exits 2 with one line."""
    (a,) = net.replicas_of(BASE, 1)
    result = cli(a, "resolve", "plan.json")
    assert result.code == 2 and "no open conflict" in result.stderr and result.stderr.count("\n") == 1


def test_bad_syncrules_stops_sync_with_nothing_synced(net):
    """A .syncrules that does not parse is one line on stderr, exit 2, and nothing reaches the server."""
    a, b = net.replicas_of(BASE, 2)
    write(a, ".syncrules", '[[rule]]\npath = "*.json"\nstrategy = "newset"\n')
    write(a, "plan.json", {**DOC, "title": "A"})
    result = cli(a, "sync")
    assert result.code == 2 and result.stderr.count("\n") == 1
    assert ".syncrules" in result.stderr and "newset" in result.stderr
    assert cli(b, "sync", "--json").json()["downloaded"] == []
    write(a, ".syncrules", '[[rule]]\npath = "*.json"\nstrategy = "newest"\n')
    assert cli(a, "sync").code == 0


def test_a_syncrules_link_that_cannot_be_followed_still_stops_sync(net):
    """A .syncrules that is a link looping on itself is still read (and refused), never taken for no file: a round
    loads the rules only where something is at that name, and a link is something."""
    (a,) = net.replicas_of(BASE, 1)
    os.symlink(".syncrules", a.root / ".syncrules")
    result = cli(a, "sync")
    assert result.code == 2 and ".syncrules" in result.stderr and "cannot be read" in result.stderr


def test_unknown_strategy_flag_is_a_usage_error(net):
    """sync --strategy with a name that is not a strategy exits 2."""
    (a,) = net.replicas_of(BASE, 1)
    assert cli(a, "sync", "--strategy", "bogus").code == 2


def test_crash_between_copy_and_replace_makes_no_second_copy(net):
    """A sync killed after writing the keep-both copy leaves both versions; the rerun adds no second copy."""
    a, b = net.replicas_of(BASE, 2)
    write(a, "plan.json", {**DOC, "title": "A"})
    write(b, "plan.json", {**DOC, "title": "B"})
    assert cli(a, "sync").code == 0
    killed = run_proc("-C", b.root, "sync", "--strategy", "keep-both",
                      env=cli_env(SYNCENGINE_FAILPOINT="apply.after_copy"))
    assert killed.code == -9, killed.stderr
    (name,) = copies({p.name: b"" for p in b.root.iterdir()})
    assert load(b, name)["title"] == "B" and load(b, "plan.json")["title"] == "B"
    again = run_proc("-C", b.root, "sync", "--strategy", "keep-both", "--json")
    assert again.code == 0, again.stderr
    tree = net.settle(a, b)
    assert list(copies(tree)) == [name] and COPY.match(name)
    assert json.loads(tree["plan.json"])["title"] == "A" and json.loads(tree[name])["title"] == "B"


def test_resolve_take_remote_snapshots_the_local_version_first(net):
    """resolve --take remote overwrites the local file only after a safety snapshot that restores it."""
    _a, b = manual_conflict(net, {**DOC, "title": "A"}, {**DOC, "title": "B"})
    lost = (b.root / "plan.json").read_bytes()
    assert cli(b, "resolve", "plan.json", "--take", "remote").code == 0
    assert load(b, "plan.json")["title"] == "A"
    safety = [s for s in b.snapshots() if s.trigger == "safety"]
    assert safety, "no safety snapshot before the overwrite"
    assert cli(b, "restore", str(safety[0].id), "plan.json").code == 0
    assert (b.root / "plan.json").read_bytes() == lost


def test_sync_output_names_an_open_conflict_as_open(net):
    """A conflict left open by manual reads as open in sync's output, never as 'None'."""
    a, b = net.replicas_of(BASE, 2)
    write(a, "plan.json", {**DOC, "title": "A"})
    write(b, "plan.json", {**DOC, "title": "B"})
    assert cli(a, "sync").code == 0
    result = cli(b, "sync", "--strategy", "manual")
    assert result.code == 1
    line = next(x for x in result.stdout.splitlines() if "conflict both-modified" in x)
    assert "None" not in line and "open" in line


def test_resolve_take_local_keeps_the_remote_loser_restorable(net):
    """resolve --take local leaves a conflict snapshot from which restore brings the server's version back."""
    a, b = manual_conflict(net, {**DOC, "title": "A"}, {**DOC, "title": "B"})
    assert cli(b, "resolve", "plan.json", "--take", "local").code == 0
    lost = next(s for s in b.snapshots() if s.trigger == "conflict")
    assert cli(b, "restore", str(lost.id), "plan.json").code == 0
    assert (b.root / "plan.json").read_bytes() == (a.root / "plan.json").read_bytes()


def test_a_resolution_records_the_server_version_it_was_settled_against(net):
    """After the server moved on, the settled conflict names the newer server version, which gc then keeps."""
    a, b = manual_conflict(net, {**DOC, "title": "A"}, {**DOC, "title": "B"})
    write(a, "plan.json", {**DOC, "title": "A2"})
    assert cli(a, "sync").code == 0
    assert cli(b, "sync").code == 1  # pulls A2; the conflict stays open
    assert cli(b, "resolve", "plan.json", "--take", "local").code == 0
    (row,) = b.journal.conflicts(include_resolved=True)
    a2 = hashlib.sha256((a.root / "plan.json").read_bytes()).hexdigest()
    assert row["remote_hash"] == a2 and a2 in b.journal.referenced_hashes()
