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

import importlib
import importlib.metadata
import os
import re
import time
import traceback
import warnings
from collections.abc import Iterable
from typing import Any

import pluggy

from feda2v_toolkit import API_VERSION, __version__, hookspecs
from feda2v_toolkit.errors import PluginError, PluginValidationError
from feda2v_toolkit.plugins.registry import (
    BLOCKED,
    BUILTIN_DISTRIBUTION,
    BUILTIN_PLUGIN,
    COMMANDS_HOOK,
    DISABLED,
    ENV_STRICT,
    INCOMPATIBLE,
    KINDS,
    REGISTER_HOOKS,
    PluginInfo,
    PluginWarning,
    Registry,
    _dist_text,
    _guarded,
    _normalize,
    _owners,
)
from feda2v_toolkit.plugins.validation import _check_hook_names, _Staging
from feda2v_toolkit.specs import ComponentSpec

ENTRY_POINT_GROUP = "feda2v_toolkit.plugins"
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

ENV_DISABLE_AUTOLOAD = "FEDA2V_DISABLE_PLUGIN_AUTOLOAD"
ENV_ALLOW = "FEDA2V_PLUGINS"
ENV_BLOCK = "FEDA2V_BLOCK_PLUGINS"


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no", "off")


def _env_list(name: str) -> list[str] | None:
    value = os.environ.get(name)
    if value is None:
        return None
    return [item.strip() for item in value.split(",") if item.strip()]


def _distribution_of(ep: importlib.metadata.EntryPoint) -> tuple[str | None, str | None]:
    dist = getattr(ep, "dist", None)
    if dist is None:
        return None, None
    return dist.metadata["Name"], dist.version


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
