"""Built-in schema fragment and migration chain, registered through the public hooks like a plugin's."""

from feda2v_toolkit.config import core_schema, package_schema
from feda2v_toolkit.hookspecs import hookimpl
from feda2v_toolkit.specs import SchemaFragment


@hookimpl
def feda2v_register_schema_fragments(register):
    register(SchemaFragment(name="core", schema=core_schema(),
                            description="Core generator-section keys of FedA2V configs."))
    register(SchemaFragment(name="privacy", schema=package_schema("privacy.schema.json"),
                            description="Keys of record-level differential privacy (docs/privacy.md)."))


@hookimpl
def feda2v_register_migrations(register):
    from feda2v_toolkit.config.migrations import CORE_MIGRATIONS

    for migration in CORE_MIGRATIONS:
        register(migration)
