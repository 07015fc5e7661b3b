"""Commit semantics on both storages: compare-and-swap, moves, collisions, idempotent replays."""

from __future__ import annotations

import pytest

from syncengine import protocol as p
from tests.server.conftest import item, sha


@pytest.fixture
def api(server_factory, storage, api_for):
    """A raw client on a fresh server over the parametrized storage (SQLite, PostgreSQL)."""
    server = server_factory(storage)
    return api_for(server, "alpha")


def test_a_new_document_gets_rev_equal_to_its_seq_and_cannot_be_created_twice(api):
    """Creating a doc answers ok with rev == seq; creating the same doc_id again is a conflict."""
    digest = api.put_blob(b"one")
    first, second = api.commit(
        [item("d1", "a.txt", None, digest), item("d2", "b.txt", None, digest)]
    )
    assert first == {"status": "ok", "doc_id": "d1", "rev": 1, "seq": 1}
    assert second["rev"] == 2
    again = api.commit([item("d1", "other.txt", None, digest)])[0]
    assert again["status"] == "conflict"
    assert again["current"] == {
        "doc_id": "d1",
        "rev": 1,
        "path": "a.txt",
        "hash": digest,
        "deleted": False,
        "executable": False,
    }


def test_a_stale_base_rev_is_a_conflict_naming_the_current_version(api):
    """An edit on top of an old rev is refused with the current version, and nothing is written."""
    v1, v2, v3 = (api.put_blob(b) for b in (b"v1", b"v2", b"v3"))
    api.commit([item("d1", "a.txt", None, v1)])
    assert api.commit([item("d1", "a.txt", 1, v2)])[0]["rev"] == 2
    stale = api.commit([item("d1", "a.txt", 1, v3, client_id="c2")], client_id="c2")[0]
    assert (
        stale["status"] == "conflict"
        and stale["current"]["rev"] == 2
        and stale["current"]["hash"] == v2
    )
    assert api.changes()["last_seq"] == 2


def test_a_new_path_for_a_known_doc_is_a_move_with_old_path(api):
    """A known doc at a new path is a move: one change with old_path; docs lists the new path."""
    digest = api.put_blob(b"content")
    api.commit([item("d1", "old/name.md", None, digest)])
    moved = api.commit([item("d1", "new/name.md", 1, digest)])[0]
    assert moved["status"] == "ok" and moved["rev"] == 2
    change = api.changes(since=1)["changes"][0]
    assert change["path"] == "new/name.md" and change["old_path"] == "old/name.md"
    docs = api.call("GET", "/v1/ws/{ws}/docs").json()["docs"]
    assert [(d["doc_id"], d["path"]) for d in docs] == [("d1", "new/name.md")]


@pytest.mark.parametrize("other", ["Notes/Todo.md", "notes/todo.md", "NOTES/TODO.MD"])
def test_a_path_taken_by_another_doc_even_by_case_is_a_conflict(api, other):
    """Taking a path equal under casefold to a live doc's path is a conflict naming that doc."""
    digest = api.put_blob(b"x")
    api.commit(
        [item("d1", "notes/todo.md", None, digest), item("d2", "elsewhere.md", None, digest)]
    )
    created = api.commit([item("d3", other, None, digest)])[0]
    assert created["status"] == "conflict" and created["current"]["doc_id"] == "d1"
    moved = api.commit([item("d2", other, 2, digest)])[0]
    assert moved["status"] == "conflict" and moved["current"]["doc_id"] == "d1"
    renamed = api.commit([item("d1", "Notes/TODO.md", 1, digest)])[0]
    assert renamed["status"] == "ok"  # a doc may change the case of its own name


def test_a_deleted_path_is_free_again_and_the_doc_can_come_back(api):
    """Deleting frees the path; the tombstone's rev is the base for bringing the doc back."""
    digest = api.put_blob(b"x")
    api.commit([item("d1", "a.txt", None, digest)])
    gone = api.commit([item("d1", "a.txt", 1, None)])[0]
    assert gone == {"status": "ok", "doc_id": "d1", "rev": 2, "seq": 2}
    change = api.changes(since=1)["changes"][0]
    assert change["deleted"] is True and change["hash"] is None and change["size"] is None
    assert api.call("GET", "/v1/ws/{ws}/docs").json()["docs"] == []
    assert api.commit([item("d2", "A.TXT", None, digest)])[0]["status"] == "ok"
    back = api.commit([item("d1", "restored.txt", 2, digest)])[0]
    assert back["status"] == "ok" and back["rev"] == 4


def test_a_commit_needs_its_blob_and_the_same_op_succeeds_after_upload(api):
    """Without its blob an item is rejected (missing_blob); the same op works after the upload."""
    blob = b"arrives later"
    op = item("d1", "a.txt", None, sha(blob))
    assert api.commit([op])[0]["error"] == "missing_blob"
    api.put_blob(blob)
    assert api.commit([op])[0] == {"status": "ok", "doc_id": "d1", "rev": 1, "seq": 1}


def test_a_replayed_op_gets_the_first_answer_and_makes_one_revision(
    server_factory, storage, api_for
):
    """A re-sent applied op gets the stored answer, even after a restart; one change is logged."""
    server = server_factory(storage)
    api = api_for(server, "alpha")
    v1, v2 = api.put_blob(b"v1"), api.put_blob(b"v2")
    api.commit([item("d1", "a.txt", None, v1)])
    edit = item("d1", "a.txt", 1, v2)
    first = api.commit([edit])
    assert first == api.commit([edit]) == api.commit([edit, edit])[:1]
    server.restart()
    api.session.close()
    assert api.commit([edit]) == first
    assert api.changes()["last_seq"] == 2
    # the replay wins even though the doc moved on: it is the same op, not a new edit
    api.commit([item("d1", "a.txt", 2, v1)])
    assert api.commit([edit]) == first


def test_an_item_identical_to_the_current_state_adds_no_revision(api):
    """Same path, hash and mode on the current rev answers ok (current rev) and writes nothing."""
    digest = api.put_blob(b"same")
    api.commit([item("d1", "a.txt", None, digest)])
    same = api.commit([item("d1", "a.txt", 1, digest, client_id="c2")], client_id="c2")[0]
    assert same == {"status": "ok", "doc_id": "d1", "rev": 1, "seq": 1}
    chmod = api.commit([item("d1", "a.txt", 1, digest, executable=True)])[0]
    assert chmod["rev"] == 2 and api.changes(since=1)["changes"][0]["executable"] is True
    assert api.changes()["last_seq"] == 2


def test_unknown_docs_and_forged_op_ids_are_refused(api):
    """Editing a doc the server lacks is rejected (unknown_doc); a forged op_id is a 400."""
    digest = api.put_blob(b"x")
    refused = api.commit([item("ghost", "g.txt", 7, digest)])[0]
    assert refused["status"] == "rejected" and refused["error"] == "unknown_doc"
    forged = item("d1", "a.txt", None, digest)
    body = {"client_id": "someone-else", "items": [p.to_dict(forged)]}
    r = api.call("POST", "/v1/ws/{ws}/commit", json=body)
    assert r.status_code == 400 and r.json()["error"] == "bad_request"
    assert api.changes()["last_seq"] == 0


def test_the_change_log_records_who_and_when(api):
    """Each change carries op_id, client_id, size and the server's receive time in ns."""
    digest = api.put_blob(b"12345")
    op = item("d1", "dir/a.txt", None, digest, executable=True, client_id="laptop")
    api.commit([op], client_id="laptop")
    change = api.changes()["changes"][0]
    assert change["op_id"] == op.op_id and change["client_id"] == "laptop" and change["size"] == 5
    assert change["executable"] is True and change["received_at"] > 1_600_000_000 * 10**9
    assert change["rev"] == change["seq"] == 1 and change["old_path"] is None


def test_the_announce_hook_hears_each_commit_that_wrote(server_factory, api_for):
    """announce(ws, last_seq) follows each commit that wrote changes, and no other."""
    heard: list[tuple[str, int]] = []
    server = server_factory(announce=lambda ws, seq: heard.append((ws, seq)))
    api = api_for(server, "alpha")
    digest = api.put_blob(b"x")
    api.commit([item("d1", "a.txt", None, digest), item("d2", "b.txt", None, digest)])
    api.commit([item("d1", "a.txt", 1, digest)])  # identical: nothing written
    api.commit([item("d1", "c.txt", 1, digest)])
    assert heard == [("alpha", 2), ("alpha", 3)]
