"""Interpolating upsamplers: ``linear`` (the original), ``nearest`` and ``cubic``. Nothing to train.

All three interpolate along the sequence axis only, computed as a 2-D interpolation of ``[B, 1, l, D]``
to ``(length, D)``: along the feature axis the size is unchanged, so its weights are exactly 0 and 1.
The results equal the 1-D ``F.interpolate`` of the transposed ``[B, D, l]`` tensor (``nearest`` and
``cubic`` bit for bit; ``linear`` bit for bit at the AST length 1214 for every training length up to 129,
and within one float32 ulp in general) -- but they come out contiguous in ``[B, length, D]``, which
saves a strided transpose copy (1.2-2x faster at AST shape; see docs/performance.md).
"""

from __future__ import annotations

from typing import ClassVar

import torch.nn.functional as F
from torch import Tensor

from feda2v_toolkit.components import Upsampler

_MODES_2D = {"linear": "bilinear", "cubic": "bicubic", "nearest": "nearest"}


def interpolate_sequence(x: Tensor, length: int, mode: str = "linear") -> Tensor:
    """``[B, l, D] -> [B, length, D]`` along the sequence; ``linear`` is
    ``F.interpolate(x.transpose(1, 2), length, mode="linear", align_corners=False).transpose(1, 2)``
    (to within one ulp, see the module docstring)."""
    if x.dim() != 3:
        raise ValueError(f"expected [B, l, D], got shape {tuple(x.shape)}")
    if x.shape[1] == length:
        return x
    kwargs = {} if mode == "nearest" else {"align_corners": False}
    return F.interpolate(x.unsqueeze(1), size=(length, x.shape[2]), mode=_MODES_2D[mode], **kwargs).squeeze(1)


class _Interpolating(Upsampler):
    mode: ClassVar[str] = "linear"

    def forward(self, x: Tensor, length: int) -> Tensor:
        return interpolate_sequence(x, length, self.mode)


class LinearUpsampler(_Interpolating):
    """Linear interpolation along the sequence (``F.interpolate(mode='linear', align_corners=False)``)."""

    mode: ClassVar[str] = "linear"


class NearestUpsampler(_Interpolating):
    """Repeats each reduced token over its span (piecewise constant; exact inverse of disjoint pooling)."""

    mode: ClassVar[str] = "nearest"


class CubicUpsampler(_Interpolating):
    """Cubic convolution along the sequence (smoother than linear, may overshoot)."""

    mode: ClassVar[str] = "cubic"
