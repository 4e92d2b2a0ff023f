"""``learned``: a trained residual correction over linear interpolation.

``out = linear(x, L) + W @ x + B``, with ``W`` ``[L, l]`` mixing the reduced positions into every full
position and ``B`` ``[L, D]`` a per-position bias. AST embeddings carry strong per-position structure
(summary tokens, frequency rows) that pooling averages away; ``B`` restores its mean and ``W`` how much
of each reduced token shows at each full position. Both start at zero, so an untrained upsampler *is*
linear interpolation (bit for bit).

:meth:`LearnedUpsampler.fit` streams (reduced, full) pairs and holds out about a fraction
``f = generator_validation_split`` of the samples, chosen by a hash of each reduced sample's bits: the
same samples on every pass, whatever order or batching ``pairs()`` uses (the trainer reshuffles).
Pass 0 scores linear interpolation and gathers per-position statistics of the training samples for a
closed-form warm start: per position ``p``, ``residual ~ a_p * (linear - mean) + mean residual`` (one
slope ``a_p`` shared by all features), each part shrunk towards zero by a James-Stein factor so that
estimates from few, noisy samples do not add noise. Then ``generator_upsampler_epochs`` passes of
Adam (``generator_upsampler_learning_rate``) over the training samples refine ``W`` and ``B``; each
pass also scores the state the previous one reached (one streaming pass per epoch, plus one to score
the last). The best state on held-out data is kept, linear interpolation (zero) included, so ``fit``
never returns anything worse than linear there. With ``f = 0`` (or when every sample of a tiny set
hashes out) nothing is held out and the same selection runs on the training samples. Metrics: ``heldout_mse_linear`` / ``heldout_mse_learned`` and
``heldout_r2_*`` (about the per-position-and-feature mean; ``train_*`` when nothing is held out),
sample counts, and ``best_epoch`` (-1: linear kept, 0: the warm start, e: after e epochs).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from feda2v_toolkit.components import Upsampler
from feda2v_toolkit.upsamplers.interpolate import interpolate_sequence


def linear_interpolate(x: Tensor, length: int) -> Tensor:
    """``[B, l, D] -> [B, length, D]`` exactly as the ``linear`` upsampler computes it."""
    return interpolate_sequence(x, length, "linear")


def _mix64(h: Tensor) -> Tensor:
    """splitmix64's finaliser on int64 (wrapping arithmetic)."""
    h = h ^ ((h >> 30) & 0x3FFFFFFFF)
    h = h * -4658895280553007687  # 0xBF58476D1CE4E5B9
    h = h ^ ((h >> 27) & 0x1FFFFFFFFF)
    h = h * -7723592293110705685  # 0x94D049BB133111EB
    return h ^ ((h >> 31) & 0x1FFFFFFFF)


def heldout_rows(reduced: Tensor, fraction: float) -> Tensor:
    """``[B]`` bool: which samples are held out, decided by a hash of each reduced sample's bits.

    The same sample is always held out or always trained on, however ``pairs()`` orders or batches
    the data (the trainer reshuffles it on every call); about ``fraction`` of the samples are held out.
    """
    n = reduced.shape[0]
    if fraction <= 0 or n == 0:
        return torch.zeros(n, dtype=torch.bool, device=reduced.device)
    bits = reduced.detach().to(torch.float32).reshape(n, -1).contiguous().view(torch.int32).to(torch.int64)
    g = torch.Generator().manual_seed(0x5EED)
    weights = torch.randint(-(2**62), 2**62, (bits.shape[1],), generator=g, dtype=torch.int64) | 1
    h = _mix64((_mix64(bits) * weights.to(bits.device)).sum(1))  # integer sums: exact in any order
    u = ((h >> 11) & ((1 << 53) - 1)).double() / float(1 << 53)
    return u < fraction


class _Moments:
    """Running per-(position, feature) sums of residual ``r`` and interpolation ``q``, in float64."""

    def __init__(self, length: int, dim: int) -> None:
        self.n = 0
        self.r, self.q, self.rq, self.qq, self.rr = (torch.zeros(length, dim, dtype=torch.float64)
                                                     for _ in range(5))

    def add(self, residual: Tensor, lin: Tensor) -> None:
        self.n += residual.shape[0]
        for acc, t in ((self.r, residual), (self.q, lin), (self.rq, residual * lin),
                       (self.qq, lin.square()), (self.rr, residual.square())):
            acc += t.sum(0).double().cpu()

    def warm_start(self) -> tuple[Tensor, Tensor]:
        """Per-position correction ``k_a a_p (q - mean_q) + k_b mean_r`` of the residual.

        ``a_p`` is the least-squares slope of the residual on the interpolation at position ``p`` (one
        scalar shared by all features); ``k_a``, ``k_b`` in [0, 1] are James-Stein shrinkage factors
        ``max(0, 1 - estimation variance / squared estimate)``, so that a noisy estimate from few
        samples is pulled towards zero (linear) rather than added as noise. Returns ``(slope [L],
        bias [L, D])`` with the correction ``slope_p * q + bias``.
        """
        n = max(self.n, 1)
        mr, mq = self.r / n, self.q / n
        s_rq = (self.rq - n * mr * mq).sum(1)
        s_qq = (self.qq - n * mq * mq).sum(1)
        s_rr = (self.rr - n * mr * mr).sum(1)
        a = torch.where(s_qq > 1e-12, s_rq / s_qq.clamp(min=1e-12), torch.zeros_like(s_qq))
        elements = n * mr.shape[1]
        resid_var = (s_rr - a * s_rq).clamp(min=0) / max(elements - 1, 1)
        var_a = resid_var / s_qq.clamp(min=1e-12)
        k_a = (1 - var_a / a.square().clamp(min=1e-30)).clamp(min=0)
        var_mean = (s_rr / max(elements - mr.shape[1], 1)) / n  # variance of each per-element mean
        k_b = (1 - var_mean / mr.square().mean(1).clamp(min=1e-30)).clamp(min=0)
        slope = k_a * a
        return slope, k_b.unsqueeze(1) * mr - slope.unsqueeze(1) * mq


class LearnedUpsampler(Upsampler):
    """Residual correction over linear interpolation (see the module docstring)."""

    trainable: ClassVar[bool] = True
    #: Start Adam from the closed-form per-position warm start (False: from zero, i.e. linear).
    warm_start: ClassVar[bool] = True

    def __init__(self, *, reduced_length: int, full_length: int, dim: int) -> None:
        super().__init__()
        if min(reduced_length, full_length, dim) < 1:
            raise ValueError("reduced_length, full_length and dim must be >= 1")
        self.reduced_length, self.full_length, self.dim = int(reduced_length), int(full_length), int(dim)
        self.mix = nn.Parameter(torch.zeros(self.full_length, self.reduced_length))  # W
        self.bias = nn.Parameter(torch.zeros(self.full_length, self.dim))  # B

    @classmethod
    def from_config(cls, config: Mapping[str, Any], *, reduced_length: int, full_length: int,
                    dim: int) -> LearnedUpsampler:
        return cls(reduced_length=reduced_length, full_length=full_length, dim=dim)

    def init_args(self) -> dict[str, Any]:
        return {"reduced_length": self.reduced_length, "full_length": self.full_length, "dim": self.dim}

    # -- inference ----------------------------------------------------------------------------------
    def full(self, x: Tensor) -> Tensor:
        """``[B, l, D] -> [B, full_length, D]`` with the correction."""
        if x.dim() != 3 or x.shape[1] != self.reduced_length or x.shape[2] != self.dim:
            raise ValueError(f"expected [B, {self.reduced_length}, {self.dim}], got {tuple(x.shape)}")
        return self._correct({"mix": self.mix, "bias": self.bias}, x)

    def forward(self, x: Tensor, length: int) -> Tensor:
        """Corrected at ``full_length``. Another ``length`` is resampled linearly from the corrected
        full-length sequence; ``length == l`` returns ``x`` unchanged (no upsampling)."""
        if x.dim() == 3 and x.shape[1] == length:
            return x
        out = self.full(x)
        return out if length == self.full_length else linear_interpolate(out, length)

    # -- training -----------------------------------------------------------------------------------
    def fit(self, pairs: Callable[[], Iterable[tuple[Tensor, Tensor]]], *,
            config: Mapping[str, Any]) -> dict[str, float]:
        epochs = int(config["generator_upsampler_epochs"])
        lr = float(config["generator_upsampler_learning_rate"])
        fraction = float(config["generator_validation_split"])

        from feda2v_toolkit.runtime.progress import activity

        with activity("fitting the learned upsampler", epochs + 2, unit="pass") as passes:
            return self._fit(pairs, epochs, lr, fraction, passes)

    def _fit(self, pairs: Callable[[], Iterable[tuple[Tensor, Tensor]]], epochs: int, lr: float, fraction: float,
             passes: Any) -> dict[str, float]:
        moments, groups = self._pass0(pairs, fraction)
        if groups["train"].n == 0 and groups["heldout"].n > 0:  # tiny data, every sample hashed out
            fraction = 0.0
            moments, groups = self._pass0(pairs, fraction)
        passes.update()
        if groups["train"].n == 0:
            raise ValueError("no training pairs to fit the learned upsampler on")
        prefix = "heldout" if groups["heldout"].n > 0 else "train"  # nothing held out: select on train
        scored = groups[prefix]

        slope, bias = moments.warm_start()
        best_name, best_score = "linear", scored.sse / scored.elements
        best_state = {k: torch.zeros_like(v) for k, v in self.state_dict().items()}
        linear_score = best_score
        if self.warm_start:
            with torch.no_grad():
                self.mix.copy_(slope.unsqueeze(1).to(self.mix) * self._interp_matrix())
                self.bias.copy_(bias.float())

        opt = torch.optim.Adam(self.parameters(), lr=lr)
        for epoch in range(epochs + 1):  # pass e scores the state after e epochs and trains epoch e + 1
            snapshot = {k: v.detach().clone() for k, v in self.state_dict().items()}
            sse = 0.0
            for reduced, full, held in self._stream(pairs, fraction):
                score_rows = held if prefix == "heldout" else ~held
                if score_rows.any():
                    with torch.no_grad():
                        pred = self._correct(snapshot, _rows(reduced, score_rows))
                        sse += F.mse_loss(pred, _rows(full, score_rows), reduction="sum").item()
                if epoch < epochs and (~held).any():
                    opt.zero_grad(set_to_none=True)
                    F.mse_loss(self.full(_rows(reduced, ~held)), _rows(full, ~held)).backward()
                    opt.step()
            if sse / scored.elements < best_score:  # strictly better: ties keep the simpler state
                best_name, best_score, best_state = f"epoch_{epoch}", sse / scored.elements, snapshot
            passes.update()
        self.load_state_dict(best_state)
        metrics = {
            f"{prefix}_mse_linear": linear_score,
            f"{prefix}_mse_learned": best_score,
            "heldout_samples": float(groups["heldout"].n),
            "train_samples": float(groups["train"].n),
            "best_epoch": -1.0 if best_name == "linear" else float(best_name.removeprefix("epoch_")),
        }
        sst = scored.sst()
        if sst > 0:
            metrics[f"{prefix}_r2_linear"] = 1.0 - linear_score * scored.elements / sst
            metrics[f"{prefix}_r2_learned"] = 1.0 - best_score * scored.elements / sst
        return metrics

    # -- helpers ------------------------------------------------------------------------------------
    def _pass0(self, pairs: Callable[[], Iterable[tuple[Tensor, Tensor]]],
               fraction: float) -> tuple[_Moments, dict[str, _Totals]]:
        """Linear interpolation scored on both groups; warm-start statistics of the training group."""
        moments = _Moments(self.full_length, self.dim)
        groups = {"train": _Totals(), "heldout": _Totals()}
        for reduced, full, held in self._stream(pairs, fraction):
            with torch.no_grad():
                lin = linear_interpolate(reduced, self.full_length)
                residual = full - lin
            for name, rows in (("heldout", held), ("train", ~held)):
                if rows.any():
                    groups[name].add(residual[rows], full[rows])
            if (~held).any():
                moments.add(residual[~held], lin[~held])
        return moments, groups

    def _correct(self, state: Mapping[str, Tensor], x: Tensor) -> Tensor:
        """``linear(x) + W @ x + B`` (summed in place into the mixing product: one full-size buffer)."""
        out = torch.einsum("pl,bld->bpd", state["mix"].to(x.dtype), x)
        return out.add_(linear_interpolate(x, self.full_length)).add_(state["bias"].to(x.dtype))

    def _interp_matrix(self) -> Tensor:
        """``P [L, l]`` with ``linear(x) = P @ x`` (so ``W = diag(a) P`` adds ``a_p * linear_p``)."""
        eye = torch.eye(self.reduced_length, device=self.bias.device).unsqueeze(0)  # l one-hot features
        return linear_interpolate(eye, self.full_length)[0]

    def _stream(self, pairs: Callable[[], Iterable[tuple[Tensor, Tensor]]],
                fraction: float) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        device = self.bias.device
        for reduced, full in pairs():
            if (reduced.shape[0] != full.shape[0] or tuple(reduced.shape[1:]) != (self.reduced_length, self.dim)
                    or tuple(full.shape[1:]) != (self.full_length, self.dim)):
                raise ValueError(f"pairs must be ([B, {self.reduced_length}, {self.dim}], "
                                 f"[B, {self.full_length}, {self.dim}]); got {tuple(reduced.shape)}, "
                                 f"{tuple(full.shape)}")
            reduced = reduced.to(device, torch.float32)
            yield reduced, full.to(device, torch.float32), heldout_rows(reduced, fraction)


def _rows(t: Tensor, mask: Tensor) -> Tensor:
    """``t[mask]`` without the copy when every row is selected."""
    return t if bool(mask.all()) else t[mask]


class _Totals:
    """Linear interpolation's squared error and the targets' sums over one group of samples."""

    def __init__(self) -> None:
        self.n, self.sse, self.sumsq = 0, 0.0, 0.0
        self.sum: Tensor | None = None

    def add(self, residual: Tensor, full: Tensor) -> None:
        self.n += full.shape[0]
        self.sse += residual.square().sum().item()
        self.sumsq += full.square().sum().item()
        s = full.sum(0).double().cpu()
        self.sum = s if self.sum is None else self.sum + s

    @property
    def elements(self) -> float:
        """Number of scored values (samples x positions x features); 1 when empty."""
        return float(self.sum.numel() * self.n) if self.sum is not None else 1.0

    def sst(self) -> float:
        """Sum of squares around the per-(position, feature) mean of the group."""
        if self.n < 2 or self.sum is None:
            return 0.0
        return self.sumsq - float((self.sum.square() / self.n).sum())
