"""``lstsq``: the least-squares linear decoder from reduced positions to full positions (closed form).

``forward`` returns ``U r + b``: every full-length position is a fixed linear combination of the reduced
positions (``U [L, l]``, the same for every feature) plus a per-position, per-feature bias ``b [L, D]``
(the shared positional structure of the data). ``fit`` streams (reduced, full) training pairs once,
accumulating the normal equations in float64, and solves

    U = C_xr (C_rr + lambda I)^-1,    b = mean(x) - U mean(r)    (means per feature, over sequences)

with ``C_xr = sum (x - mean x)(r - mean r)^T`` over all sequences and features, and ``lambda =
lstsq_ridge * tr(C_rr) / l`` (a tiny relative ridge for numerical safety). It is the best affine decoder
for whatever reducer produced ``r``: after ``adaptive_avg`` it beats interpolation, and after ``pca`` it
is the linear optimum (``U = V``, ``b = M - V V^T M``). No epochs, no learning rate, no randomness.

For an output length other than the full length it was fitted at, the full-length reconstruction is
linearly interpolated to that length.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor

from feda2v_toolkit.components import Upsampler
from feda2v_toolkit.upsamplers.interpolate import interpolate_sequence

DEFAULT_RIDGE = 1e-6


class LeastSquaresUpsampler(Upsampler):
    """Affine least-squares decoder ``U r + b``, fitted in closed form on (reduced, full) pairs."""

    trainable: ClassVar[bool] = True

    def __init__(self, *, reduced_length: int, full_length: int, dim: int, ridge: float = DEFAULT_RIDGE) -> None:
        super().__init__()
        if reduced_length < 1 or full_length < 1 or dim < 1:
            raise ValueError("reduced_length, full_length and dim must be >= 1")
        if ridge < 0:
            raise ValueError(f"ridge must be >= 0, got {ridge}")
        self.reduced_length = int(reduced_length)
        self.full_length = int(full_length)
        self.dim = int(dim)
        self.ridge = float(ridge)
        self.register_buffer("weight", torch.zeros(self.full_length, self.reduced_length))
        self.register_buffer("bias", torch.zeros(self.full_length, self.dim))
        self.register_buffer("fitted_sequences", torch.zeros((), dtype=torch.long))

    @classmethod
    def from_config(cls, config: Mapping[str, Any], *, reduced_length: int, full_length: int,
                    dim: int) -> LeastSquaresUpsampler:
        ridge = config.get("lstsq_ridge")
        return cls(reduced_length=reduced_length, full_length=full_length, dim=dim,
                   ridge=DEFAULT_RIDGE if ridge is None else float(ridge))

    def init_args(self) -> dict[str, Any]:
        return {"reduced_length": self.reduced_length, "full_length": self.full_length, "dim": self.dim,
                "ridge": self.ridge}

    def fit(self, pairs: Callable[[], Iterable[tuple[Tensor, Tensor]]], *,
            config: Mapping[str, Any] | None = None) -> dict[str, float]:
        """One pass over ``pairs()``; returns the training R^2 (about the mean sequence) and the ridge."""
        from feda2v_toolkit.runtime.progress import activity, counted

        with activity("fitting the lstsq upsampler", unit="sequence") as bar:
            return self.fit_from_statistics(self.fit_statistics(lambda: counted(pairs(), bar, lambda p: p[0].shape[0])))

    def fit_statistics(self, pairs: Callable[[], Iterable[tuple[Tensor, Tensor]]]) -> dict[str, Tensor]:
        """The normal-equation sums over ``pairs()`` (float64): sums of parts of the data add up exactly.

        Per chunk, the products of full and reduced sequences are float32 on the reduced sequences' deviations
        from the chunk's mean, corrected in float64 (see the loop). Against all-float64 products on 2,000 clips of the realistic
        corpus: the centred cross-scatter agrees to 8e-8 (relative), the held-out MSE of the fit to 9 digits;
        4.9x the clips per second (no float64 copy of the full sequences)."""
        short, L, D = self.reduced_length, self.full_length, self.dim
        sxr = torch.zeros(L, short, dtype=torch.float64)
        srr = torch.zeros(short, short, dtype=torch.float64)
        sum_x = torch.zeros(L, D, dtype=torch.float64)
        sum_r = torch.zeros(short, D, dtype=torch.float64)
        sxx = 0.0
        n = 0
        f64 = torch.float64
        for reduced, full in pairs():
            r = reduced.to(self.weight.device, torch.float32)
            x = full.to(self.weight.device, torch.float32)
            if r.shape[1:] != (short, D) or x.shape[1:] != (L, D) or r.shape[0] != x.shape[0]:
                raise ValueError(f"expected pairs [B, {short}, {D}] and [B, {L}, {D}], got {tuple(r.shape)} "
                                 f"and {tuple(x.shape)}")
            # sum_b x_b r_b^T = sum_b x_b (r_b - c)^T + (sum_b x_b) c^T for the chunk's mean reduced sequence c:
            # the float32 product then only carries r's deviations (no cancellation against the shared
            # positional pattern), the pattern's part is float64; the large full sequences are never copied
            c = r.mean(0)
            sx = x.sum(0).to(f64)  # [L, D]: a few rows per chunk, float32 is exact to ~1e-7 here
            sxr += (torch.bmm(x, (r - c).transpose(1, 2)).sum(0).to(f64) + sx @ c.to(f64).T).cpu()
            r64 = r.to(f64)  # the reduced sequences are small: float64 throughout
            rc = r64.permute(1, 0, 2).reshape(short, -1)  # [short, B*D]
            srr += (rc @ rc.T).cpu()
            sum_x += sx.cpu()
            sum_r += r64.sum(0).cpu()
            sxx += float(torch.linalg.vector_norm(x, dim=-1).to(f64).square().sum())  # per-position norms
            n += x.shape[0]
        return {"sxr": sxr, "srr": srr, "sum_x": sum_x, "sum_r": sum_r, "sxx": torch.tensor(sxx, dtype=torch.float64),
                "count": torch.tensor(n, dtype=torch.float64)}

    def fit_from_statistics(self, stats: Mapping[str, Tensor]) -> dict[str, float]:
        """Solve the normal equations from (summed) :meth:`fit_statistics`; returns what :meth:`fit` returns."""
        short = self.reduced_length
        sxr, srr, sum_x, sum_r = (stats[k].to(torch.float64) for k in ("sxr", "srr", "sum_x", "sum_r"))
        sxx, n = float(stats["sxx"]), int(stats["count"])
        if n == 0:
            raise ValueError("lstsq: no training pairs")
        cxr = sxr - sum_x @ sum_r.T / n
        crr = srr - sum_r @ sum_r.T / n
        lam = self.ridge * float(crr.trace()) / short
        eye = torch.eye(short, dtype=torch.float64)
        # the minimum-norm solution where C_rr + lambda I is singular (reduced sequences that do not vary: lambda
        # = 0, and the decoder is the mean sequence; or lstsq_ridge = 0 with fewer sequences than positions)
        u = cxr @ torch.linalg.pinv(crr + lam * eye, hermitian=True) if lam == 0.0 else \
            torch.linalg.solve(crr + lam * eye, cxr.T).T  # [L, short]
        b = (sum_x - u @ sum_r) / n  # [L, D]
        sst = sxx - float(sum_x.square().sum()) / n  # about the per-position mean sequence
        # training SSE from the centred sums (b is the mean residual): sum ||(x - mean) - U (r - mean)||^2; the
        # uncentred expansion cancels catastrophically when a shared pattern dominates (as in AST embeddings)
        sse = max(sst - 2 * float((u * cxr).sum()) + float((u @ crr * u).sum()), 0.0)
        with torch.no_grad():
            self.weight.copy_(u.to(self.weight))
            self.bias.copy_(b.to(self.bias))
            self.fitted_sequences.fill_(n)
        return {"train_r2": 1.0 - sse / sst if sst > 0 else float("nan"), "ridge": lam, "pairs": float(n)}

    def heldout_sums(self) -> HeldoutSums:
        """Running sums over held-out (reduced, full) pairs, taken in the pass that reduces them; once the decoder
        is fitted, :meth:`heldout_errors` turns them into its held-out error without reading the clips again."""
        return HeldoutSums(self.reduced_length, self.full_length, self.dim, self.weight.device)

    def heldout_errors(self, stats: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The held-out sums of :func:`feda2v_toolkit.training.streams.heldout_reconstruction` (``sse``,
        ``sse_linear``, ``sumsq``, ``total``, ``count``), from (summed) :meth:`heldout_sums` states.

        The squared error of the affine decoder ``U r + b`` (and of linear interpolation, the fixed map
        ``P r``) over the held-out set, from its centred sums: ``SST - 2 <U, C_xr> + <U C_rr, U>`` plus ``n``
        times the squared error of the mean sequence; float64 throughout."""
        f64 = torch.float64
        sxr, srr, sum_x, sum_r, sumsq = (stats[k].to(f64) for k in ("sxr", "srr", "sum_x", "sum_r", "sumsq"))
        n = float(stats["count"])
        out = {"sse": torch.zeros((), dtype=f64), "sse_linear": torch.zeros((), dtype=f64), "sumsq": sumsq.clone(),
               "total": sum_x.clone(), "count": torch.tensor(n, dtype=f64)}
        if n == 0:
            return out
        if tuple(sxr.shape) != (self.full_length, self.reduced_length):
            raise ValueError(f"held-out sums of shape {tuple(sxr.shape)}, the decoder is {self.full_length} x "
                             f"{self.reduced_length}")
        cxr = sxr - sum_x @ sum_r.T / n
        crr = srr - sum_r @ sum_r.T / n
        sst = sumsq - sum_x.square().sum() / n

        def sse(u: Tensor, b: Tensor | None) -> Tensor:
            centred = sst - 2 * (u * cxr).sum() + (u @ crr * u).sum()
            mean_error = (sum_x - u @ sum_r) / n - (0 if b is None else b)
            return centred.clamp_min(0) + n * mean_error.square().sum()

        eye = torch.eye(self.reduced_length, dtype=f64).unsqueeze(0)
        out["sse"] = sse(self.weight.detach().to("cpu", f64), self.bias.detach().to("cpu", f64))
        out["sse_linear"] = sse(interpolate_sequence(eye, self.full_length, "linear")[0], None)
        return out

    def forward(self, x: Tensor, length: int) -> Tensor:
        if int(self.fitted_sequences) == 0:
            raise RuntimeError("the lstsq upsampler is not fitted: call fit() on (reduced, full) pairs first")
        if x.dim() != 3 or x.shape[1] != self.reduced_length or x.shape[2] != self.dim:
            raise ValueError(f"expected [B, {self.reduced_length}, {self.dim}], got shape {tuple(x.shape)}")
        out = torch.matmul(self.weight.to(x.dtype), x).to(x.dtype)  # (under autocast matmul may narrow it)
        out += self.bias.to(x.dtype)  # in place: the same values as `+`, without a second [B, L, D] tensor
        if length != self.full_length:
            out = interpolate_sequence(out, length, "linear")
        return out


class HeldoutSums:
    """Sums over held-out (reduced, full) pairs (float64) from which :meth:`LeastSquaresUpsampler.heldout_errors`
    computes the held-out error of any affine decoder: the cross and reduced scatter, per-position sums and the
    squared norm of the full sequences; :meth:`state`'s sums of parts of the data add up.

    Each full sequence is converted to float64 on its own and every sum is taken in float64 from it: exact
    enough that the positional pattern all sequences share cancels in the centred figures, and, for the few
    held-out rows of each chunk the reduce pass adds, a handful of passes over one sequence's values (the
    first version took each chunk about its first sequence in float32 and spent several float64 passes of
    a full sequence's size per chunk: 14% of the reduce pass on AST clips)."""

    def __init__(self, reduced_length: int, full_length: int, dim: int, device: torch.device | str = "cpu") -> None:
        f64 = torch.float64
        self.shape = (reduced_length, full_length, dim)
        self.device = torch.device(device)
        self.count = 0
        self.sxr = torch.zeros(full_length, reduced_length, dtype=f64, device=self.device)
        self.srr = torch.zeros(reduced_length, reduced_length, dtype=f64, device=self.device)
        self.sum_x = torch.zeros(full_length, dim, dtype=f64, device=self.device)
        self.sum_r = torch.zeros(reduced_length, dim, dtype=f64, device=self.device)
        self.sumsq = torch.zeros((), dtype=f64, device=self.device)

    def add(self, reduced: Tensor, full: Tensor) -> None:
        """Add a chunk of pairs ``[B, l, D]``, ``[B, L, D]``."""
        short, L, D = self.shape
        f64 = torch.float64
        if reduced.shape[1:] != (short, D) or full.shape[1:] != (L, D) or reduced.shape[0] != full.shape[0]:
            raise ValueError(f"expected pairs [B, {short}, {D}] and [B, {L}, {D}], got {tuple(reduced.shape)} "
                             f"and {tuple(full.shape)}")
        r = reduced.to(self.device, f64)
        for b in range(full.shape[0]):
            x = full[b].to(self.device).to(f64)  # moved at its stored width, widened where the sums are
            self.sum_x += x
            self.sxr += x @ r[b].T
            flat_x = x.reshape(-1)
            self.sumsq += torch.dot(flat_x, flat_x)
        flat = r.permute(1, 0, 2).reshape(short, -1)
        self.srr += flat @ flat.T
        self.sum_r += r.sum(0)
        self.count += full.shape[0]

    def state(self) -> dict[str, Tensor]:
        """The sums (``sxr``, ``srr``, ``sum_x``, ``sum_r``, ``sumsq``, ``count``), float64, on the CPU."""
        return {"sxr": self.sxr.cpu(), "srr": self.srr.cpu(), "sum_x": self.sum_x.cpu(), "sum_r": self.sum_r.cpu(),
                "sumsq": self.sumsq.cpu(), "count": torch.tensor(float(self.count), dtype=torch.float64)}
