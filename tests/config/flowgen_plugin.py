"""A stand-in third-party plugin: its own generator type, schema fragment and migration chain.

Registered directly in tests (``load_registry(extra_plugins=[("flowgen", this_module)])``).
Chain ``flowgen``: version 1 had ``flowgen_steps``; version 2 renames it ``flowgen_num_steps``.
"""

from feda2v_toolkit.config.migrate import rename_key
from feda2v_toolkit.hookspecs import hookimpl
from feda2v_toolkit.specs import GeneratorSpec, Migration, SchemaFragment


@hookimpl
def feda2v_register_generators(register):
    register(GeneratorSpec(name="flow", description="Test flow generator.",
                           factory="feda2v_toolkit.components:Generator",
                           settings=("flowgen_num_steps",)))


@hookimpl
def feda2v_register_schema_fragments(register):
    register(SchemaFragment(name="flowgen", generator_type="flow", description="Flow generator keys.", schema={
        "type": "object",
        "properties": {
            "flowgen_num_steps": {"description": "Integration steps.", "type": "integer", "minimum": 1,
                                  "default": 16},
            "flowgen_solver": {"description": "ODE solver.", "enum": ["euler", "rk4"], "default": "euler"},
        },
    }))


def _rename_steps(section, ctx):
    return rename_key(section, "flowgen_steps", "flowgen_num_steps")


@hookimpl
def feda2v_register_migrations(register):
    register(Migration(id="flowgen-0001-rename-steps", chain="flowgen", from_version=1, to_version=2,
                       description="flowgen_steps is now flowgen_num_steps.", apply=_rename_steps,
                       deprecated_keys={"flowgen_steps": "flowgen_num_steps"}))
