"""Talking to the sync server: the :class:`Remote` interface and :class:`HttpRemote`.

Everything the engine asks of a server goes through :class:`Remote`; the
only implementation is :class:`HttpRemote` (a ``requests.Session`` per thread), and
tests run it against the real server. This is the one module that knows
``requests``: its exceptions are turned into ours here, once::

    connection refused / reset / timeout, after retries  -> ServerUnreachable
    TLS verification failure (never retried)             -> ServerUnreachable ("TLS error")
    5xx or 429, after retries                            -> ServerFailed
    401 / 403, or 404 for the workspace                  -> AuthError
    400 protocol_mismatch, 426                           -> ProtocolMismatch
    other 4xx (never retried)                            -> RemoteError ("Request refused")
    answer too large, not JSON, or breaking the schema   -> BadServerAnswer
    a blob whose bytes do not hash to its name           -> HashMismatch (per blob)

Retries: exponential backoff with full jitter on connection errors, 5xx and
429, honouring ``Retry-After`` (capped); never on other 4xx (CouchDB's rule).
Every request is safe to repeat: commits carry op ids, uploads are verified
by hash. Paths the server sends are checked with
:func:`syncengine.paths.check_path`; an item with an unsafe path is dropped
and reported in the page's ``rejected``, the others go on. The token lives
only in the session's auth object: never in a URL, a log line or an error.
"""

from __future__ import annotations

import abc
import contextlib
import email.utils
import hashlib
import ipaddress
import json
import os
import random
import re
import secrets
import tempfile
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import quote, urlsplit

import requests
import requests.adapters
import requests.auth

from syncengine import chunked
from syncengine import protocol as p
from syncengine.errors import (
    AuthError,
    BadServerAnswer,
    HashMismatch,
    ProtocolMismatch,
    RemoteError,
    ServerFailed,
    ServerUnreachable,
    UnsafePath,
    UsageError,
)

if TYPE_CHECKING:
    from syncengine.chunkindex import ChunkIndex

T = TypeVar("T")

READ_STEP = 64 * 1024
MAX_BLOB_BYTES = 1 << 40  # refuse to stream a single blob larger than this
# Level 1 packs a pack of JSON documents 5.2x for 15 ms a MB of CPU; level 5,
# 6.3x for 46 ms (docs/performance.md): the client's CPU is the scarcer.
GZIP_LEVEL = 1
_SAMPLE = 64 * 1024
_USER_AGENT = f"syncengine-client (protocol {p.PROTOCOL_VERSION})"


# ---------------------------------------------------------------- values


@dataclass(frozen=True, slots=True)
class BlobSource:
    """A blob to upload: its bytes, or a file path plus the hash the caller computed.

    Bytes given here are known to hash to ``hash`` (:meth:`from_bytes` hashes
    them; a push checks each document's bytes against the journal as it
    reads them), so an upload sends them without hashing them again; a
    file is hashed as it is read, since it may have changed since.
    """

    hash: str
    size: int
    data: bytes | None = None
    path: Path | None = None
    # The bytes' zlib stream (protocol.deflate), when the caller made one anyway: a pack sends it as it is.
    deflated: bytes | None = None

    @classmethod
    def from_bytes(cls, data: bytes) -> BlobSource:
        return cls(hashlib.sha256(data).hexdigest(), len(data), data=data)

    @classmethod
    def from_path(cls, path: Path, hash: str, size: int | None = None) -> BlobSource:
        p.check_hash(hash)
        return cls(hash, path.stat().st_size if size is None else size, path=Path(path))

    def read(self) -> bytes:
        if self.data is not None:
            return self.data
        assert self.path is not None
        return self.path.read_bytes()

    def chunks(self, step: int = p.CHUNK_SIZE) -> Iterator[bytes]:
        if self.data is not None:
            yield self.data
            return
        assert self.path is not None
        with open(self.path, "rb") as fh:
            while chunk := fh.read(step):
                yield chunk


@dataclass(frozen=True, slots=True)
class BlobFailure:
    """A blob a transfer could not move, and why."""

    hash: str
    reason: str


@dataclass(frozen=True, slots=True)
class UploadReport:
    """What ``upload`` did: sent, already on the server, or failed (per blob)."""

    uploaded: tuple[str, ...] = ()
    present: tuple[str, ...] = ()
    failed: tuple[BlobFailure, ...] = ()


@dataclass(frozen=True)
class FetchedBlob:
    """One downloaded blob, already verified; ``status`` is ok, missing or corrupt.

    Bytes of small blobs are in memory; a large one is in a temp file that
    lives until the iterator moves on. ``read()``/``chunks()`` raise
    HashMismatch for a corrupt blob and RemoteError for a missing one.
    """

    hash: str
    status: str  # "ok" | "missing" | "corrupt"
    size: int = 0
    data: bytes | None = None
    path: Path | None = None
    message: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def _check(self) -> None:
        if self.status == "corrupt":
            raise HashMismatch(self.message or f"blob {self.hash[:12]} is corrupt")
        if self.status == "missing":
            raise RemoteError(f"the server has no blob {self.hash[:12]}", title="Blob missing")

    def chunks(self) -> Iterator[bytes]:
        self._check()
        if self.data is not None:
            yield self.data
            return
        assert self.path is not None
        with open(self.path, "rb") as fh:
            while chunk := fh.read(p.CHUNK_SIZE):
                yield chunk

    def read(self) -> bytes:
        return b"".join(self.chunks())


@dataclass(frozen=True, slots=True)
class DownloadReport:
    """What a download did per hash: stored, absent on the server, or failed (with why)."""

    done: tuple[str, ...] = ()
    missing: tuple[str, ...] = ()
    failed: tuple[BlobFailure, ...] = ()


# ---------------------------------------------------------------- interface


class Remote(abc.ABC):
    """What the engine needs from a sync server."""

    client_id: str

    @abc.abstractmethod
    def health(self) -> p.Health:
        """Liveness, protocol and server id; raises ProtocolMismatch when we cannot talk."""

    @abc.abstractmethod
    def changes(self, since: int, limit: int = p.DEFAULT_PAGE) -> p.ChangesPage:
        """One page of the change feed after ``since``."""

    @abc.abstractmethod
    def docs(self, after: str | None = None, limit: int = p.DEFAULT_PAGE) -> p.DocsPage:
        """One page of the full listing of live documents."""

    @abc.abstractmethod
    def missing(self, hashes: Iterable[str]) -> list[str]:
        """The hashes the server lacks, in the order given."""

    @abc.abstractmethod
    def upload(self, blobs: Iterable[BlobSource], *, lacking: bool = False) -> UploadReport:
        """Send the blobs the server lacks: packs for small ones, streamed PUT for large.

        ``lacking``: the caller knows the server holds none of them (a
        workspace that never had a change), so none is asked about first.
        """

    @abc.abstractmethod
    def fetch(self, hashes: Iterable[str]) -> Iterator[FetchedBlob]:
        """Download blobs (packs for small, streamed GET for large), each verified."""

    @abc.abstractmethod
    def commit(self, items: Sequence[p.CommitItem]) -> list[p.CommitResult]:
        """Propose changes; one result per item, in order."""

    def download(self, hashes: Iterable[str], dest_for: Callable[[str], Path]) -> DownloadReport:
        """Write each verified blob to ``dest_for(hash)`` (atomically); report the rest."""
        done: list[str] = []
        missing: list[str] = []
        failed: list[BlobFailure] = []
        for blob in self.fetch(hashes):
            if blob.status == "missing":
                missing.append(blob.hash)
            elif blob.status == "corrupt":
                failed.append(BlobFailure(blob.hash, blob.message))
            else:
                _write_atomic(Path(dest_for(blob.hash)), blob.chunks())
                done.append(blob.hash)
        return DownloadReport(tuple(done), tuple(missing), tuple(failed))

    def get(self, digest: str) -> bytes:
        """One blob's verified bytes; HashMismatch if corrupt, RemoteError if missing."""
        for blob in self.fetch([digest]):
            return blob.read()
        raise BadServerAnswer(f"no answer for blob {digest[:12]}")

    def close(self) -> None:  # noqa: B027 - optional for implementations
        """Release connections."""

    def release_ended_threads(self) -> None:  # noqa: B027 - optional for implementations
        """Release the connections of threads that have ended (a push's workers)."""

    def __enter__(self: T) -> T:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _write_atomic(dest: Path, chunks: Iterable[bytes]) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".syncengine.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            for chunk in chunks:
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


# ---------------------------------------------------------------- HTTP


class _Bearer(requests.auth.AuthBase):
    """Holds the token; its repr never shows it. Setting auth also keeps ~/.netrc out."""

    def __init__(self, token: str) -> None:
        self._token = token

    def __call__(self, r: requests.PreparedRequest) -> requests.PreparedRequest:
        r.headers["Authorization"] = f"Bearer {self._token}"
        return r

    def __repr__(self) -> str:
        return "<Bearer token>"


class _Retry(Exception):
    """Internal: this attempt failed in a way worth retrying."""

    def __init__(self, kind: str, detail: str, after: float | None = None) -> None:
        super().__init__(detail)
        self.kind, self.detail, self.after = kind, detail, after


def _is_loopback(host: str) -> bool:
    if host in ("localhost", "localhost.localdomain") or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _clean(text: Any, limit: int = 200) -> str:
    """Server-supplied text made safe to print on one line."""
    return re.sub(r"[\x00-\x1f\x7f]", " ", str(text))[:limit]


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class _Stream:
    """Exact reads over a response body, with a byte cap."""

    def __init__(self, resp: requests.Response, cap: int) -> None:
        self._it = resp.iter_content(READ_STEP)
        self._buf = bytearray()
        self._seen = 0
        self._cap = cap

    def _fill(self) -> bool:
        chunk = next(self._it, None)
        if chunk is None:
            return False
        self._seen += len(chunk)
        if self._seen > self._cap:
            raise BadServerAnswer(f"the server's answer exceeds {self._cap} bytes")
        self._buf += chunk
        return True

    def line(self, limit: int) -> bytes:
        while b"\n" not in self._buf:
            if len(self._buf) > limit or not self._fill():
                raise BadServerAnswer("pack header missing or too long")
        end = self._buf.index(b"\n")
        line = bytes(self._buf[:end])
        del self._buf[: end + 1]
        return line

    def exactly(self, n: int) -> bytes:
        while len(self._buf) < n:
            if not self._fill():
                raise _Retry("truncated", "the answer ended early")
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    def at_end(self) -> bool:
        return not self._buf and not self._fill()


class HttpRemote(Remote):
    """The sync server over HTTP(S); see the module docstring for the error mapping."""

    def __init__(
        self,
        url: str,
        workspace: str,
        token: str,
        *,
        ca_file: str | Path | None = None,
        allow_http: bool = False,
        timeout: float = 30.0,
        retries: int = 4,
        client_id: str | None = None,
        backoff: float = 0.5,
        max_backoff: float = 30.0,
        max_answer: int = p.MAX_JSON_BYTES,
        chunk_index: ChunkIndex | Callable[[], ChunkIndex] | None = None,
    ) -> None:
        parts = urlsplit(url.rstrip("/"))
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise UsageError(f"server URL must be http(s)://HOST[:PORT], not {url!r}")
        if parts.username or parts.password or parts.query:
            raise UsageError("server URL must not carry credentials or a query string")
        if parts.scheme == "http" and not allow_http and not _is_loopback(parts.hostname):
            raise UsageError(
                f"refusing plain HTTP to {parts.hostname}: use https://, or set allow_http = true",
                title="Insecure server URL",
            )
        try:
            p.check_workspace(workspace)
        except p.ProtocolError as exc:
            raise UsageError(str(exc)) from None
        if not token or any(c.isspace() for c in token):
            raise AuthError("the token is empty or malformed", hint="check the token file")
        self.url = f"{parts.scheme}://{parts.netloc}{parts.path}"
        self.host = parts.hostname
        self.workspace = workspace
        self.client_id = client_id or secrets.token_hex(8)
        p.check_id(self.client_id, "client_id")
        self.timeout = float(timeout)
        self.retries = max(0, int(retries))
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.max_answer = max_answer
        # Blobs over MANIFEST_THRESHOLD travel as chunk manifests (syncengine.chunked);
        # with an index, chunks already held locally are not downloaded again. Given as
        # a factory, it is made when a large file first needs it: most rounds have none,
        # and the blob store's stack stays unloaded (tests/test_cli_imports.py).
        self._chunk_index = chunk_index
        self._chunk_index_lock = threading.Lock()
        self.chunk_stats = chunked.ChunkStats()
        self._base = f"{self.url}{p.API_PREFIX}/ws/{quote(workspace, safe='')}"
        self._auth = _Bearer(token)
        # Passed with every request: requests lets REQUESTS_CA_BUNDLE override Session.verify.
        self._verify: str | bool = str(ca_file) if ca_file else True
        # What requests would read from the environment on every request (proxies for this
        # host, honouring NO_PROXY; a CA bundle), read once: per request it walked
        # os.environ, ~0.5 ms of Python holding the GIL beside the push's other threads.
        self._proxies = requests.utils.get_environ_proxies(self.url)
        if self._verify is True:
            self._verify = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") or True
        # One session (one connection) per thread: a push uploads the next blobs on
        # threads of its own while it commits, and a requests.Session is not thread-safe.
        self._sessions: dict[threading.Thread, requests.Session] = {}
        self._sessions_lock = threading.Lock()

    @property
    def _session(self) -> requests.Session:
        thread = threading.current_thread()
        session = self._sessions.get(thread)
        if session is None:
            session = requests.Session()
            session.auth = self._auth
            session.verify = self._verify
            session.proxies.update(self._proxies)
            session.trust_env = False  # the environment was read once, above
            session.headers.update(
                {
                    p.PROTOCOL_HEADER: str(p.PROTOCOL_VERSION),
                    "User-Agent": _USER_AGENT,
                    "Accept-Encoding": "gzip",
                }
            )
            adapter = requests.adapters.HTTPAdapter(pool_connections=2, pool_maxsize=8, max_retries=0)
            session.mount("http://", adapter)
            session.mount("https://", adapter)
            with self._sessions_lock:
                self._sessions[thread] = session
        return session

    def __repr__(self) -> str:
        return f"HttpRemote({self.url!r}, {self.workspace!r})"

    def close(self) -> None:
        with self._sessions_lock:
            sessions, self._sessions = list(self._sessions.values()), {}
        for session in sessions:
            session.close()

    def chunk_index(self) -> ChunkIndex | None:
        """The chunk index, made on first use when a factory was given."""
        with self._chunk_index_lock:
            if callable(self._chunk_index):
                self._chunk_index = self._chunk_index()
            return self._chunk_index

    def release_ended_threads(self) -> None:
        with self._sessions_lock:
            ended = [thread for thread in self._sessions if not thread.is_alive()]
            sessions = [self._sessions.pop(thread) for thread in ended]
        for session in sessions:
            session.close()

    # ------------------------------------------------------------ the one request loop

    def _call(
        self,
        method: str,
        url: str,
        handle: Callable[[requests.Response], T],
        *,
        params: dict[str, Any] | None = None,
        json_body: Any = None,
        body: Callable[[], Any] | None = None,
        headers: dict[str, str] | None = None,
        ok: tuple[int, ...] = (200,),
        refusal: Callable[[requests.Response], T | None] | None = None,
    ) -> T:
        """Send, retrying what is worth retrying, and hand a good answer to ``handle``.

        ``handle`` reads the body inside the retry loop, so a connection that
        breaks mid-answer is retried like one that broke before it.
        ``refusal`` may turn a 4xx into a value (e.g. 404 for a missing blob).
        """
        send_headers = dict(headers or {})
        payload: Any = None
        if json_body is not None:
            raw = json.dumps(json_body, separators=(",", ":")).encode()
            send_headers["Content-Type"] = "application/json"
            payload = self._maybe_gzip(raw, send_headers)
        attempt = 0
        while True:
            try:
                data = body() if body is not None else payload
                try:
                    resp = self._session.request(
                        method,
                        url,
                        params=params,
                        data=data,
                        headers=send_headers,
                        timeout=(min(self.timeout, 10.0), self.timeout),
                        stream=True,
                        allow_redirects=False,
                        verify=self._verify,
                    )
                except requests.exceptions.SSLError as exc:
                    reason = _tls_reason(exc)
                    unknown_ca = "issuer" in reason or "self-signed" in reason or "self signed" in reason
                    raise ServerUnreachable(
                        f"TLS verification of {self.host} failed: {reason}",
                        title="TLS error",
                        hint="set ca_file in config.toml to trust a private CA"
                        if unknown_ca
                        else "check the server's certificate (expiry, host name) and the server URL",
                    ) from None
                except requests.exceptions.Timeout:
                    raise _Retry(
                        "unreachable", f"{self.host} did not answer in {self.timeout:g} s"
                    ) from None
                except (
                    requests.exceptions.ConnectionError,
                    requests.exceptions.ChunkedEncodingError,
                ) as exc:
                    raise _Retry(
                        "unreachable", f"cannot connect to {self.host} ({_short(exc)})"
                    ) from None
                with resp:
                    status = resp.status_code
                    if status == 429 or status >= 500:
                        raise _Retry(
                            "failed",
                            f"{self.host} answered {status}",
                            _retry_after(resp.headers.get("Retry-After")),
                        )
                    if status in ok:
                        try:
                            return handle(resp)
                        except requests.exceptions.RequestException as exc:
                            raise _Retry(
                                "unreachable", f"connection to {self.host} broke ({_short(exc)})"
                            ) from None
                    if refusal is not None:
                        value = refusal(resp)
                        if value is not None:
                            return value
                    raise self._refused(resp)
            except _Retry as retry:
                if attempt >= self.retries:
                    cls = ServerFailed if retry.kind == "failed" else ServerUnreachable
                    raise cls(
                        f"{retry.detail}; gave up after {attempt + 1} attempts",
                        hint="changes stay queued; retry later",
                    ) from None
                delay = random.uniform(0, min(self.max_backoff, self.backoff * 2**attempt))
                if retry.after is not None:
                    delay = max(delay, min(retry.after, self.max_backoff))
                time.sleep(delay)
                attempt += 1

    def _maybe_gzip(self, raw: bytes, headers: dict[str, str]) -> bytes:
        if len(raw) <= p.GZIP_MIN_BYTES or not _worth_compressing(raw):
            return raw
        headers["Content-Encoding"] = "gzip"
        import gzip  # a body worth compressing: a no-op round sends none

        return gzip.compress(raw, compresslevel=GZIP_LEVEL, mtime=0)

    def _refused(self, resp: requests.Response) -> Exception:
        status = resp.status_code
        try:
            info = json.loads(_read_capped(resp, 64 * 1024))
            if not isinstance(info, dict):
                info = {}
        except (ValueError, BadServerAnswer, requests.exceptions.RequestException):
            info = {}
        code = _clean(info.get("error", ""), 40)
        message = _clean(info.get("message", ""))
        if status == 426 or code == "protocol_mismatch":
            supported = info.get("supported")
            return ProtocolMismatch(
                f"the server speaks protocol {supported or '?'}; "
                f"this syncengine speaks {p.PROTOCOL_VERSION}",
                hint="upgrade syncengine or the server",
            )
        if status in (401, 403):
            return AuthError(
                f"the server refused the token ({message or status})",
                hint="check the token, or ask for a new one (`syncengine token create`)",
            )
        if status == 404 and code in ("not_found", ""):
            return AuthError(
                f"the server has no workspace {self.workspace!r} for this token",
                hint="check the workspace name and the token",
            )
        if status == 413:
            return RemoteError(
                f"the server refused a request body as too large ({message})",
                title="Request too large",
            )
        if 300 <= status < 400:
            return BadServerAnswer(f"unexpected redirect ({status}) from {self.host}")
        return RemoteError(
            f"the server refused the request: {status} {code} {message}".rstrip(),
            title="Request refused",
        )

    def _json(self, resp: requests.Response, cap: int | None = None) -> Any:
        raw = _read_capped(resp, cap or self.max_answer)
        try:
            return json.loads(raw)
        except (ValueError, RecursionError) as exc:
            raise BadServerAnswer(f"the server's answer is not JSON ({_clean(exc, 80)})") from None

    def _get_json(self, url: str, parse: Callable[[Any], T], **kw: Any) -> T:
        def handle(resp: requests.Response) -> T:
            return _parsed(parse, self._json(resp))

        return self._call("GET", url, handle, **kw)

    def _post_json(self, url: str, body: Any, parse: Callable[[Any], T]) -> T:
        def handle(resp: requests.Response) -> T:
            return _parsed(parse, self._json(resp))

        return self._call("POST", url, handle, json_body=body)

    # ------------------------------------------------------------ calls

    def health(self) -> p.Health:
        health = self._get_json(f"{self.url}{p.API_PREFIX}/health", p.Health.from_dict)
        if p.PROTOCOL_VERSION not in health.supported:
            raise ProtocolMismatch(
                f"the server speaks protocol {list(health.supported)}; "
                f"this syncengine speaks {p.PROTOCOL_VERSION}",
                hint="upgrade syncengine or the server",
            )
        return health

    def changes(self, since: int, limit: int = p.DEFAULT_PAGE) -> p.ChangesPage:
        limit = max(1, min(limit, p.MAX_PAGE))
        return self._get_json(
            f"{self._base}/changes",
            lambda d: p.ChangesPage.from_dict(d, since=since),
            params={"since": since, "limit": limit},
        )

    def docs(self, after: str | None = None, limit: int = p.DEFAULT_PAGE) -> p.DocsPage:
        params: dict[str, Any] = {"limit": max(1, min(limit, p.MAX_PAGE))}
        if after is not None:
            params["after"] = after
        return self._get_json(f"{self._base}/docs", p.DocsPage.from_dict, params=params)

    def missing(self, hashes: Iterable[str]) -> list[str]:
        wanted = [p.check_hash(h) for h in dict.fromkeys(hashes)]
        out: list[str] = []
        for start in range(0, len(wanted), p.MAX_HASHES):
            batch = wanted[start : start + p.MAX_HASHES]
            answer = self._post_json(
                f"{self._base}/blobs/missing", {"hashes": batch}, p.MissingResponse.from_dict
            )
            if not set(answer.missing) <= set(batch):
                raise BadServerAnswer("the server listed hashes it was not asked about")
            out.extend(answer.missing)
        return out

    def commit(self, items: Sequence[p.CommitItem]) -> list[p.CommitResult]:
        results: list[p.CommitResult | None] = [None] * len(items)
        sendable: list[tuple[int, p.CommitItem]] = []
        for i, item in enumerate(items):
            try:
                p.wire_path(item.path)
            except UnsafePath as exc:
                results[i] = p.CommitResult(
                    "rejected", item.doc_id, error="unsafe_path", message=f"not sent: {exc.message}"
                )
                continue
            sendable.append((i, item))
        for start in range(0, len(sendable), p.MAX_COMMIT_ITEMS):
            batch = sendable[start : start + p.MAX_COMMIT_ITEMS]
            body = {"client_id": self.client_id, "items": [p.to_dict(item) for _, item in batch]}
            expected = len(batch)
            answer = self._post_json(
                f"{self._base}/commit",
                body,
                lambda d, n=expected: p.CommitResponse.from_dict(d, expected=n),
            )
            for (i, item), result in zip(batch, answer.results, strict=True):
                if result.doc_id != item.doc_id:
                    raise BadServerAnswer("the server answered a commit for another document")
                results[i] = result
        return [r for r in results if r is not None]

    # ------------------------------------------------------------ blobs up

    def upload(self, blobs: Iterable[BlobSource], *, lacking: bool = False) -> UploadReport:
        sources = {b.hash: b for b in blobs}
        needed = set(sources) if lacking else set(self.missing(sources))
        present = tuple(h for h in sources if h not in needed)
        uploaded: list[str] = []
        failed: list[BlobFailure] = []
        small = [sources[h] for h in sources if h in needed and sources[h].size <= p.SMALL_BLOB]
        large = [sources[h] for h in sources if h in needed and sources[h].size > p.SMALL_BLOB]
        for group in p.pack_groups([(b.hash, b.size) for b in small]):
            blobs_in = []
            for digest in group:
                source = sources[digest]
                if source.data is not None:
                    blobs_in.append((digest, source.data, source.deflated))
                    continue
                try:
                    data = source.read()
                except OSError as exc:
                    failed.append(BlobFailure(digest, f"cannot read: {exc.strerror or exc}"))
                    continue
                if hashlib.sha256(data).hexdigest() != digest:
                    failed.append(BlobFailure(digest, "content changed since it was hashed"))
                    continue
                blobs_in.append((digest, data, None))
            if blobs_in:
                uploaded.extend(self._send_pack(blobs_in))
        for source in large:
            problem = chunked.WHOLE
            if source.size > p.MANIFEST_THRESHOLD:
                problem = chunked.upload(self, source, self.chunk_index())
            if problem == chunked.WHOLE:
                problem = self._put_blob(source)
            if problem is None:
                uploaded.append(source.hash)
            else:
                failed.append(BlobFailure(source.hash, problem))
        return UploadReport(tuple(uploaded), present, tuple(failed))

    def _send_pack(self, blobs: list[tuple[str, bytes, bytes | None]]) -> list[str]:
        entries, parts = _deflated(blobs)
        headers = {"Content-Type": p.PACK_MEDIA_TYPE}
        parts.insert(0, p.encode_pack_header(entries))
        payload = b"".join(parts)

        def handle(resp: requests.Response) -> list[str]:
            answer = _parsed(p.PackResponse.from_dict, self._json(resp))
            if set(answer.stored) != {h for h, _data, _deflated in blobs}:
                raise BadServerAnswer("the server did not store every blob of a pack")
            return list(answer.stored)

        return self._call(
            "POST", f"{self._base}/blobs/pack", handle, body=lambda: payload, headers=headers
        )

    def _put_blob(self, source: BlobSource) -> str | None:
        """Stream one blob up (gzip on the fly); None when stored, else why not."""

        def body() -> Iterator[bytes]:
            deflate = zlib.compressobj(1, zlib.DEFLATED, 31)
            for chunk in source.chunks():
                out = deflate.compress(chunk)
                if out:
                    yield out
            yield deflate.flush()

        def refused(resp: requests.Response) -> str | None:
            if resp.status_code == 400:
                info = _safe_json(resp)
                if info.get("error") == "hash_mismatch":
                    return "content changed since it was hashed"
            if resp.status_code == 413:
                # This blob only: the rest of the round goes on without its document.
                message = _safe_json(resp).get("message") or "over the server's limit"
                return f"too large for the server ({message})"
            return None

        headers = {"Content-Type": "application/octet-stream", "Content-Encoding": "gzip"}
        try:
            # A refusal's reason comes back as the call's value (it was dropped, so a
            # refused blob counted as stored and its commit failed instead).
            return self._call(
                "PUT",
                f"{self._base}/blobs/{source.hash}",
                lambda r: None,
                body=body,
                headers=headers,
                ok=(200, 201),
                refusal=refused,
            )
        except OSError as exc:
            return f"cannot read: {exc.strerror or exc}"

    # ------------------------------------------------------------ blobs down

    def fetch(self, hashes: Iterable[str]) -> Iterator[FetchedBlob]:
        pending = [p.check_hash(h) for h in dict.fromkeys(hashes)]
        while pending:
            batch, pending = pending[: p.MAX_HASHES], pending[p.MAX_HASHES :]
            header, blobs = self._unpack(batch)
            yield from blobs
            for digest in header.missing:
                yield FetchedBlob(digest, "missing")
            for digest in header.large:
                if digest in header.manifests:  # stored as chunks: fetch those we lack
                    yield from chunked.fetch(self, digest, self.chunk_index())
                else:
                    yield from self._get_large(digest)
            if header.deferred:
                if header.blobs:
                    pending = list(header.deferred) + pending
                else:  # nothing fit: fetch them one by one
                    for digest in header.deferred:
                        yield from self._get_large(digest)

    def _unpack(self, batch: list[str]) -> tuple[p.PackHeader, list[FetchedBlob]]:
        def handle(resp: requests.Response) -> tuple[p.PackHeader, list[FetchedBlob]]:
            stream = _Stream(resp, p.MAX_PACK_HEADER + p.MAX_PACK_BYTES + 1)
            try:
                header = p.PackHeader.decode(stream.line(p.MAX_PACK_HEADER))
            except p.ProtocolError as exc:
                raise BadServerAnswer(f"bad pack header: {exc}") from None
            named = [b.hash for b in header.blobs] + [
                *header.missing,
                *header.large,
                *header.deferred,
            ]
            if sorted(named) != sorted(batch):
                raise BadServerAnswer(
                    "the server's pack does not account for exactly the hashes asked"
                )
            out = []
            if any(entry.deflated is not None for entry in header.blobs):
                raise BadServerAnswer("the server's pack carries deflated blobs, which downloads never do")
            for entry in header.blobs:
                data = stream.exactly(entry.size)
                if hashlib.sha256(data).hexdigest() != entry.hash:
                    out.append(
                        FetchedBlob(
                            entry.hash,
                            "corrupt",
                            entry.size,
                            message=f"blob {entry.hash[:12]} does not match its hash",
                        )
                    )
                else:
                    out.append(FetchedBlob(entry.hash, "ok", entry.size, data=data))
            if not stream.at_end():
                raise BadServerAnswer("the server's pack is longer than its header says")
            return header, out

        return self._call("POST", f"{self._base}/blobs/unpack", handle, json_body={"hashes": batch})

    def _get_large(self, digest: str) -> Iterator[FetchedBlob]:
        tmp_dir = tempfile.mkdtemp(prefix="syncengine-fetch-")
        tmp = Path(tmp_dir) / digest

        def handle(resp: requests.Response) -> FetchedBlob:
            declared = resp.headers.get("X-Syncengine-Blob-Size", "")
            cap = int(declared) if declared.isdigit() else MAX_BLOB_BYTES
            hasher = hashlib.sha256()
            size = 0
            with open(tmp, "wb") as out:
                for chunk in resp.iter_content(READ_STEP):
                    size += len(chunk)
                    if size > cap:
                        raise BadServerAnswer(
                            f"blob {digest[:12]} is longer than the server declared"
                        )
                    hasher.update(chunk)
                    out.write(chunk)
            if declared.isdigit() and size < cap:
                raise _Retry("truncated", f"blob {digest[:12]} ended early")
            if hasher.hexdigest() != digest:
                tmp.unlink()
                return FetchedBlob(
                    digest,
                    "corrupt",
                    size,
                    message=f"blob {digest[:12]} from the server does not match its hash",
                )
            return FetchedBlob(digest, "ok", size, path=tmp)

        def refused(resp: requests.Response) -> FetchedBlob | None:
            if resp.status_code == 404 and _safe_json(resp).get("error") == "blob_not_found":
                return FetchedBlob(digest, "missing")
            return None

        try:
            yield self._call("GET", f"{self._base}/blobs/{digest}", handle, refusal=refused)
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink()
            with contextlib.suppress(OSError):
                os.rmdir(tmp_dir)


# ---------------------------------------------------------------- helpers


def _read_capped(resp: requests.Response, cap: int) -> bytes:
    length = resp.headers.get("Content-Length", "")
    if length.isdigit() and int(length) > cap and "Content-Encoding" not in resp.headers:
        raise BadServerAnswer(f"the server's answer exceeds {cap} bytes")
    buf = bytearray()
    for chunk in resp.iter_content(READ_STEP):
        buf += chunk
        if len(buf) > cap:
            raise BadServerAnswer(f"the server's answer exceeds {cap} bytes")
    return bytes(buf)


def _deflated(blobs: list[tuple[str, bytes, bytes | None]]) -> tuple[list[list[Any]], list[bytes]]:
    """A pack's header entries and bytes: each blob deflated on its own where that saves 5%, else as it is.

    The server keeps the deflated bytes as they come, so a blob is
    compressed once, here, rather than gzipped whole for the trip and
    deflated again one by one on the server. Blobs that do not compress
    (sampled over the pack, as for gzip) are not tried one by one. A blob
    given with its zlib stream (a push's base, which the blob store
    deflates too) is not deflated again, and a pack of only such blobs is
    not sampled either. The entries are the header's
    ``[hash, size(, deflated)]`` lists (:func:`protocol.encode_pack_header`).
    """
    given = all(deflated is not None for _, _data, deflated in blobs)  # a push's bases: nothing to try here
    if not given and not _pack_worth_compressing([data for _, data, _deflated in blobs]):
        return [[digest, len(data)] for digest, data, _deflated in blobs], [data for _, data, _deflated in blobs]
    entries: list[list[Any]] = []
    parts: list[bytes] = []
    deflate = p.deflate
    for digest, data, packed in blobs:
        size = len(data)
        if packed is None:
            packed = deflate(data, GZIP_LEVEL) if size > 64 else data
        if len(packed) < size * 0.95:
            entries.append([digest, size, len(packed)])
            parts.append(packed)
        else:
            entries.append([digest, size])
            parts.append(data)
    return entries, parts


def _pack_worth_compressing(parts: list[bytes]) -> bool:
    """:func:`_worth_compressing` of these parts joined, without joining them.

    A 1,000-blob pack was copied whole just to read 128 KiB of it; the
    samples here are whole parts from the middle on and at the end.
    """
    if sum(map(len, parts)) <= 4 * _SAMPLE:
        return True
    middle: list[bytes] = []
    taken = 0
    for part in parts[len(parts) // 2:]:
        middle.append(part)
        taken += len(part)
        if taken >= _SAMPLE:
            break
    end: list[bytes] = []
    taken = 0
    for part in reversed(parts):
        end.append(part)
        taken += len(part)
        if taken >= _SAMPLE:
            break
    end.reverse()
    return _compresses(b"".join(middle)[:_SAMPLE] + b"".join(end)[-_SAMPLE:])


def _worth_compressing(raw: bytes) -> bool:
    """Whether gzip pays on this body, judged on samples from its middle and end.

    A pack of already-compressed chunks (photos, archives) shrinks by
    nothing and would cost the client a full pass of deflate; JSON and
    documents shrink severalfold.
    """
    if len(raw) <= 4 * _SAMPLE:
        return True
    middle = len(raw) // 2
    return _compresses(raw[middle:middle + _SAMPLE] + raw[-_SAMPLE:])


def _compresses(sample: bytes) -> bool:
    return len(p.deflate(sample, GZIP_LEVEL)) < len(sample) * 0.9


def _safe_json(resp: requests.Response) -> dict[str, Any]:
    try:
        info = json.loads(_read_capped(resp, 64 * 1024))
    except (ValueError, BadServerAnswer, requests.exceptions.RequestException):
        return {}
    return info if isinstance(info, dict) else {}


def _parsed(parse: Callable[[Any], T], data: Any) -> T:
    try:
        return parse(data)
    except p.ProtocolError as exc:
        raise BadServerAnswer(f"the server's answer breaks the protocol: {exc}") from None
    except UnsafePath as exc:
        raise BadServerAnswer(f"the server's answer names an unsafe path: {exc.message}") from None


def _tls_reason(exc: BaseException) -> str:
    """Why a TLS handshake failed (expired, wrong host, unknown issuer), without the URL noise."""
    text = str(exc)
    match = (
        re.search(r"certificate verify failed: (.+?)\s*\(_ssl\.c", text)
        or re.search(r"certificate verify failed: ([^'\"()]+)", text)
        or re.search(r"\[SSL: [A-Z_]+\] ([^'\"()]+)", text)
    )
    return _clean(match.group(1).strip().rstrip(".")) if match else _clean(_short(exc))


def _short(exc: BaseException) -> str:
    """A connection error's reason without the URL noise requests wraps it in."""
    text = str(exc)
    match = re.search(
        r"\[Errno -?\d+\] [^'\")]+|Connection refused|Connection reset[^'\")]*|timed out", text
    )
    return match.group(0) if match else type(exc).__name__
