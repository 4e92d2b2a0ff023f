"""The plugin registry: pluggy, entry-point discovery, guarded loading, validation and lookup.

Built-in components register through the same hooks as third-party plugins (see
:mod:`feda2v_toolkit.default_plugins`); they are loaded first, under the plugin name ``builtin``.
Third-party plugins are found through the ``feda2v_toolkit.plugins`` entry-point group; each entry
point is one plugin (a module or object with ``@hookimpl`` functions).

Loading is guarded per plugin: a plugin that fails to import, declares a newer API version than this
toolkit provides, implements an unknown hook, or registers something invalid is recorded
(:class:`PluginFailure`: plugin, distribution, version, error), skipped as a whole with a
:class:`PluginWarning`, and shown by ``feda2v-tk plugins``. Nothing else is affected.

Two plugins registering the same component name is reported as an error naming both distributions.
Neither silently wins: both stay reachable as ``plugin:name``, and the bare name is ambiguous -- except
that a built-in name keeps meaning the built-in, so installing a plugin never changes what an existing
config means.

Environment variables (the CLI flags of the same meaning take precedence):

``FEDA2V_DISABLE_PLUGIN_AUTOLOAD=1`` (``--no-plugins``)
    do not load entry-point plugins (built-ins still load).
``FEDA2V_PLUGINS=a,b`` (``--allow-plugin NAME``)
    load only these entry-point plugins, by plugin or distribution name (an empty value loads none).
``FEDA2V_BLOCK_PLUGINS=a,b`` (``--block-plugin NAME``)
    never load these entry-point plugins.
``FEDA2V_STRICT_PLUGINS=1`` (``--strict-plugins``)
    any plugin problem (import error, invalid registration, name clash, API mismatch) is fatal.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import importlib.metadata
import os
import re
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import pluggy

from feda2v_toolkit import API_VERSION, __version__, hookspecs
from feda2v_toolkit.errors import ComponentNotFoundError, PluginError, PluginValidationError
from feda2v_toolkit.specs import (
    COMPONENT_SPECS,
    CORE_CHAIN,
    NAME_PATTERN,
    ComponentSpec,
    Migration,
    Provenance,
    SchemaFragment,
)

ENTRY_POINT_GROUP = "feda2v_toolkit.plugins"
BUILTIN_PLUGIN = "builtin"
BUILTIN_DISTRIBUTION = "feda2v-tk"
#: The core migration chain; only the built-in plugin may add steps to it.
#: Modules of the built-in plugin, registered in this order.
DEFAULT_PLUGIN_MODULES: tuple[str, ...] = (
    "feda2v_toolkit.default_plugins.config",
    "feda2v_toolkit.default_plugins.generators",
    "feda2v_toolkit.default_plugins.reducers",
    "feda2v_toolkit.default_plugins.upsamplers",
)
#: A plugin module may set this attribute to the lowest ``API_VERSION`` it works with.
MIN_API_ATTRIBUTE = "feda2v_min_api_version"
#: Plugin (entry-point) names: no ``:`` (it separates ``plugin:name``), no spaces.
PLUGIN_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
#: Prefix of every hook name; a plugin function with this prefix that matches no hook is an error.
HOOK_PREFIX = "feda2v_"

ENV_DISABLE_AUTOLOAD = "FEDA2V_DISABLE_PLUGIN_AUTOLOAD"
ENV_ALLOW = "FEDA2V_PLUGINS"
ENV_BLOCK = "FEDA2V_BLOCK_PLUGINS"
ENV_STRICT = "FEDA2V_STRICT_PLUGINS"

REGISTER_HOOKS: dict[str, str] = {
    "generator": "feda2v_register_generators",
    "reducer": "feda2v_register_reducers",
    "upsampler": "feda2v_register_upsamplers",
    "schema_fragment": "feda2v_register_schema_fragments",
    "migration": "feda2v_register_migrations",
}
COMMANDS_HOOK = "feda2v_register_commands"
KINDS = ("generator", "reducer", "upsampler")

#: PluginInfo.status values
LOADED, FAILED, INCOMPATIBLE, BLOCKED, DISABLED = "loaded", "failed", "incompatible", "blocked", "disabled"


class PluginWarning(UserWarning):
    """Emitted when a plugin is skipped, or partly unusable, because of a load problem."""


@dataclass
class PluginInfo:
    """One plugin as ``feda2v-tk plugins`` shows it.

    ``status`` is ``loaded`` (possibly with ``errors``, e.g. a name clash or a failed command),
    ``failed`` (skipped), ``incompatible`` (needs a newer plugin API), ``blocked`` or ``disabled``
    (not loaded on purpose).
    """

    name: str
    distribution: str | None
    version: str | None
    source: str  # "builtin", "entry-point" or "direct"
    status: str = LOADED
    errors: list[str] = field(default_factory=list)
    modules: list[str] = field(default_factory=list)
    hooks: list[str] = field(default_factory=list)
    registered: dict[str, list[str]] = field(default_factory=dict)
    min_api_version: int | None = None

    @property
    def error(self) -> str | None:
        return "; ".join(self.errors) if self.errors else None

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "distribution": self.distribution,
            "version": self.version,
            "source": self.source,
            "status": self.status,
            "error": self.error,
            "min_api_version": self.min_api_version,
            "modules": self.modules,
            "hooks": sorted(set(self.hooks)),
            "registered": self.registered,
        }


@dataclass(frozen=True)
class PluginFailure:
    """A recorded problem: the plugin it concerns, its distribution and version, and the error."""

    plugin: str
    distribution: str | None
    version: str | None
    error: str
    status: str = FAILED
    traceback: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"plugin": self.plugin, "distribution": self.distribution, "version": self.version,
                "status": self.status, "error": self.error}

    def __str__(self) -> str:
        where = f"{self.distribution} {self.version}" if self.distribution else "not installed"
        return f"plugin {self.plugin!r} ({where}): {self.error}"


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no", "off")


def _env_list(name: str) -> list[str] | None:
    value = os.environ.get(name)
    if value is None:
        return None
    return [item.strip() for item in value.split(",") if item.strip()]


def _normalize(name: str) -> str:
    """PEP 503 normalisation, so ``feda2v_tk_flow`` matches ``feda2v-tk-flow``."""
    return re.sub(r"[-_.]+", "-", name).lower()


class Registry:
    """Everything the loaded plugins registered, with lookup by bare or qualified name."""

    def __init__(self, pm: pluggy.PluginManager, *, strict: bool = False) -> None:
        self.pm = pm
        self.strict = strict
        self.plugins: list[PluginInfo] = []
        self.failures: list[PluginFailure] = []
        self.components: dict[str, dict[str, ComponentSpec]] = {kind: {} for kind in KINDS}
        self.schema_fragments: list[SchemaFragment] = []
        self.migrations: list[Migration] = []
        #: pluggy plugin name -> the PluginInfo it belongs to (built-ins have one per module)
        self.pm_names: dict[str, PluginInfo] = {}
        self._commands_added: set[int] = set()

    # -- lookup ---------------------------------------------------------------------------------
    def specs(self, kind: str) -> list[ComponentSpec]:
        """All registered specs of a kind, in registration order."""
        return list(self.components[kind].values())

    def names(self, kind: str) -> list[str]:
        """Names users can write in a config: bare names, qualified names where a bare one is ambiguous."""
        out: list[str] = []
        for spec in self.specs(kind):
            try:
                unique = self.get(kind, spec.name) is spec
            except ComponentNotFoundError:
                unique = False
            out.append(spec.name if unique else spec.qualified_name)
        return out

    def all_names(self, kind: str) -> list[str]:
        """Every accepted spelling: bare names and ``plugin:name`` qualified names."""
        return sorted({s.name for s in self.specs(kind)} | {s.qualified_name for s in self.specs(kind)})

    def _by_bare_name(self, kind: str, name: str) -> list[ComponentSpec]:
        return [spec for spec in self.components[kind].values() if spec.name == name]

    def get(self, kind: str, name: str) -> ComponentSpec:
        """Find a spec by ``name`` or ``plugin:name``.

        A bare name registered by two plugins is ambiguous (an error naming both distributions),
        unless one of them is the built-in plugin, whose names are stable.
        """
        if kind not in self.components:
            raise ComponentNotFoundError(f"unknown component kind {kind!r}; use one of {', '.join(KINDS)}")
        if ":" in name:
            spec = self.components[kind].get(name)
            if spec is None:
                raise ComponentNotFoundError(
                    f"no {kind} {name!r}; registered: {', '.join(self.all_names(kind)) or 'none'}"
                    f"{_hint(name, self.all_names(kind))}")
            return spec
        matches = self._by_bare_name(kind, name)
        if not matches:
            raise ComponentNotFoundError(
                f"no {kind} named {name!r}; registered: {', '.join(self.names(kind)) or 'none'}"
                f"{_hint(name, self.all_names(kind))}")
        if len(matches) > 1:
            builtin = [m for m in matches if m.plugin == BUILTIN_PLUGIN]
            if builtin:
                return builtin[0]
            raise ComponentNotFoundError(
                f"{kind} name {name!r} is registered by {_owners(matches, ' and ')}; "
                f"use the qualified name ({', '.join(m.qualified_name for m in matches)})")
        return matches[0]

    def load(self, kind: str, name: str) -> type:
        """Resolve a component class (importing it, which may import torch) and check its base class."""
        spec = self.get(kind, name)
        try:
            with _guarded(f"import of {spec.factory_path!r}"):
                cls = spec.load()
        except Exception as exc:
            raise PluginError(f"{kind} {spec.qualified_name} ({spec.provenance.distribution or 'not installed'}): "
                              f"cannot import {spec.factory_path!r}: {type(exc).__name__}: {exc}") from exc
        base = spec.base_class()
        if not (isinstance(cls, type) and issubclass(cls, base)):
            raise PluginValidationError(
                f"{kind} {spec.qualified_name}: {spec.factory_path} is not a subclass of "
                f"{base.__module__}.{base.__qualname__}")
        return cls

    def plugin(self, name: str) -> PluginInfo | None:
        return next((p for p in self.plugins if p.name == name), None)

    def settings(self, spec: ComponentSpec) -> list[str]:
        """Config keys a component reads: its declared ``settings``, then the keys of schema fragments
        bound to it (``SchemaFragment.generator_type``)."""
        keys = list(spec.settings)
        if spec.kind == "generator":
            for frag in self.schema_fragments:
                if frag.generator_type in (spec.name, spec.qualified_name) and \
                        frag.provenance.plugin == spec.plugin:
                    keys += [k for k in frag.properties if k not in keys]
        return keys

    # -- commands -------------------------------------------------------------------------------
    def add_commands(self, group: Any, reserved: Iterable[str] = ()) -> None:
        """Run every ``feda2v_register_commands`` implementation on a click group, guarded per plugin.

        A plugin whose hook raises, or that tries to replace a ``reserved`` (built-in) command, has
        the offending commands removed and the problem recorded; the other commands keep working.
        """
        if id(group) in self._commands_added:
            return
        self._commands_added.add(id(group))
        reserved = set(reserved)
        for impl in getattr(self.pm.hook, COMMANDS_HOOK).get_hookimpls():
            info = self.pm_names.get(impl.plugin_name)
            if info is None:  # pragma: no cover - every registered plugin has an info
                continue
            before = dict(group.commands)
            try:
                with _guarded(f"{COMMANDS_HOOK} of {info.name!r}"):
                    impl.function(cli=group)
            except Exception as exc:
                group.commands.clear()
                group.commands.update(before)
                self.record_problem(info, f"{COMMANDS_HOOK} failed: {type(exc).__name__}: {exc}",
                                    traceback.format_exc())
                continue
            for name in sorted(set(group.commands) | set(before)):
                old, new = before.get(name), group.commands.get(name)
                if new is old:
                    continue
                if name in reserved or old is not None:
                    if old is None:
                        group.commands.pop(name, None)
                    else:
                        group.commands[name] = old
                    owner = "feda2v-tk" if name in reserved else "another plugin"
                    self.record_problem(info, f"command {name!r} is already provided by {owner}; "
                                              "the plugin's command was not added")
                    continue
                commands = info.registered.setdefault("commands", [])
                if name not in commands:
                    commands.append(name)

    # -- failures -------------------------------------------------------------------------------
    def record_failure(self, info: PluginInfo, error: str, tb: str | None = None, *,
                       status: str = FAILED) -> None:
        """Record a problem with ``info``: fatal in strict mode, else a :class:`PluginWarning`.

        ``status`` becomes the plugin's status (use ``loaded`` for a problem that leaves the
        plugin's other registrations usable, e.g. a name clash).
        """
        if info.source == "builtin" and status != LOADED:  # a broken built-in is a bug, never hidden
            raise PluginError(f"built-in plugin: {error}")
        info.status = status
        info.errors.append(error)
        failure = PluginFailure(info.name, info.distribution, info.version, error, status, tb)
        self.failures.append(failure)
        if self.strict:
            raise PluginError(f"{failure} (strict plugin mode: {ENV_STRICT}=1 or --strict-plugins)")
        action = "skipped" if status in (FAILED, INCOMPATIBLE) else "problem with"
        warnings.warn(f"{action} {failure}", PluginWarning, stacklevel=2)

    def record_problem(self, info: PluginInfo, error: str, tb: str | None = None) -> None:
        """A problem that leaves the plugin loaded (clash, command hook failure)."""
        self.record_failure(info, error, tb, status=info.status if info.status != FAILED else LOADED)


def _hint(name: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(name, candidates, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _owners(specs: Iterable[ComponentSpec], sep: str = ", ") -> str:
    return sep.join(f"{s.qualified_name} (from {_dist_text(s.provenance)})" for s in specs)


def _dist_text(p: Provenance) -> str:
    if p.distribution is None:
        return "not installed"
    return f"{p.distribution} {p.version}" if p.version else p.distribution


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
    from feda2v_toolkit.config.schema import check_fragment_schema

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


def _distribution_of(ep: importlib.metadata.EntryPoint) -> tuple[str | None, str | None]:
    dist = getattr(ep, "dist", None)
    if dist is None:
        return None, None
    return dist.metadata["Name"], dist.version


def _check_hook_names(registry: Registry, obj: Any) -> None:
    """A ``feda2v_*`` function that matches no hook is a typo that would silently do nothing."""
    known = set(REGISTER_HOOKS.values()) | {COMMANDS_HOOK}
    for caller in registry.pm.get_hookcallers(obj) or []:
        if caller.name.startswith(HOOK_PREFIX) and caller.name not in known:
            raise PluginValidationError(
                f"unknown hook {caller.name!r}{_hint(caller.name, sorted(known))}; hooks are: {', '.join(sorted(known))}")


def _register_plugin(registry: Registry, obj: Any, info: PluginInfo, pm_name: str | None = None) -> None:
    """Register one plugin object with pluggy (as ``pm_name``, default the plugin's name) and run its
    register hooks into a staging area."""
    if info not in registry.plugins:
        registry.plugins.append(info)
    required = getattr(obj, MIN_API_ATTRIBUTE, None)
    if required is not None:
        if isinstance(required, bool) or not isinstance(required, int):
            registry.record_failure(info, f"{MIN_API_ATTRIBUTE} must be an integer, not {required!r}")
            return
        info.min_api_version = required
        if required > API_VERSION:
            registry.record_failure(
                info, f"requires feda2v-tk plugin API version {required}; this feda2v-tk ({__version__}) "
                f"provides API version {API_VERSION}: upgrade feda2v-tk", status=INCOMPATIBLE)
            return
    pm_name = pm_name or info.name
    try:
        with _guarded(f"plugin {info.name!r}"):
            _register_hooks(registry, obj, info, pm_name)
    except Exception as exc:
        if registry.pm.is_registered(obj):
            registry.pm.unregister(obj)
        registry.pm_names.pop(pm_name, None)
        info.hooks.clear()
        error = str(exc) if isinstance(exc, PluginError) else f"{type(exc).__name__}: {exc}"
        error = "; ".join(line.strip() for line in error.splitlines() if line.strip())
        registry.record_failure(info, error, traceback.format_exc())


def _register_hooks(registry: Registry, obj: Any, info: PluginInfo, pm_name: str) -> None:
    """Register ``obj`` with pluggy and commit what its register hooks register (raises on any problem)."""
    if registry.pm.is_registered(obj) or registry.pm.has_plugin(pm_name):
        raise PluginValidationError(f"a plugin named {pm_name!r} (or this very module) is already registered")
    registry.pm.register(obj, name=pm_name)  # validates hook signatures against the specs
    registry.pm_names[pm_name] = info
    _check_hook_names(registry, obj)
    staging = _Staging(registry, info)
    for kind, hook_name in REGISTER_HOOKS.items():
        for impl in getattr(registry.pm.hook, hook_name).get_hookimpls():
            if impl.plugin_name == pm_name:
                info.hooks.append(hook_name)
                impl.function(register=staging.register_callback(kind))
    if any(impl.plugin_name == pm_name for impl in getattr(registry.pm.hook, COMMANDS_HOOK).get_hookimpls()):
        info.hooks.append(COMMANDS_HOOK)
    staging.commit()


def _report_clashes(registry: Registry) -> None:
    """Two plugins using one bare name: an error naming both distributions (both stay reachable)."""
    for kind in KINDS:
        by_name: dict[str, list[ComponentSpec]] = {}
        for spec in registry.specs(kind):
            by_name.setdefault(spec.name, []).append(spec)
        for name, specs in by_name.items():
            if len(specs) < 2:
                continue
            builtin = any(s.plugin == BUILTIN_PLUGIN for s in specs)
            meaning = (f"{name!r} keeps meaning {BUILTIN_PLUGIN}:{name}" if builtin
                       else f"the bare name {name!r} is ambiguous")
            message = (f"{kind} name {name!r} is registered by {_owners(specs, ' and ')}; {meaning}, "
                       f"use the qualified names")
            for spec in specs:
                info = registry.plugin(spec.plugin)
                if info is not None and info.source != "builtin":
                    registry.record_problem(info, message)


def _matches(info: PluginInfo, names: Iterable[str]) -> bool:
    wanted = {_normalize(n) for n in names}
    return _normalize(info.name) in wanted or (info.distribution is not None
                                               and _normalize(info.distribution) in wanted)


def _warn_unmatched(found: list[PluginInfo], names: Iterable[str], what: str) -> None:
    """A name in an allow- or block-list that matches no installed plugin is most likely a typo: say so."""
    for name in names:
        if not any(_matches(info, [name]) for info in found):
            known = ", ".join(sorted(info.name for info in found if info.source == "entry-point")) or "none"
            warnings.warn(f"the plugin {what} names {name!r}, which is not an installed plugin "
                          f"(installed: {known})", PluginWarning, stacklevel=3)


#: a plugin import slower than this many seconds is named in a warning (it delays every command)
SLOW_IMPORT_SECONDS = 1.0


class PluginAbort(Exception):
    """A plugin called ``sys.exit()`` or raised ``KeyboardInterrupt`` while being imported or registered."""


@contextlib.contextmanager
def _guarded(what: str) -> Iterator[None]:
    """Run plugin code so that it cannot take the CLI down: anything it prints goes to stderr (stdout
    carries JSON), and ``sys.exit()`` or ``KeyboardInterrupt`` become an ordinary failure."""
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    except SystemExit as exc:
        raise PluginAbort(f"{what} called sys.exit({exc.code!r})") from None
    except KeyboardInterrupt:
        raise PluginAbort(f"{what} raised KeyboardInterrupt") from None


def _warn_if_slow(info: PluginInfo, seconds: float) -> None:
    if seconds > SLOW_IMPORT_SECONDS:
        warnings.warn(f"plugin {info.name!r} ({_dist_text(info)}) took {seconds:.1f}s to import; every command "
                      f"pays for it (--block-plugin {info.name} skips it)", PluginWarning, stacklevel=3)


def load_registry(
    *,
    autoload: bool | None = None,
    allow: Iterable[str] | None = None,
    block: Iterable[str] | None = None,
    also_block: Iterable[str] = (),
    strict: bool | None = None,
    extra_plugins: Iterable[tuple[str, Any]] = (),
) -> Registry:
    """Build a fresh registry: built-ins, then entry-point plugins (sorted by name), then ``extra_plugins``.

    Arguments default to the environment variables documented in this module. ``allow`` and
    ``block`` match plugin (entry-point) names or distribution names; ``also_block`` adds to the block list
    (the CLI's ``--block-plugin`` adds to ``FEDA2V_BLOCK_PLUGINS``). ``extra_plugins`` are
    ``(name, module_or_object)`` pairs registered directly, as if installed (this is how the
    conformance kit and tests load a plugin without installing it).
    """
    autoload = (not _env_flag(ENV_DISABLE_AUTOLOAD)) if autoload is None else autoload
    allow_list = _env_list(ENV_ALLOW) if allow is None else list(allow)
    block_list = [*((_env_list(ENV_BLOCK) or []) if block is None else block), *also_block]
    strict = _env_flag(ENV_STRICT) if strict is None else strict

    pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    registry = Registry(pm, strict=strict)

    builtin = PluginInfo(BUILTIN_PLUGIN, BUILTIN_DISTRIBUTION, __version__, "builtin",
                         modules=list(DEFAULT_PLUGIN_MODULES))
    for module_name in DEFAULT_PLUGIN_MODULES:
        module = importlib.import_module(module_name)  # a broken built-in is a bug: let it raise
        _register_plugin(registry, module, builtin, f"{BUILTIN_PLUGIN}.{module_name.rsplit('.', 1)[-1]}")

    taken: dict[str, PluginInfo] = {_normalize(BUILTIN_PLUGIN): builtin}
    if autoload:
        for ep in sorted(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
            dist_name, dist_version = _distribution_of(ep)
            info = PluginInfo(ep.name, dist_name, dist_version, "entry-point", modules=[ep.value])
            if _matches(info, block_list):
                info.status = BLOCKED
                registry.plugins.append(info)
                continue
            if allow_list is not None and not _matches(info, allow_list):
                info.status = DISABLED
                registry.plugins.append(info)
                continue
            registry.plugins.append(info)
            if not PLUGIN_NAME_PATTERN.match(ep.name):
                registry.record_failure(info, f"invalid plugin (entry-point) name {ep.name!r}: use letters, "
                                              "digits, '_', '-' or '.' (no ':')")
                continue
            other = taken.get(_normalize(ep.name))
            if other is not None:
                registry.record_failure(
                    info, f"plugin name {ep.name!r} is already used by {other.distribution or 'another plugin'} "
                    f"{other.version or ''}".rstrip())
                continue
            taken[_normalize(ep.name)] = info
            t0 = time.perf_counter()
            try:
                with _guarded(f"import of {ep.value!r}"):
                    obj = ep.load()
            except Exception as exc:
                registry.record_failure(info, f"import of {ep.value!r} failed: {type(exc).__name__}: {exc}",
                                        traceback.format_exc())
                continue
            finally:
                _warn_if_slow(info, time.perf_counter() - t0)
            _register_plugin(registry, obj, info)

    if autoload:
        _warn_unmatched(registry.plugins, allow_list or [], "allow-list (--allow-plugin / FEDA2V_PLUGINS)")
        _warn_unmatched(registry.plugins, block_list, "block-list (--block-plugin / FEDA2V_BLOCK_PLUGINS)")

    for name, obj in extra_plugins:
        info = PluginInfo(name, None, None, "direct", modules=[getattr(obj, "__name__", type(obj).__name__)])
        if _normalize(name) in taken:
            registry.plugins.append(info)
            registry.record_failure(info, f"plugin name {name!r} is already taken")
            continue
        taken[_normalize(name)] = info
        _register_plugin(registry, obj, info)

    _report_clashes(registry)
    return registry


_REGISTRY: Registry | None = None
_OPTIONS: dict[str, Any] = {}


def configure(**options: Any) -> None:
    """Set :func:`load_registry` options for the process-wide registry (used by the CLI flags)."""
    global _REGISTRY
    _OPTIONS.update({k: v for k, v in options.items() if v is not None})
    _REGISTRY = None


def get_registry() -> Registry:
    """The process-wide registry, loaded on first use."""
    global _REGISTRY
    if _REGISTRY is None:
        _REGISTRY = load_registry(**_OPTIONS)
    return _REGISTRY


def reset_registry() -> None:
    """Forget the process-wide registry and options (tests)."""
    global _REGISTRY
    _REGISTRY = None
    _OPTIONS.clear()


@contextlib.contextmanager
def using_registry(registry: Registry) -> Iterator[Registry]:
    """Make ``registry`` the process-wide one inside the block (e.g. one built with ``extra_plugins``),
    so that training, model files and config loading see its components."""
    global _REGISTRY
    saved = _REGISTRY
    _REGISTRY = registry
    try:
        yield registry
    finally:
        _REGISTRY = saved


# -- timm-style helpers -------------------------------------------------------------------------

def list_generators() -> list[str]:
    """Generator type names usable in a config (``generator_type``)."""
    return get_registry().names("generator")


def list_reducers() -> list[str]:
    """Reducer names usable in a config (``generator_reducer``)."""
    return get_registry().names("reducer")


def list_upsamplers() -> list[str]:
    """Upsampler names usable in a config (``generator_upsampler``)."""
    return get_registry().names("upsampler")


def create_generator(name: str, **kwargs: Any) -> Any:
    """Instantiate a generator type by (qualified) name: ``cls(**kwargs)``."""
    return get_registry().load("generator", name)(**kwargs)


def create_reducer(name: str, **kwargs: Any) -> Any:
    """Instantiate a reducer by (qualified) name: ``cls(**kwargs)``."""
    return get_registry().load("reducer", name)(**kwargs)


def create_upsampler(name: str, **kwargs: Any) -> Any:
    """Instantiate an upsampler by (qualified) name: ``cls(**kwargs)``."""
    return get_registry().load("upsampler", name)(**kwargs)
