"""Typed settings of one replica, with their defaults: ``.syncengine/config.toml``.

Settings are what a person chooses; state (checkpoint, client id) lives in
the journal. Unknown keys and wrong types are a UsageError naming the key,
so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from syncengine.errors import UsageError

# The conflict strategies `sync.strategy`, --strategy and .syncrules may name. Here rather than in
# syncengine.conflicts (which still names them), which only a round with something to settle needs.
STRATEGIES = ("merge", "keep-both", "local", "remote", "newest", "manual")


def check_strategy(name: str) -> str:
    if name not in STRATEGIES:
        raise UsageError(f"unknown strategy {name!r} (choose from {', '.join(STRATEGIES)})")
    return name


@dataclass
class ServerConfig:
    """``[server]``: where this workspace syncs and how hard to try (the token is kept by syncengine.credentials)."""

    url: str = ""  # sync server base URL, e.g. http://127.0.0.1:8765
    workspace: str = ""  # workspace name on the server
    ca_file: str = ""  # CA bundle to verify the server's certificate (empty: system CAs)
    allow_http: bool = False  # allow plain HTTP to a host other than loopback
    timeout: float = 30.0  # seconds per request
    retries: int = 4  # attempts on connection errors and 5xx before giving up


@dataclass
class SyncConfig:
    """``[sync]``: a round's defaults (strategy, delete guard, batch size, lock wait)."""

    strategy: str = "merge"  # default conflict strategy (merge, keep-both, local, remote, newest, manual)
    max_delete: float = 50.0  # percent of the workspace one round may delete without --force
    max_delete_min: int = 10  # ... and the guard trips only above this many files too
    batch: int = 100  # changes per commit request
    wait: float = 30.0  # seconds to wait for another sync's lock before exit 7


@dataclass
class AutosaveConfig:
    """``[autosave]``: when the daemon takes a snapshot of pending edits."""

    max_pending: int = 10  # snapshot at once when this many distinct paths are pending
    min_interval: float = 5.0  # ... or when this many seconds passed since the last snapshot
    idle: float = 30.0  # snapshot what is left pending after this many quiet seconds


@dataclass
class DaemonConfig:
    """``[daemon]``: the watcher's timings and the fallbacks when watching or the live channel fail."""

    coalesce_ms: int = 200  # change-tracker window per path: a path busy this long is looked at anyway
    settle_ms: int = 40  # ... and a path quiet this long is looked at at once
    rescan_interval: float = 3600.0  # full rescan safety net (jittered ±10%)
    fallback_scan: float = 10.0  # full-scan interval when the OS refuses a watch (limits reached)
    poll_interval: float = 30.0  # pull interval when the live WebSocket is unavailable
    heartbeat: float = 15.0  # WebSocket heartbeat seconds
    max_backoff: float = 60.0  # longest wait between sync retries while the server is unreachable
    stall_after: float = 600.0  # status calls syncing stalled after this long without success


@dataclass
class HistoryConfig:
    """``[history]``: what `gc` keeps of the snapshots."""

    keep: str = "30d"  # gc keeps snapshots younger than this (s, m, h, d, w)
    keep_last: int = 20  # ... and always at least this many snapshots


@dataclass
class Config:
    """config.toml as values: every section with its defaults, so a file naming few keys is complete."""

    server: ServerConfig = field(default_factory=ServerConfig)
    sync: SyncConfig = field(default_factory=SyncConfig)
    autosave: AutosaveConfig = field(default_factory=AutosaveConfig)
    daemon: DaemonConfig = field(default_factory=DaemonConfig)
    history: HistoryConfig = field(default_factory=HistoryConfig)

    @classmethod
    def load(cls, path: Path) -> Config:
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise UsageError(f"{path} is not valid TOML: {exc}", title="Bad configuration")
        return cls.from_dict(raw, source=str(path))

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config") -> Config:
        config = cls()
        for section, values in raw.items():
            target = getattr(config, section, None)
            if target is None or not dataclasses.is_dataclass(target) or not isinstance(values, dict):
                raise UsageError(f"unknown section [{section}] in {source}", title="Bad configuration")
            known = {f.name: f for f in dataclasses.fields(target)}
            for key, value in values.items():
                if key not in known:
                    raise UsageError(f"unknown key {section}.{key} in {source}", title="Bad configuration")
                expected = type(getattr(target, key))
                if expected is float and isinstance(value, int) and not isinstance(value, bool):
                    value = float(value)
                if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
                    raise UsageError(
                        f"{section}.{key} must be {expected.__name__}, not {type(value).__name__} in {source}",
                        title="Bad configuration",
                    )
                setattr(target, key, value)
        return config

    def to_toml(self) -> str:
        """The whole file, with a comment per key taken from the defaults above.

        Written by hand, not through tomlkit: every value is a str, bool, int
        or float and each section a flat table, and tomlkit's import and
        document model were 15-18 ms of CPU of every `init` (this: ~1 ms).
        The text is the one tomlkit wrote; tests/test_config.py reads it
        back with tomllib.
        """
        comments = _field_comments()
        lines = ["# syncengine replica settings; see docs/configuration.md", ""]
        for section in dataclasses.fields(self):
            values = getattr(self, section.name)
            lines.append(f"[{section.name}]")
            for f in dataclasses.fields(values):
                note = comments.get((section.name, f.name))
                lines.append(f"{f.name} = {_toml_value(getattr(values, f.name))}" + (f" # {note}" if note else ""))
            lines.append("")
        return "\n".join(lines[:-1]) + "\n"

    def save(self, path: Path) -> None:
        from syncengine.fsops import write_config_file

        write_config_file(path, self.to_toml().encode())


def _field_comments() -> dict[tuple[str, str], str]:
    """Read the '# ...' comment after each default in this file's source."""
    import inspect
    import re

    out: dict[tuple[str, str], str] = {}
    source = inspect.getsource(inspect.getmodule(Config))
    section = None
    for line in source.splitlines():
        head = re.match(r"class (\w+)Config\b", line)
        if head:
            section = head.group(1).lower()
            continue
        m = re.match(r"\s+(\w+): [\w\[\] |]+ = .*?#\s*(.+)$", line)
        if m and section:
            out[(section, m.group(1))] = m.group(2).strip()
    return out


_TOML_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}


def _toml_value(value: Any) -> str:
    """A str, bool, int or float as a TOML value (a basic string escapes what TOML does not allow raw)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)  # 30.0, 1e+16, inf, -inf, nan: all TOML floats
    if isinstance(value, str):
        return '"' + "".join(_TOML_ESCAPES.get(c) or (f"\\u{ord(c):04x}" if c < " " or c == "\x7f" else c)
                             for c in value) + '"'
    raise TypeError(f"no TOML form for {type(value).__name__}")


def parse_duration(text: str) -> float:
    """'30d', '12h', '90m', '45s', '2w' -> seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
    text = text.strip().lower()
    try:
        if text[-1] in units:
            return float(text[:-1]) * units[text[-1]]
        return float(text)
    except (ValueError, IndexError):
        raise UsageError(f"bad duration {text!r} (use e.g. 30d, 12h, 90m)")
