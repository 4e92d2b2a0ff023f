"""The conformance kit over every registered component, and proof that the kit catches broken ones."""

from __future__ import annotations

import pytest
import torch
from plugin_fakes import make_plugin

from feda2v_toolkit.components import Reducer, Upsampler
from feda2v_toolkit.generators.vae import VAEGenerator
from feda2v_toolkit.plugins import get_registry, load_registry
from feda2v_toolkit.specs import GeneratorSpec, ReducerSpec, SchemaFragment, UpsamplerSpec
from feda2v_toolkit.testing import (
    ConformanceError,
    check_component,
    check_generator,
    check_migration,
    check_reducer,
    check_schema_fragment,
    check_upsampler,
    conformance_cases,
)

# Collected from the live registry: a new built-in (or an installed plugin) is covered automatically.
CASES = conformance_cases(registry=get_registry())


def test_the_live_registry_yields_every_component_and_fragment():
    reg = get_registry()
    ids = {case.id for case in CASES}
    for kind in ("generator", "reducer", "upsampler"):
        for spec in reg.specs(kind):
            assert f"{kind}-{spec.qualified_name}" in ids
    assert "generator-builtin:vae" in ids and "schema_fragment-builtin:core" in ids


@pytest.mark.parametrize(("kind", "name"), CASES)
def test_every_registered_component_conforms(kind, name, tmp_path):
    check_component(kind, name, tmp_path=tmp_path)


def test_the_core_migration_passes_the_migration_check():
    out = check_migration("core-0001-split-target-sequence-length", {"generator_target_sequence_length": 8, "x": 1},
                          registry=get_registry(),
                          expected={"generator_training_sequence_length": 8, "generator_output_sequence_length": None,
                                    "x": 1})
    assert "generator_target_sequence_length" not in out


# -- the kit fails when it should --------------------------------------------------------------------------

def registry_with(**hooks):
    return load_registry(autoload=False, strict=True, extra_plugins=[("bad", make_plugin("bad", **hooks))])


class GlobalRNGSampler(VAEGenerator):
    """Samples from the global RNG instead of the generator it is given."""

    def sample(self, n, *, labels=None, conditions=None, generator=None):
        return self.decode(torch.randn(n, self.latent_dim))


class UnpicklableArgs(VAEGenerator):
    def init_args(self):
        return {**super().init_args(), "dtype": torch.float32}


class HiddenState(VAEGenerator):
    """Keeps learned state in a plain attribute that a model file cannot carry."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.offset = torch.zeros(1)

    def training_step(self, x, **kw):
        self.offset = self.offset + 1
        return super().training_step(x, **kw)

    def sample(self, n, **kw):
        return super().sample(n, **kw) + self.offset


class NonFloatTerms(VAEGenerator):
    def training_step(self, x, **kw):
        return {"loss": torch.tensor(super().training_step(x, **kw)["loss"])}


class Frozen(VAEGenerator):
    def training_step(self, x, **kw):
        return {"loss": 1.0}

    def loss_terms(self, x, **kw):
        return {"loss": 1.0}


@pytest.mark.parametrize(("cls", "message"), [
    (GlobalRNGSampler, "sample\\(\\) used the global torch RNG"),
    (UnpicklableArgs, "init_args\\(\\) is not JSON-serialisable"),
    (HiddenState, "a model loaded from its file samples differently"),
    (NonFloatTerms, "term 'loss' must be a Python float"),
    (Frozen, "training steps changed no weight"),
])
def test_the_generator_check_catches_contract_violations(cls, message, tmp_path):
    reg = registry_with(generators=lambda register: register(
        GeneratorSpec(name="broken", description="Broken on purpose.", factory=cls)))
    with pytest.raises(ConformanceError, match=message):
        check_generator("broken", registry=reg, end_to_end=False, tmp_path=tmp_path)


class BatchDependentReducer(Reducer):
    def forward(self, x):
        pooled = torch.nn.functional.adaptive_avg_pool1d(x.transpose(1, 2), self.length).transpose(1, 2)
        return pooled - pooled.mean(dim=0, keepdim=True)


class FittedWithoutState(Reducer):
    fitted = True

    def fit(self, batches):
        self.scale = float(torch.cat(list(batches())).abs().max())

    def forward(self, x):
        return torch.nn.functional.adaptive_avg_pool1d(x.transpose(1, 2), self.length).transpose(1, 2) / \
            getattr(self, "scale", 1.0)


def test_the_reducer_check_catches_batch_dependence_and_lost_fitted_state():
    reg = registry_with(reducers=lambda register: [
        register(ReducerSpec(name="batchy", description="Batch-dependent.", factory=BatchDependentReducer)),
        register(ReducerSpec(name="forgetful", description="Forgets its fit.", factory=FittedWithoutState))])
    with pytest.raises(ConformanceError, match="depends on the other sequences of the batch"):
        check_reducer("batchy", registry=reg)
    with pytest.raises(ConformanceError, match="a rebuilt reducer gives different output"):
        check_reducer("forgetful", registry=reg)


class EveryOtherPosition(Reducer):
    """Keeps every other position: a NaN at an odd one never reaches its output."""

    propagates_non_finite = True  # wrongly

    def forward(self, x):
        return torch.nn.functional.adaptive_avg_pool1d(x[:, ::2].transpose(1, 2), self.length).transpose(1, 2)


def test_the_reducer_check_catches_a_false_claim_to_propagate_nan_and_inf():
    reg = registry_with(reducers=lambda register: register(
        ReducerSpec(name="strided", description="Drops positions.", factory=EveryOtherPosition)))
    with pytest.raises(ConformanceError, match="claims propagates_non_finite, but a nan at position 1"):
        check_reducer("strided", registry=reg)
    EveryOtherPosition.propagates_non_finite = False  # the honest claim passes
    try:
        check_reducer("strided", registry=reg)
    finally:
        EveryOtherPosition.propagates_non_finite = True


class NotIdentity(Upsampler):
    def forward(self, x, length):
        return torch.nn.functional.interpolate(x.transpose(1, 2), size=length, mode="linear",
                                               align_corners=True).transpose(1, 2) * 1.01


class FixedLength(Upsampler):
    def forward(self, x, length):
        return torch.nn.functional.interpolate(x.transpose(1, 2), size=12).transpose(1, 2)


def test_the_upsampler_check_catches_wrong_lengths_and_non_identity():
    reg = registry_with(upsamplers=lambda register: [
        register(UpsamplerSpec(name="scaled", description="Scales.", factory=NotIdentity)),
        register(UpsamplerSpec(name="fixed", description="Ignores the length.", factory=FixedLength))])
    with pytest.raises(ConformanceError, match="upsampling to the input length must return the input"):
        check_upsampler("scaled", registry=reg)
    with pytest.raises(ConformanceError, match=r"forward\(x, 17\) \(any output length\): expected shape"):
        check_upsampler("fixed", registry=reg)


class Components(Reducer):
    """Like pca: its reduced axis is not positional."""

    positional = False

    def forward(self, x):
        return torch.nn.functional.adaptive_avg_pool1d(x.transpose(1, 2), self.length).transpose(1, 2)


class Fits(NotIdentity):
    trainable = True

    def fit(self, pairs, *, config):
        return {"pairs": float(sum(r.shape[0] for r, _ in pairs()))}


def test_the_kit_checks_that_the_spec_flags_agree_with_the_class_attributes():
    """validate reads positional/trainable from the specs (no torch): they must match the classes."""
    reg = registry_with(
        reducers=lambda register: [
            register(ReducerSpec(name="unsaid", description="Says nothing.", factory=Components)),
            register(ReducerSpec(name="said", description="Says it.", factory=Components, positional=False))],
        upsamplers=lambda register: [
            register(UpsamplerSpec(name="unsaid", description="Says nothing.", factory=Fits)),
            register(UpsamplerSpec(name="said", description="Says it.", factory=Fits, trainable=True))])
    with pytest.raises(ConformanceError, match="ReducerSpec says positional=True but Components.positional is False"):
        check_reducer("unsaid", registry=reg)
    check_reducer("said", registry=reg)
    with pytest.raises(ConformanceError, match="UpsamplerSpec says trainable=False but Fits.trainable is True"):
        check_upsampler("unsaid", registry=reg)
    check_upsampler("said", registry=reg)


def test_the_built_in_specs_carry_the_flags_of_their_classes():
    reg = get_registry()
    assert [s.name for s in reg.specs("reducer") if not s.positional] == ["pca"]
    assert sorted(s.name for s in reg.specs("upsampler") if s.trainable) == ["learned", "lstsq"]


@pytest.mark.parametrize(("properties", "message"), [
    ({"bad_depth": {"description": "Depth.", "type": "integer", "default": "deep"}}, "does not validate against"),
    ({"bad_depth": {"description": " ", "type": "integer"}}, "needs a description"),
    ({"depth": {"description": "Depth.", "type": "integer", "default": 1}}, "must start with bad_"),
])
def test_the_fragment_check_catches_bad_defaults_descriptions_and_prefixes(properties, message):
    reg = registry_with(schema_fragments=lambda register: register(
        SchemaFragment(name="frag", schema={"type": "object", "properties": properties})))
    with pytest.raises(ConformanceError, match=message):
        check_schema_fragment("bad:frag", registry=reg)


def test_the_migration_check_catches_impure_and_incomplete_steps():
    from feda2v_toolkit.specs import Migration

    def mutating(section, ctx):
        section["bad_new"] = section.pop("bad_old")
        return section

    def forgetful(section, ctx):
        return {**section, "bad_new": section["bad_old"]}

    for apply, message in ((mutating, "modified its input"), (forgetful, "still present after the step")):
        step = Migration(id="bad-0001", chain="bad", from_version=1, to_version=2, description="Rename.",
                         apply=apply, deprecated_keys={"bad_old": "bad_new"})
        with pytest.raises(ConformanceError, match=message):
            check_migration(step, {"bad_old": 1}, registry=get_registry())
