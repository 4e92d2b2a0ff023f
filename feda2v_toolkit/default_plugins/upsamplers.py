"""Built-in upsamplers, registered through the public hook."""

from feda2v_toolkit.hookspecs import hookimpl
from feda2v_toolkit.specs import UpsamplerSpec


@hookimpl
def feda2v_register_upsamplers(register):
    register(UpsamplerSpec(
        name="linear",
        description="Linear interpolation along the sequence (the original FedA2V upsampling).",
        factory="feda2v_toolkit.upsamplers.interpolate:LinearUpsampler",
        settings=("generator_output_sequence_length",),
    ))
    register(UpsamplerSpec(
        name="nearest",
        description="Nearest-neighbour repetition of each reduced token over its span.",
        factory="feda2v_toolkit.upsamplers.interpolate:NearestUpsampler",
        settings=("generator_output_sequence_length",),
    ))
    register(UpsamplerSpec(
        name="expand",
        description="Each reduced token over the positions adaptive_avg pooled into it, kept tokens in place "
                    "(its pseudo-inverse; nothing fitted: free under differential privacy).",
        factory="feda2v_toolkit.upsamplers.expand:ExpandUpsampler",
        settings=("generator_output_sequence_length", "generator_reducer_keep_tokens"),
    ))
    register(UpsamplerSpec(
        name="cubic",
        description="Bicubic interpolation along the sequence (smoother than linear, may overshoot).",
        factory="feda2v_toolkit.upsamplers.interpolate:CubicUpsampler",
        settings=("generator_output_sequence_length",),
    ))
    register(UpsamplerSpec(
        name="learned",
        description="Linear interpolation plus a trained per-position correction (zero-initialised: starts as linear).",
        factory="feda2v_toolkit.upsamplers.learned:LearnedUpsampler",
        settings=("generator_output_sequence_length", "use_learned_upsampling", "generator_upsampler_epochs",
                  "generator_upsampler_learning_rate", "generator_validation_split"),
        trainable=True,
    ))
    register(UpsamplerSpec(
        name="lstsq",
        description="Least-squares affine decoder from reduced to full positions, fitted in closed form (pairs with pca).",
        factory="feda2v_toolkit.upsamplers.lstsq:LeastSquaresUpsampler",
        settings=("generator_output_sequence_length", "lstsq_ridge"),
        trainable=True,
    ))
