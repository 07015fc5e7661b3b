"""What a round sends and accepts, seen from a fault-injecting proxy between a replica and the real server."""

from __future__ import annotations

import json
import os
import zlib

import pytest

from syncengine import protocol as p
from tests.synckit import assert_converged, converge, no_duplicate_revisions

pytestmark = pytest.mark.integration


def _stamps(root):
    return {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in root.rglob("*") if ".syncengine" not in p.parts}


def test_a_no_op_sync_makes_one_request_and_writes_nothing(kit, proxy):
    """In step with the server, a round is one GET of the feed; no file and no server state changes."""
    a = kit.replica({f"d{i}/f{i}.txt": f"{i}\n" for i in range(20)}, url=proxy.url)
    a.sync()
    a.sync()
    proxy.seen.clear()
    stamps, log = _stamps(a.root), kit.log()
    report = a.sync()
    assert [m for m, _ in proxy.seen] == ["GET"] and proxy.seen[0][1].split("?")[0].endswith("/changes")
    assert not (report.pushed or report.downloaded) and _stamps(a.root) == stamps and kit.log() == log


def test_a_first_round_lists_the_server_without_asking_the_feed_first(kit, proxy):
    """A journal that never pulled starts from the full listing, which also names the server: no GET of the
    feed before it (one round trip less per first sync); the next round reads the feed from there."""
    a = kit.replica({"a.txt": "a\n"}, url=proxy.url)
    b = kit.replica({"b.txt": "b\n"}, url=proxy.url)
    a.sync()
    proxy.seen.clear()
    b.sync()
    gets = [path.split("?")[0].rsplit("/", 1)[-1] for method, path in proxy.seen if method == "GET"]
    assert gets[0] == "docs" and "changes" not in gets[:gets.index("docs") + 1]
    proxy.seen.clear()
    a.sync()
    assert b.tree() == a.tree() and [m for m, _ in proxy.seen][:1] == ["GET"]
    assert proxy.seen[0][1].split("?")[0].endswith("/changes")


def test_requests_grow_with_batches_not_with_files(kit, proxy):
    """250 files go up in 3 commits and come down in a handful of requests; an edit of 120 takes 2 commits."""
    files = {f"many/{i:03d}.json": f'{{"n": {i}}}\n' for i in range(250)}
    a = kit.replica(files, url=proxy.url)
    report = a.sync()
    assert len(report.pushed) == 250
    assert proxy.calls("POST", "/commit") == 3 and len(proxy.seen) <= 3 * 3 + 2
    proxy.seen.clear()
    b = kit.replica(url=proxy.url)
    assert len(b.sync().downloaded) == 250 and len(proxy.seen) <= 4
    for i in range(120):
        a.write(f"many/{i:03d}.json", f'{{"n": {i}, "edited": true}}\n')
    proxy.seen.clear()
    a.sync()
    assert proxy.calls("POST", "/commit") == 2 and len(proxy.seen) <= 2 * 3 + 1
    proxy.seen.clear()
    assert len(b.sync().downloaded) == 120 and len(proxy.seen) <= 2
    assert_converged(a, b)


def test_own_pushes_are_recognised_and_never_downloaded(kit, proxy):
    """The feed echoing our own commits costs no blob download and raises no conflict.

    (The checkpoint is set back to before the push, as a change by another
    replica in between would leave it; otherwise the push moves it past them.)
    """
    from syncengine import Workspace

    a = kit.replica({"x.md": "1\n", "y.bin": b"\x00y"}, url=proxy.url)
    a.sync()
    a.write("x.md", "2\n")
    a.move("y.bin", "z/y.bin")
    with Workspace(a.root) as ws:
        since = ws.journal.state()["last_seq"]
    a.sync()
    with Workspace(a.root) as ws:
        ws.journal.update_state(last_seq=since)
    proxy.seen.clear()
    report = a.sync()
    assert report.pulled >= 2 and not report.downloaded and not report.conflicts
    assert proxy.calls("POST", "/blobs/unpack") == 0 and len(proxy.seen) == 1


def test_a_lost_commit_answer_is_replayed_by_op_id(kit, proxy):
    """The server commits but the answer is lost: the retry carries the same op ids and gets the first answers."""
    lost: list[str] = []

    def lose_first_commit_answer(method, path, status, headers, body):
        if method == "POST" and path.endswith("/commit") and not lost:
            lost.append(path)
            return 502, {"Content-Type": "application/json"}, b'{"error": "bad_gateway", "message": "lost"}'
        return None

    a = kit.replica({"one.md": "1\n", "two.md": "2\n"}, url=proxy.url)
    proxy.rewrites.append(lose_first_commit_answer)
    report = a.sync()
    assert lost and sorted(report.pushed) == ["one.md", "two.md"] and not report.conflicts
    assert proxy.calls("POST", "/commit") == 2
    log = kit.log()
    assert len(log) == 2
    no_duplicate_revisions(log)
    b = kit.replica()
    converge(a, b)
    assert_converged(a, b)


def _rewrite_json(match_path: str, change):
    def rewrite(method, path, status, headers, body):
        if status == 200 and path.split("?")[0].endswith(match_path):
            data = json.loads(body)
            change(data)
            return status, headers, json.dumps(data).encode()
        return None

    return rewrite


def test_server_paths_escaping_the_workspace_are_refused(kit, proxy, tmp_path):
    """Feed or listing entries naming ../ or absolute paths are refused and reported; the rest is applied."""
    a = kit.replica({"ok.md": "fine\n", "evil1.md": "x\n", "evil2.md": "y\n"})
    a.sync()

    def poison(data):
        for entry in data.get("docs") or data.get("changes") or []:
            if entry["path"] == "evil1.md":
                entry["path"] = "../escaped.md"
            elif entry["path"] == "evil2.md":
                entry["path"] = str(tmp_path / "absolute.md")

    proxy.rewrites += [_rewrite_json("/docs", poison), _rewrite_json("/changes", poison)]
    b = kit.replica(url=proxy.url, name="inside")
    report = b.sync()
    assert b.tree() == {"ok.md": b"fine\n"}
    assert not (tmp_path / "escaped.md").exists() and not (tmp_path / "absolute.md").exists()
    assert len([p for p in report.problems if "refused" in p.reason]) == 2


def test_a_symlinked_folder_never_leads_a_write_outside(kit, tmp_path):
    """A path through a folder that is a symlink here is refused: nothing lands where the link points."""
    a = kit.replica({"link/evil.txt": "payload\n", "plain.txt": "p\n"})
    a.sync()
    outside = tmp_path / "outside"
    outside.mkdir()
    b = kit.replica()
    os.symlink(outside, b.root / "link")
    report = b.sync()
    assert list(outside.iterdir()) == [] and b.read("plain.txt") == b"p\n"
    assert [p.path for p in report.problems] == ["link/evil.txt"]


def test_a_blob_whose_hash_is_wrong_is_never_written(kit, proxy):
    """A corrupt download leaves the old bytes in place (never a torn file) and the next round completes it."""
    a = kit.replica({"doc.md": "version 1\n", "other.md": "o1\n"})
    b = kit.replica(url=proxy.url)
    converge(a, b)
    a.write("doc.md", "version 2\n")
    a.write("other.md", "o2\n")
    a.sync()

    def corrupt(method, path, status, headers, body):
        if path.endswith("/blobs/unpack") and status == 200 and b"version 2" in body:
            return status, headers, body.replace(b"version 2", b"version X")
        return None

    proxy.rewrites.append(corrupt)
    report = b.sync()
    assert b.read("doc.md") == b"version 1\n" and b.read("other.md") == b"o2\n"
    assert [p.path for p in report.problems] == ["doc.md"] and b.leftovers() == []
    assert any(e.path == "doc.md" for e in b.status().errors)
    proxy.rewrites.clear()
    assert b.sync().downloaded == ("doc.md",)
    assert_converged(a, b)
    assert not b.status().errors


def test_an_oversized_answer_is_refused_and_nothing_changes(kit, proxy):
    """An answer above the client's cap stops the round (exit 3) before anything is written."""
    a = kit.replica({"doc.md": "1\n"})
    b = kit.replica(url=proxy.url)
    converge(a, b)
    a.write("doc.md", "2\n")
    a.sync()

    def inflate(method, path, status, headers, body):
        if path.split("?")[0].endswith("/changes"):
            return 200, {"Content-Type": "application/json"}, b" " * (16 << 20) + body
        return None

    proxy.rewrites.append(inflate)
    result = b.cli("sync")
    assert result.code == 3 and "exceeds" in result.stderr
    assert b.read("doc.md") == b"1\n" and b.leftovers() == []
    proxy.rewrites.clear()
    assert b.cli("sync").code == 0 and b.read("doc.md") == b"2\n"


def test_request_bodies_over_1024_bytes_go_gzipped(kit, proxy):
    """JSON bodies over 1024 bytes go gzipped, small ones plain; a pack deflates its blobs one by one."""
    import gzip
    import zlib

    big = json.dumps({"rows": list(range(2000))}) + "\n"
    a = kit.replica({"big.json": big, **{f"n{i}.txt": f"{i}\n" for i in range(10)}}, url=proxy.url)  # a commit > 1 KB
    a.sync()
    a.write("tiny.txt", "t\n")
    a.sync()
    sent = []
    packs = []
    for _method, path, headers, body in proxy.received:
        if not body:
            continue
        gzipped = {k.lower(): v for k, v in headers.items()}.get("content-encoding") == "gzip"
        if path.endswith("/blobs/pack"):
            # Not gzipped whole: the server keeps each blob as it came, deflated once by the client.
            assert not gzipped, path
            packs.append(body)
            continue
        plain = gzip.decompress(body) if gzipped else body
        assert gzipped is (len(plain) > 1024), (path, gzipped, len(plain))
        assert not gzipped or len(body) < len(plain), path
        sent.append((path.split("?")[0].rsplit("/", 2)[-2:], gzipped))
    assert any(gzipped for _where, gzipped in sent) and any(not gzipped for _where, gzipped in sent), sent
    entries = {}
    for body in packs:
        line, _, rest = body.partition(b"\n")
        for entry in p.PackHeader.decode(line).blobs:
            entries[entry.size] = (entry, rest[:entry.length])
            rest = rest[entry.length:]
    deflated, data = entries[len(big)]  # the big one travels deflated, the tiny one as it is
    assert deflated.deflated == len(data) < len(big) and zlib.decompress(data) == big.encode()
    assert entries[2][0].deflated is None and entries[2][1] in (b"t\n", b"0\n")
    accepted = [{k.lower(): v for k, v in h.items()}.get("accept-encoding", "") for _m, _p, h, _b in proxy.received]
    assert all("gzip" in a for a in accepted)  # and answers may come gzipped


@pytest.mark.parametrize("size", [0, 1, 300, 3000, 5000, 70_000])
def test_a_blob_is_deflated_with_a_window_no_larger_than_it_and_any_inflater_reads_it(size):
    data = (b'{"zone": {"field": %d}}\n' % size * (size // 20 + 1))[:size]
    packed = p.deflate(data)
    window = 1 << ((packed[0] >> 4) + 8)  # RFC 1950: CINFO, the window's log2 less 8
    assert window <= max(512, 1 << max(0, size - 1).bit_length())
    assert window <= 32 * 1024
    assert zlib.decompress(packed) == data
    inflater = zlib.decompressobj()
    assert inflater.decompress(packed) == data and inflater.eof


def test_a_pack_is_judged_compressible_on_samples_without_being_joined():
    """An upload pack's 'worth deflating?' reads samples of its middle and end, as for a body, not a joined copy."""
    import hashlib

    from syncengine import remote

    text = [json.dumps({"zone": i, "text": "total net price " * 100}).encode() for i in range(200)]
    noise = [os.urandom(1600) for _ in range(200)]
    for parts, worth in ((text, True), (noise, False), (text[:100] + noise[:100], False),
                         (noise[:100] + text[:100], True), (noise[:10], True)):  # a small pack is tried whole
        assert remote._pack_worth_compressing(parts) is worth
        assert remote._worth_compressing(b"".join(parts)) is worth
    digests = [hashlib.sha256(data).hexdigest() for data in noise]
    entries, parts = remote._deflated([(digest, data, None) for digest, data in zip(digests, noise, strict=True)])
    assert entries == [[digest, len(data)] for digest, data in zip(digests, noise, strict=True)] and parts == noise
