"""Rendering results: rich text on a terminal, one JSON document with --json."""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import click

from syncengine.models import to_jsonable

if TYPE_CHECKING:
    from rich.console import Console

json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout.")


def console() -> Console:
    """rich for a terminal; on a pipe, a :class:`PlainConsole` until something needs more than a line of text.

    rich costs ~45 ms to import, more than a no-op sync's round; what a
    script or a benchmark reads from a pipe is one plain line, which rich
    would print with its markup stripped and no colour (see PlainConsole).
    """
    if _plain_output():
        return PlainConsole()  # type: ignore[return-value]
    return rich_console()


def rich_console() -> Console:
    # rich is imported here, for a person's terminal or a table: --json output never loads it.
    from rich.console import Console

    # Piped output (scripts, CI logs) gets a wide fixed width, so tables stay
    # one row per line instead of wrapping at 80 columns.
    width = None if sys.stdout.isatty() else 200
    return Console(highlight=False, soft_wrap=True, width=width)


def _plain_output() -> bool:
    # rich's own test (Console.is_terminal): TTY_COMPATIBLE=1 or a non-empty FORCE_COLOR make a pipe a terminal.
    env = os.environ
    return env.get("TTY_COMPATIBLE") != "1" and not env.get("FORCE_COLOR") and not sys.stdout.isatty()


# rich's markup grammar (rich.markup.RE_TAGS and escape): a tag is ``[`` then
# a lower-case letter, ``#``, ``/`` or ``@``; an odd run of backslashes before
# it makes it literal text.
_TAG = re.compile(r"(\\*)\[([a-z#/@][^[]*?)]")
_ESCAPE = re.compile(r"(\\*)(\[[a-z#/@][^[]*?])")
# Characters rich's Text drops (bell, backspace, vertical tab, form feed, carriage return).
_CONTROL = dict.fromkeys((7, 8, 11, 12, 13))


def escape(text: str) -> str:
    """rich.markup.escape without importing rich: ``text`` printed as it is, brackets included."""
    text = _ESCAPE.sub(lambda m: f"{m[1]}{m[1]}\\{m[2]}", text)
    if text.endswith("\\") and not text.endswith("\\\\"):
        return text + "\\"
    return text


def strip_markup(markup: str) -> str:
    """What rich prints for ``markup`` on a pipe: its text without the style tags."""
    out = []
    position = 0
    for match in _TAG.finditer(markup):
        start, end = match.span()
        out.append(markup[position:start])
        backslashes, escaped = divmod(len(match[1]), 2)
        out.append("\\" * backslashes)
        if escaped:
            out.append(markup[start + len(match[1]):end])
        position = end
    out.append(markup[position:])
    return "".join(out).translate(_CONTROL).expandtabs(8)


class PlainConsole:
    """The part of rich's Console the renderers use, for a pipe: markup stripped, no colour, no wrapping.

    A renderable that is not text (a table) is handed to a real rich
    Console, created then, so only the commands that print one pay for rich.
    """

    def __init__(self) -> None:
        self._rich: Console | None = None

    def print(self, *objects: Any, sep: str = " ", end: str = "\n", markup: bool = True, style: Any = None,
              **options: Any) -> None:
        if options or not all(isinstance(o, str) for o in objects):
            if self._rich is None:
                self._rich = rich_console()
            self._rich.print(*objects, sep=sep, end=end, markup=markup, style=style, **options)
            return
        # A style colours the text, which a pipe does not show.
        text = sep.join(objects)
        text = strip_markup(text) if markup else text.translate(_CONTROL).expandtabs(8)
        sys.stdout.write(text + end)


def emit(result: Any, as_json: bool, human: Callable[[Console, Any], None]) -> None:
    """Print ``result`` as JSON, or hand it to ``human`` for a person."""
    if as_json:
        sys.stdout.write(json.dumps(to_jsonable(result), indent=2, ensure_ascii=False) + "\n")
        sys.stdout.flush()
    else:
        human(console(), result)


def emit_json_line(obj: Any) -> None:
    sys.stdout.write(json.dumps(to_jsonable(obj), ensure_ascii=False) + "\n")
    sys.stdout.flush()


def short_hash(digest: str | None) -> str:
    return digest[:10] if digest else "-"


def human_size(n: int | None) -> str:
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"
