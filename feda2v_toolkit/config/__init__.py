"""Config layer: schema, validation with line:column, versioned migration and the loader (no torch).

Modules: :mod:`~.document` (reading files, positions, where the sections are), :mod:`~.schema` (the
combined schema of the registered fragments and value checks), :mod:`~.validate`, :mod:`~.migrate`
(chains, text-preserving rewrites), :mod:`~.migrations` (the core chain), :mod:`~.loader`
(``load_config``) and :mod:`~.docs` (``docs/configuration.md``).
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Mapping
from functools import cache
from importlib import resources
from typing import Any

CORE_SCHEMA_FILE = "feda2v-generator.schema.json"

_LAZY = {
    "load_config": "feda2v_toolkit.config.loader",
    "load_experiment": "feda2v_toolkit.config.loader",
    "LoadedConfig": "feda2v_toolkit.config.loader",
    "ConfigWarning": "feda2v_toolkit.config.loader",
    "get_catalog": "feda2v_toolkit.config.catalog",
}

__all__ = ["CORE_SCHEMA_FILE", "core_schema", "package_schema", "configured_upsampler", "schema_defaults", *_LAZY]


def package_schema(filename: str) -> dict[str, Any]:
    """A JSON Schema file shipped in the package (``feda2v_toolkit/schemas/FILENAME``), freshly parsed."""
    return json.loads(resources.files("feda2v_toolkit").joinpath("schemas", filename).read_text("utf-8"))


@cache
def core_schema() -> dict[str, Any]:
    """The core generator-section schema shipped in the package."""
    return package_schema(CORE_SCHEMA_FILE)


def schema_defaults(registry: Any = None) -> dict[str, Any]:
    """Every key's default, from the registered schema fragments (core plus plugins); a fresh copy."""
    from feda2v_toolkit.config.catalog import get_catalog

    return get_catalog(registry).defaults()


def configured_upsampler(section: Mapping[str, Any]) -> Any:
    """The upsampler a generator section selects: ``learned`` when the original flag
    ``use_learned_upsampling`` is true, else ``generator_upsampler`` (None when unset)."""
    return "learned" if section.get("use_learned_upsampling") is True else section.get("generator_upsampler")


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'feda2v_toolkit.config' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
