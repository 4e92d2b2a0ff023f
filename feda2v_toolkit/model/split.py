"""Which rows of a dataset a model was fitted on: the trainer's train / held-out split, recomputed.

``evaluate`` needs it twice: ``--split heldout`` scores only the held-out rows, and the membership-inference
audit must call *members* exactly the rows the generator fitted on -- not the trainer's validation rows,
which the model never saw. This module is the one place that recomputes the split from what the model
file records (its seed and ``generator_validation_split``); when the trainer's split derivation changes,
this function changes with it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from feda2v_toolkit.data.dataset import Dataset
from feda2v_toolkit.data.split import stratified_split
from feda2v_toolkit.errors import UsageError
from feda2v_toolkit.model.bundle import GenerativeModel
from feda2v_toolkit.runtime.seeds import scheme_seed


def model_split(model: GenerativeModel, dataset: Dataset) -> tuple[Tensor, Tensor]:
    """``(train_idx, val_idx)``: the rows of ``dataset`` the trainer of ``model`` fitted on and those it held
    out (sorted ``long`` indices), as ``train`` split them.

    ``dataset`` must be the model's training data (of a model trained on one site): its class counts must
    equal the model's recorded ones (:class:`UsageError` otherwise, and when the model records no seed or was
    trained over several sites). A model trained on some classes only (``generator_classes``) is compared on
    those. ``val_idx`` is empty for a model trained with ``generator_validation_split = 0``.
    """
    sites = model.metrics.get("sites") or []
    if len(sites) > 1:
        raise UsageError(f"the model was trained over {len(sites)} sites ({', '.join(s['name'] for s in sites)}): "
                         f"its train/held-out split belongs to each site's own data")
    rows = torch.arange(len(dataset))
    view = dataset
    chosen = model.config.get("generator_classes")
    if chosen:
        missing = [c for c in chosen if c not in dataset.class_names]
        if missing:
            raise UsageError(f"{dataset.path}: not the dataset the model was trained on (no class {missing[0]!r})")
        keep = torch.tensor([dataset.class_names.index(c) for c in chosen])
        rows = torch.isin(dataset.labels, keep).nonzero().flatten()
        view = dataset.subset(rows, classes=list(chosen))
    counts = {c: n for c, n in view.class_counts().items() if n}
    trained = {c: n for c, n in model.class_counts.items() if n}
    if (model.metrics.get("privacy") or {}).get("unit") == "one clip (record-level)":
        # a private model records noisy counts only: the class names must agree
        if sorted(counts) != sorted(model.class_names):
            raise UsageError(f"{dataset.path}: not the dataset the model was trained on (classes {sorted(counts)} "
                             f"differ from the model's {sorted(model.class_names)})")
    elif not trained or counts != trained:
        raise UsageError(f"{dataset.path}: not the dataset the model was trained on (class counts {counts} differ "
                         f"from the model's {trained or 'unrecorded ones'})")
    if model.seed is None:
        raise UsageError("the model file records no training seed: its train/held-out split cannot be recomputed")
    seed = scheme_seed(model.seed_scheme, int(model.seed), "split", 0)
    train_idx, val_idx = stratified_split(view.labels, float(model.setting("generator_validation_split")), seed)
    return rows[train_idx], rows[val_idx]
