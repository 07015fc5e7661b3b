"""`log`, `diff`, `snapshot`, `snapshots`, `restore`: the workspace's past."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from cli.main import Context
from cli.render import emit, escape, human_size, json_option, short_hash
from cli.workspace_cmds import open_workspace
from syncengine.views import DocDiff, LogEntry, RestoreReport, SnapshotInfo

if TYPE_CHECKING:
    from rich.console import Console


@click.command()
@click.argument("path", required=False)
@click.option("-n", "limit", type=click.IntRange(min=1), default=20, show_default=True,
              help="Show at most N entries.")
@json_option
@click.pass_obj
def log(ctx: Context, path: str | None, limit: int, as_json: bool) -> None:
    """Show the change journal, newest first (for PATH: that document's history)."""
    with open_workspace(ctx) as ws:
        ws.scan()
        rel = ws.rel(path, ctx.start) if path else None
        entries = ws.log(rel, limit)
    emit(entries, as_json, _render_log)


def _render_log(out: Console, entries: list[LogEntry]) -> None:
    from rich.table import Table

    if not entries:
        out.print("No changes recorded.")
        return
    table = Table(box=None, pad_edge=False, show_edge=False)
    for col in ("seq", "when (UTC)", "op", "path", "hash", "size", "origin", "snap"):
        table.add_column(col)
    for e in entries:
        path = escape(f"{e.old_path} -> {e.path}" if e.old_path else e.path)
        if e.zones:
            path += f"  [dim]({escape(', '.join(e.zones[:3]))}{', ...' if len(e.zones) > 3 else ''})[/]"
        table.add_row(str(e.seq), e.at.replace("T", " ").rstrip("Z"), e.op.value, path, short_hash(e.hash),
                      human_size(e.size) if e.hash else "-", e.origin, str(e.snapshot_id or ""))
    out.print(table)


@click.command()
@click.argument("path", required=False)
@click.option("--since", metavar="SNAPSHOT", help="Compare with this snapshot instead of the synced base.")
@json_option
@click.pass_obj
def diff(ctx: Context, path: str | None, since: str | None, as_json: bool) -> None:
    """Show what changed since the last sync (or since a snapshot).

    JSON, YAML and TOML documents are compared field by field, text by lines,
    binaries by size and hash.
    """
    with open_workspace(ctx) as ws:
        rel = ws.rel(path, ctx.start) if path else None
        diffs = ws.diff(rel, since)
    emit(diffs, as_json, _render_diff)


def _render_diff(out: Console, diffs: list[DocDiff]) -> None:

    if not diffs:
        out.print("No differences.")
        return
    for d in diffs:
        head = f"[bold]{d.status}[/] {escape(d.path)}"
        if d.old_path:
            head += escape(f" (from {d.old_path})")
        out.print(f"{head}  [dim]{d.kind.value}, against {d.against}[/]")
        if d.note:
            out.print(f"  [dim]{escape(d.note)}[/]")
        for f in d.fields:
            if f.change == "changed":
                out.print(f"  ~ {f.path}: {f.old!r} -> {f.new!r}", markup=False)
            elif f.change == "added":
                out.print(f"  + {f.path}: {f.new!r}", markup=False)
            else:
                out.print(f"  - {f.path}: {f.old!r}", markup=False)
        if d.unified:
            for line in d.unified.splitlines():
                style = "green" if line.startswith("+") else "red" if line.startswith("-") else None
                out.print(f"  {line}", style=style, markup=False)
        if not d.fields and not d.unified and (d.old_hash or d.new_hash):
            out.print(f"  size {human_size(d.old_size)} -> {human_size(d.new_size)}, "
                      f"sha256 {short_hash(d.old_hash)} -> {short_hash(d.new_hash)}")


@click.command()
@click.option("-m", "--message", help="Say why you took it.")
@json_option
@click.pass_obj
def snapshot(ctx: Context, message: str | None, as_json: bool) -> None:
    """Record the current state of every file, so it can be restored later."""
    with open_workspace(ctx) as ws:
        info = ws.snapshot(message)
    emit(info, as_json, _render_snapshot)


def _render_snapshot(out: Console, info: SnapshotInfo) -> None:
    out.print(f"Snapshot #{info.id}: {info.files} file(s), {info.changed} changed since the previous one.")


@click.command()
@click.option("-n", "limit", type=click.IntRange(min=1), default=None, help="Show at most N snapshots.")
@json_option
@click.pass_obj
def snapshots(ctx: Context, limit: int | None, as_json: bool) -> None:
    """List snapshots, newest first."""
    with open_workspace(ctx) as ws:
        infos = ws.snapshots(limit)
    emit(infos, as_json, _render_snapshots)


def _render_snapshots(out: Console, infos: list[SnapshotInfo]) -> None:
    from rich.table import Table

    if not infos:
        out.print("No snapshots yet.")
        return
    table = Table(box=None, pad_edge=False, show_edge=False)
    for col in ("id", "when (UTC)", "trigger", "files", "size", "changed", "message"):
        table.add_column(col)
    for s in infos:
        table.add_row(f"#{s.id}", s.created_at.replace("T", " ").rstrip("Z"), s.trigger, str(s.files),
                      human_size(s.bytes), str(s.changed), escape(s.message or ""))
    out.print(table)


@click.command()
@click.argument("snapshot_ref", metavar="SNAPSHOT")
@click.argument("paths", nargs=-1)
@json_option
@click.pass_obj
def restore(ctx: Context, snapshot_ref: str, paths: tuple[str, ...], as_json: bool) -> None:
    """Bring back SNAPSHOT (an id, or 'latest'), whole or only PATHS.

    A safety snapshot is taken first, so a restore can be undone by restoring
    that one. Restoring everything also removes files created since.
    """
    with open_workspace(ctx) as ws:
        rels = [ws.rel(p, ctx.start) for p in paths]
        report = ws.restore(snapshot_ref, rels)
    emit(report, as_json, _render_restore)


def _render_restore(out: Console, r: RestoreReport) -> None:
    out.print(f"Restored snapshot #{r.snapshot_id}: {len(r.written)} file(s) written, "
              f"{len(r.deleted)} removed, {r.unchanged} already as they were.")
    for p in r.written[:20]:
        out.print(f"  restored {p}", markup=False)
    for p in r.deleted[:20]:
        out.print(f"  removed  {p}", markup=False)
    if r.safety_snapshot_id:
        out.print(f"Undo with `syncengine restore {r.safety_snapshot_id}`.")


@click.command()
@click.option("--keep", metavar="DURATION", help="Keep snapshots younger than this (30d, 12h; default: config).")
@json_option
@click.pass_obj
def gc(ctx: Context, keep: str | None, as_json: bool) -> None:
    """Prune old snapshots (folded, never breaking the rest) and unreferenced blobs."""
    with open_workspace(ctx) as ws:
        report = ws.gc(keep)
    emit(report, as_json, lambda out, r: out.print(
        f"Dropped {r.snapshots_dropped} snapshot(s), kept {r.snapshots_kept}; "
        f"deleted {r.blobs_deleted} blob(s), freed {human_size(r.bytes_freed)}."))
