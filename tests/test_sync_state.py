"""sync_state writes only what changes: a quiet round (nothing else written) leaves journal.db alone.

Journal.record_sync_ok is the end of every successful round; these cases
pin down when it writes the journal (durably, as before) and when it only
touches the quiet-round marker, and that state() reads the two as one.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from syncengine.journal import Journal


@pytest.fixture
def journal(tmp_path: Path):
    journal = Journal.open(tmp_path / "journal.db")
    yield journal
    journal.close()


def stored(journal: Journal) -> dict:
    return journal._stored_state()


def test_the_first_success_is_written_to_the_journal(journal: Journal):
    """A journal that never synced records its first success itself, quiet or not (the marker counts only after)."""
    journal.record_sync_ok(1_000, quiet=True)
    assert stored(journal)["last_sync_at"] == 1_000 and stored(journal)["last_sync_ok"] is True
    assert not journal.quiet_sync_marker.exists()


def test_a_quiet_round_touches_only_the_marker_and_state_shows_it(journal: Journal):
    journal.record_sync_ok(1_000, quiet=False)
    writes = journal.writes
    journal.record_sync_ok(2_000, quiet=True)
    assert journal.writes == writes
    assert stored(journal)["last_sync_at"] == 1_000
    assert journal.quiet_sync_marker.stat().st_mtime_ns == 2_000
    assert journal.state()["last_sync_at"] == 2_000

    journal.record_sync_ok(3_000, quiet=False)  # a round that wrote: the journal has the time again
    assert stored(journal)["last_sync_at"] == 3_000 and journal.state()["last_sync_at"] == 3_000


def test_after_a_failure_even_a_quiet_success_is_written(journal: Journal):
    """last_sync_ok False, an error or an unreachable time must be cleared durably, whatever the round wrote."""
    journal.record_sync_ok(1_000, quiet=False)
    journal.update_state(last_sync_ok=False, last_error="boom", unreachable_since=1_500)
    journal.record_sync_ok(2_000, quiet=True)
    state = stored(journal)
    assert (state["last_sync_at"], state["last_sync_ok"], state["last_error"], state["unreachable_since"]) == (
        2_000, True, None, None)


def test_a_marker_from_an_older_journal_is_not_read_as_a_sync(journal: Journal):
    """A rebuilt journal (repair) says "never synced" until it records a success itself."""
    marker = journal.quiet_sync_marker
    marker.touch()
    os.utime(marker, ns=(5_000, 5_000))
    assert journal.state()["last_sync_at"] is None
    journal.record_sync_ok(4_000, quiet=False)
    assert journal.state()["last_sync_at"] == 5_000  # the later of the two successes


def test_values_already_held_are_not_written(journal: Journal):
    journal.update_state(guard="held", last_seq=7, server_id="s1")
    writes = journal.writes
    journal.update_state(guard="held")
    journal.batch(state={"last_seq": 7, "server_id": "s1"})  # a pull that found nothing new
    journal.batch()
    assert journal.writes == writes
    journal.batch(state={"last_seq": 8, "server_id": "s1"})
    assert journal.writes == writes + 1 and stored(journal)["last_seq"] == 8


def test_the_state_is_one_statement_with_the_fields_own_types(journal: Journal):
    """state() reads sync_state in one plain SELECT (a round reads it six times or more), and gives what the
    model's own query gives, booleans as booleans."""
    journal.update_state(paused=True, last_sync_ok=False, last_error="x", last_seq=7)
    S = journal.m.SyncState
    expected = S.select().where(S.id == 1).dicts().get()
    sent: list[str] = []
    journal.db.connection().set_trace_callback(sent.append)
    got = stored(journal)
    journal.db.connection().set_trace_callback(None)
    assert got == expected and {k: type(v) for k, v in got.items()} == {k: type(v) for k, v in expected.items()}
    assert got["paused"] is True and got["last_sync_ok"] is False
    assert len(sent) == 1
