"""Peewee models of the journal (DESIGN §2), built per database.

Models are created by :func:`make_models` for each open database instead of
being bound globally, so two workspaces (two replicas in one test, or the
daemon and a CLI call in one process) never share a binding.
"""

from __future__ import annotations

from types import SimpleNamespace

from syncengine.journal.orm import pw


def make_models(db: pw.Database) -> SimpleNamespace:
    class Base(pw.Model):
        class Meta:
            database = db
            legacy_table_names = False

    class Document(Base):
        """One document with its three states (Nucleus' local / synced / remote trees).

        local:  path..mode — NULL path when the file is absent here.
        base:   what both sides last agreed (the merge ancestor); base_rev NULL
                means "never synced" (no base), base_hash NULL with a rev means
                "agreed deleted".
        remote: what the server feed last said; remote_hash NULL with a rev
                means "deleted on the server".
        """

        doc_id = pw.CharField(unique=True)
        kind = pw.CharField()
        path = pw.TextField(null=True, unique=True)
        hash = pw.CharField(null=True)
        size = pw.BigIntegerField(null=True)
        mtime_ns = pw.BigIntegerField(null=True)
        ctime_ns = pw.BigIntegerField(null=True)
        inode = pw.BigIntegerField(null=True)
        mode = pw.IntegerField(null=True)
        base_path = pw.TextField(null=True)
        base_rev = pw.BigIntegerField(null=True)
        base_hash = pw.CharField(null=True)
        base_mode = pw.IntegerField(null=True)
        remote_path = pw.TextField(null=True)
        remote_rev = pw.BigIntegerField(null=True)
        remote_hash = pw.CharField(null=True)
        remote_mode = pw.IntegerField(null=True)
        remote_seq = pw.BigIntegerField(null=True)
        remote_at = pw.BigIntegerField(null=True)  # server-received time, ns
        local_at = pw.BigIntegerField(null=True)  # journal time of the local change, ns
        error = pw.TextField(null=True)  # last per-document failure, shown by status

        class Meta:
            indexes = ((("remote_path",), False), (("hash",), False))

    class Change(Base):
        """Append-only journal of what happened to each document, here or remotely."""

        seq = pw.AutoField()
        doc_id = pw.CharField(index=True)
        path = pw.TextField(index=True)
        op = pw.CharField()  # created | modified | deleted | moved
        old_path = pw.TextField(null=True)
        hash = pw.CharField(null=True)
        size = pw.BigIntegerField(null=True)
        mode = pw.IntegerField(null=True)
        at = pw.BigIntegerField()  # ns since epoch, UTC
        origin = pw.CharField(default="local")  # local | remote | merge | restore
        zones = pw.TextField(null=True)  # JSON list of changed field paths
        snapshot_id = pw.IntegerField(null=True, index=True)
        rev = pw.BigIntegerField(null=True)  # server rev once pushed or pulled

    class Snapshot(Base):
        id = pw.AutoField()
        created_at = pw.BigIntegerField()
        message = pw.TextField(null=True)
        trigger = pw.CharField()  # manual | auto | safety | conflict (a losing server version, restorable)
        files = pw.IntegerField()
        bytes = pw.BigIntegerField()
        changed = pw.IntegerField()
        change_seq = pw.IntegerField()  # journal seq this snapshot covers up to

    class SnapshotEntry(Base):
        """What changed in a snapshot since the previous one; hash NULL = removed."""

        snapshot_id = pw.IntegerField()
        path = pw.TextField()
        hash = pw.CharField(null=True)
        mode = pw.IntegerField(null=True)
        size = pw.BigIntegerField(null=True)

        class Meta:
            primary_key = pw.CompositeKey("snapshot_id", "path")
            indexes = ((("path", "snapshot_id"), True),)

    class Conflict(Base):
        id = pw.AutoField()
        doc_id = pw.CharField(index=True)
        path = pw.TextField()
        kind = pw.CharField()  # both-modified | modified-deleted | deleted-modified | both-created | moved-modified
        local_hash = pw.CharField(null=True)
        remote_hash = pw.CharField(null=True)
        base_hash = pw.CharField(null=True)
        remote_rev = pw.BigIntegerField(null=True)
        strategy = pw.CharField()
        details = pw.TextField(null=True)  # JSON: fields or lines involved
        copy_path = pw.TextField(null=True)
        created_at = pw.BigIntegerField()
        resolved_at = pw.BigIntegerField(null=True)
        resolution = pw.CharField(null=True)

    class SyncState(Base):
        """One row: which server this replica talks to, and how far it has pulled."""

        id = pw.IntegerField(primary_key=True, default=1)
        client_id = pw.CharField()
        root_dev = pw.BigIntegerField(null=True)
        root_ino = pw.BigIntegerField(null=True)
        server_url = pw.TextField(null=True)
        workspace = pw.TextField(null=True)
        server_id = pw.CharField(null=True)
        last_seq = pw.BigIntegerField(default=0)
        clock_offset_ns = pw.BigIntegerField(default=0)
        last_sync_at = pw.BigIntegerField(null=True)
        last_sync_ok = pw.BooleanField(null=True)
        last_error = pw.TextField(null=True)
        last_scan_ns = pw.BigIntegerField(default=0)
        unreachable_since = pw.BigIntegerField(null=True)
        guard = pw.TextField(null=True)  # a safety guard currently holding syncs
        paused = pw.BooleanField(default=False)

    return SimpleNamespace(
        Document=Document,
        Change=Change,
        Snapshot=Snapshot,
        SnapshotEntry=SnapshotEntry,
        Conflict=Conflict,
        SyncState=SyncState,
        all=[Document, Change, Snapshot, SnapshotEntry, Conflict, SyncState],
    )


def make_event_models(db: pw.Database) -> SimpleNamespace:
    class Base(pw.Model):
        class Meta:
            database = db
            legacy_table_names = False

    class Task(Base):
        """A unit of long work (scan, hash, upload, download, merge) with its progress."""

        id = pw.AutoField()
        kind = pw.CharField()
        title = pw.TextField()
        total = pw.BigIntegerField(null=True)
        current = pw.BigIntegerField(default=0)
        state = pw.CharField(default="running")  # running | done | failed
        pid = pw.IntegerField()
        started_at = pw.BigIntegerField()
        updated_at = pw.BigIntegerField(index=True)

    class Event(Base):
        id = pw.AutoField()
        at = pw.BigIntegerField()
        channel = pw.CharField(index=True)  # zones | processing | progress | log
        payload = pw.TextField()  # JSON object

    return SimpleNamespace(Task=Task, Event=Event, all=[Task, Event])
