"""syncengine: offline-first sync for folders of documents.

The public API is small on purpose; the CLI uses exactly this::

    from syncengine import Workspace
    ws = Workspace.find(".")
    ws.status(); ws.snapshot("before the big edit"); ws.restore("latest")

Names are loaded on first use, so importing a submodule (the server, the
protocol) does not pay for the whole engine.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from syncengine.engine import Workspace
    from syncengine.errors import SyncEngineError

__all__ = ["SyncEngineError", "Workspace"]

_WHERE = {"Workspace": "syncengine.engine", "SyncEngineError": "syncengine.errors"}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        import importlib

        value = getattr(importlib.import_module(_WHERE[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'syncengine' has no attribute {name!r}")
