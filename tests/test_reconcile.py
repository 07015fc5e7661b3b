"""reconcile(): the decision table of docs/sync-rules.md, one row per case, plus properties.

The table below and the one in docs/sync-rules.md are the same table: a row
added to one is added to the other. The properties check what no row can:
totality, no deletion without a base, no modification lost to a deletion,
that the outcome does not depend on which side is "here", and that applying
a decision settles the document within a few rounds (CanopyCheck, level 1).
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from syncengine.reconcile import Action, ConflictKind, Do, Version, reconcile

BC, BD, BM = ConflictKind.BOTH_CREATED, ConflictKind.BOTH_MODIFIED, ConflictKind.BOTH_MOVED
MD, DM, MM = ConflictKind.MODIFIED_DELETED, ConflictKind.DELETED_MODIFIED, ConflictKind.MOVED_MODIFIED


def v(path: str, digest: str, executable: bool = False) -> Version:
    return Version(path, digest, executable)


def gone(path: str = "a") -> Version:
    """Deleted (as a base: agreed deleted; as the remote: deleted on the server)."""
    return Version(path, None)


B = v("a", "h0")  # the base of most rows: a at h0
X = v("a", "h0", True)

# (row id, base, local, remote, do, conflict, merged path, merged hash, merged exec, content conflict)
# local None = no file here; remote None = the server does not know the document.
TABLE = [
    # --- no base: never synced, or the journal was lost (nothing is ever deleted)
    ("N1", None, None, None, Do.NOTHING, None, None, None, False, False),
    ("N2", None, None, gone(), Do.ADOPT, None, None, None, False, False),
    ("N3", None, None, v("a", "r"), Do.PULL, None, None, None, False, False),
    ("N4", None, v("a", "l"), None, Do.PUSH, None, None, None, False, False),
    ("N5", None, v("a", "l"), gone(), Do.MERGE, MD, "a", "l", False, False),
    ("N6", None, v("a", "x"), v("a", "x"), Do.ADOPT, None, None, None, False, False),
    ("N7 content", None, v("a", "l"), v("a", "r"), Do.MERGE, BC, "a", None, False, True),
    ("N7 exec", None, v("a", "x"), v("a", "x", True), Do.MERGE, BC, "a", "x", True, False),
    ("N7 path", None, v("a", "x"), v("b", "x"), Do.MERGE, BC, "b", "x", False, False),
    # --- base present, the server does not know the document (reset or restored server)
    ("B1 unchanged", B, B, None, Do.PUSH, None, None, None, False, False),
    ("B1 changed", B, v("a", "l"), None, Do.PUSH, None, None, None, False, False),
    ("B2", B, None, None, Do.FORGET, None, None, None, False, False),
    # --- base present, remote known
    ("B3", B, B, B, Do.NOTHING, None, None, None, False, False),
    ("B4 modified", B, v("a", "l"), B, Do.PUSH, None, None, None, False, False),
    ("B4 moved", B, v("b", "h0"), B, Do.PUSH, None, None, None, False, False),
    ("B4 exec", B, X, B, Do.PUSH, None, None, None, False, False),
    ("B4 deleted", B, None, B, Do.PUSH, None, None, None, False, False),
    ("B5 modified", B, B, v("a", "r"), Do.PULL, None, None, None, False, False),
    ("B5 moved", B, B, v("b", "h0"), Do.PULL, None, None, None, False, False),
    ("B5 exec", B, B, X, Do.PULL, None, None, None, False, False),
    ("B5 deleted", B, B, gone(), Do.PULL, None, None, None, False, False),
    ("B6 same edit", B, v("a", "s"), v("a", "s"), Do.ADOPT, None, None, None, False, False),
    ("B6 same move", B, v("b", "h0"), v("b", "h0"), Do.ADOPT, None, None, None, False, False),
    ("B6 both deleted", B, None, gone(), Do.ADOPT, None, None, None, False, False),
    ("B7 deleted vs modified", B, None, v("a", "r"), Do.PULL, DM, None, None, False, False),
    ("B7 deleted vs moved", B, None, v("b", "h0"), Do.PULL, DM, None, None, False, False),
    ("B8 modified vs deleted", B, v("a", "l"), gone(), Do.MERGE, MD, "a", "l", False, False),
    ("B8 moved vs deleted", B, v("b", "h0"), gone(), Do.MERGE, MD, "b", "h0", False, False),
    ("B9 both modified", B, v("a", "l"), v("a", "r"), Do.MERGE, BD, "a", None, False, True),
    ("B9 moved vs modified", B, v("b", "h0"), v("a", "r"), Do.MERGE, MM, "b", "r", False, False),
    ("B9 modified vs moved", B, v("a", "l"), v("b", "h0"), Do.MERGE, MM, "b", "l", False, False),
    ("B9 exec vs modified", B, X, v("a", "r"), Do.MERGE, MM, "a", "r", True, False),
    ("B9 modified vs exec", B, v("a", "l"), X, Do.MERGE, MM, "a", "l", True, False),
    ("B9 both moved apart", B, v("b", "h0"), v("c", "h0"), Do.MERGE, BM, "c", "h0", False, False),
    ("B9 both moved apart, edited here", B, v("b", "l"), v("c", "h0"), Do.MERGE, BM, "c", "l", False, False),
    ("B9 both moved together, both edited", B, v("b", "l"), v("b", "r"), Do.MERGE, BD, "b", None, False, True),
    ("B9 moved and edited vs edited", B, v("b", "l"), v("a", "r"), Do.MERGE, BD, "b", None, False, True),
    # --- base "agreed deleted" (synced as deleted)
    ("D1 server lost it", gone(), v("a", "l"), None, Do.PUSH, None, None, None, False, False),
    ("D2 server lost it, gone here", gone(), None, None, Do.FORGET, None, None, None, False, False),
    ("D3", gone(), None, gone(), Do.NOTHING, None, None, None, False, False),
    ("D4 re-created here", gone(), v("a", "l"), gone(), Do.PUSH, None, None, None, False, False),
    ("D5 re-created there", gone(), None, v("a", "r"), Do.PULL, None, None, None, False, False),
    ("D6 re-created alike", gone(), v("a", "s"), v("a", "s"), Do.ADOPT, None, None, None, False, False),
    ("D7 re-created differently", gone(), v("a", "l"), v("a", "r"), Do.MERGE, BC, "a", None, False, True),
]


@pytest.mark.parametrize("row", TABLE, ids=[row[0] for row in TABLE])
def test_decision_table(row):
    """Each case of the decision table gives exactly the documented action."""
    rid, base, local, remote, do, conflict, path, digest, executable, content_conflict = row
    action = reconcile(base, local, remote)
    assert action.do is do, action.rule
    assert action.conflict == conflict, action.rule
    assert action.rule.split()[0] == rid.split()[0]
    if do is Do.MERGE:
        assert (action.path, action.hash, action.executable, action.content_conflict) == (
            path, digest, executable, content_conflict)


def test_every_rule_of_the_docs_has_a_row():
    """docs/sync-rules.md names exactly the rule ids this table covers."""
    import re
    from pathlib import Path

    doc = (Path(__file__).resolve().parent.parent / "docs" / "sync-rules.md").read_text()
    documented = set(re.findall(r"^\| (\w\d+) \|", doc, re.M))
    assert documented == {row[0].split()[0] for row in TABLE}


# ---------------------------------------------------------------- properties

PATHS = st.sampled_from(["a", "b", "c"])
HASHES = st.sampled_from(["h1", "h2", "h3"])
PRESENT = st.builds(Version, PATHS, HASHES, st.booleans())
DELETED = st.builds(Version, PATHS, st.none())
BASES = st.none() | PRESENT | DELETED
LOCALS = st.none() | PRESENT
REMOTES = st.none() | PRESENT | DELETED


def _present(version: Version | None) -> bool:
    return version is not None and version.present


def _state(version: Version | None):
    """What a side holds, with absence normalised (a deleted version's path does not matter)."""
    return (version.path, version.hash, version.executable) if _present(version) else None


def _outcome(base, local, remote, action: Action):
    """The state both sides end in once the action and its follow-up push are done."""
    if action.do is Do.PUSH or action.do is Do.FORGET:
        return _state(local)
    if action.do in (Do.PULL, Do.ADOPT):
        return _state(remote)
    if action.do is Do.NOTHING:
        return _state(local)
    if action.content_conflict:
        return "conflict"
    return (action.path, action.hash, action.executable)


@settings(max_examples=400, deadline=None)
@given(BASES, LOCALS, REMOTES)
def test_reconcile_is_total_and_explains_itself(base, local, remote):
    """Every combination of states gets an action and a rule naming its row."""
    action = reconcile(base, local, remote)
    assert isinstance(action.do, Do) and action.rule[:1] in "NBD" and action.rule[1:2].isdigit()
    if action.do is Do.MERGE and not action.content_conflict:
        assert action.hash in {local.hash if local else None, remote.hash if remote else None}


@settings(max_examples=400, deadline=None)
@given(LOCALS, REMOTES)
def test_without_a_base_nothing_is_deleted(local, remote):
    """With no base, no action removes a present file here or on the server."""
    action = reconcile(None, local, remote)
    if _present(local):
        assert action.do is not Do.FORGET
        assert action.do is not Do.PULL or _present(remote)
        assert _outcome(None, local, remote, action) is not None
    if _present(remote):
        assert action.do is not Do.PUSH or _present(local)
        assert _outcome(None, local, remote, action) is not None


@settings(max_examples=400, deadline=None)
@given(BASES, LOCALS, REMOTES)
def test_a_modification_never_loses_to_a_deletion(base, local, remote):
    """A present side that changed since the base is never replaced by absence."""
    action = reconcile(base, local, remote)
    for side in (local, remote):
        changed = base is None or _state(side) != _state(base)
        if _present(side) and changed and not (side is remote and remote is None):
            assert _outcome(base, local, remote, action) is not None, action.rule


@settings(max_examples=400, deadline=None)
@given(BASES, LOCALS, LOCALS)
def test_the_outcome_does_not_depend_on_which_side_is_here(base, one, other):
    """Swapping here and the server gives the same final state (bar the documented tie-breaks of paths)."""
    forward = reconcile(base, one, other or gone())
    backward = reconcile(base, other, one or gone())
    if ConflictKind.BOTH_MOVED in (forward.conflict, backward.conflict):
        return  # moved to two places: the server's place wins, by design
    if ConflictKind.BOTH_CREATED in (forward.conflict, backward.conflict) and forward.path != backward.path:
        return  # at two paths without a common ancestor: the server's path wins, by design
    assert _outcome(base, one, other or gone(), forward) == _outcome(base, other, one or gone(), backward), (
        forward.rule, backward.rule)


@settings(max_examples=400, deadline=None)
@given(BASES, LOCALS, REMOTES)
def test_identical_sides_never_conflict(base, local, remote):
    """Both sides the same (or both absent): nothing to do or adopt, never a conflict."""
    if remote is None or _state(local) != _state(remote):
        return
    action = reconcile(base, local, remote)
    assert action.do in (Do.NOTHING, Do.ADOPT) and action.conflict is None


@settings(max_examples=600, deadline=None)
@given(BASES, LOCALS, REMOTES)
def test_applying_decisions_settles_within_three_rounds(base, local, remote):
    """Acting on each answer (content conflicts: the server's bytes win) reaches NOTHING, both sides equal."""
    for _round in range(3):
        action = reconcile(base, local, remote)
        if action.do is Do.NOTHING:
            assert _state(local) == _state(remote)
            return
        if action.do is Do.FORGET:
            assert not _present(local)
            return
        if action.do is Do.PUSH:
            remote = local if local is not None else gone(base.path if base else "a")
            base = remote
        elif action.do is Do.PULL:
            local = remote if _present(remote) else None
            base = remote
        elif action.do is Do.ADOPT:
            base = remote
        else:
            digest = remote.hash if action.content_conflict else action.hash
            local = Version(action.path or remote.path, digest, action.executable)
            base = remote
    raise AssertionError(f"not settled after three rounds: {base} {local} {remote}")


def test_plan_for_decides_as_reconcile_does_with_its_first_push_shortcut(tmp_path):
    """plan_for's shortcut for rows with no base and no remote gives reconcile's own action, for every row."""
    from syncengine import Workspace
    from syncengine.apply import versions
    from syncengine.reconcile import FIRST_PUSH
    from syncengine.sync import plan_for
    from syncengine.testing import make_tree

    make_tree(tmp_path / "w", {f"{i}.json": f'{{"i": {i}}}\n' for i in range(6)})
    ws, _ = Workspace.init(tmp_path / "w")
    try:
        journal = ws.journal
        rows = {row.path: row for row in journal.documents()}
        journal.update_doc(rows["1.json"].doc_id, remote_rev=3, remote_path="1.json", remote_hash="f" * 64)
        journal.update_doc(rows["2.json"].doc_id, base_rev=2, base_path="2.json", base_hash=rows["2.json"].hash,
                           remote_rev=2, remote_path="2.json", remote_hash=rows["2.json"].hash)
        journal.update_doc(rows["3.json"].doc_id, remote_rev=4, remote_path="3.json", remote_hash=None)
        journal.update_doc(rows["4.json"].doc_id, path=None, hash=None)
        plan = plan_for(journal)
        expected = [(row, action) for row in journal.unsettled()
                    if (action := reconcile(*versions(row))).do is not Do.NOTHING]
        assert plan == expected
        assert [row.path for row, action in plan if action is FIRST_PUSH] == ["0.json", "5.json"]
        assert {row.path: action.do for row, action in plan} == {
            "0.json": Do.PUSH, "5.json": Do.PUSH, "1.json": Do.MERGE, "3.json": Do.MERGE}
    finally:
        ws.close()
