"""The conformance kit: check that a component honours the contracts of :mod:`feda2v_toolkit.components`.

For plugin authors (and for the toolkit itself, which runs it over every registered component)::

    import pytest
    from feda2v_toolkit.testing import check_component, conformance_cases
    import my_plugin.plugin as plugin

    @pytest.mark.parametrize(("kind", "name"), conformance_cases(plugin=plugin))
    def test_conforms(kind, name, tmp_path):
        check_component(kind, name, plugin=plugin, tmp_path=tmp_path)

``plugin=`` loads your plugin module directly (no installation needed, installed plugins are ignored);
without it the checks use the process-wide registry (installed plugins). Every check raises
:class:`ConformanceError` (an ``AssertionError``) saying what is wrong. What is checked:

* generator type -- builds from a resolved config on tiny data; ``init_args()`` is JSON and rebuilds
  the same state; a few ``training_step`` calls return finite float terms (``"loss"`` first) and change
  the weights (closed-form types, ``fitted = True``: ``fit`` returns finite float metrics and changes the
  state); ``loss_terms`` updates nothing; ``sample`` returns ``[n, seq_len, dim]`` finite values,
  draws only from the ``torch.Generator`` it is given (same seed, same samples; global RNG untouched);
  the same seed trains bit-identical weights; a model file round trip (safetensors) restores every
  tensor bit-exactly and samples identically at full length; ``feda2v_toolkit.training.pipeline.train`` runs
  end to end on a tiny dataset.
* reducer -- the spec's ``positional`` agrees with the class's; ``[B, L, D] -> [B, l, D]``, finite,
  per-sequence (batch-independent), deterministic; fitted ones fit on streamed batches; state round
  trip through safetensors; one that claims ``propagates_non_finite`` turns a NaN or inf at any position
  into a non-finite reduced sequence.
* upsampler -- the spec's ``trainable`` agrees with the class's; ``[B, l, D] -> [B, L, D]`` for any
  ``L``, identity at ``L == l`` (not required of trainable ones), per-sequence; trainable ones fit on
  streamed pairs and return JSON metrics; state round trip.
* schema fragment -- a valid draft 2020-12 object schema; every property has a description, and its
  default validates against the property itself; a plugin's keys carry its prefix.
* migration -- :func:`check_migration` on an example section you give: pure, removes what it
  deprecates, no longer needed afterwards, idempotent.

torch is imported inside the checks, so importing this module (and collecting tests) stays cheap.
"""

from __future__ import annotations

import copy
import json
import math
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

from feda2v_toolkit.config import schema_defaults
from feda2v_toolkit.plugins import (
    BUILTIN_PLUGIN,
    KINDS,
    Registry,
    get_registry,
    load_registry,
    using_registry,
)
from feda2v_toolkit.specs import ComponentSpec, Migration, SchemaFragment

__all__ = [
    "TINY_CONFIG", "ConformanceError", "check_component", "check_generator", "check_migration", "check_reducer",
    "check_schema_fragment", "check_upsampler", "conformance_cases", "plugin_registry", "resolved_config",
]

#: Core settings the kit applies for small, fast instances (then the spec's ``test_config``, then yours).
TINY_CONFIG: dict[str, Any] = {
    "generator_hidden_dim": 16,
    "generator_latent_dim": 4,
    "generator_batch_size": 8,
    "generator_training_epochs": 2,
    "generator_upsampler_epochs": 2,
    "generator_save_checkpoint": False,
    "generator_seed": 0,
}
FRAGMENT = "schema_fragment"
DRAFT_2020_12 = "https://json-schema.org/draft/2020-12/schema"


class ConformanceError(AssertionError):
    """A component does not honour its contract; the message says which part."""


def _expect(condition: Any, message: str) -> None:
    if not condition:
        raise ConformanceError(message)


# -- registries -------------------------------------------------------------------------------------

_PLUGIN_REGISTRIES: dict[int, tuple[Any, Registry]] = {}


def plugin_registry(plugin: ModuleType | Any, name: str | None = None) -> Registry:
    """A strict registry holding the built-ins plus ``plugin`` loaded directly (installed plugins ignored).

    ``name`` defaults to the module's top-level package name with ``feda2v_tk_`` stripped (so
    ``feda2v_tk_flow.plugin`` is loaded as ``flow``); pass your entry-point name if it differs.
    Cached per plugin object.
    """
    cached = _PLUGIN_REGISTRIES.get(id(plugin))
    if cached is not None and cached[0] is plugin:
        return cached[1]
    if name is None:
        top = getattr(plugin, "__name__", "plugin").split(".")[0]
        name = top.removeprefix("feda2v_tk_").removeprefix("feda2v_").replace("_", "-")
    registry = load_registry(autoload=False, strict=True, extra_plugins=[(name, plugin)])
    _PLUGIN_REGISTRIES[id(plugin)] = (plugin, registry)
    return registry


def _registry(registry: Registry | None, plugin: Any) -> Registry:
    if registry is not None:
        return registry
    if plugin is not None:
        return plugin_registry(plugin)
    return get_registry()


def _resolve(kind: str, name: str, registry: Registry | None, plugin: Any) -> tuple[Registry, Any, Any, str]:
    """The registry, the spec, the loaded class and the ``"<kind> <plugin:name>"`` prefix of messages."""
    reg = _registry(registry, plugin)
    spec = reg.get(kind, name)
    return reg, spec, reg.load(kind, name), f"{kind} {spec.qualified_name}"


def _flag_agrees(spec: ComponentSpec, cls: Any, flag: str, what: str) -> None:
    """The spec's torch-free copy of a class flag (``positional``, ``trainable``) must match the class."""
    declared, actual = getattr(spec, flag), getattr(cls, flag)
    _expect(declared == bool(actual),
            f"{what}: its {type(spec).__name__} says {flag}={declared} but {cls.__qualname__}.{flag} is "
            f"{actual}; register it with {flag}={bool(actual)} (validate reads the spec)")


def resolved_config(registry: Registry, spec: ComponentSpec | None = None, overrides: Mapping[str, Any] | None = None,
                    *, seq_len: int = 4) -> dict[str, Any]:
    """Every schema default of ``registry``, then :data:`TINY_CONFIG`, the spec's ``test_config`` and
    ``overrides``: a resolved generator section, as ``load_config`` would return it."""
    cfg = schema_defaults(registry)
    cfg.update(TINY_CONFIG)
    cfg["generator_training_sequence_length"] = seq_len
    if spec is not None:
        cfg.update(copy.deepcopy(dict(spec.test_config)))
    cfg.update(copy.deepcopy(dict(overrides or {})))
    return cfg


@contextmanager
def _workdir(tmp_path: Path | str | None) -> Iterator[Path]:
    if tmp_path is not None:
        path = Path(tmp_path)
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="feda2v-conformance-") as tmp:
        yield Path(tmp)


# -- shared helpers -----------------------------------------------------------------------------

def _json_args(obj: Any, what: str) -> dict[str, Any]:
    try:
        args = obj.init_args()
    except NotImplementedError:
        raise ConformanceError(f"{what}: init_args() is not implemented") from None
    _expect(isinstance(args, dict), f"{what}: init_args() must return a dict, got {type(args).__name__}")
    try:
        text = json.dumps(args, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ConformanceError(f"{what}: init_args() is not JSON-serialisable: {exc}") from None
    _expect(json.loads(text) == args, f"{what}: init_args() does not survive a JSON round trip: {args!r}")
    return json.loads(text)


def _rebuild(obj: Any, what: str) -> Any:
    """``type(obj)(**init_args)`` + state loaded from a safetensors round trip (strict)."""
    from safetensors.torch import load as st_load
    from safetensors.torch import save as st_save

    args = _json_args(obj, what)
    try:
        twin = type(obj)(**args)
    except Exception as exc:
        raise ConformanceError(f"{what}: type(obj)(**init_args()) failed: {type(exc).__name__}: {exc}") from None
    state = {k: v.detach().contiguous() for k, v in obj.state_dict().items()}
    try:
        restored = st_load(st_save(state)) if state else {}
        twin.load_state_dict(restored, strict=True)
    except Exception as exc:
        raise ConformanceError(f"{what}: its state does not load into type(obj)(**init_args()) "
                               f"({type(exc).__name__}: {exc}); keep all state in parameters/persistent "
                               "buffers whose shapes follow from init_args()") from None
    _expect_same_state(obj, twin, what)
    return twin


def _expect_same_state(a: Any, b: Any, what: str) -> None:
    import torch

    sa, sb = a.state_dict(), b.state_dict()
    _expect(list(sa) == list(sb), f"{what}: state keys differ: {sorted(set(sa) ^ set(sb))}")
    for key in sa:
        _expect(sa[key].dtype == sb[key].dtype and sa[key].shape == sb[key].shape and torch.equal(sa[key], sb[key]),
                f"{what}: tensor {key!r} is not restored bit-exactly")


def _finite(t: Any, what: str) -> None:
    import torch

    _expect(torch.is_tensor(t), f"{what}: expected a tensor, got {type(t).__name__}")
    _expect(bool(torch.isfinite(t).all()), f"{what}: contains NaN or inf")


def _shape(t: Any, shape: tuple[int, ...], what: str) -> None:
    _expect(tuple(t.shape) == shape, f"{what}: expected shape {list(shape)}, got {list(t.shape)}")


def _toy_sequences(n: int, length: int, dim: int, seed: int, num_classes: int = 2) -> tuple[Any, Any]:
    """Standardised toy data with class structure and smooth positional structure: ``(x [n, L, D], labels)``."""
    import torch

    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % max(num_classes, 1)
    means = torch.randn(max(num_classes, 1), 1, dim, generator=g)
    pos = torch.linspace(0, math.pi, length).view(1, length, 1) * torch.randn(1, 1, dim, generator=g).abs()
    x = means[labels] + torch.sin(pos) + 0.3 * torch.randn(n, length, dim, generator=g)
    return ((x - x.mean(0)) / x.std(0).clamp_min(1e-3)).float(), labels


# -- generators ---------------------------------------------------------------------------------

def _train_steps(gen: Any, cfg: Mapping[str, Any], x: Any, labels: Any, conditions: Any, steps: int,
                 batch_size: int, seed: int, what: str) -> list[dict[str, float]]:
    """``steps`` optimisation steps through the training pipeline's step loop (the loop every site runs)."""
    import torch

    from feda2v_toolkit.components import TrainContext
    from feda2v_toolkit.training.loop import DivergedError, run_steps

    torch.manual_seed(seed)
    optimizers = gen.configure_optimizers(cfg)
    _expect(isinstance(optimizers, Mapping) and optimizers and all(isinstance(k, str) for k in optimizers),
            f"{what}: configure_optimizers() must return a non-empty dict of named optimisers")
    starts = [(step * batch_size) % x.shape[0] for step in range(steps)]
    batches = ((x[s:s + batch_size], labels[s:s + batch_size],
                conditions[s:s + batch_size] if conditions is not None else None) for s in starts)
    history: list[dict[str, float]] = []

    def check(terms: dict[str, float], _n: int) -> None:
        _check_terms(terms, f"{what}: training_step")
        history.append(terms)

    def context(step: int) -> TrainContext:
        return TrainContext(epoch=0, total_epochs=1, step=step, progress=step / steps, config=cfg)

    try:
        run_steps(gen, optimizers, batches, context, on_step=check, check=False)
    except DivergedError as exc:  # pragma: no cover - _check_terms reports non-finite terms first
        raise ConformanceError(f"{what}: {exc}") from None
    return history


def _check_terms(terms: Any, what: str) -> None:
    _expect(isinstance(terms, Mapping) and terms, f"{what} must return a non-empty dict of loss terms")
    _expect(next(iter(terms)) == "loss", f"{what}: the first term must be 'loss', got {list(terms)}")
    for key, value in terms.items():
        _expect(isinstance(value, float) and not isinstance(value, bool),
                f"{what}: term {key!r} must be a Python float, got {type(value).__name__}")
        _expect(math.isfinite(value), f"{what}: term {key!r} is not finite ({value})")


def check_generator(name: str, *, registry: Registry | None = None, plugin: Any = None,
                    config: Mapping[str, Any] | None = None, seq_len: int = 4, dim: int = 8, full_length: int = 12,
                    num_classes: int = 2, condition_dim: int = 0, steps: int = 3, seed: int = 0,
                    end_to_end: bool = True, tmp_path: Path | str | None = None) -> None:
    """Check a generator type (see the module docstring). ``config`` overrides the tiny resolved config."""
    import torch

    from feda2v_toolkit.components import Generator

    reg, spec, cls, what = _resolve("generator", name, registry, plugin)
    cfg = resolved_config(reg, spec, config, seq_len=seq_len)
    cfg["generator_type"] = spec.qualified_name
    _expect(isinstance(getattr(cls, "supports_conditioning", False), bool),
            f"{what}: supports_conditioning must be a bool")

    n = 16
    x, labels = _toy_sequences(n, seq_len, dim, seed + 1, num_classes)
    conditions = torch.randn(n, condition_dim, generator=torch.Generator().manual_seed(seed + 2)) \
        if condition_dim else None

    def build() -> Generator:
        torch.manual_seed(seed)
        return cls.from_config(cfg, seq_len=seq_len, dim=dim, num_classes=num_classes, condition_dim=condition_dim)

    gen = build()
    _expect(isinstance(gen, cls) and isinstance(gen, Generator),
            f"{what}: from_config() must return an instance of {cls.__qualname__}")
    _expect((gen.seq_len, gen.dim) == (seq_len, dim), f"{what}: seq_len/dim not kept by from_config()")
    _expect(gen.conditioning in (None, "label", "embedding"), f"{what}: conditioning must be None, 'label' "
            f"or 'embedding', got {gen.conditioning!r}")
    fitted = bool(getattr(cls, "fitted", False))
    _expect(fitted or sum(p.numel() for p in gen.parameters()) > 0, f"{what}: has no parameters")
    _rebuild(gen, what)

    def run_training(g: Generator) -> list[dict[str, float]]:
        if fitted:
            metrics = g.fit(x, labels=labels, conditions=conditions, seed=seed)
            _expect(isinstance(metrics, Mapping) and all(isinstance(v, float) and math.isfinite(v)
                                                         for v in metrics.values()),
                    f"{what}: fit() must return a dict of finite floats, got {metrics!r}")
            return []
        return _train_steps(g, cfg, x, labels, conditions, steps, 8, seed, what)

    before = {k: v.clone() for k, v in gen.state_dict().items()}
    history = run_training(gen)
    changed = any(not torch.equal(before[k], v) for k, v in gen.state_dict().items())
    _expect(changed, f"{what}: {'fit()' if fitted else f'{steps} training steps'} changed no weight")

    gen.eval()
    from feda2v_toolkit.components import TrainContext

    snapshot = {k: v.clone() for k, v in gen.state_dict().items()}
    with torch.no_grad():
        terms = gen.loss_terms(x[:8], labels=labels[:8], conditions=conditions[:8] if conditions is not None else None,
                               ctx=TrainContext(epoch=0, total_epochs=1, step=0, progress=1.0, config=cfg))
    _check_terms(terms, f"{what}: loss_terms")
    _expect(not history or list(terms) == list(history[-1]), f"{what}: loss_terms keys {list(terms)} differ "
            f"from training_step's {list(history[-1]) if history else []}")
    _expect(all(torch.equal(snapshot[k], v) for k, v in gen.state_dict().items()),
            f"{what}: loss_terms changed the weights")

    _check_sampling(gen, labels, conditions, seed, what)

    twin = build()
    run_training(twin)
    for key, value in gen.state_dict().items():
        _expect(torch.equal(value, twin.state_dict()[key]),
                f"{what}: training twice from the same seed gave different weights ({key!r}); draw training "
                "randomness from the global torch RNG only")

    with _workdir(tmp_path) as work:
        _check_model_file(reg, spec, gen, cfg, seq_len, dim, full_length, num_classes, condition_dim, seed,
                          work, what)
        if end_to_end:
            _check_end_to_end(reg, spec, cfg, dim, full_length, num_classes, seed, work, what)


def _check_sampling(gen: Any, labels: Any, conditions: Any, seed: int, what: str) -> None:
    import torch

    k = 5
    lab = labels[:k]
    cond = conditions[:k] if conditions is not None else None
    rng_state = torch.get_rng_state()
    with torch.no_grad():
        a = gen.sample(k, labels=lab, conditions=cond, generator=torch.Generator().manual_seed(seed + 10))
        b = gen.sample(k, labels=lab, conditions=cond, generator=torch.Generator().manual_seed(seed + 10))
        c = gen.sample(k, labels=lab, conditions=cond, generator=torch.Generator().manual_seed(seed + 11))
    _expect(torch.equal(torch.get_rng_state(), rng_state),
            f"{what}: sample() used the global torch RNG; draw only from its `generator` argument")
    _shape(a, (k, gen.seq_len, gen.dim), f"{what}: sample({k})")
    _expect(a.dtype == torch.float32, f"{what}: sample() must return float32, got {a.dtype}")
    _finite(a, f"{what}: sample()")
    _expect(torch.equal(a, b), f"{what}: sample() with the same generator seed gave different samples")
    _expect(not torch.equal(a, c), f"{what}: sample() with different seeds gave identical samples")
    _expect(float(a.std()) > 0, f"{what}: samples have no variation")


def _check_model_file(reg: Registry, spec: ComponentSpec, gen: Any, cfg: Mapping[str, Any], seq_len: int, dim: int,
                      full_length: int, num_classes: int, condition_dim: int, seed: int, work: Path,
                      what: str) -> None:
    import torch

    from feda2v_toolkit.model.bundle import UNIFIED_KEY, GenerativeModel
    from feda2v_toolkit.model.file import load_model, save_model

    class_names = [f"class_{i}" for i in range(max(num_classes, 1))]
    g = torch.Generator().manual_seed(seed + 3)
    model = GenerativeModel(
        generator_type=spec.qualified_name, generators={UNIFIED_KEY: gen}, granularity="unified",
        class_names=class_names, class_to_generator={c: UNIFIED_KEY for c in class_names},
        reducer=reg.load("reducer", f"{BUILTIN_PLUGIN}:adaptive_avg")(length=seq_len), reducer_name="adaptive_avg",
        upsampler=reg.load("upsampler", f"{BUILTIN_PLUGIN}:linear")(), upsampler_name="linear",
        full_length=full_length, training_length=seq_len, output_length=full_length, dim=dim,
        normalization={"mean": torch.randn(seq_len, dim, generator=g), "std": torch.rand(seq_len, dim, generator=g) + 0.5},
        condition_dim=condition_dim, config=dict(cfg), seed=seed)
    path = work / f"{spec.name}.model.safetensors"
    with using_registry(reg):
        try:
            save_model(model, path)
            loaded = load_model(path)
        except Exception as exc:
            raise ConformanceError(f"{what}: model file round trip failed: {type(exc).__name__}: {exc}") from None
    _expect_same_state(gen, loaded.generators[UNIFIED_KEY], f"{what}: after a model-file round trip")
    cond = torch.randn(3, condition_dim, generator=torch.Generator().manual_seed(seed + 4)) if condition_dim else None
    needs = gen.needs_condition
    a = model.sample(3, class_name=class_names[-1], conditions=cond if needs else None,
                     generator=torch.Generator().manual_seed(seed + 5))
    b = loaded.sample(3, class_name=class_names[-1], conditions=cond if needs else None,
                      generator=torch.Generator().manual_seed(seed + 5))
    _shape(a, (3, full_length, dim), f"{what}: GenerativeModel.sample at full length")
    _finite(a, f"{what}: full-length samples")
    _expect(torch.equal(a, b), f"{what}: a model loaded from its file samples differently from the original")


def _check_end_to_end(reg: Registry, spec: ComponentSpec, cfg: Mapping[str, Any], dim: int, full_length: int,
                      num_classes: int, seed: int, work: Path, what: str) -> None:
    import torch

    from feda2v_toolkit.data.writer import write_dataset
    from feda2v_toolkit.model.file import load_model
    from feda2v_toolkit.training.pipeline import train

    x, labels = _toy_sequences(8 * max(num_classes, 1), full_length, dim, seed + 6, num_classes)
    data = write_dataset(work / "tiny-data.safetensors", x, labels,
                         class_names=[f"class_{i}" for i in range(max(num_classes, 1))])
    defaults = resolved_config(reg, None, None)
    section = {k: v for k, v in cfg.items() if k not in defaults or defaults[k] != v or k in TINY_CONFIG}
    section["generator_checkpoint_dir"] = str(work / "checkpoints")
    out = work / "e2e.model.safetensors"
    with using_registry(reg):
        try:
            train(section, data, out=out, progress=False)
            model = load_model(out)
        except Exception as exc:
            raise ConformanceError(f"{what}: feda2v_toolkit.training.pipeline.train failed end to end: "
                                   f"{type(exc).__name__}: {exc}") from None
    s = model.sample(2, class_name=model.sampleable_classes[0], generator=torch.Generator().manual_seed(0)) \
        if not any(g.needs_condition for g in model.generators.values()) else None
    if s is not None:
        _shape(s, (2, model.default_length, dim), f"{what}: samples of the end-to-end model")
        _finite(s, f"{what}: samples of the end-to-end model")


# -- reducers and upsamplers ----------------------------------------------------------------------

def check_reducer(name: str, *, registry: Registry | None = None, plugin: Any = None,
                  config: Mapping[str, Any] | None = None, full_length: int = 12, length: int = 4, dim: int = 8,
                  seed: int = 0, tmp_path: Path | str | None = None) -> None:
    """Check a reducer (see the module docstring)."""
    import torch

    from feda2v_toolkit.components import Reducer

    reg, spec, cls, what = _resolve("reducer", name, registry, plugin)
    _flag_agrees(spec, cls, "positional", what)
    cfg = resolved_config(reg, spec, config, seq_len=length)
    torch.manual_seed(seed)
    red = cls.from_config(cfg, length=length, full_length=full_length, dim=dim)
    _expect(isinstance(red, cls) and isinstance(red, Reducer), f"{what}: from_config() must return a {cls.__qualname__}")
    _expect(red.length == length, f"{what}: from_config() did not keep length={length}")
    x, _ = _toy_sequences(10, full_length, dim, seed + 1)
    if cls.fitted:
        calls = [0]

        def batches() -> Iterator[Any]:
            calls[0] += 1
            yield from x.split(4)

        red.fit(batches)
        _expect(calls[0] >= 1, f"{what}: fitted reducer never read its training batches")
    red.eval()
    with torch.no_grad():
        y = red(x)
        y2 = red(x)
        part = red(x[:3])
    _shape(y, (10, length, dim), f"{what}: forward([10, {full_length}, {dim}])")
    _expect(y.dtype == torch.float32, f"{what}: must return float32 for float32 input, got {y.dtype}")
    _finite(y, f"{what}: output")
    _expect(torch.equal(y, y2), f"{what}: forward is not deterministic")
    _expect(torch.allclose(part, y[:3], atol=1e-5, rtol=1e-5),
            f"{what}: output depends on the other sequences of the batch (the trainer reduces in chunks)")
    twin = _rebuild(red, what).eval()
    with torch.no_grad():
        _expect(torch.equal(twin(x), y), f"{what}: a rebuilt reducer gives different output")
    if red.propagates_non_finite:  # the reduce pass then checks only the reduced sequences
        with torch.no_grad():
            for pos in range(full_length):
                for bad in (float("nan"), float("inf"), float("-inf")):
                    z = x[:2].clone()
                    z[1, pos, pos % dim] = bad
                    out = red(z)
                    _expect(not bool(torch.isfinite(out[1]).all()),
                            f"{what}: claims propagates_non_finite, but a {bad} at position {pos} gives a "
                            f"finite reduced sequence")


def check_upsampler(name: str, *, registry: Registry | None = None, plugin: Any = None,
                    config: Mapping[str, Any] | None = None, reduced_length: int = 4, full_length: int = 12,
                    dim: int = 8, seed: int = 0, tmp_path: Path | str | None = None) -> None:
    """Check an upsampler (see the module docstring)."""
    import torch
    import torch.nn.functional as F

    from feda2v_toolkit.components import Upsampler

    reg, spec, cls, what = _resolve("upsampler", name, registry, plugin)
    _flag_agrees(spec, cls, "trainable", what)
    cfg = resolved_config(reg, spec, config, seq_len=reduced_length)
    torch.manual_seed(seed)
    up = cls.from_config(cfg, reduced_length=reduced_length, full_length=full_length, dim=dim)
    _expect(isinstance(up, cls) and isinstance(up, Upsampler), f"{what}: from_config() must return a {cls.__qualname__}")
    full, _ = _toy_sequences(12, full_length, dim, seed + 1)
    reduced = F.adaptive_avg_pool1d(full.transpose(1, 2), reduced_length).transpose(1, 2)
    if cls.trainable:
        calls = [0]

        def pairs() -> Iterator[tuple[Any, Any]]:
            calls[0] += 1
            yield from zip(reduced.split(4), full.split(4), strict=True)

        up.train()
        metrics = up.fit(pairs, config=cfg)
        _expect(calls[0] >= 1, f"{what}: trainable upsampler never read its training pairs")
        _expect(isinstance(metrics, Mapping), f"{what}: fit() must return a dict of metrics")
        try:
            json.dumps(metrics, allow_nan=True)
        except (TypeError, ValueError) as exc:
            raise ConformanceError(f"{what}: fit() metrics are not JSON-serialisable: {exc}") from None
    up.eval()
    with torch.no_grad():
        y = up(reduced, full_length)
        y2 = up(reduced, full_length)
        part = up(reduced[:3], full_length)
        other = up(reduced, full_length + 5)
        same = up(reduced, reduced_length)
    _shape(y, (12, full_length, dim), f"{what}: forward([12, {reduced_length}, {dim}], {full_length})")
    _shape(other, (12, full_length + 5, dim), f"{what}: forward(x, {full_length + 5}) (any output length)")
    _shape(same, (12, reduced_length, dim), f"{what}: forward(x, {reduced_length})")
    _expect(y.dtype == torch.float32, f"{what}: must return float32 for float32 input, got {y.dtype}")
    _finite(y, f"{what}: output")
    _finite(other, f"{what}: output at another length")
    _expect(torch.equal(y, y2), f"{what}: forward is not deterministic")
    _expect(torch.allclose(part, y[:3], atol=1e-5, rtol=1e-5),
            f"{what}: output depends on the other sequences of the batch")
    if not cls.trainable:
        _expect(torch.allclose(same, reduced, atol=1e-5, rtol=1e-5),
                f"{what}: upsampling to the input length must return the input")
    twin = _rebuild(up, what).eval()
    with torch.no_grad():
        _expect(torch.equal(twin(reduced, full_length), y), f"{what}: a rebuilt upsampler gives different output")


# -- schema fragments and migrations ------------------------------------------------------------------

def _fragment(reg: Registry, fragment: SchemaFragment | str) -> SchemaFragment:
    if isinstance(fragment, SchemaFragment):
        return fragment
    plugin, _, name = fragment.rpartition(":")
    found = [f for f in reg.schema_fragments if f.name == name and (not plugin or f.provenance.plugin == plugin)]
    _expect(len(found) == 1, f"schema fragment {fragment!r}: {'not registered' if not found else 'ambiguous'}")
    return found[0]


def key_prefixes(fragment: SchemaFragment) -> tuple[str, ...]:
    """Prefixes a plugin's config keys must carry: ``<plugin>_`` and, if set, ``<generator_type>_``."""
    out = [fragment.provenance.plugin.replace("-", "_").replace(".", "_") + "_"]
    if fragment.generator_type:
        out.append(fragment.generator_type.split(":")[-1].replace("-", "_") + "_")
    return tuple(dict.fromkeys(out))


def check_schema_fragment(fragment: SchemaFragment | str, *, registry: Registry | None = None,
                          plugin: Any = None) -> None:
    """Check a schema fragment (an object, or ``"name"`` / ``"plugin:name"`` in the registry)."""
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import SchemaError

    reg = _registry(registry, plugin)
    frag = _fragment(reg, fragment)
    what = f"schema fragment {frag.provenance.plugin or '?'}:{frag.name}"
    schema = dict(frag.schema)
    _expect(schema.get("$schema", DRAFT_2020_12) == DRAFT_2020_12,
            f"{what}: $schema must be {DRAFT_2020_12!r} (or absent), got {schema.get('$schema')!r}")
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as exc:
        raise ConformanceError(f"{what}: not a valid draft 2020-12 JSON Schema: {exc.message}") from None
    _expect(schema.get("type", "object") == "object", f"{what}: must be an object schema")
    props = schema.get("properties")
    _expect(isinstance(props, Mapping) and props, f"{what}: needs a non-empty 'properties' mapping")
    defs = schema.get("$defs", {})
    for key, prop in props.items():
        _expect(isinstance(prop, Mapping), f"{what}: property {key!r} must be a schema object")
        desc = prop.get("description")
        _expect(isinstance(desc, str) and desc.strip(), f"{what}: property {key!r} needs a description")
        if "default" in prop:
            validator = Draft202012Validator({**prop, "$defs": defs} if defs else dict(prop))
            errors = sorted(validator.iter_errors(prop["default"]), key=lambda e: list(e.path))
            _expect(not errors, f"{what}: the default of {key!r} ({json.dumps(prop['default'])}) does not "
                    f"validate against its own schema: {errors[0].message if errors else ''}")
    if frag.provenance.plugin not in ("", BUILTIN_PLUGIN):
        prefixes = key_prefixes(frag)
        bad = [k for k in props if not k.startswith(prefixes)]
        _expect(not bad, f"{what}: keys {bad} must start with {' or '.join(prefixes)} (a plugin's own prefix)")
    if frag.generator_type is not None:
        try:
            reg.get("generator", frag.generator_type)
        except Exception:
            raise ConformanceError(f"{what}: generator_type {frag.generator_type!r} is not a registered "
                                   "generator") from None


def check_migration(migration: Migration | str, section: Mapping[str, Any], *,
                    expected: Mapping[str, Any] | None = None, options: Mapping[str, Any] | None = None,
                    registry: Registry | None = None, plugin: Any = None) -> dict[str, Any]:
    """Apply one migration step to an example ``section`` and check it; returns the migrated section.

    Checks: the step is needed by ``section``, leaves its input untouched, returns a dict without the
    keys it deprecates, is no longer needed afterwards, is idempotent, and (if given) returns
    ``expected`` -- key order included.
    """
    from feda2v_toolkit.config.migrate import MigrationContext

    reg = _registry(registry, plugin)
    if isinstance(migration, str):
        found = [m for m in reg.migrations if m.id == migration]
        _expect(found, f"migration {migration!r} is not registered")
        migration = found[0]
    what = f"migration {migration.id}"
    defaults = resolved_config(reg, None, None)

    def apply(sec: Mapping[str, Any]) -> dict[str, Any]:
        ctx = MigrationContext(migration.chain, "$", False, dict(options or {}), defaults)
        original = copy.deepcopy(dict(sec))
        arg = copy.deepcopy(original)
        out = migration.apply(arg, ctx)
        _expect(arg == original, f"{what}: apply() modified its input; return a new dict")
        _expect(isinstance(out, Mapping), f"{what}: apply() must return the migrated section (a dict)")
        return dict(out)

    _expect(migration.needed_by(section), f"{what}: the example section does not need this step "
            "(detect()/deprecated_keys do not recognise it)")
    out = apply(section)
    left = [k for k in getattr(migration, "deprecated_keys", {}) if k in out]
    _expect(not left, f"{what}: deprecated keys {left} are still present after the step")
    _expect(not migration.needed_by(out), f"{what}: the migrated section still needs the step")
    if expected is not None:
        _expect(list(out.items()) == list(dict(expected).items()),
                f"{what}: expected {json.dumps(dict(expected))}, got {json.dumps(out)}")
    _expect(apply(out) == out, f"{what}: applying the step twice changes the section again")
    return out


# -- running the kit over a registry ------------------------------------------------------------------

_CHECKS: dict[str, Callable[..., None]] = {
    "generator": check_generator,
    "reducer": check_reducer,
    "upsampler": check_upsampler,
}


def check_component(kind: str, name: str, *, registry: Registry | None = None, plugin: Any = None,
                    tmp_path: Path | str | None = None, **options: Any) -> None:
    """Run the check for one ``kind`` (``generator``, ``reducer``, ``upsampler``, ``schema_fragment``)."""
    if kind == FRAGMENT:
        check_schema_fragment(name, registry=registry, plugin=plugin)
        return
    if kind not in _CHECKS:
        raise ValueError(f"unknown kind {kind!r}; use one of {', '.join([*KINDS, FRAGMENT])}")
    _CHECKS[kind](name, registry=registry, plugin=plugin, tmp_path=tmp_path, **options)


def conformance_cases(*, registry: Registry | None = None, plugin: Any = None, only_plugin: bool | None = None,
                      ) -> list[Any]:
    """``pytest.param(kind, name)`` for every registered component and schema fragment.

    With ``plugin=``, only what that plugin registers (``only_plugin`` defaults to True then). Names
    are qualified (``plugin:name``), ids read ``generator-builtin:vae``.
    """
    import pytest

    reg = _registry(registry, plugin)
    only = (plugin is not None) if only_plugin is None else only_plugin
    own = {p.name for p in reg.plugins if p.source == "direct"} if only else None
    cases = []
    for kind in KINDS:
        for spec in reg.specs(kind):
            if own is None or spec.plugin in own:
                cases.append(pytest.param(kind, spec.qualified_name, id=f"{kind}-{spec.qualified_name}"))
    for frag in reg.schema_fragments:
        if own is None or frag.provenance.plugin in own:
            qualified = f"{frag.provenance.plugin}:{frag.name}"
            cases.append(pytest.param(FRAGMENT, qualified, id=f"{FRAGMENT}-{qualified}"))
    return cases
