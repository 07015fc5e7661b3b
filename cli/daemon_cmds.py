"""`syncengine daemon start|stop|status|run|pause|resume` and `syncengine events`."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import click

from cli.main import Context
from cli.render import emit, emit_json_line, json_option
from cli.workspace_cmds import open_workspace
from syncengine import daemonctl
from syncengine.progress import CHANNELS
from syncengine.views import DaemonInfo, Event
from syncengine.workspace import Layout, find_root

if TYPE_CHECKING:
    from rich.console import Console


@click.group()
def daemon() -> None:
    """The background daemon: watch the folder, autosave, sync, live updates."""


@daemon.command("start")
@json_option
@click.pass_obj
def daemon_start(ctx: Context, as_json: bool) -> None:
    """Start the daemon in the background (logs to .syncengine/daemon.log).

    Says so, and does nothing, when one already runs for this workspace.
    """
    root = find_root(ctx.start)
    pid, already = daemonctl.start(root)
    result = {"pid": pid, "already_running": already, "log": str(Layout(root).daemon_log)}

    def human(out: Console, r: dict) -> None:
        if r["already_running"]:
            out.print(f"The daemon is already running (pid {r['pid']}).")
        else:
            out.print(f"Daemon started (pid {r['pid']}); log: {r['log']}")

    emit(result, as_json, human)


@daemon.command("stop")
@click.option("--timeout", type=click.FloatRange(min=0), default=10.0, show_default=True,
              help="Seconds to wait before killing it.")
@json_option
@click.pass_obj
def daemon_stop(ctx: Context, timeout: float, as_json: bool) -> None:
    """Stop the daemon (SIGTERM, then SIGKILL after --timeout)."""
    pid = daemonctl.stop(find_root(ctx.start), timeout=timeout)

    def human(out: Console, r: dict) -> None:
        out.print(f"Daemon stopped (pid {r['pid']})." if r["pid"] else "No daemon was running.")

    emit({"pid": pid, "stopped": pid is not None}, as_json, human)


@daemon.command("status")
@json_option
@click.pass_obj
def daemon_status(ctx: Context, as_json: bool) -> None:
    """Is a daemon running here, and what is it doing."""
    with open_workspace(ctx) as ws:
        result = ws.daemon_info()
    emit(result, as_json, render_daemon)


def render_daemon(out: Console, d: DaemonInfo) -> None:
    """The daemon's lines, shared with `syncengine status`."""
    if not d.running:
        out.print("Daemon: not running" + (" (syncing paused)" if d.paused else ""))
        return
    out.print(f"Daemon: {d.state or 'running'} (pid {d.pid}, since {d.started_at})"
              + (" [bold yellow]syncing paused[/]" if d.paused else ""))
    out.print(f"  watcher: {d.watcher}   live updates: {d.live}   sync: {d.sync}")
    if d.last_rescan_at:
        out.print(f"  last full scan: {d.last_rescan_at}")
    for t in d.tasks:
        total = f"/{t.total}" if t.total else ""
        out.print(f"  {t.kind:<8} {t.title}: {t.current}{total}")
    if d.warning:
        out.print(f"  [yellow]last warning: {d.warning}[/]")


def _pause(ctx: Context, paused: bool, as_json: bool) -> None:
    with open_workspace(ctx) as ws:
        told = daemonctl.set_paused(ws.layout, ws.journal, paused)
    word = "paused" if paused else "resumed"

    def human(out: Console, r: dict) -> None:
        where = "the daemon was told" if r["daemon_running"] else "no daemon runs; it applies when one starts"
        out.print(f"Syncing {word} ({where}).")

    emit({"paused": paused, "daemon_running": told}, as_json, human)


@daemon.command("pause")
@json_option
@click.pass_obj
def daemon_pause(ctx: Context, as_json: bool) -> None:
    """Hold syncing; watching, journaling and autosave go on."""
    _pause(ctx, True, as_json)


@daemon.command("resume")
@json_option
@click.pass_obj
def daemon_resume(ctx: Context, as_json: bool) -> None:
    """Release syncing held by `daemon pause`; what is queued syncs at once."""
    _pause(ctx, False, as_json)


@daemon.command("run")
@click.option("--detached", is_flag=True, hidden=True,
              help="Started by `daemon start`: report readiness, log to the file only.")
@click.pass_obj
def daemon_run(ctx: Context, detached: bool) -> int:
    """Run the daemon in the foreground (systemd, containers); Ctrl-C or SIGTERM stops it."""
    from syncengine.daemon import run

    return run(find_root(ctx.start), detached=detached)


@click.command()
@click.option("--follow", "-f", is_flag=True, help="Keep printing events as they come (Ctrl-C stops).")
@click.option("--channel", "channels", type=click.Choice(CHANNELS), multiple=True,
              help="Only this channel (repeatable); default: all.")
@click.option("-n", "--lines", type=click.IntRange(min=0), default=10, show_default=True,
              help="How many past events to print first.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@click.pass_obj
def events(ctx: Context, follow: bool, channels: tuple[str, ...], lines: int, as_json: bool) -> None:
    """Show what the daemon and syncs publish: zones, processing, progress, log."""
    with open_workspace(ctx) as ws:
        past = ws.recent_events(lines, channels or None)
        last = past[-1].id if past else ws.events.last_id()
        for event in past:
            _print_event(event, as_json)
        if not follow:
            return
        try:
            with ws.subscribe(channels or None, after=last) as sub:
                for event in sub:
                    _print_event(event, as_json)
        except KeyboardInterrupt:
            return  # Ctrl-C is how a follow ends: not an error


def _print_event(event: Event, as_json: bool) -> None:
    if as_json:
        emit_json_line(event)
        return
    p = event.payload
    when = event.at[11:19] if len(event.at) >= 19 else event.at
    if event.channel == "zones":
        fields = ", ".join(p.get("fields") or []) or "-"
        text = f"{p.get('path')}  {fields}  ({p.get('origin')})"
    elif event.channel == "processing":
        detail = f"  {p['detail']}" if p.get("detail") else ""
        text = f"{p.get('status'):<8} {p.get('path')}{detail}"
    elif event.channel == "progress":
        total = f"/{p['total']}" if p.get("total") else ""
        text = f"{p.get('kind'):<8} {p.get('title')}: {p.get('current')}{total} {p.get('state')}"
    else:
        text = f"{p.get('level')}: {p.get('message')}"
    sys.stdout.write(f"{when} {event.channel:<10} {text}\n")
    sys.stdout.flush()
