"""Every conflict kind × every strategy, end to end: two and three replicas on a real server.

A and B start from the same synced base (with three replicas C too, which
only watches). A edits and syncs first; B edits the same document and syncs
with the strategy under test, so B is the replica that resolves (DESIGN §4
rule 7: only the one that meets the newer rev does). Then everyone syncs
until quiet and all must hold the same files — the outcome the table below
names — and B's resolution must be the only one: A and C never commit the
document again (no ping-pong).
"""

from __future__ import annotations

import hashlib

import pytest

from syncengine.conflicts import STRATEGIES
from tests.conflictkit import COPY, Net, copies, write

pytestmark = pytest.mark.integration

BASE = {"doc.json": '{\n  "title": "base",\n  "n": 1\n}\n', "other.md": "untouched\n"}
A_DOC = '{\n  "title": "from A",\n  "n": 1\n}\n'
B_DOC = '{\n  "title": "from B",\n  "n": 1\n}\n'


def both_modified(a, b):
    write(a, "doc.json", A_DOC)
    write(b, "doc.json", B_DOC)
    return "doc.json"


def modified_deleted(a, b):
    (a.root / "doc.json").unlink()
    write(b, "doc.json", B_DOC)
    return "doc.json"


def deleted_modified(a, b):
    write(a, "doc.json", A_DOC)
    (b.root / "doc.json").unlink()
    return "doc.json"


def both_created(a, b):
    write(a, "new.md", "alpha\n")
    write(b, "new.md", "beta\n")
    return "new.md"


def both_moved(a, b):
    for ws, name, text in ((a, "a.json", A_DOC), (b, "b.json", B_DOC)):
        (ws.root / "doc.json").rename(ws.root / name)
        ws.scan()  # the move is journaled, then the file is edited under its new name
        write(ws, name, text)
    return "a.json"  # the server's place wins


def moved_modified(a, b):
    (a.root / "doc.json").rename(a.root / "moved.json")
    write(b, "doc.json", B_DOC)
    return "moved.json"


def modified_moved(a, b):
    write(a, "doc.json", A_DOC)
    (b.root / "doc.json").rename(b.root / "moved.json")
    return "moved.json"


KINDS = {
    "both-modified": (both_modified, A_DOC, B_DOC),
    "modified-deleted": (modified_deleted, None, B_DOC),
    "deleted-modified": (deleted_modified, A_DOC, None),
    "both-created": (both_created, "alpha\n", "beta\n"),
    "both-moved": (both_moved, A_DOC, B_DOC),
    "moved-modified": (moved_modified, None, B_DOC),
    "moved-modified/reverse": (modified_moved, A_DOC, None),
}


def expected(kind: str, strategy: str) -> tuple[str, bool]:
    """(whose version ends at the path: "A" or "B", is B's version also kept as a copy)."""
    if kind in ("modified-deleted", "moved-modified"):
        return "B", False  # a modification never loses to a deletion; a move and an edit combine
    if kind in ("deleted-modified", "moved-modified/reverse"):
        return "A", False
    return {"merge": ("A", True), "keep-both": ("A", True), "remote": ("A", False),
            "local": ("B", False), "newest": ("B", False), "manual": ("B", False)}[strategy]


@pytest.fixture
def net(server, tmp_path):
    net = Net(server, tmp_path)
    yield net
    net.close()


@pytest.mark.parametrize("replicas", [2, 3])
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("kind", list(KINDS))
def test_kind_by_strategy(net, kind, strategy, replicas):
    """Each kind settles per its strategy on every replica, resolved once, by B; nothing is ever lost."""
    a, b, *others = net.replicas_of(BASE, replicas)
    scenario, a_data, b_data = KINDS[kind]
    path = scenario(a, b)
    assert a.sync().exit_code == 0
    report = b.sync(strategy=strategy)
    if strategy == "manual" and kind in ("both-modified", "both-created", "both-moved"):
        assert report.exit_code == 1 and report.open_conflicts == 1
        (open_one,) = b.conflicts()
        assert (open_one.path, open_one.kind) == (path, kind)
        mine = "b.json" if kind == "both-moved" else path
        assert (b.root / mine).read_text() == b_data  # manual writes nothing
        b.resolve(path, "local")
        assert b.conflicts() == []
    else:
        assert report.exit_code == 0, report
        if not kind.startswith("moved-modified"):
            assert [c.kind for c in report.conflicts] == [kind]
    tree = net.settle(a, b, *others)
    for ws in (a, *others):  # B settled it; nobody else commits it again
        assert net.pushed[ws.root] == [], ws.root
    winner, copied = expected(kind, strategy)
    assert tree[path].decode() == (a_data if winner == "A" else b_data)
    kept = copies(tree)
    if copied:
        (name, data), = kept.items()
        match = COPY.match(name)
        assert match and data.decode() == b_data
        assert match["client"] == b.journal.client_id[:8]
        assert match["hash"] == hashlib.sha256(b_data.encode()).hexdigest()[:8]
    else:
        assert kept == {}
    if kind.startswith("moved-modified"):
        assert "doc.json" not in tree
    for data in (a_data, b_data):  # the loser stays in B's blob store
        if data is not None:
            assert b.blobs.has(hashlib.sha256(data.encode()).hexdigest())
    loser = {"remote": b_data, "local": a_data, "newest": a_data, "manual": a_data}.get(strategy)
    if kind.startswith("both-") and loser:  # no copy holds it: log names it, a snapshot restores it
        digest = hashlib.sha256(loser.encode()).hexdigest()
        assert any(e.origin == "conflict" and e.hash == digest for e in b.log(limit=None))
        assert any(entry[0] == digest for snap in b.snapshots()
                   for entry in b.journal.snapshot_manifest(snap.id).values())


C_DOC = '{\n  "title": "from C",\n  "n": 1\n}\n'
# strategy -> (who ends at doc.json, whose versions are kept as copies)
THREE_WAY = {"merge": ("A", "BC"), "keep-both": ("A", "BC"), "remote": ("A", ""), "local": ("C", ""),
             "newest": ("C", ""), "manual": ("C", "")}


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_three_replicas_editing_the_same_field(net, strategy):
    """A, B and C change one field three ways: B settles on top of A, C on top of that; all converge, nothing lost."""
    a, b, c = net.replicas_of(BASE, 3)
    docs = {"A": A_DOC, "B": B_DOC, "C": C_DOC}
    for ws, who in ((a, "A"), (b, "B"), (c, "C")):
        write(ws, "doc.json", docs[who])
    assert a.sync().exit_code == 0
    for ws in (b, c):
        report = ws.sync(strategy=strategy)
        if strategy == "manual":
            assert report.exit_code == 1 and [x.details for x in ws.conflicts()] == [["title"]]
            ws.resolve("doc.json", "local")
        assert ws.sync(strategy=strategy).exit_code == 0
    tree = net.settle(a, b, c)
    winner, kept = THREE_WAY[strategy]
    assert tree["doc.json"].decode() == docs[winner]
    assert sorted(d.decode() for d in copies(tree).values()) == [docs[who] for who in kept]
    for ws, who in ((b, "B"), (c, "C")):  # each loser stays in its own replica's blob store
        assert ws.blobs.has(hashlib.sha256(docs[who].encode()).hexdigest())
