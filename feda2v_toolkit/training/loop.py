"""The one step loop: every gradient step of every trained generator runs through :func:`run_steps`.

Single-process training, every federated site and the plugin conformance kit
(:mod:`feda2v_toolkit.testing`) drive generators only through this module: :func:`run_steps` calls
``Generator.training_step`` batch by batch and checks the loss terms; :func:`train_epochs` makes the batches of
whole epochs (shuffled from a per-epoch seed, so an epoch draws the same batches wherever and whenever it
runs) and validates on a held-out set; :func:`validate` scores a held-out set without updating anything.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from feda2v_toolkit.components import Generator, TrainContext
from feda2v_toolkit.errors import InputError
from feda2v_toolkit.runtime.seeds import derive_seed

#: ``(x [B, l, D], labels [B] or None, conditions [B, C] or None)``
Batch = tuple[Tensor, Tensor | None, Tensor | None]
StepFn = Callable[[Tensor, Tensor | None, Tensor | None, TrainContext], dict[str, float]]


class DivergedError(InputError):
    """A loss term became NaN or infinite."""


def check_finite(terms: Mapping[str, float], where: str, hint: str = "lower generator_learning_rate") -> None:
    """Raise :class:`DivergedError` naming ``where`` and the NaN/inf ``terms``, with ``hint`` (what to change)."""
    bad = [k for k, v in terms.items() if not math.isfinite(v)]
    if bad:
        raise DivergedError(f"training diverged ({where}): {', '.join(bad)} became NaN/inf; {hint}")


def run_steps(gen: Generator, optimizers: Mapping[str, torch.optim.Optimizer], batches: Iterable[Batch],
              context: Callable[[int], TrainContext], *, where: Callable[[], str] = lambda: "",
              on_step: Callable[[dict[str, float], int], None] | None = None,
              check: bool = True, step: StepFn | None = None) -> list[tuple[dict[str, float], int]]:
    """One ``training_step`` per batch; ``context(i)`` gives batch ``i``'s :class:`TrainContext`. Returns
    ``(terms, batch size)`` per step; a NaN/inf term raises :class:`DivergedError` naming ``where()`` (``check``;
    the conformance kit checks the terms itself, in ``on_step``). ``step(x, labels, conditions, ctx)`` replaces
    ``training_step`` (DP-SGD: :class:`feda2v_toolkit.privacy.sgd.PrivateTraining`)."""
    out = []
    gen.train()
    for i, (x, labels, conditions) in enumerate(batches):
        if step is None:
            terms = gen.training_step(x, labels=labels, conditions=conditions, optimizers=optimizers, ctx=context(i))
        else:
            terms = step(x, labels, conditions, context(i))
        if check:
            check_finite(terms, where())
        out.append((terms, int(x.shape[0])))
        if on_step is not None:
            on_step(terms, int(x.shape[0]))
    return out


def mean_terms(rows: Sequence[Mapping[str, float]], weights: Sequence[float]) -> dict[str, float]:
    """Weighted mean of loss-term dicts (keys of the first row, in its order)."""
    pairs = [(r, w) for r, w in zip(rows, weights, strict=True) if w > 0 and r]  # empty (Poisson) batches: none
    total = float(sum(w for _, w in pairs))
    if not pairs or total <= 0:
        return {}
    return {k: sum(float(r[k]) * w for r, w in pairs) / total for k in pairs[0][0]}


@dataclass
class EpochData:
    """What a generator trains on: rows ``train`` / ``heldout`` of a reduced cache, read by ``read(rows)``."""

    read: Callable[[Tensor], Batch]
    train: Tensor
    heldout: Tensor


def validate(gen: Generator, data: EpochData, batch_size: int, ctx: TrainContext) -> tuple[dict[str, float], int]:
    """Held-out loss terms (example-weighted over batches) and the held-out count; ``({}, 0)`` without rows."""
    rows, weights = [], []
    idx = data.heldout
    if idx.numel() == 0:
        return {}, 0
    gen.eval()
    with torch.no_grad():
        for s in range(0, idx.numel(), batch_size):
            x, labels, conditions = data.read(idx[s:s + batch_size])
            rows.append(gen.loss_terms(x, labels=labels, conditions=conditions, ctx=ctx))
            weights.append(int(x.shape[0]))
    gen.train()
    return mean_terms(rows, weights), int(idx.numel())


def train_epochs(gen: Generator, optimizers: Mapping[str, torch.optim.Optimizer], data: EpochData, *,
                 epochs: Iterable[int], total_epochs: int, batch_size: int, epoch_seed: Callable[[int], int],
                 step: int, config: Mapping[str, Any], validation_frequency: int,
                 autocast_dtype: torch.dtype | None = None, device: torch.device | None = None,
                 where: str = "", on_step: Callable[[dict[str, float], int], None] | None = None,
                 batch_rows: Callable[[Tensor, torch.Generator], list[Tensor]] | None = None,
                 step_fn: StepFn | None = None) -> list[dict[str, Any]]:
    """Train ``gen`` for the given epochs; one record per epoch (``train`` terms, ``val`` terms when due,
    ``examples``, ``steps``, ``seconds``). ``epoch_seed(e)`` seeds epoch ``e``'s batch order and the global
    torch RNG the generator draws from (dropout, noise), so an epoch is the same wherever it runs.
    ``batch_rows(rows, generator)`` replaces the default shuffled fixed-size batches (e.g. Poisson sampling),
    ``step_fn`` the generator's ``training_step`` (:func:`run_steps`)."""
    device = device or torch.device("cpu")
    records = []
    n = data.train.numel()
    if n == 0:
        return records
    for epoch in epochs:
        t0 = time.perf_counter()
        seed = epoch_seed(epoch)
        g = torch.Generator().manual_seed(seed)
        torch.manual_seed(derive_seed(seed, "global-rng"))
        if batch_rows is None:
            perm = data.train[torch.randperm(n, generator=g)]
            chunks = [perm[b:b + batch_size] for b in range(0, n, batch_size)]
        else:
            chunks = batch_rows(data.train, g)
        nb = max(len(chunks), 1)
        steps_before = step

        def context(i: int, epoch: int = epoch, nb: int = nb, base: int = step) -> TrainContext:
            return TrainContext(epoch=epoch, total_epochs=total_epochs, step=base + i,
                                progress=(epoch + i / nb) / total_epochs, config=config,
                                autocast_dtype=autocast_dtype, device=device)

        steps = run_steps(gen, optimizers, (data.read(rows) for rows in chunks), context,
                          where=lambda epoch=epoch: f"epoch {epoch + 1}{where}", on_step=on_step, step=step_fn)
        step += len(steps)
        record: dict[str, Any] = {"epoch": epoch + 1, "train": mean_terms([t for t, _ in steps], [w for _, w in steps]),
                                  "examples": sum(w for _, w in steps), "steps": step - steps_before}
        if (epoch + 1) % validation_frequency == 0 or epoch + 1 == total_epochs:
            ctx = TrainContext(epoch=epoch, total_epochs=total_epochs, step=step, progress=(epoch + 1) / total_epochs,
                               config=config, autocast_dtype=autocast_dtype, device=device)
            val, count = validate(gen, data, batch_size, ctx)
            if count:
                record["val"], record["val_examples"] = val, count
        record["seconds"] = time.perf_counter() - t0
        records.append(record)
    return records
