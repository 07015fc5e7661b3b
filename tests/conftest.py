"""Shared fixtures: no leaked threads, fresh workspaces from fixtures/, server fixtures."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import pytest

from syncengine.testing import backdate

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "fixtures" / "sample"

pytest_plugins = [p for p in ("tests.fixtures_server",) if (REPO / "tests" / "fixtures_server.py").exists()]


@pytest.fixture(autouse=True)
def _no_thread_leaks():
    """A test that leaves a thread running fails (watchdog's habit)."""
    before = set(threading.enumerate())
    yield
    import time

    deadline = time.monotonic() + 5
    while True:
        leaked = [t for t in threading.enumerate() if t not in before and t.is_alive() and not t.daemon]
        if not leaked or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert not leaked, f"threads leaked: {leaked}"


@pytest.fixture
def sample_tree(tmp_path: Path) -> Path:
    """A copy of fixtures/sample with backdated mtimes, not yet a workspace."""
    root = tmp_path / "ws"
    shutil.copytree(SAMPLE, root)
    backdate(root)
    return root


@pytest.fixture
def sample_ws(sample_tree: Path):
    """An initialised workspace holding the sample documents."""
    from syncengine import Workspace

    ws, _report = Workspace.init(sample_tree)
    yield ws
    ws.close()


@pytest.fixture(scope="module")
def shared_server(tmp_path_factory):
    """One SQLite server for a module; each test works in its own workspace on it."""
    from tests.synckit import module_server

    yield from module_server(tmp_path_factory)


@pytest.fixture
def proxy(shared_server):
    """A FaultProxy in front of the module's server (requests seen in ``.seen``; ``.rewrites`` to alter answers)."""
    from tests.server.conftest import FaultProxy

    proxy = FaultProxy(shared_server.url).start()
    yield proxy
    proxy.stop()


@pytest.fixture
def kit(tmp_path, shared_server):
    """Replicas of a fresh workspace on the module's SQLite server."""
    from tests.synckit import Kit

    return Kit(tmp_path, shared_server)
