"""Scale: memory stays bounded by the work, not by the size of a file or of the workspace.

Every figure comes from real processes: `syncengine sync` subprocesses
(peak RSS from /proc/PID/status, VmHWM) against a real `syncengine serve` (VmHWM, reset
through /proc/PID/clear_refs before each phase). The figures are printed
(`make soak` shows them with -s) and bounded; nothing here asserts a time.

``make test`` streams a 40 MB file both ways; ``make soak`` a 200 MB one,
and a 50,000-file workspace: initial sync, no-op sync, 100-change sync.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import REPO, cli_env
from tests.replicas import ServeProcess

pytestmark = pytest.mark.integration

MIB = 1024  # KiB


@dataclass
class Measured:
    code: int
    stdout: str
    stderr: str
    peak_kib: int  # the client's peak RSS (KiB)
    seconds: float


def measured(*args: str | Path, input: str | None = None) -> Measured:
    """Run `syncengine ARGS` as a subprocess, watching its peak RSS (VmHWM) until it exits.

    Not wait4's ru_maxrss: a child forked from this test process keeps the
    test's own high-water mark across exec. VmHWM only rises, so the last
    reading is the peak, short of whatever the last 5 ms added.
    """
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        started = time.monotonic()
        proc = subprocess.Popen([sys.executable, "-m", "cli", *map(str, args)], stdout=out, stderr=err,
                                stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
                                env=cli_env(), cwd=REPO)
        if input is not None:
            proc.stdin.write(input.encode())
            proc.stdin.close()
        peak = 0
        while proc.poll() is None:
            with contextlib.suppress(OSError, AssertionError):
                peak = max(peak, _proc_status(proc.pid, "VmHWM"))
            time.sleep(0.005)
        seconds = time.monotonic() - started
        out.seek(0)
        err.seek(0)
        return Measured(proc.returncode, out.read().decode(), err.read().decode(), peak, seconds)


def _proc_status(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {key} in /proc/{pid}/status")


class ServerPhase:
    """The server's memory over one phase: RSS before it, peak during it (KiB)."""

    def __init__(self, server: ServeProcess) -> None:
        self.pid = server.proc.pid

    def __enter__(self) -> ServerPhase:
        Path(f"/proc/{self.pid}/clear_refs").write_text("5")  # VmHWM := VmRSS
        self.before = _proc_status(self.pid, "VmRSS")
        return self

    def __exit__(self, *exc: object) -> None:
        self.peak = _proc_status(self.pid, "VmHWM")

    @property
    def growth(self) -> int:
        return self.peak - self.before


def _init(root: Path, server: ServeProcess, token: str, workspace: str) -> Measured:
    result = measured("init", root, "--server", server.url, "--workspace", workspace, "--token-file", "-",
                      input=token + "\n")
    assert result.code == 0, result.stderr
    return result


def _sync(root: Path) -> tuple[Measured, dict]:
    result = measured("-C", root, "sync", "--json")
    assert result.code == 0, result.stderr + result.stdout
    return result, json.loads(result.stdout)


def _write_random(path: Path, size: int, seed: int) -> str:
    """An incompressible file of ``size`` bytes, written in 1 MiB steps; returns its sha256."""
    rng = random.Random(seed)
    digest = hashlib.sha256()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        left = size
        while left:
            chunk = rng.randbytes(min(left, 1 << 20))
            digest.update(chunk)
            fh.write(chunk)
            left -= len(chunk)
    return digest.hexdigest()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


@pytest.mark.parametrize("mib", [40, pytest.param(200, marks=pytest.mark.soak)], ids=lambda m: f"{m}MB")
def test_large_file_syncs_without_being_held_in_memory(tmp_path: Path, mib: int):
    """A large file goes up and comes down with client and server memory growing by well under its size."""
    size = mib << 20
    with ServeProcess(tmp_path / "data", tmp_path / "serve.log", "--log-level", "warning") as server:
        token = server.token("big")
        a, b = tmp_path / "a", tmp_path / "b"
        a.mkdir()
        (a / "small.md").write_text("# a small file, so that the baselines sync something\n")
        _init(a, server, token, "big")
        _init(b, server, token, "big")
        _sync(a)
        _sync(b)
        baseline_up, _ = _sync(a)  # a no-op round: the same code loaded, no blob
        digest = _write_random(a / "media" / "big.bin", size, seed=mib)

        with ServerPhase(server) as server_up:
            up, report = _sync(a)
        assert report["pushed"] == ["media/big.bin"], report

        with ServerPhase(server) as server_down:
            down, report = _sync(b)
        assert report["downloaded"] == ["media/big.bin"], report
        assert _sha256(b / "media" / "big.bin") == digest
        baseline_down, _ = _sync(b)

    figures = {
        "file MiB": mib,
        "client up peak MiB": up.peak_kib // MIB, "client no-op peak MiB": baseline_up.peak_kib // MIB,
        "client down peak MiB": down.peak_kib // MIB,
        "server up growth MiB": server_up.growth // MIB, "server down growth MiB": server_down.growth // MIB,
        "up s": round(up.seconds, 1), "down s": round(down.seconds, 1),
    }
    print(f"\nlarge file: {figures}")
    # Half the file (40 MB) or 50 MiB (200 MB), in KiB: whole, it would add
    # the file's size at least; streamed, it adds a few MiB of buffers.
    bound = min(size // 2, 50 << 20) // 1024
    assert up.peak_kib - baseline_up.peak_kib < bound, figures
    assert down.peak_kib - baseline_down.peak_kib < bound, figures
    assert server_up.growth < bound, figures
    assert server_down.growth < bound, figures


# ---------------------------------------------------------------- a 50,000-file workspace

WORDS = ("invoice", "total", "amount", "date", "customer", "page", "table", "row", "note", "label", "text")


def _document(i: int, rng: random.Random, version: int = 0) -> bytes:
    """A 1–3 KB JSON document of zones."""
    zones = [{"id": f"z{z}", "page": 1 + z % 3, "bbox": [rng.randint(0, 600) for _ in range(4)],
              "label": rng.choice(WORDS), "text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 20)))}
             for z in range(rng.randint(6, 20))]
    return (json.dumps({"id": f"doc{i:06d}", "version": version, "zones": zones}, indent=1) + "\n").encode()


def _rel(i: int) -> str:
    return f"d{i // 1000:02d}/s{(i // 100) % 10}/doc{i:06d}.json"


def _write_corpus(root: Path, n: int) -> None:
    rng = random.Random(1)
    stamp = time.time() - 3600  # written long before the sync, as files usually are
    for i in range(n):
        path = root / _rel(i)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(_document(i, rng))
        os.utime(path, (stamp, stamp))


@pytest.mark.soak
@pytest.mark.timeout(1800)
def test_fifty_thousand_files_initial_noop_and_changed_sync_in_bounded_memory(tmp_path: Path):
    """50,000 files: initial, no-op and 100-change rounds converge, with CLI and server memory bounded."""
    n = 50_000
    root = tmp_path / "ws"
    _write_corpus(root, n)
    rows: dict[str, dict] = {}

    def phase(name: str, server: ServeProcess, run) -> dict:
        with ServerPhase(server) as srv:
            result, report = run()
        rows[name] = {"s": round(result.seconds, 2), "client peak MiB": result.peak_kib // MIB,
                      "server peak MiB": srv.peak // MIB, "server growth MiB": srv.growth // MIB}
        return report

    with ServeProcess(tmp_path / "data", tmp_path / "serve.log", "--log-level", "warning") as server:
        token = server.token("scale")
        phase("init (first scan)", server, lambda: (_init(root, server, token, "scale"), None))
        report = phase("initial sync", server, lambda: _sync(root))
        assert len(report["pushed"]) == n
        report = phase("round after the first", server, lambda: _sync(root))
        assert report["pulled"] == 0  # the push moved the checkpoint past its own 50,000 changes
        report = phase("no-op sync", server, lambda: _sync(root))
        assert report["pushed"] == [] and report["downloaded"] == [] and report["scan"]["hashed"] == 0
        rng = random.Random(2)
        picked = rng.sample(range(n), 90)
        for i in picked[:80]:
            (root / _rel(i)).write_bytes(_document(i, rng, version=1))
        for i in picked[80:]:
            (root / _rel(i)).unlink()
        for k in range(10):
            (root / _rel(n + k)).parent.mkdir(parents=True, exist_ok=True)
            (root / _rel(n + k)).write_bytes(_document(n + k, rng))
        report = phase("100-change sync", server, lambda: _sync(root))
        assert len(report["pushed"]) == 100, report
        assert report["scan"]["hashed"] <= 100 + 100  # the changed files, and racy ones at most

        # A second replica catches up on the whole workspace from the listing.
        other = tmp_path / "other"
        other.mkdir()
        phase("second replica init", server, lambda: (_init(other, server, token, "scale"), None))
        report = phase("second replica catch-up", server, lambda: _sync(other))
        assert len(report["downloaded"]) == n

    print("\n50,000 files:")
    for name, row in rows.items():
        print(f"  {name:<26} {row}")
    for name, row in rows.items():
        # Bounds with room for the noise of a shared machine; the figures are in docs/performance.md.
        assert row["client peak MiB"] < 400, (name, row)
        assert row["server peak MiB"] < 400, (name, row)
    assert rows["no-op sync"]["client peak MiB"] < 200, rows["no-op sync"]
    assert rows["100-change sync"]["server growth MiB"] < 50, rows["100-change sync"]
