"""The Python API as the README shows it: `Workspace.find`, status, snapshot, sync."""

from __future__ import annotations

from pathlib import Path

import pytest

from syncengine import Workspace
from syncengine.testing import make_tree


def test_the_readme_example_runs_with_a_home_relative_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """`Workspace.find("~/papers")` expands ~ like a shell would; init and the constructor do too."""
    monkeypatch.setenv("HOME", str(tmp_path))
    make_tree(tmp_path / "papers", {"invoices/a.json": '{"a": 1}\n'})
    ws, report = Workspace.init("~/papers")
    ws.close()
    assert report.root == str(tmp_path / "papers") and not (Path.cwd() / "~").exists()
    with Workspace.find("~/papers/invoices") as ws:
        assert ws.root == tmp_path / "papers"
        assert ws.status().pending.created == 1
        assert ws.snapshot("before the big edit").files == 1
    with Workspace("~/papers") as ws:
        assert ws.root == tmp_path / "papers"


@pytest.mark.integration
def test_the_readme_sync_example(tmp_path: Path, server):
    """init with a server, then `ws.sync(strategy="keep-both")` returns a report of what was pushed."""
    make_tree(tmp_path / "papers", {"a.md": "a\n", "b/c.json": '{"c": 1}\n'})
    ws, _report = Workspace.init(tmp_path / "papers", server=server.url, name="papers",
                                 token=server.token("papers"))
    with ws:
        report = ws.sync(strategy="keep-both")
        assert sorted(report.pushed) == ["a.md", "b/c.json"] and report.conflicts == ()
        assert report.exit_code == 0 and ws.status().pending.total == 0


def _open_files_under(folder: Path) -> list[str]:
    out = []
    for fd in Path("/proc/self/fd").iterdir():
        try:
            target = fd.readlink()
        except OSError:
            continue
        if str(target).startswith(str(folder)):
            out.append(str(target))
    return out


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc")
def test_closing_a_workspace_leaves_no_descriptor_open(tmp_path: Path):
    """After `with Workspace(...)`, no file of it stays open: journal, events and blob table included."""
    make_tree(tmp_path / "papers", {"a.md": "a\n", "b/c.json": '{"c": 1}\n'})
    ws, _report = Workspace.init(tmp_path / "papers")
    ws.close()
    for _ in range(3):  # a long-lived process opening it in turn: nothing piles up
        with Workspace(tmp_path / "papers") as ws:
            (tmp_path / "papers" / "a.md").write_text(f"a, edited {_}\n")
            assert ws.status().files == 2
            ws.snapshot("one")  # stores the edit: the blob table is open now
            assert any(path.endswith("small.db") for path in _open_files_under(tmp_path))
        assert _open_files_under(tmp_path) == []
