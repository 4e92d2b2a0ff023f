"""Built-in reducers, registered through the public hook."""

from feda2v_toolkit.hookspecs import hookimpl
from feda2v_toolkit.specs import ReducerSpec


@hookimpl
def feda2v_register_reducers(register):
    register(ReducerSpec(
        name="adaptive_avg",
        description="Adaptive average pooling along the sequence (the original FedA2V reduction).",
        factory="feda2v_toolkit.reducers.adaptive_avg:AdaptiveAvgReducer",
        settings=("generator_training_sequence_length",),
    ))
