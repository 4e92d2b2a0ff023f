"""Built-in reducers and the schema fragment of the fitted pair (``pca`` + ``lstsq``), through the public hooks."""

from feda2v_toolkit.config import package_schema
from feda2v_toolkit.hookspecs import hookimpl
from feda2v_toolkit.specs import ReducerSpec, SchemaFragment


@hookimpl
def feda2v_register_reducers(register):
    register(ReducerSpec(
        name="adaptive_avg",
        description="Adaptive average pooling along the sequence (the original FedA2V reduction).",
        factory="feda2v_toolkit.reducers.adaptive_avg:AdaptiveAvgReducer",
        settings=("generator_training_sequence_length", "generator_reducer_keep_tokens"),
    ))
    register(ReducerSpec(
        name="pca",
        description="Position PCA fitted on training data: the optimal linear reduction (pair with lstsq).",
        factory="feda2v_toolkit.reducers.pca:PCAReducer",
        settings=("generator_training_sequence_length",),
        positional=False,  # its reduced axis holds components: pair it with lstsq or learned
    ))


@hookimpl
def feda2v_register_schema_fragments(register):
    register(SchemaFragment(name="fitted-components", schema=package_schema("fitted-components.schema.json"),
                            description="Keys of the built-in fitted reducer/upsampler pair (pca, lstsq)."))
    register(SchemaFragment(name="federated", schema=package_schema("federated.schema.json"),
                            description="Keys of federated training (feda2v-tk federate, the Flower app)."))
