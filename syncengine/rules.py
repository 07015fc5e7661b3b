"""``.syncrules``: which strategy settles a conflict, per glob, per conflict kind, per field.

The file lives at the workspace root and is synced like any file (as
``.gitattributes`` is committed), so every replica settles a conflict the
same way. It is TOML, described with examples in ``docs/conflicts.md``::

    strategy = "merge"                 # this workspace's default (optional)

    [[rule]]                           # first matching rule wins
    path = ["*.json", "data/**"]       # gitignore-style globs (optional)
    kind = "both-modified"             # conflict kinds (optional)
    strategy = "merge"                 # optional: merge, the only one fields apply to
    fields = { "meta.updated_at" = "newest", tags = "union" }

Parsing is strict: an unknown key, a wrong type, an unknown strategy or
kind is a :class:`UsageError` (exit 2) naming the rule, raised before a
sync touches anything — a typo must never quietly pick another strategy.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from syncengine.config import STRATEGIES
from syncengine.errors import UsageError
from syncengine.fieldpaths import segments
from syncengine.paths import RULES_FILE

__all__ = ["KINDS", "Rule", "Rules", "load", "parse"]

# Kinds a strategy decides. modified-deleted and deleted-modified are not
# here: the modification always survives (DESIGN §5), whatever a rule says.
KINDS = ("both-modified", "both-created", "both-moved")
_RULE_KEYS = {"path", "kind", "strategy", "fields"}


# eq=False (both): read field by field, never compared whole; every `sync` loads this module to look for the file
@dataclass(frozen=True, eq=False)
class Rule:
    """One ``[[rule]]``: where it applies (globs, kinds) and what it picks."""

    globs: tuple[str, ...] = ()
    kinds: tuple[str, ...] = ()
    strategy: str | None = None
    fields: dict[str, str] = field(default_factory=dict)
    _spec: Any = field(default=None, repr=False, compare=False)

    def matches(self, path: str, kind: str | None) -> bool:
        """True when ``path`` matches a glob (or there are none) and the kind fits."""
        if self.kinds and kind is not None and kind not in self.kinds:
            return False
        return self._spec is None or self._spec.match_file(path)


@dataclass(frozen=True, eq=False)
class Rules:
    """A parsed ``.syncrules``: a default strategy and an ordered list of rules."""

    default: str | None = None
    rules: tuple[Rule, ...] = ()

    def for_path(self, path: str, kind: str | None = None) -> tuple[str | None, dict[str, str] | None]:
        """(strategy, field rules) for a conflict on ``path``; None where nothing is said.

        The first rule matching both the path and the conflict kind wins; a
        rule without a strategy names fields, which only a merge uses, so it
        merges whatever the default is. ``kind=None`` (a caller that does
        not know it) skips only the kind check.
        """
        for rule in self.rules:
            if rule.matches(path, kind):
                return rule.strategy or ("merge" if rule.fields else self.default), dict(rule.fields) or None
        return self.default, None


def load(root: Path) -> Rules | None:
    """The workspace's rules, or None when it has no ``.syncrules``."""
    target = Path(root) / RULES_FILE
    try:
        raw = target.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise _bad(f"cannot be read: {exc.strerror or exc}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _bad("not UTF-8 text")
    return parse(text)


def parse(text: str) -> Rules:
    """Parse the text of a ``.syncrules`` file strictly."""
    import tomllib  # only with a file to parse: every round loads this module to look for one

    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise _bad(f"not valid TOML: {exc}")
    unknown = sorted(set(data) - {"strategy", "rule"})
    if unknown:
        raise _bad(f"unknown key {unknown[0]!r} (expected 'strategy' and [[rule]] tables)")
    default = _strategy(data.get("strategy"), "the top-level strategy")
    rules = data.get("rule", [])
    if not isinstance(rules, list) or not all(isinstance(r, dict) for r in rules):
        raise _bad("'rule' must be an array of tables: write each one as [[rule]]")
    return Rules(default, tuple(_rule(raw, n) for n, raw in enumerate(rules, 1)))


def _rule(raw: dict[str, Any], n: int) -> Rule:
    where = f"rule {n}"
    unknown = sorted(set(raw) - _RULE_KEYS)
    if unknown:
        raise _bad(f"{where}: unknown key {unknown[0]!r} (expected {', '.join(sorted(_RULE_KEYS))})")
    globs = _strings(raw.get("path"), f"{where}: path")
    for glob in globs:
        if not glob.strip() or glob.startswith("!"):
            raise _bad(f"{where}: path {glob!r} is not a glob (empty or negated)")
    kinds = _strings(raw.get("kind"), f"{where}: kind")
    for kind in kinds:
        if kind not in KINDS:
            extra = (" (a modification always survives a deletion; no strategy applies)"
                     if kind in ("modified-deleted", "deleted-modified") else "")
            raise _bad(f"{where}: unknown conflict kind {kind!r}, choose from {', '.join(KINDS)}{extra}")
    strategy = _strategy(raw.get("strategy"), where)
    fields = _fields(raw.get("fields", {}), where)
    if fields and strategy not in (None, "merge"):
        raise _bad(f"{where}: fields apply only to the merge strategy, not {strategy!r}")
    if strategy is None and not fields:
        raise _bad(f"{where}: says neither a strategy nor fields")
    spec = _spec(globs) if globs else None
    return Rule(globs, kinds, strategy, fields, spec)


def _spec(globs: tuple[str, ...]) -> Any:
    # pathspec (~10 ms to import) loads only for a .syncrules whose rules name paths.
    import pathspec

    return pathspec.GitIgnoreSpec.from_lines(globs)


def _strategy(value: Any, where: str) -> str | None:
    if value is None:
        return None
    if value not in STRATEGIES:
        raise _bad(f"{where}: unknown strategy {value!r}, choose from {', '.join(STRATEGIES)}")
    return value


def _strings(value: Any, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items or not all(isinstance(v, str) for v in items):
        raise _bad(f"{where} must be a string or a non-empty list of strings")
    return tuple(items)


def _fields(value: Any, where: str) -> dict[str, str]:
    """Field rules, with nested tables flattened: ``meta.updated_at = "newest"`` is one path."""
    if not isinstance(value, dict):
        raise _bad(f"{where}: fields must be a table of field path = strategy")
    from syncengine.merge import STRATEGIES as FIELD_STRATEGIES  # the merge stack, only for field rules

    out: dict[str, str] = {}
    for pattern, strategy in _flatten(value, ""):
        if not segments(pattern):
            raise _bad(f"{where}: empty field path")
        if strategy not in FIELD_STRATEGIES:
            raise _bad(f"{where}: field {pattern}: unknown field strategy {strategy!r}, "
                       f"choose from {', '.join(sorted(FIELD_STRATEGIES))}")
        out[pattern] = strategy
    return out


def _flatten(table: dict[str, Any], prefix: str) -> Iterable[tuple[str, Any]]:
    for key, value in table.items():
        path = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict):
            yield from _flatten(value, path)
        else:
            yield path, value


def _bad(problem: str) -> UsageError:
    return UsageError(problem, title=f"Bad {RULES_FILE}", hint="nothing was synced; see docs/conflicts.md")
