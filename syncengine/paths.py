"""Workspace-relative paths: what a valid one looks like, and what we ignore.

Every path the engine stores or sends is relative to the workspace root,
'/'-separated, NFC-normalised UTF-8 with no empty, '.' or '..' component.
One function (:func:`check_path`) decides that, for the scanner, the client
applying a server answer, and the server accepting a commit alike, so the
three can never disagree about what may exist.
"""

from __future__ import annotations

import functools
import os
import re
import unicodedata
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from syncengine.errors import UnsafePath

if TYPE_CHECKING:
    import pathspec

STATE_DIR = ".syncengine"
IGNORE_FILE = ".syncignore"
RULES_FILE = ".syncrules"
MAX_PATH_BYTES = 4096
MAX_NAME_BYTES = 255

# Editor droppings and our own temp files: never journaled, never synced.
# Kept as gitignore patterns so they read like the user's own .syncignore.
DEFAULT_IGNORES = (
    f"/{STATE_DIR}/",
    ".syncengine.*.tmp",  # fsops temp files
    "*.swp",
    "*.swo",
    "*.swx",
    "*~",
    ".#*",
    "\\#*#",  # emacs auto-save files (a bare "#*#" is a comment in gitignore syntax)
    "4913",  # vim's probe file
    ".goutputstream-*",
    ".DS_Store",
    "Thumbs.db",
    "~$*",  # MS Office lock files
    ".~lock.*#",  # LibreOffice lock files
    "*.crdownload",
    "*.part",
)
_WINDOWS_RESERVED = {"CON", "PRN", "AUX", "NUL"} | {f"{p}{i}" for p in ("COM", "LPT") for i in range(1, 10)}


def check_path(path: str, *, windows: bool | None = None) -> str:
    """Return ``path`` if it is a safe workspace-relative path, else raise UnsafePath.

    Rejects rather than repairs: a path that needs normalising came from a
    buggy or hostile peer, and guessing what it meant could land a write on
    the wrong file.

    Every item of every commit passes here, on the client and again on the
    server (20,000 calls for a first sync of 10,000 documents), so the usual
    ASCII path takes the short way: one regex search for control
    characters, and its length as its size in bytes; it is NFC as it is.
    """
    if windows is None:
        windows = os.name == "nt"
    if not isinstance(path, str) or not path:
        raise UnsafePath("empty path")
    if _CONTROL.search(path):
        raise UnsafePath("path contains a control character", paths=[repr(path)])
    if "\\" in path:
        raise UnsafePath("path contains a backslash", paths=[path])
    if path.startswith("/") or (len(path) > 1 and path[1] == ":"):
        raise UnsafePath("absolute path", paths=[path])
    ascii_only = path.isascii()
    if not ascii_only:
        try:
            path.encode("utf-8")
        except UnicodeEncodeError:
            raise UnsafePath("path is not valid UTF-8", paths=[repr(path)])
    if _size(path, ascii_only) > MAX_PATH_BYTES:
        raise UnsafePath("path is too long", paths=[path[:80] + "..."])
    if not ascii_only and not unicodedata.is_normalized("NFC", path):
        raise UnsafePath("path is not NFC-normalised", paths=[path])
    parts = path.split("/")
    for part in parts:
        if part in ("", ".", ".."):
            raise UnsafePath("path has an empty, '.' or '..' component", paths=[path])
        if _size(part, ascii_only) > MAX_NAME_BYTES:
            raise UnsafePath("file name is too long", paths=[path])
        if windows and (part.split(".")[0].upper() in _WINDOWS_RESERVED or part[-1] in " ."):
            raise UnsafePath("name is reserved on Windows", paths=[path])
    if parts[0] == STATE_DIR:
        raise UnsafePath("path is inside the engine's own folder", paths=[path])
    return path


_CONTROL = re.compile(r"[\x00-\x1f]")


def _size(text: str, ascii_only: bool) -> int:
    """Bytes of ``text`` in UTF-8 (of a valid UTF-8 string: check_path has encoded it once)."""
    return len(text) if ascii_only else len(text.encode("utf-8"))


def is_safe(path: str) -> bool:
    try:
        check_path(path)
    except UnsafePath:
        return False
    return True


def to_abs(root: Path, path: str) -> Path:
    """Join a checked relative path to the root; refuses anything that escapes it."""
    check_path(path)
    return root / path


def relpath(root: Path, abs_path: str | os.PathLike) -> str:
    """The workspace-relative POSIX form of an absolute path under ``root``."""
    rel = os.path.relpath(os.fspath(abs_path), os.fspath(root))
    return rel.replace(os.sep, "/")


def casefold_key(path: str) -> str:
    """Key under which two paths would collide on a case-insensitive file system."""
    return unicodedata.normalize("NFC", path).casefold()


class IgnoreRules:
    """Default ignores plus the workspace's ``.syncignore`` (gitignore syntax).

    Reloaded when the file's (size, mtime) changes, so a long-running daemon
    follows edits to it.
    """

    def __init__(self, root: Path, extra: Iterable[str] = ()) -> None:
        self.root = root
        self._extra = tuple(extra)
        self._stamp: tuple[int, int] | None = None
        self._spec = self._build(())
        self.refresh()

    def _build(self, user_lines: Iterable[str]) -> pathspec.PathSpec | None:
        own = [line for line in (*self._extra, *user_lines) if line]  # an empty line is no rule
        if not own:
            # The usual workspace, with no .syncignore: the defaults' regex is
            # written out below, and pathspec (20 ms to import) is not loaded.
            self._any = _default_regex()
            return None
        import pathspec

        spec = pathspec.GitIgnoreSpec.from_lines([*DEFAULT_IGNORES, *own])
        self._any = _one_regex(spec)
        return spec

    def refresh(self) -> bool:
        """Re-read .syncignore if it changed; True when the rules changed."""
        target = self.root / IGNORE_FILE
        try:
            st = target.stat()
            stamp = (st.st_size, st.st_mtime_ns)
        except OSError:
            stamp = None
        if stamp == self._stamp:
            return False
        self._stamp = stamp
        lines: list[str] = []
        if stamp is not None:
            try:
                lines = target.read_text(encoding="utf-8", errors="replace").splitlines()
            except OSError:
                lines = []
        self._spec = self._build(lines)
        return True

    def ignored(self, path: str, *, is_dir: bool = False) -> bool:
        """True when ``path`` (relative) is ignored; pass is_dir for folders."""
        return bool(self.matcher()(path + "/" if is_dir else path))

    def matcher(self) -> Callable[[str], object]:
        """A one-call test for the scanner's loop: truthy when the path (a folder's ending in '/') is ignored.

        The stat walk asks once per file; a bound regex method saves the
        method call and the branch that :meth:`ignored` adds to each.
        """
        if self._any is not None:
            return self._any.match
        assert self._spec is not None  # _any is None only when a negation needs pathspec's ordered answer
        return self._spec.match_file

    def pattern(self) -> tuple[str, int] | None:
        """The one regex :meth:`matcher` matches with, as (pattern, flags): equal ones ignore the same paths.

        None when the rules need pathspec's ordered answer (a negation): the
        early walk (syncengine.early) then does not run, having nothing
        plain to compare its rules with.
        """
        return (self._any.pattern, self._any.flags) if self._any is not None else None

    def ignored_name(self, name: str) -> bool:
        """Cheap check on a bare file name, for watcher events on temp files."""
        return self.ignored(name)


# _one_regex's answer for DEFAULT_IGNORES alone, written out so that a workspace
# without a .syncignore never imports pathspec. tests/test_performance.py checks
# it is still what pathspec builds (after a change of the defaults or of pathspec,
# print _one_regex(GitIgnoreSpec.from_lines(DEFAULT_IGNORES)).pattern here).
_DEFAULT_REGEX = (
    r"(?:^\.syncengine(?:/))|(?:^(?:.+/)?(?:(?:\.syncengine\.[^/]*\.tmp(?:(?:/)|$))"
    r"|(?:[^/]*\.swp(?:(?:/)|$))|(?:[^/]*\.swo(?:(?:/)|$))|(?:[^/]*\.swx(?:(?:/)|$))"
    r"|(?:[^/]*\~(?:(?:/)|$))|(?:\.\#[^/]*(?:(?:/)|$))|(?:\#[^/]*\#(?:(?:/)|$))|(?:4913(?:(?:/)|$))"
    r"|(?:\.goutputstream\-[^/]*(?:(?:/)|$))|(?:\.DS_Store(?:(?:/)|$))|(?:Thumbs\.db(?:(?:/)|$))"
    r"|(?:\~\$[^/]*(?:(?:/)|$))|(?:\.\~lock\.[^/]*\#(?:(?:/)|$))|(?:[^/]*\.crdownload(?:(?:/)|$))"
    r"|(?:[^/]*\.part(?:(?:/)|$))))"
)


@functools.cache
def _default_regex() -> re.Pattern[str]:
    return re.compile(_DEFAULT_REGEX)


def _one_regex(spec: pathspec.PathSpec) -> re.Pattern[str] | None:
    """All the patterns as one alternation, when no pattern negates another.

    Without a `!pattern`, "ignored" is simply "some pattern matches", and one
    regex answers it in a single pass instead of one match per pattern (the
    scanner asks for every file: 50,000 files x 16 patterns cost more than
    the stat walk). With negations, order matters and pathspec decides.
    """
    active = [p for p in spec.patterns if p.include is not None]
    if not active or not all(p.include and isinstance(getattr(p, "regex", None), re.Pattern) for p in active):
        return None
    # pathspec names a group in every pattern; an alternation may not repeat a name.
    parts = [_NAMED_GROUP.sub("(?:", p.regex.pattern) for p in active]
    # Most patterns ("*.swp", "build/") match at any depth and begin with the
    # same "^(?:.+/)?". Written once for all of them (P(A|B) is the same
    # language as PA|PB), the engine finds the folder boundaries once per
    # path instead of once per pattern: 2.5x faster on the default rules.
    anywhere = [part[len(_ANY_DEPTH):] for part in parts if _factorable(part)]
    rooted = [part for part in parts if not _factorable(part)]
    if anywhere:
        rooted.append(_ANY_DEPTH + "(?:" + "|".join(f"(?:{rest})" for rest in anywhere) + ")")
    for candidate in (rooted, parts):  # the plain alternation if the factored one does not compile
        try:
            return re.compile("|".join(f"(?:{part})" for part in candidate))
        except re.error:
            continue
    return None


_NAMED_GROUP = re.compile(r"\(\?P<\w+>")
_ANY_DEPTH = "^(?:.+/)?"


def _factorable(part: str) -> bool:
    """Whether ``part`` is the any-depth prefix followed by one term (no top-level '|' to regroup)."""
    if not part.startswith(_ANY_DEPTH):
        return False
    depth, in_class, escaped = 0, False, False
    for ch in part[len(_ANY_DEPTH):]:
        if escaped:
            escaped = False
        elif ch == "\\":
            escaped = True
        elif in_class:
            in_class = ch != "]"
        elif ch == "[":
            in_class = True
        elif ch in "()":
            depth += 1 if ch == "(" else -1
        elif ch == "|" and depth == 0:
            return False
    return depth == 0 and not in_class and not escaped
