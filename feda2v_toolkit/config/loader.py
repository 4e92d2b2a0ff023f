"""``load_config``: read, migrate in memory, apply overrides, validate, fill in the schema defaults."""

from __future__ import annotations

import copy
import json
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from feda2v_toolkit.config.catalog import Catalog, get_catalog
from feda2v_toolkit.config.document import (
    NODES_KEY,
    SECTION_KEYS,
    ConfigReadError,
    Source,
    locate,
    parse_text,
    read_source,
)
from feda2v_toolkit.config.migrate import fix_command, migrate_document
from feda2v_toolkit.config.validate import ERROR, Finding, check_data
from feda2v_toolkit.errors import InputError, UsageError

ConfigSource = str | os.PathLike[str] | Mapping[str, Any]


class ConfigWarning(UserWarning):
    """A config is valid but something in it is probably not what was meant (validation warnings)."""


@dataclass
class LoadedConfig:
    """A loaded experiment config.

    Attributes:
        name: the file name, or ``<string>`` / ``<mapping>``.
        document: the whole document, migrated, with ``overrides`` applied to its generator section.
        section: the generator section with every schema default filled in. Non-generator keys of the
            section (other FedA2V settings, ``_comment`` keys) are kept as they are; a bare fragment's
            ``nodes`` key is not part of it (see ``nodes``).
        nodes: node id -> the section with that node's generator keys applied (its other keys are not).
        warnings: validation warnings (also emitted as :class:`ConfigWarning`).
    """

    name: str
    document: dict[str, Any]
    section: dict[str, Any]
    nodes: dict[str, dict[str, Any]] = field(default_factory=dict)
    warnings: list[Finding] = field(default_factory=list)


def _read(source: ConfigSource) -> tuple[str, dict[str, Any], Source | None]:
    if isinstance(source, Mapping):
        try:
            data = json.loads(json.dumps(source, allow_nan=False))
        except (TypeError, ValueError) as exc:
            raise InputError(f"<mapping>: not JSON data: {exc}") from None
        return "<mapping>", data, None
    if isinstance(source, str) and source.lstrip().startswith("{"):
        try:
            parsed = parse_text(source, "<string>")
        except ConfigReadError as exc:
            raise InputError(str(exc)) from None
        return "<string>", parsed.data, parsed
    if not isinstance(source, (str, os.PathLike)):
        raise UsageError(f"load_config: expected a path, JSON text or a mapping, got {type(source).__name__}")
    try:
        parsed = read_source(Path(source))
    except ConfigReadError as exc:
        raise (UsageError if exc.io else InputError)(str(exc)) from None
    return parsed.name, parsed.data, parsed


def _coerce(catalog: Catalog, section: dict[str, Any]) -> None:
    """``4.0`` for an integer-only key becomes ``4`` (JSON Schema counts it as an integer)."""
    for key, value in section.items():
        info = catalog.keys.get(key) or catalog.node_keys.get(key)
        if info is None or not isinstance(value, float) or not value.is_integer():
            continue
        types = info.schema.get("type")
        types = [types] if isinstance(types, str) else (types or [])
        if "integer" in types and "number" not in types:
            section[key] = int(value)


def _error_text(name: str, errors: list[Finding]) -> str:
    """One line for one problem, else a first line naming the file and one indented line per problem."""
    def problem(f: Finding) -> str:
        return (f"line {f.line}, column {f.column}: " if f.line is not None else "") + f.detail

    if len(errors) == 1:
        return f"{name}: invalid generator config: {problem(errors[0])}"
    return "\n".join([f"{name}: invalid generator config ({len(errors)} problems):",
                      *(f"  {problem(f)}" for f in errors)])


def resolve_upsampler(section: dict[str, Any]) -> None:
    """Make a loaded section say the upsampler it selects, in both keys: the original flag
    ``use_learned_upsampling: true`` selects ``learned`` whatever ``generator_upsampler`` says
    (:func:`~feda2v_toolkit.config.configured_upsampler`, the one place that decides), so a section shows
    ``generator_upsampler: "learned"`` with the flag true, and any other upsampler with it false."""
    from feda2v_toolkit.config import configured_upsampler

    chosen = configured_upsampler(section)
    if chosen is None:
        return
    section["generator_upsampler"] = chosen
    section["use_learned_upsampling"] = chosen == "learned"


def load_experiment(source: ConfigSource, overrides: Mapping[str, Any] | None = None, *,
                    registry: Any = None, _stacklevel: int = 1) -> LoadedConfig:
    """Load a config (path, JSON text, or mapping) the way :func:`load_config` does, keeping everything.

    Raises :class:`~feda2v_toolkit.errors.InputError` listing every problem (first line names the
    file), :class:`~feda2v_toolkit.errors.UsageError` for a missing or unreadable file.
    """
    catalog = get_catalog(registry)
    name, data, parsed = _read(source)
    try:
        migration = migrate_document(data, catalog)
    except InputError as exc:
        raise type(exc)(f"{name}: {exc}") from None
    fix = fix_command(str(source) if parsed is not None and parsed.path is not None else None)
    notes = list(migration.notes)
    for where, key, replacement in migration.deprecated:
        extra = [n.split(": ", 1)[1] for n in notes if n.startswith(where + ": ")]
        warnings.warn(
            f"{name}: {where}.{key} is deprecated; use {replacement} (migrated in memory). "
            + (" ".join(extra) + " " if extra else "") + f"Fix the file with: {fix}",
            DeprecationWarning, stacklevel=_stacklevel + 1)
    doc = migration.document
    layout = locate(doc, catalog.is_generator_key)
    section_path: tuple[str, ...] | None
    if layout.sections:
        section_path = layout.sections[0].path
    elif layout.full and not any(key in doc for key in SECTION_KEYS):
        section_path = (SECTION_KEYS[0],)
        doc = {**doc, SECTION_KEYS[0]: {}}
    elif layout.full:
        section_path = None  # a section that is not an object: reported below (invalid-section)
    else:
        section_path = ()
    if overrides:
        unknown = [k for k in overrides if k not in catalog.keys]
        if unknown:
            hints = [f"{k!r}" + (f" (did you mean {c!r}?)" if (c := catalog.closest(k)) else "") for k in unknown]
            raise InputError(f"{name}: unknown generator key(s) in overrides: {', '.join(hints)}")
        if section_path is not None:
            target = doc if not section_path else doc[section_path[0]]
            target.update(copy.deepcopy(dict(overrides)))
    findings = check_data(doc, catalog, name=name, source=parsed)
    errors = [f for f in findings if f.severity == ERROR]
    if errors:
        raise InputError(_error_text(name, errors))
    assert section_path is not None  # an invalid section is an error above
    warned = [f for f in findings if f.severity != ERROR]
    for f in warned:
        warnings.warn(f"{name}: {f.detail}", ConfigWarning, stacklevel=_stacklevel + 1)
    raw_section = doc if not section_path else doc[section_path[0]]
    section = {**catalog.defaults(), **copy.deepcopy(raw_section)}
    if not section_path and isinstance(section.get(NODES_KEY), (dict, list)):
        del section[NODES_KEY]
    _coerce(catalog, section)
    resolve_upsampler(section)
    nodes: dict[str, dict[str, Any]] = {}
    for loc in layout.nodes:
        node = {**copy.deepcopy(section), **{k: copy.deepcopy(v) for k, v in loc.data.items()
                                             if k in catalog.keys or k in catalog.node_keys}}
        _coerce(catalog, node)
        resolve_upsampler(node)
        nodes[loc.node_id or ""] = node
    return LoadedConfig(name, doc, section, nodes, warned)


def load_config(source: ConfigSource, overrides: Mapping[str, Any] | None = None, *,
                registry: Any = None) -> dict[str, Any]:
    """The generator section of a config, migrated, validated, with every schema default filled in.

    Args:
        source: a path, JSON text, or a mapping: a full experiment config with a ``feda2v`` or
            ``feda2v_config`` section, or a bare generator section.
        overrides: generator keys to set on top (e.g. from CLI options); validated like the file.
            A value of ``None`` sets the key to null, so leave out options that were not given.
        registry: the plugin registry to validate against (default: the process-wide one).

    Deprecated keys are migrated in memory with one ``DeprecationWarning`` each, naming the replacement
    and the ``feda2v-tk migrate`` command that fixes the file. Validation warnings are emitted as
    :class:`ConfigWarning`. Non-generator keys of the section are kept; defaults come only from the
    registered schema fragments. The upsampler is shown as used: ``use_learned_upsampling: true`` gives
    ``generator_upsampler: "learned"`` (:func:`resolve_upsampler`).
    """
    return load_experiment(source, overrides, registry=registry, _stacklevel=2).section

