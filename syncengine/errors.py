"""Every error syncengine raises, each carrying the exit code the CLI uses.

This module imports nothing from the package, so any layer (server included)
can raise these without pulling in the rest.

The tree is shallow on purpose: a script only needs the exit code, a person
needs the title and the hint::

    SyncEngineError                 70  internal error (unexpected)
    ├── UsageError                   2  bad flag, bad argument, bad config value
    ├── RemoteError                  3  server unreachable or failing; changes stay queued
    │   ├── ServerUnreachable
    │   ├── ServerFailed             5xx after retries
    │   ├── ProtocolMismatch         the server speaks another protocol version
    │   └── BadServerAnswer          the answer broke the protocol (path escaping the
    │                                workspace, wrong hash, oversized body, bad JSON)
    ├── AuthError                    4  token missing, wrong or revoked
    ├── WorkspaceError               5  not a workspace, or a damaged one
    │   ├── NotAWorkspace
    │   ├── WorkspaceExists
    │   ├── JournalDamaged           names ``syncengine repair``
    │   └── BlobStoreDamaged         objects/small.db unreadable; names ``syncengine repair``
    ├── GuardError                   6  a safety guard stopped the run until --force
    │   ├── MassDeleteGuard
    │   └── RootMissing
    ├── BusyError                    7  another sync holds the workspace lock
    ├── FileSystemError              8  a file could not be read or written (permission,
    │                                disk full); nothing half-written
    └── DocumentError               (per document, recoverable: recorded, the run goes on)
        ├── MalformedDocument        does not parse as its kind
        ├── UnsafePath               a path that would leave the workspace
        └── HashMismatch             bytes whose sha256 is not the one announced

Exit code 1 (done, but conflicts remain) is not an error: commands return it
from their result.
"""

from __future__ import annotations

from collections.abc import Iterable


class SyncEngineError(Exception):
    """Root of the tree. Unexpected failures also end up here (exit 70)."""

    exit_code = 70
    title = "Internal error"

    def __init__(
        self,
        message: str,
        *,
        hint: str | None = None,
        paths: Iterable[str] = (),
        title: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.paths = tuple(paths)
        if title is not None:
            self.title = title

    def one_line(self) -> str:
        """The single line the CLI prints on stderr."""
        line = f"{self.title}: {self.message}"
        if self.hint:
            line += f" ({self.hint})"
        return line

    def to_dict(self) -> dict:
        return {
            "error": type(self).__name__,
            "title": self.title,
            "message": self.message,
            "hint": self.hint,
            "paths": list(self.paths),
            "exit_code": self.exit_code,
        }


class UsageError(SyncEngineError):
    exit_code = 2
    title = "Usage error"


class RemoteError(SyncEngineError):
    exit_code = 3
    title = "Server error"


class ServerUnreachable(RemoteError):
    title = "Server unreachable"


class ServerFailed(RemoteError):
    title = "Server failed"


class ProtocolMismatch(RemoteError):
    title = "Protocol mismatch"


class BadServerAnswer(RemoteError):
    title = "Bad server answer"


class AuthError(SyncEngineError):
    exit_code = 4
    title = "Authentication refused"


class WorkspaceError(SyncEngineError):
    exit_code = 5
    title = "Workspace error"


class NotAWorkspace(WorkspaceError):
    title = "Not a workspace"


class WorkspaceExists(WorkspaceError):
    title = "Workspace exists"


class JournalDamaged(WorkspaceError):
    title = "Journal damaged"

    def __init__(self, message: str, **kwargs) -> None:
        kwargs.setdefault("hint", "run `syncengine repair` to rebuild it from the files")
        super().__init__(message, **kwargs)


class BlobStoreDamaged(WorkspaceError):
    """The table of small blobs (bases, snapshots' contents) does not read as a database."""

    title = "Blob store damaged"

    def __init__(self, message: str, **kwargs) -> None:
        kwargs.setdefault("hint", "run `syncengine repair` to set it aside and store the current files again")
        super().__init__(message, **kwargs)


class GuardError(SyncEngineError):
    exit_code = 6
    title = "Stopped by a safety guard"


class MassDeleteGuard(GuardError):
    title = "Too many deletions"


class RootMissing(GuardError):
    title = "Workspace root missing"


class BusyError(SyncEngineError):
    exit_code = 7
    title = "Busy"


class FileSystemError(SyncEngineError):
    exit_code = 8
    title = "File system error"


class DocumentError(SyncEngineError):
    """A problem with one document: recorded, and the run goes on without it."""

    exit_code = 8
    title = "Document error"


class MalformedDocument(DocumentError):
    title = "Malformed document"


class UnsafePath(DocumentError):
    title = "Unsafe path"


class HashMismatch(DocumentError):
    title = "Hash mismatch"


EXIT_OK = 0
EXIT_CONFLICTS = 1
