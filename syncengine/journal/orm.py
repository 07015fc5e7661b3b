"""peewee, imported without its PostgreSQL driver: the journal is SQLite only.

peewee does ``try: import psycopg2`` at module level, with no switch, so
every client process paid ~15 ms (psycopg2, ssl, its C extension) for a
driver only the server's PostgreSQL storage uses. The journal imports
peewee through this module, with psycopg2 hidden for that one import; the
server's database module hands peewee the driver before it opens
PostgreSQL (``syncengine.server.db.attach_psycopg2``). Whichever comes
first in a process works (tests/test_orm.py): if peewee or psycopg2 was
already imported, nothing is hidden.
"""

from __future__ import annotations

import sys

__all__ = ["pw"]


def _import_peewee():
    if "peewee" in sys.modules or "psycopg2" in sys.modules:
        import peewee

        return peewee
    # A None entry makes `import psycopg2` raise ImportError, peewee's own "not installed" path.
    sys.modules["psycopg2"] = None  # type: ignore[assignment]
    try:
        import peewee
    finally:
        if sys.modules.get("psycopg2", 0) is None:
            del sys.modules["psycopg2"]
    return peewee


pw = _import_peewee()
