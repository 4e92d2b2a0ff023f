"""The plugin system: discovery (:mod:`.discovery`), the registry (:mod:`.registry`), validation of what a
plugin registers (:mod:`.validation`), and here the process-wide registry with timm-style helpers.

Built-in components register through the same hooks as third-party plugins (see
:mod:`feda2v_toolkit.default_plugins`); the environment variables and CLI flags that select plugins are
described in :mod:`feda2v_toolkit.plugins.discovery`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from feda2v_toolkit.plugins.discovery import (
    DEFAULT_PLUGIN_MODULES,
    ENTRY_POINT_GROUP,
    ENV_ALLOW,
    ENV_BLOCK,
    ENV_DISABLE_AUTOLOAD,
    MIN_API_ATTRIBUTE,
    load_registry,
)
from feda2v_toolkit.plugins.registry import (
    BUILTIN_PLUGIN,
    ENV_STRICT,
    KINDS,
    PluginAbort,
    PluginFailure,
    PluginInfo,
    PluginWarning,
    Registry,
)

__all__ = ["BUILTIN_PLUGIN", "DEFAULT_PLUGIN_MODULES", "ENTRY_POINT_GROUP", "ENV_ALLOW", "ENV_BLOCK",
           "ENV_DISABLE_AUTOLOAD", "ENV_STRICT", "KINDS", "MIN_API_ATTRIBUTE", "PluginAbort", "PluginFailure",
           "PluginInfo", "PluginWarning", "Registry", "configure", "create_generator", "create_reducer",
           "create_upsampler", "get_registry", "list_generators", "list_reducers", "list_upsamplers",
           "load_registry", "reset_registry", "using_registry"]

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
