"""``gan``: an MLP GAN over flattened reduced sequences, optionally conditioned.

* generator ``G``: noise ``Z -> H -> H -> seq_len*dim`` (ReLU), linear output (the data is standardised);
* discriminator ``D``: ``seq_len*dim -> H -> H -> 1`` (LeakyReLU 0.2).

Recipe: the non-saturating logistic loss (default ``gan_loss``; ``hinge`` is the alternative) with an
R1 gradient penalty on real data (``gan_r1_weight / 2 * E ||grad_x D(x)||^2``, Mescheder et al., 2018),
one discriminator step per generator step, AdamW with ``gan_adam_betas`` (default ``(0.5, 0.999)``).
Measured on tiny toy sets (128 standardised samples, 400 steps, H=64): with R1 (gamma 1-10) the sample
mean/std gaps fall to ~0.01-0.05 and generated samples cover both modes of a two-class set (gamma 0.1
collapsed); a spectrally normalised discriminator without R1 (hinge or non-saturating, with or without
a minibatch-stddev feature) collapsed onto one mode in 4 of 5 such runs, keeping mean gaps of ~1.
WGAN-GP also covered both modes but needs 5 critic steps with a double backward each; R1 needs one
double backward on the real batch (about +40% per step at l=32, H=1024, batch 256 on CPU;
``gan_r1_weight: 0`` turns it off).

Conditioning (``gan_conditioned``): on the class label, or on per-sample condition embeddings when the
data has them; ``G`` sees ``[z; c]`` and ``D`` is a projection discriminator
(``D(x, c) = w.h(x) + <e(c), h(x)>``, Miyato & Koyama, 2018). ``generator_augmentation`` adds Gaussian
instance noise to both real and generated inputs of ``D``.

Reported terms (training and validation alike): ``loss`` (= ``g_loss``, the generator's objective),
``g_loss``, ``d_loss`` (adversarial part), ``r1``, ``d_accuracy`` (share of real scored > 0 and fake
< 0) and ``moment_gap``: the mean squared gap between generated and real per-element means plus that
between per-element standard deviations -- 0 when the first two moments match; a validation score that
does not depend on ``D``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from feda2v_toolkit.components import TrainContext
from feda2v_toolkit.generators._common import (
    Condition,
    ConditionedMLPGenerator,
    adamw,
    cfg,
    clip,
    conditioning_kind,
    fan_in_groups,
)


def d_loss_fn(kind: str, real: Tensor, fake: Tensor) -> Tensor:
    """Discriminator loss on real and fake scores."""
    if kind == "hinge":
        return F.relu(1 - real).mean() + F.relu(1 + fake).mean()
    return F.softplus(-real).mean() + F.softplus(fake).mean()


def g_loss_fn(kind: str, fake: Tensor) -> Tensor:
    """Generator loss on the discriminator's scores of generated samples."""
    return -fake.mean() if kind == "hinge" else F.softplus(-fake).mean()


def moment_gap(fake: Tensor, real: Tensor) -> Tensor:
    """Mean squared gap of per-element means plus that of per-element standard deviations."""
    fake, real = fake.flatten(1).float(), real.flatten(1).float()
    mean_gap = (fake.mean(0) - real.mean(0)).square().mean()
    std_gap = (fake.std(0, unbiased=False) - real.std(0, unbiased=False)).square().mean()
    return mean_gap + std_gap


class _Discriminator(nn.Module):
    """MLP critic with an optional projection term for the condition vector."""

    def __init__(self, flat: int, hidden: int, cond_dim: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(flat, hidden), nn.LeakyReLU(0.2),
                                  nn.Linear(hidden, hidden), nn.LeakyReLU(0.2))
        self.head = nn.Linear(hidden, 1)
        self.project = nn.Linear(cond_dim, hidden, bias=False) if cond_dim > 0 else None

    def forward(self, x: Tensor, c: Tensor | None = None) -> Tensor:
        h = self.body(x)
        score = self.head(h).squeeze(-1)
        if self.project is not None:
            score = score + (self.project(c) * h).sum(-1)
        return score


class GANGenerator(ConditionedMLPGenerator):
    """MLP GAN (non-saturating or hinge loss, R1 penalty, projection discriminator); see the module docstring."""

    membership_score_name: ClassVar[str] = "discriminator"

    def __init__(self, *, seq_len: int, dim: int, hidden_dim: int, latent_dim: int, num_classes: int = 0,
                 condition_dim: int = 0, conditioning: str | None = None,
                 cond_embed_dim: int | None = None) -> None:
        super().__init__(seq_len=seq_len, dim=dim, hidden_dim=hidden_dim, latent_dim=latent_dim,
                         num_classes=num_classes, condition_dim=condition_dim, conditioning=conditioning,
                         cond_embed_dim=cond_embed_dim)
        e = self.embed_width
        flat, h, z = self.seq_len * self.dim, self.hidden_dim, self.latent_dim
        self.d_condition = (Condition(conditioning, num_classes=self.num_classes, condition_dim=self.condition_dim,
                                      out_dim=h) if conditioning else None)
        self.generator = nn.Sequential(nn.Linear(z + e, h), nn.ReLU(inplace=True), nn.Linear(h, h),
                                       nn.ReLU(inplace=True), nn.Linear(h, flat))
        self.discriminator = _Discriminator(flat, h, h if conditioning else 0)

    # -- construction -----------------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: Mapping[str, Any], *, seq_len: int, dim: int, num_classes: int = 0,
                    condition_dim: int = 0) -> GANGenerator:
        kind = conditioning_kind(bool(cfg(config, "gan_conditioned")), num_classes, condition_dim)
        return cls(seq_len=seq_len, dim=dim, hidden_dim=cfg(config, "generator_hidden_dim"),
                   latent_dim=cfg(config, "generator_latent_dim"), num_classes=num_classes,
                   condition_dim=condition_dim, conditioning=kind)

    def generator_parameters(self) -> list[nn.Parameter]:
        mods = [self.generator] + ([self.condition] if self.condition is not None else [])
        return [p for m in mods for p in m.parameters()]

    def discriminator_parameters(self) -> list[nn.Parameter]:
        mods = [self.discriminator] + ([self.d_condition] if self.d_condition is not None else [])
        return [p for m in mods for p in m.parameters()]

    def configure_optimizers(self, config: Mapping[str, Any]) -> dict[str, torch.optim.Optimizer]:
        g_lr = cfg(config, "generator_learning_rate")
        d_lr = cfg(config, "gan_discriminator_learning_rate") or g_lr
        wd, betas = cfg(config, "generator_weight_decay"), tuple(cfg(config, "gan_adam_betas"))
        h = self.hidden_dim
        return {"generator": adamw(fan_in_groups([self.generator, self.condition], lr=g_lr, reference=h),
                                   lr=g_lr, weight_decay=wd, betas=betas),
                "discriminator": adamw(fan_in_groups([self.discriminator, self.d_condition], lr=d_lr, reference=h),
                                       lr=d_lr, weight_decay=wd, betas=betas)}

    def private_modules(self, config: Mapping[str, Any]) -> dict[str, list[nn.Module]]:
        """DP-SGD: only the discriminator (and its condition embedding) reads real data; the generator learns
        through it (post-processing) from ``private_batch_size`` fake samples with uniformly drawn labels."""
        if float(cfg(config, "gan_r1_weight")) > 0:
            raise ValueError("the gan's R1 penalty needs a double backward that per-sample gradients (Opacus) do "
                             "not support: set gan_r1_weight to 0 for differentially private training")
        if self.conditioning == "embedding":
            raise ValueError("a gan conditioned on per-sample condition embeddings cannot train privately: its "
                             "generator step would read the clips' conditions; use label conditioning or none")
        return {"discriminator": [self.discriminator] + ([self.d_condition] if self.d_condition is not None else [])}

    def private_steps_per_batch(self, config: Mapping[str, Any]) -> int:
        return int(cfg(config, "gan_critic_steps"))

    # -- model ------------------------------------------------------------------------------------
    def _conds(self, labels: Tensor | None, conditions: Tensor | None,
               n: int) -> tuple[Tensor | None, Tensor | None]:
        if self.condition is None or self.d_condition is None:
            return None, None
        return (self.condition(labels, conditions, n, "GAN"), self.d_condition(labels, conditions, n, "GAN"))

    def generate(self, z: Tensor, c: Tensor | None = None) -> Tensor:
        """Noise ``[B, Z]`` (and condition vector) -> ``[B, seq_len, dim]``."""
        inp = z if c is None else torch.cat([z, c.to(z.dtype)], dim=-1)
        return self.generator(inp).view(z.shape[0], self.seq_len, self.dim)

    def score(self, x: Tensor, c: Tensor | None, config: Mapping[str, Any], *, noisy: bool) -> Tensor:
        """Discriminator scores ``[B]`` (instance noise when ``noisy`` and augmentation is on)."""
        x = x.reshape(x.shape[0], -1)
        if noisy and cfg(config, "generator_augmentation"):
            x = x + torch.randn_like(x) * float(cfg(config, "generator_augmentation_noise"))
        return self.discriminator(x, c)

    def _fake(self, n: int, cg: Tensor | None, like: Tensor) -> Tensor:
        return self.generate(torch.randn(n, self.latent_dim, device=like.device, dtype=like.dtype), cg)

    def _d_terms(self, x: Tensor, labels: Tensor | None, conditions: Tensor | None, ctx: TrainContext,
                 *, noisy: bool) -> tuple[Tensor, dict[str, Tensor]]:
        """Discriminator objective (adversarial + R1) on ``x`` and a fresh fake batch."""
        config, n = ctx.config, x.shape[0]
        gamma = float(cfg(config, "gan_r1_weight"))
        with ctx.autocast():
            cg, cd = self._conds(labels, conditions, n)
            with torch.no_grad():
                fake = self._fake(n, cg.detach() if cg is not None else None, x)
            real = x.detach().reshape(n, -1).requires_grad_(gamma > 0)
            real_s = self.score(real, cd, config, noisy=noisy).float()
            fake_s = self.score(fake, cd, config, noisy=noisy).float()
        adv = d_loss_fn(cfg(config, "gan_loss"), real_s, fake_s)
        r1 = torch.zeros((), device=x.device)
        if gamma > 0:
            (grad,) = torch.autograd.grad(real_s.sum(), real, create_graph=self.training)
            r1 = grad.float().square().sum(1).mean()
        acc = ((real_s > 0).float().mean() + (fake_s < 0).float().mean()) / 2
        return adv + gamma / 2 * r1, {"d_loss": adv, "r1": r1, "d_accuracy": acc, "fake": fake}

    def _report(self, g_loss: Tensor, d: dict[str, Tensor], x: Tensor, fake: Tensor) -> dict[str, float]:
        terms = {"loss": g_loss.item(), "g_loss": g_loss.item()}
        terms |= {k: float(d[k].detach()) for k in ("d_loss", "r1", "d_accuracy")}
        terms["moment_gap"] = moment_gap(fake.detach(), x).item()
        return terms

    def training_step(self, x: Tensor, *, labels: Tensor | None, conditions: Tensor | None,
                      optimizers: Mapping[str, torch.optim.Optimizer], ctx: TrainContext) -> dict[str, float]:
        config = ctx.config
        g_opt, d_opt = optimizers["generator"], optimizers["discriminator"]
        clip_at = cfg(config, "generator_grad_clip")
        d_params = self.discriminator_parameters()
        self.train()
        for _ in range(int(cfg(config, "gan_critic_steps"))):
            d_opt.zero_grad(set_to_none=True)
            d_obj, d_terms = self._d_terms(x, labels, conditions, ctx, noisy=True)
            d_obj.backward()
            clip(d_params, clip_at)
            d_opt.step()

        g_opt.zero_grad(set_to_none=True)
        g_labels, g_n = labels, x.shape[0]
        if self.private_batch_size is not None:  # DP-SGD: nothing of the batch (not even its size) reaches G
            g_n = int(self.private_batch_size)
            g_labels = (torch.randint(self.num_classes, (g_n,), device=x.device)
                        if self.conditioning == "label" else None)
        for p in d_params:  # G's backward goes through D; no weight gradients needed there
            p.requires_grad_(False)
        try:
            with ctx.autocast():
                cg, cd = self._conds(g_labels, conditions if self.private_batch_size is None else None, g_n)
                fake = self._fake(g_n, cg, x)
                g_loss = g_loss_fn(cfg(config, "gan_loss"), self.score(fake, cd, config, noisy=True).float())
            g_loss.backward()
        finally:
            for p in d_params:
                p.requires_grad_(True)
        clip(self.generator_parameters(), clip_at)
        g_opt.step()
        if self.private_batch_size is not None:  # the moment gap would read the private batch
            terms = {"loss": g_loss.item(), "g_loss": g_loss.item()}
            return terms | {k: float(d_terms[k].detach()) for k in ("d_loss", "r1", "d_accuracy")}
        return self._report(g_loss, d_terms, x, fake)

    @torch.no_grad()
    def loss_terms(self, x: Tensor, *, labels: Tensor | None, conditions: Tensor | None,
                   ctx: TrainContext) -> dict[str, float]:
        """The training terms on a held-out batch (no instance noise, nothing updated)."""
        was_training = self.training
        self.eval()
        try:
            with torch.enable_grad():  # R1 needs d D / d x
                _, d_terms = self._d_terms(x, labels, conditions, ctx, noisy=False)
            with ctx.autocast():
                cg, cd = self._conds(labels, conditions, x.shape[0])
                fake = self._fake(x.shape[0], cg, x)
                g_loss = g_loss_fn(cfg(ctx.config, "gan_loss"), self.score(fake, cd, ctx.config, noisy=False).float())
        finally:
            self.train(was_training)
        return self._report(g_loss, d_terms, x, fake)

    @torch.no_grad()
    def membership_scores(self, x: Tensor, *, labels: Tensor | None = None, conditions: Tensor | None = None,
                          config: Mapping[str, Any] | None = None) -> Tensor:
        """The discriminator's score of each record ``[n]`` (float64; no instance noise, eval mode): the
        discriminator saw the training records as "real" at every step, so it may score them higher."""
        was_training = self.training
        self.eval()
        try:
            _, cd = self._conds(labels, conditions, x.shape[0])
            return self.discriminator(x.reshape(x.shape[0], -1), cd).double().cpu()
        finally:
            self.train(was_training)

    @torch.no_grad()
    def sample(self, n: int, *, labels: Tensor | None = None, conditions: Tensor | None = None,
               generator: torch.Generator | None = None) -> Tensor:
        """``G(z)`` with ``z ~ N(0, I)`` drawn from ``generator`` only: ``[n, seq_len, dim]``."""
        cg, _ = self._conds(labels, conditions, n)
        ref = self.generator[-1].weight
        z = self.latent_noise(n, generator, ref)
        return self.generate(z, cg)
