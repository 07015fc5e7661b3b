"""Shared plumbing of the benchmarks: the corpus, measured processes, and the one table.

Every figure is taken the same way for every tool: a client is a child
process whose wall time, CPU (user+sys) and peak RSS come from ``wait4``;
a server is a long-running child whose CPU is read from ``/proc/PID/stat``
before and after a phase and whose peak RSS (VmHWM) is reset through
``/proc/PID/clear_refs`` before each phase. Processes a server forks are
counted with it.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RUN_DIR = Path(os.environ.get("SYNCENGINE_BENCH_DIR", REPO / "bench-run"))
VENV_BIN = Path(sys.executable).parent
TICK = os.sysconf("SC_CLK_TCK")
# This machine's ext4 runs without a journal: creating many files right after
# deleting many is up to 20x slower, for 40 s or, after a big deletion, well
# over a minute (10,000 creates in 3.9 s instead of ~0.25 s, 60 s after one).
# That bills the tools whose servers create files (unison, rclone), not ours.
# After deleting an old run, the bench waits until creating files is as fast
# as before the deletion, at most this long.
SETTLE_SECONDS = float(os.environ.get("SYNCENGINE_BENCH_SETTLE", "240"))
SETTLE_MIN_SECONDS = 40  # the slowdown can start after a quiet spell: a probe at 5 s may still be fast
PROBE_FILES = 400

_WORDS = (
    "invoice", "total", "amount", "date", "customer", "address", "page", "header", "footer", "table", "row",
    "column", "cell", "signature", "stamp", "paragraph", "title", "caption", "figure", "note", "margin",
    "line", "word", "block", "region", "left", "right", "top", "bottom", "center", "name", "value", "field",
    "label", "text", "number", "order", "item", "price",
)
_LABELS = ("title", "paragraph", "table", "figure", "caption", "header", "footer", "stamp")



def say(text: str, end: str = "\n") -> None:
    """Progress goes to stderr, so that ``--json`` leaves stdout to the rows."""
    print(text, end=end, file=sys.stderr, flush=True)


def prepare_python() -> None:
    """Measure syncengine as installed, with its bytecode cached.

    A shell that sets PYTHONDONTWRITEBYTECODE would make every measured
    `syncengine` process compile its ~60 modules again (about 0.15 s each
    run); a normal install has them compiled once.
    """
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(REPO / "syncengine"), str(REPO / "cli")],
                   check=False, stdout=subprocess.DEVNULL)


# ---------------------------------------------------------------- the corpus


def rel_path(i: int) -> str:
    """Where document ``i`` lives: 100 documents per folder, folders two levels deep."""
    return f"d{i // 1000:02d}/s{(i // 100) % 10}/doc{i:06d}.json"


def document(i: int, rng: random.Random, version: int = 0) -> bytes:
    """A 1–4 KB JSON document of zones (id, page, bbox, label, text)."""
    target = rng.randint(1024, 4096)
    zones = []
    doc = {"id": f"doc{i:06d}", "version": version, "pages": 1 + i % 7, "zones": zones}
    size = 60
    z = 0
    while size < target - 40:
        text = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 14)))
        zone = {
            "id": f"z{z}",
            "page": 1 + z % doc["pages"],
            "bbox": [rng.randint(0, 600), rng.randint(0, 800), rng.randint(10, 300), rng.randint(10, 80)],
            "label": rng.choice(_LABELS),
            "text": text,
        }
        zones.append(zone)
        size += len(text) + 95
        z += 1
    return (json.dumps(doc, indent=1) + "\n").encode()


def make_corpus(root: Path, n: int, seed: int = 1, *, age: float = 3600.0) -> list[str]:
    """Write ``n`` documents under ``root``, backdated by ``age`` seconds; returns their paths.

    Backdating stands for files written long before the sync (the usual
    case): a scanner that re-hashes files modified within a second of its
    last scan (git's racy-clean rule) would otherwise hash them all again.
    """
    rng = random.Random(seed)
    paths = []
    stamp = time.time() - age
    made: set[Path] = set()
    for i in range(n):
        rel = rel_path(i)
        path = root / rel
        if path.parent not in made:
            path.parent.mkdir(parents=True, exist_ok=True)
            made.add(path.parent)
        path.write_bytes(document(i, rng))
        os.utime(path, (stamp, stamp))
        paths.append(rel)
    return paths


def copy_tree(src: Path, dst: Path) -> None:
    """A byte-exact copy with the same mtimes (cp -a): every tool starts from the same tree."""
    subprocess.run(["cp", "-a", str(src), str(dst)], check=True)


@dataclass(frozen=True)
class Mutation:
    """100 modified, 10 created, 10 deleted documents (the changed-files workload)."""

    modified: tuple[str, ...]
    created: tuple[str, ...]
    deleted: tuple[str, ...]

    @property
    def count(self) -> int:
        return len(self.modified) + len(self.created) + len(self.deleted)


def plan_mutation(n: int, seed: int = 2, modified: int = 100, created: int = 10, deleted: int = 10) -> Mutation:
    rng = random.Random(seed)
    picked = rng.sample(range(n), modified + deleted)
    return Mutation(
        modified=tuple(rel_path(i) for i in picked[:modified]),
        created=tuple(rel_path(n + k) for k in range(created)),
        deleted=tuple(rel_path(i) for i in picked[modified:]),
    )


def apply_mutation(root: Path, mutation: Mutation, seed: int = 3) -> None:
    """Make the same edits in ``root`` as in every other tool's tree."""
    rng = random.Random(seed)
    for rel in mutation.modified:
        i = int(rel[-11:-5])
        (root / rel).write_bytes(document(i, rng, version=1))
    for rel in mutation.created:
        i = int(rel[-11:-5])
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(document(i, rng))
    for rel in mutation.deleted:
        (root / rel).unlink()


def tree_digest(root: Path, skip: Sequence[str] = (".syncengine",)) -> dict[str, int]:
    """rel path -> size of every file (a cheap "did it all arrive" check)."""
    out: dict[str, int] = {}
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in skip and not d.startswith(".")]
        for name in files:
            path = Path(folder, name)
            out[path.relative_to(root).as_posix()] = path.stat().st_size
    return out


def fresh_dir(path: Path, settle: float = SETTLE_SECONDS) -> Path:
    """An empty ``path``; if something had to be deleted, wait until file creation is fast again."""
    if path.exists():
        probes = path.parent / ".settle-probe"
        before = _probe(probes) if settle > 0 else 0.0
        shutil.rmtree(path)
        for old in sorted(probes.iterdir())[:-1] if probes.exists() else ():  # earlier runs' probes
            shutil.rmtree(old)
        os.sync()
        if settle > 0:
            say(f"  (deleted an old {path.name}; waiting until ext4 creates files as fast as before, "
                f"at most {settle:.0f} s)")
            waited, took = _settle(probes, before, settle)
            say(f"  (settled after {waited:.0f} s: {PROBE_FILES} creates {took * 1000:.0f} ms, "
                f"{before * 1000:.0f} ms before the deletion)")
    path.mkdir(parents=True)
    return path


def _probe(root: Path) -> float:
    """Seconds to create PROBE_FILES small files in a new folder under ``root``.

    The folder is kept until the next deletion: deleting is what slows creation.
    """
    folder = root / f"{time.time_ns()}"
    folder.mkdir(parents=True)
    data = b"x" * 2048
    start = time.perf_counter()
    for i in range(PROBE_FILES):
        with open(folder / f"{i}.json", "wb") as fh:
            fh.write(data)
    return time.perf_counter() - start


def _settle(probes: Path, before: float, limit: float) -> tuple[float, float]:
    """Wait SETTLE_MIN_SECONDS, then probe every 5 s until creating files is as fast as before and stays so.

    "Before" can itself be slow (an earlier deletion, the test suite's):
    so two probes in a row must agree (the last no more than 25% faster
    than the one before it) as well as be within 1.5x of ``before``; a
    file system still recovering gets faster from probe to probe.
    """
    start = time.monotonic()
    took = before
    previous = None
    time.sleep(max(0.0, min(SETTLE_MIN_SECONDS, limit) - 5))
    while time.monotonic() - start < limit:
        time.sleep(5)
        took = _probe(probes)
        steady = previous is not None and took >= 0.75 * previous - 0.002
        if steady and took <= 1.5 * before + 0.005:
            break
        previous = took
    return time.monotonic() - start, took


def quiesce() -> None:
    """Flush dirty pages so one tool's writeback is never billed to the next."""
    os.sync()
    time.sleep(0.5)


# ---------------------------------------------------------------- measuring processes


@dataclass
class Usage:
    """What one phase cost: wall seconds, CPU seconds and peak RSS (KiB) per side."""

    wall: float = 0.0
    client_cpu: float = 0.0
    client_rss: int = 0
    server_cpu: float = 0.0
    server_rss: int = 0

    def add_client(self, other: Usage) -> None:
        self.wall += other.wall
        self.client_cpu += other.client_cpu
        self.client_rss = max(self.client_rss, other.client_rss)


class Failed(RuntimeError):
    """A measured command exited non-zero."""


# GNU time reports its child's peak RSS truly. wait4's own ru_maxrss does
# not: a child forked from this (large) Python process keeps the parent's
# high-water mark across exec, so every client would seem as big as the bench.
GNU_TIME = "/usr/bin/time" if os.access("/usr/bin/time", os.X_OK) else None


def run_measured(cmd: Sequence[str], *, env: dict[str, str] | None = None, cwd: Path | None = None,
                 ok: Sequence[int] = (0,), log: Path | None = None) -> Usage:
    """Run a client command to completion; wall and CPU from wait4, peak RSS from GNU time."""
    out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115 - closed below
    rss_file = RUN_DIR / f".rss-{os.getpid()}"
    argv = [GNU_TIME, "-f", "%M", "-o", str(rss_file), *cmd] if GNU_TIME else list(cmd)
    try:
        started = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=out, stderr=out, stdin=subprocess.DEVNULL,
                                env={**os.environ, **(env or {})}, cwd=cwd)
        _pid, status, ru = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
    finally:
        if log:
            out.close()
    if proc.returncode not in ok:
        where = f"; see {log}" if log else ""
        raise Failed(f"{' '.join(map(str, cmd[:3]))} ... exited {proc.returncode}{where}")
    peak = ru.ru_maxrss
    if GNU_TIME:
        with contextlib.suppress(OSError, ValueError, IndexError):
            peak = int(rss_file.read_text().split()[-1])
            rss_file.unlink()
    return Usage(wall, ru.ru_utime + ru.ru_stime, peak)


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                stat = fh.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        tree.setdefault(ppid, []).append(int(entry))
    return tree


def process_tree(pid: int) -> list[int]:
    tree = _children()
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(tree.get(p, ()))
    return out


def _cpu_of(pid: int) -> float:
    """User+sys CPU of a process and of the children it has waited for."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return sum(int(x) for x in fields[11:15]) / TICK  # utime stime cutime cstime


def _hwm_of(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


@dataclass
class Server:
    """A long-running peer process (a sync server) that phases are billed to."""

    name: str
    proc: subprocess.Popen
    log: Path
    _cpu_before: float = 0.0
    _gone_cpu: dict[int, float] = field(default_factory=dict)

    def begin(self) -> None:
        """Start a phase: note CPU so far, reset the peak RSS of every process in the tree."""
        pids = process_tree(self.proc.pid)
        self._cpu_before = sum(_cpu_of(p) for p in pids)
        for p in pids:
            with contextlib.suppress(OSError), open(f"/proc/{p}/clear_refs", "w") as fh:
                fh.write("5")

    def end(self, usage: Usage) -> Usage:
        """Bill the phase's server CPU and peak RSS (sum over the tree) to ``usage``."""
        pids = process_tree(self.proc.pid)
        usage.server_cpu = max(0.0, sum(_cpu_of(p) for p in pids) - self._cpu_before)
        usage.server_rss = sum(_hwm_of(p) for p in pids)
        return usage

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_server(name: str, cmd: Sequence[str], log: Path, *, env: dict[str, str] | None = None,
                 cwd: Path | None = None, port: int | None = None, health: str | None = None,
                 timeout: float = 20.0) -> Server:
    """Start a server and wait until it answers (an HTTP URL, or a TCP port)."""
    fh = open(log, "ab")  # noqa: SIM115 - lives as long as the server
    proc = subprocess.Popen(list(cmd), stdout=fh, stderr=fh, stdin=subprocess.DEVNULL,
                            env={**os.environ, **(env or {})}, cwd=cwd)
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise Failed(f"{name} server exited {proc.returncode}; see {log}")
        try:
            if health:
                with urllib.request.urlopen(health, timeout=1):
                    break
            elif port:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
        except OSError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise Failed(f"{name} server did not come up in {timeout:.0f} s; see {log}")
        time.sleep(0.05)
    return Server(name, proc, log)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def servers() -> Iterator[list[Server]]:
    """Every server started inside is stopped on the way out, whatever happens."""
    started: list[Server] = []
    try:
        yield started
    finally:
        for server in started:
            server.stop()


# ---------------------------------------------------------------- results and the table


@dataclass
class Row:
    """One measured figure: a benchmark, a tool, a phase."""

    bench: str  # scan | sync | sync-50k | live ...
    tool: str
    phase: str
    wall: float | None  # seconds; None when the tool is missing or failed
    items: int = 0  # files or documents the phase covers, for the rate
    client_cpu: float | None = None
    server_cpu: float | None = None
    client_rss: int | None = None  # KiB
    server_rss: int | None = None  # KiB
    note: str = ""
    baseline: bool = False  # a floor or our own figure: ratios are against it

    @classmethod
    def of(cls, bench: str, tool: str, phase: str, usage: Usage, items: int, **kw) -> Row:
        served = bool(usage.server_rss)  # a server was measured: its CPU may round to 0, which is a figure
        return cls(bench, tool, phase, usage.wall, items, usage.client_cpu,
                   usage.server_cpu if served else None, usage.client_rss or None, usage.server_rss or None, **kw)

    def to_dict(self) -> dict:
        return asdict(self)


def _secs(x: float | None) -> str:
    if x is None:
        return "–"
    return f"{x * 1000:.0f} ms" if x < 1 else f"{x:.2f} s"


def _mb(kib: int | None) -> str:
    return "–" if not kib else f"{kib / 1024:.0f}"


def _rate(row: Row) -> str:
    if not row.wall or not row.items:
        return "–"
    rate = row.items / row.wall
    return f"{rate / 1000:.1f} k/s" if rate >= 1000 else f"{rate:.0f}/s"


def _cpu(row: Row) -> float | None:
    if row.client_cpu is None and row.server_cpu is None:
        return None
    return (row.client_cpu or 0.0) + (row.server_cpu or 0.0)


def _ratio(x: float | None, base: float | None) -> str:
    return f"{x / base:.1f}×" if x and base else "–"


def table(rows: Sequence[Row]) -> str:
    """A Markdown table of every row, with ratios to syncengine's row of the same bench and phase.

    ``wall ×`` is the tool's wall time over syncengine's and ``CPU ×`` its
    CPU (client + server) over syncengine's: above 1, syncengine is faster
    or cheaper; a floor's ratio below 1 says how far syncengine is from it.
    """
    ours = {(r.bench, r.phase): r for r in rows if r.tool == "syncengine" and r.wall}
    head = ("| bench | phase | tool | wall | rate | wall × | CPU client | CPU server | CPU × "
            "| peak RSS client MB | peak RSS server MB | note |")
    lines = [head, "|" + "---|" * 12]
    for r in rows:
        base = ours.get((r.bench, r.phase))
        if r.tool == "syncengine" or base is None:
            wall_x = "1.0×" if r.tool == "syncengine" and r.wall else "–"
            cpu_x = "1.0×" if r.tool == "syncengine" and _cpu(r) else "–"
        else:
            wall_x, cpu_x = _ratio(r.wall, base.wall), _ratio(_cpu(r), _cpu(base))
        lines.append(
            f"| {r.bench} | {r.phase} | {r.tool} | {_secs(r.wall)} | {_rate(r)} | {wall_x} "
            f"| {_secs(r.client_cpu)} | {_secs(r.server_cpu)} | {cpu_x} | {_mb(r.client_rss)} | {_mb(r.server_rss)} "
            f"| {r.note} |"
        )
    return "\n".join(lines)


def machine() -> str:
    """One line about where the figures come from."""
    cpu = "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"{os.cpu_count()} cores ({cpu}), Python {sys.version.split()[0]}, {time.strftime('%Y-%m-%d')}"
