"""Helpers for tests of syncengine and of scripts built on it (no server stack here).

Shipped in the library, as structlog.testing is, so that people scripting
syncengine can test their own workflows with the same tools.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from syncengine.fsops import is_temp_name
from syncengine.paths import STATE_DIR

Tree = Mapping[str, Any]


def make_tree(root: Path, tree: Tree) -> None:
    """Create files and folders: ``{"a.md": "x", "d/": {}, "d/b.bin": b"\\0"}``.

    A value that is a mapping makes a folder holding that tree; str is written
    as UTF-8, bytes as they are.
    """
    root.mkdir(parents=True, exist_ok=True)
    for name, value in tree.items():
        path = root / name.rstrip("/")
        if isinstance(value, Mapping):
            make_tree(path, value)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(value.encode() if isinstance(value, str) else value)


def read_tree(root: Path, *, include_state: bool = False) -> dict[str, bytes]:
    """Every regular file under ``root`` as {relative posix path: bytes}.

    The engine's folder and temp files are left out unless asked for, so two
    replicas compare equal when their user-visible files are equal.
    """
    out: dict[str, bytes] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = Path(dirpath).relative_to(root).as_posix()
        if rel_dir == "." and not include_state and STATE_DIR in dirnames:
            dirnames.remove(STATE_DIR)
        for name in filenames:
            path = Path(dirpath) / name
            if path.is_symlink() or (is_temp_name(name) and not include_state):
                continue
            rel = name if rel_dir == "." else f"{rel_dir}/{name}"
            out[rel] = path.read_bytes()
    return out


def backdate(root: Path, seconds: float = 60.0) -> None:
    """Move every file's mtime into the past, so the scanner's racy-file rule
    (hash what was modified within a tick of the last scan) leaves it alone."""
    stamp = time.time() - seconds
    for dirpath, dirnames, filenames in os.walk(root):
        if STATE_DIR in dirnames:
            dirnames.remove(STATE_DIR)
        for name in filenames:
            os.utime(Path(dirpath) / name, (stamp, stamp), follow_symlinks=False)


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02,
               message: str = "condition") -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)
