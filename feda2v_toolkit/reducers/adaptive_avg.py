"""``adaptive_avg``: the original FedA2V reduction (adaptive average pooling along the sequence).

Bin ``i`` averages positions ``floor(i*L/l) .. ceil((i+1)*L/l) - 1``; when ``L`` is not a multiple of
``l`` neighbouring bins share a boundary token (1214 -> 4: bins of 304 tokens overlapping by one).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from feda2v_toolkit.components import Reducer


class AdaptiveAvgReducer(Reducer):
    """Adaptive average pooling over the sequence axis."""

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 3:
            raise ValueError(f"expected [B, L, D], got shape {tuple(x.shape)}")
        return F.adaptive_avg_pool1d(x.transpose(1, 2), self.length).transpose(1, 2)
