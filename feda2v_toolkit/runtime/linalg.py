"""Symmetric eigendecompositions that do not fail on the matrices noise makes (imports torch).

``torch.linalg.eigh`` can stop with "failed to converge" on a finite symmetric matrix whose entries span many
decades -- the noisy scatters of differentially private statistics, the covariances of collapsed samples.
:func:`eigh` retries on the matrix scaled to unit size, then with a vanishing diagonal shift, then with
NumPy's LAPACK driver; a matrix with non-finite entries is a ``ValueError``.
"""

from __future__ import annotations

import torch
from torch import Tensor


def eigh(m: Tensor) -> tuple[Tensor, Tensor]:
    """``torch.linalg.eigh(m)`` (its lower triangle; batched too), robust to ill-conditioning: the same result
    whenever ``torch.linalg.eigh`` converges."""
    try:
        return torch.linalg.eigh(m)
    except torch.linalg.LinAlgError:
        pass
    m = (m + m.mT) / 2
    if not bool(torch.isfinite(m).all()):
        raise ValueError("eigendecomposition of a matrix with non-finite entries (NaN or inf)")
    scale = float(m.abs().max())
    if scale == 0.0:
        return torch.linalg.eigh(torch.zeros_like(m))
    unit = m / scale
    eye = torch.eye(m.shape[-1], dtype=m.dtype, device=m.device)
    for shift in (0.0, 1e-12, 1e-9, 1e-6):
        try:
            w, v = torch.linalg.eigh(unit + shift * eye)
            return (w - shift) * scale, v
        except torch.linalg.LinAlgError:
            continue
    import numpy as np

    w, v = np.linalg.eigh(unit.detach().cpu().double().numpy())
    return (torch.from_numpy(w).to(m) * scale, torch.from_numpy(v).to(m))


def eigvalsh(m: Tensor) -> Tensor:
    """``torch.linalg.eigvalsh(m)`` with :func:`eigh`'s retries."""
    try:
        return torch.linalg.eigvalsh(m)
    except torch.linalg.LinAlgError:
        return eigh(m)[0]
