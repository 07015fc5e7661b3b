"""The server's schema: numbered migrations recorded in the database, on SQLite and PostgreSQL."""

from __future__ import annotations

import threading

from syncengine.server.db import MIGRATIONS, make_models, open_database
from syncengine.server.storage import Storage
from tests.helpers import run_proc


def _meta(storage: Storage) -> dict[str, str]:
    with storage.db.connection_context():
        return {row.key: row.value for row in storage.m.Meta.select()}


def test_a_fresh_database_is_migrated_once_and_keeps_its_server_id(storage):
    first = Storage(storage.db_url, storage.data_dir)
    try:
        meta = _meta(first)
    finally:
        first.close()
    assert meta["schema_version"] == str(len(MIGRATIONS)) and len(meta["server_id"]) == 32
    again = Storage(storage.db_url, storage.data_dir)
    try:
        assert _meta(again) == meta and again.server_id == meta["server_id"]
    finally:
        again.close()


def test_a_database_from_a_newer_syncengine_is_refused_untouched(storage):
    """A schema version this syncengine does not know: `token list` exits 2 with one line; nothing changes."""
    db = Storage(storage.db_url, storage.data_dir)
    try:
        with db.db.connection_context():
            db.m.Meta.update(value="999").where(db.m.Meta.key == "schema_version").execute()
        before = _meta(db)
    finally:
        db.close()
    result = run_proc("token", "list", *storage.cli_args())
    assert result.code == 2 and result.stderr.count("\n") == 1 and "999" in result.stderr
    assert "Traceback" not in result.stderr
    raw = open_database(storage.db_url, storage.data_dir)  # read it back without migrating
    try:
        with raw.connection_context():
            meta = make_models(raw).Meta
            assert {row.key: row.value for row in meta.select()} == before
    finally:
        raw.close_all() if hasattr(raw, "close_all") else raw.close()


def test_servers_starting_together_on_a_fresh_database_migrate_it_once(storage):
    """Four storages opened at once on one fresh database: all start, one server_id, one schema."""
    opened: list[Storage] = []
    errors: list[BaseException] = []

    def start() -> None:
        try:
            opened.append(Storage(storage.db_url, storage.data_dir))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    try:
        assert not errors and len(opened) == 4
        assert len({s.server_id for s in opened}) == 1
        assert _meta(opened[0])["schema_version"] == str(len(MIGRATIONS))
    finally:
        for s in opened:
            s.close()
