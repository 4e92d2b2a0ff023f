"""``feda2v-tk plugins`` and ``feda2v-tk list``: what is installed and what it registers (no torch)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import click

from feda2v_toolkit.plugins import ENTRY_POINT_GROUP, KINDS, Registry, get_registry


def setting_info(registry: Registry, key: str) -> dict[str, Any]:
    """Type, default and description of a config key, from the registered schema fragments."""
    for frag in registry.schema_fragments:
        prop: Mapping[str, Any] | None = frag.properties.get(key)
        if prop is not None:
            info: dict[str, Any] = {"key": key, "type": type_text(prop),
                                    "description": prop.get("description", ""),
                                    "fragment": f"{frag.provenance.plugin}:{frag.name}"}
            if "default" in prop:
                info["default"] = prop["default"]
            return info
    return {"key": key, "type": "unknown", "description": "(not described by any schema fragment)",
            "fragment": None}


def type_text(prop: Mapping[str, Any]) -> str:
    """A short human spelling of a property schema's type (``integer``, ``"a" | "b"``, ``number | null``)."""
    if "enum" in prop:
        return " | ".join(json.dumps(v) for v in prop["enum"])
    if "const" in prop:
        return json.dumps(prop["const"])
    if "type" in prop:
        t = prop["type"]
        return " | ".join(t) if isinstance(t, list) else str(t)
    for combinator in ("anyOf", "oneOf"):
        if combinator in prop:
            return " | ".join(type_text(p) for p in prop[combinator])
    return "any"


def components_json(registry: Registry, kind: str) -> list[dict[str, Any]]:
    """What ``feda2v-tk list KINDs --json`` prints: one object per registered component."""
    usable = set(registry.names(kind))
    return [{
        "name": spec.name if spec.name in usable else spec.qualified_name,
        "qualified_name": spec.qualified_name,
        "plugin": spec.plugin,
        "distribution": spec.provenance.distribution,
        "version": spec.provenance.version,
        "description": spec.description,
        "factory": spec.factory_path,
        "settings": [setting_info(registry, key) for key in registry.settings(spec)],
    } for spec in registry.specs(kind)]


def plugins_json(registry: Registry) -> dict[str, Any]:
    """What ``feda2v-tk plugins --json`` prints."""
    from feda2v_toolkit import API_VERSION, __version__

    return {
        "feda2v_tk_version": __version__,
        "api_version": API_VERSION,
        "entry_point_group": ENTRY_POINT_GROUP,
        "plugins": [p.to_json() for p in registry.plugins],
        "failures": [f.to_json() for f in registry.failures],
    }


def _add_plugin_commands() -> None:
    """Run the plugins' command hooks on the real CLI group, so that their failures are reported too."""
    ctx = click.get_current_context(silent=True)
    root = ctx.find_root().command if ctx is not None else None
    if hasattr(root, "load_plugin_commands"):
        root.load_plugin_commands()


@click.command("plugins")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("-q", "--quiet", is_flag=True, help="Only the load problems (on stderr), no listing.")
def plugins_cmd(as_json: bool, quiet: bool) -> None:
    """List plugins: distribution and version, what each registers, and every load failure.

    Plugins are found through the `feda2v_toolkit.plugins` entry-point group. Exit status 0 even
    when some failed to load (run `feda2v-tk --strict-plugins plugins` to make that fatal).
    """
    registry = get_registry()
    _add_plugin_commands()
    if as_json:
        click.echo(json.dumps(plugins_json(registry), indent=2))
        return
    for p in [] if quiet else registry.plugins:
        dist = f"{p.distribution} {p.version}" if p.distribution else "(not installed)"
        click.echo(f"{p.name}  [{p.status}]  {dist}  ({p.source})")
        for kind, names in p.registered.items():
            click.echo(f"    {kind}: {', '.join(names)}")
        for error in p.errors:
            click.echo(f"    error: {error}")
    if registry.failures:
        click.echo(f"\n{len(registry.failures)} plugin problem(s); `feda2v-tk --strict-plugins ...` makes "
                   "them fatal.", err=True)


@click.command("list")
@click.argument("kind", type=click.Choice([k + "s" for k in KINDS]))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("-q", "--quiet", is_flag=True, help="Names only, one per line.")
def list_cmd(kind: str, as_json: bool, quiet: bool) -> None:
    """List registered generators, reducers or upsamplers with the settings each accepts.

    NAME is what a config uses (`generator_type`, `generator_reducer`, `generator_upsampler`);
    `plugin:name` always works too.
    """
    registry = get_registry()
    rows = components_json(registry, kind[:-1])
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for row in rows:
        if quiet:
            click.echo(row["name"])
            continue
        provider = f"{row['distribution']} {row['version']}" if row["distribution"] else "not installed"
        click.echo(f"{row['name']}  ({row['qualified_name']}, {provider})")
        click.echo(f"    {row['description']}")
        for s in row["settings"]:
            default = f", default {json.dumps(s['default'])}" if "default" in s else ""
            click.echo(f"    - {s['key']} ({s['type']}{default}): {s['description']}")
