"""Convergence under random concurrent edits and faults (RELIABILITY: safety and liveness).

Three replicas and one real ``syncengine serve`` process, with the fault
proxy of the wire tests between them. A seeded ``random.Random`` drives
creates, edits (different and identical JSON fields, text lines, binaries),
rival edits of one document on two replicas, deletes, moves, chmods,
snapshots, the harshest gc, and syncs in random order — some of them real
`syncengine sync` processes racing the user's typing and another replica's
round — and injects faults: the server restarted (and unreachable
meanwhile), connections dropped after the server answered but before the
replica heard (mid-batch: the commit or upload landed, its answer is lost),
and `syncengine sync` processes killed with SIGKILL at a random failpoint.
The helpers are in ``tests/chaoskit.py``.

Afterwards every replica syncs until a round does nothing, and then:

* every replica holds exactly the server's listing, byte for byte, with its
  executable bits (liveness);
* every write is still somewhere: each write puts a unique token into the
  content, and each token is in a final file (conflict copies included), in
  a version a replica's journal names (change log, snapshots, bases,
  conflicts) or in the server's change log (safety). A write its own
  replica overwrote or deleted before any sync of it completed is the
  user's own undo and is not required (no engine without a watcher could
  have seen it); the others are, including any the engine itself overwrote.

``make test`` runs a few seeds of a short run; ``make soak`` runs thousands
of steps (``SYNCENGINE_SOAK_STEPS``, ``SYNCENGINE_SOAK_SEED``) and adds
kills at random moments. The seed fixes the steps drawn; what a racing
round or a timed kill meets depends on timing (and client ids are random),
so a failing seed may take a few reruns to reproduce — each failure names
its seed and prints the run's counts.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path

import pytest

from syncengine import Workspace
from syncengine.blobs import BlobStore
from syncengine.errors import GuardError, RemoteError
from syncengine.remote import HttpRemote
from tests.chaoskit import TOKEN, Ledger, Server, Wire
from tests.synckit import Kit, Replica, no_duplicate_revisions

pytestmark = pytest.mark.integration

FAILPOINTS = (
    "sync.after_scan", "sync.after_pull", "push.after_upload", "push.before_commit", "push.after_commit",
    "push.after_record", "apply.after_temp", "apply.after_aside", "apply.after_rename", "apply.after_write",
    "apply.after_move", "apply.after_delete", "apply.after_copy", "apply.before_journal",
)
FOLDERS = ("", "docs/", "notes/", "bin/")
FIELDS = ("title", "owner", "status", "body", "tags")


# ---------------------------------------------------------------- the run


class Run:
    """One seeded run: the replicas, the faults, and the steps that drive them."""

    def __init__(self, tmp: Path, seed: int, soak: bool = False) -> None:
        self.rng = random.Random(seed)
        self.soak = soak
        self.seed = seed
        self.tmp = tmp
        self.server = Server(tmp)
        self.server.start()
        self.wire = Wire(self.server.url)
        self.kit = Kit(tmp, self.server, url=self.wire.url)
        self.workspace = self.kit.ws
        self.replicas = [self.kit.replica(name=f"r{i}", retries=2) for i in range(3)]
        self.ledger = Ledger(seed)
        self.names = 0
        self.stats: dict[str, int] = {}

    def close(self) -> None:
        self.wire.close()
        if self.server.proc is not None:
            self.server.stop()

    def note(self, what: str) -> None:
        self.stats[what] = self.stats.get(what, 0) + 1

    def name(self, r: Replica) -> str:
        return r.root.name

    # ------------------------------------------------------------ user actions

    def put(self, r: Replica, rel: str, data: bytes | str) -> None:
        """The user writes a file; tokens the old bytes held and the new do not are removed by the user."""
        data = data.encode() if isinstance(data, str) else data
        old = (r.root / rel).read_bytes() if (r.root / rel).exists() else b""
        self.ledger.removed(self.name(r), set(TOKEN.findall(old)) - set(TOKEN.findall(data)))
        r.write(rel, data)

    def files(self, r: Replica, ext: str | None = None) -> list[str]:
        return sorted(p for p in r.tree() if ext is None or p.endswith(ext))

    def create(self, r: Replica) -> None:
        self.names += 1
        kind = self.rng.choice(["json", "md", "bin"])
        rel = f"{self.rng.choice(FOLDERS)}{kind}{self.names}.{kind}"
        mine = {p.casefold() for p in self.files(r)}
        others = sorted({p for o in self.replicas if o is not r for p in self.files(o, f".{kind}")
                         if ".conflict-" not in p and p.casefold() not in mine})
        if others and self.rng.random() < 0.3:
            # A name only another replica has yet, in other case: one name to a case-insensitive disk.
            folder, _, name = self.rng.choice(others).rpartition("/")
            stem = name[: -len(kind)].upper()  # the extension (the kind) stays as it was
            rel = f"{folder}/{stem}{kind}" if folder else f"{stem}{kind}"
            self.note("create-case-twin")
        if kind == "json":
            doc = {f: self.ledger.token(self.name(r)) for f in FIELDS}
            data = (json.dumps(doc, indent=2) + "\n").encode()
        elif kind == "md":
            data = "".join(f"line {self.ledger.token(self.name(r))}\n" for _ in range(6)).encode()
        else:
            data = self._binary(r)
        self.put(r, rel, data)
        self.note("create")

    def _binary(self, r: Replica) -> bytes:
        tok = self.ledger.token(self.name(r)).encode()
        return b"\x00\x01" + self.rng.randbytes(300) + tok + self.rng.randbytes(200)

    def edit_json(self, r: Replica, value: str | None = None, rel: str | None = None, key: str | None = None) -> bool:
        docs = [p for p in self.files(r, ".json") if ".conflict-" not in p]
        rel = rel or (self.rng.choice(docs) if docs else None)
        if rel is None or not (r.root / rel).exists():
            return False
        try:
            doc = json.loads(r.read(rel))
        except ValueError:
            return False
        doc[key or self.rng.choice(FIELDS)] = value or self.ledger.token(self.name(r))
        self.put(r, rel, json.dumps(doc, indent=2) + "\n")
        self.note("edit-json")
        return True

    def same_json_edit(self) -> None:
        """Two replicas set the same field of the same document to the same value: identical, not conflicting."""
        a, b = self.rng.sample(self.replicas, 2)
        common = sorted(set(self.files(a, ".json")) & set(self.files(b, ".json")))
        common = [p for p in common if ".conflict-" not in p]
        if not common:
            return
        rel, key = self.rng.choice(common), self.rng.choice(FIELDS)
        value = self.ledger.fresh()
        for r in (a, b):
            if self.edit_json(r, value, rel, key):
                self.ledger.add(self.name(r), value)
        self.note("same-json-edit")

    def rival_edits(self) -> None:
        """Two replicas edit one document before either syncs: other fields or lines (merged) or the same (a copy)."""
        a, b = self.rng.sample(self.replicas, 2)
        ext = self.rng.choice([".json", ".md", ".bin"])
        common = [p for p in sorted(set(self.files(a, ext)) & set(self.files(b, ext))) if ".conflict-" not in p]
        if not common:
            return
        rel = self.rng.choice(common)
        same = self.rng.random() < 0.4
        if ext == ".json":
            keys = self.rng.sample(FIELDS, 2)
            self.edit_json(a, None, rel, keys[0])
            self.edit_json(b, None, rel, keys[0] if same else keys[1])
        elif ext == ".md":
            for r in (a, b):
                lines = r.read(rel).decode(errors="replace").splitlines(keepends=True)
                at = 0 if same or r is a else len(lines) - 1
                if lines:
                    lines[at] = f"line {self.ledger.token(self.name(r))}\n"
                    self.put(r, rel, "".join(lines))
        else:
            for r in (a, b):
                self.put(r, rel, self._binary(r))
        self.note(f"rival-{'same' if same else 'other'}{ext}")

    def edit_text(self, r: Replica) -> None:
        texts = self.files(r, ".md")
        if not texts:
            return
        rel = self.rng.choice(texts)
        lines = r.read(rel).decode(errors="replace").splitlines(keepends=True)
        new = f"line {self.ledger.token(self.name(r))}\n"
        at = self.rng.randrange(len(lines) + 1)
        if lines and at < len(lines) and self.rng.random() < 0.6:
            lines[at] = new
        else:
            lines.insert(at, new)
        self.put(r, rel, "".join(lines))
        self.note("edit-text")

    def edit_binary(self, r: Replica) -> None:
        bins = self.files(r, ".bin")
        if bins:
            self.put(r, self.rng.choice(bins), self._binary(r))
            self.note("edit-binary")

    def delete(self, r: Replica) -> None:
        files = self.files(r)
        if len(files) > 3:
            rel = self.rng.choice(files)
            self.ledger.removed(self.name(r), set(TOKEN.findall(r.read(rel))))
            r.delete(rel)
            self.note("delete")

    def move(self, r: Replica) -> None:
        files = self.files(r)
        if not files:
            return
        old = self.rng.choice(files)
        name = old.rsplit("/", 1)[-1]
        if self.rng.random() < 0.5:
            stem, ext = name.split(".", 1)
            name = f"{stem}m{self.rng.randrange(100)}.{ext}"
        new = self.rng.choice(FOLDERS) + name
        if new != old and not (r.root / new).exists():
            r.move(old, new)
            self.note("move")

    def chmod(self, r: Replica) -> None:
        files = self.files(r)
        if files:
            rel = self.rng.choice(files)
            r.chmod_x(rel, not r.executable(rel))
            self.note("chmod")

    def snapshot(self, r: Replica) -> None:
        with Workspace(r.root) as ws:
            ws.snapshot("by the test")
        self.note("snapshot")

    def gc(self, r: Replica) -> None:
        """The harshest gc: every blob old enough, every snapshot but the newest pruned; bases must survive it."""
        with Workspace(r.root) as ws:
            for digest in ws.blobs.iter_digests():
                ws.blobs.set_stored_at(digest, 0)
            ws.config.history.keep_last = 1
            ws.gc("0s")
        self.note("gc")

    # ------------------------------------------------------------ syncing and faults

    def sync(self, r: Replica, quiet_check: bool = False):
        """One round through the API; a fault answered with exit 3 is fine, the changes stay queued."""
        seen = self.ledger.before_sync(self.name(r))
        try:
            try:
                report = r.sync()
            except GuardError:
                self.note("guard")
                report = r.sync(force=True)  # every deletion here is one the test made on purpose
        except RemoteError:
            self.note("sync-failed")
            return None
        self.ledger.synced(self.name(r), seen)
        self.note("sync")
        return report

    def killed_sync(self, r: Replica, points: tuple[str, ...] = FAILPOINTS, nth: tuple[int, ...] = (1, 1, 1, 2, 3),
                    ) -> bool:
        """`syncengine sync` as a real process, SIGKILLed at a random failpoint (if the round gets there)."""
        self.ledger.before_sync(self.name(r))
        point = f"{self.rng.choice(points)}:{self.rng.choice(nth)}"
        result = r.proc("sync", SYNCENGINE_FAILPOINT=point)
        assert result.code in (-9, 0, 1, 3), f"{point}: exit {result.code}: {result.stderr[-2000:]}"
        self.note(f"killed at {point}" if result.code == -9 else f"kill missed (exit {result.code})")
        return result.code == -9

    def concurrent(self) -> None:
        """A real `syncengine sync` of X runs while X's user keeps typing and Y syncs too (C8, CAS races).

        Edits made meanwhile only add (a new file, an appended line), so every
        token on disk when the round started is still there for the ledger.
        """
        import subprocess
        import sys

        from tests.helpers import REPO, cli_env

        x, y = self.rng.sample(self.replicas, 2)
        seen = self.ledger.before_sync(self.name(x))
        proc = subprocess.Popen([sys.executable, "-m", "cli", "-C", str(x.root), "sync"], cwd=REPO, env=cli_env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            for _ in range(self.rng.randint(1, 3)):
                self.append_text(x) if self.rng.random() < 0.6 else self.create(x)
            self.sync(y)
        finally:
            _out, err = proc.communicate(timeout=120)
        assert proc.returncode in (0, 1, 3), f"exit {proc.returncode}: {err.decode()[-2000:]}"
        if proc.returncode in (0, 1):
            self.ledger.synced(self.name(x), seen)
        self.note("concurrent")

    def append_text(self, r: Replica) -> None:
        texts = self.files(r, ".md")
        if texts:
            rel = self.rng.choice(texts)
            with open(r.root / rel, "ab") as fh:
                fh.write(f"line {self.ledger.token(self.name(r))}\n".encode())
            self.note("append-text")

    def killed_anywhere(self, r: Replica) -> None:
        """A real `syncengine sync` SIGKILLed after a random delay: between failpoints too, mid-SQLite-write."""
        import signal
        import subprocess
        import sys
        import time

        from tests.helpers import REPO, cli_env

        self.ledger.before_sync(self.name(r))
        proc = subprocess.Popen([sys.executable, "-m", "cli", "-C", str(r.root), "sync"], cwd=REPO, env=cli_env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(self.rng.uniform(0.2, 1.5))  # the fault itself: the run asserts nothing about when it lands
        proc.send_signal(signal.SIGKILL)
        _out, err = proc.communicate(timeout=60)
        assert proc.returncode in (-9, 0, 1, 3), f"exit {proc.returncode}: {err.decode()[-2000:]}"
        self.note("killed anywhere" if proc.returncode == -9 else "finished before the kill")

    def drop_next(self) -> None:
        self.wire.arm(self.rng.randint(1, 3), self.rng.choice(Wire.MIDBATCH))
        self.note("drop-armed")

    def restart_server(self) -> None:
        """Stop the server (gracefully or by SIGKILL), maybe under a running round, and start it again."""
        import subprocess
        import sys

        from tests.helpers import REPO, cli_env

        racer, other = self.rng.sample(self.replicas, 2)
        crash = self.rng.random() < 0.5
        proc = None
        if self.rng.random() < 0.5:  # a real round of another replica is under way when the server goes
            self.create(racer)
            seen = self.ledger.before_sync(self.name(racer))
            proc = subprocess.Popen([sys.executable, "-m", "cli", "-C", str(racer.root), "sync"], cwd=REPO,
                                    env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.server.stop(crash=crash)
        if self.sync(other) is not None:  # the server is down: the round must fail with exit 3
            raise AssertionError("a sync succeeded while the server was down")
        self.server.start()
        if proc is not None:
            _out, err = proc.communicate(timeout=120)
            assert proc.returncode in (0, 1, 3), f"exit {proc.returncode}: {err.decode()[-2000:]}"
            if proc.returncode in (0, 1):
                self.ledger.synced(self.name(racer), seen)
        self.server.restarts += 1
        self.note(f"restart{' (crash)' if crash else ''}{' under a round' if proc else ''}")

    # ------------------------------------------------------------ the random walk

    def step(self) -> None:
        """One random step; the weights are a rough mix of typing, syncing and faults."""
        r = self.rng.choice(self.replicas)
        steps = [
            (14, lambda: self.create(r)), (16, lambda: self.edit_json(r)), (10, lambda: self.edit_text(r)),
            (5, lambda: self.edit_binary(r)), (4, self.same_json_edit), (5, self.rival_edits),
            (5, lambda: self.delete(r)), (5, lambda: self.move(r)), (2, lambda: self.chmod(r)),
            (1, lambda: self.snapshot(r)), (1, lambda: self.gc(r)), (17, lambda: self.sync(r)),
            (4, self.concurrent), (6, self.drop_next), (3, lambda: self.killed_sync(r)), (1, self.restart_server),
            # Seconds each, and where the kill lands depends on timing: the long run only.
            (1 if self.soak else 0, lambda: self.killed_anywhere(r)),
        ]
        action = self.rng.choices([a for _w, a in steps], weights=[w for w, _a in steps])[0]
        action()

    def walk(self, steps: int) -> None:
        # Every fault at least once per run, at seeded places among the random steps.
        forced = {rng_step: fault for rng_step, fault in zip(
            self.rng.sample(range(steps), 3), ("restart", "kill", "drop"), strict=True)}
        for i in range(steps):
            fault = forced.get(i)
            if fault == "restart":
                self.restart_server()
            elif fault == "kill":  # a round with work to push, killed on its way (a dropped answer may stop it first)
                r = self.rng.choice(self.replicas)
                for _attempt in range(3):
                    self.create(r)
                    if self.killed_sync(r, ("sync.after_scan", "push.after_upload", "push.before_commit",
                                            "push.after_commit", "push.after_record"), nth=(1,)):
                        break
            elif fault == "drop":
                self.drop_next()
            self.step()

    def settle(self, max_rounds: int = 12) -> None:
        """Heal the wire, then sync every replica in turn until a whole pass of rounds does nothing."""
        self.wire.disarm()
        for _ in range(max_rounds):
            busy = False
            for r in self.replicas:
                report = self.sync(r)
                if report is None or report.downloaded or report.pushed or report.deleted or report.moved \
                        or report.problems:
                    busy = True
            if not busy:
                return
        raise AssertionError(f"seed {self.seed}: not quiet after {max_rounds} passes")

    # ------------------------------------------------------------ the checks

    def server_state(self) -> tuple[dict[str, tuple[str, bool]], list, bytes]:
        """The server's listing (path -> (hash, executable)), its change log, and every blob the log names."""
        with HttpRemote(self.server.url, self.workspace, self.replicas[0].token, retries=2) as remote:
            listing: dict[str, tuple[str, bool]] = {}
            after = None
            while True:
                page = remote.docs(after=after, limit=1000)
                listing.update({d.path: (d.hash, d.executable) for d in page.docs})
                if page.next is None:
                    break
                after = page.next
            log, since = [], 0
            while True:
                changes = remote.changes(since, 1000)
                log += changes.changes
                if not changes.more:
                    break
                since = changes.changes[-1].seq
            history = b"\n".join(remote.get(h) for h in sorted({c.hash for c in log if c.hash}))
        return listing, log, history

    def check(self) -> None:
        listing, log, server_history = self.server_state()
        no_duplicate_revisions(log)  # a replayed commit (dropped answer, kill) landed once
        for r in self.replicas:
            tree = r.tree()
            assert set(tree) == set(listing), (
                f"seed {self.seed}: {self.name(r)} differs from the server: "
                f"only here {sorted(set(tree) - set(listing))}, only there {sorted(set(listing) - set(tree))}")
            for path, (digest, executable) in listing.items():
                assert hashlib.sha256(tree[path]).hexdigest() == digest, f"seed {self.seed}: {path} on {self.name(r)}"
                assert r.executable(path) == executable, f"seed {self.seed}: mode of {path} on {self.name(r)}"
            assert r.leftovers() == [] and r.journal_ok(), f"seed {self.seed}: {self.name(r)} is not clean"
            status = r.status()
            quiet = status.pending.total == 0 and not status.errors and not status.conflicts
            assert quiet, f"seed {self.seed}: {self.name(r)}: {status}"
        # History a person can reach: the server's change log, and per replica every version its journal
        # names (change log, snapshots, bases, conflicts) — not blobs merely lying in the store.
        corpus = [server_history, *self.replicas[0].tree().values()]
        for r in self.replicas:
            named = {h for (h,) in r.rows("SELECT hash FROM change WHERE hash IS NOT NULL")}
            with Workspace(r.root) as ws:
                named |= ws.journal.referenced_hashes()
                store: BlobStore = ws.blobs
                corpus += [store.get(d) for d in sorted(named) if store.has(d)]
        found = {t for blob in corpus for t in TOKEN.findall(blob)}
        lost = sorted(self.ledger.must_survive() - found)
        assert not lost, f"seed {self.seed}: {len(lost)} write(s) silently lost: {lost[:10]}"


@pytest.fixture
def run_for(tmp_path):
    made: list[Run] = []

    def make(seed: int, soak: bool = False) -> Run:
        run = Run(tmp_path / f"seed{seed}", seed, soak)
        made.append(run)
        return run

    yield make
    for run in made:
        run.close()


def _one_run(run_for, seed: int, steps: int) -> Run:
    run = run_for(seed)
    run.walk(steps)
    run.settle()
    run.check()
    assert len(run.ledger.must_survive()) > 50, "the run wrote too little that had to survive"
    copies = sum(".conflict-" in p for p in run.replicas[0].tree())
    print(f"seed {seed}: {run.stats}, {len(run.ledger.must_survive())} writes kept, {run.ledger.undone} undone, "
          f"{run.wire.dropped} answers dropped, {copies} conflict copies")
    return run


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_three_replicas_converge_under_faults_and_lose_no_write(run_for, seed):
    """A short seeded random run with every fault ends with replicas equal to the server and every write kept."""
    run = _one_run(run_for, seed, steps=75)
    assert any(k.startswith("restart") for k in run.stats) and run.stats.get("drop-armed"), run.stats
    assert any(k.startswith("killed") for k in run.stats), run.stats


@pytest.mark.soak
@pytest.mark.timeout(6 * 3600)  # thousands of rounds, some of them real processes: far past the suite's 300 s
def test_soak_thousands_of_random_steps_converge_and_lose_no_write(run_for):
    """The long run (SYNCENGINE_SOAK_STEPS, default 3000; SYNCENGINE_SOAK_SEED) holds the same promises."""
    steps = int(os.environ.get("SYNCENGINE_SOAK_STEPS", "3000"))
    seed = int(os.environ.get("SYNCENGINE_SOAK_SEED", "20261126"))
    run = run_for(seed, soak=True)
    checkpoint = max(steps // 10, 100)
    for done in range(0, steps, checkpoint):
        run.walk(min(checkpoint, steps - done))
        run.settle()  # converge and check every so often, so a failure names a short stretch
        run.check()
    print(f"soak seed {seed}: {steps} steps, {run.stats}, {len(run.ledger.must_survive())} writes kept, "
          f"{run.ledger.undone} undone by their own replica before a sync")
