"""What an administrator runs on the server's machine: tokens, gc and ``serve``.

The CLI (``cli/server_cmds.py``) only parses flags and calls these.
"""

from __future__ import annotations

import logging
import re
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from syncengine.errors import UsageError
from syncengine.protocol import ProtocolError, check_workspace
from syncengine.server.db import DB_FILE
from syncengine.server.storage import Storage, TokenInfo

if TYPE_CHECKING:
    from syncengine.server.gc import ServerGcReport

DEFAULT_DATA_DIR = Path("syncengine-server")


def open_storage(db_url: str | None = None, data_dir: Path | str | None = None, *, existing: bool = False
                 ) -> Storage:
    """The storage ``--db``/``--data`` name (``./syncengine-server`` by default).

    ``existing`` (server gc): refuse a data folder holding no server
    database, rather than make an empty one where a mistyped ``--data``
    points and report "no workspaces".
    """
    folder = Path(data_dir if data_dir is not None else DEFAULT_DATA_DIR)
    if existing and not db_url and not (folder / DB_FILE).is_file():
        raise UsageError(f"no server database in {folder} (check --data, or --db for PostgreSQL)")
    return Storage(db_url, data_dir if data_dir is not None or db_url else DEFAULT_DATA_DIR)


def _workspace(name: str) -> str:
    try:
        return check_workspace(name)
    except ProtocolError as exc:
        raise UsageError(str(exc)) from None


def create_token(
    storage: Storage, workspace: str, label: str | None = None
) -> tuple[TokenInfo, str]:
    """(its listing, the token): the workspace is created if it does not exist."""
    return storage.create_token(_workspace(workspace), label)


def list_tokens(storage: Storage, workspace: str | None = None) -> list[TokenInfo]:
    return storage.list_tokens(_workspace(workspace) if workspace else None)


def revoke_token(storage: Storage, token_id: str, workspace: str | None = None) -> TokenInfo:
    info = storage.revoke_token(token_id)
    if workspace is not None and info.workspace != workspace:
        raise UsageError(
            f"token {token_id} belongs to workspace {info.workspace!r}, not {workspace!r}"
        )
    return info


def collect_garbage(storage: Storage, keep_seconds: float, workspace: str | None = None, *,
                    dry_run: bool = False) -> ServerGcReport:
    """Drop history and blobs older than ``keep_seconds`` that no current document needs (server/gc.py)."""
    from syncengine.server.gc import collect

    return collect(storage, keep_seconds, workspace=_workspace(workspace) if workspace else None, dry_run=dry_run)


class _RedactQuery(logging.Filter):
    """Access-log lines without query strings: a token put there by mistake stays out of logs."""

    _query = re.compile(r"\?[^ \"]*")

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(
                self._query.sub("?…", a) if isinstance(a, str) else a for a in record.args
            )
        return True


def serve(
    *,
    host: str = "127.0.0.1",
    port: int = 8765,
    db_url: str | None = None,
    data_dir: Path | None = None,
    certfile: Path | None = None,
    keyfile: Path | None = None,
    max_body: int | None = None,
    max_blob: int | None = None,
    log_level: str = "info",
) -> None:
    """Run the server in the foreground until interrupted."""
    import uvicorn

    from syncengine.server.app import ServerSettings, create_app

    if (certfile is None) != (keyfile is None):
        raise UsageError("--certfile and --keyfile go together")
    settings = ServerSettings()
    if max_body is not None:
        settings.limits = replace(
            settings.limits, pack=max_body, json=min(settings.limits.json, max_body)
        )
    if max_blob is not None:
        settings.limits = replace(settings.limits, blob=max_blob)
    from syncengine.server.live import MAX_MESSAGE

    storage = open_storage(db_url, data_dir)
    logging.getLogger("uvicorn.access").addFilter(_RedactQuery())
    app = create_app(storage, settings)
    try:
        uvicorn.run(
            app,
            host=host,
            port=port,
            ssl_certfile=str(certfile) if certfile else None,
            ssl_keyfile=str(keyfile) if keyfile else None,
            log_level=log_level,
            ws="auto",
            ws_max_size=MAX_MESSAGE,
            lifespan="off",
            server_header=False,
        )
    finally:
        app.state.live.close()
        storage.close()
