"""The only client package that knows peewee: journal.db and events.db."""

from syncengine.journal.api import DocRow, Journal, now_ns
from syncengine.journal.db import integrity_ok
from syncengine.journal.events import EventLog

__all__ = ["DocRow", "EventLog", "Journal", "integrity_ok", "now_ns"]
