"""The server runs on uvicorn's C parts, not its pure-Python fallbacks.

uvicorn chooses httptools and uvloop on its own ("auto") when they are
installed and falls back to h11 and asyncio silently: about an eighth more
server CPU per first sync (docs/performance.md). These pin the choice that
`syncengine serve` and the test servers get.
"""

from __future__ import annotations

import sys

import pytest


def test_http_parser_is_httptools() -> None:
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    assert AutoHTTPProtocol.__name__ == "HttpToolsProtocol"


@pytest.mark.skipif(sys.platform == "win32", reason="uvloop does not run on Windows")
def test_event_loop_is_uvloop() -> None:
    from uvicorn.loops.auto import auto_loop_factory

    loop = auto_loop_factory()()
    try:
        assert type(loop).__module__.startswith("uvloop")
    finally:
        loop.close()
