"""Record-level (epsilon, delta) differential privacy for everything fitted from clips and released.

See ``docs/privacy.md``. Modules: :mod:`~feda2v_toolkit.privacy.spec` (what a run releases),
:mod:`~feda2v_toolkit.privacy.mechanism` (clipping, secret Gaussian noise, Analyze Gauss),
:mod:`~feda2v_toolkit.privacy.accounting` (budget planning and the ledger, with ``dp_accounting``),
:mod:`~feda2v_toolkit.privacy.statistics` (DP class counts, normalisation, ``gaussian``, ``lstsq``, ``pca``
statistics) and :mod:`~feda2v_toolkit.privacy.sgd` (DP-SGD with Opacus for trained generators).
"""

import importlib
from typing import Any

from feda2v_toolkit.privacy.spec import PrivacyError, ReleaseSpec, data_independent

#: names imported on first use, so that importing the package (the pipeline does, for :mod:`.spec`) does not
#: load ``dp_accounting`` and SciPy for a run without differential privacy
_LAZY = {name: "accounting" for name in ("BudgetPlan", "PlannedRelease", "PrivacyLedger", "check_target",
                                         "dp_event", "epsilon_of", "plan_budget")}
_LAZY.update({name: "mechanism" for name in ("add_noise", "add_symmetric_noise", "clip_factors", "clip_rows",
                                             "row_norms", "secret_generator")})


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


__all__ = [
    "BudgetPlan", "PlannedRelease", "PrivacyError", "PrivacyLedger", "ReleaseSpec", "add_noise",
    "add_symmetric_noise", "check_target", "clip_factors", "clip_rows", "data_independent", "dp_event",
    "epsilon_of", "plan_budget", "row_norms", "secret_generator",
]
