"""Oversized and malformed bodies cost the server bounded memory (RELIABILITY E4).

A real `syncengine serve` process gets bodies that would be huge if held:
an endless chunked JSON body, a 1 GiB gzip bomb, a pack whose header never
ends, a pack body past its cap, a blob upload past its cap, and a 16 MiB
nest of brackets. Each is refused (413 or 400, or the connection is cut
after the answer), and the process's peak RSS (VmHWM) grows by far less
than what was thrown at it. The server still answers afterwards.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from syncengine import protocol as p
from tests.replicas import ServeProcess

pytestmark = pytest.mark.integration

MIB = 1 << 20
ONES = hashlib.sha256(b"\1" * MIB).hexdigest()


def _send(port: int, method: str, path: str, headers: dict[str, str], chunks: Iterator[bytes]) -> int | str:
    """Stream a chunked body; the status the server answered, or "cut" if it hung up first."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.putrequest(method, path)
        for key, value in {**headers, "Transfer-Encoding": "chunked"}.items():
            conn.putheader(key, value)
        conn.endheaders()
        try:
            for chunk in chunks:
                conn.send(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            conn.send(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server stopped reading: its answer, if any, is waiting
        try:
            response = conn.getresponse()
            response.read()
            return response.status
        except (ConnectionResetError, http.client.RemoteDisconnected, BrokenPipeError):
            return "cut"
    finally:
        conn.close()


def _repeat(chunk: bytes, total: int) -> Iterator[bytes]:
    sent = 0
    while sent < total:
        yield chunk
        sent += len(chunk)


def _gzip_bomb(inflated: int) -> bytes:
    comp = zlib.compressobj(9, zlib.DEFLATED, 31)
    zeros = b"\0" * (8 * MIB)
    out = [comp.compress(zeros) for _ in range(inflated // len(zeros))]
    return b"".join(out) + comp.flush()


def test_hostile_bodies_are_refused_in_bounded_memory(tmp_path: Path):
    """GiBs of hostile body (endless, bombs, never-ending pack headers) raise the server's peak RSS < 80 MiB."""
    with ServeProcess(tmp_path / "data", tmp_path / "serve.log", "--max-blob", str(64 * MIB),
                      "--log-level", "warning") as server:
        token = server.token("w")
        headers = {p.PROTOCOL_HEADER: "1", "Authorization": f"Bearer {token}"}
        json_headers = {**headers, "Content-Type": "application/json"}
        base = "/v1/ws/w"
        # warm up every route once, so the baseline includes what any server holds anyway
        assert _send(server.port, "POST", f"{base}/blobs/missing", json_headers,
                     iter([json.dumps({"hashes": ["0" * 64]}).encode()])) == 200
        assert _send(server.port, "PUT", f"{base}/blobs/{'0' * 64}", headers, iter([b"x" * MIB])) == 400
        baseline = server.peak_rss_kib()
        bomb = _gzip_bomb(1 << 30)
        assert len(bomb) < 2 * MIB
        outcomes = {
            "endless json": _send(server.port, "POST", f"{base}/commit", json_headers,
                                  _repeat(b'{"client_id": "c", "items": [' + b" " * MIB, 512 * MIB)),
            "gzip bomb": _send(server.port, "POST", f"{base}/commit", {**json_headers, "Content-Encoding": "gzip"},
                               iter([bomb])),
            "gzip bomb pack": _send(server.port, "POST", f"{base}/blobs/pack",
                                    {**headers, "Content-Encoding": "gzip"}, iter([bomb])),
            "endless pack header": _send(server.port, "POST", f"{base}/blobs/pack", headers,
                                         _repeat(b"[" * MIB, 256 * MIB)),
            "pack with an endless tail": _send(server.port, "POST", f"{base}/blobs/pack", headers, _chain(
                p.PackHeader((p.PackEntry(ONES, MIB),) * 32).encode(), _repeat(b"\1" * MIB, 256 * MIB))),
            "blob past its cap": _send(server.port, "PUT", f"{base}/blobs/{'0' * 64}", headers,
                                       _repeat(b"\2" * MIB, 256 * MIB)),
            "deep brackets": _send(server.port, "POST", f"{base}/commit", json_headers,
                                   _repeat(b"[" * MIB, 15 * MIB)),
        }
        growth_mib = (server.peak_rss_kib() - baseline) / 1024
        expected = {"endless json": {413}, "gzip bomb": {413}, "gzip bomb pack": {400, 413},
                    "endless pack header": {400}, "pack with an endless tail": {400}, "blob past its cap": {413},
                    "deep brackets": {400}}
        for name, status in outcomes.items():
            assert status in expected[name] | {"cut"}, (name, status)
        assert {outcomes["gzip bomb"], outcomes["deep brackets"]} <= {413, 400}  # these always get their answer
        assert growth_mib < 80, f"peak RSS grew by {growth_mib:.0f} MiB"
        assert _send(server.port, "GET", f"{base}/changes", headers, iter([])) == 200
    log = (tmp_path / "serve.log").read_text()
    assert "Traceback" not in log and "Exception" not in log, log[-3000:]


def _chain(first: bytes, rest: Iterator[bytes]) -> Iterator[bytes]:
    yield first
    yield from rest
