"""Replicas for the conflict tests: real workspaces on one real server workspace, synced in-process.

``Net(server, tmp_path)`` makes replicas (``Workspace`` objects initialised
against the server), writes and removes files in them, and syncs them all
until nothing moves, checking that every replica ends with the same files.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from syncengine import Workspace
from syncengine.models import SyncReport
from syncengine.testing import make_tree, read_tree


class Net:
    """Replicas of one server workspace (one token shared by all), closed by ``close()``."""

    def __init__(self, server: Any, tmp_path: Path, name: str = "team") -> None:
        self.server = server
        self.tmp = tmp_path
        self.name = name
        self.token = server.token(name)
        self.replicas: list[Workspace] = []
        self.pushed: dict[Path, list[str]] = {}  # replica root -> paths its settle() syncs pushed

    def replica(self, tree: dict[str, Any] | None = None) -> Workspace:
        root = self.tmp / f"replica-{len(self.replicas)}"
        make_tree(root, tree or {})
        ws, _report = Workspace.init(root, server=self.server.url, name=self.name, token=self.token)
        self.replicas.append(ws)
        return ws

    def replicas_of(self, tree: dict[str, Any], n: int) -> list[Workspace]:
        """``n`` replicas that all hold ``tree``, synced (the first one created it)."""
        first = self.replica(tree)
        first.sync()
        others = [self.replica() for _ in range(n - 1)]
        for ws in others:
            ws.sync()
        return [first, *others]

    def settle(self, *replicas: Workspace, **kw: Any) -> dict[str, bytes]:
        """Sync every replica in turn until a whole pass moves nothing; all must then agree.

        What each replica pushed on the way is added to ``self.pushed``.
        """
        replicas = replicas or tuple(self.replicas)
        for _ in range(6):
            reports = [ws.sync(**kw) for ws in replicas]
            for ws, report in zip(replicas, reports, strict=True):
                self.pushed.setdefault(ws.root, []).extend(report.pushed)
            if all(_quiet(r) for r in reports):
                break
        else:
            raise AssertionError("replicas did not settle in 6 passes")
        trees = [read_tree(ws.root) for ws in replicas]
        for ws, tree in zip(replicas[1:], trees[1:], strict=True):
            assert tree == trees[0], f"{ws.root} differs from {replicas[0].root}"
        return trees[0]

    def close(self) -> None:
        for ws in self.replicas:
            ws.close()


def _quiet(report: SyncReport) -> bool:
    return not (report.pushed or report.downloaded or report.deleted or report.moved or report.copies)


def jtext(doc: Any) -> str:
    """A value as an indented JSON document."""
    return json.dumps(doc, indent=2) + "\n"


def write(ws: Workspace, rel: str, data: str | bytes | dict) -> None:
    """Write a file (a dict is written as indented JSON)."""
    make_tree(ws.root, {rel: jtext(data) if isinstance(data, dict) else data})


def load(ws: Workspace, rel: str) -> Any:
    return json.loads((ws.root / rel).read_bytes())


def copies(tree: dict[str, bytes]) -> dict[str, bytes]:
    """The conflict copies in a tree."""
    return {path: data for path, data in tree.items() if ".conflict-" in path}


COPY = re.compile(r"^(?P<stem>.+)\.conflict-(?P<client>[0-9a-f]{8})-(?P<when>\d{8}-\d{6})-(?P<hash>[0-9a-f]{8})"
                  r"(?P<exts>\..+)?$")
