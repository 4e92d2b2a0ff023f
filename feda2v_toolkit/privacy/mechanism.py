"""The Gaussian mechanism: per-record L2 clipping, and noise from a secret source.

**The noise must be secret.** A run's seed is recorded in the model file (it makes sampling reproducible);
noise drawn from a generator seeded by it could be regenerated and subtracted by anyone holding the file, and
the release would be exact. :func:`secret_generator` seeds a ``torch.Generator`` from 63 bits of the operating
system's randomness (:mod:`secrets`), never recorded anywhere: two runs with the same seed draw different
noise, and nothing in the model file can reproduce it. The same holds for Poisson sampling in DP-SGD (an
attacker who can replay which clips each batch held gets no amplification by sampling). Caveats, documented
in ``docs/privacy.md``: torch's generator is a Mersenne Twister, not a cryptographic generator (its state is
never released -- only noisy sums are; the data-parallel ranks of one site share its seed among themselves),
and sampling Gaussians in floating point (Mironov 2012) is not
hardened against attacks on the low-order bits.

Clipping: :func:`clip_rows` scales each record ``x_i`` (any shape; its L2 norm over all of its numbers) to
``x_i * min(1, C / |x_i|)``. A sum of clipped records then changes by at most ``C`` in L2 when one record is
added or removed -- the sensitivity the release declares.
"""

from __future__ import annotations

import math
import secrets

import torch
from torch import Tensor


def secret_generator(device: str | torch.device = "cpu") -> torch.Generator:
    """A ``torch.Generator`` seeded from the OS's randomness (not from any run seed); see the module docstring."""
    g = torch.Generator(device=device)
    g.manual_seed(secrets.randbits(63))
    return g


def row_norms(x: Tensor) -> Tensor:
    """L2 norm of each record ``x[i]`` over all its numbers, as float64 ``[n]`` (computed in the input's
    precision: float32 records' norms are within ~1e-6 relative, which clipping in float32 leaves a margin
    for -- :data:`feda2v_toolkit.privacy.statistics.FLOAT32_MARGIN`)."""
    flat = x.reshape(x.shape[0], -1)
    if flat.dtype not in (torch.float32, torch.float64):
        flat = flat.float()
    return torch.linalg.vector_norm(flat, dim=1).double()


def clip_factors(norms: Tensor, max_norm: float) -> Tensor:
    """``min(1, C / |x_i|)`` (1 for zero rows)."""
    if not (math.isfinite(max_norm) and max_norm > 0):
        raise ValueError(f"clip norm must be positive and finite, got {max_norm}")
    return (max_norm / norms.clamp(min=1e-300)).clamp(max=1.0)


def clip_rows(x: Tensor, max_norm: float) -> Tensor:
    """Each record ``x[i]`` scaled to an L2 norm of at most ``max_norm`` (float64, same shape)."""
    x = x.double()
    f = clip_factors(row_norms(x), max_norm)
    return x * f.view(-1, *([1] * (x.dim() - 1)))


def gaussian_noise(shape: tuple[int, ...] | torch.Size, std: float, rng: torch.Generator) -> Tensor:
    """``N(0, std^2)`` float64 noise of ``shape`` drawn from ``rng`` (use :func:`secret_generator`)."""
    if rng is None:
        raise ValueError("differential-privacy noise needs an explicit secret generator (secret_generator())")
    if std == 0:
        return torch.zeros(tuple(shape), dtype=torch.float64)
    return torch.randn(tuple(shape), generator=rng, dtype=torch.float64, device=rng.device).cpu() * float(std)


def add_noise(values: Tensor, std: float, rng: torch.Generator) -> Tensor:
    """``values + N(0, std^2 I)`` in float64 (``std = noise_multiplier * sensitivity``)."""
    if not (math.isfinite(std) and std >= 0):
        raise ValueError(f"noise std must be finite and >= 0, got {std}")
    v = values.detach().to("cpu", torch.float64)
    return v + gaussian_noise(v.shape, std, rng)


def add_symmetric_noise(values: Tensor, std: float, rng: torch.Generator) -> Tensor:
    """Analyze Gauss: symmetric matrices ``[..., d, d]`` plus symmetric noise ``E``: the upper triangle and the
    diagonal i.i.d. ``N(0, std^2)``, mirrored. ``std`` is set for the Frobenius sensitivity of the matrix (the
    per-record ``x x^T`` has ``|x x^T|_F = |x|^2``). Releasing the upper triangle is the whole release: the
    lower triangle is a copy, so it costs nothing more."""
    if not (math.isfinite(std) and std >= 0):
        raise ValueError(f"noise std must be finite and >= 0, got {std}")
    v = values.detach().to("cpu", torch.float64)
    if v.dim() < 2 or v.shape[-1] != v.shape[-2]:
        raise ValueError(f"expected square matrices [..., d, d], got {tuple(v.shape)}")
    noise = gaussian_noise(v.shape, std, rng)
    upper = torch.triu(noise)
    return v + upper + torch.triu(noise, diagonal=1).transpose(-1, -2)
