"""A real `syncengine sync` killed with SIGKILL at every step of a round, then run again: nothing lost or doubled.

After each kill (Unison's invariant, RELIABILITY §3 A): every file holds its
old or its new bytes, never a mix; every local edit is still on disk;
``PRAGMA integrity_check`` is ok. After the next round and a sync of the other
replica: the replicas converge on the expected tree, no temp or set-aside
file is left, and the server holds exactly the revisions an uninterrupted
round makes (replayed op ids return their first answer, echoes are adopted).
"""

from __future__ import annotations

import random
import signal
import subprocess
import sys

import pytest

from syncengine.testing import wait_until
from tests.helpers import REPO, cli_env
from tests.server.conftest import FaultProxy
from tests.synckit import Kit, Replica, assert_converged, converge, no_duplicate_revisions

pytestmark = pytest.mark.integration

INIT = {
    "keep.md": "keep\n",
    "r-mod.md": "r-mod v1\n",
    "r-del.md": "r-del v1\n",
    "r-mv.md": "r-mv v1\n",
    "r-mvmod.md": "r-mvmod v1\n",
    "r-x.sh": "#!/bin/sh\n",
    "both.bin": b"\x00both v1",
    "l-mod.md": "l-mod v1\n",
    "l-del.md": "l-del v1\n",
    "l-mv.md": "l-mv v1\n",
    "mvmod.md": "mvmod v1\n",
}

EXPECTED = {
    "keep.md": b"keep\n",
    "r-mod.md": b"r-mod v2 by b\n",
    "moved/r-mv.md": b"r-mv v1\n",
    "moved/r-mvmod.md": b"r-mvmod v2 by b\n",
    "r-x.sh": b"#!/bin/sh\n",
    "r-new.md": b"r-new by b\n",
    "both.bin": b"\x00both by b",
    "l-mod.md": b"l-mod v2 by a\n",
    "local/l-mv.md": b"l-mv v1\n",
    "l-new.md": b"l-new by a\n",
    "local/mvmod.md": b"mvmod v2 by b\n",
}

A_WRITES = (b"l-mod v2 by a\n", b"l-new by a\n", b"\x00both by a")

# Bytes a path may hold while a round is cut short, besides its bytes before and after the round.
BETWEEN = {"moved/r-mvmod.md": {b"r-mvmod v1\n"}}

# Every step of a round, in order. ":N" is the Nth time the step is reached in the round.
FAILPOINTS = [
    "sync.after_scan",
    "sync.after_pull",
    "blobs.after_temp",  # the downloaded blobs written, not yet durable nor named
    "blobs.after_rename",  # ... named, their names not yet durable
    "apply.after_stage",  # the downloads' temp files written beside their targets, nothing placed
    "apply.after_aside",  # the pulled deletion: r-del.md set aside
    "apply.after_delete",
    "apply.after_move",  # a pulled move: r-mv.md
    "apply.after_move:2",  # a move before new bytes: r-mvmod.md
    "apply.after_temp",
    "apply.after_aside:2",  # a replaced file set aside, the new one not yet in place
    "apply.after_rename",
    "apply.after_rename:3",
    "apply.after_write",
    "apply.after_copy",  # keep-both: the conflict copy written, the original not yet replaced
    "apply.before_journal",
    "blobs.after_temp:2",  # the bases of the push, written beside its upload
    "blobs.after_rename:2",
    "push.after_upload",
    "push.before_commit",
    "push.after_commit",
    "push.after_record",
    "sync.before_state",
]


def _prepare(kit: Kit, url: str | None = None) -> tuple[Replica, Replica, dict[str, bytes]]:
    """Replicas a and b in step on INIT; b has pushed its changes; a has its own, not yet synced."""
    a = kit.replica(INIT, url=url)
    b = kit.replica()
    a.sync()
    b.sync()
    b.write("r-mod.md", "r-mod v2 by b\n")
    b.delete("r-del.md")
    b.move("r-mv.md", "moved/r-mv.md")
    b.move("r-mvmod.md", "moved/r-mvmod.md")
    b.sync()  # moved, then edited: a reads both in one remote state, a move with new bytes
    b.write("moved/r-mvmod.md", "r-mvmod v2 by b\n")
    b.chmod_x("r-x.sh")
    b.write("r-new.md", "r-new by b\n")
    b.write("both.bin", b"\x00both by b")
    b.write("mvmod.md", "mvmod v2 by b\n")
    b.sync()
    a.write("l-mod.md", "l-mod v2 by a\n")
    a.delete("l-del.md")
    a.move("l-mv.md", "local/l-mv.md")
    a.write("l-new.md", "l-new by a\n")
    a.write("both.bin", b"\x00both by a")
    a.move("mvmod.md", "local/mvmod.md")
    return a, b, a.tree()


def _check_after_kill(a: Replica, before: dict[str, bytes]) -> None:
    """Unison's invariant: each path holds its old or its new bytes; local edits are all still here."""
    assert a.journal_ok()
    now = a.tree()
    for path, data in now.items():
        allowed = {before.get(path), EXPECTED.get(path)} | BETWEEN.get(path, set())
        if ".conflict-" in path:
            allowed.add(b"\x00both by a")
        assert data in allowed, f"{path} holds bytes it never had: {data!r}"
    for data in A_WRITES:
        assert data in now.values(), f"local edit {data!r} is gone"


def _check_converged(kit: Kit, a: Replica, b: Replica, revisions: int) -> None:
    converge(a, b, rounds=1)
    tree = assert_converged(a, b)
    assert {p: d for p, d in tree.items() if ".conflict-" not in p} == EXPECTED
    assert [tree[p] for p in a.copies()] == [b"\x00both by a"]
    assert a.executable("r-x.sh") and b.executable("r-x.sh")
    assert a.leftovers() == [] and b.leftovers() == [] and a.journal_ok() and b.journal_ok()
    log = kit.log()
    no_duplicate_revisions(log)
    assert len(log) == revisions


@pytest.fixture(scope="module")
def revisions(tmp_path_factory, shared_server):
    """How many server revisions the scenario makes when nothing is killed."""
    kit = Kit(tmp_path_factory.mktemp("reference"), shared_server)
    a, b, _before = _prepare(kit)
    a.sync()
    converge(a, b)
    assert {p: d for p, d in a.tree().items() if ".conflict-" not in p} == EXPECTED
    return len(kit.log())


@pytest.mark.parametrize("point", FAILPOINTS)
def test_a_round_killed_at_each_step_is_finished_by_the_next(kit, revisions, point):
    """Killed at this step, the round leaves old-or-new files only, and the next round converges exactly."""
    a, b, before = _prepare(kit)
    killed = a.proc("sync", SYNCENGINE_FAILPOINT=point)
    assert killed.code == -signal.SIGKILL, f"{point} was never reached: {killed.stdout}{killed.stderr}"
    _check_after_kill(a, before)
    report = a.sync()
    assert not report.problems
    _check_converged(kit, a, b, revisions)


def test_a_round_killed_after_a_refused_push_is_finished_by_the_next(kit, revisions):
    """A commit refused because another replica got there first, then a kill on the re-pull: still exact."""
    proxy = FaultProxy(kit.server.url).start()
    try:
        a, b, before = _prepare(kit, url=proxy.url)
        raced: list[str] = []

        def race(method, path, status, headers, body):
            # Right after a's first look at the feed, b commits an edit a is about to push on top of.
            if method == "GET" and "/changes" in path and not raced:
                raced.append(path)
                b.write("l-mod.md", "l-mod v1\n\n")
                b.sync()
            return None

        proxy.rewrites.append(race)
        killed = a.proc("sync", SYNCENGINE_FAILPOINT="sync.after_repull")
        assert raced and killed.code == -signal.SIGKILL, killed.stderr
    finally:
        proxy.stop()
    _check_after_kill(a, before)
    a.repoint(kit.server.url, a.token)
    a.sync()
    converge(a, b)
    tree = assert_converged(a, b)
    assert b"l-mod v2 by a\n" in tree.values() and a.leftovers() == []
    no_duplicate_revisions(kit.log())


# ---------------------------------------------------------------- random kills of large rounds


def _kill_when(replica: Replica, ready, timeout: float = 120) -> bool:
    """Start `syncengine sync`, SIGKILL it once ``ready()`` holds; True if it was killed mid-round."""
    proc = subprocess.Popen([sys.executable, "-m", "cli", "-C", str(replica.root), "sync", "--force"],
                            env=cli_env(), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        def reached() -> bool:
            try:
                return ready()
            except FileNotFoundError:  # the round moved a file between our listing and our read
                return False

        wait_until(lambda: proc.poll() is not None or reached(), timeout=timeout, interval=0.005,
                   message="the round to reach the kill point")
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        code = proc.wait(timeout)
        assert code in (0, -signal.SIGKILL), proc.stderr.read().decode() if proc.stderr else code
        return code == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr:
            proc.stderr.close()


def _random_kills(kit: Kit, size: int, kills: int, seed: int) -> None:
    rng = random.Random(seed)
    print(f"seed {seed}")
    files = {f"d{i % 17}/f{i:04d}.json": f'{{"n": {i}, "v": 1}}\n' for i in range(size)}
    a = kit.replica(files)
    b = kit.replica({f"b-only/{i}.txt": f"b {i}\n" for i in range(size // 20)})
    versions = {v.encode() for v in files.values()}

    def check(replica: Replica) -> None:
        assert replica.journal_ok()
        for path, data in replica.tree().items():
            assert data in versions or path.startswith("b-only/"), f"{path} is torn: {data!r}"

    # 1. a's first upload, killed as the server's log grows.
    for _ in range(kills):
        goal = rng.randrange(1, size)
        _kill_when(a, lambda goal=goal: len(kit.log()) >= goal)
        check(a)
    a.sync()
    # 2. b's first download (and upload of its own files), killed as files land.
    for _ in range(kills):
        goal = rng.randrange(1, size)
        _kill_when(b, lambda goal=goal: len(b.tree()) >= goal)
        check(b)
    b.sync()
    converge(a, b)
    # 3. edits on both sides (a: even files, b: every third odd one, some deletions), b's round killed.
    for i in range(0, size, 2):
        data = f'{{"n": {i}, "v": 2}}\n'
        a.write(f"d{i % 17}/f{i:04d}.json", data)
        versions.add(data.encode())
    a.sync()
    for i in range(1, size, 6):
        data = f'{{"n": {i}, "v": 3}}\n'
        b.write(f"d{i % 17}/f{i:04d}.json", data)
        versions.add(data.encode())
    for i in range(3, size, 30):
        b.delete(f"d{i % 17}/f{i:04d}.json")
    for _ in range(kills):
        goal = rng.randrange(1, size // 2)
        _kill_when(b, lambda goal=goal: sum(1 for d in b.tree().values() if b'"v": 2' in d) >= goal)
        check(b)
    b.sync()
    converge(a, b)
    tree = assert_converged(a, b)
    assert not a.copies() and a.leftovers() == [] and b.leftovers() == []
    assert sum(1 for d in tree.values() if b'"v": 2' in d) == size // 2
    assert len(tree) == size + size // 20 - len(range(3, size, 30))
    no_duplicate_revisions(kit.log())


def test_random_kills_of_a_round_then_convergence(kit):
    """A round of 60 files killed at random points, three times per phase, still converges exactly."""
    _random_kills(kit, 60, 3, seed=random.randrange(1 << 30))


@pytest.mark.soak
@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_random_kills_of_a_large_round_then_convergence(kit, seed):
    """600 files, killed at random points six times per phase: nothing lost, torn or doubled."""
    _random_kills(kit, 600, 6, seed=seed)


@pytest.mark.parametrize("point", ["apply.after_park", "apply.after_park:2", "apply.after_move"])
def test_crossing_moves_killed_midway_converge(kit, point):
    """Swapped names, killed while a file is parked or half the swap is done: both files survive, names converge."""
    a = kit.replica({"x.txt": "X\n", "y.txt": "Y\n"})
    b = kit.replica()
    converge(a, b)
    for old, new in (("x.txt", "tmp"), ("y.txt", "x.txt"), ("tmp", "y.txt")):
        b.move(old, new)
        b.sync()
    killed = a.proc("sync", SYNCENGINE_FAILPOINT=point)
    assert killed.code == -signal.SIGKILL, killed.stdout + killed.stderr
    assert a.journal_ok() and sorted(a.tree().values()) == [b"X\n", b"Y\n"]
    a.sync()
    converge(a, b, rounds=1)
    assert assert_converged(a, b) == {"x.txt": b"Y\n", "y.txt": b"X\n"}
    assert a.leftovers() == [] and len(kit.log()) == 2 + 3
