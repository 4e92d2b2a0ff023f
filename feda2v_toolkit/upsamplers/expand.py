"""``expand``: the pseudo-inverse of ``adaptive_avg`` -- every full position gets the reduced token its bin
pooled into, and the ``keep`` leading tokens (``generator_reducer_keep_tokens``) go back where they came from.

Position ``p`` of the ``L - keep`` pooled positions takes reduced token ``keep + floor(p * (l - keep) / (L -
keep))``. Averaging the expansion back over ``adaptive_avg``'s bins gives the reduced sequence again, up to
the one token neighbouring bins share, so pooled summaries (a clip's mean over positions, AST's summary
tokens when they are kept) survive the round trip. Nothing is fitted from the data: under differential
privacy it spends nothing (docs/privacy.md), where ``lstsq``'s per-position bias ``[L, D]`` cannot be
released at useful noise from a few thousand clips.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from feda2v_toolkit.components import Upsampler


class ExpandUpsampler(Upsampler):
    """Repeats each reduced token over the positions ``adaptive_avg`` pooled into it (kept tokens in place)."""

    def __init__(self, *, keep: int = 0) -> None:
        super().__init__()
        if keep < 0:
            raise ValueError(f"keep must be >= 0, got {keep}")
        self.keep = int(keep)

    @classmethod
    def from_config(cls, config: Mapping[str, Any], *, reduced_length: int, full_length: int,
                    dim: int) -> ExpandUpsampler:
        keep = int(config.get("generator_reducer_keep_tokens") or 0)
        return cls(keep=min(keep, max(0, full_length - 1), reduced_length - 1))

    def init_args(self) -> dict[str, Any]:
        return {"keep": self.keep} if self.keep else {}

    def forward(self, x: Tensor, length: int) -> Tensor:
        if x.dim() != 3:
            raise ValueError(f"expected [B, l, D], got shape {tuple(x.shape)}")
        short = x.shape[1]
        if length == short:
            return x
        keep = min(self.keep, short - 1, length - 1)
        rest = length - keep
        index = keep + torch.div(torch.arange(rest, device=x.device) * (short - keep), rest, rounding_mode="floor")
        return torch.cat([x[:, :keep], x.index_select(1, index)], dim=1)
