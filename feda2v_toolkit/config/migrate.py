"""Versioned migration chains for generator sections, in memory and as minimal edits of the file's text.

A *chain* is the ordered list of :class:`~feda2v_toolkit.specs.Migration` steps registered under one
name: ``core`` (the toolkit) or a plugin's name. A section records where it stands: the core chain in
``schema_version``, plugin chains in ``schema_versions: {"<chain>": n}``. A section that records no
version is taken to be at the version of the first step it still needs (``Migration.needed_by``), or
current if it needs none. Per-node overrides (``nodes.<id>``) record no version: each step they still
need is applied to them.

A step is ``apply(section: dict, ctx: MigrationContext) -> dict``: a pure function from one ordered
section to the migrated one. The host diffs the old and new sections to write the file: a renamed key
keeps its position, new keys are inserted with the file's indentation, and nothing it did not change is
touched, byte for byte.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from difflib import SequenceMatcher
from itertools import pairwise
from typing import TYPE_CHECKING, Any

from feda2v_toolkit.config.document import (
    Arr,
    JsonPath,
    Node,
    Obj,
    Source,
    format_path,
    locate,
)
from feda2v_toolkit.config.schema import PLUGIN_VERSIONS_KEY, VERSION_KEY, json_equal, strict_equal
from feda2v_toolkit.errors import InputError, NewerVersionError
from feda2v_toolkit.specs import CORE_CHAIN

if TYPE_CHECKING:
    from feda2v_toolkit.config.catalog import Catalog
    from feda2v_toolkit.specs import Migration


class MigrationConflict(InputError):
    """A section cannot be migrated without guessing (e.g. old and new keys disagree).

    ``problem`` says what is wrong; ``hint`` (optional) what the user should do about it.
    """

    def __init__(self, problem: str, hint: str | None = None) -> None:
        self.problem = problem
        self.hint = hint
        super().__init__(problem + (f"; {hint}" if hint else ""))


@dataclass
class MigrationContext:
    """What a migration step may use besides the section itself.

    Attributes:
        chain: the chain being applied.
        where: JSON path of the section, e.g. ``$.feda2v`` or ``$.nodes["0"]``.
        is_node: True for a per-node override object (which records no version).
        options: user choices, e.g. ``{"training_length": 8}`` from ``--training-length``.
        defaults: every schema default (core plus plugins).
        notes: what ``ctx.note`` collected.
    """

    chain: str
    where: str
    is_node: bool = False
    options: Mapping[str, Any] = field(default_factory=dict)
    defaults: Mapping[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def note(self, message: str) -> None:
        """Tell the user about a choice the step made (printed by ``feda2v-tk migrate``)."""
        self.notes.append(f"{self.where}: {message}")

    def option(self, name: str, default: Any = None) -> Any:
        value = self.options.get(name)
        return default if value is None else value


# -- helpers for writing steps ----------------------------------------------------------------------

def rename_key(section: Mapping[str, Any], old: str, new: str) -> dict[str, Any]:
    """Rename ``old`` to ``new`` in place (same position). If both are present with equal values the
    old key is dropped; with different values :class:`MigrationConflict` is raised."""
    if old not in section:
        return dict(section)
    if new in section:
        if not json_equal(section[old], section[new]):
            raise MigrationConflict(
                f"{old!r} ({json.dumps(section[old])}) and {new!r} ({json.dumps(section[new])}) are both set "
                "and disagree", "delete the one that is wrong")
        return {k: v for k, v in section.items() if k != old}
    return {(new if k == old else k): v for k, v in section.items()}


def insert_after(section: Mapping[str, Any], anchor: str | None, key: str, value: Any) -> dict[str, Any]:
    """A copy with ``key: value`` right after ``anchor`` (at the start when ``anchor`` is None or absent)."""
    items = [(k, v) for k, v in section.items() if k != key]
    index = next((i + 1 for i, (k, _) in enumerate(items) if k == anchor), 0)
    items.insert(index, (key, value))
    return dict(items)


def drop_key(section: Mapping[str, Any], key: str) -> dict[str, Any]:
    """A copy without ``key``."""
    return {k: v for k, v in section.items() if k != key}


# -- chains -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Chain:
    """The ordered steps of one chain."""

    name: str
    steps: tuple[Migration, ...]

    @property
    def current(self) -> int:
        return self.steps[-1].to_version if self.steps else 1

    def recorded(self, section: Mapping[str, Any], where: str) -> int | None:
        """The version ``section`` records for this chain, or None."""
        if self.name == CORE_CHAIN:
            if VERSION_KEY not in section:
                return None
            value, label = section[VERSION_KEY], f"{where}.{VERSION_KEY}"
        else:
            versions = section.get(PLUGIN_VERSIONS_KEY)
            if versions is None:
                return None
            if not isinstance(versions, dict):
                raise InputError(f"{where}.{PLUGIN_VERSIONS_KEY} must be an object (chain name -> version)")
            if self.name not in versions:
                return None
            value, label = versions[self.name], f"{where}.{PLUGIN_VERSIONS_KEY}.{self.name}"
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InputError(f"{label} must be a positive integer, found {json.dumps(value)}")
        return value

    def version_of(self, section: Mapping[str, Any], where: str) -> int:
        """Recorded version, else the version of the first step the section still needs, else current."""
        recorded = self.recorded(section, where)
        if recorded is not None:
            if recorded > self.current:
                owner = "feda2v-tk" if self.name == CORE_CHAIN else f"plugin {self.name!r}"
                raise NewerVersionError(
                    f"{where}: written for {self.name} schema version {recorded}, newer than this {owner} "
                    f"supports ({self.current}); upgrade it rather than downgrading the config")
            return recorded
        for step in self.steps:
            if step.needed_by(section):
                return step.from_version
        return self.current


def build_chains(registry: Any) -> list[Chain]:
    """The registered chains, core first, each checked to be contiguous."""
    by_chain: dict[str, list[Migration]] = {}
    for mig in registry.migrations:
        by_chain.setdefault(mig.chain, []).append(mig)
    chains = []
    for name in sorted(by_chain, key=lambda n: (n != CORE_CHAIN, n)):
        steps = sorted(by_chain[name], key=lambda m: m.from_version)
        for a, b in pairwise(steps):
            if b.from_version != a.to_version:
                raise InputError(f"migration chain {name!r} has a gap between versions {a.to_version} and "
                                 f"{b.from_version} ({a.id} -> {b.id})")
        chains.append(Chain(name, tuple(steps)))
    if not any(c.name == CORE_CHAIN for c in chains):
        chains.insert(0, Chain(CORE_CHAIN, ()))
    return chains


# -- migrating data ---------------------------------------------------------------------------------

@dataclass
class DocumentMigration:
    """The result of migrating one document in memory."""

    document: dict[str, Any]
    #: one line per change, attributed to its step (``[step id]``) or to version bookkeeping
    changes: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    #: (JSON path, deprecated key, replacement) found before migrating
    deprecated: list[tuple[str, str, str]] = field(default_factory=list)


def _apply_step(step: Migration, section: dict[str, Any], ctx: MigrationContext) -> dict[str, Any]:
    try:
        out = step.apply(copy.deepcopy(section), ctx)
    except MigrationConflict as exc:
        raise MigrationConflict(f"{ctx.where}: cannot migrate ({step.id}): {exc.problem}", exc.hint) from None
    if not isinstance(out, Mapping):
        raise InputError(f"migration {step.id} (plugin {step.provenance.plugin!r}) returned "
                         f"{type(out).__name__}, not the migrated section")
    return dict(out)


def _record(section: dict[str, Any], chain: Chain) -> dict[str, Any]:
    if chain.name == CORE_CHAIN:
        if VERSION_KEY in section:
            return {**section, VERSION_KEY: chain.current}
        return insert_after(section, None, VERSION_KEY, chain.current)
    versions = section.get(PLUGIN_VERSIONS_KEY)
    if isinstance(versions, dict):
        return {**section, PLUGIN_VERSIONS_KEY: {**versions, chain.name: chain.current}}
    anchor = VERSION_KEY if VERSION_KEY in section else None
    return insert_after(section, anchor, PLUGIN_VERSIONS_KEY, {chain.name: chain.current})


def migrate_location(loc_data: Mapping[str, Any], *, path: JsonPath, is_node: bool, chains: list[Chain],
                     options: Mapping[str, Any], defaults: Mapping[str, Any],
                     result: DocumentMigration) -> dict[str, Any]:
    """Run every chain over one section or node override; record versions on sections."""
    where = format_path(path)
    section = dict(loc_data)

    def run(step: Migration, ctx: MigrationContext) -> None:
        nonlocal section
        before, section = section, _apply_step(step, section, ctx)
        result.changes.extend(f"{line} [{step.id}]" for line in describe_changes(before, section, path))

    for chain in chains:
        ctx = MigrationContext(chain.name, where, is_node, options, defaults, result.notes)
        if is_node:
            for step in chain.steps:
                if step.needed_by(section):
                    run(step, ctx)
            continue
        version = chain.version_of(section, where)
        ran = False
        for step in chain.steps:
            if step.from_version >= version or step.needed_by(section):
                run(step, ctx)
                ran = True
        if ran:
            before, section = section, _record(section, chain)
            result.changes.extend(describe_changes(before, section, path))
    return section


def migrate_document(doc: Mapping[str, Any], catalog: Catalog, *,
                     options: Mapping[str, Any] | None = None) -> DocumentMigration:
    """Migrate every generator section and node override of ``doc`` (a new document; ``doc`` is kept)."""
    options = dict(options or {})
    defaults = catalog.defaults()
    layout = locate(doc, catalog.is_generator_key)
    result = DocumentMigration(copy.deepcopy(dict(doc)))
    for loc in [*layout.sections, *layout.nodes]:
        for key in loc.data:
            if key in catalog.deprecated:
                _mig, replacement = catalog.deprecated[key]
                result.deprecated.append((loc.where, key, replacement))
    new = result.document
    for loc in [*layout.sections, *layout.nodes]:
        migrated = migrate_location(_get(new, loc.path), path=loc.path, is_node=loc.kind == "node",
                                    chains=catalog.chains, options=options, defaults=defaults, result=result)
        new = _set(new, loc.path, migrated)
    result.document = new
    return result


def _get(doc: Any, path: JsonPath) -> Any:
    for part in path:
        doc = doc[part]
    return doc


def _set(doc: Any, path: JsonPath, value: Any) -> Any:
    if not path:
        return value
    parent = _get(doc, path[:-1])
    parent[path[-1]] = value
    return doc


# -- describing changes -----------------------------------------------------------------------------

def _short(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 60 else text[:57] + "..."


def describe_changes(old: Any, new: Any, path: JsonPath = ()) -> list[str]:
    """One line per change between two documents: renamed, added, removed and changed keys."""
    if strict_equal(old, new):
        return []
    where = format_path(path)
    if not (isinstance(old, dict) and isinstance(new, dict)):
        return [f"{where}: changed {_short(old)} -> {_short(new)}"]
    out: list[str] = []
    old_keys, new_keys = list(old), list(new)
    for tag, i1, i2, j1, j2 in SequenceMatcher(None, old_keys, new_keys, autojunk=False).get_opcodes():
        if tag == "equal":
            for key in old_keys[i1:i2]:
                out.extend(describe_changes(old[key], new[key], (*path, key)))
            continue
        removed = old_keys[i1:i2]
        added = new_keys[j1:j2]
        if tag == "replace" and len(removed) == len(added) == 1 and strict_equal(old[removed[0]], new[added[0]]):
            out.append(f"{where}: renamed {removed[0]!r} to {added[0]!r} (value {_short(new[added[0]])})")
        elif tag == "replace":
            out.append(f"{where}: replaced {_members(old, removed)} with {_members(new, added)}")
        else:
            out.extend(f"{where}: removed {_members(old, [key])}" for key in removed)
            out.extend(f"{where}: added {_members(new, [key])}" for key in added)
    return out


def _members(obj: Mapping[str, Any], keys: list[str]) -> str:
    return ", ".join(f"{json.dumps(k, ensure_ascii=False)}: {_short(obj[k])}" for k in keys)


# -- migrating text ---------------------------------------------------------------------------------

class _Editor:
    """Turns (old document, new document) into the fewest span edits of the old text."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.nl = "\r\n" if "\r\n" in text else "\n"
        self.edits: list[tuple[int, int, str]] = []
        self.unit: str | None = None

    def detect_unit(self, root: Node) -> None:
        """The indentation step of the file ('  ', '    ', a tab...), or None for one-line JSON."""
        queue = [root]
        while queue:
            node = queue.pop(0)
            if isinstance(node, Obj):
                for member in node.members:
                    inner = self.line_indent(member.key_start)
                    outer = self.line_indent(node.start)
                    if inner is not None and outer is not None and len(inner) > len(outer) \
                            and inner.startswith(outer):
                        self.unit = inner[len(outer):]
                        return
                queue.extend(m.value for m in node.members)
            elif isinstance(node, Arr):
                queue.extend(node.items)

    def line_indent(self, offset: int) -> str | None:
        """The whitespace before ``offset`` on its line, if only whitespace precedes it there."""
        start = self.text.rfind("\n", 0, offset) + 1
        prefix = self.text[start:offset]
        return prefix if prefix.strip(" \t") == "" else None

    def own_indent(self, offset: int) -> str:
        """Leading whitespace of the line holding ``offset``."""
        start = self.text.rfind("\n", 0, offset) + 1
        line = self.text[start:offset]
        return line[: len(line) - len(line.lstrip(" \t"))]

    def render(self, value: Any, indent: str, multiline: bool) -> str:
        if not multiline or self.unit is None or not isinstance(value, (dict, list)) or not value:
            return json.dumps(value, ensure_ascii=False)
        return json.dumps(value, indent=self.unit, ensure_ascii=False).replace("\n", self.nl + indent)

    def value(self, node: Node, old: Any, new: Any, indent: str) -> None:
        if strict_equal(old, new):
            return
        if isinstance(node, Obj) and isinstance(old, dict) and isinstance(new, dict):
            self.obj(node, old, new)
            return
        self.edits.append((node.start, node.end, self.render(new, indent, self.unit is not None)))

    def obj(self, node: Obj, old: dict[str, Any], new: dict[str, Any]) -> None:
        members = node.members
        outer = self.own_indent(node.start)
        if len(members) >= 2:
            sep = self.text[members[0].value.end:members[1].key_start]
        elif members:
            lead = self.text[node.start + 1:members[0].key_start]
            sep = ("," + self.nl + lead.rsplit("\n", 1)[1]) if "\n" in lead else ", "
        else:
            sep = ("," + self.nl + outer + self.unit) if self.unit is not None else ", "
        multiline = "\n" in sep
        member_indent = sep.rsplit("\n", 1)[1] if multiline else outer
        colon = self.text[members[0].key_end:members[0].value.start] if members else ": "

        def member_text(key: str, value_text: str) -> str:
            return json.dumps(key, ensure_ascii=False) + colon + value_text

        if not members:
            if not new:
                return
            body = sep.join(member_text(k, self.render(v, member_indent, multiline)) for k, v in new.items())
            if multiline:
                text = "{" + self.nl + member_indent + body + self.nl + outer + "}"
            else:
                text = "{" + body + "}"
            self.edits.append((node.start, node.end, text))
            return
        old_keys = [m.key for m in members]
        new_keys = list(new)
        n = len(members)
        for tag, i1, i2, j1, j2 in SequenceMatcher(None, old_keys, new_keys, autojunk=False).get_opcodes():
            if tag == "equal":
                for member, key in zip(members[i1:i2], new_keys[j1:j2], strict=True):
                    self.value(member.value, old[member.key], new[key], self.own_indent(member.key_start))
            elif tag == "delete":
                if i2 < n:
                    self.edits.append((members[i1].key_start, members[i2].key_start, ""))
                elif i1 > 0:
                    self.edits.append((members[i1 - 1].value.end, members[i2 - 1].value.end, ""))
                else:
                    self.edits.append((node.start + 1, node.end - 1, ""))
            else:
                pool = list(members[i1:i2])
                texts = []
                for key in new_keys[j1:j2]:
                    twin = next((m for m in pool if strict_equal(old[m.key], new[key])), None)
                    if twin is not None:
                        pool.remove(twin)
                        value_text = self.text[twin.value.start:twin.value.end]
                    else:
                        value_text = self.render(new[key], member_indent, multiline)
                    texts.append(member_text(key, value_text))
                if tag == "replace":
                    self.edits.append((members[i1].key_start, members[i2 - 1].value.end, sep.join(texts)))
                elif i1 < n:
                    self.edits.append((members[i1].key_start, members[i1].key_start,
                                       "".join(t + sep for t in texts)))
                else:
                    self.edits.append((members[-1].value.end, members[-1].value.end,
                                       "".join(sep + t for t in texts)))

    def apply(self) -> str:
        text = self.text
        last = len(text) + 1
        for start, end, replacement in sorted(self.edits, key=lambda e: (e[0], e[1]), reverse=True):
            if end > last:  # pragma: no cover - the opcodes never overlap
                raise RuntimeError("overlapping edits")
            text = text[:start] + replacement + text[end:]
            last = start
        return text


def rewrite_text(source: Source, new_document: Mapping[str, Any]) -> str:
    """The text of ``source`` edited to hold ``new_document``, touching only what changed."""
    if strict_equal(source.data, new_document):
        return source.text
    editor = _Editor(source.text)
    editor.detect_unit(source.tree)
    editor.value(source.tree, source.data, dict(new_document), "")
    text = editor.apply()
    if not strict_equal(json.loads(text), new_document):  # pragma: no cover - a bug, never write it
        raise RuntimeError(f"{source.name}: internal error: the rewritten text does not hold the migration")
    return text


@dataclass
class TextMigration:
    """The result of migrating one file."""

    source: Source
    text: str
    changes: list[str]
    notes: list[str]

    @property
    def changed(self) -> bool:
        return self.text != self.source.text

    def encoded(self) -> bytes:
        return self.source.encoded(self.text)


def migrate_source(source: Source, catalog: Catalog, *, options: Mapping[str, Any] | None = None) -> TextMigration:
    """Migrate one parsed file; its text keeps everything the migration does not change."""
    if source.has_duplicates:
        path, key, offset = source.duplicate_keys()[0]
        line, col = source.line_col(offset)
        raise InputError(f"{source.name}:{line}:{col}: key {key!r} appears twice in {format_path(path)}; "
                         "remove one before migrating")
    try:
        result = migrate_document(source.data, catalog, options=options)
    except InputError as exc:
        raise type(exc)(f"{source.name}: {exc}") from None
    text = rewrite_text(source, result.document)
    return TextMigration(source, text, result.changes, result.notes)


_UNSAFE = re.compile(r"[^A-Za-z0-9_./:@%+=,-]")


def fix_command(name: str | None) -> str:
    """The exact command that migrates ``name`` in place."""
    if not name or name.startswith("<"):
        return "feda2v-tk migrate --in-place <your config file>"
    quoted = name if not _UNSAFE.search(name) else "'" + name.replace("'", "'\"'\"'") + "'"
    return f"feda2v-tk migrate --in-place {quoted}"


__all__ = [
    "CORE_CHAIN", "Chain", "DocumentMigration", "MigrationConflict", "MigrationContext", "TextMigration",
    "build_chains", "describe_changes", "drop_key", "fix_command", "insert_after", "migrate_document",
    "migrate_location", "migrate_source", "rename_key", "rewrite_text",
]
