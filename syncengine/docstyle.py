"""Writing values back in the style of an existing version (the merge base).

JSON has no round-trip library in the standard one, so its style is read off
the ``like`` bytes (indent, separators, escapes, line endings). YAML and TOML
go through round-trip libraries: ``like`` is parsed again and edited in place
to equal the new value, so every untouched key keeps its comments, quoting
and layout. The heavy libraries are imported on first use: a CLI command
that never writes YAML never pays for ruamel.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Callable, Mapping, MutableSequence
from typing import Any

from syncengine.fieldpaths import id_index, same

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_NON_ASCII_ESCAPE = re.compile(r"\\u(?!00[0-7])[0-9a-fA-F]{4}")


def _newline(text: str) -> str:
    return "\r\n" if "\r\n" in text else "\n"


def dump_json(value: Any, like: bytes | None) -> bytes:
    """JSON text of ``value`` in the style of ``like`` (2-space indent without one)."""
    indent: str | int | None = 2
    item_sep, key_sep = ",", ": "
    ensure_ascii = False  # UTF-8 text reads better; only a base that escaped keeps escaping
    newline, trailing = "\n", True
    if like is not None:
        text = like.decode("utf-8-sig", errors="replace")
        skeleton = _STRING.sub('""', text)  # string contents say nothing about layout
        body = skeleton.strip()
        newline, trailing = _newline(text), text.endswith("\n")
        if "\n" in body:
            first = re.search(r"\n([ \t]+)\S", body)
            indent = first.group(1) if first else 2
        else:
            indent = None
            item_sep = ", " if re.search(r",\s", body) else ","
        if re.search(r'"":', skeleton) and not re.search(r'"":\s', skeleton):
            key_sep = ":"
        if not text.isascii():
            ensure_ascii = False
        elif _NON_ASCII_ESCAPE.search(text):
            ensure_ascii = True
    options = {"indent": indent, "separators": (item_sep, key_sep), "allow_nan": False}
    # An indented document that writes some arrays or objects on one line (Prettier's
    # `"bbox": [1, 2, 3, 4]`, or a hand's) keeps them there: json.dumps would spread
    # every one over lines, and a merge of one field would rewrite half the file.
    layout = _json_layout(text, skeleton) if like is not None and indent is not None else None
    out = _dumps(value, ensure_ascii, options, layout)
    if not ensure_ascii and not out.isascii():
        try:
            out.encode("utf-8")
        except UnicodeEncodeError:
            # lone surrogates (legal as JSON escapes) cannot be UTF-8: keep them escaped
            out = _dumps(value, True, options, layout)
    if trailing:
        out += "\n"
    if newline != "\n":
        out = out.replace("\n", newline)  # JSON strings escape their newlines: only layout
    return out.encode("utf-8")


_INLINE_HINT = re.compile(r"[\[{][ \t]*[^\s\]}]")  # an opening bracket with content on its own line
_TOKEN = re.compile(_STRING.pattern + r'|[\[\]{},:]|[^\s\[\]{},:"]+')  # a string, a bracket or mark, a bare word


class _Layout:
    """Which containers of an indented JSON text sit on one line, by path and by path pattern.

    A pattern is the path with its array indices left out, so a new element
    (a zone added by the other side) is laid out as its siblings are. A plain
    class: a dataclass would be built by every CLI process that imports this.
    """

    def __init__(self) -> None:
        self.exact: dict[tuple, bool] = {}
        self.pattern: dict[tuple, list[int]] = {}  # [inline, spread] counts
        self.array_pad = ""  # "[ 1, 2 ]" or "[1, 2]", as the first inline array was written
        self.object_pad = ""
        self.item_sep = ", "
        self.key_sep = ": "

    def inline(self, path: tuple) -> bool:
        inline, spread = self.pattern.get(_pattern(path), (0, 0))
        if inline and not spread:
            return True
        if spread and not inline:
            return False
        return self.exact.get(path, inline > spread)


def _pattern(path: tuple) -> tuple:
    return tuple(None if type(part) is int else part for part in path)


def _json_layout(text: str, skeleton: str) -> _Layout | None:
    """The layout of ``text``, or None: nothing is on one line, or text it cannot follow (json.dumps's layout)."""
    if not _INLINE_HINT.search(skeleton):
        return None
    layout = _Layout()
    stack: list[list] = []  # [bracket, start offset, path, index in an array, key in an object]
    found_array = found_object = found_comma = False
    for match in _TOKEN.finditer(text):
        token = match.group()
        if token == "[" or token == "{":
            path = (*stack[-1][2], stack[-1][3] if stack[-1][0] == "[" else stack[-1][4]) if stack else ()
            stack.append([token, match.start(), path, 0, None])
        elif token == "]" or token == "}":
            if not stack or stack[-1][0] != ("[" if token == "]" else "{"):
                return None
            bracket, start, path, _index, _key = stack.pop()
            body = text[start:match.end()]
            if not body[1:-1].strip():
                continue  # empty: written "[]" either way
            inline = "\n" not in body
            layout.exact[path] = inline
            layout.pattern.setdefault(_pattern(path), [0, 0])[0 if inline else 1] += 1
            if not inline:
                continue
            if bracket == "[" and not found_array:
                found_array = True
                layout.array_pad = " " if body[1] == " " else ""
            elif bracket == "{" and not found_object:
                found_object = True
                layout.object_pad = " " if body[1] == " " else ""
                layout.key_sep = ": " if re.search(r":\s", _STRING.sub('""', body)) else ":"
            if not found_comma and "," in (bare := _STRING.sub('""', body)):
                found_comma = True
                layout.item_sep = ", " if re.search(r",\s", bare) else ","
        elif not stack:
            continue
        elif token == ",":
            stack[-1][3] += 1
            stack[-1][4] = None
        elif token[0] == '"' and stack[-1][0] == "{" and stack[-1][4] is None:
            try:
                stack[-1][4] = json.loads(token)
            except ValueError:
                return None
    return layout if not stack else None


def _dumps(value: Any, ensure_ascii: bool, options: dict[str, Any], layout: _Layout | None) -> str:
    if layout is None:
        return json.dumps(value, ensure_ascii=ensure_ascii, **options)
    indent = options["indent"]
    unit = indent if isinstance(indent, str) else " " * indent
    item_sep, key_sep = options["separators"]
    inline_options = {"separators": (layout.item_sep, layout.key_sep), "allow_nan": False,
                      "ensure_ascii": ensure_ascii}

    def dump(node: Any, path: tuple, depth: int) -> str:
        if isinstance(node, dict):
            brackets, pad = "{}", layout.object_pad
            children = [(json.dumps(key, ensure_ascii=ensure_ascii) + key_sep, key, child)
                        for key, child in node.items()]
        elif isinstance(node, (list, tuple)):
            brackets, pad = "[]", layout.array_pad
            children = [("", n, child) for n, child in enumerate(node)]
        else:
            return json.dumps(node, ensure_ascii=ensure_ascii, allow_nan=False)
        if not children:
            return brackets
        if layout.inline(path):
            return brackets[0] + pad + json.dumps(node, **inline_options)[1:-1] + pad + brackets[1]
        inner = "\n" + unit * (depth + 1)
        parts = [head + dump(child, (*path, step), depth + 1) for head, step, child in children]
        return brackets[0] + inner + (item_sep + inner).join(parts) + "\n" + unit * depth + brackets[1]

    return dump(value, (), 0)


# ------------------------------------------------------------------ YAML


def _yaml() -> Any:
    from ruamel.yaml import YAML

    yaml = YAML(typ="rt", pure=True)  # a fresh instance: ruamel's are not reentrant
    yaml.preserve_quotes = True
    yaml.width = 4096  # never fold a long line the user wrote on one line
    return yaml


def load_yaml(text: str) -> Any:
    """A round-trip YAML tree (comments attached); duplicate keys raise."""
    return _yaml().load(text)


def yaml_expanded_size(root: Any, limit: int) -> int:
    """How many values ``root`` holds once aliases are expanded, counting each
    shared node once (so an alias bomb is caught without expanding it).

    Raises ValueError past ``limit`` or on a recursive alias (a node inside
    itself), which no plain value can represent.
    """
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()
    stack: list[tuple[Any, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        if not isinstance(node, Mapping | list) or (id(node) in sizes and not done):
            continue
        children = list(node.values()) if isinstance(node, Mapping) else list(node)
        if done:
            open_nodes.discard(id(node))
            sizes[id(node)] = 1 + sum(sizes.get(id(child), 1) for child in children)
            if sizes[id(node)] > limit:
                raise ValueError(f"more than {limit} values once aliases are expanded")
            continue
        if id(node) in open_nodes:
            raise ValueError("an alias refers to a node that contains it")
        open_nodes.add(id(node))
        stack.append((node, True))
        for child in children:
            if isinstance(child, Mapping | list) and id(child) in open_nodes:
                raise ValueError("an alias refers to a node that contains it")
            stack.append((child, False))
    return sizes.get(id(root), 1)


def yaml_plain(value: Any) -> Any:
    """Round-trip YAML nodes as plain dict/list/str/int/float/bool values."""
    from ruamel.yaml.scalarbool import ScalarBoolean

    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, ScalarBoolean):
        return bool(value)
    if isinstance(value, str):
        return str(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, Mapping):
        return {yaml_plain(k): yaml_plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [yaml_plain(v) for v in value]
    return value


def _yaml_indents(text: str) -> tuple[int, int, int]:
    """(mapping, sequence, offset) indents as ruamel's ``YAML.indent`` takes them."""
    from ruamel.yaml.util import load_yaml_guess_indent

    _, seq_indent, offset = load_yaml_guess_indent(text)
    widths = [
        len(line) - len(line.lstrip(" "))
        for line in text.splitlines()
        if line.strip() and not line.lstrip().startswith(("-", "#"))
    ]
    mapping = min((w for w in widths if w > 0), default=2)
    seq_indent = seq_indent or 2
    offset = offset or 0
    return min(mapping, 8), max(seq_indent, offset + 2), offset


def dump_yaml(value: Any, like: bytes | None) -> bytes:
    """YAML text of ``value``; with ``like``, an in-place edit of ``like``."""
    yaml = _yaml()
    node = value
    if like is not None:
        text = like.decode("utf-8-sig")
        base = yaml.load(text)
        node = _apply(base, value, yaml_plain, _yaml_scalar)
        mapping, sequence, offset = _yaml_indents(text)
        yaml.indent(mapping=mapping, sequence=sequence, offset=offset)
        yaml.explicit_start = text.lstrip().startswith("---")
    stream = io.StringIO()
    yaml.dump(node, stream)
    out = stream.getvalue()
    if like is not None:
        text = like.decode("utf-8-sig")
        if _newline(text) == "\r\n":
            out = out.replace("\n", "\r\n")
    return out.encode("utf-8")


def _yaml_scalar(old: Any, new: Any) -> Any:
    # an edited block/quoted string keeps the style it had (| stays |)
    if isinstance(old, str) and type(old) is not str and type(new) is str:
        try:
            return type(old)(new)
        except TypeError:
            return new
    return new


# ------------------------------------------------------------------ TOML


def dump_toml(value: Any, like: bytes | None) -> bytes:
    """TOML text of ``value``; with ``like``, an in-place edit of ``like``."""
    import tomlkit

    if not isinstance(value, dict):
        raise TypeError("a TOML document is a table")
    if like is None:
        return tomlkit.dumps(value).encode("utf-8")
    doc = tomlkit.parse(like.decode("utf-8-sig"))
    _apply(doc, value, _toml_plain, lambda old, new: new)
    return tomlkit.dumps(doc).encode("utf-8")


def _toml_plain(value: Any) -> Any:
    return value.unwrap() if hasattr(value, "unwrap") else value


# ------------------------------------------------------------------ in place


def _apply(
    node: Any, target: Any, plain: Callable[[Any], Any], scalar: Callable[[Any, Any], Any]
) -> Any:
    """Edit round-trip ``node`` until it equals ``target``; returns the node to keep.

    Untouched parts are left as they are (with their comments); mappings are
    edited key by key; id'd lists are matched by id, so a zone inserted in
    the middle does not shift every later zone's comments onto its neighbour.
    """
    if same(plain(node), target):
        return node
    if isinstance(node, Mapping) and isinstance(target, dict):
        for key in [k for k in node if k not in target]:
            del node[key]
        for key, want in target.items():
            if key in node:
                kept = _apply(node[key], want, plain, scalar)
                if kept is not node[key]:
                    node[key] = kept
            else:
                node[key] = want
        return node
    if isinstance(node, MutableSequence) and isinstance(target, list):
        _apply_list(node, target, plain, scalar)
        return node
    return scalar(node, target)


def _apply_list(
    node: Any, target: list, plain: Callable[[Any], Any], scalar: Callable[[Any, Any], Any]
) -> None:
    have, want = id_index(plain(node)), id_index(target)
    if have and want:
        keys = list(have)
        for i in reversed(range(len(node))):
            if keys[i] not in want:
                del node[i]
        order = [k for k in have if k in want]
        for i, key in enumerate(order):
            kept = _apply(node[i], want[key], plain, scalar)
            if kept is not node[i]:
                node[i] = kept
        if order == [k for k in want if k in have]:
            for i, key in enumerate(want):
                if key not in have:
                    node.insert(i, want[key])
            return
        # the order changed: rebuild from the (edited) items we already have
        items = dict(zip(order, list(node), strict=True))
        del node[:]
        for key, item in want.items():
            node.append(items.get(key, item))
        return
    for i, item in enumerate(target[: len(node)]):
        kept = _apply(node[i], item, plain, scalar)
        if kept is not node[i]:
            node[i] = kept
    del node[len(target) :]
    for item in target[len(node) :]:
        node.append(item)
