"""The ASGI layer in front of every route: what is refused before a route runs.

* the protocol header (``X-Syncengine-Protocol``) is required under ``/v1``
  (optional on ``/v1/health``, but checked when present);
* credentials in the query string are refused (they end up in logs);
* request bodies are capped, and ``Content-Encoding: gzip`` is inflated on
  the fly under the same cap, in small steps, so a zip bomb or an oversized
  body costs at most the cap's worth of work and never sits in memory whole.
  Past the cap, reading the body raises :class:`BodyTooLarge` (a 413).
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import parse_qsl

from starlette.exceptions import HTTPException

from syncengine.protocol import API_PREFIX, PROTOCOL_HEADER, SUPPORTED_VERSIONS

_QUERY_SECRETS = {
    "token",
    "access_token",
    "auth",
    "authorization",
    "bearer",
    "api_key",
    "apikey",
    "key",
}
_STEP = 64 * 1024  # inflate at most this much per step


class ApiError(HTTPException):
    """A refusal with a protocol error code: rendered as ``{"error", "message", ...}``."""

    def __init__(self, status: int, code: str, message: str, **extra: object) -> None:
        super().__init__(status_code=status, detail=message)
        self.code = code
        self.extra = extra


class BodyTooLarge(ApiError):
    def __init__(self, cap: int) -> None:
        super().__init__(
            413, "too_large", f"request body exceeds the server's limit of {cap} bytes"
        )


@dataclass(frozen=True, slots=True)
class Limits:
    """Body caps, in bytes, after decompression."""

    json: int = 16 << 20  # JSON requests (commit, missing, unpack)
    pack: int = 64 << 20  # blobs/pack uploads (their content is capped at 32 MiB by the protocol)
    blob: int = 1 << 30  # one streamed blob upload (PUT)

    def for_request(self, method: str, path: str) -> int:
        if method == "PUT" and "/blobs/" in path:
            return self.blob
        if path.endswith("/blobs/pack"):
            return self.pack
        return self.json


def _refusal(status: int, code: str, message: str, **extra: object) -> tuple[int, bytes]:
    return status, json.dumps({"error": code, "message": message, **extra}).encode()


class GuardMiddleware:
    """Pure ASGI middleware; see the module docstring."""

    def __init__(self, app: Callable, limits: Limits) -> None:
        self.app = app
        self.limits = limits

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(API_PREFIX + "/"):
            await self.app(scope, receive, send)
            return
        refusal = self._check(scope)
        if refusal is not None:
            await _send_json(send, *refusal)
            return
        headers = dict(scope["headers"])
        cap = self.limits.for_request(scope["method"], scope["path"])
        encoding = headers.get(b"content-encoding", b"identity").decode("latin-1").strip().lower()
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > cap:
            await _send_json(
                send,
                *_refusal(
                    413, "too_large", f"request body exceeds the server's limit of {cap} bytes"
                ),
            )
            return
        if encoding in ("", "identity"):
            await self.app(scope, _capped(receive, cap), send)
            return
        if encoding != "gzip":
            await _send_json(
                send,
                *_refusal(
                    415,
                    "unsupported_encoding",
                    f"Content-Encoding {encoding!r} is not supported; use gzip",
                ),
            )
            return
        scope = dict(scope)
        scope["headers"] = [
            (k, v) for k, v in scope["headers"] if k not in (b"content-encoding", b"content-length")
        ]
        await self.app(scope, _inflating(receive, cap), send)

    def _check(self, scope) -> tuple[int, bytes] | None:
        query = scope.get("query_string", b"").decode("latin-1")
        if query and any(
            k.lower() in _QUERY_SECRETS for k, _ in parse_qsl(query, keep_blank_values=True)
        ):
            return _refusal(
                400,
                "token_in_query",
                "credentials are not accepted in the URL; send Authorization: Bearer",
            )
        version = None
        for key, value in scope["headers"]:
            if key == PROTOCOL_HEADER.lower().encode():
                version = value.decode("latin-1").strip()
        if version is None and scope["path"] == API_PREFIX + "/health":
            return None
        if version not in {str(v) for v in SUPPORTED_VERSIONS}:
            said = "no protocol header" if version is None else f"protocol {version[:20]!r}"
            return _refusal(
                400,
                "protocol_mismatch",
                f"{said}; this server speaks protocol {', '.join(map(str, SUPPORTED_VERSIONS))} "
                f"(send {PROTOCOL_HEADER})",
                supported=list(SUPPORTED_VERSIONS),
            )
        return None


async def _send_json(send, status: int, body: bytes) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def _capped(receive, cap: int):
    seen = 0

    async def wrapped():
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > cap:
                raise BodyTooLarge(cap)
        return message

    return wrapped


def _inflating(receive, cap: int):
    """A receive() that yields the gzip-decoded body, in steps of at most _STEP bytes."""
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    pending = b""  # compressed input not yet inflated
    out_total = 0
    upstream_done = False
    finished = False  # the last body message went out: from now on, wait for the disconnect

    async def wrapped():
        nonlocal pending, out_total, upstream_done, finished
        if finished:
            return await receive()
        while True:
            if pending:
                try:
                    data = inflater.decompress(pending, _STEP)
                except zlib.error as exc:
                    raise ApiError(
                        400, "bad_request", f"request body is not valid gzip: {exc}"
                    ) from None
                pending = inflater.unconsumed_tail
                if inflater.eof and inflater.unused_data.strip(b"\0"):
                    raise ApiError(400, "bad_request", "trailing bytes after the gzip stream")
                out_total += len(data)
                if out_total > cap:
                    raise BodyTooLarge(cap)
                if data:
                    return {"type": "http.request", "body": data, "more_body": True}
                continue
            if upstream_done:
                if not inflater.eof:
                    raise ApiError(400, "bad_request", "request body is truncated gzip")
                finished = True
                return {"type": "http.request", "body": b"", "more_body": False}
            message = await receive()
            if message["type"] != "http.request":
                return message
            pending = message.get("body", b"")
            upstream_done = not message.get("more_body", False)
            if inflater.eof and pending:
                raise ApiError(400, "bad_request", "trailing bytes after the gzip stream")

    return wrapped
