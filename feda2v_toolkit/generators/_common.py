"""Helpers shared by the built-in generators: config access, conditioning, optimisers, clipping."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from feda2v_toolkit.components import Generator


def cfg(config: Mapping[str, Any], key: str) -> Any:
    """``config[key]`` with a clear error when the caller passed an unresolved config section."""
    try:
        return config[key]
    except KeyError:
        raise KeyError(f"config key {key!r} is missing: pass the resolved generator config "
                       "(every schema default filled in, e.g. load_config(...))") from None


def conditioning_kind(enabled: bool, num_classes: int, condition_dim: int) -> str | None:
    """What a conditioning-capable generator conditions on: embeddings beat labels; None if disabled
    or the data offers neither."""
    if not enabled:
        return None
    if condition_dim > 0:
        return "embedding"
    if num_classes > 0:
        return "label"
    return None


class Condition(nn.Module):
    """Turns a class label (``nn.Embedding``) or a condition embedding (``nn.Linear``) into a vector."""

    def __init__(self, kind: str, *, num_classes: int, condition_dim: int, out_dim: int) -> None:
        super().__init__()
        self.kind = kind
        self.condition_dim = condition_dim
        if kind == "label":
            if num_classes < 1:
                raise ValueError("label conditioning needs num_classes >= 1")
            self.proj: nn.Module = nn.Embedding(num_classes, out_dim)
        elif kind == "embedding":
            if condition_dim < 1:
                raise ValueError("embedding conditioning needs condition_dim >= 1")
            self.proj = nn.Linear(condition_dim, out_dim)
        else:
            raise ValueError(f"unknown conditioning {kind!r}")

    def forward(self, labels: Tensor | None, conditions: Tensor | None, n: int, owner: str) -> Tensor:
        if self.kind == "label":
            if labels is None:
                raise ValueError(f"this {owner} is conditioned on class labels: pass labels of shape [{n}]")
            if labels.shape != (n,):
                raise ValueError(f"labels must have shape [{n}], got {list(labels.shape)}")
            return self.proj(labels.long())
        if conditions is None:
            raise ValueError(f"this {owner} is conditioned on per-sample condition embeddings: "
                             f"pass conditions of shape [{n}, {self.condition_dim}]")
        if conditions.shape != (n, self.condition_dim):
            raise ValueError(f"conditions must have shape [{n}, {self.condition_dim}], "
                             f"got {list(conditions.shape)}")
        return self.proj(conditions.to(self.proj.weight.dtype))


def fan_in_groups(modules: nn.Module | Iterable[nn.Module | None], *, lr: float,
                  reference: int) -> list[dict[str, Any]]:
    """Parameter groups whose learning rate is scaled down for wide inputs: the weight of a linear layer
    with ``fan_in > reference`` gets ``lr * reference / fan_in``; everything else ``lr``.

    Adam moves every weight by about ``lr`` per step whatever its gradient's size, so a layer's output
    moves by about ``lr * fan_in`` when its inputs are correlated -- as the flattened features of real
    embeddings are (low rank, shared structure). At ``fan_in = l * D = 24,576`` that is ~25 per step at
    ``lr = 1e-3``: the first encoder layer blows the activations up within an epoch and training
    diverges. Scaling by ``reference / fan_in`` (the hidden width) gives the wide layer the same output
    step as the hidden layers (the maximal-update rule for input layers)."""
    mods = [modules] if isinstance(modules, nn.Module) else [m for m in modules if m is not None]
    scaled: dict[float, list[nn.Parameter]] = {}
    seen: set[int] = set()
    for layer in (sub for m in mods for sub in m.modules()):
        if isinstance(layer, nn.Linear) and layer.in_features > reference:
            scaled.setdefault(lr * reference / layer.in_features, []).append(layer.weight)
            seen.add(id(layer.weight))
    rest = [p for m in mods for p in m.parameters() if id(p) not in seen]
    groups = [{"params": rest, "lr": lr}] if rest else []
    return groups + [{"params": ps, "lr": group_lr} for group_lr, ps in sorted(scaled.items(), reverse=True)]


def adamw(params: Iterable[nn.Parameter] | Iterable[dict[str, Any]], *, lr: float, weight_decay: float,
          betas: tuple[float, float] = (0.9, 0.999)) -> torch.optim.AdamW:
    """AdamW with the fastest implementation available: fused (CPU/CUDA, torch >= 2.4), else foreach.
    ``params``: parameters, or parameter groups (e.g. :func:`fan_in_groups`)."""
    params = list(params)
    try:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=betas, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=betas, foreach=True)


def clip(params: Iterable[nn.Parameter], max_norm: float | None) -> None:
    """Clip the total gradient norm at ``max_norm`` (``None`` = no clipping)."""
    if max_norm is not None:
        grads = [p for p in params if p.grad is not None]
        torch.nn.utils.clip_grad_norm_(grads, float(max_norm), foreach=True)


def noise_like(shape: tuple[int, ...], generator: torch.Generator | None, like: Tensor) -> Tensor:
    """``N(0, I)`` drawn from ``generator`` only (on the generator's device), moved next to ``like``."""
    device = generator.device if generator is not None else like.device
    return torch.randn(shape, generator=generator, device=device, dtype=torch.float32).to(like.device)


class ConditionedMLPGenerator(Generator):
    """Base of the built-in MLP generators (``vae``, ``gan``): sizes, the conditioning kind, and the
    ``condition`` module (registered first, so state-dict order and seeded initialisation are fixed)."""

    supports_conditioning: ClassVar[bool] = True

    def __init__(self, *, seq_len: int, dim: int, hidden_dim: int, latent_dim: int, num_classes: int = 0,
                 condition_dim: int = 0, conditioning: str | None = None,
                 cond_embed_dim: int | None = None) -> None:
        super().__init__(seq_len=seq_len, dim=dim, num_classes=num_classes, condition_dim=condition_dim)
        if conditioning not in (None, "label", "embedding"):
            raise ValueError(f"conditioning must be None, 'label' or 'embedding' (got {conditioning!r})")
        self.hidden_dim = int(hidden_dim)
        self.latent_dim = int(latent_dim)
        self._conditioning = conditioning
        self.cond_embed_dim = int(cond_embed_dim if cond_embed_dim is not None else latent_dim)
        self.condition = (Condition(conditioning, num_classes=self.num_classes, condition_dim=self.condition_dim,
                                    out_dim=self.cond_embed_dim) if conditioning else None)

    @property
    def embed_width(self) -> int:
        """Width of the condition vector fed to the networks (0 when unconditioned)."""
        return self.cond_embed_dim if self._conditioning else 0

    @property
    def conditioning(self) -> str | None:
        return self._conditioning

    def init_args(self) -> dict[str, Any]:
        return {"seq_len": self.seq_len, "dim": self.dim, "hidden_dim": self.hidden_dim,
                "latent_dim": self.latent_dim, "num_classes": self.num_classes,
                "condition_dim": self.condition_dim, "conditioning": self._conditioning,
                "cond_embed_dim": self.cond_embed_dim}

    def latent_noise(self, n: int, generator: torch.Generator | None, ref: Tensor) -> Tensor:
        """``z ~ N(0, I)`` ``[n, latent_dim]`` drawn from ``generator`` only, next to and typed like ``ref``."""
        return noise_like((n, self.latent_dim), generator, ref).to(ref.dtype)
