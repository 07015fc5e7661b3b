"""The FastAPI application: routes of docs/protocol.md over a :class:`Storage`.

Routes are thin: authenticate, validate with :mod:`syncengine.protocol`'s
strict validators, run one storage method in a worker thread, answer JSON.
Every refusal is ``{"error": code, "message": text}`` with a 4xx status; a
500 means a bug, never bad input.

Live updates hook: ``create_app(..., announce=fn)`` calls ``fn(workspace,
last_seq)`` after every commit transaction that wrote changes (outside the
transaction, from a worker thread). Further listeners can be appended to
``app.state.announcers``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
import time
import zlib
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware.gzip import DEFAULT_EXCLUDED_CONTENT_TYPES, GZipMiddleware
from starlette.requests import ClientDisconnect

import syncengine.protocol as p
from syncengine.errors import BusyError, UnsafePath
from syncengine.server.guard import ApiError, GuardMiddleware, Limits
from syncengine.server.live import install as install_live
from syncengine.server.manifests import get_manifest, put_manifest
from syncengine.server.storage import BlobInfo, CommitOutcome, Storage, compress_chunk

log = logging.getLogger("syncengine.server")

Announce = Callable[[str, int], None]
_WS = "/v1/ws/{ws}"


@dataclass
class ServerSettings:
    """Tunables of one server process."""

    limits: Limits = field(default_factory=Limits)
    tmp_dir: Path | None = None  # where streamed uploads are spooled before they are verified
    # Level 1, as the client's uploads: the answers of a 10k first sync (hash
    # lists, commit results; 2.6 MB) cost 56-74 ms at level 5 and 20 ms at 1
    # for 2% more bytes; a download pack of JSON 6.3x -> 5.2x for 2.5x less CPU.
    gzip_level: int = 1


# ---------------------------------------------------------------- helpers


def _strict_json(raw: bytes) -> Any:
    def no_dupes(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out = dict(pairs)
        if len(out) != len(pairs):
            raise ValueError("duplicate key in object")
        return out

    def no_constants(name: str) -> Any:
        raise ValueError(f"{name} is not valid JSON")

    try:
        return json.loads(raw, object_pairs_hook=no_dupes, parse_constant=no_constants)
    except (ValueError, RecursionError) as exc:
        raise ApiError(400, "bad_request", f"body is not valid JSON: {exc}") from None


async def _json_body(request: Request) -> Any:
    return _strict_json(await request.body())


def _validated(parse: Callable[[Any], Any], data: Any) -> Any:
    try:
        return parse(data)
    except p.ProtocolError as exc:
        raise ApiError(400, "bad_request", str(exc)) from None


def _hash_param(value: str) -> str:
    try:
        return p.check_hash(value, "blob name")
    except p.ProtocolError as exc:
        raise ApiError(400, "bad_request", str(exc)) from None


class _BodyReader:
    """Exact reads over a request's (already inflated) body stream."""

    def __init__(self, stream: AsyncIterator[bytes]) -> None:
        self._stream = stream
        self._buf = bytearray()
        self._done = False

    async def _fill(self) -> bool:
        if self._done:
            return False
        try:
            chunk = await self._stream.__anext__()
        except StopAsyncIteration:
            self._done = True
            return False
        self._buf += chunk
        return True

    async def line(self, limit: int) -> bytes:
        while b"\n" not in self._buf:
            if len(self._buf) > limit or not await self._fill():
                raise ApiError(400, "bad_request", "pack header line missing or too long")
        end = self._buf.index(b"\n")
        if end > limit:
            raise ApiError(400, "bad_request", "pack header line too long")
        line = bytes(self._buf[:end])
        del self._buf[: end + 1]
        return line

    async def exactly(self, n: int) -> bytes:
        while len(self._buf) < n:
            if not await self._fill():
                raise ApiError(400, "bad_request", "pack is shorter than its header says")
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    async def at_end(self) -> bool:
        while not self._buf:
            if not await self._fill():
                return True
        return False


# ---------------------------------------------------------------- the app


def create_app(
    storage: Storage, settings: ServerSettings | None = None, *, announce: Announce | None = None
) -> FastAPI:
    """The ASGI app serving ``storage``; ``announce(ws, last_seq)`` follows each commit."""
    settings = settings or ServerSettings()
    app = FastAPI(
        title="syncengine sync server",
        version=f"protocol {p.PROTOCOL_VERSION}",
        description="Wire protocol of syncengine; see docs/protocol.md. Every /v1 call but "
        f"/v1/health needs the header {p.PROTOCOL_HEADER}: {p.PROTOCOL_VERSION} and a bearer "
        "token.",
        docs_url=None,
        redoc_url=None,
    )
    app.state.storage = storage
    app.state.announcers = [announce] if announce else []
    install_live(app, storage)  # WS /v1/ws/{ws}/live; its hub is app.state.live
    app.add_middleware(GuardMiddleware, limits=settings.limits)
    # A large blob goes down as stored: it is stored compressed when that
    # paid, and gzip at level 5 on an incompressible 200 MB file cost the
    # server 9 s of CPU to save nothing. JSON and packs still travel gzipped.
    app.add_middleware(
        GZipMiddleware, minimum_size=p.GZIP_MIN_BYTES, compresslevel=settings.gzip_level,
        exclude_content_types=(*DEFAULT_EXCLUDED_CONTENT_TYPES, "application/octet-stream"),
    )
    _install_error_handlers(app)

    def bearer(request: Request) -> str:
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ApiError(401, "unauthorized", "missing bearer token")
        return token.strip()

    def authorized(token: str, ws: str) -> int:
        """The workspace's id if ``token`` is live for it (runs on a worker thread: a database read)."""
        found = storage.authenticate(token)
        if found is None:
            raise ApiError(401, "unauthorized", "token unknown or revoked")
        ws_id, name = found
        if name != ws:
            raise ApiError(404, "not_found", "no such workspace")
        return ws_id

    async def auth(request: Request, ws: str) -> int:
        return await run_in_threadpool(authorized, bearer(request), ws)

    def announce_all(ws: str, last_seq: int) -> None:
        for fn in list(app.state.announcers):
            try:
                fn(ws, last_seq)
            except Exception:
                log.exception("announce hook failed for %s", ws)

    def commit_and_announce(ws: str, ws_id: int, req: p.CommitRequest) -> CommitOutcome:
        # One trip to a worker thread, not two: the hooks run after the
        # transaction has committed, on the thread that ran it.
        outcome = storage.commit(ws_id, req.client_id, req.items)
        if outcome.applied:
            announce_all(ws, outcome.last_seq)
        return outcome

    @app.get(
        "/v1/health",
        summary="Liveness, protocol version, server id and clock",
        openapi_extra=_responds("Health"),
    )
    def health() -> JSONResponse:
        return JSONResponse(
            {
                "protocol": p.PROTOCOL_VERSION,
                "supported": list(p.SUPPORTED_VERSIONS),
                "server_id": storage.server_id,
                "time": time.time_ns(),
            }
        )

    @app.get(
        _WS + "/changes",
        summary="Changes after a seq, in seq order, paged",
        openapi_extra=_responds("ChangesPage"),
    )
    async def changes(
        request: Request,
        ws: str,
        since: int = Query(0, ge=0, le=(1 << 63) - 1),
        limit: int = Query(p.DEFAULT_PAGE, ge=1, le=p.MAX_PAGE),
    ) -> JSONResponse:
        ws_id = await auth(request, ws)
        return JSONResponse(await run_in_threadpool(storage.changes, ws_id, since, limit))

    @app.get(
        _WS + "/docs",
        summary="Full listing of live documents, paged by doc_id",
        openapi_extra=_responds("DocsPage"),
    )
    async def docs(
        request: Request,
        ws: str,
        after: str | None = Query(None, max_length=128),
        limit: int = Query(p.DEFAULT_PAGE, ge=1, le=p.MAX_PAGE),
    ) -> JSONResponse:
        ws_id = await auth(request, ws)
        return JSONResponse(await run_in_threadpool(storage.docs, ws_id, after, limit))

    @app.post(
        _WS + "/blobs/missing",
        summary="Which of these hashes the workspace lacks",
        openapi_extra=_responds("MissingResponse", body="HashesRequest"),
    )
    async def missing(request: Request, ws: str) -> JSONResponse:
        ws_id = await auth(request, ws)
        req = _validated(p.HashesRequest.from_dict, await _json_body(request))
        return JSONResponse(
            {"missing": await run_in_threadpool(storage.missing, ws_id, req.hashes)}
        )

    @app.put(
        _WS + "/blobs/{sha256}",
        status_code=201,
        summary="Upload one blob, streamed; verified",
        openapi_extra=_binary_body("application/octet-stream"),
    )
    async def put_blob(request: Request, ws: str, sha256: str) -> JSONResponse:
        digest = _hash_param(sha256)
        ws_id = await auth(request, ws)
        with tempfile.TemporaryFile(dir=settings.tmp_dir) as spool:
            size, chunks = await _spool_chunks(request, spool, digest)
            stored = await run_in_threadpool(
                storage.put_blob, ws_id, digest, size, _read_spool(spool, chunks)
            )
        return JSONResponse({"hash": digest, "size": size, "stored": stored}, status_code=201)

    @app.get(
        _WS + "/blobs/{sha256}",
        summary="Download one blob, streamed",
        responses={200: {"content": {"application/octet-stream": {}}}},
    )
    async def get_blob(request: Request, ws: str, sha256: str) -> StreamingResponse:
        digest = _hash_param(sha256)
        ws_id = await auth(request, ws)
        info = (await run_in_threadpool(storage.blob_infos, ws_id, [digest])).get(digest)
        if info is None:
            raise ApiError(404, "blob_not_found", "this workspace has no such blob")
        return StreamingResponse(
            storage.iter_blob(info),
            media_type="application/octet-stream",
            headers={"Content-Length": str(info.size), "X-Syncengine-Blob-Size": str(info.size)},
        )

    @app.put(
        _WS + "/manifests/{sha256}",
        status_code=201,
        summary="Store a large blob as chunk blobs already uploaded; verified",
        openapi_extra=_request_schema("Manifest"),
    )
    async def put_manifest_route(request: Request, ws: str, sha256: str) -> JSONResponse:
        digest = _hash_param(sha256)
        ws_id = await auth(request, ws)
        body = await _json_body(request)
        answer = await run_in_threadpool(
            put_manifest, storage, ws_id, digest, body, settings.limits.blob
        )
        return JSONResponse(answer, status_code=201)

    @app.get(
        _WS + "/manifests/{sha256}",
        summary="The chunks of a blob stored as a manifest (404 not_a_manifest otherwise)",
        openapi_extra=_responds("ManifestAnswer"),
    )
    async def get_manifest_route(request: Request, ws: str, sha256: str) -> JSONResponse:
        digest = _hash_param(sha256)
        ws_id = await auth(request, ws)
        return JSONResponse(await run_in_threadpool(get_manifest, storage, ws_id, digest))

    @app.post(
        _WS + "/blobs/pack",
        summary="Upload many small blobs in one request; each verified",
        openapi_extra={**_binary_body(p.PACK_MEDIA_TYPE), **_responds("PackResponse")},
    )
    async def pack(request: Request, ws: str) -> JSONResponse:
        ws_id = await auth(request, ws)
        reader = _BodyReader(request.stream().__aiter__())
        header = _validated(p.PackHeader.decode, await reader.line(p.MAX_PACK_HEADER))
        blobs: list[tuple[p.PackEntry, bytes]] = []
        for entry in header.blobs:
            if entry.size > p.SMALL_BLOB:
                raise ApiError(
                    400,
                    "bad_request",
                    f"blob {entry.hash[:12]} is over {p.SMALL_BLOB} bytes; PUT it",
                )
            blobs.append((entry, await reader.exactly(entry.length)))
        if not await reader.at_end():
            raise ApiError(400, "bad_request", "pack is longer than its header says")
        # Checked and stored on a worker thread: the event loop goes on reading commits.
        await run_in_threadpool(_store_small, storage, ws_id, blobs)
        return JSONResponse({"stored": list(dict.fromkeys(e.hash for e, _ in blobs))})

    @app.post(
        _WS + "/blobs/unpack",
        summary="Download many small blobs in one response",
        openapi_extra={**_responds_binary(p.PACK_MEDIA_TYPE), **_request_schema("HashesRequest")},
    )
    async def unpack(request: Request, ws: str) -> StreamingResponse:
        ws_id = await auth(request, ws)
        req = _validated(p.HashesRequest.from_dict, await _json_body(request))
        infos = await run_in_threadpool(storage.blob_infos, ws_id, req.hashes)
        chosen: list[BlobInfo] = []
        missing, large, deferred, manifests = [], [], [], []
        total = 0
        for digest in dict.fromkeys(req.hashes):
            info = infos.get(digest)
            if info is None:
                missing.append(digest)
            elif info.size > p.SMALL_BLOB:
                large.append(digest)
                if info.manifest:
                    manifests.append(digest)
            elif total + info.size > p.MAX_PACK_BYTES:
                deferred.append(digest)
            else:
                chosen.append(info)
                total += info.size
        header = p.PackHeader(
            tuple(p.PackEntry(i.hash, i.size) for i in chosen),
            tuple(missing),
            tuple(large),
            tuple(deferred),
            tuple(manifests),
        )
        return StreamingResponse(
            _pack_stream(storage, header, chosen), media_type=p.PACK_MEDIA_TYPE
        )

    @app.post(
        _WS + "/commit",
        summary="Compare-and-swap up to 100 document changes",
        openapi_extra=_responds("CommitResponse", body="CommitRequest"),
    )
    async def commit(request: Request, ws: str) -> JSONResponse:
        # The token check, the body's parsing and checks, the transaction and the
        # answer's JSON in one trip to a worker thread: each trip and each stretch
        # of CPU work on the event loop waited for the GIL behind the packs' threads,
        # and cost a commit of a first sync ~8 ms around its ~5 ms transaction.
        token = bearer(request)
        raw = await request.body()
        return await run_in_threadpool(commit_request, ws, token, raw)

    def commit_request(ws: str, token: str, raw: bytes) -> JSONResponse:
        ws_id = authorized(token, ws)
        req = _validated(p.CommitRequest.from_dict, _strict_json(raw))
        for i, item in enumerate(req.items):
            try:
                p.wire_path(item.path)
            except UnsafePath as exc:
                raise ApiError(
                    400, "unsafe_path", f"items[{i}]: {exc.message}; nothing was applied"
                ) from None
            expected = p.make_op_id(
                req.client_id, item.doc_id, item.base_rev, item.path, item.hash, item.executable
            )
            if expected != item.op_id:
                raise ApiError(
                    400,
                    "bad_request",
                    f"items[{i}]: op_id is not the item's op id; nothing was applied",
                )
        outcome = commit_and_announce(ws, ws_id, req)
        return JSONResponse({"results": outcome.results})  # rendered here, off the event loop

    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


# ---------------------------------------------------------------- blob plumbing


async def _spool_chunks(
    request: Request, spool: Any, digest: str
) -> tuple[int, list[tuple[bool, int]]]:
    """Hash and chunk a streamed body into ``spool``; refuses it if the hash differs."""
    hasher = hashlib.sha256()
    size = 0
    chunks: list[tuple[bool, int]] = []
    buf = bytearray()

    async def flush(data: bytes) -> None:
        compressed, stored = await run_in_threadpool(compress_chunk, data)
        spool.write(stored)
        chunks.append((compressed, len(stored)))

    async for piece in request.stream():
        hasher.update(piece)
        size += len(piece)
        buf += piece
        while len(buf) >= p.CHUNK_SIZE:
            await flush(bytes(buf[: p.CHUNK_SIZE]))
            del buf[: p.CHUNK_SIZE]
    if buf:
        await flush(bytes(buf))
    if hasher.hexdigest() != digest:
        raise ApiError(
            400,
            "hash_mismatch",
            "the uploaded bytes do not hash to the blob's name; nothing stored",
        )
    spool.seek(0)
    return size, chunks


def _read_spool(spool: Any, chunks: list[tuple[bool, int]]) -> Iterator[tuple[bool, bytes]]:
    for compressed, length in chunks:
        yield compressed, spool.read(length)


def _store_small(storage: Storage, ws_id: int, blobs: list[tuple[p.PackEntry, bytes]]) -> None:
    """Verify every blob of a pack, then store them all; one that fails refuses the pack.

    A blob is stored as it came: deflated by the client when that paid,
    raw otherwise (the client judged it would not compress). Deflating
    here cost a quarter of the server's CPU in a first sync of JSON
    documents (0.34 s of ~1.5 s for 10,000).
    """
    prepared = []
    for entry, data in blobs:
        raw = data if entry.deflated is None else _inflate_exactly(data, entry)
        if raw is None or hashlib.sha256(raw).hexdigest() != entry.hash:
            raise ApiError(
                400,
                "hash_mismatch",
                f"blob {entry.hash[:12]} does not hash to its name; nothing stored",
            )
        prepared.append((entry.hash, entry.size, entry.deflated is not None, data))
    storage.put_prepared_blobs(ws_id, prepared)


def _inflate_exactly(data: bytes, entry: p.PackEntry) -> bytes | None:
    """The blob a deflated pack entry carries; None unless it is one whole zlib stream of ``size`` bytes.

    Inflates at most ``size`` bytes (at most SMALL_BLOB): a stream that
    would give more is refused without being inflated further.
    """
    inflater = zlib.decompressobj()
    try:
        raw = inflater.decompress(data, entry.size)
    except zlib.error:
        return None
    if len(raw) != entry.size or not inflater.eof or inflater.unused_data or inflater.unconsumed_tail:
        return None
    return raw


def _pack_stream(storage: Storage, header: p.PackHeader, chosen: list[BlobInfo]) -> Iterator[bytes]:
    yield header.encode()
    for start in range(0, len(chosen), 64):
        batch = chosen[start : start + 64]
        data = storage.small_blob_data(batch)
        for info in batch:
            yield data[info.pk]


# ---------------------------------------------------------------- errors


_CODES = {
    400: "bad_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    413: "too_large",
    415: "unsupported_encoding",
}


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        code = getattr(exc, "code", None) or _CODES.get(exc.status_code, "bad_request")
        body = {"error": code, "message": str(exc.detail), **getattr(exc, "extra", {})}
        headers = {"WWW-Authenticate": "Bearer"} if exc.status_code == 401 else None
        return JSONResponse(body, status_code=exc.status_code, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for err in exc.errors()[:5]:
            where = ".".join(str(x) for x in err.get("loc", ()))
            parts.append(f"{where}: {err.get('msg')}")
        return JSONResponse(
            {"error": "bad_request", "message": "; ".join(parts) or "invalid request"},
            status_code=400,
        )

    @app.exception_handler(ClientDisconnect)
    async def gone(request: Request, exc: ClientDisconnect) -> JSONResponse:
        # The client went away mid-body: nothing was stored, and nobody reads this answer.
        return JSONResponse(
            {"error": "bad_request", "message": "client disconnected"}, status_code=400
        )

    @app.exception_handler(BusyError)
    async def busy(request: Request, exc: BusyError) -> JSONResponse:
        return JSONResponse(
            {"error": "busy", "message": "the server is busy; retry"},
            status_code=503,
            headers={"Retry-After": "1"},
        )

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception) -> JSONResponse:
        log.error("internal error on %s %s", request.method, request.url.path, exc_info=exc)
        return JSONResponse(
            {"error": "internal", "message": "internal server error"}, status_code=500
        )


# ---------------------------------------------------------------- OpenAPI


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _request_schema(name: str) -> dict[str, Any]:
    return {
        "requestBody": {"required": True, "content": {"application/json": {"schema": _ref(name)}}}
    }


def _responds(name: str, body: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "responses": {
            "200": {"description": "OK", "content": {"application/json": {"schema": _ref(name)}}}
        }
    }
    if body:
        out.update(_request_schema(body))
    return out


def _binary_body(media: str) -> dict[str, Any]:
    return {
        "requestBody": {
            "required": True,
            "content": {media: {"schema": {"type": "string", "format": "binary"}}},
        }
    }


def _responds_binary(media: str) -> dict[str, Any]:
    return {
        "responses": {
            "200": {
                "description": "OK",
                "content": {media: {"schema": {"type": "string", "format": "binary"}}},
            }
        }
    }


def _openapi(app: FastAPI) -> dict[str, Any]:
    if app.openapi_schema:
        return app.openapi_schema
    from pydantic import TypeAdapter

    schema = get_openapi(
        title=app.title, version=app.version, description=app.description, routes=app.routes
    )
    comps = schema.setdefault("components", {}).setdefault("schemas", {})
    for cls in (
        p.Health,
        p.ChangesPage,
        p.DocsPage,
        p.HashesRequest,
        p.MissingResponse,
        p.PackResponse,
        p.Manifest,
        p.CommitRequest,
        p.CommitResponse,
        p.ErrorBody,
    ):
        one = TypeAdapter(cls).json_schema(ref_template="#/components/schemas/{model}")
        comps.update(one.pop("$defs", {}))
        comps[cls.__name__] = one
    # GET manifests answers the PUT body plus the hash it was asked for.
    answer = {**comps["Manifest"], "title": "ManifestAnswer"}
    answer["properties"] = {"hash": {"type": "string", "title": "Hash"}, **answer.get("properties", {})}
    answer["required"] = ["hash", *answer.get("required", [])]
    comps["ManifestAnswer"] = answer
    for name in ("ChangesPage", "DocsPage"):
        comps[name].get("properties", {}).pop("rejected", None)
    comps.pop("RejectedItem", None)
    for path in schema.get("paths", {}).values():
        for op in path.values():
            op.setdefault("responses", {}).setdefault(
                "4XX",
                {
                    "description": "Refused",
                    "content": {"application/json": {"schema": _ref("ErrorBody")}},
                },
            )
            op["responses"].pop("422", None)
    app.openapi_schema = schema
    return schema
