"""The scanner finds every change on disk, hashes only what it must, and never reads a gap as a deletion."""

from __future__ import annotations

import errno
import os
import shutil
import time
from pathlib import Path

import pytest

from syncengine import Workspace, scanner
from syncengine.fsops import inject_fault
from syncengine.testing import backdate, make_tree
from tests.forkkit import here_or_alone, in_child, open_folder, owned_by_nobody


@pytest.fixture
def ws(tmp_path: Path):
    root = tmp_path / "w"
    make_tree(root, {"a.json": '{"x": 1}\n', "notes/b.md": "# b\n", "bin/c.bin": b"\x00\x01\x02" * 10})
    backdate(root)
    workspace, _ = Workspace.init(root)
    yield workspace
    workspace.close()


def test_first_scan_records_every_file(ws: Workspace):
    """init journals every file once, as created, with its kind."""
    index = ws.journal.local_index()
    assert sorted(index) == ["a.json", "bin/c.bin", "notes/b.md"]
    kinds = {path: row[7] for path, row in index.items()}
    assert kinds == {"a.json": "json", "bin/c.bin": "binary", "notes/b.md": "text"}
    assert [e.op.value for e in ws.log()] == ["created"] * 3


def test_unchanged_rescan_hashes_nothing(ws: Workspace):
    """A second scan of unchanged (backdated) files stats them and hashes none."""
    ws.scan()  # the first rescan may hash racy files; after it none is racy
    report = ws.scan()
    assert report.hashed == 0 and report.changed == 0 and report.files == 3


def test_detects_create_modify_delete(ws: Workspace):
    """New, edited and removed files are journaled with the right op."""
    root = ws.root
    (root / "new.txt").write_text("hello")
    (root / "a.json").write_text('{"x": 2}\n')
    os.unlink(root / "notes" / "b.md")
    report = ws.scan()
    assert report.created == ("new.txt",)
    assert report.modified == ("a.json",)
    assert report.deleted == ("notes/b.md",)
    ops = {(e.op.value, e.path) for e in ws.log(limit=3)}
    assert ops == {("created", "new.txt"), ("modified", "a.json"), ("deleted", "notes/b.md")}


def test_same_size_same_mtime_edit_is_found_by_ctime(ws: Workspace):
    """An edit that keeps size and mtime (within one tick) is still detected: ctime moved."""
    path = ws.root / "a.json"
    st = path.stat()
    path.write_text('{"x": 9}\n')  # same length
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_mtime_ns == st.st_mtime_ns
    report = ws.scan()
    assert report.modified == ("a.json",)


def test_racy_file_is_hashed_again(tmp_path: Path):
    """A file modified within a tick of the last scan is re-hashed by the next one."""
    root = tmp_path / "r"
    make_tree(root, {"f.txt": "one"})
    ws, _ = Workspace.init(root)
    try:
        report = ws.scan()
        assert report.hashed == 1  # mtime is recent: racy, so hashed again
    finally:
        ws.close()


def test_move_is_matched_by_inode(ws: Workspace):
    """`mv` is one move of the same document, not a delete and a create."""
    before = ws.journal.doc_by_path("a.json").doc_id
    os.rename(ws.root / "a.json", ws.root / "renamed.json")
    report = ws.scan()
    assert report.moved == (("a.json", "renamed.json"),)
    assert report.created == () and report.deleted == ()
    assert ws.journal.doc_by_path("renamed.json").doc_id == before


def test_move_with_edit_follows_the_document(ws: Workspace):
    """A file moved and edited before the scan keeps its doc_id (same inode, same mtime via mv)."""
    before = ws.journal.doc_by_path("notes/b.md").doc_id
    os.makedirs(ws.root / "archive")
    os.rename(ws.root / "notes" / "b.md", ws.root / "archive" / "b.md")
    report = ws.scan()
    assert report.moved == (("notes/b.md", "archive/b.md"),)
    assert ws.journal.doc_by_path("archive/b.md").doc_id == before


def test_copy_then_delete_is_a_move_by_hash(ws: Workspace):
    """A new inode with the old bytes (copy + delete) is matched as a move by hash."""
    shutil.copy(ws.root / "bin" / "c.bin", ws.root / "c-copy.bin")
    os.unlink(ws.root / "bin" / "c.bin")
    report = ws.scan()
    assert report.moved == (("bin/c.bin", "c-copy.bin"),)


def test_hash_tie_break_is_deterministic(tmp_path: Path):
    """Several vanished and new files sharing one hash pair up in sorted order."""
    root = tmp_path / "t"
    make_tree(root, {"a1.txt": "same", "a2.txt": "same"})
    backdate(root)
    ws, _ = Workspace.init(root)
    try:
        for old, new in (("a1.txt", "z2.txt"), ("a2.txt", "z1.txt")):
            shutil.copy(root / old, root / new)
            os.unlink(root / old)
        report = ws.scan()
        assert report.moved == (("a1.txt", "z1.txt"), ("a2.txt", "z2.txt"))
    finally:
        ws.close()


def test_ignores_syncignore_temp_files_state_and_symlinks(ws: Workspace):
    """.syncignore patterns, editor temp files, .syncengine/ and symlinks are never journaled."""
    root = ws.root
    (root / ".syncignore").write_text("build/\n*.log\n")
    make_tree(root, {"build/out.js": "x", "run.log": "x", ".a.json.swp": "x", "notes/b.md~": "x", "#draft.md#": "x",
                     ".#lock": "x", "4913": "x", ".syncengine.a.json.1234.tmp": "x"})
    os.symlink("/etc/passwd", root / "link.txt")
    os.symlink(root / "notes", root / "notes-link")
    report = ws.scan()
    assert report.created == (".syncignore",)


def test_newly_ignored_file_is_not_a_deletion(ws: Workspace):
    """A file that becomes ignored stays journaled as it was, never read as deleted."""
    (ws.root / ".syncignore").write_text("*.json\n")
    report = ws.scan()
    assert report.deleted == ()
    assert ws.journal.doc_by_path("a.json") is not None


def test_a_newly_ignored_file_edited_or_not_is_never_read_as_changed(ws: Workspace):
    """The walk asks the ignore rules only about files whose stamp moved: a journaled file that became ignored is
    left as it is while unchanged, and once edited it is skipped, neither modified nor deleted."""
    ws.scan()
    known = ws.journal.doc_by_path("a.json")
    (ws.root / ".syncignore").write_text("*.json\n")
    os.utime(ws.root / ".syncignore", (time.time() - 3600,) * 2)
    assert ws.scan().created == (".syncignore",)
    report = ws.scan()
    assert report.changed == 0 and report.hashed == 0
    (ws.root / "a.json").write_text('{"x": 2}\n')
    backdate(ws.root, 3600)
    report = ws.scan()
    assert report.changed == 0 and report.hashed == 3  # the three others, touched by backdate: restamped
    report = ws.scan()
    assert report.changed == 0 and report.hashed == 0
    assert ws.journal.doc_by_path("a.json") == known


def test_a_file_journaled_elsewhere_during_the_walk_is_not_a_local_edit(ws: Workspace, monkeypatch):
    """The stamps are read before the walk and the rows of what differs after it: a file another process
    rewrites and journals in between (an apply) is compared with the later rows, so it is not hashed and not
    taken for an edit made here."""
    from syncengine.fsops import hash_file
    from syncengine.journal import Journal

    ws.scan()
    journal = ws.journal
    other = Journal.open(ws.layout.journal)  # the other process's own connection
    doc_id = journal.doc_by_path("a.json").doc_id
    read_stamps = journal.local_stamps

    def stamps_then_an_apply_elsewhere():
        stamps = read_stamps()
        path = ws.root / "a.json"
        tmp = ws.root / "a.json.new"
        tmp.write_text('{"x": "from the server"}\n')
        os.utime(tmp, (time.time() - 3600,) * 2)
        os.replace(tmp, path)
        digest, st = hash_file(path)
        other.update_doc(doc_id, hash=digest, size=st.size, mtime_ns=st.mtime_ns, ctime_ns=st.ctime_ns,
                         inode=st.inode, mode=st.mode)
        return stamps

    monkeypatch.setattr(journal, "local_stamps", stamps_then_an_apply_elsewhere)
    try:
        report = ws.scan()
    finally:
        other.close()
    assert report.changed == 0 and report.hashed == 0 and report.files == 3
    assert [e.op.value for e in ws.log()] == ["created"] * 3


def test_a_new_file_journaled_elsewhere_during_the_walk_is_compared_not_hashed(ws: Workspace, monkeypatch):
    """The walk does not stat a file the journal does not know (it would be hashed anyway). If another process
    journals it between the walk and the second read, it is stat'ed then and compared with that row: not hashed,
    not a change; while a new file nobody journaled is hashed and created, and one that vanished is not."""
    from syncengine.fsops import hash_file
    from syncengine.journal import Journal
    from syncengine.models import LocalChange, Op

    ws.scan()
    journal = ws.journal
    other = Journal.open(ws.layout.journal)
    for name in ("notes/applied.md", "notes/mine.md", "gone.md"):
        (ws.root / name).write_text(f"# {name}\n")
        os.utime(ws.root / name, (time.time() - 3600,) * 2)  # not racy
    read_stamps = journal.local_stamps

    def stamps_then_an_apply_elsewhere():
        stamps = read_stamps()
        digest, st = hash_file(ws.root / "notes" / "applied.md")
        other.record_local([LocalChange(Op.CREATED, "notes/applied.md", hash=digest, size=st.size,
                                        mtime_ns=st.mtime_ns, ctime_ns=st.ctime_ns, inode=st.inode, mode=st.mode,
                                        kind="text")], origin="remote")
        return stamps

    walk_files = scanner._regular_files

    def walk_then_a_deletion(*args):
        yield from walk_files(*args)
        (ws.root / "gone.md").unlink()

    monkeypatch.setattr(journal, "local_stamps", stamps_then_an_apply_elsewhere)
    monkeypatch.setattr(scanner, "_regular_files", walk_then_a_deletion)
    try:
        report = ws.scan()
    finally:
        other.close()
    assert report.created == ("notes/mine.md",) and report.changed == 1 and report.hashed == 1
    assert report.files == 5 and not report.problems
    assert [(e.op.value, e.path) for e in ws.log(limit=2)] == [("created", "notes/mine.md"),
                                                                ("created", "notes/applied.md")]


def test_unreadable_file_is_reported_and_scan_goes_on(ws: Workspace):
    """A file that cannot be read is reported; the others are still scanned; nothing is deleted."""
    (ws.root / "a.json").write_text('{"x": 3}\n')
    (ws.root / "z.txt").write_text("new")
    with inject_fault("read", 1, errno.EACCES):
        report = ws.scan()
    assert [p.path for p in report.problems] == ["a.json"]
    assert report.created == ("z.txt",)
    assert report.deleted == ()
    assert ws.scan().modified == ("a.json",)  # picked up once readable


def test_unlistable_folder_is_not_read_as_deletions(ws: Workspace):
    """Files inside a folder that cannot be listed are not journaled as deleted."""
    with inject_fault("list", 2, errno.EACCES):
        report = ws.scan()
    assert report.problems and report.deleted == ()


def test_non_nfc_name_is_reported_not_synced(ws: Workspace):
    """A file name in NFD form is reported as unsupported rather than journaled under another name."""
    (ws.root / "cafe\u0301.txt").write_text("x")
    report = ws.scan()
    assert report.created == ()
    assert any("NFC" in p.reason for p in report.problems)


def test_delete_and_recreate_before_sync_is_one_document(ws: Workspace):
    """Recreating a deleted path later keeps the document's identity once it has a base."""
    doc = ws.journal.doc_by_path("a.json")
    ws.journal.update_doc(doc.doc_id, base_path="a.json", base_rev=1, base_hash=doc.hash)
    os.unlink(ws.root / "a.json")
    ws.scan()
    (ws.root / "a.json").write_text('{"x": 5}\n')
    ws.scan()
    assert ws.journal.doc_by_path("a.json").doc_id == doc.doc_id


@pytest.mark.timeout(120)
def test_second_status_on_5000_files_hashes_nothing(tmp_path: Path):
    """On an unchanged 5,000-file tree a second status hashes no file."""
    root = tmp_path / "big"
    for d in range(50):
        folder = root / f"d{d:02d}"
        folder.mkdir(parents=True)
        for f in range(100):
            (folder / f"f{f:03d}.json").write_text(f'{{"d": {d}, "f": {f}}}\n')
    backdate(root)
    ws, report = Workspace.init(root)
    try:
        assert report.files == 5000
        first = ws.status()
        assert first.scan.hashed == 0 and first.files == 5000
        started = time.monotonic()
        second = ws.status()
        assert second.scan.hashed == 0 and second.scan.changed == 0
        assert time.monotonic() - started < 60  # sanity bound only; timings live in bench/
    finally:
        ws.close()


@pytest.mark.parametrize("edited", [2, 15], ids=["few-rows-read", "whole-index-read"])
def test_edits_moves_and_deletions_among_unchanged_files(tmp_path: Path, edited: int):
    """The scan reads full journal rows only for paths whose stamp differs (or the whole index past a
    quarter of the files): either way edits keep their document, moves follow it, deletions are found."""
    root = tmp_path / "w"
    make_tree(root, {f"d{i % 4}/f{i:02d}.md": f"file {i}\n" for i in range(40)})
    backdate(root, 3600)
    ws, _ = Workspace.init(root)
    try:
        ws.scan()
        before = ws.journal.local_index()
        for i in range(edited):
            (root / f"d{i % 4}/f{i:02d}.md").write_text(f"edited {i}\n")
        os.rename(root / "d3/f39.md", root / "d0/moved.md")
        os.unlink(root / "d2/f38.md")
        (root / "d1/new.md").write_text("new\n")
        backdate(root, 3600)
        report = ws.scan()
        assert report.modified == tuple(sorted(f"d{i % 4}/f{i:02d}.md" for i in range(edited)))
        assert report.moved == (("d3/f39.md", "d0/moved.md"),)
        assert report.deleted == ("d2/f38.md",)
        assert report.created == ("d1/new.md",)
        after = ws.journal.local_index()
        assert after["d0/moved.md"][0] == before["d3/f39.md"][0]
        assert all(after[p][0] == before[p][0] for p in before if p in after)
        assert ws.scan().changed == 0
    finally:
        ws.close()


def test_walk_gives_file_stats_for_only_the_folders_asked(ws: Workspace):
    """walk(only=...) (the watcher's folder rescans) reports lstat values under those folders alone."""
    from syncengine.scanner import walk

    seen = walk(ws.root, ws.ignore, only=["notes", "gone"])
    assert list(seen.files) == ["notes/b.md"]
    st = os.lstat(ws.root / "notes/b.md")
    got = seen.files["notes/b.md"]
    assert (got.size, got.mtime_ns, got.ctime_ns, got.inode) == (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
    assert got.mode == st.st_mode & 0o7777 and not seen.problems
    whole = walk(ws.root, ws.ignore)
    assert sorted(whole.files) == ["a.json", "bin/c.bin", "notes/b.md"]
    assert walk(ws.root, ws.ignore, only=[""]).files == whole.files  # the root as a folder asked for


def test_a_no_op_scan_writes_nothing_and_a_same_tick_edit_is_still_found(tmp_path: Path):
    """A scan that finds nothing leaves the journal's bytes alone; the racy rule still catches an edit that keeps
    size and mtime after any number of such scans."""
    root = tmp_path / "w"
    make_tree(root, {"a.json": '{"x": 1}\n', "b.md": "# b\n"})
    backdate(root, 3600)
    ws, _ = Workspace.init(root)
    try:
        ws.scan()  # restamps what init saw as racy
        state = root / ".syncengine"
        before = {p.name: p.read_bytes() for p in state.glob("journal.db*")}
        for _ in range(3):
            report = ws.scan()
            assert report.hashed == 0 and report.changed == 0
        assert {p.name: p.read_bytes() for p in state.glob("journal.db*")} == before
        path = root / "a.json"
        path.write_text('{"x": 2}\n')
        report = ws.scan()  # now racy: hashed, found modified, and the scan time written
        assert report.modified == ("a.json",)
        st = path.stat()
        path.write_text('{"x": 3}\n')  # same size, same mtime: only the racy rule or ctime can tell
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
        assert ws.scan().modified == ("a.json",)
    finally:
        ws.close()


@pytest.mark.parametrize("size", [0, 1, 8191, 8192, 1 << 20, (1 << 20) + 1, 3 << 20])
def test_hash_with_head_reads_whole_files_of_any_size(tmp_path: Path, size: int):
    """The read stops at the stat'ed size: every byte is still hashed, at buffer edges too."""
    import hashlib

    from syncengine.fsops import hash_with_head

    data = os.urandom(size)
    path = tmp_path / "f"
    path.write_bytes(data)
    digest, stat, head = hash_with_head(path)
    assert digest == hashlib.sha256(data).hexdigest()
    assert stat.size == size and head == data[:8192]


def test_hash_with_head_reads_a_procfs_file_past_its_zero_size():
    """A file whose stat says 0 bytes but which has content is read to its end."""
    import hashlib

    from syncengine.fsops import hash_with_head

    path = Path("/proc/self/cmdline")
    if not path.exists():
        pytest.skip("no procfs")
    digest, _stat, head = hash_with_head(path)
    assert head and digest == hashlib.sha256(head).hexdigest()


def _count_forks(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The pids of the children os.fork starts from now on (recorded in this process only)."""
    forks: list[int] = []
    real_fork = os.fork

    def counted_fork() -> int:
        pid = real_fork()
        if pid:
            forks.append(pid)
        return pid

    monkeypatch.setattr(os, "fork", counted_fork)
    return forks


def _hash_results(root: Path, rels: list[str]) -> list[tuple]:
    return scanner._hash_files(os.path.join(root, ""), rels, {"known.json": ()}, None)


def test_large_batch_is_hashed_half_in_a_forked_child(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        request: pytest.FixtureRequest):
    """A batch over FORK_MIN is split with a forked child: the same digests, stats, kinds and failures, in order."""
    if not here_or_alone(request):
        return
    files = {f"d/{i:02}.json": f'{{"i": {i}}}\n' for i in range(12)}
    files |= {"known.json": "{}\n", "e.bin": b"\x00\xff" * 3000, "f.md": "# f\n" * 900, "g/empty.txt": ""}
    make_tree(tmp_path, files)
    (tmp_path / "dir.json").mkdir()
    rels = [*sorted(files), "dir.json", "gone.json"]
    rels.insert(5, "gone2.json")
    alone = _hash_results(tmp_path, rels)
    forks = _count_forks(monkeypatch)
    monkeypatch.setattr(scanner, "FORK_MIN", 4)
    shared = _hash_results(tmp_path, rels)
    assert len(forks) == 1
    assert shared == alone
    by_rel = dict(zip(rels, shared, strict=True))
    assert by_rel["gone.json"][:2] == (None, True) and by_rel["gone2.json"][:2] == (None, True)
    assert by_rel["dir.json"][:2] == (None, False)
    assert by_rel["known.json"][2] is None and by_rel["e.bin"][2] == "binary" and by_rel["f.md"][2] == "text"


def test_no_fork_beside_other_threads_or_when_fork_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Another thread running, or a fork refused (EAGAIN), leaves the whole batch to this process."""
    import threading

    make_tree(tmp_path, {f"{i}.txt": f"{i}\n" for i in range(8)})
    rels = [f"{i}.txt" for i in range(8)]
    alone = _hash_results(tmp_path, rels)
    monkeypatch.setattr(scanner, "FORK_MIN", 2)
    forks = _count_forks(monkeypatch)
    stop = threading.Event()
    other = threading.Thread(target=stop.wait)
    other.start()
    try:
        assert _hash_results(tmp_path, rels) == alone
    finally:
        stop.set()
        other.join()
    assert forks == []

    def refused() -> int:
        raise OSError(errno.EAGAIN, "no more processes")

    monkeypatch.setattr(os, "fork", refused)
    assert _hash_results(tmp_path, rels) == alone


def test_a_child_that_fails_leaves_its_half_to_this_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        request: pytest.FixtureRequest):
    """A child that dies before delivering (here: it cannot encode its results) costs time, not results."""
    if not here_or_alone(request):
        return
    make_tree(tmp_path, {f"{i}.txt": f"{i}\n" for i in range(8)})
    rels = [f"{i}.txt" for i in range(8)]
    alone = _hash_results(tmp_path, rels)
    monkeypatch.setattr(scanner, "FORK_MIN", 2)

    def broken(_value: object) -> bytes:
        raise ValueError("cannot encode")

    forks = _count_forks(monkeypatch)
    monkeypatch.setattr(scanner.marshal, "dumps", broken)
    assert _hash_results(tmp_path, rels) == alone
    assert len(forks) == 1


def test_forked_first_scan_journals_what_one_process_does(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        request: pytest.FixtureRequest):
    """init over FORK_MIN files journals the same rows, and reports progress up to the whole batch once."""
    if not here_or_alone(request):
        return
    tree = {f"p/{i:03}.json": f'{{"n": {i}}}\n' for i in range(40)} | {"z.bin": b"\x01\x00" * 50}
    rows = []
    for name, fork_min in (("one", 10**9), ("two", 8)):
        monkeypatch.setattr(scanner, "FORK_MIN", fork_min)
        root = tmp_path / name
        make_tree(root, tree)
        backdate(root)
        seen: list[tuple[int, int | None]] = []
        record = seen.append
        workspace, _ = Workspace.init(root)
        try:
            report = scanner.scan(root, workspace.journal, workspace.ignore, progress=lambda d, t, r=record: r((d, t)))
            assert report.hashed == 0
            (root / "late.json").write_text("{}\n")
            for i in range(10):
                (root / f"p/new{i}.json").write_text(f'{{"new": {i}}}\n')
            report = scanner.scan(root, workspace.journal, workspace.ignore, progress=lambda d, t, r=record: r((d, t)))
            assert report.hashed == 11 and len(report.created) == 11
            assert seen[-1] == (11, 11) and [d for d, _t in seen].count(11) == 1
            index = workspace.journal.local_index()
            rows.append(sorted((path, r[1], r[2], r[7]) for path, r in index.items()))
        finally:
            workspace.close()
    assert rows[0] == rows[1]


def test_an_interrupted_forked_batch_leaves_no_child_nor_descriptor(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        request: pytest.FixtureRequest):
    """An exception in this process while the child hashes (here from progress) kills and reaps the child."""
    if not here_or_alone(request):
        return
    make_tree(tmp_path, {f"{i}.txt": f"{i}\n" for i in range(8)})
    monkeypatch.setattr(scanner, "FORK_MIN", 2)
    forks = _count_forks(monkeypatch)
    fds = sorted(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else None

    def interrupt(_done: int, _total: int | None) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        scanner._hash_files(os.path.join(tmp_path, ""), [f"{i}.txt" for i in range(8)], {}, interrupt)
    assert len(forks) == 1
    with pytest.raises(ChildProcessError):
        os.waitpid(forks[0], os.WNOHANG)  # already reaped
    if fds is not None:
        assert sorted(os.listdir("/proc/self/fd")) == fds


def _copy_and_rows(ws: Workspace) -> tuple[tuple | None, dict, str]:
    """(token and stamps in journal.db-stamps, or None; the rows' stamps; the journal's token)."""
    import marshal

    journal = ws.journal
    rows = {row[0]: tuple(row[1:]) for row in journal.execute(
        "SELECT path, size, mtime_ns, ctime_ns, inode, mode FROM document WHERE path IS NOT NULL")}
    (token,), = journal.execute("SELECT stamps_token FROM sync_state")
    try:
        copy = marshal.loads(journal.stamps_copy.read_bytes()[4:])
    except FileNotFoundError:
        copy = None
    return copy, rows, token


def test_a_scan_carries_the_stamps_copy_across_its_own_write(ws: Workspace):
    """A scan that journals an edit, a touch, a move, a deletion and a creation leaves the copy of the stamps
    valid (the rows read back, tagged with the token its transaction drew), so the next process loads the copy
    instead of every row; so does init. The copy always equals the rows when its token is current."""
    copy, rows, token = _copy_and_rows(ws)
    assert copy == (token, rows) and len(rows) == 3  # init's scan carried it
    root = ws.root
    (root / "a.json").write_text('{"x": 2}\n')  # edited
    os.utime(root / "notes/b.md", (time.time() - 60,) * 2)  # touched: a restamp
    (root / "bin/c.bin").rename(root / "bin/moved.bin")  # moved
    (root / "new.md").write_text("new\n")  # created
    backdate(root)
    report = ws.scan()
    assert report.changed and report.moved == (("bin/c.bin", "bin/moved.bin"),)
    copy, rows, token = _copy_and_rows(ws)
    assert copy == (token, rows) and sorted(rows) == ["a.json", "bin/moved.bin", "new.md", "notes/b.md"]
    (root / "new.md").unlink()  # deleted
    ws.scan()
    copy, rows, token = _copy_and_rows(ws)
    assert copy == (token, rows) and "new.md" not in rows
    sent: list[str] = []
    ws.journal.db.connection().set_trace_callback(sent.append)
    assert ws.scan().hashed == 0
    assert not [sql for sql in sent if "FROM document" in sql and "IN (" not in sql]  # the copy, not the rows


def test_a_stamp_changed_elsewhere_between_read_and_write_is_not_carried(ws: Workspace):
    """If another connection changes a stamp after the scan read them, the scan's write cannot say what the rows
    hold: the copy is left stale (its token is not current) and the next read takes the rows."""
    from syncengine.journal import Journal

    ws.scan()
    (ws.root / "a.json").write_text('{"x": 3}\n')
    changes, restamps, _report = scanner.detect(ws.root, ws.journal, ws.ignore)
    other = Journal.open(ws.layout.journal)  # another process: an apply journals a file meanwhile
    try:
        other.update_doc(other.doc_by_path("notes/b.md").doc_id, mtime_ns=12345)
    finally:
        other.close()
    ws.journal.record_local(changes, restamps)
    copy, rows, token = _copy_and_rows(ws)
    assert copy is None or copy[0] != token
    assert rows["notes/b.md"][1] == 12345
    with ws.journal.reading():
        assert ws.journal.local_stamps() == rows
    copy, rows, token = _copy_and_rows(ws)
    assert copy == (token, rows)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any folder")
def test_a_folder_that_cannot_be_opened_is_reported_and_its_files_kept(ws: Workspace):
    """The walk lists each folder through a descriptor: one it may not open is reported, as a listing
    failure was, and the files the journal knows inside it are not taken for deletions."""
    ws.scan()
    os.chmod(ws.root / "notes", 0)
    try:
        report = ws.scan()
    finally:
        os.chmod(ws.root / "notes", 0o755)
    assert [(p.path, p.reason) for p in report.problems] == [("notes", "cannot list folder: Permission denied")]
    assert not report.deleted and "notes/b.md" in ws.journal.local_index()


def test_a_kill_between_the_commit_and_the_carried_copy_leaves_a_stale_copy_never_a_wrong_one(ws: Workspace,
                                                                                                monkeypatch):
    """The carried copy is written after the scan's transaction commits: killed in between, the journal holds
    the scan and the copy the token before it, so the next read takes the rows (and the edit is not hashed
    again, nor lost)."""
    ws.scan()
    (ws.root / "a.json").write_text('{"x": 4}\n')
    backdate(ws.root)

    def killed(*_args):
        raise KeyboardInterrupt

    monkeypatch.setattr(ws.journal, "_save_stamps", killed)
    with pytest.raises(KeyboardInterrupt):
        ws.scan()
    monkeypatch.undo()
    copy, rows, token = _copy_and_rows(ws)
    assert copy is not None and copy[0] != token and copy[1] != rows
    assert [e.op.value for e in ws.log("a.json", limit=1)] == ["modified"]
    report = ws.scan()
    assert report.hashed == 0 and not report.changed
    copy, rows, token = _copy_and_rows(ws)
    assert copy == (token, rows)



def _scan_elsewhere(root: Path, user: int | None) -> dict:
    """A scan of ``root`` in a forked child, as ``user`` if given: (deleted, problems, journaled paths)."""

    def scan() -> dict:
        with Workspace(root) as ws:
            report = ws.scan()
            return {"deleted": list(report.deleted), "problems": sorted([p.path, p.reason] for p in report.problems),
                    "known": sorted(ws.journal.local_index())}

    return in_child(scan, user)


def test_files_in_a_folder_listed_but_not_searchable_are_reported_not_deleted(request: pytest.FixtureRequest):
    """A folder with mode r-- lists its names but refuses every stat inside: those files are reported, and
    the journal keeps them (they used to be taken for vanished, and pushed as deletions).

    Permissions do not bind root, so as root the scan runs as `nobody` in a forked child (tests.forkkit; in a
    folder of /tmp: pytest's tmp_path sits in folders closed to others); a fork beside another thread could
    hang on a lock it held, so then the test runs in a fresh pytest process."""
    if not here_or_alone(request):
        return
    with open_folder("se-perm-") as top:
        _scan_a_folder_not_searchable(top)


def _scan_a_folder_not_searchable(top: Path) -> None:
    root = top / "w"
    make_tree(root, {"a.json": '{"x": 1}\n', "notes/b.md": "# b\n", "notes/c.md": "# c\n"})
    backdate(root)
    ws, _ = Workspace.init(root)
    ws.scan()  # and every module a scan imports, before the child may lose the right to read them
    ws.close()
    user = owned_by_nobody(top)
    os.chmod(root / "notes", 0o444)
    try:
        out = _scan_elsewhere(root, user)
    finally:
        os.chmod(root / "notes", 0o755)
    assert out["deleted"] == []
    assert out["problems"] == [["notes/b.md", "cannot stat: Permission denied"],
                               ["notes/c.md", "cannot stat: Permission denied"]]
    assert out["known"] == ["a.json", "notes/b.md", "notes/c.md"]


def _walk_tree() -> dict[str, str | bytes]:
    tree: dict[str, str | bytes] = {f"t{t}/s{s}/{i}.json": f'{{"t": {t}, "i": {i}}}\n'
                                    for t in range(5) for s in range(2) for i in range(4)}
    return tree | {"top.md": "# top\n", "cache/x.json": "{}\n", "t4/deep/er/f.txt": "f\n"}


def _edit_walk_tree(root: Path) -> None:
    """Changes in the folders of both processes, at the root, and across them."""
    (root / "top.md").write_text("# top, edited\n")
    (root / "t0/s0/0.json").write_text('{"edited": 0}\n')
    (root / "t1/s1/1.json").write_text('{"edited": 1}\n')
    (root / "t3/s0/new.json").write_text('{"new": 3}\n')
    (root / "t2/s1/new.json").write_text('{"new": 2}\n')
    (root / "t0/s1/2.json").unlink()
    (root / "t1/s0/3.json").unlink()
    os.rename(root / "t4/s0/0.json", root / "t1/moved.json")
    os.rename(root / "t2/s0/1.json", root / "t3/moved.json")
    shutil.rmtree(root / "t4/deep")
    (root / "cache/y.json").write_text("{}\n")


def _report_facts(report) -> tuple:
    return (sorted(report.created), sorted(report.modified), sorted(report.deleted), sorted(report.moved),
            report.files, sorted((p.path, p.reason) for p in report.problems))


def test_a_large_walk_shares_its_top_folders_with_a_forked_child(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        request: pytest.FixtureRequest):
    """Over WALK_FORK_MIN known files a child walks every second top folder: the same changes, deletions,
    moves, counts and journal rows as one process, ignored folders included; and a child that fails costs
    time, not results."""
    if not here_or_alone(request):
        return
    facts, rows = [], []
    for name, walk_min, broken in (("one", 10**9, False), ("two", 1, False), ("failed", 1, True)):
        monkeypatch.setattr(scanner, "WALK_FORK_MIN", walk_min)
        root = tmp_path / name
        make_tree(root, _walk_tree())
        (root / ".syncignore").write_text("cache/\n")
        backdate(root)
        workspace, _ = Workspace.init(root)
        try:
            _edit_walk_tree(root)
            backdate(root)
            forks = _count_forks(monkeypatch)
            if broken:
                monkeypatch.setattr(scanner, "_decode_walk", lambda _data: None)
            report = workspace.scan()
            monkeypatch.undo()
            assert len(forks) == (0 if walk_min > 1 else 1)
            facts.append(_report_facts(report))
            rows.append(sorted((path, r[1], r[2]) for path, r in workspace.journal.local_index().items()))
        finally:
            workspace.close()
    assert facts[0] == facts[1] == facts[2]
    assert rows[0] == rows[1] == rows[2]
    created, modified, deleted, moved, _files, problems = facts[0]
    assert created == ["t2/s1/new.json", "t3/s0/new.json"] and not problems
    assert modified == ["t0/s0/0.json", "t1/s1/1.json", "top.md"]
    assert deleted == ["t0/s1/2.json", "t1/s0/3.json", "t4/deep/er/f.txt"]
    assert len(moved) == 2


def test_a_forked_walk_reports_the_child_folders_it_cannot_list_and_keeps_their_files(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest):
    """A folder the child cannot list is reported by it and its files are not taken for deletions."""
    if not here_or_alone(request):
        return
    root = tmp_path / "w"
    make_tree(root, _walk_tree())
    backdate(root)
    workspace, _ = Workspace.init(root)
    try:
        monkeypatch.setattr(scanner, "WALK_FORK_MIN", 1)
        forks = _count_forks(monkeypatch)
        # Armed faults keep a scan from forking (their counts are per process); here the second listing
        # fails in each process: one folder of the child's (t1 or t3) and one of this process's.
        monkeypatch.setattr(scanner, "faults_armed", lambda: False)
        with inject_fault("list", 2, errno.EACCES):
            report = workspace.scan()
        assert len(forks) == 1
        failed = [p.path for p in report.problems]
        assert len(failed) == 2 and any(path.split("/")[0] in ("t1", "t3") for path in failed)
        assert all(p.reason == "cannot list folder: Permission denied" for p in report.problems)
        assert report.deleted == () and report.modified == () and report.created == ()
        assert len(workspace.journal.local_index()) == len(_walk_tree())
    finally:
        workspace.close()
