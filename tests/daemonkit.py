"""Real daemons for tests: workspaces on temp folders, daemons as real processes, stopped at teardown."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from syncengine import Workspace, daemonctl
from syncengine.config import Config
from syncengine.testing import backdate, make_tree, wait_until
from syncengine.workspace import Layout
from tests.helpers import REPO, cli_env

FAST = {"daemon": {"poll_interval": 1.0, "max_backoff": 1.0}}


def make_ws(root: Path, *, server: Any = None, token: str | None = None, files: dict | None = None,
            config: dict | None = None) -> Path:
    """An initialised workspace at ``root`` (with a server and token when given), settings merged in."""
    make_tree(root, files or {})
    backdate(root)
    ws, _ = Workspace.init(root, server=server.url if server else None, name="docs" if server else None,
                           token=token)
    ws.close()
    layout = Layout(root)
    cfg = Config.load(layout.config)
    for section, values in {**FAST, **(config or {})}.items():
        for key, value in values.items():
            setattr(getattr(cfg, section), key, value)
    cfg.save(layout.config)
    return root


class Daemons:
    """Starts daemons (detached, or `daemon run` children) and makes sure all are gone afterwards."""

    def __init__(self) -> None:
        self.roots: list[Path] = []
        self.children: list[subprocess.Popen] = []

    def start(self, root: Path) -> int:
        pid, already = daemonctl.start(root, extra_env=_env())
        assert not already
        self.roots.append(root)
        return pid

    def run(self, root: Path) -> subprocess.Popen:
        """`syncengine daemon run` as a child we can SIGKILL; returns once it holds the lock."""
        proc = subprocess.Popen([sys.executable, "-m", "cli", "-C", str(root), "daemon", "run"], cwd=REPO,
                                env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.children.append(proc)
        self.roots.append(root)
        wait_until(lambda: daemonctl.running_pid(Layout(root).daemon_pid) == proc.pid, timeout=15,
                   message="the daemon to take its lock")
        return proc

    def state(self, root: Path) -> dict:
        return daemonctl.read_state(Layout(root))

    def stop_all(self) -> None:
        for root in self.roots:
            with contextlib.suppress(Exception):
                daemonctl.stop(root, timeout=5)
        for proc in self.children:
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)


def _env() -> dict[str, str]:
    env = cli_env()
    env["SYNCENGINE_LOG_LEVEL"] = "DEBUG"
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


@pytest.fixture
def daemons() -> Iterator[Daemons]:
    d = Daemons()
    try:
        yield d
    finally:
        d.stop_all()


class Follower:
    """`syncengine events --follow --json` as a child process, its lines in a queue.

    It prints the last ``past`` events first, so an event published while the
    process was still starting is not missed (no sleeping until it is ready).
    """

    def __init__(self, root: Path, *args: str, past: int = 1000) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "cli", "-C", str(root), "events", "--follow", "--json",
                                      "-n", str(past), *args], cwd=REPO, env=_env(), stdout=subprocess.PIPE, text=True)
        self.lines: queue.Queue[str] = queue.Queue()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)

    def expect(self, predicate, timeout: float = 10.0) -> dict:
        """The first event (parsed) that satisfies ``predicate``; fails after ``timeout``."""
        import time

        deadline = time.monotonic() + timeout
        seen: list[str] = []
        while True:
            try:
                line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no matching event within {timeout:g}s; saw: {seen}") from None
            event = json.loads(line)
            if predicate(event):
                return event
            seen.append(line.strip())

    def close(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self.reader.join(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
