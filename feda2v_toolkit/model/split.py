"""Which rows of a dataset a model was fitted on: the trainer's train / held-out split, recomputed.

``evaluate`` needs it twice: ``--split heldout`` scores only the held-out rows, and the membership-inference
audit must call *members* exactly the rows the generator fitted on -- not the trainer's validation rows,
which the model never saw. This module is the one place that recomputes the split from what the model
file records (its seed and ``generator_validation_split``); when the trainer's split derivation changes,
this function changes with it.
"""

from __future__ import annotations

from torch import Tensor

from feda2v_toolkit.data.dataset import Dataset
from feda2v_toolkit.errors import UsageError
from feda2v_toolkit.model.bundle import GenerativeModel


def model_split(model: GenerativeModel, dataset: Dataset) -> tuple[Tensor, Tensor]:
    """``(train_idx, val_idx)``: the rows of ``dataset`` the trainer of ``model`` fitted on and those it held
    out (sorted ``long`` indices), as ``train`` split them.

    ``dataset`` must be the model's training data: its class counts must equal the model's recorded ones
    (:class:`UsageError` otherwise, and when the model records no seed). ``val_idx`` is empty for a model
    trained with ``generator_validation_split = 0``.
    """
    from feda2v_toolkit.training.pipeline import stratified_split

    counts = {c: n for c, n in dataset.class_counts().items() if n}
    trained = {c: n for c, n in model.class_counts.items() if n}
    if not trained or counts != trained:
        raise UsageError(f"{dataset.path}: not the dataset the model was trained on (class counts {counts} differ "
                         f"from the model's {trained or 'unrecorded ones'})")
    if model.seed is None:
        raise UsageError("the model file records no training seed: its train/held-out split cannot be recomputed")
    return stratified_split(dataset.labels, float(model.setting("generator_validation_split")), int(model.seed))
