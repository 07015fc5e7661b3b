"""File-system truth under faults (RELIABILITY D4, D5, §5.1): no torn file, no false deletion.

SQLite-style: a sync round (and a restore) is run once per file-system
operation it performs, with that operation — the Nth — failing with ENOSPC
or EACCES through the in-process fault layer (``fsops.inject_fault``), until
an N is reached that the round never gets to. After every faulted run:

* every file holds a whole version someone wrote (never a torn mix);
* nothing is deleted — here or on the server — that nobody deleted;
* the next, unfaulted run completes and the replicas converge with every
  edit present.
"""

from __future__ import annotations

import errno
import json
import os

import pytest

from syncengine import fsops
from syncengine.errors import SyncEngineError
from syncengine.fsops import inject_fault, is_temp_name
from syncengine.testing import read_tree
from tests.replicas import Replicas

pytestmark = pytest.mark.integration

BIG = 1 << 20


def _blob(seed: int, size: int = BIG + 4096) -> bytes:
    return bytes((seed * 31 + i * 7) % 251 for i in range(256)) * (size // 256)


START = {
    "keep.txt": "kept\n",
    "edit_remote.txt": "remote v1\n",
    "del_remote.txt": "deleted by A\n",
    "mv_remote.txt": "moved by A\n",
    "edit_local.txt": "local v1\n",
    "del_local.txt": "deleted by B\n",
    "sub/deep.txt": "deep v1\n",
    "data.json": '{"x": 1, "y": 1, "z": 1}\n',
    "big.bin": _blob(1),
}
NOBODY_DELETES = {"keep.txt", "edit_remote.txt", "edit_local.txt", "sub/deep.txt", "data.json", "big.bin"}


def _scenario(replicas: Replicas, name: str):
    """A and B in step, then a batch of edits on each side; B's next round is the one to fault."""
    a = replicas.make(f"{name}-a", dict(START), workspace=name, token=replicas.server.token(name))
    a.sync()
    b = replicas.make(f"{name}-b", workspace=name, token=replicas.server.token(name))
    b.sync()
    a.write("edit_remote.txt", "remote v2\n")
    (a.root / "del_remote.txt").unlink()
    (a.root / "moved").mkdir()
    os.rename(a.root / "mv_remote.txt", a.root / "moved" / "mv_remote.txt")
    a.write("new_remote.txt", "new on A\n")
    a.write("data.json", '{"x": 2, "y": 1, "z": 1}\n')
    a.write("big.bin", _blob(2))
    a.sync()
    b.write("edit_local.txt", "local v2\n")
    (b.root / "del_local.txt").unlink()
    b.write("sub/deep.txt", "deep v2\n")
    b.write("new_local.txt", "new on B\n")
    b.write("data.json", '{"x": 1, "y": 2, "z": 1}\n')
    return a, b


def _versions() -> set[bytes]:
    """Every whole version of every file either side ever wrote (the merge result is added later)."""
    out = {v.encode() if isinstance(v, str) else v for v in START.values()}
    out |= {b"remote v2\n", b"new on A\n", b'{"x": 2, "y": 1, "z": 1}\n', _blob(2), b"local v2\n", b"deep v2\n",
            b"new on B\n", b'{"x": 1, "y": 2, "z": 1}\n', b'{"x": 2, "y": 2, "z": 1}\n'}
    return out


def _server_paths(replicas: Replicas, name: str) -> set[str]:
    with replicas.server.remote(name, token=replicas.server.token(name)) as remote:
        return {d.path for d in remote.docs(limit=1000).docs}


def _leftovers(root) -> list[str]:
    out = []
    for dirpath, _dirs, files in os.walk(root):
        out += [os.path.join(dirpath, f) for f in files if is_temp_name(f)]
    trash = root / ".syncengine" / "trash"
    if trash.exists():
        out += [str(p) for p in trash.rglob("*") if p.is_file()]
    return out


@pytest.fixture
def replicas(server, tmp_path):
    made = Replicas(server, tmp_path)
    yield made
    made.close()


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EACCES], ids=["ENOSPC", "EACCES"])
def test_a_sync_round_survives_a_fault_at_every_operation(replicas, err):
    """For every N, failing the Nth file operation of B's round tears nothing, deletes nothing, and heals."""
    versions = _versions()
    n = 0
    while True:
        n += 1
        name = f"n{n}"
        a, b = _scenario(replicas, name)
        try:
            with inject_fault("any", n, err):
                try:
                    b.sync()
                except SyncEngineError as exc:
                    assert exc.exit_code == 8, f"N={n}: {exc!r} (exit {exc.exit_code}, expected 8)"
                reached = fsops._fault_counts.get("any", 0)
            tree = b.tree()
            torn = {p: v[:40] for p, v in tree.items() if v not in versions}
            assert not torn, f"N={n}: torn files {torn}"
            lost_here = NOBODY_DELETES - set(tree)
            assert not lost_here, f"N={n}: deleted here though nobody deleted them: {lost_here}"
            lost_there = NOBODY_DELETES - _server_paths(replicas, name)
            assert not lost_there, f"N={n}: deleted on the server though nobody deleted them: {lost_there}"
            b.sync()
            a.sync()
            b.sync()
            final = b.tree()
            assert final == a.tree(), f"N={n}: replicas differ after healing"
            assert set(final) == NOBODY_DELETES | {"new_remote.txt", "new_local.txt", "moved/mv_remote.txt"}
            assert final["edit_local.txt"] == b"local v2\n" and final["edit_remote.txt"] == b"remote v2\n"
            assert final["sub/deep.txt"] == b"deep v2\n" and final["big.bin"] == _blob(2)
            assert json.loads(final["data.json"]) == {"x": 2, "y": 2, "z": 1}
            assert not _leftovers(b.root), f"N={n}: temp or trash files left: {_leftovers(b.root)}"
        finally:
            a.ws.close()
            b.ws.close()
        if reached < n:
            break  # the round never got to an Nth operation: every operation has been failed once
    assert n > 20  # the round does real work: a loop this short would prove little


def test_an_unreadable_file_is_never_deleted_on_the_server(replicas):
    """A changed file whose read fails (EACCES) is reported and stays live on the server, old bytes intact."""
    a = replicas.make("a", {"secret.txt": "v1\n", "other.txt": "o\n"})
    a.sync()
    a.write("secret.txt", "v2 unreadable\n")
    with inject_fault("read", 1, errno.EACCES):
        report = a.sync()
    assert [pr.path for pr in report.problems] == ["secret.txt"] and "ermission" in report.problems[0].reason
    assert _server_paths(replicas, replicas.workspace) == {"secret.txt", "other.txt"}
    b = replicas.make("b")
    b.sync()
    assert b.tree() == {"secret.txt": b"v1\n", "other.txt": b"o\n"}
    a.sync()  # readable again: the edit goes up
    b.sync()
    assert b.tree()["secret.txt"] == b"v2 unreadable\n"


def test_a_folder_that_cannot_be_listed_is_never_read_as_deleted(replicas):
    """EACCES listing a folder: its files are neither deleted on the server nor elsewhere; the next round heals."""
    a = replicas.make("a", {"top.txt": "t\n", "sub/one.txt": "1\n", "sub/two.txt": "2\n"})
    a.sync()
    b = replicas.make("b")
    b.sync()
    with inject_fault("list", 2, errno.EACCES):  # the root lists first, then sub/
        report = a.sync()
    assert report.deleted == () and not report.pushed, report
    assert [p.path for p in report.problems] == ["sub"], report.problems  # the fault did land on sub/
    assert _server_paths(replicas, replicas.workspace) == {"top.txt", "sub/one.txt", "sub/two.txt"}
    b.sync()
    assert set(b.tree()) == {"top.txt", "sub/one.txt", "sub/two.txt"}
    a.write("sub/one.txt", "1 edited\n")
    a.sync()
    b.sync()
    assert b.tree()["sub/one.txt"] == b"1 edited\n"


# ---------------------------------------------------------------- restore


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EACCES], ids=["ENOSPC", "EACCES"])
def test_a_restore_survives_a_fault_at_every_operation(tmp_path, err):
    """For every N, a restore failing at its Nth operation tears nothing and a plain retry restores exactly."""
    from syncengine import Workspace
    from syncengine.testing import backdate, make_tree

    snapshot_tree = {"a.txt": "a1\n", "d/b.txt": "b1\n", "gone.txt": "g\n", "big.bin": _blob(3),
                     "run.sh": "#!/bin/sh\necho\n"}
    n = 0
    while True:
        n += 1
        root = tmp_path / f"r{n}"
        make_tree(root, snapshot_tree)
        os.chmod(root / "run.sh", 0o755)
        backdate(root)
        ws, _ = Workspace.init(root)
        try:
            sid = ws.snapshot("base").id
            wanted = read_tree(root)
            (root / "a.txt").write_text("a2\n")
            (root / "gone.txt").unlink()
            (root / "d" / "b.txt").unlink()
            os.rmdir(root / "d")
            (root / "new.txt").write_text("new\n")
            (root / "big.bin").write_bytes(_blob(4))
            os.chmod(root / "run.sh", 0o644)
            allowed = set(wanted.values()) | {b"a2\n", b"new\n", _blob(4)}
            with inject_fault("any", n, err):
                try:
                    ws.restore(sid)
                except SyncEngineError as exc:
                    assert exc.exit_code == 8, f"N={n}: {exc!r}"
                reached = fsops._fault_counts.get("any", 0)
            tree = read_tree(root)
            torn = {p: v[:40] for p, v in tree.items() if v not in allowed}
            assert not torn, f"N={n}: torn files {torn}"
            assert {"a.txt", "big.bin", "run.sh"} <= set(tree), f"N={n}: lost {tree.keys()}"
            ws.restore(sid)
            assert read_tree(root) == wanted, f"N={n}: the retry did not restore the snapshot"
            assert os.stat(root / "run.sh").st_mode & 0o111, f"N={n}: the executable bit was not restored"
            assert not _leftovers(root)
        finally:
            ws.close()
        if reached < n:
            break
    assert n > 8


# ---------------------------------------------------------------- the executable bit


def test_the_executable_bit_travels_with_edits_merges_and_moves(replicas):
    """+x set on one replica reaches the others and stays through edits, a move and a merge of concurrent edits."""
    a = replicas.make("a", {"run.sh": "#!/bin/sh\necho 1\n", "tool.sh": "#!/bin/sh\necho t\n"})
    os.chmod(a.root / "run.sh", 0o755)
    a.sync()
    b = replicas.make("b")
    b.sync()

    def x(r, rel):
        return bool(os.stat(r.root / rel).st_mode & 0o100)

    assert x(b, "run.sh") and not x(b, "tool.sh")
    a.write("run.sh", "#!/bin/sh\necho 2\n")  # an editor's write keeps the mode
    a.sync()
    b.sync()
    assert b.tree()["run.sh"] == b"#!/bin/sh\necho 2\n" and x(b, "run.sh")
    os.chmod(b.root / "tool.sh", 0o755)  # the bit on B, the content on A, at once
    a.write("tool.sh", "#!/bin/sh\necho t\necho more\n")
    b.sync()
    a.sync()
    b.sync()
    for r in (a, b):
        assert r.tree()["tool.sh"] == b"#!/bin/sh\necho t\necho more\n" and x(r, "tool.sh"), r.root.name
    (b.root / "bin").mkdir()
    os.rename(b.root / "run.sh", b.root / "bin" / "run.sh")  # a move on B, a text edit on A: merged
    a.write("run.sh", "#!/bin/sh\necho 2\necho 3\n")
    b.sync()
    a.sync()
    b.sync()
    for r in (a, b):
        assert r.tree()["bin/run.sh"] == b"#!/bin/sh\necho 2\necho 3\n" and x(r, "bin/run.sh"), r.root.name
    os.chmod(a.root / "bin" / "run.sh", 0o644)  # clearing it travels too
    a.sync()
    b.sync()
    assert not x(b, "bin/run.sh")


# ---------------------------------------------------------------- names: case and Unicode normalization

NFC_NAME = "caf\u00e9.txt"
NFD_NAME = "cafe\u0301.txt"


def test_names_that_differ_only_by_case_never_overwrite_each_other(replicas):
    """Report.md on A and report.md on B (one name to a case-insensitive disk) both survive, whole, everywhere."""
    a = replicas.make("a", {"Report.md": "A's report\n"})
    b = replicas.make("b", {"report.md": "B's report\n", "Notes.md": "n1\n", "NOTES.md": "n2\n"})
    for _ in range(3):
        a.sync()
        b.sync()
    contents = {b"A's report\n", b"B's report\n", b"n1\n", b"n2\n"}
    for r in (a, b):
        tree = r.tree()
        assert contents <= set(tree.values()), f"{r.root.name} lost a version: {tree}"
        keys = [p.casefold() for p in tree]
        assert len(keys) == len(set(keys)), f"{r.root.name} holds names one case-insensitive disk cannot: {tree}"
    assert a.tree() == b.tree()
    # The name that reached the server second is kept as a conflict copy beside the first (docs/sync-rules.md).
    assert sorted(p.split(".")[0] for p in a.tree() if ".conflict-" in p) == ["Notes", "report"]
    report = b.sync()
    assert not (report.downloaded or report.pushed or report.deleted or report.moved), report


def test_a_name_not_in_nfc_is_a_per_file_problem_and_never_overwrites_its_nfc_twin(replicas):
    """An NFD name is reported and left alone on disk; the NFC name beside it syncs; nothing overwrites either."""
    a = replicas.make("a", {NFC_NAME: "nfc on A\n"})
    b = replicas.make("b")
    (b.root / NFD_NAME).write_bytes(b"nfd on B\n")
    a.sync()
    report = b.sync()
    assert [p.path for p in report.problems] == [NFD_NAME] and "NFC" in report.problems[0].reason
    assert (b.root / NFD_NAME).read_bytes() == b"nfd on B\n"
    assert (b.root / NFC_NAME).read_bytes() == b"nfc on A\n"
    assert _server_paths(replicas, replicas.workspace) == {NFC_NAME}
    b.write(NFC_NAME, "nfc edited on B\n")
    b.sync()
    a.sync()
    assert a.tree() == {NFC_NAME: b"nfc edited on B\n"}
    assert (b.root / NFD_NAME).read_bytes() == b"nfd on B\n"  # still there, still its own


# ---------------------------------------------------------------- gc


def test_gc_keeps_every_base_a_later_merge_needs_and_every_kept_snapshot(replicas):
    """After the harshest gc (keep 0s, keep_last 1) both replicas still merge concurrent field edits and restore."""
    a = replicas.make("a", {"doc.json": '{"x": 1, "y": 1}\n', "notes.md": "one\ntwo\nthree\n"})
    a.sync()
    b = replicas.make("b")
    b.sync()
    for i in range(3):
        a.write("doc.json", f'{{"x": {i + 10}, "y": 1}}\n')
        a.ws.snapshot(f"v{i}")
        a.sync()
    b.sync()
    kept_tree = a.tree()
    reports = {}
    for r in (a, b):
        old = 0  # every blob old enough to be collected
        for digest in r.ws.blobs.iter_digests():
            r.ws.blobs.set_stored_at(digest, old)
        r.ws.config.history.keep_last = 1
        reports[r.root.name] = r.ws.gc("0s")
    assert reports["a"].snapshots_dropped == 2 and reports["a"].snapshots_kept == 1
    assert reports["a"].blobs_deleted >= 2  # doc.json's x=10 and x=11: in no kept snapshot, no base
    a.write("doc.json", '{"x": 99, "y": 1}\n')
    b.write("doc.json", '{"x": 12, "y": 2}\n')
    a.write("notes.md", "ONE\ntwo\nthree\n")
    b.write("notes.md", "one\ntwo\nTHREE\n")
    a.sync()
    b.sync()
    a.sync()
    assert a.tree() == b.tree()
    assert json.loads(a.tree()["doc.json"]) == {"x": 99, "y": 2}, "the base was collected: no field merge"
    assert a.tree()["notes.md"] == b"ONE\ntwo\nTHREE\n"
    assert not [p for p in a.tree() if ".conflict-" in p]
    last = a.ws.snapshots()[0]
    a.ws.restore(last.id)
    assert a.tree() == kept_tree
