"""``adaptive_avg``: the original FedA2V reduction (adaptive average pooling along the sequence).

Bin ``i`` averages positions ``floor(i*L/l) .. ceil((i+1)*L/l) - 1``; when ``L`` is not a multiple of
``l`` neighbouring bins share a boundary token (1214 -> 4: bins of 304 tokens overlapping by one).

``keep`` (``generator_reducer_keep_tokens``) leading tokens pass through unchanged and only the rest is
pooled, into ``l - keep`` bins: AST's two summary tokens (``[CLS]`` and the distillation token, positions 0
and 1, what its classification head reads) then survive the reduction instead of being averaged into the
first patch bin, so synthetic clips carry them too.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from feda2v_toolkit.components import Reducer


class AdaptiveAvgReducer(Reducer):
    """Adaptive average pooling over the sequence axis, after ``keep`` leading tokens kept as they are."""

    propagates_non_finite = True  # every position is in a bin (or kept): a NaN or inf reaches the output

    def __init__(self, *, length: int, keep: int = 0) -> None:
        super().__init__(length=length)
        if not 0 <= keep < length:
            raise ValueError(f"keep must be in 0..{length - 1} (the reduced length is {length}), got {keep}")
        self.keep = int(keep)

    @classmethod
    def from_config(cls, config: Mapping[str, Any], *, length: int, full_length: int, dim: int) -> Reducer:
        keep = int(config.get("generator_reducer_keep_tokens") or 0)
        return cls(length=length, keep=min(keep, max(0, full_length - 1), length - 1))

    def init_args(self) -> dict[str, Any]:
        return {"length": self.length, **({"keep": self.keep} if self.keep else {})}

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 3:
            raise ValueError(f"expected [B, L, D], got shape {tuple(x.shape)}")
        if not self.keep:
            return F.adaptive_avg_pool1d(x.transpose(1, 2), self.length).transpose(1, 2)
        rest = F.adaptive_avg_pool1d(x[:, self.keep:].transpose(1, 2), self.length - self.keep).transpose(1, 2)
        return torch.cat([x[:, :self.keep], rest], dim=1)
