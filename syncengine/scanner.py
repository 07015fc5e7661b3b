"""The scanner: the truth about what changed on disk, at the cost of a stat walk.

Watcher events are hints; this is what they are checked against. A file is
hashed only when its (size, mtime_ns, ctime_ns, inode) differ from the
journal, or when it is "racy": its mtime falls within a timestamp tick of
the previous scan, so an edit in that same tick could hide behind an equal
mtime (git's racy-clean rule). Files that vanished are matched to new ones
as moves — by inode first, then by content hash — so an edit follows its
document across a rename.
"""

from __future__ import annotations

import contextlib
import marshal
import os
import signal
import threading
import time
import unicodedata
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from syncengine import early
from syncengine.documents import kind_for
from syncengine.fsops import (
    TEMP_PREFIX,
    TEMP_SUFFIX,
    FileStat,
    check_fault,
    failpoint,
    faults_armed,
    hash_with_head,
    trash_dir,
)
from syncengine.models import LocalChange, Op, ScanProblem, ScanReport
from syncengine.paths import STATE_DIR, IgnoreRules

if TYPE_CHECKING:  # not imported at run time: the early walk's child (syncengine.early) loads this module, not peewee
    from syncengine.journal import Journal

RACY_NS = 2_000_000_000  # coarse enough for FAT/HFS+ timestamps; costs one extra hash at most

Progress = Callable[[int, int | None], None]


Stamp = tuple[int, int, int, int, int]  # FileStat's fields as a plain tuple: size, mtime_ns, ctime_ns, inode, mode


@dataclass
class Walk:
    """What a stat walk saw: files by relative path, and what it could not read."""

    files: dict[str, FileStat] = field(default_factory=dict)
    problems: list[ScanProblem] = field(default_factory=list)
    unreadable_dirs: list[str] = field(default_factory=list)


def _name_problem(rel: str) -> str | None:
    try:
        rel.encode("utf-8")
    except UnicodeEncodeError:
        return "file name is not valid UTF-8 (not synced)"
    if unicodedata.normalize("NFC", rel) != rel:
        return "file name is not NFC-normalised Unicode (not synced; rename it)"
    return None


def walk(root: Path, ignore: IgnoreRules, only: list[str] | None = None) -> Walk:
    """lstat every file under ``root`` (or under the folders in ``only``).

    Symlinks, sockets and devices are skipped and never followed; a folder
    that cannot be listed is reported and remembered, so that the files the
    journal knows inside it are not mistaken for deletions.
    """
    result = Walk()
    stamps = _stat_walk(root, ignore, only, result.problems, result.unreadable_dirs)
    result.files = {rel: FileStat(*stamp) for rel, stamp in stamps.items()}
    return result


_DIR_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0)


def _regular_files(stack: list[tuple[str, str]], ignored: Callable[[str], bool], problems: list[ScanProblem],
                   unreadable_dirs: list[str], skip: frozenset[str] = frozenset()
                   ) -> Iterator[list[tuple[str, os.DirEntry]]]:
    """(relative path, directory entry) of every regular file with a valid name under the ``stack``'s folders,
    a folder's files at a time (resuming a generator per file was a tenth of a no-op walk).

    The loop both walks share: temp files and the state folder are skipped,
    ignored folders are not entered, a folder that cannot be listed is
    reported and remembered, a bad name is reported unless it is ignored.
    Whether a file itself is ignored is the caller's question (the fused
    walk asks only about files that differ), and so is its stat: the type
    comes from the listing (d_type; the entry lstats by itself where the
    file system gives none), so a file the journal does not know yet costs
    no lstat here — it is hashed, and its stat taken on the open file.
    """
    while stack:
        folder, prefix = stack.pop()
        try:
            check_fault("list", folder)
            fd = os.open(folder, _DIR_FLAGS)
        except FileNotFoundError:
            continue
        except OSError as exc:
            problems.append(ScanProblem(prefix[:-1] or ".", f"cannot list folder: {exc.strerror}"))
            unreadable_dirs.append(prefix[:-1])
            continue
        # Listed through a descriptor, so an entry's stat is an fstatat of its bare name, not a
        # lookup of every folder of its path again: the no-op walk of 10,000 files 40.6 -> 36.8 ms.
        try:
            try:
                entries = list(os.scandir(fd))
            except OSError as exc:
                problems.append(ScanProblem(prefix[:-1] or ".", f"cannot list folder: {exc.strerror}"))
                unreadable_dirs.append(prefix[:-1])
                continue
            files: list[tuple[str, os.DirEntry]] = []
            for entry in entries:
                name = entry.name
                if name.startswith(TEMP_PREFIX) and name.endswith(TEMP_SUFFIX):
                    continue
                if name == STATE_DIR and not prefix:
                    continue
                rel = prefix + name
                try:
                    regular = entry.is_file(follow_symlinks=False)
                    folder_entry = not regular and entry.is_dir(follow_symlinks=False)
                except FileNotFoundError:
                    continue  # vanished between listing and stat: the next scan sees it
                except OSError as exc:  # no type in the listing and no stat allowed: never read as gone
                    problems.append(ScanProblem(rel, f"cannot stat: {exc.strerror}"))
                    continue
                if regular:
                    if not rel.isascii():
                        problem = _name_problem(rel)
                        if problem:
                            if not ignored(rel):
                                problems.append(ScanProblem(rel.encode("utf-8", "replace").decode(), problem))
                            continue
                    files.append((rel, entry))
                elif folder_entry and not ignored(rel + "/") and (prefix or name not in skip):
                    stack.append((os.path.join(folder, name), rel + "/"))
            yield files  # stat'ed by the caller while the folder's descriptor is open
        finally:
            os.close(fd)


def _stat_walk(root: Path, ignore: IgnoreRules, only: list[str] | None, problems: list[ScanProblem],
               unreadable_dirs: list[str]) -> dict[str, Stamp]:
    """:func:`walk`'s loop, giving plain tuples: the hot loop of every scan.

    It runs once per file on every scan (50,000 times for a no-op sync of
    50,000 files), so it makes no Path and no call it can avoid: os.scandir
    with DirEntry.stat, one regex call for the ignore rules, the name check
    only for non-ASCII names, and the tuple the journal's stamps compare to.
    """
    files: dict[str, Stamp] = {}
    ignored = ignore.matcher()
    stack = [(os.path.join(root, d), f"{d}/" if d else "") for d in only] if only else [(os.fspath(root), "")]
    for folder in _regular_files(stack, ignored, problems, unreadable_dirs):
        for rel, entry in folder:
            if not ignored(rel):
                try:
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue  # vanished between listing and stat: the next scan sees it
                except OSError as exc:
                    problems.append(ScanProblem(rel, f"cannot stat: {exc.strerror}"))
                    continue
                files[rel] = (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_mode & 0o7777)
    return files


def _changed_walk(root: Path, ignore: IgnoreRules, stamps: dict[str, Stamp], racy_after: int,
                  problems: list[ScanProblem], unreadable_dirs: list[str]
                  ) -> tuple[dict[str, Stamp | None], set[str], int]:
    """:func:`_stat_walk` fused with the comparison to the journal's ``stamps``.

    Returns (the files whose stamp differs from the journal's, or is racy,
    with that stamp, and the files the journal does not know, with None;
    the known paths not seen; how many files were counted). A no-op scan of
    50,000 files keeps no dict of 50,000 stamps and makes no second pass to
    compare them, and the ignore rules are asked only about files that
    differ: a file whose stamp is exactly the journal's is known and
    unchanged, ignored or not (a newly ignored file is never read as deleted
    nor as changed either way), so it is counted as a file of the workspace.
    A file the journal does not know is not stat'ed: it will be hashed, and
    a first scan of 10,000 files makes 10,000 fewer lstat calls.

    A large workspace's walk is one lstat per file, on one core while the
    other idles: with WALK_FORK_MIN known files, a forked child walks every
    second top folder (:func:`_fork_walking`) and sends back only what
    differs, so what crosses the pipe grows with the changes, not the files.
    """
    top = os.fspath(root)
    ignored = ignore.matcher()
    theirs: list[tuple[str, str]] = []
    child = None
    if len(stamps) >= WALK_FORK_MIN and _may_fork():
        theirs = _split_top(top, ignored)
        if theirs:
            child = _forked(lambda: _walk_elsewhere(theirs, ignored, stamps, racy_after))
    skip = frozenset(_tops(theirs)) if child is not None else frozenset()
    stack = [(top, "")]
    if child is None:
        changed, seen, counted = _walk_part(stack, ignored, stamps, racy_after, problems, unreadable_dirs)
        return changed, (stamps.keys() - seen if len(seen) != len(stamps) else set()), counted
    (changed, seen, counted), data = _beside(
        child, lambda: _walk_part(stack, ignored, stamps, racy_after, problems, unreadable_dirs, skip))
    result = _decode_walk(data) if data is not None else None
    if result is None:  # the child failed: walk its folders here
        their_changed, their_seen, their_counted = _walk_part(theirs, ignored, stamps, racy_after, problems,
                                                              unreadable_dirs)
        seen |= their_seen
        their_missing = None
    else:
        their_changed, their_missing, their_seen_count, their_counted, their_problems, their_unreadable = result
        problems.extend(ScanProblem(path, reason) for path, reason in their_problems)
        unreadable_dirs.extend(their_unreadable)
    changed.update(their_changed)
    if their_missing is None:
        vanished = stamps.keys() - seen if len(seen) != len(stamps) else set()
    elif len(seen) + their_seen_count == len(stamps):
        vanished = set()  # every known file was seen, here or there
    else:
        # Known paths under the child's folders that it did not see, and under the rest that this walk did not.
        mine = {rel for rel in stamps.keys() - seen if rel.partition("/")[0] not in skip}
        vanished = mine | set(their_missing)
    return changed, vanished, counted + their_counted


WALK_FORK_MIN = 20_000  # known files before a forked child walks half the top folders


def _tops(stack: list[tuple[str, str]]) -> set[str]:
    return {prefix[:-1] for _folder, prefix in stack}


def _split_top(top: str, ignored: Callable[[str], bool]) -> list[tuple[str, str]]:
    """The top folders a child walks: every second one that is not ignored, if there are two or more.

    The root's files and the other folders stay with this process (whose
    :func:`_regular_files` skips the child's at the root).
    """
    try:
        with os.scandir(top) as entries:
            folders = sorted(e.name for e in entries
                             if e.name != STATE_DIR and e.is_dir(follow_symlinks=False) and not ignored(e.name + "/"))
    except OSError:
        return []  # the walk here reports it
    if len(folders) < 2:
        return []
    return [(os.path.join(top, name), name + "/") for name in folders[1::2]]


def _walk_part(stack: list[tuple[str, str]], ignored: Callable[[str], bool], stamps: dict[str, Stamp],
               racy_after: int, problems: list[ScanProblem], unreadable_dirs: list[str],
               skip: frozenset[str] = frozenset()) -> tuple[dict[str, Stamp | None], set[str], int]:
    """The walk of the folders in ``stack``: (changed, known paths seen, counted); see :func:`_changed_walk`."""
    changed: dict[str, Stamp | None] = {}
    seen: list[str] = []
    counted = 0
    get = stamps.get
    for folder in _regular_files(list(stack), ignored, problems, unreadable_dirs, skip):  # a copy: it pops
        for rel, entry in folder:
            known = get(rel)
            if known is not None:
                try:
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue  # vanished between listing and stat: the next scan sees it
                except OSError as exc:
                    # A folder listed but not searchable (mode r--): its names come, every stat
                    # fails. Reported, so detect() never reads those files as deleted.
                    problems.append(ScanProblem(rel, f"cannot stat: {exc.strerror}"))
                    continue
                seen.append(rel)
                stamp = (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_mode & 0o7777)
                if known == stamp and stamp[1] < racy_after:
                    counted += 1
                    continue
            else:
                stamp = None
            if ignored(rel):
                continue
            counted += 1
            changed[rel] = stamp
    return changed, set(seen), counted


def _walk_elsewhere(theirs: list[tuple[str, str]], ignored: Callable[[str], bool], stamps: dict[str, Stamp],
                    racy_after: int) -> tuple:
    """The child's part of :func:`_changed_walk`: what differs under ``theirs``, never the whole walk."""
    problems: list[ScanProblem] = []
    unreadable: list[str] = []
    changed, seen, counted = _walk_part(theirs, ignored, stamps, racy_after, problems, unreadable)
    tops = _tops(theirs)
    missing = [rel for rel in stamps if rel not in seen and rel.partition("/")[0] in tops]
    return "walk", changed, missing, len(seen), counted, [(p.path, p.reason) for p in problems], unreadable


def _decode_walk(data: bytes) -> tuple | None:
    """The child's walk, or None if it did not deliver all of it (then its folders are walked here)."""
    try:
        out = marshal.loads(data)
    except (EOFError, ValueError, TypeError):
        return None
    if type(out) is not tuple or len(out) != 7 or out[0] != "walk":
        return None
    return out[1:]


def _differs(path: str, stamp: Stamp | None, known: tuple | None, racy_after: int) -> bool:
    """Whether a file the walk found differing must be hashed, by the journal's row read after the walk.

    A file the walk did not stat (the journal did not know it) may have been
    journaled by another process since (an apply): then it is stat'ed now
    and compared with that row, as it would have been in the walk.
    """
    if known is None:
        return True
    if stamp is None:
        try:
            st = os.lstat(path)
        except OSError:
            return True  # gone or unreadable: hashing it says which
        stamp = (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_mode & 0o7777)
    return stamp[1] >= racy_after or known[2:7] != stamp


def _under(path: str, folders: list[str]) -> bool:
    return any(folder == "" or path == folder or path.startswith(folder + "/") for folder in folders)


def detect(
    root: Path,
    journal: Journal,
    ignore: IgnoreRules,
    *,
    progress: Progress | None = None,
    ahead: tuple | None = None,
) -> tuple[list[LocalChange], list[tuple[str, FileStat]], ScanReport]:
    """Compare disk with the journal; returns (changes, restamps, report) without writing.

    The stamps are read before the walk (which compares as it goes), the
    full rows of what differs after it, in a second read transaction; a
    file whose stamp moved since the first read (an apply in another
    process journaled it meanwhile) is compared again with the second, so
    the outcome is the one a walk followed by a single read would give.
    ``ahead``, a walk made earlier by a child (:func:`walk_ahead`), stands
    for this one's if :func:`_early_reject` finds nothing against it.
    """
    started = time.monotonic()
    problems: list[ScanProblem] = []
    unreadable_dirs: list[str] = []
    walked = None
    with journal.reading():
        racy_after = (journal.state().get("last_scan_ns") or 0) - RACY_NS
        if ahead is not None:
            why = _early_reject(ahead, root, journal, ignore, racy_after)
            if why is None:
                walked = _taken(ahead, problems, unreadable_dirs)
                if walked[0] or walked[1]:
                    # Only for record_local's carry of the copy (the walk needs no stamps now): the
                    # next process reads it, and its own early walk needs it valid.
                    journal.local_stamps()
                early.note("used")
            else:
                early.note(f"discarded: {why}")
        if walked is None:
            stamps = journal.local_stamps()
    if walked is None:
        changed, vanished, files = _changed_walk(root, ignore, stamps, racy_after, problems, unreadable_dirs)
        known = len(stamps)
    else:
        changed, vanished, files, known = walked
    wanted = [*changed, *vanished]
    with journal.reading():
        full = len(wanted) > known // 4
        index = journal.local_index() if full else journal.local_index(wanted) if wanted else {}
    # Unknown, restamped (size, mtime, ctime, inode or mode moved) or racy, by the rows read last.
    top = os.path.join(root, "")
    to_hash = [rel for rel, st in changed.items() if _differs(top + rel, st, index.get(rel), racy_after)]
    vanished = {rel for rel in vanished if rel in index}

    # path -> (sha256, stat, kind of a new file). The kind is decided at once
    # so a file's first bytes are not kept: on a first scan of 50,000 small
    # files those heads were the whole tree in memory (250 MB).
    hashed: dict[str, tuple[str, FileStat, str | None]] = {}
    for rel, result in zip(to_hash, _hash_files(top, to_hash, index, progress), strict=True):
        if result[0] is not None:
            hashed[rel] = result
        elif result[1]:
            files -= 1  # deleted while we scanned: treated as absent
            if rel in index:
                vanished.add(rel)
        else:
            problems.append(ScanProblem(rel, f"cannot read: {result[2]}"))

    changes: list[LocalChange] = []
    restamps: list[tuple[str, FileStat]] = []
    created: list[str] = []
    for rel in to_hash:
        if rel not in hashed:
            continue
        digest, st, _kind = hashed[rel]
        known = index.get(rel)
        if known is None:
            created.append(rel)
        elif digest != known[1] or (st.mode & 0o111) != ((known[6] or 0) & 0o111):
            changes.append(_change(Op.MODIFIED, rel, digest, st, doc_id=known[0], kind=known[7]))
        else:
            restamps.append((rel, st))

    unreadable = set(p.path for p in problems)
    gone = [
        rel for rel in vanished
        if rel not in unreadable
        and not _under(rel, unreadable_dirs)
        and not ignore.ignored(rel)  # newly ignored: never read as deleted
    ]
    moves = _match_moves(gone, created, index, hashed)
    moved_new = {new for _old, new in moves}
    moved_old = {old for old, _new in moves}
    for old, new in moves:
        digest, st, _head = hashed[new]
        changes.append(_change(Op.MOVED, new, digest, st, doc_id=index[old][0], kind=index[old][7], old_path=old))
    for rel in sorted(set(created) - moved_new):
        digest, st, kind = hashed[rel]
        changes.append(_change(Op.CREATED, rel, digest, st, kind=kind))
    for rel in sorted(set(gone) - moved_old):
        changes.append(LocalChange(Op.DELETED, rel, doc_id=index[rel][0], kind=index[rel][7]))

    report = ScanReport(
        created=tuple(sorted(set(created) - moved_new)),
        modified=tuple(sorted(c.path for c in changes if c.op is Op.MODIFIED)),
        deleted=tuple(sorted(set(gone) - moved_old)),
        moved=tuple(sorted(moves)),
        problems=tuple(problems),
        files=files,
        hashed=len(hashed),
        seconds=round(time.monotonic() - started, 4),
    )
    return changes, restamps, report


FORK_MIN = 2000  # files to hash before a second process takes half of them
T = TypeVar("T")
_MAX_FD = os.sysconf("SC_OPEN_MAX") if hasattr(os, "sysconf") else 1 << 16  # a child closes what it inherited


def _hash_files(top: str, rels: list[str], index: dict[str, tuple], progress: Progress | None) -> list[tuple]:
    """Each file's (sha256, stat, kind or None for a known file), or (None, vanished, why) if it could not be read.

    Hashing is most of a first scan, on one core while the other idles.
    Threads do not help: per file it is a few syscalls and a little
    Python, and every syscall gives the GIL up and waits to get it back
    (10,000 files: 0.16 s alone, 0.22-0.28 s on two threads). A forked
    child hashing half of them does (0.16 -> 0.10-0.13 s wall, fork
    included), so a large batch is split when this process has no other
    thread (a fork copies only the calling one, and another's locks would
    stay held in the child) and no test fault counts calls.
    """
    if len(rels) >= FORK_MIN and _may_fork():
        half = len(rels) // 2
        child = _forked(lambda: _hashed_elsewhere(top, rels[half:], index))
        if child is not None:
            # Its last report waits for the child's half (below).
            mine, data = _beside(child, lambda: _hash_part(
                top, rels[:half], index,
                (lambda done, total: progress(min(done, total - 1), total)) if progress else None, len(rels)))
            theirs = _decode(data, len(rels) - half) if data is not None else None
            if theirs is None:  # the child failed: hash its half here
                theirs = _hash_part(top, rels[half:], index, None, len(rels))
            if progress and rels:
                progress(len(rels), len(rels))
            return mine + theirs
    return _hash_part(top, rels, index, progress, len(rels))


def _hash_part(top: str, rels: list[str], index: dict[str, tuple], progress: Progress | None,
               total: int) -> list[tuple]:
    out: list[tuple] = []
    # Progress is shown against the whole batch: a half hashed here stands for the other half as well.
    scale = total / len(rels) if rels else 1
    # A str, not ``root / rel``: a Path per file was a tenth of a first scan's hashing.
    for done, rel in enumerate(rels, 1):
        try:
            digest, st, head = hash_with_head(top + rel)
            out.append((digest, st, kind_for(rel, head).value if rel not in index else None))
        except FileNotFoundError:
            out.append((None, True, ""))
        except OSError as exc:
            out.append((None, False, exc.strerror or str(exc)))
        if progress and (done % 500 == 0 or done == len(rels)):
            progress(min(round(done * scale), total), total)
    return out


def _may_fork() -> bool:
    if not hasattr(os, "fork") or threading.active_count() != 1 or faults_armed():
        return False
    cores = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    return len(cores) > 1


def _hashed_elsewhere(top: str, rels: list[str], index: dict[str, tuple]) -> list[tuple]:
    """The child's part of :func:`_hash_files`, as plain tuples for marshal."""
    return [(r[0], r[1].size, r[1].mtime_ns, r[1].ctime_ns, r[1].inode, r[1].mode, r[2])
            if r[0] is not None else r for r in _hash_part(top, rels, index, None, len(rels))]


def _forked(work: Callable[[], object]) -> tuple[int, int] | None:
    """Start a child that runs ``work`` and writes its result, marshalled, to a pipe; (pid, read end), or None.

    The child only reads files, never touches the journal, and leaves with
    os._exit; it keeps no descriptor but its pipe's write end (and stdio),
    so a parent killed meanwhile leaves no lock (flock: the sync and scan
    locks) held by this child.
    """
    try:
        rfd, wfd = os.pipe()
    except OSError:
        return None
    try:
        pid = os.fork()
    except OSError:
        os.close(rfd)
        os.close(wfd)
        return None
    if pid == 0:  # the child
        status = 1
        try:
            os.closerange(3, wfd)
            os.closerange(wfd + 1, _MAX_FD)
            view = memoryview(marshal.dumps(work()))
            while view:
                view = view[os.write(wfd, view):]
            status = 0
        finally:
            os._exit(status)
    os.close(wfd)
    return pid, rfd


def _beside(child: tuple[int, int], mine: Callable[[], T]) -> tuple[T, bytes | None]:
    """Run ``mine`` here while ``child`` works: (mine's result, the child's bytes, None if it failed).

    Interrupted here, the child's work is not wanted any more: it is killed and reaped.
    """
    pid, fd = child
    status: int | None = None
    try:
        result = mine()
        data = _read_all(fd)
        status = _wait(pid)
    finally:
        os.close(fd)
        if status is None:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
            _wait(pid)
    return result, (data if status == 0 else None)


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)


def _wait(pid: int) -> int:
    try:
        return os.waitpid(pid, 0)[1]  # EINTR is retried by Python itself (PEP 475)
    except ChildProcessError:
        return -1


def _decode(data: bytes, count: int) -> list[tuple] | None:
    """The child's results, or None if it did not deliver all of them (then its half is hashed here)."""
    try:
        rows = marshal.loads(data)
    except (EOFError, ValueError, TypeError):
        return None
    if type(rows) is not list or len(rows) != count:
        return None
    return [(r[0], FileStat(*r[1:6]), r[6]) if r[0] is not None else r for r in rows]


def _change(op: Op, rel: str, digest: str, st: FileStat, **kw) -> LocalChange:
    return LocalChange(op, rel, hash=digest, size=st.size, mtime_ns=st.mtime_ns, ctime_ns=st.ctime_ns,
                       inode=st.inode, mode=st.mode, **kw)


def _match_moves(
    gone: list[str],
    created: list[str],
    index: dict[str, tuple],
    hashed: dict[str, tuple[str, FileStat, str | None]],
) -> list[tuple[str, str]]:
    """Pair vanished paths with new ones: same inode first, then same hash.

    Several files can share a hash (templates, empty files); pairing them in
    sorted order makes the outcome the same on every run and every replica.
    """
    if not gone or not created:
        return []
    pairs: list[tuple[str, str]] = []
    free_new = sorted(created)
    by_inode = {}
    for rel in free_new:
        by_inode.setdefault(hashed[rel][1].inode, rel)
    free_old: list[str] = []
    for old in sorted(gone):
        new = by_inode.get(index[old][5])
        # Same inode, and the same bytes or the same mtime: the same file under
        # a new name (`mv` keeps the mtime). A bare inode match is not enough:
        # ext4 hands a deleted file's inode to the next new file at once.
        if (
            new is not None
            and new in free_new
            and hashed[new][1].size > 0
            and (hashed[new][0] == index[old][1] or hashed[new][1].mtime_ns == index[old][3])
        ):
            pairs.append((old, new))
            free_new.remove(new)
            del by_inode[hashed[new][1].inode]
        else:
            free_old.append(old)
    by_hash: dict[str, list[str]] = {}
    for rel in free_new:
        by_hash.setdefault(hashed[rel][0], []).append(rel)
    for old in free_old:
        candidates = by_hash.get(index[old][1])
        if candidates and index[old][2]:  # never pair empty files by hash
            pairs.append((old, candidates.pop(0)))
    return pairs


def scan(
    root: Path,
    journal: Journal,
    ignore: IgnoreRules,
    *,
    progress: Progress | None = None,
) -> ScanReport:
    """Detect and journal local changes in one transaction.

    The scan's start time is recorded with what it journals, so the next
    scan knows which of those stamps are racy (taken within a tick of it).
    A scan that journals nothing writes nothing, not even its time: every
    stamp in the journal then predates the recorded time, which stays the
    right reference for them (an older one could only widen the racy set),
    and a no-op status or sync is spared a write transaction and its fsync.
    A racy file is always hashed and restamped, so a scan that finds one
    does write.
    """
    started_ns = time.time_ns()
    ignore.refresh()
    try:
        changes, restamps, report = detect(root, journal, ignore, progress=progress, ahead=early.take(os.fspath(root)))
        if changes or restamps:
            with journal.writing():
                journal.record_local(changes, restamps)  # carries the stamps copy across (Journal.record_local)
                journal.update_state(last_scan_ns=started_ns)
            _mark_scanned(journal.path, started_ns)
    finally:
        journal.drop_stamps()
    return report


EARLY_MARGIN_NS = 20_000_000  # a file's mtime comes from the kernel's coarse clock: up to a tick (1-10 ms) behind


def walk_ahead(root: str) -> tuple | None:
    """The early walk (:mod:`syncengine.early`), in its child: what :func:`_changed_walk` finds, as plain values.

    It reads only the stamps copy (as Journal.local_stamps does, crc and
    all, but never the journal itself), .syncignore and the tree. It cannot
    read the journal's last scan time, so its racy bound comes from the
    marker :func:`_mark_scanned` leaves, and the scan refuses the walk
    unless that is its own bound (:func:`_early_reject`): a marker out of
    step (left by a scan before a crash, or none by an older syncengine)
    only costs the walk. None, no walk, without a marker: a bound guessed
    from the stamps (RACY_NS before the newest one, say) takes a whole tree
    written in one burst for racy, and sent it all (50k no-op +110 ms);
    none either without a valid copy (the scan reads the rows, and writes
    the copy for the next process) or when the ignore rules need
    pathspec's ordered answer.
    """
    started_ns = time.time_ns()  # before anything is read: "no commit since" is checked against it
    failpoint("early.walk")  # a test's way to kill the child
    ignore = IgnoreRules(Path(root))
    pattern = ignore.pattern()
    if pattern is None:
        return None
    try:
        with open(os.path.join(root, STATE_DIR, early.STAMPS_COPY), "rb") as fh:
            raw = fh.read()
        if int.from_bytes(raw[:4], "little") != zlib.crc32(memoryview(raw)[4:]):
            return None
        token, stamps = marshal.loads(memoryview(raw)[4:])
    except (OSError, EOFError, ValueError, TypeError):
        return None
    if type(token) is not str or type(stamps) is not dict:
        return None
    try:
        racy_after = os.stat(os.path.join(root, STATE_DIR, early.SCANNED)).st_mtime_ns - RACY_NS
    except OSError:
        return None  # a journal no scan of this version has written to yet: its next writing scan leaves one
    problems: list[ScanProblem] = []
    unreadable: list[str] = []
    changed, vanished, counted = _changed_walk(Path(root), ignore, stamps, racy_after, problems, unreadable)
    return ("walk-ahead", root, token, started_ns, racy_after, pattern, (changed, list(vanished), counted, len(stamps)),
            [(p.path, p.reason) for p in problems], unreadable, None)


def _taken(ahead: tuple, problems: list[ScanProblem], unreadable_dirs: list[str]
           ) -> tuple[dict[str, Stamp | None], set[str], int, int]:
    """The early walk as :func:`_changed_walk`'s answer, and the known files' count."""
    changed, vanished, counted, known = ahead[6]
    problems.extend(ScanProblem(path, reason) for path, reason in ahead[7])
    unreadable_dirs.extend(ahead[8])
    return changed, set(vanished), counted, known


def _early_reject(ahead: tuple, root: Path, journal: Journal, ignore: IgnoreRules, racy_after: int) -> str | None:
    """Why the early walk ``ahead`` is not one this scan could have made, or None: then it stands for its walk.

    Called in the read transaction that read ``racy_after``. A walk that
    started earlier than usual is a slow walk: the journal's stamps held
    still from the child's read of the copy to this read (the copy's token
    is the current one, and a token is never drawn twice), so it compared
    with exactly the stamps this scan would have, and a file changed after
    the walk passed it is what any walk misses when a change lands just
    behind it (the next scan sees it). Beyond that: no commit reached the
    journal since the child started (journal.db's and its WAL's mtimes are
    older), so nothing this read sees postdates the walk; no apply set a
    file aside in the trash, nor had one put back, since then (the child
    walks without the scan lock: it may have seen the gap of an apply a
    kill stopped, which opening the journal closed since, and which this
    scan must not read as a deletion); the rules it
    matched with are this scan's, and so is its racy bound.
    """
    _tag, walked, token, started_ns, child_racy, pattern, found, found_problems, found_unreadable, _ = ahead
    if not _well_formed(found, found_problems, found_unreadable) or type(started_ns) is not int \
            or type(child_racy) is not int:
        return "the child's walk is malformed"
    if walked != os.fspath(root):
        return "another root"
    if pattern != ignore.pattern():
        return "the ignore rules changed"
    for path in (journal.path, journal.path.with_name(journal.path.name + "-wal")):
        try:
            st = os.stat(path)
        except FileNotFoundError:
            continue
        except OSError:
            return "cannot stat the journal"
        if (st.st_size or path == journal.path) and st.st_mtime_ns >= started_ns - EARLY_MARGIN_NS:
            return "the journal was written since the child started"
    if _set_aside_since(root, started_ns):
        return "an apply set files aside or had them put back since the child started"
    if child_racy != racy_after:
        return "its racy bound is not the scan's"
    current = next(journal.execute("SELECT stamps_token FROM sync_state WHERE id = 1"), (None,))[0]
    if current is None or current != token:
        return "the journal's stamps changed since the child read them"
    return None


def _well_formed(found: object, problems: object, unreadable: object) -> bool:
    """Whether the child's walk has the shape :func:`walk_ahead` gives (marshal keeps types, so a check is cheap)."""
    if type(found) is not tuple or len(found) != 4 or type(problems) is not list or type(unreadable) is not list:
        return False
    changed, vanished, counted, known = found
    return (type(changed) is dict and type(vanished) is list and type(counted) is int and type(known) is int
            and all(stamp is None or (type(stamp) is tuple and len(stamp) == 5) for stamp in changed.values())
            and all(type(p) is tuple and len(p) == 2 for p in problems))


def _mark_scanned(journal_path: Path, started_ns: int) -> None:
    """Leave the scan time just committed as a marker's mtime, for the early walk's racy bound (walk_ahead).

    A hint, never trusted: the scan that takes the walk checks the bound
    against the journal's own time. Set after the commit, so it is never
    ahead of the journal's unless a later scan's commit is between the two
    (then the walk is refused); a failure to set it is ignored.
    """
    marker = journal_path.with_name(early.SCANNED)
    try:
        os.utime(marker, ns=(started_ns, started_ns))
    except FileNotFoundError:
        with contextlib.suppress(OSError):
            os.close(os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644))
            os.utime(marker, ns=(started_ns, started_ns))
    except OSError:
        pass


def _set_aside_since(root: Path, started_ns: int) -> bool:
    """Whether the trash (fsops.trash_dir) holds anything, or changed since ``started_ns``: an apply's gap."""
    try:
        with os.scandir(trash_dir(root)) as entries:
            if next(entries, None) is not None:
                return True
        return os.stat(trash_dir(root)).st_mtime_ns >= started_ns - EARLY_MARGIN_NS
    except FileNotFoundError:
        return False
    except OSError:
        return True
