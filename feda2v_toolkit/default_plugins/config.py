"""Built-in schema fragments and migrations, registered through the public hooks."""

from feda2v_toolkit.config import core_schema
from feda2v_toolkit.hookspecs import hookimpl
from feda2v_toolkit.specs import SchemaFragment


@hookimpl
def feda2v_register_schema_fragments(register):
    register(SchemaFragment(name="core", schema=core_schema(),
                            description="Core generator-section keys of FedA2V configs."))
