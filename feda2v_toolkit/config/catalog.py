"""The catalog: every key the registered schema fragments define, the deprecated keys of the registered
migrations, and the combined schema ``feda2v-tk schema`` prints (built once per registry)."""

from __future__ import annotations

import copy
import difflib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from feda2v_toolkit.config.document import describe_found
from feda2v_toolkit.config.schema import (
    COMPONENT_ANNOTATION,
    DRAFT,
    GENERATOR_PREFIX,
    TYPO_CUTOFF,
    Problem,
    check_value,
    check_with_jsonschema,
    evaluable,
)

if TYPE_CHECKING:
    from feda2v_toolkit.plugins import Registry
    from feda2v_toolkit.specs import Migration, SchemaFragment

# -- the catalog of known keys ----------------------------------------------------------------------

@dataclass(frozen=True)
class KeyInfo:
    """One known key: its property schema and the fragment (and plugin) defining it."""

    key: str
    schema: Mapping[str, Any]
    fragment: SchemaFragment

    @property
    def component(self) -> str | None:
        return self.schema.get(COMPONENT_ANNOTATION)


@dataclass
class Catalog:
    """Everything the registered fragments and migrations say about generator keys."""

    registry: Registry
    keys: dict[str, KeyInfo] = field(default_factory=dict)
    node_keys: dict[str, KeyInfo] = field(default_factory=dict)
    #: deprecated key -> (migration retiring it, replacement text)
    deprecated: dict[str, tuple[Migration, str]] = field(default_factory=dict)
    prefixes: tuple[str, ...] = (GENERATOR_PREFIX,)
    _close: dict[str, str | None] = field(default_factory=dict, repr=False)
    _checkers: dict[str, Any] = field(default_factory=dict, repr=False)
    _chains: list[Any] | None = field(default=None, repr=False)

    @classmethod
    def build(cls, registry: Registry) -> Catalog:
        cat = cls(registry)
        prefixes = {GENERATOR_PREFIX}
        for frag in registry.schema_fragments:
            for key, prop in frag.properties.items():
                cat.keys[key] = KeyInfo(key, prop, frag)
            node_props = frag.node_properties
            for key, prop in node_props.items():
                cat.node_keys[key] = KeyInfo(key, prop, frag)
            if frag.generator_type:
                prefixes.add(frag.generator_type.split(":")[-1] + "_")
            plugin = frag.provenance.plugin
            if plugin and plugin != "builtin":
                prefixes.add(plugin.replace("-", "_") + "_")
        for mig in registry.migrations:
            for key, replacement in mig.deprecated_keys.items():
                cat.deprecated.setdefault(key, (mig, replacement))
        cat.prefixes = tuple(sorted(prefixes))
        return cat

    @property
    def chains(self) -> list[Any]:
        """The registered migration chains, core first (built once; a broken chain raises every time)."""
        if self._chains is None:
            from feda2v_toolkit.config.migrate import build_chains

            self._chains = build_chains(self.registry)
        return self._chains

    # -- questions about keys
    def known(self, key: str) -> bool:
        return key in self.keys or key in self.node_keys or key in self.deprecated

    def closest(self, key: str, cutoff: float = 0.6) -> str | None:
        """The known key most like ``key`` (misspellings, other case), or None."""
        cache_key = f"{cutoff}\0{key}"
        if cache_key in self._close:
            return self._close[cache_key]
        candidates = [*self.keys, *self.node_keys]
        lowered = {c.lower(): c for c in candidates}
        match: str | None = lowered.get(key.lower())
        if match is None:
            hits = difflib.get_close_matches(key, candidates, n=1, cutoff=cutoff)
            match = hits[0] if hits else None
        self._close[cache_key] = match
        return match

    def is_generator_key(self, key: str) -> bool:
        """Known, deprecated, prefixed like a generator key, or a near miss of a known key."""
        if key.startswith("_"):
            return False
        if self.known(key) or key.startswith(self.prefixes):
            return True
        return self.closest(key, TYPO_CUTOFF) is not None

    def defaults(self) -> dict[str, Any]:
        return {key: copy.deepcopy(info.schema["default"]) for key, info in self.keys.items()
                if "default" in info.schema}

    # -- values
    def check(self, info: KeyInfo, value: Any) -> list[Problem]:
        """Schema problems of ``value`` for key ``info`` (component names included)."""
        evaluable_ = self._checkers.get(info.key)
        if evaluable_ is None:
            evaluable_ = self._checkers[info.key] = evaluable(info.schema)
        if evaluable_:
            problems = check_value(info.schema, value)
        else:
            problems = check_with_jsonschema(info.schema, value, info.fragment.schema.get("$defs"))
        if problems or info.component is None or not isinstance(value, str):
            return problems
        return self.check_component(info.component, value)

    def check_component(self, kind: str, name: str) -> list[Problem]:
        """Resolve ``name`` exactly as the registry will (bare, ``plugin:name``, clashes)."""
        from feda2v_toolkit.errors import ComponentNotFoundError

        expected = f"a registered {kind}: {', '.join(self.registry.names(kind)) or 'none registered'}"
        try:
            self.registry.get(kind, name)
        except ComponentNotFoundError as exc:
            known = name in self.registry.all_names(kind)
            message = str(exc).split("; registered:")[0] if not known else str(exc)
            return [Problem((), f"unknown {kind} {name!r}" if not known else message, expected,
                            describe_found(name))]
        return []

    def component_suggestion(self, kind: str, name: str) -> str | None:
        hits = difflib.get_close_matches(name, self.registry.all_names(kind), n=1, cutoff=0.6)
        return f"did you mean {hits[0]!r}? (`feda2v-tk list {kind}s`)" if hits else f"see `feda2v-tk list {kind}s`"

    # -- schemas for editors
    def fragments_for(self, generator: str | None) -> list[SchemaFragment]:
        if generator is None:
            return list(self.registry.schema_fragments)
        spec = self.registry.get("generator", generator)
        return [f for f in self.registry.schema_fragments
                if f.generator_type in (None, spec.name, spec.qualified_name)]

    def section_schema(self, generator: str | None = None, *, scope: str = "section") -> dict[str, Any]:
        """The generator section (or node override) schema of the given generator type, or of all."""
        props: dict[str, Any] = {}
        for frag in self.fragments_for(generator):
            for key, prop in frag.properties.items():
                props[key] = self._editor_property(dict(prop))
            if scope == "node":
                node_props = frag.node_properties
                for key, prop in node_props.items():
                    props[key] = dict(prop)
        if generator is not None and "generator_type" in props:
            spec = self.registry.get("generator", generator)
            props["generator_type"] = {**props["generator_type"], "enum": [spec.name, spec.qualified_name],
                                       "default": spec.name}
        for key, (mig, replacement) in self.deprecated.items():
            props.setdefault(key, {
                "description": f"Deprecated ({mig.chain} schema version {mig.to_version}): use {replacement}. "
                               f"Fix with `feda2v-tk migrate --in-place FILE`.",
                "deprecated": True,
            })
        prefixed = sorted(k for k in props if k.startswith(self.prefixes))
        pattern = "^(" + "|".join(re.escape(p) for p in self.prefixes) + ")"
        title = "FedA2V per-node generator overrides" if scope == "node" else "FedA2V generator section"
        return {
            "title": title + (f" ({generator})" if generator else ""),
            "description": "Generator keys (core plus plugins). Other keys pass; an unknown key with a "
                           "generator prefix is an error.",
            "type": "object",
            "properties": props,
            "propertyNames": {"anyOf": [{"not": {"pattern": pattern}}, {"enum": prefixed}]},
        }

    def _editor_property(self, prop: dict[str, Any]) -> dict[str, Any]:
        kind = prop.get(COMPONENT_ANNOTATION)
        if kind is not None:
            prop["enum"] = self.registry.all_names(kind)
        return prop

    def document_schema(self, generator: str | None = None) -> dict[str, Any]:
        """The schema of a full experiment config (generator keys only), for editor autocompletion."""
        return {
            "$schema": DRAFT,
            "$id": "https://feda2v-tk.dev/schemas/feda2v-config.schema.json",
            "title": "FedA2V experiment config: generator keys" + (f" ({generator})" if generator else ""),
            "description": "Generated by `feda2v-tk schema` from the core schema and the loaded plugins. "
                           "Sections other than the generator section and `nodes` are not described.",
            "type": "object",
            "properties": {
                "feda2v": {"$ref": "#/$defs/generator_section"},
                "feda2v_config": {"$ref": "#/$defs/generator_section"},
                "nodes": {
                    "description": "Per-node overrides keyed by node id (\"0\", \"1\", ...).",
                    "type": "object",
                    "additionalProperties": {"$ref": "#/$defs/node_overrides"},
                },
            },
            "$defs": {
                "generator_section": self.section_schema(generator),
                "node_overrides": self.section_schema(generator, scope="node"),
            },
        }


_CATALOG: tuple[Any, Catalog] | None = None


def get_catalog(registry: Registry | None = None) -> Catalog:
    """The catalog of ``registry`` (default: the process-wide one), built once per registry."""
    global _CATALOG
    if registry is None:
        from feda2v_toolkit.plugins import get_registry

        registry = get_registry()
    if _CATALOG is None or _CATALOG[0] is not registry:
        _CATALOG = (registry, Catalog.build(registry))
    return _CATALOG[1]
