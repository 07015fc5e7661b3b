"""The sync server: FastAPI routes over its own peewee storage (SQLite or PostgreSQL).

Imported only by ``syncengine serve`` / ``syncengine token`` and by tests;
the client never imports it. It shares :mod:`syncengine.protocol` with the
client and nothing else of the engine (no journal, no blob store).

* :mod:`.db` — opening the database, tables, numbered migrations
* :mod:`.storage` — every transaction (commit ordering, blobs, tokens)
* :mod:`.guard` — protocol header, token-in-query, body caps and gzip
* :mod:`.app` — the routes; ``create_app(storage, settings, announce=...)``
* :mod:`.admin` — token and serve helpers the CLI calls
"""
