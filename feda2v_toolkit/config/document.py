"""Config files as text: reading, JSON parsing with line:column positions, and where the sections are.

Reading is strict and every failure is one :class:`ConfigReadError` with a one-line message: missing or
unreadable files, files over :data:`MAX_CONFIG_BYTES`, non-UTF-8 bytes, empty files, malformed JSON
(with line and column, and a plain word about ``//`` comments or trailing commas), ``NaN``, and a top
level that is not an object.

Values come from the C ``json`` parser; positions come from :func:`parse_tree`, a small parser that
records the span of every key and value. It runs only when a position or a textual edit is needed.
"""

from __future__ import annotations

import json
import math
import re
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from json.decoder import scanstring  # type: ignore[attr-defined]
from pathlib import Path
from typing import Any

#: Larger files are refused: experiment configs are a few kilobytes.
MAX_CONFIG_BYTES = 8 * 1024 * 1024
#: Names of the generator section: ``feda2v`` (what the FedA2V runner reads) and ``feda2v_config``
#: (the generator documentation's name).
SECTION_KEYS: tuple[str, ...] = ("feda2v", "feda2v_config")
#: Top-level key holding per-node overrides keyed "0", "1", ...
NODES_KEY = "nodes"
#: Top-level sections of a full FedA2V experiment config (used to tell a full config from a fragment).
EXPERIMENT_KEYS = frozenset({"experiment", "federation", "training", "nodes", "model", "dataset", "wandb",
                             *SECTION_KEYS})
BOM = "\ufeff"

JsonPath = tuple[str | int, ...]


class ConfigReadError(Exception):
    """A file that cannot be read as a JSON object. ``io`` marks I/O problems (exit code 2)."""

    def __init__(self, name: str, code: str, message: str, *, line: int | None = None,
                 column: int | None = None, io: bool = False) -> None:
        self.name = name
        self.code = code
        self.message = message
        self.line = line
        self.column = column
        self.io = io
        where = f"{name}:{line}:{column}" if line is not None else name
        super().__init__(f"{where}: {message}")


# -- positions --------------------------------------------------------------------------------------

class Node:
    """A JSON value's span ``[start, end)`` in the text (plain slotted classes: parsing is hot)."""

    __slots__ = ("start", "end")

    def __init__(self, start: int, end: int) -> None:
        self.start = start
        self.end = end


class Scalar(Node):
    __slots__ = ("value",)

    def __init__(self, start: int, end: int, value: Any = None) -> None:
        super().__init__(start, end)
        self.value = value


class Member:
    """``"key": value`` in an object: the key's span and the value's node."""

    __slots__ = ("key", "key_start", "key_end", "value")

    def __init__(self, key: str, key_start: int, key_end: int, value: Node) -> None:
        self.key = key
        self.key_start = key_start
        self.key_end = key_end
        self.value = value


class Obj(Node):
    __slots__ = ("members",)

    def __init__(self, start: int, end: int) -> None:
        super().__init__(start, end)
        self.members: list[Member] = []

    def get(self, key: str) -> Member | None:
        """The last member named ``key`` (the one JSON parsers keep)."""
        for member in reversed(self.members):
            if member.key == key:
                return member
        return None


class Arr(Node):
    __slots__ = ("items",)

    def __init__(self, start: int, end: int) -> None:
        super().__init__(start, end)
        self.items: list[Node] = []


_WS = re.compile(r"[ \t\n\r]*")
_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?")
_LITERALS = {"true": True, "false": False, "null": None}


def parse_tree(text: str) -> Node:
    """Spans of every value, key and member of ``text``, which must be valid JSON."""
    node, end = _parse_value(text, _WS.match(text, 0).end())  # type: ignore[union-attr]
    return node


def _parse_value(s: str, i: int) -> tuple[Node, int]:
    c = s[i]
    if c == "{":
        obj = Obj(i, i)
        i = _WS.match(s, i + 1).end()  # type: ignore[union-attr]
        if s[i] == "}":
            obj.end = i + 1
            return obj, i + 1
        while True:
            key, key_end = scanstring(s, i + 1, True)
            key_start = i
            i = _WS.match(s, key_end).end()  # type: ignore[union-attr]
            i = _WS.match(s, i + 1).end()  # type: ignore[union-attr]  # past ':'
            value, i = _parse_value(s, i)
            obj.members.append(Member(key, key_start, key_end, value))
            i = _WS.match(s, i).end()  # type: ignore[union-attr]
            if s[i] == "}":
                obj.end = i + 1
                return obj, i + 1
            i = _WS.match(s, i + 1).end()  # type: ignore[union-attr]  # past ','
    if c == "[":
        arr = Arr(i, i)
        i = _WS.match(s, i + 1).end()  # type: ignore[union-attr]
        if s[i] == "]":
            arr.end = i + 1
            return arr, i + 1
        while True:
            item, i = _parse_value(s, i)
            arr.items.append(item)
            i = _WS.match(s, i).end()  # type: ignore[union-attr]
            if s[i] == "]":
                arr.end = i + 1
                return arr, i + 1
            i = _WS.match(s, i + 1).end()  # type: ignore[union-attr]
    if c == '"':
        value, end = scanstring(s, i + 1, True)
        return Scalar(i, end, value), end
    for word, value in _LITERALS.items():
        if s.startswith(word, i):
            return Scalar(i, i + len(word), value), i + len(word)
    m = _NUMBER.match(s, i)
    if m is None:  # pragma: no cover - the text was validated by json.loads first
        raise ValueError(f"unexpected character at offset {i}")
    text = m.group()
    number: Any = int(text) if text.lstrip("-").isdigit() else float(text)
    return Scalar(i, m.end(), number), m.end()


def node_at(root: Node, path: JsonPath) -> tuple[Node | None, Member | None]:
    """The node at ``path`` and, when its parent is an object, the member holding it."""
    node: Node | None = root
    member: Member | None = None
    for part in path:
        if isinstance(node, Obj) and isinstance(part, str):
            member = node.get(part)
            node = member.value if member else None
        elif isinstance(node, Arr) and isinstance(part, int) and 0 <= part < len(node.items):
            member = None
            node = node.items[part]
        else:
            return None, None
    return node, member


# -- sources ----------------------------------------------------------------------------------------

def line_col(text: str, offset: int) -> tuple[int, int]:
    """1-based line and column of a character offset in ``text``."""
    return text.count("\n", 0, offset) + 1, offset - (text.rfind("\n", 0, offset) + 1) + 1


@dataclass
class Source:
    """One parsed config: its display name, text (without a BOM) and data."""

    name: str
    text: str
    data: dict[str, Any]
    path: Path | None = None
    bom: bool = False
    has_duplicates: bool = False
    _tree: Node | None = field(default=None, repr=False)

    @property
    def tree(self) -> Node:
        if self._tree is None:
            self._tree = parse_tree(self.text)
        return self._tree

    def encoded(self, text: str | None = None) -> bytes:
        """``text`` (default: the file's own) as the file's bytes: UTF-8, with its BOM if it had one."""
        return ((BOM if self.bom else "") + (self.text if text is None else text)).encode("utf-8")

    def line_col(self, offset: int) -> tuple[int, int]:
        """1-based line and column of a character offset."""
        return line_col(self.text, offset)

    def position(self, path: JsonPath, *, key: bool = False) -> tuple[int, int] | None:
        """Line and column of the value at ``path`` (or of its key with ``key=True``)."""
        while True:
            node, member = node_at(self.tree, path)
            if node is not None:
                if key and member is not None:
                    return self.line_col(member.key_start)
                return self.line_col(node.start)
            if not path:
                return None
            path = path[:-1]  # a key that is not in the file (e.g. a default): point at its parent
            key = True

    def duplicate_keys(self) -> list[tuple[JsonPath, str, int]]:
        """``(object path, key, offset of the repeated key)`` for every key repeated in an object."""
        if not self.has_duplicates:
            return []
        out: list[tuple[JsonPath, str, int]] = []

        def walk(node: Node, path: JsonPath) -> None:
            if isinstance(node, Obj):
                seen: set[str] = set()
                for member in node.members:
                    if member.key in seen:
                        out.append((path, member.key, member.key_start))
                    seen.add(member.key)
                    walk(member.value, (*path, member.key))
            elif isinstance(node, Arr):
                for index, item in enumerate(node.items):
                    walk(item, (*path, index))

        walk(self.tree, ())
        return out


def read_source(path: str | Path, *, name: str | None = None) -> Source:
    """Read and parse one config file (at most :data:`MAX_CONFIG_BYTES`); raise :class:`ConfigReadError`
    with a one-line reason."""
    max_bytes = MAX_CONFIG_BYTES
    path = Path(path)
    name = name if name is not None else str(path)
    try:
        st = path.stat()
        size = st.st_size
        if stat.S_ISDIR(st.st_mode):
            raise ConfigReadError(name, "io-error", "is a directory", io=True)
        if not stat.S_ISREG(st.st_mode):  # a device or FIFO: unbounded, or blocks forever
            raise ConfigReadError(name, "io-error", "not a regular file (a device, pipe or socket); "
                                  "configs are read from regular files or '-' (standard input)", io=True)
        if size > max_bytes:
            raise ConfigReadError(name, "file-too-large",
                                  f"file is too large ({_size(size)}; configs are limited to {_size(max_bytes)})")
        with open(path, "rb") as fh:
            data = fh.read(max_bytes + 1)  # the file may have grown since stat
    except FileNotFoundError:
        raise ConfigReadError(name, "io-error", "no such file", io=True) from None
    except PermissionError:
        raise ConfigReadError(name, "io-error", "permission denied", io=True) from None
    except OSError as exc:
        raise ConfigReadError(name, "io-error", f"cannot read: {exc.strerror or exc}", io=True) from None
    return _bounded(data, name, path)


def read_stream(stream: Any, name: str) -> Source:
    """Read and parse a config from a binary stream (standard input), at most :data:`MAX_CONFIG_BYTES`."""
    data = stream.read(MAX_CONFIG_BYTES + 1)
    if isinstance(data, str):
        data = data.encode("utf-8")
    return _bounded(data, name, None)


def _bounded(data: bytes, name: str, path: Path | None) -> Source:
    max_bytes = MAX_CONFIG_BYTES
    if len(data) > max_bytes:
        raise ConfigReadError(name, "file-too-large",
                              f"file is too large (over {_size(max_bytes)}; configs are limited to {_size(max_bytes)})")
    return parse_bytes(data, name, path=path)


def _size(n: int) -> str:
    return f"{n / (1024 * 1024):.1f} MiB" if n >= 1024 * 1024 else f"{n} bytes"


def parse_bytes(data: bytes, name: str, *, path: Path | None = None) -> Source:
    """Decode UTF-8 (an initial BOM is accepted and kept) and parse."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise ConfigReadError(
            name, "not-utf8",
            f"not UTF-8 text: byte 0x{data[exc.start]:02x} at line {line}, column {column} "
            "(save the file as UTF-8)", line=line, column=column) from None
    return parse_text(text, name, path=path)


def parse_text(text: str, name: str, *, path: Path | None = None) -> Source:
    """Parse JSON text whose top level must be an object."""
    bom = text.startswith(BOM)
    if bom:
        text = text[1:]
    if not text.strip():
        raise ConfigReadError(name, "empty-file", "empty file (expected a JSON object)")
    duplicates = False

    def pairs_hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        nonlocal duplicates
        out = dict(pairs)
        if len(out) != len(pairs):
            duplicates = True
        return out

    def reject_constant(word: str) -> Any:
        raise ValueError(f"{word} is not valid JSON")

    def finite_float(word: str) -> float:
        value = float(word)
        if not math.isfinite(value):  # 1e400 parses as infinity
            raise ValueError(f"the number {word[:40]} is out of range (larger than about 1.8e308)")
        return value

    try:
        data = json.loads(text, object_pairs_hook=pairs_hook, parse_constant=reject_constant,
                          parse_float=finite_float)
    except json.JSONDecodeError as exc:
        raise _syntax_error(text, name, exc) from None
    except ValueError as exc:  # NaN / Infinity
        raise ConfigReadError(name, "json-syntax", f"invalid JSON: {exc} (use null or a number)") from None
    except RecursionError:
        raise ConfigReadError(name, "json-syntax", "invalid JSON: nested too deeply") from None
    if not isinstance(data, dict):
        raise ConfigReadError(name, "not-object",
                              f"top level is {json_type(data, article=True)}; expected a JSON object", line=1,
                              column=len(text) - len(text.lstrip()) + 1)
    return Source(name, text, data, path=path, bom=bom, has_duplicates=duplicates)


_STRING = re.compile(r'"(?:[^"\\\n]|\\.)*"')
_COMMENT = re.compile(r"//|/\*")
_TRAILING_COMMA = re.compile(r",\s*[}\]]")


def _syntax_error(text: str, name: str, exc: json.JSONDecodeError) -> ConfigReadError:
    """Name the usual culprits (comments, trailing commas) rather than the parser's guess."""
    stripped = _STRING.sub(lambda m: " " * len(m.group()), text)
    for pattern, what in ((_COMMENT, "comments"), (_TRAILING_COMMA, "trailing commas")):
        m = pattern.search(stripped)
        if m is not None and m.start() <= exc.pos + 1:
            line, column = line_col(text, m.start())
            if what == "comments":
                msg = (f"invalid JSON: comment ({m.group()}) at line {line}, column {column}; JSON does not "
                       "allow comments (use a \"_comment...\" key instead)")
                code = "json-comments"
            else:
                msg = f"invalid JSON: trailing comma at line {line}, column {column}; JSON does not allow it"
                code = "json-syntax"
            return ConfigReadError(name, code, msg, line=line, column=column)
    return ConfigReadError(name, "json-syntax",
                           f"invalid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}",
                           line=exc.lineno, column=exc.colno)


def json_type(value: Any, *, article: bool = False) -> str:
    """The JSON type name of a Python value (``integer`` and ``number`` are told apart)."""
    if value is None:
        name = "null"
    elif isinstance(value, bool):
        name = "boolean"
    elif isinstance(value, int):
        name = "integer"
    elif isinstance(value, float):
        name = "number"
    elif isinstance(value, str):
        name = "string"
    elif isinstance(value, list):
        name = "array"
    elif isinstance(value, dict):
        name = "object"
    else:
        name = type(value).__name__
    if not article:
        return name
    return ("an " if name[0] in "aeio" else "a ") + name


def format_path(path: Sequence[str | int]) -> str:
    """``$.feda2v.generator_type``, ``$.nodes["0"].generator_class_group``, ``$.groups.a[1]``."""
    out = "$"
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        elif re.fullmatch(r"[A-Za-z_][A-Za-z0-9_\-]*", part):
            out += f".{part}"
        else:
            out += f"[{json.dumps(part, ensure_ascii=False)}]"
    return out


# -- where the generator keys are -------------------------------------------------------------------

@dataclass
class Location:
    """One object holding generator keys: a section (full config or bare fragment) or a node override."""

    path: JsonPath
    kind: str  # "section" | "node"
    data: dict[str, Any]
    node_id: str | None = None

    @property
    def where(self) -> str:
        return format_path(self.path)


@dataclass
class Layout:
    """How a document is organised: its generator sections, node overrides, and shape problems."""

    full: bool
    sections: list[Location]
    nodes: list[Location]
    #: (path, code, message, expected, found) for sections / nodes of the wrong JSON type
    problems: list[tuple[JsonPath, str, str, str, str]] = field(default_factory=list)


def locate(doc: Mapping[str, Any], is_generator_key: Any = None) -> Layout:
    """Find the generator section(s) and the per-node overrides of a document.

    A document with ``feda2v`` or ``feda2v_config`` is a full experiment config; so is one with other
    experiment sections (``training``, ``nodes``...) and no generator keys at the top level (its
    generator section is then empty). Anything else is a bare generator section. ``nodes`` is read at
    the top level in both cases. ``is_generator_key(key) -> bool`` tells generator keys apart.
    """
    problems: list[tuple[JsonPath, str, str, str, str]] = []
    present = [key for key in SECTION_KEYS if key in doc]
    if present:
        full = True
    else:
        looks_generator = any(is_generator_key(k) for k in doc) if is_generator_key else True
        full = not looks_generator and any(k in EXPERIMENT_KEYS for k in doc)
    sections: list[Location] = []
    if present:
        for key in present:
            value = doc[key]
            if isinstance(value, dict):
                sections.append(Location((key,), "section", value))
            else:
                problems.append(((key,), "invalid-section", "the generator section must be an object",
                                 "object", describe_found(value)))
    elif not full:
        sections.append(Location((), "section", dict(doc)))
    nodes: list[Location] = []
    raw_nodes = doc.get(NODES_KEY)
    if isinstance(raw_nodes, dict):
        for node_id, value in raw_nodes.items():
            if isinstance(value, dict):
                nodes.append(Location((NODES_KEY, node_id), "node", value, node_id=node_id))
            elif value is not None:
                problems.append(((NODES_KEY, node_id), "invalid-node", "a node override must be an object",
                                 "object", describe_found(value)))
    elif isinstance(raw_nodes, list):
        for index, value in enumerate(raw_nodes):
            if isinstance(value, dict):
                nodes.append(Location((NODES_KEY, index), "node", value, node_id=str(index)))
    elif raw_nodes is not None:
        problems.append(((NODES_KEY,), "invalid-node", "`nodes` must map node ids to override objects",
                         "object", describe_found(raw_nodes)))
    return Layout(full, sections, nodes, problems)


def describe_found(value: Any, limit: int = 60) -> str:
    """A short rendering of a found value with its JSON type: ``"4" (string)``."""
    text = json.dumps(value, ensure_ascii=False)
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"{text} ({json_type(value)})"
