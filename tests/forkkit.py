"""Tests that fork: run a piece of a test in a forked child, as another user when this one is root.

Permissions do not bind root, so a test of an unreadable or unsearchable
folder runs its scan as `nobody` in a forked child. Forked, not a new
interpreter: `nobody` may not read the interpreter's own files here
(/root/.pyenv), while a fork already has everything a scan imports.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

NOBODY = 65534


def here_or_alone(request: pytest.FixtureRequest) -> bool:
    """Whether this test can fork here; else it is run (and must pass) in a fresh pytest process.

    The scanner never forks beside another thread, and an earlier test's
    server may have left one running in this process.
    """
    if threading.active_count() == 1:
        return True
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", request.node.nodeid],
                            cwd=request.config.rootpath, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    return False


@contextlib.contextmanager
def open_folder(prefix: str) -> Iterator[Path]:
    """A folder of /tmp that `nobody` may enter (pytest's tmp_path sits in folders closed to others), removed after."""
    top = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield top
    finally:
        shutil.rmtree(top)


def owned_by_nobody(top: Path) -> int | None:
    """As root, give everything under ``top`` to `nobody` and return that user; otherwise None (run as is)."""
    if os.geteuid() != 0:
        return None
    for folder, _dirs, names in os.walk(top):
        os.chown(folder, NOBODY, NOBODY)
        for name in names:
            os.chown(os.path.join(folder, name), NOBODY, NOBODY)
    return NOBODY


def in_child(work: Callable[[], Any], user: int | None) -> Any:
    """``work()``'s JSON-able result, run in a forked child as ``user`` (if given); its traceback fails the test."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            os.close(read)
            if user is not None:
                os.setgid(user)
                os.setuid(user)
            os.write(write, json.dumps(work()).encode())
            code = 0
        except BaseException:
            import traceback

            os.write(write, traceback.format_exc().encode())
        finally:
            os._exit(code)
    os.close(write)
    with os.fdopen(read, "rb") as fh:
        data = fh.read()
    _pid, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0 and data, data.decode()
    return json.loads(data)
