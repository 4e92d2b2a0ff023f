"""Built-in generator types and their schema fragments, registered through the public hooks."""

from feda2v_toolkit.config import package_schema
from feda2v_toolkit.hookspecs import hookimpl
from feda2v_toolkit.specs import GeneratorSpec, SchemaFragment

_SHARED = ("generator_hidden_dim", "generator_latent_dim", "generator_learning_rate",
           "generator_weight_decay", "generator_grad_clip", "generator_augmentation",
           "generator_augmentation_noise")
VAE_SETTINGS = _SHARED + ("generator_dropout", "use_conditioned_vae", "generator_beta",
                          "generator_beta_warmup_fraction", "generator_cosine_weight")
GAN_SETTINGS = _SHARED + ("gan_loss", "gan_r1_weight", "gan_discriminator_learning_rate", "gan_critic_steps",
                          "gan_adam_betas", "gan_conditioned")
GAUSSIAN_SETTINGS = ("generator_latent_dim", "gaussian_conditioned", "gaussian_shrinkage")


@hookimpl
def feda2v_register_generators(register):
    register(GeneratorSpec(
        name="vae",
        description="The original FedA2V VAE (MLP encoder/decoder, KL warm-up), optionally conditioned.",
        factory="feda2v_toolkit.generators.vae:VAEGenerator",
        settings=VAE_SETTINGS,
    ))
    register(GeneratorSpec(
        name="gan",
        description="MLP GAN (non-saturating loss with R1 penalty, projection discriminator), optionally conditioned.",
        factory="feda2v_toolkit.generators.gan:GANGenerator",
        settings=GAN_SETTINGS,
    ))
    register(GeneratorSpec(
        name="gaussian",
        description="Class-conditional Gaussian with a shrunk low-rank covariance, fitted in closed form "
                    "(the default: stands in for real data on small real corpora).",
        factory="feda2v_toolkit.generators.gaussian:GaussianGenerator",
        settings=GAUSSIAN_SETTINGS,
    ))


@hookimpl
def feda2v_register_schema_fragments(register):
    register(SchemaFragment(name="gan", schema=package_schema("gan.schema.json"), generator_type="gan",
                            description="Keys of the built-in `gan` generator type."))
    register(SchemaFragment(name="gaussian", schema=package_schema("gaussian.schema.json"), generator_type="gaussian",
                            description="Keys of the built-in `gaussian` generator type."))
