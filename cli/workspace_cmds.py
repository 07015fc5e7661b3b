"""`init`, `status`, `repair`: creating, inspecting and mending a workspace."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from cli.main import Context
from cli.render import emit, escape, json_option
from syncengine import Workspace

if TYPE_CHECKING:
    from rich.console import Console

    from syncengine.views import Status


def open_workspace(ctx: Context) -> Workspace:
    return Workspace.find(ctx.start)


@click.command()
@click.argument("path", type=click.Path(file_okay=False, path_type=Path), default=".")
@click.option("--server", metavar="URL", envvar="SYNCENGINE_SERVER", help="Sync server URL.")
@click.option("--workspace", "name", metavar="NAME", help="Workspace name on the server.")
@click.option("--token-file", type=click.File("r"), metavar="FILE|-",
              help="Read the server token from FILE (- for stdin); or set SYNCENGINE_TOKEN.")
@json_option
@click.pass_obj
def init(ctx: Context, path: Path, server: str | None, name: str | None, token_file, as_json: bool) -> None:
    """Make PATH (default: here) a workspace and record the files in it."""
    import os

    target = path if path.is_absolute() else ctx.start / path
    token = token_file.read().strip() if token_file else os.environ.get("SYNCENGINE_TOKEN") or None
    ws, report = Workspace.init(target, server=server, name=name, token=token)
    ws.close()
    emit(report, as_json, _render_init)


def _render_init(out: Console, report) -> None:

    if report.created:
        out.print(f"Initialised workspace [bold]{escape(report.root)}[/] with {report.files} file(s).")
    else:
        out.print(f"Connected workspace [bold]{escape(report.root)}[/] ({report.files} file(s)) to a server.")
    if report.server:
        out.print(f"Server: {escape(report.server)}  workspace: {escape(report.workspace or '')}")


@click.command()
@json_option
@click.pass_obj
def status(ctx: Context, as_json: bool) -> int:
    """Scan, then show pending changes, conflicts, the last snapshot and sync."""
    with open_workspace(ctx) as ws:
        result = ws.status()
    emit(result, as_json, _render_status)
    return 0


def _render_status(out: Console, st: Status) -> None:

    out.print(f"Workspace [bold]{escape(st.root)}[/]: {st.files} file(s)")
    p = st.pending
    if p.total:
        parts = [f"{n} {label}" for n, label in ((p.created, "created"), (p.modified, "modified"),
                                                  (p.moved, "moved"), (p.deleted, "deleted")) if n]
        out.print(f"Pending sync: {', '.join(parts)}")
        for item in st.pending_paths[:20]:
            extra = f" (from {item.old_path})" if item.old_path else ""
            out.print(escape(f"  {item.op:<9} {item.path}{extra}"))
        if p.total > 20:
            out.print(f"  ... and {p.total - 20} more")
    else:
        out.print("Pending sync: nothing")
    if st.conflicts:
        out.print(f"[bold red]Conflicts: {len(st.conflicts)}[/] (see `syncengine conflicts`)")
        for c in st.conflicts[:10]:
            out.print(escape(f"  {c.kind:<16} {c.path}"))
    else:
        out.print("Conflicts: none")
    if st.last_snapshot:
        s = st.last_snapshot
        msg = escape(f" \"{s.message}\"") if s.message else ""
        out.print(f"Last snapshot: #{s.id} {s.created_at} ({s.trigger}){msg}; "
                  f"{st.since_snapshot} path(s) changed since")
    else:
        out.print("Last snapshot: none")
    sync = st.sync
    if sync.server:
        when = sync.last_sync_at or "never"
        state = "" if sync.last_sync_ok in (None, True) else f" [red](failed: {escape(sync.last_error or '')})[/]"
        out.print(f"Last sync: {when} with {escape(sync.server)} ({escape(sync.workspace or '')}){state}")
        if sync.stalled:
            out.print(f"[bold red]Syncing has stalled:[/] {escape(str(sync.stalled))}")
    else:
        out.print("Last sync: no server configured")
    if st.daemon is not None:
        d = st.daemon
        state = (d.state or "running") if d.running else "not running"
        paused = " [bold yellow]syncing paused[/]" if d.paused else ""
        out.print(f"Daemon: {state}" + (f" (pid {d.pid})" if d.pid else "") + paused)
        if d.running:
            out.print(f"  watcher: {d.watcher}   live updates: {d.live}   sync: {d.sync}")
        for t in d.tasks:
            total = f"/{t.total}" if t.total else ""
            out.print(f"  {t.kind}: {t.title} {t.current}{total}")
        if d.running and d.warning:
            out.print(f"  [yellow]last warning: {d.warning}[/]")
    for problem in st.errors[:10]:
        out.print(f"[yellow]! {escape(problem.path)}: {escape(problem.reason)}[/]")


@click.command()
@json_option
@click.pass_obj
def repair(ctx: Context, as_json: bool) -> None:
    """Set a damaged journal (or blob store) aside and rebuild it from the files (with no base)."""
    from syncengine.workspace import find_root

    report = Workspace.repair(find_root(ctx.start))
    emit(report, as_json, _render_repair)


def _render_repair(out: Console, report) -> None:

    if report.blobs_moved_aside:
        out.print(escape(f"Moved the damaged blob store aside to {report.blobs_moved_aside}; stored "
                         f"{report.blobs_restored} current file(s) again."))
        if report.blobs_lost:
            out.print(f"{report.blobs_lost} earlier version(s) that only snapshots held are lost: restoring "
                      "them fails.")
        out.print("A file edited since its last sync lost its merge base: a concurrent edit of it keeps both "
                  "versions instead of merging.")
    if report.integrity == "ok":
        out.print(f"The journal is healthy ({report.files} file(s))"
                  + ("." if report.blobs_moved_aside else "; nothing to repair."))
        return
    if report.moved_aside:
        out.print(escape(f"Moved the damaged journal aside to {report.moved_aside}."))
    out.print(f"Rebuilt the journal from {report.files} file(s). The next sync deletes nothing "
              "and turns any difference with the server into a conflict.")
