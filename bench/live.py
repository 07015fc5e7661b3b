"""Live benchmark: how fast an edit in one folder reaches another, and how fast the watcher journals.

    .venv/bin/python bench/live.py [--edits 100] [--burst 10000] [--quick] [--json]

Setup (not timed): ``syncengine serve`` (SQLite) on 127.0.0.1, two
workspaces A and B on it, a daemon on each (``syncengine daemon start``),
both subscribed to live updates.

* propagation — a JSON document in A is rewritten ``--edits`` times, one
  edit at a time; each is timed from the write in A until B's copy on disk
  has the new bytes (B is read every millisecond). Every step is real: A's
  watcher and change tracker, A's sync round (blob + commit), the server's
  WebSocket announcement, B's pull, download and atomic write. Reported:
  median and p95.
* watcher burst — with A's syncing paused (so only watching and journaling
  are measured), ``--burst`` new files are written into a folder A already
  watches as fast as Python can; timed from the first write until the last
  file is in A's journal. Reported: changes journaled per second, and the
  daemon's CPU. Then syncing is resumed and the time until all of them are
  on disk in B is reported too (``burst to B``).

``--json`` prints one JSON object: ``figures`` (the numbers above) and
``rows`` (the same as rows of the common table, for bench/run_all.py).
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    RUN_DIR,
    VENV_BIN,
    Failed,
    Row,
    Usage,
    free_port,
    fresh_dir,
    machine,
    prepare_python,
    process_tree,
    quiesce,
    say,
    servers,
    start_server,
    table,
)

WORKSPACE = "live"
POLL = 0.001  # how often B's file (or A's journal) is looked at while timing


def syncengine(*args: str | Path, log: Path) -> str:
    """Run the CLI (not timed); its stdout, or Failed with the log's path."""
    with open(log, "ab") as err:
        done = subprocess.run([str(VENV_BIN / "syncengine"), *map(str, args)], stdout=subprocess.PIPE,
                              stderr=err, stdin=subprocess.DEVNULL)
    if done.returncode != 0:
        raise Failed(f"syncengine {' '.join(map(str, args[:4]))} ... exited {done.returncode}; see {log}")
    return done.stdout.decode()


def daemon_state(root: Path) -> dict:
    try:
        return json.loads((root / ".syncengine" / "daemon.json").read_text())
    except (OSError, ValueError):
        return {}


def wait_for(predicate, timeout: float, what: str, interval: float = 0.05) -> float:
    """Poll until ``predicate()``; returns the perf_counter time it held, or raises Failed."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return time.perf_counter()
        if time.monotonic() > deadline:
            raise Failed(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def cpu_seconds(pid: int) -> float:
    """User+sys CPU of a process and its threads (and any children), from /proc."""
    total = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    for p in process_tree(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += sum(int(x) for x in fields[11:15]) / tick
    return total


def read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


def document(i: int) -> bytes:
    zones = [{"id": f"z{k}", "page": 1, "text": f"zone {k}" + (f" edit {i}" if k == i % 8 else "")}
             for k in range(8)]
    return (json.dumps({"id": "doc", "version": i, "zones": zones}, indent=1) + "\n").encode()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


class Pair:
    """A server and two workspaces with running daemons (set up untimed, torn down whatever happens)."""

    def __init__(self, base: Path, started: list) -> None:
        self.base = base
        self.log = base / "log.txt"
        self.a = base / "A"
        self.b = base / "B"
        port = free_port()
        data = base / "server"
        self.server = start_server("syncengine", [str(VENV_BIN / "syncengine"), "serve", "--port", str(port),
                                                  "--data", str(data), "--log-level", "warning"],
                                   self.log, port=port, health=f"http://127.0.0.1:{port}/v1/health")
        started.append(self.server)
        token_file = base / "token.txt"
        token_file.write_text(syncengine("token", "create", "--workspace", WORKSPACE, "--data", data, log=self.log))
        for root in (self.a, self.b):
            root.mkdir()
            syncengine("init", root, "--server", f"http://127.0.0.1:{port}", "--workspace", WORKSPACE,
                       "--token-file", token_file, log=self.log)
        self.pids = {}
        for root in (self.a, self.b):
            syncengine("-C", root, "daemon", "start", log=self.log)
            self.pids[root] = int((root / ".syncengine" / "daemon.pid").read_text())
        wait_for(lambda: all(daemon_state(r).get("live") == "connected" and daemon_state(r).get("state") == "watching"
                             for r in (self.a, self.b)), 60, "both daemons to watch and subscribe")

    def stop(self) -> None:
        for root in (self.a, self.b):
            try:
                syncengine("-C", root, "daemon", "stop", log=self.log)
            except Failed as exc:
                say(f"  ({exc})")


def propagation(pair: Pair, edits: int) -> list[float]:
    """Seconds from each write in A until B's file has the same bytes."""
    src, dst = pair.a / "doc.json", pair.b / "doc.json"
    src.write_bytes(document(0))
    wait_for(lambda: read(dst) == document(0), 60, "the document in B")
    time.sleep(1.0)  # let both daemons settle after the first sync (not timed)
    latencies = []
    for i in range(1, edits + 1):
        data = document(i)
        started = time.perf_counter()
        src.write_bytes(data)
        arrived = wait_for(lambda data=data: read(dst) == data, 30, f"edit {i} in B", interval=POLL)
        latencies.append(arrived - started)
        time.sleep(0.05)  # one edit at a time: the next write starts after B's round ended
    return latencies


def journaled(root: Path, prefix: str) -> int:
    with sqlite3.connect(f"file:{root / '.syncengine' / 'journal.db'}?mode=ro", uri=True, timeout=30) as db:
        return db.execute("SELECT COUNT(*) FROM document WHERE path LIKE ?", (prefix + "%",)).fetchone()[0]


def burst(pair: Pair, count: int) -> dict:
    """Write ``count`` files into a watched folder of A with syncing paused; time the journaling."""
    folder = pair.a / "burst"
    folder.mkdir()
    (folder / "seed.txt").write_text("seed")
    wait_for(lambda: journaled(pair.a, "burst/") == 1, 60, "the burst folder to be watched")
    syncengine("-C", pair.a, "daemon", "pause", log=pair.log)
    wait_for(lambda: daemon_state(pair.a).get("sync") in ("paused", "idle"), 60, "A to pause")
    quiesce()
    pid = pair.pids[pair.a]
    cpu_before = cpu_seconds(pid)
    started = time.perf_counter()
    for i in range(count):
        (folder / f"f{i:05d}.txt").write_text(f"burst file {i}\n")
    written = time.perf_counter()
    done = wait_for(lambda: journaled(pair.a, "burst/") == count + 1, 600, "the burst to be journaled",
                    interval=0.02)
    cpu = cpu_seconds(pid) - cpu_before
    syncengine("-C", pair.a, "daemon", "resume", log=pair.log)
    resumed = time.perf_counter()
    last = pair.b / "burst" / f"f{count - 1:05d}.txt"
    arrived = wait_for(lambda: last.exists() and sum(1 for _ in (pair.b / "burst").iterdir()) >= count + 1,
                       900, "the burst in B", interval=0.1)
    return {"files": count, "write_s": written - started, "journaled_s": done - started,
            "per_s": count / (done - started), "daemon_cpu_s": cpu, "to_b_s": arrived - resumed}


def collect(edits: int, count: int) -> tuple[dict, list[Row]]:
    base = fresh_dir(RUN_DIR / "live")
    with servers() as started:
        say(f"live: server and two daemons in {base}")
        pair = Pair(base, started)
        try:
            say(f"  propagation: {edits} edits A -> B")
            latencies = propagation(pair, edits)
            say(f"  watcher burst: {count} files")
            b = burst(pair, count)
        finally:
            pair.stop()
    figures = {
        "edits": edits,
        "propagation_median_s": statistics.median(latencies),
        "propagation_p95_s": percentile(latencies, 0.95),
        "propagation_min_s": min(latencies),
        "propagation_max_s": max(latencies),
        "burst": b,
    }
    rows = [
        Row("live", "syncengine", "propagation median", figures["propagation_median_s"], 1,
            note=f"A write -> B disk, median of {edits}"),
        Row("live", "syncengine", "propagation p95", figures["propagation_p95_s"], 1, note=f"p95 of {edits}"),
        Row.of("live", "syncengine", f"watcher burst {count}", Usage(b["journaled_s"], b["daemon_cpu_s"]), count,
               note=f"write -> journaled, syncing paused ({b['per_s']:.0f} changes/s)"),
        Row("live", "syncengine", f"burst {count} to B", b["to_b_s"], count,
            note="after resume, until all are on B's disk"),
    ]
    return figures, rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--edits", type=int, default=100, help="edits timed A -> B (default 100)")
    parser.add_argument("--burst", type=int, default=10_000, help="files in the watcher burst (default 10000)")
    parser.add_argument("--quick", action="store_true", help="20 edits and 2,000 files, to check the plumbing")
    parser.add_argument("--json", action="store_true", help="print one JSON object (figures and rows)")
    args = parser.parse_args(argv)
    edits, count = (20, 2_000) if args.quick else (args.edits, args.burst)
    prepare_python()
    try:
        figures, rows = collect(edits, count)
    except Failed as exc:
        say(f"live: FAILED: {exc}")
        if args.json:
            print(json.dumps({"bench": "live", "error": str(exc),
                              "rows": [Row("live", "syncengine", "all", None, note=f"FAILED: {exc}").to_dict()]}))
        return 1
    if args.json:
        print(json.dumps({"bench": "live", "machine": machine(), "figures": figures,
                          "rows": [r.to_dict() for r in rows]}, indent=1))
        return 0
    b = figures["burst"]
    print(f"\n{machine()}\n")
    print(f"propagation A -> B over {edits} edits: median {figures['propagation_median_s'] * 1000:.0f} ms, "
          f"p95 {figures['propagation_p95_s'] * 1000:.0f} ms "
          f"(min {figures['propagation_min_s'] * 1000:.0f}, max {figures['propagation_max_s'] * 1000:.0f})")
    print(f"watcher burst: {b['files']} files written in {b['write_s']:.2f} s, all journaled after "
          f"{b['journaled_s']:.2f} s: {b['per_s']:.0f} changes/s, daemon CPU {b['daemon_cpu_s']:.2f} s; "
          f"in B {b['to_b_s']:.1f} s after resume\n")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
