"""Document kinds: what a file is, how it parses, how it is written back, how
two versions differ. Pure: bytes in, values or bytes out, no I/O.

Parsing is strict on purpose (RELIABILITY E1/E2): a document that a merge
could misread — duplicate keys (the parser would keep only the last value),
``NaN``/``Infinity``, absurd nesting or integer sizes, bytes that are not
UTF-8 — raises :class:`~syncengine.errors.MalformedDocument`, and the caller
falls back to keeping both versions whole. A UTF-8 byte-order mark is
accepted (Windows editors write one) and written back only where the base
version had one. The rules are spelled out in ``docs/formats.md``.

Parsed values are plain Python (dict, list, str, int, float, bool, None, and
dates for YAML/TOML), so they compare and serialise the same whatever the
kind; comments and layout come back from the ``like`` bytes at
:func:`serialize` time.
"""

from __future__ import annotations

import codecs
import json
import math
import os
import re
from typing import TYPE_CHECKING, Any

from syncengine.docstyle import (
    dump_json,
    dump_toml,
    dump_yaml,
    load_yaml,
    yaml_expanded_size,
    yaml_plain,
)
from syncengine.errors import MalformedDocument
from syncengine.fieldpaths import ROOT
from syncengine.models import Kind

if TYPE_CHECKING:
    from syncengine.docdiff import FieldChange  # its module loads deepdiff: made only where a diff is asked for

__all__ = [
    "HEAD_BYTES",
    "MAX_DEPTH",
    "MAX_NODES",
    "changed_zones",
    "describe_diff",
    "field_changes",
    "kind_for",
    "parse",
    "serialize",
    "unified_diff",
]

HEAD_BYTES = 8192  # how much of a file kind_for needs to tell text from binary
MAX_DEPTH = 100  # deeper documents are hostile or broken; keeps every walk off the C stack
MAX_NODES = 2_000_000  # caps YAML alias bombs ("billion laughs") before anything walks them
BOM = codecs.BOM_UTF8

_BY_EXTENSION = {"json": Kind.JSON, "yaml": Kind.YAML, "yml": Kind.YAML, "toml": Kind.TOML}
# one string each, split once: a list literal of 90 extensions is 90 lines after formatting
_TEXT_EXTENSIONS = frozenset(
    "md markdown txt text csv tsv rst adoc org tex html htm xml svg ini cfg conf log py js ts"  # noqa: SIM905
    " css sh sql srt vtt".split()
)
_BINARY_EXTENSIONS = frozenset(
    "png jpg jpeg gif webp bmp tif tiff ico heic avif psd pdf zip gz tgz bz2 xz zst 7z rar tar"  # noqa: SIM905
    " jar docx xlsx pptx odt ods odp doc xls ppt epub mp3 mp4 m4a mov avi mkv wav flac ogg webm"
    " woff woff2 ttf otf sqlite db exe dll so dylib bin class pyc parquet npy pkl".split()
)
_FLOW_RUN = re.compile(r"(?:[\[{]\s*){" + str(MAX_DEPTH + 1) + "}")
_NAMES = {Kind.JSON: "JSON", Kind.YAML: "YAML", Kind.TOML: "TOML", Kind.TEXT: "UTF-8 text"}


def kind_for(path: str, head: bytes | None = None) -> Kind:
    """The kind of ``path``, from its extension and, where that is not enough,
    from ``head`` (the first bytes of the file; only :data:`HEAD_BYTES` are read).

    A known text extension without a ``head`` is taken at its word; an unknown
    extension without one is binary, because binary is never merged and so
    never damaged.
    """
    ext = os.path.splitext(path)[1].lower().lstrip(".")
    if ext in _BY_EXTENSION:
        return _BY_EXTENSION[ext]
    if ext in _BINARY_EXTENSIONS:
        return Kind.BINARY
    if head is None:
        return Kind.TEXT if ext in _TEXT_EXTENSIONS else Kind.BINARY
    return Kind.TEXT if _looks_like_text(head[:HEAD_BYTES]) else Kind.BINARY


def _looks_like_text(head: bytes) -> bool:
    if b"\0" in head:
        return False
    try:
        # final=False: the head may cut a multi-byte character in two
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
    except UnicodeDecodeError:
        return False
    return True


def _decode(kind: Kind, data: bytes) -> str:
    if kind is not Kind.TEXT and data.startswith(BOM):
        data = data[len(BOM) :]  # a BOM on text is content and kept; on data it is noise
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MalformedDocument(
            f"does not parse as {_NAMES[kind]}: not UTF-8 (byte {exc.start})"
        ) from None


def parse(kind: Kind, data: bytes) -> Any:
    """The value of a document, or :class:`MalformedDocument` with one clear line."""
    if kind is Kind.BINARY:
        raise MalformedDocument("binary documents have no parsed form")
    text = _decode(kind, data)
    if kind is Kind.TEXT:
        return text
    name = _NAMES[kind]
    try:
        if kind is Kind.JSON:
            value = json.loads(
                text,
                object_pairs_hook=_unique_keys,
                parse_constant=_no_constant,
                parse_float=_finite_float,
            )
        elif kind is Kind.YAML:
            if _FLOW_RUN.search(text):  # ruamel's scanner takes seconds on these
                raise MalformedDocument(f"does not parse as YAML: nested deeper than {MAX_DEPTH}")
            value = load_yaml(text)
            yaml_expanded_size(value, MAX_NODES)  # before anything expands aliases
            value = yaml_plain(value)
        else:
            import tomlkit

            value = tomlkit.parse(text).unwrap()
    except MalformedDocument:
        raise
    except RecursionError:
        raise MalformedDocument(f"does not parse as {name}: nested too deeply") from None
    except Exception as exc:  # foreign parsers raise many types on hostile input
        raise MalformedDocument(f"does not parse as {name}: {_one_line(exc)}") from exc
    _check_shape(value, name)
    return value


def _one_line(exc: BaseException) -> str:
    problem, mark = getattr(exc, "problem", None), getattr(exc, "problem_mark", None)
    if problem and mark is not None:  # ruamel: say what is wrong, then where
        return f"{problem} (line {mark.line + 1}, column {mark.column + 1})"
    text = str(exc)
    if "integer string conversion" in text:
        return "an integer has too many digits"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return " ".join(lines[:3])[:200] or type(exc).__name__


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise MalformedDocument(f"does not parse as JSON: duplicate key {key!r}")
        out[key] = value
    return out


def _no_constant(name: str) -> Any:
    raise MalformedDocument(f"does not parse as JSON: {name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise MalformedDocument(f"does not parse as JSON: {text[:40]} overflows a float")
    return value


def _check_shape(value: Any, name: str) -> None:
    """Iteratively bound depth and size, and refuse non-finite floats."""
    stack = [(value, 1)]
    nodes = 0
    while stack:
        item, depth = stack.pop()
        nodes += 1
        if nodes > MAX_NODES:
            raise MalformedDocument(f"does not parse as {name}: more than {MAX_NODES} values")
        if isinstance(item, float) and not math.isfinite(item):
            raise MalformedDocument(f"does not parse as {name}: NaN or Infinity is not allowed")
        if isinstance(item, dict | list):
            if depth > MAX_DEPTH:
                raise MalformedDocument(
                    f"does not parse as {name}: nested deeper than {MAX_DEPTH} levels"
                )
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)


def serialize(kind: Kind, value: Any, *, like: bytes | None = None) -> bytes:
    """Bytes for ``value``, in the style of ``like`` (normally the merge base).

    Deterministic: the same (kind, value, like) always gives the same bytes.
    JSON takes indentation, separators, ``ensure_ascii``, line endings, the
    trailing newline and the BOM from ``like``; YAML and TOML rewrite ``like``
    in place through round-trip libraries, so comments and layout of every
    untouched part survive.
    """
    if kind is Kind.BINARY:
        if not isinstance(value, bytes):
            raise TypeError("a binary document is written from bytes")
        return value
    if kind is Kind.TEXT:
        return value.encode("utf-8")
    like = like or None
    try:
        if kind is Kind.JSON:
            out = dump_json(value, like)
        elif kind is Kind.YAML:
            out = dump_yaml(value, like)
        else:
            out = dump_toml(value, like)
    except (TypeError, ValueError) as exc:
        raise MalformedDocument(f"cannot be written as {_NAMES[kind]}: {exc}") from exc
    if like is not None and like.startswith(BOM) and not out.startswith(BOM):
        out = BOM + out
    return out


# ------------------------------------------------------------------ diffs


def field_changes(kind: Kind, old: bytes, new: bytes) -> list[FieldChange]:
    """Field-level changes from ``old`` to ``new``, in document order.

    Raises :class:`MalformedDocument` if either side does not parse (see
    :func:`describe_diff` for the forgiving version).
    """
    if not kind.structured:
        raise MalformedDocument(f"{kind.value} documents have no fields")
    from syncengine.docdiff import diff_values

    return diff_values(parse(kind, old), parse(kind, new))


def unified_diff(old: bytes | None, new: bytes | None, old_name: str, new_name: str) -> str:
    """A unified text diff (git style, ``\\ No newline at end of file`` included).

    ``None`` is an absent file; bytes that are not UTF-8 give one line saying
    so instead of a diff.
    """
    texts = []
    for data, name in ((old, old_name), (new, new_name)):
        try:
            texts.append("" if data is None else data.decode("utf-8"))
        except UnicodeDecodeError:
            return f"{name} is not UTF-8 text: no text diff\n"
    import difflib  # (with heapq, ~4 ms) for `diff` only: a scan or a round asks this module about kinds

    out = []
    for line in difflib.unified_diff(
        texts[0].splitlines(keepends=True),
        texts[1].splitlines(keepends=True),
        "/dev/null" if old is None else old_name,
        "/dev/null" if new is None else new_name,
    ):
        out.append(line if line.endswith("\n") else line + "\n\\ No newline at end of file\n")
    return "".join(out)


def describe_diff(
    path: str, kind: Kind, old: bytes | None, new: bytes | None
) -> tuple[list[FieldChange], str | None, str | None]:
    """``(fields, unified, note)`` for showing one document's change.

    Structured and both sides parse: fields only. A side that is absent:
    unified text. A side that does not parse: unified text and a note saying
    why. Text: unified. Binary or undecodable: no diff, a note (the caller
    shows sizes and hashes).
    """
    if kind is Kind.BINARY:
        return [], None, "binary: compared by size and hash"
    note = None
    if kind.structured and old is not None and new is not None:
        try:
            return field_changes(kind, old, new), None, None
        except MalformedDocument:
            note = f"does not parse as {_NAMES[kind]}: compared as text"
    for data in (old, new):
        if data is not None and _not_utf8(data):
            return [], None, "not UTF-8 text: compared by size and hash"
    return [], unified_diff(old, new, f"a/{path}", f"b/{path}"), note


def _not_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


def changed_zones(kind: Kind, old: bytes | None, new: bytes | None) -> list[str]:
    """Paths of the fields that changed, for the ``zones`` event channel.

    ``["$"]`` when a structured document appears or disappears whole; ``[]``
    when the kind has no fields or a side does not parse.
    """
    if not kind.structured or (old is None and new is None):
        return []
    if old is None or new is None:
        return [ROOT]
    try:
        return [change.path for change in field_changes(kind, old, new)]
    except MalformedDocument:
        return []
