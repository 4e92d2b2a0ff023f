"""``vae``: the original FedA2V VAE over flattened reduced sequences, optionally conditioned (CVAE).

Architecture (``F = seq_len * dim``, ``H = generator_hidden_dim``, ``Z = generator_latent_dim``)::

    encoder  F -> H -> H -> 2Z (mu, logvar)      ReLU + dropout after each hidden layer
    decoder  Z -> H -> H -> F

That is ``9,182,720`` parameters at ``l=4, D=768`` (H=1024, Z=256), and the unconditioned state dict has
the original's names (``encoder.{0,3,6}``, ``decoder.{0,3,6}``). A conditioned VAE concatenates a
condition vector ``c`` (``E = Z`` wide: a label embedding, or a linear projection of a per-sample
condition embedding) to the encoder and decoder inputs; the concatenation is computed as a sum of two
projections (``W [x; c] = W_x x + W_c c``), the same function without copying the wide input.

Loss (every term is a per-element mean, so it does not scale with ``seq_len * dim``)::

    loss = mse(recon, x) + beta * kl + generator_cosine_weight * (1 - cos)

* ``kl``: the KL divergence to ``N(0, I)`` summed over latent dims, averaged over the batch and
  divided by ``F`` -- so ``beta = 1`` is the exact negative ELBO (per element) of a Gaussian decoder
  with variance 1/2 on the standardised data.
* ``cos``: cosine similarity **per token** (each ``[dim]`` embedding vector), averaged over tokens and
  batch: downstream consumers read tokens, so each one should point the right way.
* ``beta`` rises linearly from 0 to ``generator_beta`` over the first ``generator_beta_warmup_fraction``
  of training, read from ``ctx.progress`` (so resuming continues the schedule).
* ``generator_augmentation``: the encoder sees ``x + N(0, generator_augmentation_noise^2)`` and the
  reconstruction target stays the clean ``x`` (denoising).
"""

from __future__ import annotations

from collections.abc import Mapping
from itertools import islice
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from feda2v_toolkit.components import TrainContext
from feda2v_toolkit.generators._common import (
    ConditionedMLPGenerator,
    adamw,
    cfg,
    clip,
    conditioning_kind,
    fan_in_groups,
)


def beta_at(progress: float, beta: float, warmup_fraction: float) -> float:
    """KL weight at ``progress`` in [0, 1]: linear from 0 to ``beta`` over ``warmup_fraction``."""
    if warmup_fraction <= 0:
        return float(beta)
    return float(beta) * min(1.0, max(0.0, progress) / warmup_fraction)


def _mlp(sizes: list[int], dropout: float) -> nn.Sequential:
    """Linear layers with ReLU + dropout between them (none after the last)."""
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=False)):
        layers.append(nn.Linear(n_in, n_out))
        if i < len(sizes) - 2:
            layers += [nn.ReLU(inplace=True), nn.Dropout(dropout)]
    return nn.Sequential(*layers)


def _run(net: nn.Sequential, cond: nn.Linear | None, x: Tensor, c: Tensor | None) -> Tensor:
    """``net([x; c])`` computed as ``rest(first(x) + cond(c))``: the concatenation without the copy."""
    h = net[0](x)
    if cond is not None:
        h = h + cond(c)
    for layer in islice(net, 1, None):
        h = layer(h)
    return h


#: latent draws per record of :meth:`VAEGenerator.membership_scores` (seeded: the scores are deterministic)
ELBO_DRAWS = 8


class VAEGenerator(ConditionedMLPGenerator):
    """The FedA2V VAE (see the module docstring for the architecture and loss)."""

    membership_score_name: ClassVar[str] = "ELBO"

    def __init__(self, *, seq_len: int, dim: int, hidden_dim: int, latent_dim: int, dropout: float,
                 num_classes: int = 0, condition_dim: int = 0, conditioning: str | None = None,
                 cond_embed_dim: int | None = None) -> None:
        super().__init__(seq_len=seq_len, dim=dim, hidden_dim=hidden_dim, latent_dim=latent_dim,
                         num_classes=num_classes, condition_dim=condition_dim, conditioning=conditioning,
                         cond_embed_dim=cond_embed_dim)
        self.dropout = float(dropout)
        e = self.embed_width
        flat, h, z = self.seq_len * self.dim, self.hidden_dim, self.latent_dim
        # encoder.{0,3,6} / decoder.{0,3,6}: the original FedA2V state-dict names
        self.encoder = _mlp([flat, h, h, 2 * z], self.dropout)
        self.decoder = _mlp([z, h, h, flat], self.dropout)
        self.encoder_cond = nn.Linear(e, h, bias=False) if e else None
        self.decoder_cond = nn.Linear(e, h, bias=False) if e else None

    # -- construction -----------------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: Mapping[str, Any], *, seq_len: int, dim: int, num_classes: int = 0,
                    condition_dim: int = 0) -> VAEGenerator:
        kind = conditioning_kind(bool(cfg(config, "use_conditioned_vae")), num_classes, condition_dim)
        return cls(seq_len=seq_len, dim=dim, hidden_dim=cfg(config, "generator_hidden_dim"),
                   latent_dim=cfg(config, "generator_latent_dim"), dropout=cfg(config, "generator_dropout"),
                   num_classes=num_classes, condition_dim=condition_dim, conditioning=kind)

    def init_args(self) -> dict[str, Any]:
        return {**super().init_args(), "dropout": self.dropout}

    def configure_optimizers(self, config: Mapping[str, Any]) -> dict[str, torch.optim.Optimizer]:
        lr = cfg(config, "generator_learning_rate")
        return {"vae": adamw(fan_in_groups(self, lr=lr, reference=self.hidden_dim), lr=lr,
                             weight_decay=cfg(config, "generator_weight_decay"))}

    def private_modules(self, config: Mapping[str, Any]) -> dict[str, list[nn.Module]]:
        """DP-SGD: the whole model learns from the batch through the one optimiser ``vae`` (every loss term is
        a batch mean of per-sample terms; dropout and the reparameterisation noise are per sample)."""
        return {"vae": [self]}

    # -- model ------------------------------------------------------------------------------------
    def _cond(self, labels: Tensor | None, conditions: Tensor | None, n: int) -> Tensor | None:
        if self.condition is None:
            return None
        return self.condition(labels, conditions, n, "VAE")

    def encode(self, x: Tensor, c: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``[B, seq_len, dim] -> (mu, logvar)``, each ``[B, Z]``."""
        mu, logvar = _run(self.encoder, self.encoder_cond, x.reshape(x.shape[0], -1), c).chunk(2, dim=-1)
        return mu, logvar

    def decode(self, z: Tensor, c: Tensor | None = None) -> Tensor:
        """``[B, Z] -> [B, seq_len, dim]``."""
        return _run(self.decoder, self.decoder_cond, z, c).view(z.shape[0], self.seq_len, self.dim)

    def forward(self, x: Tensor, c: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Reconstruction and posterior parameters (reparameterised with the global RNG)."""
        mu, logvar = self.encode(x, c)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        return self.decode(z, c), mu, logvar

    def _terms(self, x: Tensor, labels: Tensor | None, conditions: Tensor | None,
               ctx: TrainContext, *, augment: bool) -> tuple[Tensor, dict[str, float]]:
        config = ctx.config
        inp = x
        if augment and cfg(config, "generator_augmentation"):
            inp = x + torch.randn_like(x) * float(cfg(config, "generator_augmentation_noise"))
        with ctx.autocast():
            recon, mu, logvar = self(inp, self._cond(labels, conditions, x.shape[0]))
        recon, mu, logvar = recon.float(), mu.float(), logvar.float()
        mse = F.mse_loss(recon, x)
        kl = -0.5 * torch.sum(1 + logvar - mu.square() - logvar.exp()) / (x.shape[0] * self.seq_len * self.dim)
        cos = F.cosine_similarity(recon, x, dim=-1).mean()
        beta = beta_at(ctx.progress, cfg(config, "generator_beta"), cfg(config, "generator_beta_warmup_fraction"))
        loss = mse + beta * kl + float(cfg(config, "generator_cosine_weight")) * (1 - cos)
        terms = {"loss": loss.item(), "recon": mse.item(), "kl": kl.item(), "cosine": cos.item(), "beta": beta}
        return loss, terms

    def training_step(self, x: Tensor, *, labels: Tensor | None, conditions: Tensor | None,
                      optimizers: Mapping[str, torch.optim.Optimizer], ctx: TrainContext) -> dict[str, float]:
        opt = optimizers["vae"]
        self.train()
        opt.zero_grad(set_to_none=True)
        loss, terms = self._terms(x, labels, conditions, ctx, augment=True)
        loss.backward()
        clip(self.parameters(), cfg(ctx.config, "generator_grad_clip"))
        opt.step()
        return terms

    @torch.no_grad()
    def loss_terms(self, x: Tensor, *, labels: Tensor | None, conditions: Tensor | None,
                   ctx: TrainContext) -> dict[str, float]:
        """Validation terms: clean input, dropout off, the same beta as training at ``ctx.progress``."""
        was_training = self.training
        self.eval()
        try:
            return self._terms(x, labels, conditions, ctx, augment=False)[1]
        finally:
            self.train(was_training)

    @torch.no_grad()
    def membership_scores(self, x: Tensor, *, labels: Tensor | None = None, conditions: Tensor | None = None,
                          config: Mapping[str, Any] | None = None) -> Tensor:
        """The ELBO per element of each record ``[n]`` (float64, higher = better explained): ``-(mse +
        kl / F)`` with ``kl`` the record's KL divergence to ``N(0, I)`` (``beta = 1``: the exact ELBO of the
        Gaussian decoder, up to constants) and ``mse`` averaged over :data:`ELBO_DRAWS` latent draws from a
        generator seeded with 0 -- deterministic, the global RNG untouched. Dropout off, no augmentation."""
        was_training = self.training
        self.eval()
        try:
            n = x.shape[0]
            c = self._cond(labels, conditions, n)
            mu, logvar = self.encode(x, c)
            mu, logvar = mu.float(), logvar.float()
            flat = self.seq_len * self.dim
            kl = -0.5 * torch.sum(1 + logvar - mu.square() - logvar.exp(), dim=1) / flat
            g = torch.Generator(device=x.device).manual_seed(0)
            mse = torch.zeros(n, dtype=torch.float64, device=x.device)
            for _ in range(ELBO_DRAWS):
                eps = torch.randn(mu.shape, generator=g, device=x.device, dtype=mu.dtype)
                recon = self.decode(mu + eps * torch.exp(0.5 * logvar), c).float()
                mse += (recon - x.float()).square().reshape(n, -1).mean(1).double()
            return -(mse / ELBO_DRAWS + kl.double()).cpu()
        finally:
            self.train(was_training)

    @torch.no_grad()
    def sample(self, n: int, *, labels: Tensor | None = None, conditions: Tensor | None = None,
               generator: torch.Generator | None = None) -> Tensor:
        """Decode ``z ~ N(0, I)`` (drawn from ``generator`` only) in eval mode: ``[n, seq_len, dim]``."""
        c = self._cond(labels, conditions, n)
        ref = self.decoder[-1].weight
        z = self.latent_noise(n, generator, ref)
        was_training = self.training
        self.eval()
        try:
            return self.decode(z, c)
        finally:
            self.train(was_training)
