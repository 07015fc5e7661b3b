"""Rendering results: rich text on a terminal, one JSON document with --json."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import click

from syncengine.models import to_jsonable

if TYPE_CHECKING:
    from rich.console import Console

json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout.")


def console() -> Console:
    # rich is imported here, for a person's terminal: --json output never loads it.
    from rich.console import Console

    # Piped output (scripts, CI logs) gets a wide fixed width, so tables stay
    # one row per line instead of wrapping at 80 columns.
    width = None if sys.stdout.isatty() else 200
    return Console(highlight=False, soft_wrap=True, width=width)


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
