"""``feda2v-tk plugins`` and ``feda2v-tk list``: what is installed and what it registers (no torch)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import click

from feda2v_toolkit.plugins import KINDS, Registry, get_registry


def setting_info(registry: Registry, key: str) -> dict[str, Any]:
    """Type, default and description of a config key, from the registered schema fragments."""
    for frag in registry.schema_fragments:
        prop: Mapping[str, Any] | None = frag.properties.get(key)
        if prop is not None:
            info: dict[str, Any] = {"key": key, "type": _type_of(prop), "description": prop.get("description", "")}
            if "default" in prop:
                info["default"] = prop["default"]
            return info
    return {"key": key, "type": "unknown", "description": "(not described by any schema fragment)"}


def _type_of(prop: Mapping[str, Any]) -> str:
    if "enum" in prop:
        return " | ".join(json.dumps(v) for v in prop["enum"])
    if "type" in prop:
        t = prop["type"]
        return " | ".join(t) if isinstance(t, list) else str(t)
    for combinator in ("anyOf", "oneOf"):
        if combinator in prop:
            return " | ".join(_type_of(p) for p in prop[combinator])
    if "const" in prop:
        return json.dumps(prop["const"])
    return "any"


def components_json(registry: Registry, kind: str) -> list[dict[str, Any]]:
    out = []
    usable = set(registry.names(kind))
    for spec in registry.specs(kind):
        out.append({
            "name": spec.name if spec.name in usable else spec.qualified_name,
            "qualified_name": spec.qualified_name,
            "plugin": spec.plugin,
            "distribution": spec.provenance.distribution,
            "version": spec.provenance.version,
            "description": spec.description,
            "factory": spec.factory if isinstance(spec.factory, str) else
            f"{spec.factory.__module__}:{spec.factory.__qualname__}",
            "settings": [setting_info(registry, key) for key in spec.settings],
        })
    return out


@click.command("plugins")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def plugins_cmd(as_json: bool) -> None:
    """List plugins, their distribution and version, what they register, and load failures."""
    registry = get_registry()
    if as_json:
        payload = {
            "plugins": [p.to_json() for p in registry.plugins],
            "failures": [f.to_json() for f in registry.failures],
        }
        click.echo(json.dumps(payload, indent=2))
        return
    for p in registry.plugins:
        dist = f"{p.distribution} {p.version}" if p.distribution else "(not installed)"
        click.echo(f"{p.name}  [{p.status}]  {dist}  ({p.source})")
        for kind, names in p.registered.items():
            click.echo(f"    {kind}: {', '.join(names)}")
        if p.error:
            click.echo(f"    error: {p.error}")
    if registry.failures:
        click.echo(f"\n{len(registry.failures)} plugin problem(s); run with --strict-plugins to make them fatal.",
                   err=True)


@click.command("list")
@click.argument("kind", type=click.Choice([k + "s" for k in KINDS]))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def list_cmd(kind: str, as_json: bool) -> None:
    """List registered generators, reducers or upsamplers with the settings each accepts."""
    registry = get_registry()
    rows = components_json(registry, kind[:-1])
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for row in rows:
        click.echo(f"{row['name']}  ({row['qualified_name']}, {row['distribution'] or 'direct'})")
        click.echo(f"    {row['description']}")
        for s in row["settings"]:
            default = f", default {json.dumps(s['default'])}" if "default" in s else ""
            click.echo(f"    - {s['key']} ({s['type']}{default}): {s['description']}")
