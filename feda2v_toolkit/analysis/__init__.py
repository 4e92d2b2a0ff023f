"""Measured answers: ``plan`` (parameters and memory), ``analyze`` (what reducers and upsamplers keep)
and ``evaluate`` (how good synthetic samples are).

Modules:

* :mod:`.sizes` -- parsing and printing byte sizes (no torch);
* :mod:`.memory` -- peak-memory simulation of a piece of torch code on fake tensors;
* :mod:`.metrics` -- R^2, cosine, Frechet distance, mean/covariance gaps, diversity, precision/recall,
  density/coverage;
* :mod:`.classifier` -- the one downstream classifier (ridge on pooled features, LOO-chosen penalty);
* :mod:`.linear_optimum` -- position PCA: the best linear reduction to ``l`` positions;
* :mod:`.plan`, :mod:`.analyze`, :mod:`.evaluate` -- the three measurements, returning dataclasses;
* :mod:`.membership` -- the membership-inference audit of ``evaluate``;
* :mod:`.tradeoff` -- ``privacy-tradeoff``: ``train`` and ``evaluate`` per target epsilon of differential privacy;
* :mod:`.plot` -- optional PNG plots (needs the ``plot`` extra, matplotlib);
* :mod:`.tables` -- plain-text tables.

The entry points are re-exported lazily (importing this package does not import torch)::

    from feda2v_toolkit.analysis import plan, analyze, evaluate, privacy_tradeoff
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "plan": "feda2v_toolkit.analysis.plan:plan",
    "analyze": "feda2v_toolkit.analysis.analyze:analyze",
    "evaluate": "feda2v_toolkit.analysis.evaluate:evaluate",
    "privacy_tradeoff": "feda2v_toolkit.analysis.tradeoff:privacy_tradeoff",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    target = _LAZY.get(name)
    if target is None:
        raise AttributeError(f"module 'feda2v_toolkit.analysis' has no attribute {name!r}")
    module_name, attr = target.split(":")
    value = getattr(importlib.import_module(module_name), attr)
    globals()[name] = value
    return value
