"""Performance fast paths answer exactly what the slow paths they replace answered."""

from __future__ import annotations

import itertools
from pathlib import Path

import pathspec
import pytest

from syncengine import Workspace
from syncengine.paths import DEFAULT_IGNORES, IGNORE_FILE, IgnoreRules
from syncengine.testing import backdate, make_tree

_NAMES = ["a.json", "notes.md", "x.swp", "y~", ".#lock", "#a.md#", "4913", ".DS_Store", "Thumbs.db", "~$doc.docx",
          "build", "keep.log", "debug.log", "é.txt", "sub", "(?P<x>).md", "a[1].md", ".syncengine.1.tmp",
          "a|b", "]x", "x|y"]
_USER_RULES = [
    [],
    ["*.log", "build/", "/top-only.md"],
    ["docs/**/draft-*", "(?P<x>).md", "[ab].json"],
    ["*.log", "!keep.log"],  # a negation: pathspec decides, in order
    ["a|b", "[]x]*", "x\\|*", "sub/*|"],  # regex metacharacters where the factored regex regroups terms
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


def test_without_a_syncignore_the_written_out_regex_answers_and_pathspec_is_not_needed(tmp_path: Path):
    """paths._DEFAULT_REGEX is what pathspec builds for the defaults, and answers as pathspec does."""
    from syncengine.paths import _DEFAULT_REGEX, _one_regex

    assert _one_regex(pathspec.GitIgnoreSpec.from_lines(DEFAULT_IGNORES)).pattern == _DEFAULT_REGEX
    rules = IgnoreRules(tmp_path)
    assert rules._spec is None and rules._any.pattern == _DEFAULT_REGEX
    spec = pathspec.GitIgnoreSpec.from_lines(DEFAULT_IGNORES)
    for rel, is_dir in _paths():
        assert rules.ignored(rel, is_dir=is_dir) == spec.match_file(rel + "/" if is_dir else rel), (rel, is_dir)
    (tmp_path / IGNORE_FILE).write_text("*.md\n")
    assert rules.refresh() and rules.ignored("a/b.md") and rules._spec is not None
    (tmp_path / IGNORE_FILE).unlink()
    assert rules.refresh() and not rules.ignored("a/b.md") and rules._spec is None


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


# ---------------------------------------------------------------- the checkpoint after a push


def _checkpoint(root: Path) -> int:
    with Workspace(root) as ws:
        return ws.journal.state()["last_seq"]


@pytest.mark.integration
def test_a_first_sync_leaves_no_echoes_to_page_through(tmp_path: Path, shared_server):
    """After pushing 250 files in 3 commits the checkpoint is past them; the next round pulls nothing, yet
    another replica's change still arrives."""
    from tests.synckit import Kit

    kit = Kit(tmp_path, shared_server)
    a = kit.replica({f"many/{i:03d}.json": f'{{"n": {i}}}\n' for i in range(250)})
    assert len(a.sync().pushed) == 250
    assert _checkpoint(a.root) == kit.log()[-1].seq
    assert a.sync().pulled == 0
    b = kit.replica()
    assert len(b.sync().downloaded) == 250
    b.write("from-b.md", "b\n")
    b.sync()
    a.write("from-a.md", "a\n")
    report = a.sync()
    assert report.pulled == 1 and "from-b.md" in report.downloaded and report.pushed == ("from-a.md",)
    assert _checkpoint(a.root) == kit.log()[-1].seq
    assert b.sync().downloaded == ("from-a.md",)


@pytest.mark.parametrize(("last_seq", "answers", "moved_to"), [
    (10, [("ok", 11), ("ok", 12), ("ok", 13)], 13),
    (10, [("ok", 13), ("ok", 11), ("ok", 12)], 13),  # answer order does not matter
    (10, [("ok", 11), ("conflict", None), ("ok", 12)], 12),  # a refused item makes no change
    (10, [("ok", 12), ("ok", 13)], None),  # someone else's change at 11
    (10, [("ok", 11), ("ok", 13)], None),  # a gap inside the batch
    (10, [("ok", 5), ("ok", 6)], None),  # a replayed commit: its first answer's seqs
    (10, [("conflict", None)], None),
    (0, [("ok", 1), ("ok", 2)], 2),  # a fresh workspace's first push
], ids=["next", "unordered", "with-conflict", "foreign-before", "gap", "replay", "none-ok", "first"])
def test_checkpoint_moves_only_past_our_own_changes(tmp_path: Path, last_seq, answers, moved_to):
    """The checkpoint moves after a push only when the batch's changes are exactly the next in the feed."""
    from syncengine import protocol as p
    from syncengine.push import _past_echoes

    root = tmp_path / "w"
    root.mkdir()
    ws, _ = Workspace.init(root)
    try:
        ws.journal.update_state(last_seq=last_seq)
        results = [p.CommitResult(status, f"doc{i}", rev=1 if seq else None, seq=seq)
                   for i, (status, seq) in enumerate(answers)]
        state = _past_echoes(ws.journal.state().get("last_seq"), results)
        assert state == (None if moved_to is None else {"last_seq": moved_to})
    finally:
        ws.close()
