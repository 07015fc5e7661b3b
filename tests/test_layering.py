"""Layers point one way: the library never imports the CLI or the server stack."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FORBIDDEN_IN_LIBRARY = {"cli", "click", "fastapi", "uvicorn", "starlette", "rich"}
SERVER_ONLY = {"fastapi", "uvicorn", "starlette"}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def _full_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_library_never_imports_cli_click_or_server_stack():
    """No module of syncengine/ outside server/ imports cli, click, rich or the ASGI stack."""
    offenders = {}
    for path in (REPO / "syncengine").rglob("*.py"):
        if "server" in path.relative_to(REPO / "syncengine").parts:
            continue
        bad = _imports(path) & FORBIDDEN_IN_LIBRARY
        if bad:
            offenders[str(path.relative_to(REPO))] = bad
    assert not offenders


def test_library_never_imports_the_server_package():
    """No module of syncengine/ outside server/ imports syncengine.server (relative imports included)."""
    offenders = {}
    root = REPO / "syncengine"
    for path in root.rglob("*.py"):
        parts = path.relative_to(root).parts
        if parts[0] == "server":
            continue
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                package = ["syncengine", *parts[:-1]]
                base = package[: len(package) - node.level + 1] if node.level else []
                module = ".".join([*base, *(node.module.split(".") if node.module else [])])
                names = [module] + [f"{module}.{alias.name}" for alias in node.names]
            if any(n == "syncengine.server" or n.startswith("syncengine.server.") for n in names):
                offenders.setdefault(str(path.relative_to(REPO)), set()).update(names)
    assert not offenders


def test_server_shares_only_protocol_and_errors_with_the_client():
    """syncengine/server imports from syncengine only protocol, errors, paths and failpoints."""
    allowed = {"syncengine.protocol", "syncengine.errors", "syncengine.paths", "syncengine.failpoints"}
    offenders = {}
    server = REPO / "syncengine" / "server"
    for path in server.rglob("*.py"):
        used = {m for m in _full_imports(path) if m.startswith("syncengine") and not m.startswith("syncengine.server")}
        if used - allowed:
            offenders[str(path.relative_to(REPO))] = used - allowed
    assert not offenders


def test_peewee_only_inside_journal_and_server():
    """peewee is known only to syncengine/journal (client) and syncengine/server."""
    offenders = []
    for path in (REPO / "syncengine").rglob("*.py"):
        parts = path.relative_to(REPO / "syncengine").parts
        if parts[0] in ("journal", "server"):
            continue
        if "peewee" in _imports(path):
            offenders.append(str(path))
    assert not offenders


def test_importing_the_library_does_not_load_the_server_stack():
    """`import syncengine` loads no ASGI framework (fast CLI start)."""
    code = ("import sys, syncengine, syncengine.engine; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in {'fastapi','uvicorn','starlette','click'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_public_api_all_is_sorted_and_complete():
    """syncengine.__all__ is sorted and every name in it exists."""
    import syncengine

    assert syncengine.__all__ == sorted(syncengine.__all__)
    for name in syncengine.__all__:
        assert hasattr(syncengine, name)
