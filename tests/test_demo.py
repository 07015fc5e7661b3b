"""`make demo` keeps working: demo/demo.sh runs end to end, the replicas converge, the server is stopped."""

from __future__ import annotations

import re
import socket
import subprocess

import pytest

from tests.helpers import REPO, cli_env

pytestmark = pytest.mark.integration


def test_the_demo_runs_end_to_end(tmp_path):
    run = tmp_path / "demo-run"
    proc = subprocess.run(["bash", str(REPO / "demo" / "demo.sh")], capture_output=True, text=True, timeout=240,
                          env=cli_env(SYNCENGINE_DEMO_RUN=str(run)), stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    for step in ("syncengine init", "syncengine status", "syncengine diff", "syncengine snapshot",
                 "syncengine restore", "syncengine sync", "syncengine log"):
        assert f"$ {step}" in out, step
    assert "A and B hold the same files" in out and "A and B converged" in out
    assert "Traceback" not in out + proc.stderr
    assert "conflict both-modified invoices/doc-002.json: merged" in out
    port = int(re.search(r"on SQLite \(http://127\.0\.0\.1:(\d+)\)", out).group(1))
    with socket.socket() as sock:
        assert sock.connect_ex(("127.0.0.1", port)) != 0, "the demo's server is still running"
