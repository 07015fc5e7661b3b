"""Running the real CLI from tests: in-process (fast) or as a subprocess (for kills)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from click.testing import CliRunner

from cli.main import main

REPO = Path(__file__).resolve().parent.parent


@dataclass
class CliResult:
    code: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        return json.loads(self.stdout)


def run_cli(*args: str | Path, input: str | None = None, env: dict[str, str] | None = None) -> CliResult:
    """Run `syncengine ARGS` in this process through the real entry point."""
    runner = CliRunner()
    with runner.isolation(input=input, env=env) as (out, err, _mixed):
        code = main([str(a) for a in args])
        sys.stdout.flush()
        sys.stderr.flush()
        return CliResult(code, out.getvalue().decode(), err.getvalue().decode())


def cli_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("SYNCENGINE_FAILPOINT", None)
    env.pop("SYNCENGINE_FSFAULT", None)
    env.update(extra)
    return env


def run_proc(*args: str | Path, env: dict[str, str] | None = None, input: str | None = None,
             timeout: float = 120) -> CliResult:
    """Run `syncengine ARGS` as a real subprocess."""
    proc = subprocess.run(
        [sys.executable, "-m", "cli", *map(str, args)],
        capture_output=True, text=True, env=env or cli_env(), input=input, timeout=timeout, cwd=REPO,
    )
    return CliResult(proc.returncode, proc.stdout, proc.stderr)
