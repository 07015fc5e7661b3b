"""protocol.py on its own: round trips, strict validation, op ids, pack framing."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from syncengine import protocol as p
from syncengine.errors import UnsafePath

hashes = st.text("0123456789abcdef", min_size=64, max_size=64)
ids = st.builds(str.__add__, st.sampled_from("aZ09"), st.text("abcXYZ019._-", max_size=12))
names = st.text("abcXYZ019 _éß-", min_size=1, max_size=10).filter(lambda s: s.strip(" ") == s)
paths = st.lists(names, min_size=1, max_size=4).map("/".join)


@st.composite
def changes(draw: st.DrawFn, seq: int) -> p.Change:
    deleted = draw(st.booleans())
    return p.Change(
        seq=seq,
        doc_id=draw(ids),
        path=draw(paths),
        old_path=draw(st.none() | paths),
        rev=seq,
        hash=None if deleted else draw(hashes),
        deleted=deleted,
        executable=draw(st.booleans()),
        size=None if deleted else draw(st.integers(0, 2**40)),
        op_id=draw(st.none() | hashes),
        client_id=draw(st.none() | ids),
        received_at=draw(st.integers(0, 2**62)),
    )


@settings(max_examples=60, deadline=None)
@given(
    st.integers(0, 50).flatmap(lambda n: st.tuples(*[changes(i + 1) for i in range(n)])),
    st.booleans(),
)
def test_a_changes_page_survives_a_round_trip(items, more):
    """to_dict then from_dict gives back the same page, for any valid changes."""
    page = p.ChangesPage("server1", 1, len(items), tuple(items), more)
    assert p.ChangesPage.from_dict(p.to_dict(page), since=0) == page


@settings(max_examples=60, deadline=None)
@given(ids, ids, st.none() | st.integers(1, 2**40), paths, st.none() | hashes, st.booleans())
def test_op_ids_are_a_pure_function_of_the_intent(client, doc, base, path, digest, executable):
    """The same intent gives the same op id; changing any part of it gives another."""
    one = p.CommitItem.make(client, doc, path, base, digest, executable)
    assert one == p.CommitItem.make(client, doc, path, base, digest, executable)
    assert p.CommitItem.from_dict(p.to_dict(one)) == one
    assert one.op_id != p.make_op_id(client, doc, base, path, digest, not executable)
    assert one.op_id != p.make_op_id(client + "x", doc, base, path, digest, executable)


@pytest.mark.parametrize(
    "raw",
    [
        {
            "seq": True,
            "doc_id": "d",
            "path": "a",
            "old_path": None,
            "rev": 1,
            "hash": None,
            "deleted": True,
            "executable": False,
            "size": None,
            "op_id": None,
            "client_id": None,
            "received_at": 0,
        },
        {
            "seq": 1,
            "doc_id": "d",
            "path": "a",
            "old_path": None,
            "rev": 1,
            "hash": None,
            "deleted": False,
            "executable": False,
            "size": None,
            "op_id": None,
            "client_id": None,
            "received_at": 0,
        },
        {
            "seq": 1,
            "doc_id": "../d",
            "path": "a",
            "old_path": None,
            "rev": 1,
            "hash": None,
            "deleted": True,
            "executable": False,
            "size": None,
            "op_id": None,
            "client_id": None,
            "received_at": 0,
        },
        {
            "seq": 1,
            "doc_id": "d",
            "path": "a",
            "old_path": None,
            "rev": 1,
            "hash": "AB" * 32,
            "deleted": False,
            "executable": False,
            "size": 1,
            "op_id": None,
            "client_id": None,
            "received_at": 0,
        },
        {"seq": 1},
        ["not", "an", "object"],
    ],
    ids=["bool-for-int", "hash-null-but-live", "bad-doc-id", "uppercase-hash", "missing", "list"],
)
def test_malformed_changes_raise_protocol_error(raw):
    """Wrong types, inconsistent deletion, bad ids and hashes, missing fields: ProtocolError."""
    with pytest.raises(p.ProtocolError):
        p.Change.from_dict(raw)


def test_paths_are_checked_by_the_one_path_rule():
    """wire_path accepts what check_path accepts and raises UnsafePath for the rest."""
    assert p.wire_path("notes/ok.md") == "notes/ok.md"
    for bad in ("/abs", "a/../b", "e\u0301", "a\x00", ".syncengine/x"):
        with pytest.raises(UnsafePath):
            p.wire_path(bad)


def test_pack_headers_round_trip_and_refuse_overflows():
    """A pack header decodes to what was encoded; sizes over the pack cap are refused."""
    header = p.PackHeader((p.PackEntry("a" * 64, 3),), missing=("b" * 64,), large=("c" * 64,))
    assert p.PackHeader.decode(header.encode().rstrip(b"\n")) == header
    huge = p.PackHeader((p.PackEntry("a" * 64, p.MAX_PACK_BYTES), p.PackEntry("b" * 64, 1)))
    with pytest.raises(p.ProtocolError):
        p.PackHeader.decode(huge.encode())
    for bad in (b"nope", b'{"blobs": [["a", 1]]}', b'{"blobs": [["' + b"a" * 64 + b'", -1]]}'):
        with pytest.raises(p.ProtocolError):
            p.PackHeader.decode(bad)


def test_pack_groups_respect_both_limits():
    """pack_groups never exceeds the byte cap or 1000 blobs, and keeps every hash once, in order."""
    sizes = [(f"{i:064x}", 1 << 20) for i in range(70)] + [
        (f"{i:064x}", 1) for i in range(70, 2100)
    ]
    groups = list(p.pack_groups(sizes))
    assert [h for g in groups for h in g] == [h for h, _ in sizes]
    size_of = dict(sizes)
    assert all(
        sum(size_of[h] for h in g) <= p.MAX_PACK_BYTES and len(g) <= p.MAX_HASHES for g in groups
    )


def _op_id_by_the_recipe(client, doc, base, path, digest, executable) -> str:
    """docs/protocol.md's recipe, spelled out with the json module (op ids are stored: never change it)."""
    import hashlib
    import json

    canon = json.dumps(
        [client, doc, base, path, digest if digest is not None else "deleted", bool(executable)],
        separators=(",", ":"),
        ensure_ascii=False,
    )
    return hashlib.sha256(canon.encode("utf-8")).hexdigest()


@settings(max_examples=200, deadline=None)
@given(
    st.text(max_size=8),
    st.text(max_size=8),
    st.none() | st.integers(1, 2**63 - 1),
    st.text(st.characters(blacklist_categories=("Cs",)), max_size=20),
    st.none() | hashes,
    st.booleans() | st.sampled_from([0, 1]),
)
def test_op_ids_are_the_json_recipe_byte_for_byte(client, doc, base, path, digest, executable):
    """make_op_id's assembled string is what json.dumps writes, quotes and control characters included."""
    assert p.make_op_id(client, doc, base, path, digest, executable) == _op_id_by_the_recipe(
        client, doc, base, path, digest, executable
    )


def test_commit_items_refuse_what_the_strict_checks_refuse():
    """The quick path of CommitItem.from_dict accepts nothing the field checks would refuse."""
    good = p.to_dict(p.CommitItem.make("c1", "doc1", "a/b.json", 3, "a" * 64))
    assert p.CommitItem.from_dict(good) == p.CommitItem.make("c1", "doc1", "a/b.json", 3, "a" * 64)
    bad = [
        {"base_rev": True},
        {"base_rev": 0},
        {"base_rev": 1 << 63},
        {"base_rev": 1.0},
        {"hash": "A" * 64},
        {"hash": "a" * 63},
        {"hash": 0},
        {"op_id": None},
        {"executable": 1},
        {"doc_id": "-x"},
        {"doc_id": "x" * 129},
        {"path": None},
        {"path": "x" * (4 * p.MAX_PATH_BYTES + 1)},
    ]
    for change in bad:
        with pytest.raises(p.ProtocolError, match=next(iter(change))):
            p.CommitItem.from_dict({**good, **change})
    for key in good:
        with pytest.raises(p.ProtocolError, match=f"missing field '{key}'"):
            p.CommitItem.from_dict({k: v for k, v in good.items() if k != key})


def test_commit_answers_refuse_what_the_strict_checks_refuse():
    """The quick path of CommitResult.from_dict (an ``ok`` answer) accepts nothing the field checks would refuse."""
    good = {"status": "ok", "doc_id": "doc1", "rev": 3, "seq": 7}
    assert p.CommitResult.from_dict(good) == p.CommitResult("ok", "doc1", rev=3, seq=7)
    assert p.CommitResult.from_dict(good).to_dict() == good
    for change in ({"rev": True}, {"rev": 0}, {"rev": 1 << 63}, {"rev": 1.0}, {"rev": None}, {"seq": False},
                   {"seq": 0}, {"seq": "7"}, {"doc_id": "-x"}, {"doc_id": "x" * 129}, {"doc_id": 1}):
        with pytest.raises(p.ProtocolError, match=next(iter(change))):
            p.CommitResult.from_dict({**good, **change})
    for key in good:
        with pytest.raises(p.ProtocolError, match=f"missing field '{key}'|unknown commit status"):
            p.CommitResult.from_dict({k: v for k, v in good.items() if k != key})
    with pytest.raises(p.ProtocolError, match="results for"):
        p.CommitResponse.from_dict({"results": [good]}, expected=2)


def test_an_upload_header_is_the_pack_header_byte_for_byte():
    """encode_pack_header, which an upload writes from plain lists, is what PackHeader.encode writes."""
    entries = [p.PackEntry("a" * 64, 10), p.PackEntry("b" * 64, 300, 120)]
    header = p.PackHeader(tuple(entries))
    assert p.encode_pack_header([["a" * 64, 10], ["b" * 64, 300, 120]]) == header.encode()
    assert p.PackHeader.decode(header.encode()) == header


def test_pack_headers_and_hash_lists_refuse_each_bad_entry_by_index():
    """A bad hash or size deep in a long list is refused, naming where it is."""
    entries = [[f"{i:064x}", 10, 5] for i in range(999)]
    assert len(p.PackHeader.decode(p.json.dumps({"blobs": entries}).encode()).blobs) == 999
    for bad, where in (
        (["A" * 64, 10], "blobs\\[998\\]"),
        ([f"{0:064x}", 10, 10], "blobs\\[998\\]"),
        ([f"{0:064x}", True], "blobs\\[998\\]"),
        ([f"{0:064x}", 10, 5, 1], "blobs\\[998\\]"),
        ("x", "blobs\\[998\\]"),
    ):
        with pytest.raises(p.ProtocolError, match=where):
            p.PackHeader.decode(p.json.dumps({"blobs": [*entries[:998], bad]}).encode())
    hashes_ = [f"{i:064x}" for i in range(1000)]
    assert p.hash_list({"hashes": hashes_}) == tuple(hashes_)
    for bad in ("A" * 64, None, "a" * 65):
        with pytest.raises(p.ProtocolError, match="hashes\\[999\\]"):
            p.hash_list({"hashes": [*hashes_[:999], bad]})


def test_the_messages_that_move_content_are_named_by_protocol_and_loaded_on_first_use():
    """syncengine.exchange holds the listings, commits, packs and manifests; protocol names each of them (the
    same class, by attribute or from-import) and nothing else, so a no-op client never creates them."""
    import subprocess
    import sys

    from syncengine import exchange
    from syncengine.protocol import CommitItem, PackHeader

    assert CommitItem is exchange.CommitItem and PackHeader is p.PackHeader is exchange.PackHeader
    assert {name for name in p._EXCHANGE} <= set(vars(exchange))
    with pytest.raises(AttributeError, match="no attribute 'CommitThing'"):
        p.CommitThing  # noqa: B018
    probe = "import sys, syncengine.protocol as p; p.Change; assert 'syncengine.exchange' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", probe]).returncode == 0
