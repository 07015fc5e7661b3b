"""The journal's peewee comes without psycopg2 (journal/orm.py); the server's PostgreSQL still gets it.

Each case runs in a fresh interpreter: which of the journal and the
server's database is imported first decides how peewee was loaded, and
both orders happen (the CLI imports only the journal; tests and
`syncengine serve` import the server, sometimes beside a client).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from tests.helpers import REPO, cli_env


def run_python(code: str, **env: str) -> None:
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=cli_env(**env), cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_the_journal_loads_peewee_without_psycopg2():
    run_python("""
        import sys
        import syncengine.journal
        import peewee
        assert "psycopg2" not in sys.modules and peewee.psycopg2 is None
        import psycopg2  # hidden only while peewee imported: anyone else still gets it
    """)


def test_attach_psycopg2_gives_peewee_what_its_own_import_would():
    """The attached driver matches a plain `import peewee` with psycopg2 installed, attribute for attribute."""
    run_python("""
        from syncengine.journal.orm import pw
        from syncengine.server.db import attach_psycopg2
        assert pw.psycopg2 is None
        attach_psycopg2()
        attach_psycopg2()  # twice is harmless
        import psycopg2
        from psycopg2 import extensions, extras
        assert pw.psycopg2 is psycopg2 and pw.pg_extensions is extensions and pw.Json_pg2 is extras.Json
        adapter = pw.Psycopg2Adapter()
        assert adapter.json_type is extras.Json and adapter.jsonb_type is extras.Json
        assert (adapter.txn_idle, adapter.txn_inerror, adapter.txn_unknown) == (
            extensions.TRANSACTION_STATUS_IDLE, extensions.TRANSACTION_STATUS_INERROR,
            extensions.TRANSACTION_STATUS_UNKNOWN)
        db = pw.PostgresqlDatabase("nowhere")
        assert isinstance(db._adapter, pw.Psycopg2Adapter)
        db._adapter.check_driver()
    """)


_SERVER_AND_JOURNAL = """
    import sys, tempfile
    from pathlib import Path
    {first}
    {second}
    from syncengine.journal import Journal
    from syncengine.server import db as server_db
    with tempfile.TemporaryDirectory() as tmp:
        journal = Journal.open(Path(tmp) / "journal.db")
        assert journal.client_id
        journal.close()
        dsn = sys.argv[1] if len(sys.argv) > 1 else None  # PostgreSQL, else SQLite under tmp
        db = server_db.open_database(dsn, Path(tmp) / "server")
        assert server_db.is_postgres(db) == bool(dsn)
        models = server_db.make_models(db)
        server_db.migrate(db, models)
        with db.connection_context():
            with db.atomic():  # a transaction: PostgreSQL's adapter reads its txn states on the way out
                assert db.execute_sql("SELECT 1").fetchone() == (1,)
        db.close_all()
"""

_ORDERS = {
    "journal first": ("import syncengine.journal", "import syncengine.server.db"),
    "server first": ("import syncengine.server.db", "import syncengine.journal"),
}


def _run_both(order: str, *argv: str) -> None:
    first, second = _ORDERS[order]
    code = textwrap.dedent(_SERVER_AND_JOURNAL).format(first=first, second=second)
    proc = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True,
                          env=cli_env(), cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("order", list(_ORDERS))
def test_journal_and_sqlite_server_in_either_order(order: str):
    _run_both(order)


@pytest.mark.postgres
@pytest.mark.parametrize("order", list(_ORDERS))
def test_journal_and_postgresql_server_in_either_order(order: str, pg_dsn: str):
    _run_both(order, pg_dsn)
