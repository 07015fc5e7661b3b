"""`sync`: one round with the server."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import click

from cli.main import Context
from cli.render import emit, escape, json_option
from cli.workspace_cmds import open_workspace

# The round's own stack (the HTTP client included), imported with the command rather than by the engine's first
# call: inside start-up's pause of the collector (cli.main), and frozen after it.
from syncengine import sync as _round  # noqa: F401
from syncengine.config import STRATEGIES
from syncengine.models import SyncReport

if TYPE_CHECKING:
    from rich.console import Console


@click.command()
@click.option("--strategy", type=click.Choice(STRATEGIES),
              help="Conflict strategy for this run (overrides .syncrules).")
@click.option("--dry-run", is_flag=True, help="Show the plan; write nothing.")
@click.option("--max-delete", type=click.FloatRange(0, 100), metavar="PCT",
              help="Stop if a round would delete more than PCT% of the files (default 50).")
@click.option("--force", is_flag=True, help="Run even if a safety guard would stop it.")
@click.option("--wait", type=click.FloatRange(min=0), metavar="SECONDS",
              help="Wait this long for another sync to finish (default 30), then exit 7.")
@json_option
@click.pass_obj
def sync(ctx: Context, strategy: str | None, dry_run: bool, max_delete: float | None, force: bool,
         wait: float | None, as_json: bool) -> int:
    """Exchange changes with the server: pull, merge, push.

    Exit 0 when done, 1 when manual conflicts remain, 3 when the server is
    unreachable or failing (local changes stay queued), 4 when the token is
    refused, 5 outside a workspace or with a damaged journal, 6 when a safety
    guard stopped the run, 7 when another sync holds the lock past --wait.
    A dry run exits as the real run would (6 if the guard would stop it).
    """
    with open_workspace(ctx) as ws, _progress(enabled=not as_json and sys.stderr.isatty()) as progress:
        report = ws.sync(strategy=strategy, dry_run=dry_run, force=force, max_delete=max_delete,
                         wait=wait, progress=progress)
    emit(report, as_json, _render_sync)
    return report.exit_code


class _progress:
    """A rich progress bar on stderr for a terminal; a no-op callback otherwise."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.bar = None
        self.tasks: dict[str, int] = {}

    def __enter__(self):
        if not self.enabled:
            return None
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        self.bar = Progress(TextColumn("{task.description:>9}"), BarColumn(), MofNCompleteColumn(),
                            console=Console(stderr=True), transient=True)
        self.bar.start()
        return self.update

    def update(self, phase: str, current: int, total: int | None) -> None:
        assert self.bar is not None
        if phase not in self.tasks:
            self.tasks[phase] = self.bar.add_task(phase, total=total)
        self.bar.update(self.tasks[phase], completed=current, total=total)

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()


def _render_sync(out: Console, r: SyncReport) -> None:

    if r.dry_run:
        if not r.plan:
            out.print("Dry run: nothing to do.")
        else:
            out.print(f"Dry run: {len(r.plan)} action(s) planned, nothing written:")
            for a in r.plan:
                conflict = f" [{a.conflict}]" if a.conflict else ""
                out.print(f"  {escape(f'{a.action:<6} {a.path}{conflict}')}  [dim]({escape(a.detail)})[/]")
        if r.guard:
            out.print(f"[bold red]A real run would stop here (exit 6):[/] {escape(r.guard)}; "
                      "check the files, then run `syncengine sync --force`.")
    else:
        parts = []
        for label, n in (("downloaded", len(r.downloaded)), ("deleted here", len(r.deleted)),
                         ("moved", len(r.moved)), ("pushed", len(r.pushed))):
            if n:
                parts.append(f"{n} {label}")
        done = ", ".join(parts) if parts else "nothing to do"
        out.print(escape(f"Synced with {r.server} ({r.workspace}): {done} in {r.seconds:.2f}s."))
        for c in r.conflicts:
            how = c.resolution or "open, waiting for `syncengine resolve`"
            how += f", loser saved as {c.copy_path}" if c.copy_path else ""
            out.print(escape(f"  conflict {c.kind} {c.path}: {how}"))
        if r.open_conflicts:
            out.print(f"[bold red]{r.open_conflicts} conflict(s) need you:[/] see `syncengine conflicts`.")
    for p in r.problems[:20]:
        out.print(f"[yellow]! {escape(p.path)}: {escape(p.reason)}[/]")
