"""Interpolating upsamplers: ``linear`` (the original), ``nearest`` and ``cubic``. Nothing to train."""

from __future__ import annotations

from typing import ClassVar

import torch.nn.functional as F
from torch import Tensor

from feda2v_toolkit.components import Upsampler


def _check(x: Tensor) -> None:
    if x.dim() != 3:
        raise ValueError(f"expected [B, l, D], got shape {tuple(x.shape)}")


class LinearUpsampler(Upsampler):
    """Linear interpolation along the sequence (``F.interpolate(mode='linear', align_corners=False)``)."""

    mode: ClassVar[str] = "linear"

    def forward(self, x: Tensor, length: int) -> Tensor:
        _check(x)
        if x.shape[1] == length:
            return x
        return F.interpolate(x.transpose(1, 2), size=length, mode=self.mode,
                             align_corners=False).transpose(1, 2)


class NearestUpsampler(Upsampler):
    """Repeats each reduced token over its span (piecewise constant; exact inverse of disjoint pooling)."""

    def forward(self, x: Tensor, length: int) -> Tensor:
        _check(x)
        if x.shape[1] == length:
            return x
        return F.interpolate(x.transpose(1, 2), size=length, mode="nearest").transpose(1, 2)


class CubicUpsampler(Upsampler):
    """Bicubic interpolation along the sequence only (a [B, D, 1, l] image widened to length)."""

    def forward(self, x: Tensor, length: int) -> Tensor:
        _check(x)
        if x.shape[1] == length:
            return x
        img = x.transpose(1, 2).unsqueeze(2)  # [B, D, 1, l]
        out = F.interpolate(img, size=(1, length), mode="bicubic", align_corners=False)
        return out.squeeze(2).transpose(1, 2)
