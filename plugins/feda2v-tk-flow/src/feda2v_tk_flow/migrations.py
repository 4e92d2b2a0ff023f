"""The plugin's own migration chain, ``flow``: version 1 was feda2v-tk-flow 0.1, version 2 is 0.2.

0.1 called the number of coupling layers ``flow_num_layers``; 0.2 renamed it ``flow_coupling_layers``.
``feda2v-tk migrate`` rewrites old configs in place (the key keeps its position and value) and records
``schema_versions: {"flow": 2}``; loading an old config migrates it in memory with a warning.
"""

from __future__ import annotations

from typing import Any

from feda2v_toolkit.config.migrate import MigrationContext, rename_key
from feda2v_toolkit.specs import Migration

CHAIN = "flow"
OLD_KEY = "flow_num_layers"
NEW_KEY = "flow_coupling_layers"


def rename_num_layers(section: dict[str, Any], ctx: MigrationContext) -> dict[str, Any]:
    """``flow_num_layers`` -> ``flow_coupling_layers`` (same value, same position)."""
    return rename_key(section, OLD_KEY, NEW_KEY)


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        id="flow-0001-rename-num-layers",
        chain=CHAIN,
        from_version=1,
        to_version=2,
        description=f"Rename {OLD_KEY} to {NEW_KEY} (feda2v-tk-flow 0.2).",
        apply=rename_num_layers,
        deprecated_keys={OLD_KEY: NEW_KEY},
    ),
)
