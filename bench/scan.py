"""Scanner benchmark: first scan and unchanged rescan of N files, beside a floor.

    .venv/bin/python bench/scan.py [-n 20000] [--json]

The floor runs on the same tree, with the same warm page cache:
``find -printf`` (a stat of every file) for a rescan, and ``xargs sha256sum``
(reading and hashing every byte) for a first scan. syncengine is measured
end to end through its CLI (`init` records every file; `status` rescans),
Python start-up included, and in-process through the API.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    RUN_DIR,
    VENV_BIN,
    Row,
    Usage,
    fresh_dir,
    machine,
    make_corpus,
    prepare_python,
    quiesce,
    run_measured,
    say,
    table,
)

BENCH = "scan"


def _median(runs: list[Usage]) -> Usage:
    return sorted(runs, key=lambda u: u.wall)[len(runs) // 2]


def collect(n: int = 20_000, repeat: int = 3) -> list[Row]:
    """Build the tree, measure floors and syncengine; returns the rows."""
    prepare_python()
    base = fresh_dir(RUN_DIR / "scan")
    root = base / "ws"
    say(f"scan: writing {n} files ...")
    make_corpus(root, n)
    quiesce()
    exe = str(VENV_BIN / "syncengine")
    rows: list[Row] = []

    stat_floor = _median([run_measured(["bash", "-c", f"find '{root}' -type f -printf '%s %T@ %i\\n' >/dev/null"])
                          for _ in range(repeat)])
    hash_floor = _median([run_measured(["bash", "-c", f"find '{root}' -type f -print0 | xargs -0 sha256sum "
                                                      ">/dev/null"]) for _ in range(repeat)])

    first = run_measured([exe, "init", str(root)])
    rescans = [run_measured([exe, "-C", str(root), "status"]) for _ in range(repeat)]
    rescan = _median(rescans)

    # In-process: the engine alone, without the CLI's Python start-up.
    from syncengine import Workspace

    shutil.rmtree(root / ".syncengine")
    quiesce()
    started = time.perf_counter()
    ws, _report = Workspace.init(root)
    api_first = time.perf_counter() - started
    api_rescans = []
    for _ in range(repeat):
        started = time.perf_counter()
        again = ws.scan()
        api_rescans.append(time.perf_counter() - started)
        assert again.hashed == 0, f"an unchanged rescan hashed {again.hashed} files"
    ws.close()

    rows.append(Row.of(BENCH, "syncengine", "first scan", first, n, note="CLI `init`, Python start included"))
    rows.append(Row(BENCH, "syncengine (API)", "first scan", api_first, n, note="Workspace.init, in-process"))
    rows.append(Row.of(BENCH, "floor: find+sha256sum", "first scan", hash_floor, n,
                       note="read + sha256 of every byte"))
    rows.append(Row.of(BENCH, "syncengine", "rescan", rescan, n, note="CLI `status`, Python start included"))
    rows.append(Row(BENCH, "syncengine (API)", "rescan", statistics.median(api_rescans), n,
                    note="Workspace.scan, in-process"))
    rows.append(Row.of(BENCH, "floor: find -printf", "rescan", stat_floor, n, note="stat of every file"))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=20_000, help="files (default 20000)")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each rescan/floor; the median is kept")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = parser.parse_args(argv)
    rows = collect(args.n, args.repeat)
    if args.json:
        print(json.dumps([r.to_dict() for r in rows], indent=1))
    else:
        print(f"\n{machine()}\n")
        print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
