"""Docs that describe the schema and the migration API stay true."""

from __future__ import annotations

import importlib.util
import re

from feda2v_toolkit.config.docs import render_configuration_md
from feda2v_toolkit.config.migrations import FULL_LENGTH_THRESHOLD

from .conftest import REPO

MIGRATION_MD = REPO / "docs" / "migration.md"


def test_configuration_md_is_generated_from_the_schema():
    """If this fails, regenerate: python -m feda2v_toolkit.config.docs --write"""
    assert (REPO / "docs" / "configuration.md").read_text() == render_configuration_md()


def test_configuration_md_lists_every_builtin_key_and_finding_code(catalog):
    from feda2v_toolkit.config.validate import CODES

    text = render_configuration_md()
    for key in [*catalog.keys, *catalog.node_keys, *catalog.deprecated]:
        assert f"| `{key}` |" in text, key
    for code in CODES:
        assert f"| `{code}` |" in text


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", MIGRATION_MD.read_text(), flags=re.DOTALL)


def test_plugin_example_in_migration_md_works_as_documented(tmp_path):
    [plugin_code] = [b for b in _python_blocks() if "@hookimpl" in b]
    path = tmp_path / "flowgen_doc_plugin.py"
    path.write_text(plugin_code)
    spec = importlib.util.spec_from_file_location("flowgen_doc_plugin", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    [test_code] = [b for b in _python_blocks() if "my_plugin_module" in b]
    exec(test_code, {"my_plugin_module": module})  # the documented test snippet asserts the migration

    from feda2v_toolkit.config.catalog import Catalog
    from feda2v_toolkit.config.migrate import migrate_document
    from feda2v_toolkit.plugins import load_registry

    registry = load_registry(autoload=False, strict=True, extra_plugins=[("flowgen", module)])
    assert migrate_document({"generator_type": "flow", "flowgen_steps": 8}, Catalog.build(registry)).document == {
        "schema_versions": {"flowgen": 2}, "generator_type": "flow", "flowgen_num_steps": 8}


def test_migration_md_states_the_threshold_the_code_uses():
    assert f"**above {FULL_LENGTH_THRESHOLD}**" in MIGRATION_MD.read_text()
