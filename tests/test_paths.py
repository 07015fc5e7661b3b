"""check_path, the one rule for workspace-relative paths, on its edges (ASCII and not take different ways)."""

from __future__ import annotations

import pytest

from syncengine.errors import UnsafePath
from syncengine.paths import MAX_NAME_BYTES, MAX_PATH_BYTES, check_path

REFUSED = {
    "": "empty path",
    "a\x00b": "control character",
    "é\x1f": "control character",
    "a\\b": "backslash",
    "/abs": "absolute path",
    "c:x": "absolute path",
    "a//b": "empty, '.' or '..'",
    "a/": "empty, '.' or '..'",
    "./a": "empty, '.' or '..'",
    "a/../b": "empty, '.' or '..'",
    ".syncengine/x": "engine's own folder",
    "e\u0301.md": "NFC",
    "\ud800.md": "not valid UTF-8",
    "x" * (MAX_NAME_BYTES + 1): "file name is too long",
    "é" * (MAX_NAME_BYTES // 2 + 1): "file name is too long",  # 256 bytes in 128 characters
    "a/" * (MAX_PATH_BYTES // 2) + "a": "path is too long",
    "é/" * (MAX_PATH_BYTES // 3) + "éé": "path is too long",  # 4,098 bytes in 2,732 characters
}

ACCEPTED = ["a", "notes/b.md", "a\x7fb", "é.md", "中文/文件.txt", "x" * MAX_NAME_BYTES,
            "é" * (MAX_NAME_BYTES // 2), "a/" * (MAX_PATH_BYTES // 2 - 1) + "ab", "CON.txt", "trailing. "]


@pytest.mark.parametrize("path", sorted(REFUSED))
def test_each_unsafe_path_is_refused_with_its_reason(path: str):
    with pytest.raises(UnsafePath) as caught:
        check_path(path)
    assert REFUSED[path] in str(caught.value)


@pytest.mark.parametrize("path", ACCEPTED)
def test_safe_paths_are_returned_as_they_are(path: str):
    assert check_path(path) is path


def test_every_control_character_is_refused_and_none_above():
    for code in range(32):
        with pytest.raises(UnsafePath):
            check_path(f"a{chr(code)}b")
    assert all(check_path(f"a{chr(code)}b") for code in range(32, 128) if chr(code) not in "/\\:")  # a: is a drive


def test_windows_names_are_refused_only_for_windows():
    for path in ("CON.txt", "dir/lpt1", "trailing. ", "dot."):
        assert check_path(path, windows=False) == path
        with pytest.raises(UnsafePath, match="reserved on Windows"):
            check_path(path, windows=True)
