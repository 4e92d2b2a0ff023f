"""The original FedA2V generator training step, shared by the benchmarks that use it as their reference."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def original_step(vae, opt: torch.optim.Optimizer, x: torch.Tensor) -> float:
    """One step of the original loop on ``x`` ``[1, l, D]`` (raw, reduced): input noise 0.1, loss MSE + KL
    (summed over the latent, per sample) + 0.1 * (1 - cosine of the flattened sequence), plain AdamW,
    gradient-norm clipping at 5. Returns the loss."""
    stats = vae.encoder((x + 0.1 * torch.randn_like(x)).flatten(1))
    mu, logvar = stats.chunk(2, dim=1)
    z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
    recon = vae.decoder(z).view_as(x)
    kl = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp()) / x.shape[0]
    cos = 1 - F.cosine_similarity(recon.flatten(1), x.flatten(1)).mean()
    loss = F.mse_loss(recon, x) + kl + 0.1 * cos
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(vae.parameters(), 5.0)
    opt.step()
    return float(loss.detach())
