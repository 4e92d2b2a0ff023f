"""Checking what a plugin registers: one plugin's registrations are staged, validated against each other
and the registry, and committed all together or not at all."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

from feda2v_toolkit.config.schema import check_fragment_schema
from feda2v_toolkit.errors import PluginValidationError
from feda2v_toolkit.plugins.registry import (
    COMMANDS_HOOK,
    HOOK_PREFIX,
    KINDS,
    REGISTER_HOOKS,
    PluginInfo,
    Registry,
    _dist_text,
    _hint,
)
from feda2v_toolkit.specs import (
    COMPONENT_SPECS,
    CORE_CHAIN,
    NAME_PATTERN,
    ComponentSpec,
    Migration,
    Provenance,
    SchemaFragment,
)


class _Staging:
    """Collects one plugin's registrations so that they are committed all together or not at all."""

    def __init__(self, registry: Registry, info: PluginInfo) -> None:
        self.registry = registry
        self.info = info
        self.provenance = Provenance(info.name, info.distribution, info.version)
        self.items: dict[str, list[Any]] = {kind: [] for kind in REGISTER_HOOKS}

    def register_callback(self, kind: str) -> Callable[[Any], None]:
        def register(obj: Any) -> None:
            self.items[kind].append(self._validate(kind, obj))

        register.__name__ = f"register_{kind}"
        return register

    def _validate(self, kind: str, obj: Any) -> Any:
        if kind in COMPONENT_SPECS:
            expected: type = COMPONENT_SPECS[kind]
        elif kind == "schema_fragment":
            expected = SchemaFragment
        else:
            expected = Migration
        if not isinstance(obj, expected):
            raise PluginValidationError(
                f"{REGISTER_HOOKS[kind]} registered {type(obj).__name__}; expected {expected.__name__}")
        name = obj.id if isinstance(obj, Migration) else obj.name
        if not isinstance(name, str) or not NAME_PATTERN.match(name):
            raise PluginValidationError(
                f"invalid {kind} name {name!r}: use lowercase letters, digits, '_' or '-', starting with a letter")
        if kind in COMPONENT_SPECS:
            _validate_component(kind, obj)
        elif kind == "schema_fragment":
            _validate_fragment(obj)
        else:
            _validate_migration(obj)
        return replace(obj, provenance=self.provenance)

    def commit(self) -> None:
        """Check the staged items against each other and the registry, then add them all."""
        reg = self.registry
        for kind in REGISTER_HOOKS:
            seen: set[str] = set()
            for item in self.items[kind]:
                name = item.id if isinstance(item, Migration) else item.name
                if name in seen:
                    raise PluginValidationError(f"{kind} {name!r} registered twice")
                seen.add(name)
        known_keys = {key: frag for frag in reg.schema_fragments for key in frag.properties}
        for frag in self.items["schema_fragment"]:
            for key in frag.properties:
                other = known_keys.get(key)
                if other is not None and other is not frag:
                    raise PluginValidationError(
                        f"config key {key!r} is already defined by plugin {other.provenance.plugin!r} "
                        f"({_dist_text(other.provenance)}); {_dist_text(self.provenance)} cannot redefine it")
                known_keys[key] = frag
        steps = {(m.chain, m.from_version): m for m in reg.migrations}
        ids = {m.id: m for m in reg.migrations}
        owners = {m.chain: m.provenance for m in reg.migrations}
        for mig in self.items["migration"]:
            if mig.id in ids:
                raise PluginValidationError(
                    f"migration id {mig.id!r} is already registered by plugin {ids[mig.id].provenance.plugin!r}")
            if mig.chain == CORE_CHAIN and self.info.source != "builtin":
                raise PluginValidationError(
                    f"migration {mig.id!r}: only feda2v-tk itself adds steps to the {CORE_CHAIN!r} chain; "
                    f"use the plugin's own chain (e.g. chain={self.info.name!r})")
            owner = owners.get(mig.chain)
            if owner is not None and owner.plugin != self.info.name:
                raise PluginValidationError(
                    f"migration {mig.id!r}: chain {mig.chain!r} belongs to plugin {owner.plugin!r} "
                    f"({_dist_text(owner)}); use the plugin's own chain")
            clash = steps.get((mig.chain, mig.from_version))
            if clash is not None:
                raise PluginValidationError(
                    f"migration chain {mig.chain!r} already has a step from version {mig.from_version} "
                    f"({clash.id})")
            steps[(mig.chain, mig.from_version)] = mig
            ids[mig.id] = mig
        # everything is valid: commit
        for kind in KINDS:
            for spec in self.items[kind]:
                reg.components[kind][spec.qualified_name] = spec
                self.info.registered.setdefault(kind + "s", []).append(spec.name)
        for frag in self.items["schema_fragment"]:
            reg.schema_fragments.append(frag)
            self.info.registered.setdefault("schema_fragments", []).append(frag.name)
        for mig in self.items["migration"]:
            reg.migrations.append(mig)
            self.info.registered.setdefault("migrations", []).append(mig.id)


def _validate_component(kind: str, spec: ComponentSpec) -> None:
    name = spec.name
    if not isinstance(spec.description, str) or not spec.description.strip():
        raise PluginValidationError(f"{kind} {name!r} needs a one-line description")
    if "\n" in spec.description.strip():
        raise PluginValidationError(f"{kind} {name!r}: the description must be one line")
    factory = spec.factory
    if isinstance(factory, str):
        module, sep, attr = factory.partition(":")
        if not (sep and module and attr):
            raise PluginValidationError(f"{kind} {name!r}: factory {factory!r} must be 'module:attr'")
    elif isinstance(factory, type):
        # a class object: its module is imported already, so checking the base class costs nothing
        # (a real subclass has imported feda2v_toolkit.components; if that is not loaded, it cannot be one)
        import sys

        base_module, _, base_name = spec.base_class_path.partition(":")
        base = getattr(sys.modules.get(base_module), base_name, None)
        if base is None or not issubclass(factory, base):
            raise PluginValidationError(
                f"{kind} {name!r}: factory {factory.__qualname__} is not a subclass of {base_module}.{base_name}")
    else:
        raise PluginValidationError(f"{kind} {name!r}: factory must be a class or a 'module:attr' string")
    if isinstance(spec.settings, str) or not all(isinstance(s, str) for s in spec.settings):
        raise PluginValidationError(f"{kind} {name!r}: settings must be a tuple of config key names")
    if not isinstance(spec.test_config, Mapping):
        raise PluginValidationError(f"{kind} {name!r}: test_config must be a mapping of config keys")
    for flag in ("positional", "trainable"):
        if hasattr(spec, flag) and not isinstance(getattr(spec, flag), bool):
            raise PluginValidationError(f"{kind} {name!r}: {flag} must be True or False")


def _validate_fragment(frag: SchemaFragment) -> None:
    schema = frag.schema
    if not isinstance(schema, Mapping) or not isinstance(schema.get("properties"), Mapping):
        raise PluginValidationError(f"schema fragment {frag.name!r} must be an object schema with 'properties'")
    # plain schemas are checked without importing jsonschema (it would double `validate`'s start-up time)

    try:
        check_fragment_schema(schema)
    except ValueError as exc:
        raise PluginValidationError(f"schema fragment {frag.name!r} is not a valid JSON Schema: {exc}") from None
    for key, prop in schema["properties"].items():
        if not isinstance(prop, Mapping) or not isinstance(prop.get("description"), str):
            raise PluginValidationError(f"schema fragment {frag.name!r}: key {key!r} needs a 'description'")
    if frag.generator_type is not None and not isinstance(frag.generator_type, str):
        raise PluginValidationError(f"schema fragment {frag.name!r}: generator_type must be a name or None")


def _validate_migration(mig: Migration) -> None:
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (mig.from_version, mig.to_version)):
        raise PluginValidationError(f"migration {mig.id!r}: versions must be integers")
    if mig.from_version < 1 or mig.to_version != mig.from_version + 1:
        raise PluginValidationError(f"migration {mig.id!r}: versions must be n -> n + 1 with n >= 1")
    if not isinstance(mig.chain, str) or not NAME_PATTERN.match(mig.chain):
        raise PluginValidationError(f"migration {mig.id!r}: invalid chain name {mig.chain!r}")
    if not callable(mig.apply):
        raise PluginValidationError(f"migration {mig.id!r}: apply must be callable")
    if mig.detect is not None and not callable(mig.detect):
        raise PluginValidationError(f"migration {mig.id!r}: detect must be callable or None")
    keys = getattr(mig, "deprecated_keys", {}) or {}
    if not isinstance(keys, Mapping) or not all(isinstance(k, str) and isinstance(v, str) for k, v in keys.items()):
        raise PluginValidationError(f"migration {mig.id!r}: deprecated_keys must map key names to replacement texts")


def _check_hook_names(registry: Registry, obj: Any) -> None:
    """A ``feda2v_*`` function that matches no hook is a typo that would silently do nothing."""
    known = set(REGISTER_HOOKS.values()) | {COMMANDS_HOOK}
    for caller in registry.pm.get_hookcallers(obj) or []:
        if caller.name.startswith(HOOK_PREFIX) and caller.name not in known:
            raise PluginValidationError(
                f"unknown hook {caller.name!r}{_hint(caller.name, sorted(known))}; hooks are: {', '.join(sorted(known))}")
