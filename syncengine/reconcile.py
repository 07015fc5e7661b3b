"""reconcile(base, local, remote) -> Action: every sync decision, as a pure function.

Written from the decision table in docs/sync-rules.md (and its twin, the
parametrized test in tests/test_reconcile.py). A document has three states:

* base   — what both sides last agreed (``None``: no base — never synced, or
           the journal was lost; a Version with ``hash=None``: agreed deleted);
* local  — the file here (``None``: absent);
* remote — what the server said (``None``: the server does not know it; a
           Version with ``hash=None``: deleted on the server).

"Changed" means "differs from base". Only what changed on one side travels;
where both changed, the attributes are merged three-way — path, content and
executable bit separately — so a rename on one side and an edit on the other
combine, and only content changed on both sides is a real conflict. Without a
base nothing is ever deleted (Unison's conservative rule): an absence is
ambiguous, so the present side wins.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from syncengine.journal import DocRow


@dataclass(frozen=True, slots=True)
class Version:
    """One state of a document; ``hash=None`` means deleted (path is where it was)."""

    path: str
    hash: str | None
    executable: bool = False

    @property
    def present(self) -> bool:
        return self.hash is not None


class Do(enum.StrEnum):
    NOTHING = "nothing"  # in step
    PUSH = "push"  # send the local state (create, modify, move, delete)
    PULL = "pull"  # make the local file what the server has
    ADOPT = "adopt"  # both sides already agree: record it as the new base
    FORGET = "forget"  # gone here, unknown to the server: drop the record
    MERGE = "merge"  # both changed: converge on a target, then push it


# What the apply stack does on this side; the rest (PUSH, NOTHING) is the push's or no one's.
LOCAL_WORK = frozenset({Do.PULL, Do.ADOPT, Do.FORGET, Do.MERGE})


class ConflictKind(enum.StrEnum):
    BOTH_MODIFIED = "both-modified"
    MODIFIED_DELETED = "modified-deleted"  # modified here, deleted on the server
    DELETED_MODIFIED = "deleted-modified"  # deleted here, modified on the server
    BOTH_CREATED = "both-created"
    MOVED_MODIFIED = "moved-modified"  # a move on one side, an edit on the other (combines)
    BOTH_MOVED = "both-moved"  # moved to two different places


@dataclass(frozen=True, slots=True)
class Action:
    """reconcile()'s decision for one document: what to do, the conflict kind if any, and a merge's settled parts."""

    do: Do
    conflict: ConflictKind | None = None
    # For MERGE: the attributes already decided by three-way merging; a None
    # hash with content_conflict=True means "content changed on both sides:
    # ask the strategy".
    path: str | None = None
    hash: str | None = None
    executable: bool = False
    content_conflict: bool = False
    deleted: bool = False  # MERGE towards "absent" (both deleted cases end as ADOPT instead)
    rule: str = ""  # the decision-table row, for --dry-run and tests


def _same(a: Version | None, b: Version | None) -> bool:
    """Equal as far as syncing is concerned: absent equals absent, wherever it was."""
    a_present = a is not None and a.present
    b_present = b is not None and b.present
    if not a_present or not b_present:
        return a_present == b_present
    assert a is not None and b is not None
    return (a.path, a.hash, a.executable) == (b.path, b.hash, b.executable)


def _three_way(base, local, remote):
    """The merged value of one attribute, or a sentinel when both changed it differently."""
    if local == remote:
        return local
    if local == base:
        return remote
    if remote == base:
        return local
    return _CONFLICT


_CONFLICT = object()


def reconcile(base: Version | None, local: Version | None, remote: Version | None) -> Action:
    """Decide what one sync round does with one document (docs/sync-rules.md, row by row)."""
    if base is None:
        return _no_base(local, remote)
    tag = "B" if base.present else "D"  # rule ids of docs/sync-rules.md: base present, or agreed deleted
    local_present = local is not None and local.present
    local_changed = not _same(local, base)
    if remote is None:
        # The server does not know a document we synced: it was reset or
        # restored from a backup. Re-upload; never read it as a deletion.
        if local_present:
            return Action(Do.PUSH, rule=f"{tag}1 the server lost it: upload again")
        return Action(Do.FORGET, rule=f"{tag}2 gone here, unknown to the server")

    remote_changed = not _same(remote, base)
    if not local_changed and not remote_changed:
        return Action(Do.NOTHING, rule=f"{tag}3 unchanged on both sides")
    if local_changed and not remote_changed:
        return Action(Do.PUSH, rule=f"{tag}4 changed here only")
    if remote_changed and not local_changed:
        return Action(Do.PULL, rule=f"{tag}5 changed on the server only")
    if _same(local, remote):
        return Action(Do.ADOPT, rule=f"{tag}6 the same change on both sides")
    if not local_present:
        # A modification never loses to a deletion: the server's version comes back.
        return Action(Do.PULL, ConflictKind.DELETED_MODIFIED, rule="B7 deleted here, changed on the server")
    assert local is not None
    if not remote.present:
        return Action(Do.MERGE, ConflictKind.MODIFIED_DELETED, path=local.path, hash=local.hash,
                      executable=local.executable, rule="B8 changed here, deleted on the server: keep it")
    if not base.present:
        # Agreed deleted, then created again on both sides: no common ancestor.
        return _merge(None, local, remote, ConflictKind.BOTH_CREATED, "D7 re-created differently on both sides")
    return _merge(base, local, remote, None, "B9 changed on both sides")


# N4 as one value: a first sync decides it for every file, and a frozen Action can be shared.
FIRST_PUSH = Action(Do.PUSH, rule="N4 no base, only here: create on the server")


def _no_base(local: Version | None, remote: Version | None) -> Action:
    """Never synced, or the journal was lost: an absence is ambiguous, so nothing is deleted."""
    local_present = local is not None and local.present
    remote_present = remote is not None and remote.present
    if not local_present:
        if remote_present:
            return Action(Do.PULL, rule="N3 no base, only on the server: download")
        if remote is not None:
            return Action(Do.ADOPT, rule="N2 no base, absent here, deleted on the server: agreed absent")
        return Action(Do.NOTHING, rule="N1 no base, absent on both sides")
    assert local is not None
    if remote is None:
        return FIRST_PUSH
    if not remote_present:
        # Without a base we cannot tell "deleted there after we had it" from
        # "created here": keep the file and push it back on top of the deletion.
        return Action(Do.MERGE, ConflictKind.MODIFIED_DELETED, path=local.path, hash=local.hash,
                      executable=local.executable, rule="N5 no base, here but deleted on the server: keep it")
    if _same(local, remote):
        return Action(Do.ADOPT, rule="N6 no base, identical on both sides")
    return _merge(None, local, remote, ConflictKind.BOTH_CREATED, "N7 no base, different on both sides")


def _merge(base: Version | None, local: Version, remote: Version, kind: ConflictKind | None,
           rule: str) -> Action:
    """Merge path, content and executable bit separately; only content can truly conflict."""
    b_path = base.path if base else None
    b_hash = base.hash if base else None
    b_exec = base.executable if base else None
    path = _three_way(b_path, local.path, remote.path)
    content = _three_way(b_hash, local.hash, remote.hash)
    executable = _three_way(b_exec, local.executable, remote.executable)
    if executable is _CONFLICT:
        executable = local.executable or remote.executable  # an executable bit is kept
    if path is _CONFLICT:
        # Moved to two places: the server's place wins (it was there first);
        # the content still merges.
        path = remote.path
        kind = kind or ConflictKind.BOTH_MOVED
    content_conflict = content is _CONFLICT
    if kind is None:
        kind = ConflictKind.BOTH_MODIFIED if content_conflict else ConflictKind.MOVED_MODIFIED
    return Action(Do.MERGE, kind, path=path, hash=None if content_conflict else content,
                  executable=bool(executable), content_conflict=content_conflict, rule=rule)


def versions(row: DocRow) -> tuple[Version | None, Version | None, Version | None]:
    """The (base, local, remote) of a journal row, as reconcile sees them.

    Here, beside Version, rather than with the apply stack: a round that
    only pushes plans every changed row and never loads that stack.
    """
    base = None if row.base_rev is None else Version(row.base_path or row.path or "", row.base_hash,
                                                     bool((row.base_mode or 0) & 0o100))
    local = None if row.path is None else Version(row.path, row.hash, bool((row.mode or 0) & 0o100))
    remote = None if row.remote_rev is None else Version(row.remote_path or "", row.remote_hash,
                                                         bool((row.remote_mode or 0) & 0o100))
    return base, local, remote
