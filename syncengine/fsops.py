"""All file-system work on user files, and the one place OSError becomes ours.

Writes are atomic: a temp file in the target's folder, fsync, then a rename
(a batch of downloads is staged first and made durable with one write-back:
:func:`stage_temp`, :mod:`syncengine.staging`).
Before a file is replaced or deleted it is moved aside into
``.syncengine/trash`` and checked against the bytes we expect; if a user edit
landed in the meantime it is put back and the caller hears
:class:`ChangedUnderfoot` — a conflict, never a loss (RELIABILITY C8).

Two test hooks live here because tests run as root, where chmod proves
nothing:

* failpoints: ``SYNCENGINE_FAILPOINT=name[:N][,name...]`` kills the process
  with SIGKILL the Nth time (default 1st) ``failpoint(name)`` is reached
  (:mod:`syncengine.failpoints`, shared with the server);
* faults: ``SYNCENGINE_FSFAULT=op:N:ERRNO`` makes the Nth operation of kind
  ``op`` (read, write, replace, delete, mkdir, list; store for the blob store; sync for a batch's
  write-back; any) fail with that errno.
"""

from __future__ import annotations

import contextlib
import errno as errno_mod
import hashlib
import os
import stat as stat_mod
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from syncengine.errors import DocumentError, FileSystemError, UnsafePath
from syncengine.failpoints import _env, failpoint  # failpoint: re-exported, the client's steps import it from here
from syncengine.paths import STATE_DIR, check_path

CHUNK = 1 << 20
TEMP_PREFIX = ".syncengine."
TEMP_SUFFIX = ".tmp"


class ChangedUnderfoot(DocumentError):
    """The file on disk is not the version we were about to replace."""

    title = "Changed during apply"


@dataclass(frozen=True, slots=True)
class FileStat:
    """What we compare to decide whether a file changed without reading it."""

    size: int
    mtime_ns: int
    ctime_ns: int
    inode: int
    mode: int  # permission bits only; the executable bit is what we sync

    @classmethod
    def of(cls, st: os.stat_result) -> FileStat:
        return cls(st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, stat_mod.S_IMODE(st.st_mode))

    @property
    def executable(self) -> bool:
        return bool(self.mode & 0o100)

    def same_content_stamp(self, other: FileStat | None) -> bool:
        """Own-write and unchanged-file check: size, mtime and inode."""
        return other is not None and (self.size, self.mtime_ns, self.inode) == (
            other.size,
            other.mtime_ns,
            other.inode,
        )


# ---------------------------------------------------------------- test hooks

_fault_counts: dict[str, int] = {}
_fault_override: list[tuple[str, int, int]] = []


@contextlib.contextmanager
def inject_fault(op: str, nth: int, err: int) -> Iterator[None]:
    """In-process twin of SYNCENGINE_FSFAULT, for tests that call the API."""
    _fault_override.append((op, nth, err))
    _fault_counts.clear()
    try:
        yield
    finally:
        _fault_override.remove((op, nth, err))
        _fault_counts.clear()


def _faults() -> list[tuple[str, int, int]]:
    faults = list(_fault_override)
    spec = _env("SYNCENGINE_FSFAULT")
    if spec:
        for item in spec.split(","):
            op, nth, name = item.split(":")
            faults.append((op, int(nth), getattr(errno_mod, name)))
    return faults


def faults_armed() -> bool:
    """Whether a test asked an operation to fail: its Nth-call counts are this process's own."""
    return bool(_faults())


def check_fault(op: str, path: os.PathLike | str) -> None:
    """Raise the injected OSError if this is the operation a test asked to fail."""
    _maybe_fault(op, path)


def _maybe_fault(op: str, path: os.PathLike | str) -> None:
    faults = _faults()
    if not faults:
        return
    for key in (op, "any"):
        _fault_counts[key] = _fault_counts.get(key, 0) + 1
    for fop, nth, err in faults:
        # Only the operation being counted can fail: a "replace" fault that
        # fired once must not fail every later write as well.
        if fop in (op, "any") and _fault_counts.get(fop) == nth:
            raise OSError(err, os.strerror(err), os.fspath(path))


# ---------------------------------------------------------------- errors

_TITLES = {
    errno_mod.EACCES: "Permission denied",
    errno_mod.EPERM: "Permission denied",
    errno_mod.ENOSPC: "Disk full",
    errno_mod.EDQUOT: "Disk quota exceeded",
    errno_mod.EROFS: "Read-only file system",
    errno_mod.ENAMETOOLONG: "Name too long",
    errno_mod.EIO: "I/O error",
}


def os_error(exc: OSError, rel: str | None = None) -> FileSystemError:
    """Translate an OSError into our error with a title a person understands."""
    title = _TITLES.get(exc.errno or 0, "File system error")
    where = rel or exc.filename or ""
    return FileSystemError(f"{exc.strerror or exc} ({where})", title=title, paths=[str(where)])


@contextlib.contextmanager
def mapped(rel: str | None = None) -> Iterator[None]:
    """Run a block, turning any OSError into FileSystemError."""
    try:
        yield
    except OSError as exc:
        raise os_error(exc, rel) from exc


# ---------------------------------------------------------------- reading

def lstat(path: Path) -> FileStat | None:
    """Stat without following links; None when absent or not a regular file."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    if not stat_mod.S_ISREG(st.st_mode):
        return None
    return FileStat.of(st)


def _open_nofollow(path: Path) -> int:
    _maybe_fault("read", path)
    return os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))


def iter_file(path: Path) -> Iterator[bytes]:
    """Stream a regular file's bytes without following a symlink."""
    fd = _open_nofollow(path)
    with os.fdopen(fd, "rb") as fh:
        while chunk := fh.read(CHUNK):
            yield chunk


def hash_file(path: Path, retries: int = 3) -> tuple[str, FileStat]:
    """sha256 of a file, with a stat that provably belongs to those bytes."""
    digest, stat, _head = hash_with_head(path, retries)
    return digest, stat


def hash_with_head(path: Path, retries: int = 3, head_size: int = 8192) -> tuple[str, FileStat, bytes]:
    """sha256, stat and first bytes of a file (the head tells text from binary).

    The file is stat'ed before and after reading (on the open descriptor);
    if it moved in between, somebody was writing it, so read again (D9).
    """
    # Straight into this thread's buffer, no file object: a first scan hashes
    # every file, and a buffered reader plus a fresh 1 MiB read per file were
    # a quarter of it (10,000 small files: ~200 -> ~150 ms).
    buf = _read_buffer()
    view = memoryview(buf)
    for _attempt in range(retries):
        fd = _open_nofollow(path)
        try:
            st = os.fstat(fd)
            if not stat_mod.S_ISREG(st.st_mode):
                raise IsADirectoryError(errno_mod.EISDIR, "not a regular file", str(path))
            before = FileStat.of(st)
            digest = hashlib.sha256()
            head = b""
            # Reading stops at the size fstat gave, without the read that would
            # return 0 (one syscall per file of a first scan); a file that grew
            # meanwhile fails the stat comparison below. A size of 0 (procfs and
            # the like) reads to the end.
            left = st.st_size
            while n := os.readv(fd, [buf]):
                if len(head) < head_size:
                    head += bytes(view[:min(n, head_size - len(head))])
                digest.update(view[:n])
                left -= n
                if left == 0:
                    break
            after = FileStat.of(os.fstat(fd))
        finally:
            os.close(fd)
        if before == after:
            return digest.hexdigest(), after, head
    raise OSError(errno_mod.EBUSY, "file kept changing while it was read", str(path))


_buffers = threading.local()


def _read_buffer() -> bytearray:
    buf = getattr(_buffers, "buf", None)
    if buf is None:
        buf = _buffers.buf = bytearray(CHUNK)
    return buf


def read_bytes(path: Path) -> tuple[bytes, FileStat]:
    """Whole-file read (documents are small) with the same stability check."""
    for _attempt in range(3):
        fd = _open_nofollow(path)
        with os.fdopen(fd, "rb") as fh:
            before = FileStat.of(os.fstat(fh.fileno()))
            data = fh.read()
            after = FileStat.of(os.fstat(fh.fileno()))
        if before == after:
            return data, after
    raise OSError(errno_mod.EBUSY, "file kept changing while it was read", str(path))


def read_hashed(path: str | Path, size: int | None, digest: str | None) -> bytes:
    """A file's bytes, provided they are still the version that hashed to ``digest`` (else ChangedUnderfoot).

    The hash is the stability check, so no stat is needed around the read:
    bytes that hash to the scanned digest are that version, whatever
    happened to the file meanwhile. A push reads every document it sends
    this way from two threads, where each GIL-releasing call can wait long
    for the GIL (the convoy in docs/performance.md): open, one read of
    ``size + 1`` bytes (a file that grew shows it) and close, instead of a
    file object and two fstats (10,000 documents: 8 -> 3 syscalls each).
    ``O_NONBLOCK`` keeps a FIFO put in the file's place from blocking the open.
    An unknown size reads the file whole, as :func:`read_bytes`.
    """
    if size is None:
        data, _st = read_bytes(Path(path))
    else:
        _maybe_fault("read", path)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
        try:
            data = os.read(fd, size + 1)
            while 0 < len(data) < size:  # a short read (rare): go on to the size or the end
                more = os.read(fd, size + 1 - len(data))
                if not more:
                    break
                data += more
        finally:
            os.close(fd)
    if digest is None or (size is not None and len(data) != size) or sha256(data) != digest:
        raise ChangedUnderfoot("changed since the scan; it will go next round", paths=[str(path)])
    return data


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------- writing

def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dirs(dirs: Iterable[Path]) -> None:
    """Make renames durable: fsync each folder once, after a batch of writes."""
    for d in sorted(set(dirs)):
        with contextlib.suppress(FileNotFoundError):
            _fsync_dir(d)


def ensure_parent(root: Path, rel: str) -> Path:
    """Create the folders leading to ``rel``, refusing to pass through a symlink.

    Checking every component with lstat is what keeps a server answer (or a
    link planted in the workspace) from steering a write outside the root.
    """
    check_path(rel)
    current = root
    for part in rel.split("/")[:-1]:
        current = current / part
        try:
            st = os.lstat(current)
        except FileNotFoundError:
            _maybe_fault("mkdir", current)
            try:
                os.mkdir(current)
            except FileExistsError:
                pass
            st = os.lstat(current)
        if stat_mod.S_ISLNK(st.st_mode) or not stat_mod.S_ISDIR(st.st_mode):
            raise UnsafePath("a parent folder is a symlink or a file", paths=[rel])
    return current


def _temp_path(folder: Path, name: str) -> Path:
    # os.urandom(n).hex() is secrets.token_hex(n); secrets would load random, hmac and base64 (~1.5 ms) into
    # every `status`, which loads this module and needs none of them.
    return folder / f"{TEMP_PREFIX}{name[:40]}.{os.urandom(4).hex()}{TEMP_SUFFIX}"


def is_temp_name(name: str) -> bool:
    return name.startswith(TEMP_PREFIX) and name.endswith(TEMP_SUFFIX)


def _write_temp(folder: Path, name: str, chunks: Iterable[bytes], mode: int | None, *, durable: bool = True) -> Path:
    tmp = _temp_path(folder, name)
    _maybe_fault("write", tmp)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o644)
    try:
        with os.fdopen(fd, "wb") as fh:
            for chunk in chunks:
                _maybe_fault("write", tmp)
                fh.write(chunk)
            fh.flush()
            if mode is not None:
                os.fchmod(fh.fileno(), mode)
            if durable:
                os.fsync(fh.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return tmp


def trash_dir(root: Path) -> Path:
    return root / STATE_DIR / "trash"


def _set_aside(root: Path, target: Path, rel: str, expect_hash: str) -> Path:
    """Move ``target`` into the trash and check it holds ``expect_hash``.

    The rename is atomic, so once the file is aside no late editor write can
    reach it under its real name; if its bytes are not the ones we expect,
    it goes back and the caller gets ChangedUnderfoot. The aside copy keeps
    its relative path (``trash/<token>/<rel>``) so that :func:`recover_trash`
    can put it back if we are killed before the new file is in place.
    """
    aside = trash_dir(root) / os.urandom(8).hex() / rel
    os.makedirs(aside.parent, exist_ok=True)
    _maybe_fault("replace", target)
    try:
        os.replace(target, aside)
    except FileNotFoundError:
        raise ChangedUnderfoot("the file vanished before it could be replaced", paths=[rel])
    try:
        actual, _ = hash_file(aside)
    except OSError:
        actual = None  # a symlink or folder sits there: never ours to replace
    if actual != expect_hash:
        _put_back(root, aside, target)
        raise ChangedUnderfoot("the file changed on disk while a remote version was applied", paths=[rel])
    return aside


def _put_back(root: Path, aside: Path, target: Path) -> None:
    """Return an aside file to its path; if the path is taken, keep it beside."""
    try:
        os.rename(aside, target) if not os.path.lexists(target) else _keep_beside(aside, target)
    finally:
        _drop_aside(root, aside)


def _keep_beside(aside: Path, target: Path) -> None:
    # Something new appeared at the path while ours was aside: both are user
    # data, so the aside one gets a visible name next to it (and is synced).
    stem, dot, ext = target.name.partition(".")
    beside = target.with_name(f"{stem}.recovered-{os.urandom(4).hex()}{dot}{ext}")
    os.rename(aside, beside)


def _drop_aside(root: Path, aside: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(aside)
    token_dir = trash_dir(root) / aside.relative_to(trash_dir(root)).parts[0]
    for folder in [*aside.parents]:
        if folder == token_dir.parent:
            break
        with contextlib.suppress(OSError):
            os.rmdir(folder)


def recover_trash(root: Path) -> int:
    """Finish what a killed apply left in the trash; returns files put back.

    An aside file whose path is free again is the old version of an apply
    that never completed: it goes back. One whose path is occupied was
    already replaced by the new version and is dropped. Run before any scan,
    or the scanner would read the gap as a deletion.
    """
    base = trash_dir(root)
    if not base.is_dir():
        return 0
    restored = 0
    for token_dir in base.iterdir():
        for dirpath, _dirs, files in os.walk(token_dir):
            for name in files:
                aside = Path(dirpath) / name
                rel = aside.relative_to(token_dir).as_posix()
                target = root / rel
                if os.path.lexists(target):
                    os.unlink(aside)
                else:
                    ensure_parent(root, rel)
                    os.rename(aside, target)
                    restored += 1
        import shutil  # not at import: it loads bz2, lzma and zlib (~2 ms of a `status`), for a rare recovery

        with contextlib.suppress(OSError):
            shutil.rmtree(token_dir)
    return restored


def stage_temp(root: Path, rel: str, chunks: Iterable[bytes], mode: int | None) -> Path:
    """Write the temp file ``write_atomic`` will place at ``rel``, without its fsync.

    The caller stages a batch, makes it durable at once
    (:class:`syncengine.durable.Batch`), then hands each temp file to
    :func:`write_atomic` as ``staged``; it removes those it does not use.
    """
    with mapped(rel):
        folder = ensure_parent(root, rel)
        return _write_temp(folder, (root / rel).name, chunks, mode, durable=False)


def write_atomic(
    root: Path,
    rel: str,
    chunks: Iterable[bytes],
    *,
    expect_hash: str | None,
    mode: int | None = None,
    dirty_dirs: set[Path] | None = None,
    staged: Path | None = None,
) -> FileStat:
    """Put new bytes at ``rel`` only if the file there is the one we expect.

    ``expect_hash=None`` means "the path must be free": the new file is
    linked into place, which fails instead of clobbering a file that
    appeared meanwhile. Pass ``dirty_dirs`` to batch the folder fsyncs, and
    ``staged`` (from :func:`stage_temp`, already durable) for a temp file
    holding the bytes, in place of ``chunks``.
    Returns the stat of the written file, for own-write suppression.
    """
    with mapped(rel):
        try:
            folder = ensure_parent(root, rel)
        except BaseException:
            if staged is not None:
                with contextlib.suppress(OSError):
                    os.unlink(staged)
            raise
        target = root / rel
        tmp = staged if staged is not None else _write_temp(folder, target.name, chunks, mode)
        try:
            failpoint("apply.after_temp")
            if expect_hash is None:
                _maybe_fault("replace", target)
                try:
                    os.link(tmp, target)
                except FileExistsError:
                    raise ChangedUnderfoot("a file appeared at the path", paths=[rel])
                os.unlink(tmp)
            else:
                aside = _set_aside(root, target, rel, expect_hash)
                failpoint("apply.after_aside")
                os.replace(tmp, target)
                _drop_aside(root, aside)
            failpoint("apply.after_rename")
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        if dirty_dirs is None:
            _fsync_dir(folder)
        else:
            dirty_dirs.add(folder)
        result = lstat(target)
        assert result is not None
        return result


def delete_safe(root: Path, rel: str, *, expect_hash: str, dirty_dirs: set[Path] | None = None) -> None:
    """Delete ``rel`` only if it still holds ``expect_hash``; absent is fine."""
    with mapped(rel):
        target = root / rel
        check_path(rel)
        if not os.path.lexists(target):
            return
        _maybe_fault("delete", target)
        aside = _set_aside(root, target, rel, expect_hash)
        failpoint("apply.after_aside")
        _drop_aside(root, aside)
        failpoint("apply.after_delete")
        if dirty_dirs is None:
            _fsync_dir(target.parent)
        else:
            dirty_dirs.add(target.parent)
        prune_empty_dirs(root, rel)


def move_safe(root: Path, old: str, new: str, *, expect_hash: str) -> FileStat:
    """Rename a file within the workspace if it holds ``expect_hash`` and ``new`` is free."""
    with mapped(new):
        src = root / old
        check_path(old)
        folder = ensure_parent(root, new)
        dst = root / new
        try:
            actual, _ = hash_file(src)
        except FileNotFoundError:
            raise ChangedUnderfoot("the file to move is gone", paths=[old])
        if actual != expect_hash:
            raise ChangedUnderfoot("the file to move changed", paths=[old])
        _maybe_fault("replace", dst)
        try:
            os.link(src, dst)
        except FileExistsError:
            raise ChangedUnderfoot("the destination of a move is taken", paths=[new])
        os.unlink(src)
        _fsync_dir(folder)
        if src.parent != folder:
            _fsync_dir(src.parent)
        prune_empty_dirs(root, old)
        result = lstat(dst)
        assert result is not None
        return result


def set_mode(root: Path, rel: str, mode: int) -> None:
    with mapped(rel):
        os.chmod(root / check_path(rel), mode, follow_symlinks=False)


def prune_empty_dirs(root: Path, rel: str) -> None:
    """Remove folders left empty by a delete or move, up to (not including) the root."""
    parts = rel.split("/")[:-1]
    while parts:
        folder = root.joinpath(*parts)
        try:
            os.rmdir(folder)
        except OSError:
            return
        parts.pop()


def clean_temp_files(root: Path, folders: Iterable[Path] | None = None) -> int:
    """Remove temp files a killed process left behind; returns how many."""
    removed = 0
    for dirpath, dirnames, filenames in os.walk(root) if folders is None else ((f, [], os.listdir(f)) for f in folders):
        if Path(dirpath) == root:
            dirnames[:] = [d for d in dirnames if d != STATE_DIR]
        for name in filenames:
            if is_temp_name(name):
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(dirpath, name))
                    removed += 1
    return removed


def write_config_file(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Atomically replace one of the engine's own files (config, token, pid)."""
    with mapped(str(path)):
        tmp = _write_temp(path.parent, path.name, [data], mode)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
