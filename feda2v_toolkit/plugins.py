"""The plugin registry: pluggy, entry-point discovery, guarded loading, validation and lookup.

Built-in components register through the same hooks as third-party plugins (see
:mod:`feda2v_toolkit.default_plugins`); they are loaded first, under the plugin name ``builtin``.

Environment variables (CLI flags of the same meaning override them):

``FEDA2V_DISABLE_PLUGIN_AUTOLOAD=1``
    do not load entry-point plugins (built-ins still load).
``FEDA2V_PLUGINS=a,b``
    load only these entry-point plugins (an empty value loads none).
``FEDA2V_BLOCK_PLUGINS=a,b``
    never load these entry-point plugins.
``FEDA2V_STRICT_PLUGINS=1``
    a plugin failure (import error, invalid registration, name clash, API mismatch) is fatal.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import traceback
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import pluggy

from feda2v_toolkit import API_VERSION, __version__, hookspecs
from feda2v_toolkit.errors import ComponentNotFoundError, PluginError, PluginValidationError
from feda2v_toolkit.specs import (
    COMPONENT_SPECS,
    NAME_PATTERN,
    ComponentSpec,
    Migration,
    Provenance,
    SchemaFragment,
)

ENTRY_POINT_GROUP = "feda2v_toolkit.plugins"
BUILTIN_PLUGIN = "builtin"
#: Modules of the built-in plugin, registered in this order.
DEFAULT_PLUGIN_MODULES: tuple[str, ...] = (
    "feda2v_toolkit.default_plugins.config",
    "feda2v_toolkit.default_plugins.generators",
    "feda2v_toolkit.default_plugins.reducers",
    "feda2v_toolkit.default_plugins.upsamplers",
)
#: A plugin module may set this attribute to the lowest API_VERSION it works with.
MIN_API_ATTRIBUTE = "feda2v_min_api_version"

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
KINDS = ("generator", "reducer", "upsampler")


class PluginWarning(UserWarning):
    """Emitted when a plugin is skipped because it failed to load or register."""


@dataclass
class PluginInfo:
    """One plugin as ``feda2v-tk plugins`` shows it."""

    name: str
    distribution: str | None
    version: str | None
    source: str  # "builtin", "entry-point" or "direct"
    status: str = "loaded"  # loaded | failed | blocked | disabled | incompatible
    error: str | None = None
    modules: list[str] = field(default_factory=list)
    hooks: list[str] = field(default_factory=list)
    registered: dict[str, list[str]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "distribution": self.distribution,
            "version": self.version,
            "source": self.source,
            "status": self.status,
            "error": self.error,
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
    traceback: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"plugin": self.plugin, "distribution": self.distribution, "version": self.version,
                "error": self.error}


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no", "off")


def _env_list(name: str) -> list[str] | None:
    value = os.environ.get(name)
    if value is None:
        return None
    return [item.strip() for item in value.split(",") if item.strip()]


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

    # -- lookup ---------------------------------------------------------------------------------
    def specs(self, kind: str) -> list[ComponentSpec]:
        """All registered specs of a kind, in registration order (keyed by qualified name)."""
        return list(self.components[kind].values())

    def names(self, kind: str) -> list[str]:
        """Names users can write in a config: bare names, plus qualified names for clashing ones."""
        out: list[str] = []
        for spec in self.specs(kind):
            out.append(spec.name if len(self._by_bare_name(kind, spec.name)) == 1 else spec.qualified_name)
        return out

    def all_names(self, kind: str) -> list[str]:
        """Every accepted spelling: bare names and ``plugin:name`` qualified names."""
        return sorted({s.name for s in self.specs(kind)} | {s.qualified_name for s in self.specs(kind)})

    def _by_bare_name(self, kind: str, name: str) -> list[ComponentSpec]:
        return [spec for spec in self.components[kind].values() if spec.name == name]

    def get(self, kind: str, name: str) -> ComponentSpec:
        """Find a spec by ``name`` or ``plugin:name``; a bare name claimed by two plugins is an error."""
        if kind not in self.components:
            raise ComponentNotFoundError(f"unknown component kind {kind!r}")
        if ":" in name:
            spec = self.components[kind].get(name)
            if spec is None:
                raise ComponentNotFoundError(
                    f"no {kind} {name!r}; registered: {', '.join(self.all_names(kind)) or 'none'}")
            return spec
        matches = self._by_bare_name(kind, name)
        if not matches:
            raise ComponentNotFoundError(
                f"no {kind} named {name!r}; registered: {', '.join(self.names(kind)) or 'none'}")
        if len(matches) > 1:
            owners = " and ".join(f"{m.qualified_name} (from {m.provenance.distribution or 'unknown'})"
                                  for m in matches)
            raise ComponentNotFoundError(
                f"{kind} name {name!r} is registered by {owners}; use the qualified name")
        return matches[0]

    def load(self, kind: str, name: str) -> type:
        """Resolve a component class and check it implements the right base class."""
        spec = self.get(kind, name)
        try:
            cls = spec.load()
        except Exception as exc:
            raise PluginError(f"{kind} {spec.qualified_name}: cannot import {spec.factory!r}: {exc}") from exc
        base = spec.base_class()
        if not (isinstance(cls, type) and issubclass(cls, base)):
            raise PluginValidationError(
                f"{kind} {spec.qualified_name}: {spec.factory!r} is not a subclass of {base.__qualname__}")
        return cls

    def plugin(self, name: str) -> PluginInfo | None:
        return next((p for p in self.plugins if p.name == name), None)

    # -- failures -------------------------------------------------------------------------------
    def record_failure(self, info: PluginInfo, error: str, tb: str | None = None, *,
                       status: str = "failed") -> None:
        info.status = status
        info.error = error if info.error is None else f"{info.error}; {error}"
        failure = PluginFailure(info.name, info.distribution, info.version, error, tb)
        self.failures.append(failure)
        if self.strict:
            raise PluginError(f"plugin {info.name!r} ({info.distribution or 'unknown distribution'}): {error}")
        warnings.warn(f"feda2v-tk: skipped plugin {info.name!r}: {error}", PluginWarning, stacklevel=2)


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
        name = getattr(obj, "name", None) or getattr(obj, "id", "")
        if not isinstance(name, str) or not NAME_PATTERN.match(name):
            raise PluginValidationError(
                f"invalid {kind} name {name!r}: use lowercase letters, digits, '_' or '-'")
        if kind in COMPONENT_SPECS:
            if not isinstance(obj.description, str) or not obj.description.strip():
                raise PluginValidationError(f"{kind} {name!r} needs a one-line description")
            factory = obj.factory
            if isinstance(factory, str):
                if ":" not in factory:
                    raise PluginValidationError(f"{kind} {name!r}: factory {factory!r} must be 'module:attr'")
            elif not callable(factory):
                raise PluginValidationError(f"{kind} {name!r}: factory must be a class or 'module:attr'")
            if not all(isinstance(s, str) for s in obj.settings):
                raise PluginValidationError(f"{kind} {name!r}: settings must be config key names")
        elif kind == "schema_fragment":
            _validate_fragment(obj)
        else:
            _validate_migration(obj)
        return replace(obj, provenance=self.provenance)

    def commit(self) -> None:
        """Check clashes against what is already registered, then add everything."""
        reg = self.registry
        for kind in KINDS:
            seen: set[str] = set()
            for spec in self.items[kind]:
                if spec.name in seen:
                    raise PluginValidationError(f"{kind} {spec.name!r} registered twice")
                seen.add(spec.name)
        known_keys = {key: frag for frag in reg.schema_fragments for key in frag.properties}
        for frag in self.items["schema_fragment"]:
            for key in frag.properties:
                if key in known_keys:
                    other = known_keys[key]
                    raise PluginValidationError(
                        f"config key {key!r} is already defined by plugin {other.provenance.plugin!r} "
                        f"({other.provenance.distribution}); {self.info.distribution} cannot redefine it")
                known_keys[key] = frag
        steps = {(m.chain, m.from_version): m for m in reg.migrations}
        ids = {m.id for m in reg.migrations}
        for mig in self.items["migration"]:
            if mig.id in ids:
                raise PluginValidationError(f"migration id {mig.id!r} is already registered")
            clash = steps.get((mig.chain, mig.from_version))
            if clash is not None:
                raise PluginValidationError(
                    f"migration chain {mig.chain!r} already has a step from version {mig.from_version} "
                    f"({clash.id}, plugin {clash.provenance.plugin!r})")
            steps[(mig.chain, mig.from_version)] = mig
            ids.add(mig.id)
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


def _validate_migration(mig: Migration) -> None:
    if not (isinstance(mig.from_version, int) and isinstance(mig.to_version, int)):
        raise PluginValidationError(f"migration {mig.id!r}: versions must be integers")
    if mig.to_version != mig.from_version + 1:
        raise PluginValidationError(f"migration {mig.id!r}: to_version must be from_version + 1")
    if not NAME_PATTERN.match(mig.chain):
        raise PluginValidationError(f"migration {mig.id!r}: invalid chain name {mig.chain!r}")
    if not callable(mig.apply):
        raise PluginValidationError(f"migration {mig.id!r}: apply must be callable")


def _distribution_of(ep: importlib.metadata.EntryPoint) -> tuple[str | None, str | None]:
    dist = getattr(ep, "dist", None)
    if dist is None:
        return None, None
    return dist.metadata["Name"], dist.version


def _register_plugin(registry: Registry, obj: Any, info: PluginInfo) -> None:
    """Register one plugin object with pluggy and run its hooks into a staging area."""
    required = getattr(obj, MIN_API_ATTRIBUTE, None)
    if required is not None and (not isinstance(required, int) or required > API_VERSION):
        registry.plugins.append(info)
        registry.record_failure(
            info, f"requires feda2v-tk plugin API version {required}; this feda2v-tk ({__version__}) "
            f"provides API version {API_VERSION}", status="incompatible")
        return
    pm_name = info.name if info.source != "builtin" else f"{BUILTIN_PLUGIN}.{info.modules[-1]}"
    try:
        pm_plugin = pm_name if registry.pm.register(obj, name=pm_name) else None
        if pm_plugin is None:
            raise PluginValidationError(f"a plugin named {pm_name!r} is already registered")
        staging = _Staging(registry, info)
        for kind, hook_name in REGISTER_HOOKS.items():
            caller = getattr(registry.pm.hook, hook_name)
            for impl in caller.get_hookimpls():
                if impl.plugin_name == pm_name:
                    info.hooks.append(hook_name)
                    impl.function(register=staging.register_callback(kind))
        if registry.pm.hook.feda2v_register_commands.get_hookimpls():
            for impl in registry.pm.hook.feda2v_register_commands.get_hookimpls():
                if impl.plugin_name == pm_name:
                    info.hooks.append("feda2v_register_commands")
        staging.commit()
    except Exception as exc:
        if registry.pm.is_registered(obj):
            registry.pm.unregister(obj)
        if info not in registry.plugins:
            registry.plugins.append(info)
        error = str(exc) if isinstance(exc, PluginError) else f"{type(exc).__name__}: {exc}"
        registry.record_failure(info, error, traceback.format_exc())
        return
    if info not in registry.plugins:
        registry.plugins.append(info)


def _report_clashes(registry: Registry) -> None:
    """Two plugins using one bare name: an error naming both (both stay reachable as plugin:name)."""
    for kind in KINDS:
        by_name: dict[str, list[ComponentSpec]] = {}
        for spec in registry.specs(kind):
            by_name.setdefault(spec.name, []).append(spec)
        for name, specs in by_name.items():
            if len(specs) < 2:
                continue
            owners = ", ".join(f"{s.qualified_name} from {s.provenance.distribution or 'unknown'}" for s in specs)
            for spec in specs[1:]:
                info = registry.plugin(spec.plugin)
                if info is not None:
                    registry.record_failure(
                        info, f"{kind} name {name!r} clashes: {owners}; refer to them by qualified name",
                        status="loaded")


def load_registry(
    *,
    autoload: bool | None = None,
    allow: Iterable[str] | None = None,
    block: Iterable[str] | None = None,
    strict: bool | None = None,
    extra_plugins: Iterable[tuple[str, Any]] = (),
) -> Registry:
    """Build a fresh registry: built-ins, then entry-point plugins, then ``extra_plugins``.

    Arguments default to the environment variables documented in this module. ``extra_plugins`` are
    ``(name, module_or_object)`` pairs registered directly (this is how the conformance kit and
    tests load a plugin without installing it).
    """
    autoload = (not _env_flag(ENV_DISABLE_AUTOLOAD)) if autoload is None else autoload
    allow_list = _env_list(ENV_ALLOW) if allow is None else list(allow)
    block_list = set(_env_list(ENV_BLOCK) or []) if block is None else set(block)
    strict = _env_flag(ENV_STRICT) if strict is None else strict

    pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    registry = Registry(pm, strict=strict)

    builtin = PluginInfo(BUILTIN_PLUGIN, "feda2v-tk", __version__, "builtin")
    registry.plugins.append(builtin)
    for module_name in DEFAULT_PLUGIN_MODULES:
        builtin.modules.append(module_name.rsplit(".", 1)[-1])
        module = importlib.import_module(module_name)  # a broken built-in is a bug: let it raise
        _register_plugin(registry, module, builtin)

    if autoload:
        seen: dict[str, PluginInfo] = {}
        for ep in sorted(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
            dist_name, dist_version = _distribution_of(ep)
            info = PluginInfo(ep.name, dist_name, dist_version, "entry-point", modules=[ep.value])
            if ep.name in block_list:
                info.status = "blocked"
                registry.plugins.append(info)
                continue
            if allow_list is not None and ep.name not in allow_list:
                info.status = "disabled"
                registry.plugins.append(info)
                continue
            if ep.name in seen or ep.name == BUILTIN_PLUGIN:
                other = seen.get(ep.name)
                registry.plugins.append(info)
                registry.record_failure(
                    info, f"plugin name {ep.name!r} is also used by "
                    f"{other.distribution if other else 'feda2v-tk (built-in)'}")
                continue
            seen[ep.name] = info
            try:
                obj = ep.load()
            except Exception as exc:
                registry.plugins.append(info)
                registry.record_failure(info, f"import failed: {type(exc).__name__}: {exc}",
                                        traceback.format_exc())
                continue
            _register_plugin(registry, obj, info)

    for name, obj in extra_plugins:
        module_name = getattr(obj, "__name__", type(obj).__name__)
        info = PluginInfo(name, None, None, "direct", modules=[module_name])
        _register_plugin(registry, obj, info)

    _report_clashes(registry)
    return registry


_REGISTRY: Registry | None = None
_OPTIONS: dict[str, Any] = {}


def configure(**options: Any) -> None:
    """Set :func:`load_registry` options for the process-wide registry (used by CLI flags)."""
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


# -- timm-style helpers -------------------------------------------------------------------------

def list_generators() -> list[str]:
    return get_registry().names("generator")


def list_reducers() -> list[str]:
    return get_registry().names("reducer")


def list_upsamplers() -> list[str]:
    return get_registry().names("upsampler")


def create_generator(name: str, **kwargs: Any) -> Any:
    """Instantiate a generator type by (qualified) name: ``cls(**kwargs)``."""
    return get_registry().load("generator", name)(**kwargs)


def create_reducer(name: str, **kwargs: Any) -> Any:
    return get_registry().load("reducer", name)(**kwargs)


def create_upsampler(name: str, **kwargs: Any) -> Any:
    return get_registry().load("upsampler", name)(**kwargs)
