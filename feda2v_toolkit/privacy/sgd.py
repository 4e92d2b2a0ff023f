"""DP-SGD for generators trained by gradient descent (``vae``, ``gan``'s discriminator, plugin types).

The pipeline's step loop keeps calling :meth:`Generator.training_step`; privacy wraps around it:

1. before training, :func:`dp_sgd_release` declares each generator key's release: ``steps`` = every optimiser
   step that will run (epochs x batches per epoch x private steps per batch), sampled with probability ``q =
   expected batch / n`` (``n`` from the *noisy* class counts, so the rate is public) -- and the budget plan
   calibrates its noise multiplier for exactly those steps (:func:`feda2v_toolkit.privacy.plan_budget`);
2. :func:`make_private` ``(generator, optimizers, noise_multiplier, max_grad_norm, expected_batch_size)``
   hooks Opacus' per-sample gradients onto the modules the generator declares
   (:meth:`~feda2v_toolkit.components.Generator.private_modules`) and wraps their optimisers in
   ``DPOptimizer`` (per-sample clipping to ``max_grad_norm``, Gaussian noise of ``noise_multiplier *
   max_grad_norm`` from a secret generator, division by the *expected* batch size); a type that cannot is
   refused here, up front, with one clear error;
3. each step draws a Poisson batch (:class:`PoissonSampler`: every clip independently with probability
   ``q``, from secret randomness -- an attacker who could replay the batches would get no amplification),
   possibly empty (then a noise-only step), and :meth:`PrivateTraining.step` runs ``training_step`` on it and
   records the step in the ledger: the spent epsilon is computed over the steps actually taken.

Per-class (per-group) generators train on disjoint clips: their releases are declared with ``group=key`` and
compose in parallel.

Two engines compute the clipped sum of per-sample gradients, with the same result:

* ``"ghost"`` (used when every private layer is an ``nn.Linear`` or a plain ``nn.Embedding``, as in the
  built-in MLP generators): book-keeping clipping (Bu et al., 2023, "Differentially private optimization on
  large model at small cost"): hooks keep each layer's inputs and output gradients (``B x (in + out)``
  numbers), the per-sample gradient norms come from them without forming the gradients (``|g_i a_i^T| =
  |g_i| |a_i|``; Gram products for layers used several times per step, as a GAN's discriminator on its real
  and fake batches), and the clipped sum is one matrix product per layer, ``(c * G)^T A``;
* ``"opacus"``: Opacus' per-sample gradients (hooks mode: ``B`` copies of every gradient) and its
  ``DPOptimizer`` -- any layer Opacus supports. At the default VAE size it costs ~25x a plain step on a CPU
  (materialising ``32 x 6 M`` gradient numbers), the ghost engine ~1.x (``docs/privacy.md``).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from feda2v_toolkit.privacy.accounting import PrivacyLedger
from feda2v_toolkit.privacy.mechanism import clip_factors, secret_generator
from feda2v_toolkit.privacy.spec import PrivacyError, ReleaseSpec


def dp_sgd_release(key: str, *, epochs: int, records: float, batch_size: int, steps_per_batch: int = 1,
                   max_grad_norm: float, weight: float = 4.0, grouped: bool = True) -> ReleaseSpec:
    """The release of DP-SGD on generator ``key``: ``records`` (the noisy count of its clips) give ``q =
    batch_size / records`` and ``ceil(records / batch_size)`` batches per epoch; every batch is one
    composition. A batch on which ``steps_per_batch`` private steps run (a GAN's critic steps) is one Poisson
    sample of ``steps_per_batch`` Gaussian steps, i.e. one sampled Gaussian with multiplier ``z /
    sqrt(steps_per_batch)``: the planned multiplier is that per-batch one, and the optimiser gets
    :func:`optimizer_noise_multiplier` of it. ``steps_per_batch`` is only checked here."""
    if not (math.isfinite(max_grad_norm) and max_grad_norm > 0):
        raise PrivacyError(f"DP-SGD max_grad_norm must be > 0 (got {max_grad_norm}); a non-positive clip norm "
                           "cannot bound a clip's gradient")
    if records < 1:
        raise PrivacyError(f"generator {key!r} has no clips left after the noisy counts")
    if steps_per_batch < 1:
        raise PrivacyError(f"steps per batch must be >= 1 (got {steps_per_batch})")
    q = min(1.0, batch_size / records)
    batches = epochs * max(1, math.ceil(records / batch_size))
    return ReleaseSpec(f"generator.{key}.sgd", max_grad_norm, compositions=batches,
                       sampling_rate=q, weight=weight, group=key if grouped else None)


def optimizer_noise_multiplier(planned: float, steps_per_batch: int) -> float:
    """The noise multiplier of each optimiser step when a batch's ``steps_per_batch`` steps together carry the
    planned per-batch multiplier (Gaussians compose: ``z_batch = z_step / sqrt(steps)``)."""
    return float(planned) * math.sqrt(steps_per_batch)


class PoissonSampler:
    """Poisson batches over ``indices``: each clip independently with probability ``sampling_rate``, for
    ``steps`` batches (batches vary in size and may be empty), from a secret generator."""

    def __init__(self, indices: Tensor, sampling_rate: float, steps: int,
                 rng: torch.Generator | None = None) -> None:
        if not (0 < sampling_rate <= 1):
            raise PrivacyError(f"sampling rate must be in (0, 1], got {sampling_rate}")
        self.indices = indices
        self.sampling_rate = float(sampling_rate)
        self.steps = int(steps)
        self.rng = rng if rng is not None else secret_generator()

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[Tensor]:
        for _ in range(self.steps):
            mask = torch.rand(self.indices.numel(), generator=self.rng) < self.sampling_rate
            yield self.indices[mask]


@dataclass
class PrivateTraining:
    """A generator prepared for DP-SGD: call :meth:`step` instead of ``training_step``; :meth:`close` after."""

    generator: Any
    optimizers: dict[str, torch.optim.Optimizer]
    private: list[str]
    noise_multiplier: float
    max_grad_norm: float
    expected_batch_size: int
    steps_per_batch: int = 1
    hooks: list[Any] = field(default_factory=list)
    steps: int = 0
    inplace: list[nn.Module] = field(default_factory=list)
    engine: str = "opacus"

    def step(self, x: Tensor, *, labels: Tensor | None, conditions: Tensor | None, ctx: Any,
             ledger: PrivacyLedger | None = None, release: str | None = None, sampling_rate: float = 1.0,
             group: str | None = None) -> dict[str, float]:
        """One training step on the Poisson batch ``x`` (possibly empty: then a noise-only step of the private
        optimisers), recorded in ``ledger`` as one composition of ``release`` at the per-batch multiplier
        (``noise_multiplier / sqrt(steps_per_batch)``) and ``sampling_rate``."""
        if x.shape[0] == 0:
            terms = self._noise_only_step()
        else:
            with warnings.catch_warnings():  # inputs that need no gradient: the hooks still see the outputs'
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                terms = self.generator.training_step(x, labels=labels, conditions=conditions,
                                                     optimizers=self.optimizers, ctx=ctx)
        self.steps += 1
        if ledger is not None:
            if release is None:
                raise PrivacyError("a DP-SGD step recorded without its release name")
            ledger.record(release, self.noise_multiplier / math.sqrt(self.steps_per_batch),
                          sensitivity=self.max_grad_norm, sampling_rate=sampling_rate, group=group)
        return terms

    def _noise_only_step(self) -> dict[str, float]:
        for _ in range(self.steps_per_batch):
            for name in self.private:
                opt = self.optimizers[name]
                opt.zero_grad(set_to_none=True)
                if not isinstance(opt, _GhostOptimizer):
                    for p in opt.params:
                        p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
                opt.step()
        return {}

    def close(self) -> None:
        """Remove the per-sample-gradient hooks (the generator is a plain module again)."""
        for hook in self.hooks:
            hook.remove() if isinstance(hook, _GhostRecorder) else hook.remove_hooks()
        self.hooks.clear()
        for m in self.inplace:
            m.inplace = True
        self.inplace.clear()
        self.generator.private_batch_size = None


class _GhostRecorder:
    """Book-keeping hooks on ``nn.Linear`` / ``nn.Embedding`` layers (see the module docstring)."""

    SUPPORTED = (nn.Linear, nn.Embedding)

    def __init__(self, modules: list[nn.Module]) -> None:
        self.layers: list[nn.Module] = []
        seen: set[int] = set()
        for top in modules:
            for m in top.modules():
                own = [p for p in m.parameters(recurse=False) if p.requires_grad]
                if not own or id(m) in seen:
                    continue
                if not isinstance(m, self.SUPPORTED) or (isinstance(m, nn.Embedding) and (
                        m.padding_idx is not None or m.max_norm is not None or m.scale_grad_by_freq or m.sparse)):
                    raise NotImplementedError(type(m).__name__)
                seen.add(id(m))
                self.layers.append(m)
        self.handles: list[Any] = []
        for m in self.layers:
            m._dp_inputs, m._dp_pairs = [], []
            self.handles.append(m.register_forward_hook(self._forward))
            self.handles.append(m.register_full_backward_hook(self._backward))

    @staticmethod
    def _forward(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        if module.training and torch.is_grad_enabled() and any(p.requires_grad for p in module.parameters()):
            module._dp_inputs.append(inputs[0].detach())

    @staticmethod
    def _backward(module: nn.Module, grad_input: Any, grad_output: tuple[Tensor, ...]) -> None:
        if module._dp_inputs:  # autograd runs the later use of a layer first: last in, first out (as Opacus)
            module._dp_pairs.append((module._dp_inputs.pop(), grad_output[0].detach()))

    def clear(self) -> None:
        for m in self.layers:
            m._dp_inputs.clear()
            m._dp_pairs.clear()

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        for m in self.layers:
            del m._dp_inputs, m._dp_pairs
        self.handles.clear()

    def batch_size(self) -> int:
        for m in self.layers:
            if m._dp_pairs:
                return int(m._dp_pairs[0][0].shape[0])
        return 0

    @staticmethod
    def _rows(pairs: list[tuple[Tensor, Tensor]], n: int) -> tuple[Tensor, Tensor]:
        """Every use's (input, output-gradient) rows per sample: ``[n, R, in]``, ``[n, R, out]`` (float32)."""
        a = torch.cat([x.reshape(n, -1, x.shape[-1]) if x.dim() > 1 and x.is_floating_point()
                       else x.reshape(n, -1) for x, _ in pairs], dim=1)
        g = torch.cat([gy.reshape(n, -1, gy.shape[-1]) for _, gy in pairs], dim=1).float()
        return a, g

    def norms_sq(self, n: int) -> Tensor:
        """Per-sample squared gradient norms ``[n]`` over every recorded layer (gradients of the per-sample
        losses: the batch-mean loss's output gradients times ``n``)."""
        total: Tensor | None = None
        for m in self.layers:
            if not m._dp_pairs:
                continue
            a, g = self._rows(m._dp_pairs, n)
            if total is None:
                total = torch.zeros(n, dtype=torch.float64, device=g.device)
            g = g * n
            gg = g @ g.transpose(1, 2)  # [n, R, R]
            if isinstance(m, nn.Linear):
                a = a.float()
                total += ((a @ a.transpose(1, 2)) * gg).sum((1, 2)).double()
                if m.bias is not None and m.bias.requires_grad:
                    total += g.sum(1).square().sum(1).double()
            else:  # embedding rows: gradients of equal ids add up
                same = (a.unsqueeze(2) == a.unsqueeze(1)).float()
                total += (same * gg).sum((1, 2)).double()
        return torch.zeros(n, dtype=torch.float64) if total is None else total

    def clipped_sums(self, factors: Tensor) -> dict[nn.Parameter, Tensor]:
        """``sum_i c_i grad_i`` per parameter, without forming the per-sample gradients."""
        n = factors.numel()
        out: dict[nn.Parameter, Tensor] = {}
        c = factors.float()
        for m in self.layers:
            if not m._dp_pairs:
                continue
            a, g = self._rows(m._dp_pairs, n)
            g = g * (n * c).view(n, 1, 1)
            if isinstance(m, nn.Linear):
                gw = g.reshape(-1, g.shape[-1]).T @ a.reshape(-1, a.shape[-1]).float()
                out[m.weight] = gw
                if m.bias is not None and m.bias.requires_grad:
                    out[m.bias] = g.sum((0, 1))
            else:
                gw = torch.zeros_like(m.weight, dtype=torch.float32)
                gw.index_add_(0, a.reshape(-1).long(), g.reshape(-1, g.shape[-1]))
                out[m.weight] = gw
        return out


class _GhostOptimizer:
    """Wraps an optimiser: ``step`` replaces the gradients with the clipped per-sample sum plus secret noise,
    divided by the expected batch size, then steps the original (module docstring)."""

    def __init__(self, original: torch.optim.Optimizer, recorder: _GhostRecorder, noise_multiplier: float,
                 max_grad_norm: float, expected_batch_size: int, generator: torch.Generator,
                 sum_over_ranks: Any = None) -> None:
        self.original = original
        self.recorder = recorder
        self.noise_multiplier = float(noise_multiplier)
        self.max_grad_norm = float(max_grad_norm)
        self.expected_batch_size = int(expected_batch_size)
        # NOISE_LANES generators, each seeded from the secret one: the noise is drawn in parallel, each lane
        # from its own; a fixed count, so that the same secret generator draws the same noise on any number of
        # threads (data-parallel ranks that share it, on machines of any size, draw alike)
        self.generators = [generator] + [
            torch.Generator(device=generator.device).manual_seed(
                int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device)))
            for _ in range(NOISE_LANES - 1)]
        self.params = [p for grp in original.param_groups for p in grp["params"]]
        self.sum_over_ranks = sum_over_ranks  # data-parallel: sums the ranks' clipped sums in place

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.original.param_groups

    @property
    def state(self) -> Any:
        return self.original.state

    def state_dict(self) -> dict[str, Any]:
        return self.original.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.original.load_state_dict(state)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.original.zero_grad(set_to_none=set_to_none)
        self.recorder.clear()

    def step(self, closure: Any = None) -> Any:
        n = self.recorder.batch_size()
        sums: dict[nn.Parameter, Tensor] = {}
        if n:
            norms = self.recorder.norms_sq(n).sqrt()
            sums = self.recorder.clipped_sums(clip_factors(norms, self.max_grad_norm))
        if self.sum_over_ranks is not None:  # every rank's share of the batch, before the one draw of noise
            sums = {p: sums[p] if p in sums else torch.zeros(p.shape, dtype=torch.float32, device=p.device)
                    for p in self.params}
            self.sum_over_ranks(list(sums.values()))
        std = self.noise_multiplier * self.max_grad_norm / self.expected_batch_size
        scale = 1.0 / self.expected_batch_size

        def fill(p: nn.Parameter, gen: torch.Generator) -> None:
            g = torch.empty(p.shape, dtype=torch.float32, device=gen.device)
            if std > 0:
                g.normal_(0.0, std, generator=gen)
            else:
                g.zero_()
            g = g.to(p.device)
            if p in sums:
                g.add_(sums[p], alpha=scale)
            p.grad = g if g.dtype == p.dtype else g.to(p.dtype)

        _parallel_noise(self.params, fill, self.generators)
        self.recorder.clear()
        return self.original.step(closure)


def _parallel_noise(params: list[nn.Parameter], fill: Any, generators: list[torch.Generator]) -> None:
    """``fill(p, generator)`` for every parameter, the largest spread over the secret generators' threads
    (drawing tens of millions of Gaussians takes longer than a plain step of the built-in VAE on a CPU)."""
    if len(generators) == 1 or len(params) == 1:
        for p in params:
            fill(p, generators[0])
        return
    from concurrent.futures import ThreadPoolExecutor

    loads = [0] * len(generators)
    lanes: list[list[nn.Parameter]] = [[] for _ in generators]
    for p in sorted(params, key=lambda q: -q.numel()):
        i = loads.index(min(loads))
        lanes[i].append(p)
        loads[i] += p.numel()
    with ThreadPoolExecutor(len(generators)) as pool:
        list(pool.map(lambda lane: [fill(p, lane[1]) for p in lane[0]], zip(lanes, generators, strict=True)))


def _grad_sample_module(module: nn.Module) -> Any:
    """Opacus' ``GradSampleModule`` (hooks mode) on ``module``, that ignores backward passes through it while its
    parameters were frozen: a GAN's generator step backpropagates through the discriminator with its
    parameters frozen; their forward records no activations, so there is nothing to compute."""
    from opacus.grad_sample import GradSampleModule

    class FrozenSafe(GradSampleModule):
        def capture_backprops_hook(self, module: nn.Module, *args: Any, **kwargs: Any) -> None:
            if not getattr(module, "activations", None):
                return None
            return super().capture_backprops_hook(module, *args, **kwargs)

    return FrozenSafe(module, batch_first=True, loss_reduction="mean", strict=True)


def make_private(generator: Any, optimizers: Mapping[str, torch.optim.Optimizer], noise_multiplier: float,
                 max_grad_norm: float, expected_batch_size: int, *, config: Mapping[str, Any] | None = None,
                 rng: torch.Generator | None = None, engine: str = "auto",
                 sum_over_ranks: Any = None) -> PrivateTraining:
    """Hook per-sample gradients onto the generator's declared private modules and wrap their optimisers in
    Opacus' ``DPOptimizer`` (module docstring). ``noise_multiplier`` is the planned per-batch one (the
    release's); with several private steps per batch each step gets :func:`optimizer_noise_multiplier`.
    Raises :class:`PrivacyError` up front when the type declares no private modules, refuses the
    configuration, or its declaration does not match its optimisers. ``engine``: ``"ghost"``, ``"opacus"``
    or ``"auto"`` (ghost when every private layer allows it; module docstring). ``sum_over_ranks(tensors)``:
    data-parallel ranks that share ``rng`` and each step's Poisson batch (each computing its share of the
    batch) sum their clipped per-clip gradient sums in place with it before the noise, which every rank then
    draws alike: one process's step. It needs the type's one optimiser to be private (with several, a rank
    without rows and one with rows could step them in different orders)."""
    name = type(generator).__name__
    if getattr(type(generator), "fitted", False):
        raise PrivacyError(f"{name} is fitted in closed form: privatise its statistics "
                           "(feda2v_toolkit.privacy.statistics), not its gradients")
    try:
        declared = generator.private_modules(config or {})
    except ValueError as exc:
        raise PrivacyError(f"{name} cannot train with differential privacy in this configuration: {exc}") from None
    if declared is None:
        raise PrivacyError(f"generator type {name} does not support differentially private training: it declares "
                           "no private modules (Generator.private_modules) for per-sample gradients")
    if not (math.isfinite(max_grad_norm) and max_grad_norm > 0):
        raise PrivacyError(f"DP-SGD max_grad_norm must be > 0 (got {max_grad_norm})")
    if not (math.isfinite(noise_multiplier) and noise_multiplier >= 0):
        raise PrivacyError(f"DP-SGD noise multiplier must be >= 0 (got {noise_multiplier})")
    if expected_batch_size < 1:
        raise PrivacyError(f"DP-SGD expected batch size must be >= 1 (got {expected_batch_size})")
    unknown = sorted(set(declared) - set(optimizers))
    if unknown:
        raise PrivacyError(f"{name} declares private modules for optimisers it does not have: {', '.join(unknown)}")
    problem = data_parallel_problem(declared, optimizers) if sum_over_ranks is not None else None
    if problem:
        raise PrivacyError(f"{name}: {problem}; run it in one process")
    rng = rng if rng is not None else secret_generator()
    steps = int(generator.private_steps_per_batch(config or {}))
    step_multiplier = optimizer_noise_multiplier(noise_multiplier, steps)
    wrapped: dict[str, torch.optim.Optimizer] = dict(optimizers)
    hooks = []
    # in-place activations modify the hooked modules' outputs, which backward hooks forbid: same function, copied
    inplace = [m for mods in declared.values() for top in mods for m in top.modules()
               if getattr(m, "inplace", False) is True]
    for m in inplace:
        m.inplace = False
    if engine not in ("auto", "ghost", "opacus"):
        raise PrivacyError(f"unknown DP-SGD engine {engine!r}; use auto, ghost or opacus")

    def undo() -> None:
        for h in hooks:
            h.remove() if isinstance(h, _GhostRecorder) else h.remove_hooks()
        for m in inplace:
            m.inplace = True

    chosen: list[str] = []
    try:
        for opt_name, modules in declared.items():
            opt = optimizers[opt_name]
            module_params = {id(p) for m in modules for p in m.parameters() if p.requires_grad}
            opt_params = {id(p) for g in opt.param_groups for p in g["params"]}
            if module_params != opt_params:
                raise PrivacyError(f"{name}: optimiser {opt_name!r} updates other parameters than its declared "
                                   "private modules hold: every parameter it updates needs per-sample gradients")
            recorder = None
            if engine in ("auto", "ghost"):
                try:
                    recorder = _GhostRecorder(list(modules))
                except NotImplementedError as exc:
                    if engine == "ghost":
                        raise PrivacyError(f"{name}: the ghost engine handles nn.Linear and plain nn.Embedding "
                                           f"layers only, not {exc}") from None
            chosen.append("ghost" if recorder is not None else "opacus")
            if recorder is not None:
                hooks.append(recorder)
                wrapped[opt_name] = _GhostOptimizer(opt, recorder, step_multiplier, max_grad_norm,
                                                    expected_batch_size, rng, sum_over_ranks)
                continue
            try:
                from opacus.optimizers import DPOptimizer
            except ImportError:
                raise PrivacyError("per-sample gradients for these layers need Opacus: pip install "
                                   "'feda2v-tk[privacy]'") from None
            for m in modules:
                hooks.append(_grad_sample_module(m))
            dp_cls = DPOptimizer if sum_over_ranks is None else _ranks_optimizer(DPOptimizer, sum_over_ranks)
            wrapped[opt_name] = dp_cls(opt, noise_multiplier=step_multiplier, max_grad_norm=float(max_grad_norm),
                                       expected_batch_size=int(expected_batch_size), loss_reduction="mean",
                                       generator=rng)
    except PrivacyError:
        undo()
        raise
    except (NotImplementedError, ValueError) as exc:  # Opacus: a module it cannot compute per-sample gradients for
        undo()
        raise PrivacyError(f"{name}: per-sample gradients are not available for its private modules ({exc})") from None
    generator.private_batch_size = int(expected_batch_size)
    return PrivateTraining(generator, wrapped, list(declared), step_multiplier, float(max_grad_norm),
                           int(expected_batch_size), steps, hooks, inplace=inplace,
                           engine="+".join(sorted(set(chosen))))


def data_parallel_problem(declared: Mapping[str, Any], optimizers: Mapping[str, Any]) -> str | None:
    """Why a type's DP-SGD cannot run on several ranks (``None``: it can): the ranks sum their clipped gradients
    into one private optimiser's step; with several, a rank without rows and one with rows could step them in
    different orders, and a non-private one would step on each rank apart."""
    if set(declared) == set(optimizers) and len(declared) == 1:
        return None
    return (f"data-parallel DP-SGD needs one optimiser, and a private one (it has {', '.join(sorted(optimizers))}, "
            f"of which {', '.join(sorted(declared)) or 'none'} private)")


#: parallel lanes of the ghost engine's noise (fixed: the noise does not depend on the number of threads)
NOISE_LANES = 4


def _ranks_optimizer(base: type, sum_over_ranks: Any) -> type:
    """Opacus' ``DPOptimizer`` whose clipped per-clip gradient sums are summed over the ranks before the noise."""

    class RanksDPOptimizer(base):  # type: ignore[misc, valid-type]
        def add_noise(self) -> None:
            sum_over_ranks([p.summed_grad for p in self.params])
            super().add_noise()

    return RanksDPOptimizer


def private_parameters(modules: list[nn.Module]) -> list[nn.Parameter]:
    """The trainable parameters of ``modules`` (each once)."""
    seen: dict[int, nn.Parameter] = {}
    for m in modules:
        for p in m.parameters():
            if p.requires_grad:
                seen.setdefault(id(p), p)
    return list(seen.values())
