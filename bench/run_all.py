"""Every benchmark in one run, and one table (what `make bench` prints).

    .venv/bin/python bench/run_all.py [--quick] [--skip sync-50k,live] [--json]

Runs, in this order: the scanner (20,000 files, beside its floors), sync
(10,000 documents) and sync at scale (50,000 documents) against rclone
bisync and unison in socket mode, and bench/live.py when it is there. The
table has, for every tool and phase, wall time, CPU and peak RSS of client
and server, and ratios to syncengine's figures. The rows are also written
to bench-run/results.json and the table to bench-run/results.md.

A benchmark that fails is reported in the table and the others still run;
the exit status is 1 if any did. A peer that is missing (no unison on a
fresh machine that cannot install it) gets a row saying so.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import traceback
from dataclasses import fields
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import scan  # noqa: E402
import sync  # noqa: E402
from common import RUN_DIR, Row, machine, prepare_python, say, table  # noqa: E402

_ROW_FIELDS = {f.name for f in fields(Row)}


def _live(quick: bool) -> list[Row]:
    """bench/live.py --json, run as its own process; its rows join the table."""
    script = HERE / "live.py"
    if not script.exists():
        return []
    cmd = [sys.executable, str(script), "--json"]
    if quick:
        cmd.append("--quick")
    done = subprocess.run(cmd, capture_output=True, text=True)
    if quick and done.returncode != 0 and "--quick" in done.stderr:
        done = subprocess.run(cmd[:-1], capture_output=True, text=True)  # it has no --quick
    sys.stderr.write(done.stderr)
    if done.returncode not in (0, 1):
        return [Row("live", "syncengine", "all", None, note=f"FAILED: live.py exited {done.returncode}")]
    return _rows_from_json(done.stdout, "live")


def _rows_from_json(text: str, bench: str) -> list[Row]:
    """Rows from a benchmark's --json output (a list of rows, or {"rows": [...]})."""
    try:
        data = json.loads(text)
    except ValueError:
        start = text.find("\n[")  # progress lines before the JSON
        try:
            data = json.loads(text[start + 1:]) if start >= 0 else None
        except ValueError:
            data = None
    if isinstance(data, dict):
        data = data.get("rows")
    if not isinstance(data, list):
        return [Row(bench, "syncengine", "all", None, note="FAILED: no JSON rows in its output")]
    rows = []
    for item in data:
        if isinstance(item, dict) and {"tool", "phase", "wall"} <= item.keys():
            kept = {k: v for k, v in item.items() if k in _ROW_FIELDS}
            kept.setdefault("bench", bench)
            rows.append(Row(**kept))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="small sizes (2,000 files, 1,000 and 5,000 documents) to check the plumbing")
    parser.add_argument("--skip", default="", help="comma-separated: scan,sync,sync-50k,live")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON instead of the table")
    args = parser.parse_args(argv)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    n_scan, n_sync, n_scale = (2_000, 1_000, 5_000) if args.quick else (20_000, 10_000, 50_000)
    prepare_python()
    started = time.monotonic()
    plan = [
        ("scan", lambda: scan.collect(n_scan)),
        ("sync", lambda: sync.collect(n_sync, bench=None if args.quick else "sync")),
        ("sync-50k", lambda: sync.collect(n_scale, bench=None if args.quick else "sync-50k")),
        ("live", lambda: _live(args.quick)),
    ]
    rows: list[Row] = []
    for name, run in plan:
        if name in skip:
            continue
        say(f"== {name}")
        try:
            rows += run()
        except Exception as exc:  # one broken benchmark must not hide the others' figures
            traceback.print_exc()
            rows.append(Row(name, "syncengine", "all", None, note=f"FAILED: {type(exc).__name__}: {exc}"))
    header = (f"{machine()}; {'; '.join(sync.versions())}; "
              f"whole run {time.monotonic() - started:.0f} s{' (--quick)' if args.quick else ''}")
    text = f"{header}\n\n{table(rows)}\n"
    RUN_DIR.mkdir(parents=True, exist_ok=True)
    (RUN_DIR / "results.md").write_text(text)
    (RUN_DIR / "results.json").write_text(json.dumps({"machine": header, "rows": [r.to_dict() for r in rows]},
                                                     indent=1))
    if args.json:
        print(json.dumps([r.to_dict() for r in rows], indent=1))
    else:
        print(f"\n{text}")
    return 1 if any("FAILED" in r.note for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
