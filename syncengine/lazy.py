"""Names a module keeps importable while they live, and are loaded, elsewhere (PEP 562's module ``__getattr__``).

Start-up moved classes out of the modules every command imports (models,
views, protocol) into modules loaded on first use; ``from syncengine.models
import Status`` must still work. This module imports nothing of ours, so the
protocol (shared with the server) may use it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def forwarding(namespace: dict[str, Any], homes: Mapping[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` that loads ``homes[name]`` (a module) on first use and keeps the value."""

    def __getattr__(name: str) -> Any:
        home = homes.get(name)
        if home is None:
            raise AttributeError(f"module {namespace['__name__']!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(home), name)
        namespace[name] = value
        return value

    return __getattr__
