"""``realnvp``: a RealNVP normalizing flow over the flattened, normalised reduced sequence.

Unlike the VAE (a lower bound) and the GAN (no likelihood at all), a flow is an invertible map ``f``
from data to a standard normal, trained by exact maximum likelihood::

    log p(x) = log N(f(x); 0, I) + log |det df/dx|

Architecture (``F = seq_len * dim``, ``H = flow_hidden_dim``, ``K = flow_coupling_layers``)::

    x [F] -> affine (learned per-feature shift and log-scale)
          -> K x (fixed permutation -> affine coupling)
          -> z [F] ~ N(0, I)

An affine coupling keeps half of the (permuted) features ``a`` and transforms the other half ``b``:
``b' = b * exp(s(a, c)) + t(a, c)`` with ``s, t`` from an MLP ``(F/2 [+ c]) -> H -> H -> 2 (F - F/2)``;
``s`` is soft-clamped to ``[-flow_scale_clamp, flow_scale_clamp]`` so training cannot blow up, and the
last layer starts at zero so the flow starts as the identity. ``c`` is a learned class embedding
(``flow_conditioned`` with labels) or a projection of per-sample condition embeddings.

The permutations are drawn from a fixed seed at construction and stored as buffers, so a model file
holds everything. Sampling draws ``z ~ N(0, flow_temperature^2 I)`` from the ``torch.Generator``
it is given and inverts the flow exactly. The loss is the negative log-likelihood per element
(``loss = prior + logdet`` terms: ``prior`` is ``-log N(z)`` and ``logdet`` is ``-log |det|``, both
divided by ``F``), so it does not scale with the sequence size.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from feda2v_toolkit.components import Generator, TrainContext

#: Seed of the fixed feature permutations (part of the architecture, not of training).
PERMUTATION_SEED = 20240501
_LOG_2PI = math.log(2 * math.pi)


class _Coupling(nn.Module):
    """One affine coupling: transforms the last ``n - n_keep`` features given the first ``n_keep``."""

    def __init__(self, n: int, hidden: int, cond_dim: int, clamp: float) -> None:
        super().__init__()
        self.n_keep = n // 2
        self.n_change = n - self.n_keep
        self.clamp = clamp
        self.inp = nn.Linear(self.n_keep, hidden)
        self.cond = nn.Linear(cond_dim, hidden, bias=False) if cond_dim else None
        self.body = nn.Sequential(nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU())
        self.out = nn.Linear(hidden, 2 * self.n_change)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def _scale_shift(self, keep: Tensor, c: Tensor | None) -> tuple[Tensor, Tensor]:
        h = self.inp(keep)
        if self.cond is not None:
            h = h + self.cond(c)
        s, t = self.out(self.body(h)).float().chunk(2, dim=-1)
        return self.clamp * torch.tanh(s / self.clamp), t

    def forward(self, x: Tensor, c: Tensor | None) -> tuple[Tensor, Tensor]:
        keep, change = x[:, :self.n_keep], x[:, self.n_keep:]
        s, t = self._scale_shift(keep, c)
        return torch.cat([keep, change * torch.exp(s) + t], dim=-1), s.sum(dim=-1)

    def inverse(self, y: Tensor, c: Tensor | None) -> Tensor:
        keep, changed = y[:, :self.n_keep], y[:, self.n_keep:]
        s, t = self._scale_shift(keep, c)
        return torch.cat([keep, (changed - t) * torch.exp(-s)], dim=-1)


class RealNVPGenerator(Generator):
    """A RealNVP normalizing flow (see the module docstring)."""

    supports_conditioning: ClassVar[bool] = True

    def __init__(self, *, seq_len: int, dim: int, coupling_layers: int, hidden_dim: int, scale_clamp: float = 2.0,
                 temperature: float = 1.0, num_classes: int = 0, condition_dim: int = 0,
                 conditioning: str | None = None, cond_embed_dim: int = 32) -> None:
        super().__init__(seq_len=seq_len, dim=dim, num_classes=num_classes, condition_dim=condition_dim)
        if conditioning not in (None, "label", "embedding"):
            raise ValueError(f"conditioning must be None, 'label' or 'embedding' (got {conditioning!r})")
        if coupling_layers < 1 or hidden_dim < 1 or scale_clamp <= 0 or temperature <= 0:
            raise ValueError("coupling_layers, hidden_dim, scale_clamp and temperature must be positive")
        self.coupling_layers = int(coupling_layers)
        self.hidden_dim = int(hidden_dim)
        self.scale_clamp = float(scale_clamp)
        self.temperature = float(temperature)
        self._conditioning = conditioning
        self.cond_embed_dim = int(cond_embed_dim)
        features = self.seq_len * self.dim
        if features < 2:
            raise ValueError("a coupling flow needs at least 2 features (seq_len * dim >= 2)")
        e = self.cond_embed_dim if conditioning else 0
        if conditioning == "label":
            self.condition: nn.Module | None = nn.Embedding(max(self.num_classes, 1), e)
        elif conditioning == "embedding":
            self.condition = nn.Linear(self.condition_dim, e)
        else:
            self.condition = None
        self.shift = nn.Parameter(torch.zeros(features))
        self.log_scale = nn.Parameter(torch.zeros(features))
        g = torch.Generator().manual_seed(PERMUTATION_SEED)
        for i in range(self.coupling_layers):
            self.register_buffer(f"perm_{i}", torch.randperm(features, generator=g))
        self.couplings = nn.ModuleList(_Coupling(features, self.hidden_dim, e, self.scale_clamp)
                                       for _ in range(self.coupling_layers))

    # -- construction -----------------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: Mapping[str, Any], *, seq_len: int, dim: int, num_classes: int = 0,
                    condition_dim: int = 0) -> RealNVPGenerator:
        conditioning = None
        if config["flow_conditioned"]:
            conditioning = "embedding" if condition_dim > 0 else ("label" if num_classes > 0 else None)
        return cls(seq_len=seq_len, dim=dim, coupling_layers=config["flow_coupling_layers"],
                   hidden_dim=config["flow_hidden_dim"], scale_clamp=config["flow_scale_clamp"],
                   temperature=config["flow_temperature"], num_classes=num_classes,
                   condition_dim=condition_dim, conditioning=conditioning)

    def init_args(self) -> dict[str, Any]:
        return {"seq_len": self.seq_len, "dim": self.dim, "coupling_layers": self.coupling_layers,
                "hidden_dim": self.hidden_dim, "scale_clamp": self.scale_clamp, "temperature": self.temperature,
                "num_classes": self.num_classes, "condition_dim": self.condition_dim,
                "conditioning": self._conditioning, "cond_embed_dim": self.cond_embed_dim}

    @property
    def conditioning(self) -> str | None:
        return self._conditioning

    def configure_optimizers(self, config: Mapping[str, Any]) -> dict[str, torch.optim.Optimizer]:
        return {"flow": torch.optim.AdamW(self.parameters(), lr=config["generator_learning_rate"],
                                          weight_decay=config["generator_weight_decay"])}

    # -- the flow ---------------------------------------------------------------------------------
    def _cond(self, labels: Tensor | None, conditions: Tensor | None, n: int) -> Tensor | None:
        if self.condition is None:
            return None
        if self._conditioning == "label":
            if labels is None or labels.shape != (n,):
                raise ValueError(f"this flow is conditioned on class labels: pass labels of shape [{n}]")
            return self.condition(labels.long())
        if conditions is None or conditions.shape != (n, self.condition_dim):
            raise ValueError(f"this flow is conditioned on condition embeddings: pass [{n}, {self.condition_dim}]")
        return self.condition(conditions.float())

    def _perm(self, i: int) -> Tensor:
        return getattr(self, f"perm_{i}")

    def forward(self, x: Tensor, c: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Data ``[B, seq_len, dim]`` -> latent ``z [B, F]`` and ``log |det dz/dx|`` ``[B]``."""
        h = x.reshape(x.shape[0], -1).float()
        h = (h - self.shift) * torch.exp(-self.log_scale)
        logdet = (-self.log_scale).sum().expand(h.shape[0])
        for i, coupling in enumerate(self.couplings):
            h, ld = coupling(h[:, self._perm(i)], c)
            logdet = logdet + ld
        return h, logdet

    def inverse(self, z: Tensor, c: Tensor | None = None) -> Tensor:
        """Latent ``[B, F]`` -> data ``[B, seq_len, dim]`` (the exact inverse of :meth:`forward`)."""
        h = z
        for i in reversed(range(self.coupling_layers)):
            h = self.couplings[i].inverse(h, c)
            h = h[:, torch.argsort(self._perm(i))]
        h = h * torch.exp(self.log_scale) + self.shift
        return h.view(z.shape[0], self.seq_len, self.dim)

    def log_prob(self, x: Tensor, *, labels: Tensor | None = None, conditions: Tensor | None = None) -> Tensor:
        """Exact log-density of each sequence ``[B]`` (in the normalised space the flow was trained in)."""
        z, logdet = self(x, self._cond(labels, conditions, x.shape[0]))
        return -0.5 * (z.pow(2) + _LOG_2PI).sum(dim=-1) + logdet

    def _terms(self, x: Tensor, labels: Tensor | None, conditions: Tensor | None,
               ctx: TrainContext, *, augment: bool) -> tuple[Tensor, dict[str, float]]:
        config = ctx.config
        if augment and config.get("generator_augmentation"):
            x = x + torch.randn_like(x) * float(config["generator_augmentation_noise"])
        with ctx.autocast():
            z, logdet = self(x, self._cond(labels, conditions, x.shape[0]))
        features = z.shape[1]
        prior = 0.5 * (z.float().pow(2) + _LOG_2PI).sum(dim=-1).mean() / features
        neg_logdet = -logdet.float().mean() / features
        loss = prior + neg_logdet
        return loss, {"loss": loss.item(), "prior": prior.item(), "logdet": neg_logdet.item()}

    def training_step(self, x: Tensor, *, labels: Tensor | None, conditions: Tensor | None,
                      optimizers: Mapping[str, torch.optim.Optimizer], ctx: TrainContext) -> dict[str, float]:
        opt = optimizers["flow"]
        loss, terms = self._terms(x, labels, conditions, ctx, augment=True)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        clip = ctx.config.get("generator_grad_clip")
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(self.parameters(), float(clip))
        opt.step()
        return terms

    def loss_terms(self, x: Tensor, *, labels: Tensor | None, conditions: Tensor | None,
                   ctx: TrainContext) -> dict[str, float]:
        return self._terms(x, labels, conditions, ctx, augment=False)[1]

    @torch.no_grad()
    def sample(self, n: int, *, labels: Tensor | None = None, conditions: Tensor | None = None,
               generator: torch.Generator | None = None) -> Tensor:
        device = self.shift.device
        noise_device = generator.device if generator is not None else device
        z = torch.randn(n, self.seq_len * self.dim, generator=generator, device=noise_device).to(device)
        return self.inverse(z * self.temperature, self._cond(labels, conditions, n))
