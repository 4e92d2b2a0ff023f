"""The plugin module: the ``flow`` entry point of the ``feda2v_toolkit.plugins`` group names it.

Everything here is cheap and torch-free: classes are named by ``"module:Class"`` strings and imported
only when a config uses them, so ``feda2v-tk --help``, ``plugins``, ``list`` and ``validate`` stay fast.
"""

from __future__ import annotations

import json
from importlib import resources

from feda2v_toolkit import hookimpl
from feda2v_toolkit.specs import GeneratorSpec, ReducerSpec, SchemaFragment, UpsamplerSpec

#: The lowest feda2v-tk plugin API version this plugin works with (`feda2v-tk plugins` reports a
#: toolkit that is too old instead of crashing into it).
feda2v_min_api_version = 1

SHARED_SETTINGS = ("generator_learning_rate", "generator_weight_decay", "generator_grad_clip",
                   "generator_augmentation", "generator_augmentation_noise")


def schema() -> dict:
    """The plugin's schema fragment (``flow.schema.json`` in the package)."""
    return json.loads(resources.files(__package__).joinpath("flow.schema.json").read_text("utf-8"))


@hookimpl
def feda2v_register_generators(register):
    register(GeneratorSpec(
        name="realnvp",
        description="RealNVP normalizing flow (affine couplings, exact likelihood), optionally class-conditioned.",
        factory="feda2v_tk_flow.flow:RealNVPGenerator",
        settings=SHARED_SETTINGS,  # the flow_* keys are added from the fragment bound to `realnvp`
        test_config={"flow_coupling_layers": 2, "flow_hidden_dim": 16},
    ))


@hookimpl
def feda2v_register_reducers(register):
    register(ReducerSpec(
        name="dct",
        description="Low-pass resampling: keeps the lowest DCT frequencies along the sequence (no aliasing).",
        factory="feda2v_tk_flow.spectral:DCTReducer",
        settings=("generator_training_sequence_length",),
    ))


@hookimpl
def feda2v_register_upsamplers(register):
    register(UpsamplerSpec(
        name="dct",
        description="Band-limited DCT interpolation, the matched inverse of the `dct` reducer.",
        factory="feda2v_tk_flow.spectral:DCTUpsampler",
        settings=("generator_output_sequence_length",),
    ))


@hookimpl
def feda2v_register_schema_fragments(register):
    register(SchemaFragment(name="flow", schema=schema(), generator_type="realnvp",
                            description="Keys of the `realnvp` generator type."))


@hookimpl
def feda2v_register_migrations(register):
    from feda2v_tk_flow.migrations import MIGRATIONS

    for migration in MIGRATIONS:
        register(migration)


@hookimpl
def feda2v_register_commands(cli):
    from feda2v_tk_flow.commands import flow_nll_cmd

    cli.add_command(flow_nll_cmd)
