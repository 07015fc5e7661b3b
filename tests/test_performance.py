"""Performance fast paths answer exactly what the slow paths they replace answered."""

from __future__ import annotations

import itertools
from pathlib import Path

import pathspec
import pytest

from syncengine import Workspace
from syncengine.paths import DEFAULT_IGNORES, IGNORE_FILE, IgnoreRules
from syncengine.testing import backdate, make_tree

_NAMES = ["a.json", "notes.md", "x.swp", "y~", ".#lock", "4913", ".DS_Store", "Thumbs.db", "~$doc.docx",
          "build", "keep.log", "debug.log", "é.txt", "sub", "(?P<x>).md", "a[1].md", ".syncengine.1.tmp"]
_USER_RULES = [
    [],
    ["*.log", "build/", "/top-only.md"],
    ["docs/**/draft-*", "(?P<x>).md", "[ab].json"],
    ["*.log", "!keep.log"],  # a negation: pathspec decides, in order
]


def _paths() -> list[tuple[str, bool]]:
    out = []
    for depth in range(3):
        for parts in itertools.product(_NAMES, repeat=depth + 1):
            if depth == 2 and parts[0] != "sub":
                continue
            rel = "/".join(parts)
            out += [(rel, False), (rel, True)]
    return out


@pytest.mark.parametrize("user", _USER_RULES, ids=lambda r: ",".join(r) or "defaults")
def test_one_regex_ignore_agrees_with_pathspec(tmp_path: Path, user: list[str]):
    """The single-regex ignore check gives pathspec's answer for every path, file or folder."""
    (tmp_path / IGNORE_FILE).write_text("\n".join(user) + "\n")
    rules = IgnoreRules(tmp_path)
    spec = pathspec.GitIgnoreSpec.from_lines([*DEFAULT_IGNORES, *user])
    assert (rules._any is None) == any(line.startswith("!") for line in user)
    for rel, is_dir in _paths():
        expected = spec.match_file(rel + "/" if is_dir else rel)
        assert rules.ignored(rel, is_dir=is_dir) == expected, (rel, is_dir)


def test_local_index_reads_plain_values(tmp_path: Path):
    """local_index, read straight from the cursor, holds the same values as the journal's rows."""
    root = tmp_path / "w"
    make_tree(root, {"a.json": '{"x": 1}\n', "d/b.md": "# b\n", "d/c.bin": b"\x00" * 9})
    backdate(root)
    ws, _ = Workspace.init(root)
    try:
        index = ws.journal.local_index()
        assert sorted(index) == ["a.json", "d/b.md", "d/c.bin"]
        for path, (doc_id, digest, size, mtime_ns, ctime_ns, inode, mode, kind) in index.items():
            st = (root / path).stat()
            assert isinstance(doc_id, str) and len(digest) == 64
            assert (size, mtime_ns, ctime_ns, inode) == (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
            assert isinstance(mode, int) and kind in ("json", "text", "binary")
    finally:
        ws.close()
