"""The wire protocol between replicas and the sync server (docs/protocol.md).

Shared by the client (:mod:`syncengine.remote`) and the server
(:mod:`syncengine.server`), and importable without either: no HTTP library,
no web framework. It holds the version, the limits both sides agree on, the
message dataclasses with strict ``from_dict`` validators, the op id recipe
and the binary framing of blob packs. The messages that move content
(listings, commits, packs, manifests), the health check and the error body
are defined in :mod:`syncengine.exchange` and named here too, loaded on
first use: a no-op round needs only a page of changes.

Validators reject rather than repair: a field with the wrong type, a hash
that is not 64 lowercase hex digits, a missing key — each raises
:class:`ProtocolError` naming the field. Unknown keys are ignored, so a newer
peer may add fields without breaking an older one.
"""

from __future__ import annotations

import hashlib
import json
import re
import zlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from syncengine.errors import UnsafePath
from syncengine.lazy import forwarding
from syncengine.paths import MAX_PATH_BYTES as MAX_PATH_BYTES  # a limit of the protocol too
from syncengine.paths import check_path

PROTOCOL_VERSION = 1
SUPPORTED_VERSIONS = (1,)
PROTOCOL_HEADER = "X-Syncengine-Protocol"
API_PREFIX = "/v1"

MAX_COMMIT_ITEMS = 100  # items in one commit request
MAX_HASHES = 1000  # hashes in one missing/unpack request
MAX_PAGE = 1000  # changes or docs in one page
DEFAULT_PAGE = 500
CHUNK_SIZE = 1 << 20  # the server stores blobs in rows of at most this many bytes
SMALL_BLOB = 1 << 20  # blobs up to this size travel in packs; larger ones by PUT/GET
MAX_PACK_BYTES = 32 << 20  # sum of blob sizes in one pack, either way
MAX_PACK_HEADER = 1 << 20  # the JSON line that opens a pack
MAX_JSON_BYTES = 16 << 20  # a JSON body, after decompression, either way
GZIP_MIN_BYTES = 1024  # bodies above this are gzip-compressed both ways
PACK_MEDIA_TYPE = "application/x-syncengine-pack"
# Chunk manifests (DESIGN §4): a blob over MANIFEST_THRESHOLD travels as content-defined
# chunks, each a blob of its own (<= SMALL_BLOB, so chunks go in packs). The cut points
# come from FastCDC with exactly these sizes (pyfastcdc pinned in pyproject.toml):
# every replica must cut the same bytes the same way, or nothing dedups.
MANIFEST_THRESHOLD = 4 << 20
CDC_MIN = 256 << 10
CDC_AVG = 512 << 10  # pyfastcdc's parameter; its real mean is about CDC_AVG + CDC_MIN / 2
CDC_MAX = SMALL_BLOB
MAX_MANIFEST_CHUNKS = 100_000  # ~25 GiB at worst (all CDC_MIN), ~60 GiB typical; bigger goes whole

_HASH = re.compile(r"[0-9a-f]{64}")
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_HASH_MATCH = _HASH.fullmatch
_ID_MATCH = _ID.fullmatch
_WORKSPACE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")

# Error codes the server puts in {"error": code, "message": ...}.
ERROR_CODES = (
    "bad_request",  # malformed JSON, wrong types, over a count limit
    "unsafe_path",  # a commit item's path failed check_path
    "protocol_mismatch",  # missing or unsupported X-Syncengine-Protocol; has "supported"
    "token_in_query",  # credentials in the URL
    "unauthorized",  # no token, unknown token, revoked token
    "not_found",  # no such workspace for this token, no such route
    "blob_not_found",  # GET of a blob this workspace does not hold
    "hash_mismatch",  # uploaded bytes do not hash to the name they were sent under
    "not_a_manifest",  # GET manifests/{h} of a blob stored whole (404): fetch it whole
    "too_large",  # body over the server's cap (413)
    "unsupported_encoding",  # Content-Encoding other than gzip/identity (415)
    "method_not_allowed",
    "internal",  # a bug on the server (500); never for bad input
)


class ProtocolError(ValueError):
    """A message that does not follow the protocol (wrong type, missing field, bad value)."""


# ---------------------------------------------------------------- checkers


def _get(d: Mapping[str, Any], key: str) -> Any:
    # type() first: an ABC isinstance per field was a quarter of a commit's parsing
    if type(d) is not dict and not isinstance(d, Mapping):
        raise ProtocolError(f"expected an object, got {type(d).__name__}")
    if key not in d:
        raise ProtocolError(f"missing field {key!r}")
    return d[key]


def _int(
    d: Mapping[str, Any], key: str, *, null: bool = False, minimum: int | None = 0
) -> int | None:
    value = _get(d, key)
    if value is None and null:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise ProtocolError(f"{key} must be an integer")
    if minimum is not None and value < minimum:
        raise ProtocolError(f"{key} must be >= {minimum}")
    if value >= 1 << 63:
        raise ProtocolError(f"{key} is out of range")
    return value


def _bool(d: Mapping[str, Any], key: str) -> bool:
    value = _get(d, key)
    if not isinstance(value, bool):
        raise ProtocolError(f"{key} must be true or false")
    return value


def _str(d: Mapping[str, Any], key: str, *, null: bool = False, limit: int = 4096) -> str | None:
    value = _get(d, key)
    if value is None and null:
        return None
    if not isinstance(value, str):
        raise ProtocolError(f"{key} must be a string")
    if len(value) > limit:
        raise ProtocolError(f"{key} is too long")
    return value


def check_hash(value: Any, what: str = "hash") -> str:
    """A sha256 in 64 lowercase hex digits, or ProtocolError."""
    if not isinstance(value, str) or not _HASH.fullmatch(value):
        raise ProtocolError(f"{what} must be a sha256 in lowercase hex")
    return value


def check_id(value: Any, what: str = "id") -> str:
    """A doc_id or client_id: 1-128 of [A-Za-z0-9._-], starting alphanumeric."""
    if not isinstance(value, str) or not _ID.fullmatch(value):
        raise ProtocolError(f"{what} must be 1-128 characters of A-Z a-z 0-9 . _ -")
    return value


def check_workspace(value: str) -> str:
    """A workspace name: 1-64 of [A-Za-z0-9._-], starting alphanumeric."""
    if not isinstance(value, str) or not _WORKSPACE.fullmatch(value):
        raise ProtocolError("workspace name must be 1-64 characters of A-Z a-z 0-9 . _ -")
    return value


def wire_path(value: Any, what: str = "path") -> str:
    """A path as the protocol allows it: :func:`syncengine.paths.check_path`, POSIX rules.

    Raises :class:`syncengine.errors.UnsafePath` (not ProtocolError) so callers
    can tell a hostile path from a malformed message.
    """
    if not isinstance(value, str):
        raise ProtocolError(f"{what} must be a string")
    return check_path(value, windows=False)


def _hash_or_null(d: Mapping[str, Any], key: str) -> str | None:
    value = _get(d, key)
    return None if value is None else check_hash(value, key)


def _list(d: Mapping[str, Any], key: str, limit: int) -> list[Any]:
    value = _get(d, key)
    if not isinstance(value, list):
        raise ProtocolError(f"{key} must be a list")
    if len(value) > limit:
        raise ProtocolError(f"{key} has {len(value)} entries; at most {limit} are allowed")
    return value


def hash_list(
    d: Mapping[str, Any], key: str = "hashes", limit: int = MAX_HASHES
) -> tuple[str, ...]:
    """A list of sha256 hex strings under ``key``, at most ``limit`` long."""
    values = _list(d, key, limit)
    for h in values:
        # One test per hash, no message built: a first sync checks 20,000 of them.
        if type(h) is not str or not _HASH_MATCH(h):
            return tuple(check_hash(h, f"{key}[{i}]") for i, h in enumerate(values))
    return tuple(values)


def to_dict(message: Any) -> dict[str, Any]:
    """The JSON-ready form of any message dataclass (client-only fields left out)."""
    names = _FIELD_NAMES.get(type(message))
    if names is None:
        names = _FIELD_NAMES[type(message)] = tuple(f.name for f in fields(message))
    flat: dict[str, Any] = {}
    for name in names:
        value = getattr(message, name)
        if type(value) not in _SCALARS:
            break
        flat[name] = value
    else:
        # Only scalars (a commit item): the dict asdict() would build, without
        # its deep copy, which cost more than the rest of a commit's encoding.
        flat.pop("rejected", None)
        return flat
    out = asdict(message)
    out.pop("rejected", None)
    return _lists(out)


_FIELD_NAMES: dict[type, tuple[str, ...]] = {}
_SCALARS = frozenset({str, int, float, bool, type(None)})


def _lists(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _lists(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_lists(v) for v in value]
    return value


# ---------------------------------------------------------------- messages


@dataclass(frozen=True, slots=True, eq=False)  # a report, never compared whole: no __eq__/__hash__ to create
class RejectedItem:
    """An item of a server answer the client refused (client side only, never on the wire)."""

    doc_id: str | None
    path: str  # repr() of what the server sent, safe to print
    reason: str
    seq: int | None = None


@dataclass(frozen=True, slots=True)
class Change:
    """One entry of a workspace's change log; ``rev`` is the seq that produced it."""

    seq: int
    doc_id: str
    path: str
    old_path: str | None  # set when this change moved the document
    rev: int
    hash: str | None  # None when deleted
    deleted: bool
    executable: bool
    size: int | None  # None when deleted
    op_id: str | None
    client_id: str | None
    received_at: int  # server clock when committed, ns since the epoch

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Change:
        seq = _int(d, "seq", minimum=1)
        deleted = _bool(d, "deleted")
        digest = _hash_or_null(d, "hash")
        if deleted != (digest is None):
            raise ProtocolError("hash must be null exactly when deleted is true")
        old_path = _get(d, "old_path")
        op_id = _get(d, "op_id")
        return cls(
            seq=seq,
            doc_id=check_id(_get(d, "doc_id"), "doc_id"),
            path=wire_path(_get(d, "path")),
            old_path=None if old_path is None else wire_path(old_path, "old_path"),
            rev=_int(d, "rev", minimum=1),
            hash=digest,
            deleted=deleted,
            executable=_bool(d, "executable"),
            size=_int(d, "size", null=True),
            op_id=None if op_id is None else check_hash(op_id, "op_id"),
            client_id=None
            if _get(d, "client_id") is None
            else check_id(d["client_id"], "client_id"),
            received_at=_int(d, "received_at"),
        )


@dataclass(frozen=True, slots=True)
class ChangesPage:
    """``GET /v1/ws/{ws}/changes``: changes after ``since``, in seq order."""

    server_id: str
    min_seq: int  # lowest seq still in the log; a checkpoint below min_seq - 1 needs a full listing
    last_seq: int  # highest seq committed when the page was read
    changes: tuple[Change, ...]
    more: bool  # another page follows
    rejected: tuple[RejectedItem, ...] = field(default=(), compare=False)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, since: int | None = None) -> ChangesPage:
        """Validate a page; changes with unsafe paths are dropped into ``rejected``.

        ``since`` (the request's) lets the client check that seqs are above it
        and strictly increasing: a feed going backwards is a broken server.
        """
        changes: list[Change] = []
        rejected: list[RejectedItem] = []
        last = since if since is not None else 0
        last_seq = _int(d, "last_seq")
        for raw in _list(d, "changes", MAX_PAGE):
            try:
                change = Change.from_dict(raw)
            except UnsafePath as exc:
                rejected.append(_rejected(raw, exc))
                continue
            if change.seq <= last or change.seq > last_seq:
                raise ProtocolError(
                    f"change seq {change.seq} out of order (after {last}, last_seq {last_seq})"
                )
            last = change.seq
            changes.append(change)
        return cls(
            server_id=check_id(_get(d, "server_id"), "server_id"),
            min_seq=_int(d, "min_seq", minimum=1),
            last_seq=last_seq,
            changes=tuple(changes),
            more=_bool(d, "more"),
            rejected=tuple(rejected),
        )


def _rejected(raw: Any, exc: UnsafePath) -> RejectedItem:
    seq = raw.get("seq") if isinstance(raw, Mapping) else None
    doc_id = raw.get("doc_id") if isinstance(raw, Mapping) else None
    path = raw.get("path") if isinstance(raw, Mapping) else None
    return RejectedItem(
        doc_id=doc_id if isinstance(doc_id, str) else None,
        path=repr(path)[:200],
        reason=exc.message,
        seq=seq if isinstance(seq, int) and not isinstance(seq, bool) else None,
    )


def make_op_id(
    client_id: str, doc_id: str, base_rev: int | None, path: str, hash: str | None, executable: bool
) -> str:
    """The op id of a commit item: the same intent from the same client is the same op.

    sha256 of the compact JSON array
    ``[client_id, doc_id, base_rev, path, hash or "deleted", executable]``.
    The executable bit is part of it so that a mode-only change is never
    answered with the stored result of a different one.
    """
    digest = hash if hash is not None else "deleted"
    if type(client_id) is str and type(doc_id) is str and type(path) is str and type(digest) is str and (
        base_rev is None or type(base_rev) is int
    ):
        # The bytes the encoder below writes, assembled without it: its list
        # encoding cost as much as the rest of a commit item's checks.
        canon = (
            f"[{_json_str(client_id)},{_json_str(doc_id)},{'null' if base_rev is None else int.__repr__(base_rev)},"
            f"{_json_str(path)},{_json_str(digest)},{'true' if executable else 'false'}]"
        )
    else:
        canon = _compact_json([client_id, doc_id, base_rev, path, digest, bool(executable)])
    return hashlib.sha256(canon.encode("utf-8")).hexdigest()


# json.dumps with these options builds a new encoder per call; the server checks 100 op ids per commit
_compact_json = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
_json_str = json.encoder.encode_basestring  # how that encoder writes a str (ensure_ascii=False)


# ---------------------------------------------------------------- packs


def deflate(data: bytes, level: int = 1) -> bytes:
    """A zlib stream (RFC 1950) of ``data`` with a window and hash table sized to it.

    zlib's defaults (32 KiB window, memLevel 8) make every stream allocate
    about 270 KB, above glibc's mmap threshold: deflating 10,000 documents
    of 1-4 KB from two threads cost 1.5 s of CPU in mmap, page faults and
    munmap against 0.33 s with the window no larger than the blob and
    memLevel 6, for 1% more bytes (bench in docs/performance.md). Any
    inflater reads the result: the stream's header names its window.
    """
    wbits = min(15, max(9, (len(data) - 1).bit_length()))
    packer = zlib.compressobj(level, zlib.DEFLATED, wbits, 6)
    return packer.compress(data) + packer.flush()


def pack_groups(
    sizes: Iterable[tuple[str, int]], limit: int = MAX_PACK_BYTES
) -> Iterator[list[str]]:
    """Split (hash, size) pairs into groups that each fit one pack (≤ limit bytes, ≤ 1000 blobs)."""
    group: list[str] = []
    total = 0
    for digest, size in sizes:
        if group and (total + size > limit or len(group) >= MAX_HASHES):
            yield group
            group, total = [], 0
        group.append(digest)
        total += size
    if group:
        yield group


# Defined in syncengine.exchange (the messages that move content, the health check, the error body);
# `protocol.CommitItem` and `from syncengine.protocol import CommitItem` still work, loading it then.
_EXCHANGE = frozenset({"Health", "ErrorBody", "DocEntry", "DocsPage", "CommitItem", "CommitRequest", "CurrentDoc",
                       "CommitStatus", "CommitResult", "CommitResponse", "HashesRequest", "MissingResponse",
                       "PackResponse", "Manifest", "PackEntry", "PackHeader", "encode_pack_header"})


__getattr__ = forwarding(globals(), dict.fromkeys(_EXCHANGE, "syncengine.exchange"))
