"""`syncengine serve`, `syncengine token create|list|revoke` and `syncengine server gc`: the server's admin commands.

The server stack (FastAPI, uvicorn, peewee storage) is imported inside the
commands, so the rest of the CLI starts fast.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import click

from cli.render import emit, human_size, json_option

_db_option = click.option(
    "--db",
    "db_url",
    metavar="URL",
    default=None,
    help="postgresql://... (or sqlite:///FILE); default: SQLite in --data.",
)
_data_option = click.option(
    "--data",
    "data_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Folder of the SQLite database (default ./syncengine-server).",
)


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option(
    "--port", default=8765, show_default=True, type=click.IntRange(0, 65535), help="TCP port."
)
@_db_option
@_data_option
@click.option(
    "--certfile",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="TLS certificate (PEM); serve HTTPS.",
)
@click.option(
    "--keyfile",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="TLS private key (PEM), with --certfile.",
)
@click.option(
    "--max-body",
    type=click.IntRange(1024),
    default=None,
    metavar="BYTES",
    help="Cap on request bodies other than streamed blob uploads (default 64 MiB).",
)
@click.option(
    "--max-blob",
    type=click.IntRange(1024),
    default=None,
    metavar="BYTES",
    help="Cap on one streamed blob upload (default 1 GiB).",
)
@click.option(
    "--log-level",
    type=click.Choice(["critical", "error", "warning", "info", "debug"]),
    default="info",
    show_default=True,
)
def serve(host, port, db_url, data_dir, certfile, keyfile, max_body, max_blob, log_level) -> None:
    """Run the sync server in the foreground (Ctrl-C stops it).

    State lives in --data DIR (SQLite, default ./syncengine-server) or in the
    PostgreSQL database --db names; several servers may share one PostgreSQL.
    Every client needs a token: see `syncengine token create`.
    """
    from syncengine.server.admin import serve as run

    run(
        host=host,
        port=port,
        db_url=db_url,
        data_dir=data_dir,
        certfile=certfile,
        keyfile=keyfile,
        max_body=max_body,
        max_blob=max_blob,
        log_level=log_level,
    )


@click.group()
def token() -> None:
    """Create, list and revoke the server's access tokens (run on the server's machine)."""


@token.command("create")
@click.option(
    "--workspace", "-w", required=True, help="Workspace the token opens (created if needed)."
)
@click.option("--label", default=None, help="A note to recognise the token by in `token list`.")
@_db_option
@_data_option
def token_create(workspace, label, db_url, data_dir) -> None:
    """Print a new token for WORKSPACE on stdout, and nothing else.

    The token is shown once; the server keeps only its hash.
    """
    from syncengine.server.admin import create_token, open_storage

    storage = open_storage(db_url, data_dir)
    try:
        info, secret = create_token(storage, workspace, label)
    finally:
        storage.close()
    click.echo(secret)
    click.echo(f"created token {info.id} for workspace {workspace}", err=True)


@token.command("list")
@click.option("--workspace", "-w", default=None, help="Only this workspace's tokens.")
@_db_option
@_data_option
@json_option
def token_list(workspace, db_url, data_dir, as_json) -> None:
    """List tokens by id and prefix (never the tokens themselves)."""
    from syncengine.server.admin import list_tokens, open_storage

    storage = open_storage(db_url, data_dir)
    try:
        infos = list_tokens(storage, workspace)
    finally:
        storage.close()
    rows = [
        {
            "id": i.id,
            "workspace": i.workspace,
            "prefix": i.prefix,
            "label": i.label,
            "created": _when(i.created_ns),
            "revoked": _when(i.revoked_ns),
        }
        for i in infos
    ]

    def human(console, rows) -> None:
        if not rows:
            console.print("no tokens")
        for r in rows:
            state = f"revoked {r['revoked']}" if r["revoked"] else "active"
            label = f"  {r['label']}" if r["label"] else ""
            console.print(
                f"{r['id']}  {r['workspace']}  {r['prefix']}…  "
                f"created {r['created']}  {state}{label}",
                markup=False,
            )

    emit(rows, as_json, human)


@token.command("revoke")
@click.argument("token_id")
@click.option(
    "--workspace", "-w", default=None, help="Refuse unless the token belongs to this workspace."
)
@_db_option
@_data_option
def token_revoke(token_id, workspace, db_url, data_dir) -> None:
    """Revoke the token with id TOKEN_ID (from `token list`); it stops working at once."""
    from syncengine.server.admin import open_storage, revoke_token

    storage = open_storage(db_url, data_dir)
    try:
        info = revoke_token(storage, token_id, workspace)
    finally:
        storage.close()
    click.echo(f"revoked {info.id} ({info.workspace})")


@click.group()
def server() -> None:
    """Server upkeep (run on the server's machine): gc of old history and blobs."""


@server.command("gc")
@click.option("--keep", metavar="DURATION", default="30d", show_default=True,
              help="Keep the change log and old revisions this long (30d, 12h, 0 for none).")
@click.option("--workspace", "-w", default=None, help="Only this workspace (default: all).")
@click.option("--dry-run", is_flag=True, help="Count what would go; change nothing.")
@_db_option
@_data_option
@json_option
def server_gc(keep, workspace, dry_run, db_url, data_dir, as_json) -> None:
    """Drop the change log, op answers and blobs older than --keep that no current document needs.

    Every document's current version stays, and so does every blob stored in
    the last hour. A replica away for longer than --keep gets the full
    listing on its next sync: it loses nothing, and deletions made meanwhile
    still reach it. Safe while servers run: each step holds the workspace's
    lock, as commits do.
    """
    from syncengine.config import parse_duration
    from syncengine.server.admin import collect_garbage, open_storage

    seconds = parse_duration(keep)
    storage = open_storage(db_url, data_dir, existing=True)
    try:
        report = collect_garbage(storage, seconds, workspace, dry_run=dry_run)
    finally:
        storage.close()

    def human(console, r) -> None:
        verb = "would drop" if r.dry_run else "dropped"
        if not r.workspaces:
            console.print("no workspaces")
        for w in r.workspaces:
            console.print(
                f"{w.workspace}: {verb} {w.changes_dropped} change(s), {w.ops_dropped} op answer(s), "
                f"{w.blobs_dropped} blob(s) ({human_size(w.bytes_freed)}); the log now starts at seq "
                f"{w.min_seq} (last {w.last_seq})",
                markup=False,
            )

    emit(report, as_json, human)


def _when(ns: int | None) -> str | None:
    if ns is None:
        return None
    return dt.datetime.fromtimestamp(ns / 1e9, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
