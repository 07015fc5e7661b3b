"""The server's schema: numbered migrations recorded in the database, on SQLite and PostgreSQL."""

from __future__ import annotations

import hashlib
import json
import threading
from types import SimpleNamespace

import peewee as pw

from syncengine import protocol as p
from syncengine.server.db import MIGRATIONS, make_models, op_key, open_database
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


def test_a_schema_2_database_gets_op_keys_and_still_replays_its_ops(storage):
    """Migration 3 on a database as schema 2 left it: op keys filled, the index swapped, old answers replayed."""
    raw = open_database(storage.db_url, storage.data_dir)
    m = make_models(raw)

    class Op(pw.Model):  # the op table of schema 1-2 (named Op as its indexes are): a unique index on the op id
        workspace = pw.ForeignKeyField(m.Workspace, on_delete="CASCADE")
        op_id = pw.CharField()
        result = pw.TextField()
        created_ns = pw.BigIntegerField()

        class Meta:
            database = raw
            table_name = "op"
            indexes = ((("workspace", "op_id"), True),)

    old = SimpleNamespace(**{**vars(m), "Op": Op})
    data = b"hello"
    digest = hashlib.sha256(data).hexdigest()
    first = p.CommitItem.make("c1", "d1", "a.txt", None, digest)
    answer = '{"status": "ok", "doc_id": "d1", "rev": 1, "seq": 1}'
    try:
        with raw.connection_context(), raw.atomic():
            raw.create_tables([m.Meta])
            for step in MIGRATIONS[:2]:
                step(raw, old)
            m.Meta.insert(key="schema_version", value="2").execute()
            ws = m.Workspace.insert(name="w", last_seq=1, created_ns=1).execute()
            Op.insert(workspace=ws, op_id=first.op_id, result=answer, created_ns=1).execute()
            m.Document.insert(workspace=ws, doc_id="d1", path="a.txt", path_key="a.txt", rev=1, hash=digest,
                              size=len(data)).execute()
            assert "op_workspace_id_op_id" in {i.name for i in raw.get_indexes("op")}
    finally:
        raw.close_all()

    upgraded = Storage(storage.db_url, storage.data_dir)
    try:
        assert _meta(upgraded)["schema_version"] == "3"
        with upgraded.db.connection_context():
            assert {i.name for i in upgraded.db.get_indexes("op")} >= {"op_workspace_id_op_key"}
            assert "op_workspace_id_op_id" not in {i.name for i in upgraded.db.get_indexes("op")}
            keys = upgraded.db.execute_sql('SELECT "op_id", "op_key" FROM "op"').fetchall()
        assert keys == [(first.op_id, op_key(first.op_id))]
        replay = upgraded.commit(ws, "c1", [first])
        assert replay.results == [json.loads(answer)] and replay.applied == 0
        upgraded.put_prepared_blobs(ws, [(digest, len(data), False, data)])
        moved = p.CommitItem.make("c1", "d1", "b.txt", 1, digest)
        assert upgraded.commit(ws, "c1", [moved]).results[0]["rev"] == 2
        again = upgraded.commit(ws, "c1", [first, moved])
        assert [r["rev"] for r in again.results] == [1, 2] and again.applied == 0
    finally:
        upgraded.close()
