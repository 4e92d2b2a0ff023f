"""What a run releases, declared before anything is computed: :class:`ReleaseSpec`, and the refusal error.

A *release* is a set of numbers derived from the training clips that leaves the code holding them: a stage's
part off a site, or a statistic written into the model file. Record-level differential privacy protects one
clip (the *record*) under the add/remove-one relation: two datasets are neighbours when one has one clip more.
Every release is a sum over records of per-record contributions clipped to a known L2 bound, plus Gaussian
noise; its declaration says how large one record's contribution can be (``sensitivity``), how often the
release is made (``compositions``), with what Poisson sampling rate, and what share of the noise budget it
gets (``weight``). Data-independent choices (``adaptive_avg``, ``linear``/``nearest`` upsampling, a fixed
normalisation) are declared with ``data_dependent=False``: they spend nothing and the ledger says so.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from feda2v_toolkit.errors import InputError


class PrivacyError(InputError):
    """A differentially private run refused up front (impossible target, bad settings, an unprotected release):
    exit code 2, as for any setting the run cannot honour."""

    exit_code = 2


@dataclass(frozen=True)
class ReleaseSpec:
    """One release of a run.

    Attributes:
        name: ``"stage.key"`` (e.g. ``"normalization.sum"``); the key of the stage's part it protects.
        sensitivity: L2 bound of one record's contribution to the whole release after clipping (add/remove-one),
            or ``None`` when it is only known at release time (a clip norm derived from an earlier release); a
            data-dependent release needs a positive one by then.
        compositions: how many times the release is made on the same records (DP-SGD: every optimiser step).
        sampling_rate: Poisson sampling probability of each record per composition (1 = every record each time).
        data_dependent: False for a choice made without the records: no noise, no cost.
        weight: share of the noise budget (see :mod:`feda2v_toolkit.privacy.accounting`): noise multiplier
            ``z = scale / sqrt(weight)``.
        group: releases of a group touch only that group's records (disjoint groups, e.g. the classes of
            per-class generators): they compose in parallel with the other groups.
        symmetric: the release is a symmetric matrix (or a stack of them): noise on the upper triangle and the
            diagonal, mirrored (Analyze Gauss).
    """

    name: str
    sensitivity: float | None = None
    compositions: int = 1
    sampling_rate: float = 1.0
    data_dependent: bool = True
    weight: float = 1.0
    group: str | None = None
    symmetric: bool = False

    def __post_init__(self) -> None:
        if not self.name:
            raise PrivacyError("a release needs a name")
        if self.sensitivity is not None and not (math.isfinite(self.sensitivity) and self.sensitivity > 0) \
                and self.data_dependent:
            raise PrivacyError(f"release {self.name!r}: sensitivity must be a positive finite number "
                               f"(got {self.sensitivity}); a non-positive clip norm cannot bound a record")
        if int(self.compositions) != self.compositions or self.compositions < 1:
            raise PrivacyError(f"release {self.name!r}: compositions must be an integer >= 1 (got {self.compositions})")
        if not (0 < self.sampling_rate <= 1):
            raise PrivacyError(f"release {self.name!r}: sampling_rate must be in (0, 1] (got {self.sampling_rate})")
        if not (math.isfinite(self.weight) and self.weight > 0):
            raise PrivacyError(f"release {self.name!r}: weight must be a positive number (got {self.weight})")

    def with_(self, **changes: Any) -> ReleaseSpec:
        """A copy with some fields changed (validated again)."""
        return ReleaseSpec(**{**asdict(self), **changes})

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def data_independent(name: str) -> ReleaseSpec:
    """The declaration of a choice made without the records (``adaptive_avg``, ``linear``, fixed normalisation)."""
    return ReleaseSpec(name, None, data_dependent=False)


def dp_requested(config: Any) -> bool:
    """Whether a config asks for record-level differential privacy (``generator_dp_epsilon`` set): read
    without loading the accountant, so that runs without DP do not import it."""
    return config.get("generator_dp_epsilon") is not None
