"""Base classes every component implements (imports torch).

Three kinds, all ``torch.nn.Module`` so that weights and fitted state travel through ``state_dict``
into safetensors, and ``.to(device)`` works uniformly:

* :class:`Generator` -- a generative model over *reduced* sequences ``[B, l, D]``.
* :class:`Reducer` -- ``[B, L, D] -> [B, l, D]`` (optionally fitted on training data).
* :class:`Upsampler` -- ``[B, l, D] -> [B, L, D]`` (optionally trained on (reduced, full) pairs).

Every component is rebuilt from ``type(obj)(**obj.init_args())`` plus ``load_state_dict``: that is how
model files are loaded without pickle. So ``init_args`` must return JSON-serialisable values, and all
learned or fitted state must live in parameters or (persistent) buffers.
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn


@dataclass
class TrainContext:
    """Where training stands, passed to :meth:`Generator.training_step`.

    Attributes:
        epoch / total_epochs / step: 0-based epoch, epoch count, global optimisation step.
        progress: runs from 0 at the first step to 1 at the end of the last epoch; generators derive
            schedules (e.g. the VAE's beta warm-up) from it, so resuming never restarts them.
        config: the resolved generator config section (every schema default filled in).
        autocast_dtype: ``torch.bfloat16`` when the config asks for bf16 autocast, else ``None``.
        device: where the batch lives.
    """

    epoch: int
    total_epochs: int
    step: int
    progress: float
    config: Mapping[str, Any] = field(default_factory=dict)
    autocast_dtype: torch.dtype | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """Context for the forward pass: bf16 autocast when configured, else a no-op."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)


class Component(nn.Module):
    """Shared behaviour: a JSON-serialisable constructor signature."""

    def init_args(self) -> dict[str, Any]:
        """Keyword arguments (JSON-serialisable) that rebuild this object with ``type(self)(**args)``."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        try:
            return ", ".join(f"{k}={v!r}" for k, v in self.init_args().items())
        except NotImplementedError:
            return ""


class Generator(Component, abc.ABC):
    """A generative model over reduced, normalised sequences of shape ``[seq_len, dim]``.

    The trainer hands generators standardised data (zero mean, unit variance per position and
    feature) and de-normalises their samples; a generator never sees raw embeddings.

    Subclasses implement :meth:`from_config`, :meth:`init_args`, :meth:`configure_optimizers`,
    :meth:`training_step`, :meth:`loss_terms` and :meth:`sample`. Randomness in training uses the
    global torch RNG (the trainer seeds it and checkpoints its state); :meth:`sample` draws only from
    the ``generator`` it is given, so seeded sampling is reproducible.
    """

    #: True when the type can condition on class labels or condition embeddings.
    supports_conditioning: ClassVar[bool] = False
    #: True when the type is fitted in closed form by :meth:`fit` (the trainer then runs no epochs for it,
    #: and :meth:`configure_optimizers` may return no optimiser).
    fitted: ClassVar[bool] = False
    #: False when the type cannot score records for the membership-inference audit (:meth:`membership_scores`);
    #: ``evaluate`` then says so and runs only the black-box attacks.
    membership_scores_available: ClassVar[bool] = True
    #: what :meth:`membership_scores` computes, as the audit names it
    membership_score_name: ClassVar[str] = "negative loss"
    #: Set by :func:`feda2v_toolkit.privacy.sgd.make_private` while the type trains by DP-SGD: the (public)
    #: expected batch size. Poisson batches vary in size, and their size is not protected: a step must not
    #: use it outside the private modules' per-sample loss (e.g. a GAN draws this many fake samples for its
    #: generator step, not as many as the batch holds).
    private_batch_size: int | None = None

    def __init__(self, *, seq_len: int, dim: int, num_classes: int = 0, condition_dim: int = 0) -> None:
        super().__init__()
        if seq_len < 1 or dim < 1:
            raise ValueError(f"seq_len and dim must be >= 1 (got {seq_len}, {dim})")
        self.seq_len = int(seq_len)
        self.dim = int(dim)
        self.num_classes = int(num_classes)
        self.condition_dim = int(condition_dim)

    @property
    def conditioning(self) -> str | None:
        """``"label"``, ``"embedding"`` or ``None``: what :meth:`sample` must be given."""
        return None

    @property
    def needs_condition(self) -> bool:
        """True if :meth:`sample` requires per-sample condition embeddings."""
        return self.conditioning == "embedding"

    @classmethod
    @abc.abstractmethod
    def from_config(cls, config: Mapping[str, Any], *, seq_len: int, dim: int, num_classes: int = 0,
                    condition_dim: int = 0) -> Generator:
        """Build from a generator config section whose defaults are already filled in.

        ``num_classes`` > 0 and/or ``condition_dim`` > 0 tell a conditioning-capable type what the
        data offers; the config decides whether to use it (e.g. ``use_conditioned_vae``).
        """

    @abc.abstractmethod
    def configure_optimizers(self, config: Mapping[str, Any]) -> dict[str, torch.optim.Optimizer]:
        """Create the optimisers (named, so their state can be checkpointed)."""

    @abc.abstractmethod
    def training_step(self, x: Tensor, *, labels: Tensor | None, conditions: Tensor | None,
                      optimizers: Mapping[str, torch.optim.Optimizer], ctx: TrainContext) -> dict[str, float]:
        """One optimisation step on a batch ``x`` ``[B, seq_len, dim]`` (backward and step included).

        Wrap forward passes in ``ctx.autocast()``. Returns the loss terms as floats, ``"loss"`` first
        (e.g. ``{"loss": ..., "recon": ..., "kl": ...}``).
        """

    @abc.abstractmethod
    def loss_terms(self, x: Tensor, *, labels: Tensor | None, conditions: Tensor | None,
                   ctx: TrainContext) -> dict[str, float]:
        """The same loss terms on a held-out batch, without updating anything (called under ``no_grad``)."""

    def fit(self, x: Tensor, *, labels: Tensor | None = None, conditions: Tensor | None = None,
            seed: int = 0) -> dict[str, float]:
        """Closed-form types (``fitted = True``): fit on all of this generator's training sequences
        ``[n, seq_len, dim]`` at once, deterministically for ``seed``; return JSON-serialisable metrics."""
        raise NotImplementedError(f"{type(self).__name__} is trained by training_step, not fit")

    def private_modules(self, config: Mapping[str, Any]) -> Mapping[str, list[nn.Module]] | None:
        """Differentially private training by DP-SGD (:mod:`feda2v_toolkit.privacy.sgd`): for each optimiser
        (by its :meth:`configure_optimizers` name) whose update reads the training batch, the modules whose
        parameters it updates -- exactly that optimiser's parameters. Opacus computes per-sample gradients
        for them (``nn.Linear``, ``nn.Embedding``, norms, DP recurrent layers...; no buffers, nothing that
        mixes samples such as batch norm), each clipped and noised. Optimisers not named must only
        post-process the private ones (a GAN's generator learns only through its discriminator).

        ``training_step`` must then reduce its loss as a mean over the batch of per-sample terms, and use the
        batch only through the named modules. Return ``None`` (the default) when the type cannot be trained
        this way; raise ``ValueError`` with the reason for a configuration it cannot train privately."""
        return None

    def private_steps_per_batch(self, config: Mapping[str, Any]) -> int:
        """How many private optimiser steps one :meth:`training_step` makes on the same batch (a GAN's critic
        steps): each is accounted (they share one Poisson sample)."""
        return 1

    @abc.abstractmethod
    def sample(self, n: int, *, labels: Tensor | None = None, conditions: Tensor | None = None,
               generator: torch.Generator | None = None) -> Tensor:
        """Draw ``n`` samples ``[n, seq_len, dim]`` (normalised space) at the training length.

        ``labels`` ``[n]`` (long) and ``conditions`` ``[n, condition_dim]`` are given when the model
        is conditioned; all randomness comes from ``generator``.
        """

    @torch.no_grad()
    def membership_scores(self, x: Tensor, *, labels: Tensor | None = None, conditions: Tensor | None = None,
                          config: Mapping[str, Any] | None = None) -> Tensor:
        """Per-record membership score ``[n]`` (float64) of the normalised sequences ``x [n, seq_len, dim]``:
        higher = more likely one of this generator's training records (the white-box attack of ``evaluate``'s
        membership-inference audit, docs/evaluation.md).

        Default: the negative :meth:`loss_terms` ``"loss"`` of each record alone (one call per row, with
        ``config`` -- the resolved generator config -- and ``progress = 1``), computed under a fixed RNG
        seed so that stochastic losses give the same scores every time (the global RNG is restored).
        Types override it with something exact (the gaussian's log-likelihood, the VAE's ELBO, the GAN's
        discriminator); a type that cannot score records sets :attr:`membership_scores_available` to False.
        """
        if not type(self).membership_scores_available:
            raise NotImplementedError(f"{type(self).__name__} cannot score records for membership inference")
        n = x.shape[0]
        ctx = TrainContext(epoch=0, total_epochs=1, step=0, progress=1.0, config=dict(config or {}),
                           device=x.device)
        out = torch.empty(n, dtype=torch.float64)
        was_training = self.training
        self.eval()
        try:
            with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
                for i in range(n):
                    torch.manual_seed(i)
                    terms = self.loss_terms(x[i:i + 1], labels=None if labels is None else labels[i:i + 1],
                                            conditions=None if conditions is None else conditions[i:i + 1], ctx=ctx)
                    out[i] = -float(terms["loss"])
        finally:
            self.train(was_training)
        return out

    def extra_membership_scores(self, x: Tensor, *, labels: Tensor | None = None, conditions: Tensor | None = None,
                                config: Mapping[str, Any] | None = None) -> dict[str, Tensor]:
        """Further white-box attacks this type offers, by name (each ``[n]``, higher = more likely a
        member); the audit runs them next to :meth:`membership_scores`. Default: none."""
        return {}


class Reducer(Component, abc.ABC):
    """Shortens sequences: ``[B, L, D] -> [B, length, D]``."""

    #: True if :meth:`fit` must run on training data before :meth:`forward`.
    fitted: ClassVar[bool] = False
    #: True if output position ``i`` summarises a stretch of the sequence (so interpolating it makes
    #: sense); False for transforms whose reduced axis holds components (e.g. ``pca``): ``analyze`` then
    #: pairs them only with trainable upsamplers.
    positional: ClassVar[bool] = True
    #: True if a sequence with a NaN or inf anywhere always reduces to one with a NaN or inf (an average over
    #: windows covering every position does): a pass that reduces its data then checks the small reduced
    #: sequences for NaN / inf instead of reading the full ones once more. False (the safe default) for
    #: reductions that may drop values (e.g. keep every tenth position).
    propagates_non_finite: ClassVar[bool] = False

    def __init__(self, *, length: int) -> None:
        super().__init__()
        if length < 1:
            raise ValueError(f"reduced length must be >= 1 (got {length})")
        self.length = int(length)

    @classmethod
    def from_config(cls, config: Mapping[str, Any], *, length: int, full_length: int, dim: int) -> Reducer:
        """Build from the config; the default ignores everything but ``length``."""
        return cls(length=length)

    def init_args(self) -> dict[str, Any]:
        return {"length": self.length}

    def fit(self, batches: Callable[[], Iterable[Tensor]]) -> None:  # noqa: B027 - optional hook
        """Fit on full-length training data: ``batches()`` yields float32 ``[B, L, D]`` tensors and may
        be called more than once (one streaming pass per call). Default: nothing to fit."""

    @abc.abstractmethod
    def forward(self, x: Tensor) -> Tensor:
        """``[B, L, D] -> [B, length, D]``."""


class Upsampler(Component, abc.ABC):
    """Lengthens sequences: ``[B, l, D] -> [B, length, D]``."""

    #: True if :meth:`fit` learns something from (reduced, full) pairs.
    trainable: ClassVar[bool] = False

    @classmethod
    def from_config(cls, config: Mapping[str, Any], *, reduced_length: int, full_length: int,
                    dim: int) -> Upsampler:
        """Build from the config; the default takes no settings."""
        return cls()

    def init_args(self) -> dict[str, Any]:
        return {}

    def fit(self, pairs: Callable[[], Iterable[tuple[Tensor, Tensor]]], *,
            config: Mapping[str, Any]) -> dict[str, float]:
        """Train on streamed (reduced ``[B, l, D]``, full ``[B, L, D]``) float32 batches.

        ``pairs()`` may be called once per epoch. Returns metrics (JSON-serialisable floats).
        Default: nothing to learn.
        """
        return {}

    @abc.abstractmethod
    def forward(self, x: Tensor, length: int) -> Tensor:
        """``[B, l, D] -> [B, length, D]``."""

