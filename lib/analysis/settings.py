"""The analysis stage's settings: the verdict levels, the reference schedule, the histogram.

:class:`AnalysisSettings` holds the analysis stage's parameters and their checks; the two
verdict levels take their defaults and checks from :class:`~lib.analysis.claims.ClaimRules`,
which the claims use. Its ``Attributes`` section is the meaning of each parameter that the
book's parameter table shows.
"""

from __future__ import annotations

from dataclasses import dataclass

from lib.analysis.claims import ClaimRules
from lib.attack.schedules import get_schedule
from lib.checking import check_int


@dataclass(frozen=True)
class AnalysisSettings:
    """The analysis stage's parameters (checked when made).

    Attributes:
        full_success: "reaches 100 %" agrees when the success rate's 95 % lower bound is at
            least this.
        stable_within: "changes little across epochs" agrees when the change's 95 % interval
            lies within +- this.
        reference_schedule: every other schedule is compared with this one, paired per
            (image, target).
        histogram_bins: bins of the L1 distributions.
    """

    full_success: float = ClaimRules.full_success
    stable_within: float = ClaimRules.stable_within
    reference_schedule: str = "constant"
    histogram_bins: int = 30

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Raise :class:`~lib.errors.ParameterError` naming the first bad setting."""
        self.rules  # noqa: B018 -- the rules check the two levels
        check_int(self.histogram_bins, "histogram_bins", low=1)
        get_schedule(self.reference_schedule)  # refuses an unknown name, listing the known

    @property
    def rules(self) -> ClaimRules:
        """The verdict levels of the claims."""
        return ClaimRules(full_success=self.full_success, stable_within=self.stable_within)
