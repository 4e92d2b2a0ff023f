"""Config layer: schema loading, validation, migration and the loader (no torch).

Minimal bootstrap: ``schema_defaults()``. The config issue builds validation, migration and
``load_config`` on top.
"""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from typing import Any

CORE_SCHEMA_FILE = "feda2v-generator.schema.json"


@cache
def core_schema() -> dict[str, Any]:
    """The core generator-section schema shipped in the package."""
    text = resources.files("feda2v_toolkit").joinpath("schemas", CORE_SCHEMA_FILE).read_text("utf-8")
    return json.loads(text)


def schema_defaults() -> dict[str, Any]:
    """Every key's default, from the registered schema fragments (core plus plugins)."""
    from feda2v_toolkit.plugins import get_registry

    out: dict[str, Any] = {}
    for frag in get_registry().schema_fragments:
        for key, prop in frag.properties.items():
            if "default" in prop:
                out[key] = prop["default"]
    return out
