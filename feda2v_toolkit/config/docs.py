"""``docs/configuration.md``, generated from the built-in schema fragments and migrations.

Regenerate after changing a schema: ``python -m feda2v_toolkit.config.docs --write`` (a test fails when
the file drifts from the schema).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from feda2v_toolkit.config.schema import COMPONENT_ANNOTATION, describe

DEFAULT_PATH = Path("docs/configuration.md")


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _row(key: str, prop: dict[str, Any]) -> str:
    kind = describe(prop)
    component = prop.get(COMPONENT_ANNOTATION)
    if component:
        kind = f"registered {component} name"
    default = f"`{json.dumps(prop['default'])}`" if "default" in prop else "—"
    return f"| `{key}` | {_cell(kind)} | {_cell(default)} | {_cell(prop.get('description', ''))} |"


_HEADER = "| key | type | default | meaning |\n|---|---|---|---|"


def render_configuration_md(registry: Any = None) -> str:
    """The reference of every generator key of the built-in plugin (entry-point plugins excluded)."""
    if registry is None:
        from feda2v_toolkit.plugins import load_registry

        registry = load_registry(autoload=False)
    frags = [f for f in registry.schema_fragments if f.provenance.plugin == "builtin"]
    out = [
        "# Configuration reference",
        "",
        "<!-- Generated from the schema by `python -m feda2v_toolkit.config.docs --write`; do not edit. -->",
        "",
        "The generator section of a FedA2V experiment config is the object under `feda2v` (what the FedA2V",
        "runner reads) or `feda2v_config` (the name the generator documentation uses); a file may also be a",
        "bare generator section. Per-node overrides live in the top-level `nodes` object, keyed `\"0\"`,",
        "`\"1\"`, ...: each may set any key below plus the per-node keys. Keys starting with `_` are comments.",
        "Keys that are not generator keys (adapters, diffusion, datasets, wandb...) are left alone; an unknown",
        "key with a generator prefix (`generator_`, or a generator type's prefix such as `gan_`), or close to a",
        "known key, is an error.",
        "",
        "Defaults below are the schema's, the only source of defaults: `feda2v_toolkit.config.load_config`",
        "fills them in. `feda2v-tk schema` prints the same keys, plus installed plugins', as JSON Schema.",
        "",
    ]
    for frag in frags:
        if frag.name == "core":
            title = "Generator section (fragment `core`)"
        elif frag.generator_type is not None:
            title = f"Keys of generator type `{frag.generator_type}` (fragment `{frag.name}`)"
        else:
            title = f"Keys of fragment `{frag.name}`"
        out += [f"## {title}", "", frag.description, "", _HEADER]
        out += [_row(key, dict(prop)) for key, prop in frag.properties.items()]
        out.append("")
        node_props = frag.node_properties
        if node_props:
            out += ["### Per-node keys", "", "Only allowed inside `nodes.<id>`.", "", _HEADER]
            out += [_row(key, dict(prop)) for key, prop in node_props.items()]
            out.append("")
    migrations = [m for m in registry.migrations if m.provenance.plugin == "builtin"]
    if migrations:
        out += ["## Deprecated keys", "",
                "`feda2v-tk validate` reports them and `feda2v-tk migrate` replaces them (see "
                "[migration.md](migration.md)).", "",
                "| key | replaced by | migration |", "|---|---|---|"]
        for mig in migrations:
            for key, replacement in mig.deprecated_keys.items():
                out.append(f"| `{key}` | {_cell(replacement)} | `{mig.id}` ({mig.chain} {mig.from_version} → "
                           f"{mig.to_version}) |")
        out.append("")
    from feda2v_toolkit.config.validate import CODES

    out += ["## Findings of `feda2v-tk validate`", "",
            "Each finding has a file, line:column, JSON path, code, severity, message, what was expected and "
            "found, and a suggestion (`--json` gives them as one JSON record per line). Exit status: 0 "
            "valid (warnings allowed unless `--strict`), 1 invalid, 2 usage or I/O error.", "",
            "| code | meaning |", "|---|---|"]
    out += [f"| `{code}` | {_cell(meaning)} |" for code, meaning in CODES.items()]
    out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    text = render_configuration_md()
    if args and args[0] == "--write":
        target = Path(args[1]) if len(args) > 1 else DEFAULT_PATH
        from feda2v_toolkit.runtime.atomic import atomic_write_text

        atomic_write_text(target, text)
        print(f"wrote {target}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
