"""Record-level (epsilon, delta) differential privacy for everything fitted from clips and released.

See ``docs/privacy.md``. Modules: :mod:`~feda2v_toolkit.privacy.spec` (what a run releases),
:mod:`~feda2v_toolkit.privacy.mechanism` (clipping, secret Gaussian noise, Analyze Gauss),
:mod:`~feda2v_toolkit.privacy.accounting` (budget planning and the ledger, with ``dp_accounting``),
:mod:`~feda2v_toolkit.privacy.statistics` (DP class counts, normalisation, ``gaussian``, ``lstsq``, ``pca``
statistics) and :mod:`~feda2v_toolkit.privacy.sgd` (DP-SGD with Opacus for trained generators).
"""

from feda2v_toolkit.privacy.spec import PrivacyError, ReleaseSpec, data_independent

try:
    import dp_accounting  # noqa: F401
except ImportError as exc:  # pragma: no cover - the extra is installed by make setup
    from feda2v_toolkit.errors import UsageError

    raise UsageError("differential privacy needs the privacy extra: pip install 'feda2v-tk[privacy]' "
                     "(dp-accounting, opacus)") from exc

from feda2v_toolkit.privacy.accounting import (  # noqa: E402
    BudgetPlan,
    PlannedRelease,
    PrivacyLedger,
    check_target,
    dp_event,
    epsilon_of,
    plan_budget,
)
from feda2v_toolkit.privacy.mechanism import (  # noqa: E402
    add_noise,
    add_symmetric_noise,
    clip_factors,
    clip_rows,
    row_norms,
    secret_generator,
)

__all__ = [
    "BudgetPlan", "PlannedRelease", "PrivacyError", "PrivacyLedger", "ReleaseSpec", "add_noise",
    "add_symmetric_noise", "check_target", "clip_factors", "clip_rows", "data_independent", "dp_event",
    "epsilon_of", "plan_budget", "row_norms", "secret_generator",
]
