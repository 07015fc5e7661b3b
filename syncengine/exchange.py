"""The protocol's messages a no-op round never reads: listings, commits, blob questions, packs, manifests.

Part of the wire protocol (docs/protocol.md), split from
:mod:`syncengine.protocol`, which still names every message
(``protocol.CommitItem`` loads this module on first use). Every
``syncengine`` call is a fresh process and each frozen dataclass costs
~0.5 ms to create (six generated methods, each compiled): a round with
nothing to move (a no-op sync) reads one page of changes and needs none of
these 14, ~7 ms of its start-up; nor the health check (asked only to
compare clocks) or the error body (the server's).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from syncengine.errors import UnsafePath
from syncengine.protocol import (
    _HASH_MATCH,
    _ID_MATCH,
    CDC_MAX,
    MAX_COMMIT_ITEMS,
    MAX_HASHES,
    MAX_MANIFEST_CHUNKS,
    MAX_PACK_BYTES,
    MAX_PAGE,
    MAX_PATH_BYTES,
    SMALL_BLOB,
    SUPPORTED_VERSIONS,
    ProtocolError,
    RejectedItem,
    _bool,
    _get,
    _hash_or_null,
    _int,
    _list,
    _rejected,
    _str,
    check_hash,
    check_id,
    hash_list,
    make_op_id,
    wire_path,
)


@dataclass(frozen=True, slots=True)
class Health:
    """``GET /v1/health``: the server is up; which protocol it speaks; its clock."""

    protocol: int
    server_id: str
    time: int  # server clock, ns since the epoch
    supported: tuple[int, ...] = SUPPORTED_VERSIONS

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Health:
        supported = d.get("supported", [d.get("protocol")]) if isinstance(d, Mapping) else None
        if not isinstance(supported, list) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in supported
        ):
            raise ProtocolError("supported must be a list of integers")
        return cls(
            protocol=_int(d, "protocol"),
            server_id=check_id(_get(d, "server_id"), "server_id"),
            time=_int(d, "time"),
            supported=tuple(supported),
        )


@dataclass(frozen=True, slots=True)
class ErrorBody:
    """Every 4xx/5xx answer: ``{"error": code, "message": text}`` (plus ``supported``)."""

    error: str
    message: str


@dataclass(frozen=True, slots=True)
class DocEntry:
    """One live document in a full listing."""

    doc_id: str
    path: str
    rev: int
    hash: str
    executable: bool
    size: int

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DocEntry:
        return cls(
            doc_id=check_id(_get(d, "doc_id"), "doc_id"),
            path=wire_path(_get(d, "path")),
            rev=_int(d, "rev", minimum=1),
            hash=check_hash(_get(d, "hash")),
            executable=_bool(d, "executable"),
            size=_int(d, "size"),
        )


@dataclass(frozen=True, slots=True)
class DocsPage:
    """``GET /v1/ws/{ws}/docs``: live documents ordered by doc_id, as of ``last_seq``."""

    server_id: str
    last_seq: int
    docs: tuple[DocEntry, ...]
    next: str | None  # pass as ``after`` for the next page; None on the last page
    rejected: tuple[RejectedItem, ...] = field(default=(), compare=False)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DocsPage:
        docs: list[DocEntry] = []
        rejected: list[RejectedItem] = []
        for raw in _list(d, "docs", MAX_PAGE):
            try:
                docs.append(DocEntry.from_dict(raw))
            except UnsafePath as exc:
                rejected.append(_rejected(raw, exc))
        nxt = _get(d, "next")
        return cls(
            server_id=check_id(_get(d, "server_id"), "server_id"),
            last_seq=_int(d, "last_seq"),
            docs=tuple(docs),
            next=None if nxt is None else check_id(nxt, "next"),
            rejected=tuple(rejected),
        )


@dataclass(frozen=True, slots=True)
class CommitItem:
    """One proposed change: compare-and-swap on ``base_rev``; ``hash=None`` deletes."""

    doc_id: str
    path: str
    base_rev: int | None  # None: a new document
    hash: str | None  # None: delete
    executable: bool
    op_id: str

    @classmethod
    def make(
        cls,
        client_id: str,
        doc_id: str,
        path: str,
        base_rev: int | None,
        hash: str | None,
        executable: bool = False,
    ) -> CommitItem:
        """An item with its op id computed by :func:`make_op_id`."""
        return cls(
            doc_id,
            path,
            base_rev,
            hash,
            executable,
            make_op_id(client_id, doc_id, base_rev, path, hash, executable),
        )

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CommitItem:
        """Types only; the path is checked separately (see :func:`wire_path`)."""
        if type(d) is dict:
            # The checks below in one expression, for the common well-formed
            # item; anything it does not accept goes the long way, which says why.
            doc_id, path, base_rev = d.get("doc_id"), d.get("path"), d.get("base_rev", 0)
            digest, executable, op_id = d.get("hash", 0), d.get("executable"), d.get("op_id")
            if (
                type(doc_id) is str
                and _ID_MATCH(doc_id)
                and type(path) is str
                and len(path) <= 4 * MAX_PATH_BYTES
                and (base_rev is None or (type(base_rev) is int and 1 <= base_rev < 1 << 63))
                and (digest is None or (type(digest) is str and _HASH_MATCH(digest)))
                and type(executable) is bool
                and type(op_id) is str
                and _HASH_MATCH(op_id)
            ):
                return cls(doc_id, path, base_rev, digest, executable, op_id)
        return cls(
            doc_id=check_id(_get(d, "doc_id"), "doc_id"),
            path=_str(d, "path", limit=4 * MAX_PATH_BYTES),
            base_rev=_int(d, "base_rev", null=True, minimum=1),
            hash=_hash_or_null(d, "hash"),
            executable=_bool(d, "executable"),
            op_id=check_hash(_get(d, "op_id"), "op_id"),
        )


@dataclass(frozen=True, slots=True)
class CommitRequest:
    """``POST /v1/ws/{ws}/commit``: up to 100 items, applied in order in one transaction."""

    client_id: str
    items: tuple[CommitItem, ...]

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CommitRequest:
        items = []
        for i, raw in enumerate(_list(d, "items", MAX_COMMIT_ITEMS)):
            try:
                items.append(CommitItem.from_dict(raw))
            except ProtocolError as exc:
                raise ProtocolError(f"items[{i}]: {exc}") from None
        return cls(client_id=check_id(_get(d, "client_id"), "client_id"), items=tuple(items))


@dataclass(frozen=True, slots=True)
class CurrentDoc:
    """The server's current state of a document, as a conflict answer shows it."""

    doc_id: str
    rev: int
    path: str
    hash: str | None
    deleted: bool
    executable: bool

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CurrentDoc:
        deleted = _bool(d, "deleted")
        digest = _hash_or_null(d, "hash")
        if deleted != (digest is None):
            raise ProtocolError("hash must be null exactly when deleted is true")
        return cls(
            doc_id=check_id(_get(d, "doc_id"), "doc_id"),
            rev=_int(d, "rev", minimum=1),
            path=wire_path(_get(d, "path")),
            hash=digest,
            deleted=deleted,
            executable=_bool(d, "executable"),
        )


CommitStatus = Literal["ok", "conflict", "rejected"]


@dataclass(frozen=True, slots=True)
class CommitResult:
    """Per item: ``ok`` (rev, seq), ``conflict`` (current) or ``rejected`` (error, message)."""

    status: CommitStatus
    doc_id: str
    rev: int | None = None
    seq: int | None = None
    current: CurrentDoc | None = None
    error: str | None = None
    message: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"status": self.status, "doc_id": self.doc_id}
        if self.status == "ok":
            out.update(rev=self.rev, seq=self.seq)
        elif self.status == "conflict":
            out["current"] = asdict(self.current) if self.current else None
        else:
            out.update(error=self.error, message=self.message)
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CommitResult:
        if type(d) is dict and d.get("status") == "ok":
            # The checks below in one expression, for the common answer (10,000 in a first
            # push); anything it does not accept goes the long way, which says why.
            doc_id, rev, seq = d.get("doc_id"), d.get("rev"), d.get("seq")
            if (
                type(doc_id) is str
                and _ID_MATCH(doc_id)
                and type(rev) is int
                and 1 <= rev < 1 << 63
                and type(seq) is int
                and 1 <= seq < 1 << 63
            ):
                return cls("ok", doc_id, rev, seq)
        status = _get(d, "status")
        doc_id = check_id(_get(d, "doc_id"), "doc_id")
        if status == "ok":
            return cls("ok", doc_id, rev=_int(d, "rev", minimum=1), seq=_int(d, "seq", minimum=1))
        if status == "conflict":
            try:
                current = CurrentDoc.from_dict(_get(d, "current"))
            except UnsafePath as exc:
                return cls(
                    "rejected",
                    doc_id,
                    error="bad_server_path",
                    message=f"the server named an unsafe path for the current doc: {exc.message}",
                )
            return cls("conflict", doc_id, current=current)
        if status == "rejected":
            return cls(
                "rejected",
                doc_id,
                error=_str(d, "error", limit=100),
                message=_str(d, "message", null=True),
            )
        raise ProtocolError(f"unknown commit status {status!r}")


@dataclass(frozen=True, slots=True)
class CommitResponse:
    """Answer to ``commit``: one result per item, in the request's order."""

    results: tuple[CommitResult, ...]

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, expected: int | None = None) -> CommitResponse:
        results = tuple(CommitResult.from_dict(r) for r in _list(d, "results", MAX_COMMIT_ITEMS))
        if expected is not None and len(results) != expected:
            raise ProtocolError(f"{len(results)} results for {expected} items")
        return cls(results)


@dataclass(frozen=True, slots=True)
class HashesRequest:
    """Body of ``blobs/missing`` and ``blobs/unpack``: ``{"hashes": [...]}``."""

    hashes: tuple[str, ...]

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> HashesRequest:
        return cls(hash_list(d))


@dataclass(frozen=True, slots=True)
class MissingResponse:
    """Answer to ``blobs/missing``: the asked hashes the server does not hold (the ones to upload)."""

    missing: tuple[str, ...]

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> MissingResponse:
        return cls(hash_list(d, "missing"))


@dataclass(frozen=True, slots=True)
class PackResponse:
    """Answer to ``blobs/pack``: every hash now stored (new or already there)."""

    stored: tuple[str, ...]

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PackResponse:
        return cls(hash_list(d, "stored"))


@dataclass(frozen=True, slots=True)
class Manifest:
    """A large blob as its chunks, in order: body of PUT and answer of GET ``manifests/{h}``.

    ``chunks`` is a list of ``[sha256, size]``. The checks here are the ones
    either side can make without the bytes: sizes in range and summing to
    ``size``, a bounded count. That the chunks hash to the whole is checked
    by whoever has them (the server on PUT, the client after assembling).
    """

    size: int
    chunks: tuple[tuple[str, int], ...]

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Manifest:
        size = _int(d, "size") or 0
        if size <= SMALL_BLOB:
            raise ProtocolError(f"a manifest is for blobs over {SMALL_BLOB} bytes")
        chunks = []
        total = 0
        for i, entry in enumerate(_list(d, "chunks", MAX_MANIFEST_CHUNKS)):
            if not (isinstance(entry, list) and len(entry) == 2):
                raise ProtocolError(f"chunks[{i}] must be [sha256, size]")
            digest = check_hash(entry[0], f"chunks[{i}][0]")
            length = entry[1]
            if not isinstance(length, int) or isinstance(length, bool) or not 1 <= length <= CDC_MAX:
                raise ProtocolError(f"chunks[{i}] size must be an integer in 1..{CDC_MAX}")
            total += length
            if total > size:
                raise ProtocolError("chunk sizes add up to more than the manifest's size")
            chunks.append((digest, length))
        if total != size:
            raise ProtocolError(f"chunk sizes add up to {total}, not the manifest's size {size}")
        return cls(size, tuple(chunks))

    def to_dict(self, digest: str | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {"size": self.size, "chunks": [list(c) for c in self.chunks]}
        return {"hash": digest, **out} if digest else out


@dataclass(frozen=True, slots=True)
class PackEntry:
    """One blob of a pack: its hash and size, and ``deflated`` when it travels zlib-compressed.

    ``deflated`` is the length of its zlib stream (RFC 1950) in the pack,
    less than ``size``: the client compresses each blob of an upload that
    compresses, and the server stores those bytes as they came (it checks
    they inflate to exactly ``size`` bytes of the right hash first), so no
    blob is deflated twice. Download packs carry blobs as they are.
    """

    hash: str
    size: int
    deflated: int | None = None

    @property
    def length(self) -> int:
        """The bytes it takes in the pack."""
        return self.size if self.deflated is None else self.deflated


def encode_pack_header(blobs: list[list[Any]], missing: Sequence[str] = (), large: Sequence[str] = (),
                       deferred: Sequence[str] = (), manifests: Sequence[str] = ()) -> bytes:
    """A pack's header line from its entries as ``[hash, size]`` or ``[hash, size, deflated]`` lists.

    :meth:`PackHeader.encode` writes through it; an upload builds the lists
    itself, sparing a PackEntry and a PackHeader per blob (10,000 per first push).
    """
    body: dict[str, Any] = {"blobs": blobs, "missing": list(missing), "large": list(large),
                            "deferred": list(deferred)}
    if manifests:
        body["manifests"] = list(manifests)
    return json.dumps(body, separators=(",", ":")).encode() + b"\n"


@dataclass(frozen=True, slots=True)
class PackHeader:
    """The JSON line that opens a pack; the blobs' bytes follow back to back in this order.

    An upload pack uses ``blobs`` only. A download pack (``blobs/unpack``)
    also lists hashes it does not carry: ``missing`` (not on the server),
    ``large`` (over SMALL_BLOB: fetch with GET) and ``deferred`` (did not
    fit under MAX_PACK_BYTES: ask again). ``manifests``, a subset of
    ``large``, names the blobs stored as chunk manifests (GET manifests/{h}
    first); absent from older servers' packs, so nobody asks them for one.
    """

    blobs: tuple[PackEntry, ...]
    missing: tuple[str, ...] = ()
    large: tuple[str, ...] = ()
    deferred: tuple[str, ...] = ()
    manifests: tuple[str, ...] = ()

    def encode(self) -> bytes:
        return encode_pack_header(
            [[b.hash, b.size] if b.deflated is None else [b.hash, b.size, b.deflated] for b in self.blobs],
            self.missing, self.large, self.deferred, self.manifests,
        )

    @property
    def total(self) -> int:
        return sum(b.size for b in self.blobs)

    @classmethod
    def decode(cls, line: bytes) -> PackHeader:
        try:
            d = json.loads(line)
        except ValueError as exc:
            raise ProtocolError(f"pack header is not JSON: {exc}") from None
        blobs = []
        for i, entry in enumerate(_list(d, "blobs", MAX_HASHES)):
            # Unpacked by length rather than sliced and scanned: an upload pack has 1,000 entries.
            n = len(entry) if isinstance(entry, list) else 0
            if n == 2:
                digest, size = entry
                deflated = None
                ok = type(size) is int and 0 <= size <= MAX_PACK_BYTES
            elif n == 3:
                digest, size, deflated = entry
                ok = type(size) is int and type(deflated) is int and 0 <= size <= MAX_PACK_BYTES
                ok = ok and 0 < deflated < size
            else:
                ok = False
            if not ok:
                raise ProtocolError(f"blobs[{i}] must be [sha256, size] or [sha256, size, deflated < size]")
            if type(digest) is not str or not _HASH_MATCH(digest):
                check_hash(digest, f"blobs[{i}]")
            blobs.append(PackEntry(digest, size, deflated))
        opt = {
            k: hash_list(d, k) if k in d else ()
            for k in ("missing", "large", "deferred", "manifests")
        }
        header = cls(tuple(blobs), **opt)
        if not set(header.manifests) <= set(header.large):
            raise ProtocolError("manifests must name large blobs only")
        if header.total > MAX_PACK_BYTES:
            raise ProtocolError(
                f"pack carries {header.total} bytes; at most {MAX_PACK_BYTES} are allowed"
            )
        return header

