"""`conflicts` and `resolve`: what waits for a person, and settling it."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from cli.main import Context
from cli.render import emit, json_option
from cli.workspace_cmds import open_workspace
from syncengine.models import ConflictInfo

if TYPE_CHECKING:
    from rich.console import Console

TAKES = ("local", "remote", "merged")  # syncengine.resolution.TAKES, without importing the merge stack


@click.command()
@json_option
@click.pass_obj
def conflicts(ctx: Context, as_json: bool) -> None:
    """List open conflicts with the fields or lines involved.

    A conflict is open when the `manual` strategy met it: nothing was
    written, and `sync` exits 1 until `syncengine resolve PATH` settles it.
    """
    with open_workspace(ctx) as ws:
        infos = ws.conflicts()
    emit(infos, as_json, _render_conflicts)


def _render_conflicts(out: Console, infos: list[ConflictInfo]) -> None:
    from rich.table import Table

    if not infos:
        out.print("No open conflicts.")
        return
    table = Table(box=None, pad_edge=False, show_edge=False)
    for col in ("path", "kind", "since (UTC)", "involved"):
        table.add_column(col)
    for c in infos:
        involved = ", ".join(c.details or []) or "-"
        table.add_row(c.path, c.kind, (c.created_at or "").replace("T", " ").rstrip("Z"), involved)
    out.print(table)
    out.print("Settle one with `syncengine resolve PATH --take local|remote|merged`, "
              "or edit the file and run `syncengine resolve PATH`.")


@click.command()
@click.argument("path")
@click.option("--take", type=click.Choice(TAKES),
              help="local: this replica's version; remote: the server's; merged: a three-way merge. "
                   "Default: the file as it is now, edited by hand.")
@json_option
@click.pass_obj
def resolve(ctx: Context, path: str, take: str | None, as_json: bool) -> None:
    """Settle the open conflict at PATH; the next `sync` pushes your choice.

    --take merged is refused when both sides changed the same fields or
    lines. The version that loses stays in the blob store and in `log`.
    """
    with open_workspace(ctx) as ws:
        info = ws.resolve(ws.rel(path, ctx.start), take)
    emit(info, as_json, _render_resolved)


def _render_resolved(out: Console, c: ConflictInfo) -> None:
    out.print(f"Settled {c.kind} conflict on {c.path} ({c.resolution}); `syncengine sync` pushes it.")
