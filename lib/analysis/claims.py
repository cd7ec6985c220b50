"""The paper's claims, each checked against our numbers with an interval and a verdict.

Every claim is one small function of the attack results (and, for clean accuracy, the training
stage's predictions) that returns a :class:`Finding`: the quantity estimated, its estimate with
its 95 % interval, the images, models and attacks (or pairs) behind it, and the verdict read
off the interval (:mod:`lib.analysis.statistics`): ``agrees``, ``disagrees`` or
``inconclusive``. :data:`lib.analysis.claim_table.CLAIMS` lists them in the order of the
paper's figures; :mod:`lib.analysis.claim_table` runs each on the pooled models and on every
model alone.

The unit is the image (:mod:`lib.analysis.resampling`): rates, means and paired differences
resample images with all their attacks, within models resampled first where the rows hold
several trained models. The claims are checked as the paper states them: Figure 4's order
between step (mean 50 iterations) and exponential (83) is a claim of its own, a claim that
holds by construction (a schedule whose steps have a bounded sum cannot reach a far boundary)
says so, and every attack claim names the setting (lr0, budget) it was checked at.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from lib.analysis import general_bootstrap, resampling, statistics
from lib.analysis.aggregates import last_epochs, schedule_order, usable
from lib.analysis.paired import paired_interval
from lib.attack.schedules import preview
from lib.checking import check_number, check_share


@dataclass(frozen=True)
class ClaimRules:
    """The levels that turn an interval into a verdict (the analysis stage's parameters of the
    same names own their defaults here).

    Attributes:
        full_success: "reaches 100 %" is read as "success rate at least this" (in (0, 1]);
            a schedule "falls short" when its whole interval lies below it.
        stable_within: "changes little across epochs": the change between the epochs with the
            highest and the lowest value lies within +- this (rates and accuracies, [0, 1]).
        confidence: the intervals' confidence level.
    """

    full_success: float = 0.95
    stable_within: float = 0.05
    confidence: float = statistics.CONFIDENCE

    def __post_init__(self) -> None:
        check_share(self.full_success, "full_success", above_zero=True,
                    example="0.95 reads '100 %' as at least 95 %")
        check_share(self.stable_within, "stable_within", example="0.05 means 5 points")
        check_number(self.confidence, "confidence", low=0, high=1, low_open=True,
                     high_open=True)


@dataclass(frozen=True)
class AttackSetting:
    """The attack settings the schedule claims depend on (the attack stage's ``job.json``).

    Attributes:
        lr0: the initial step size in [0, 1] pixel units.
        max_iter: the update budget of one attack.
        schedule_constants: per schedule, constants other than the method chapter's.
    """

    lr0: float
    max_iter: int
    schedule_constants: Mapping[str, Mapping[str, float]] = field(default_factory=dict)

    def words(self) -> str:
        """``"lr0 = 2.04/255, 100 updates"``."""
        return f"lr0 = {self.lr0 * 255:.3g}/255, {self.max_iter} updates"

    def total_step(self, name: str, *, updates: int | None = None) -> float:
        """The sum of ``name``'s steps over ``updates`` (default ``max_iter``) updates at a
        constant loss: the farthest (in Linf) a sign-step attack with it can move a pixel."""
        steps = preview(name, lr0=self.lr0, steps=updates or self.max_iter,
                        **self.schedule_constants.get(name, {}))
        return float(steps.sum())

    def bounded(self, name: str) -> bool:
        """Whether ``name``'s steps have a bounded sum: ten times the budget adds less than
        1 % to the total step (step and exponential decay; not constant or iteration)."""
        return self.total_step(name, updates=10 * self.max_iter) < 1.01 * self.total_step(name)


@dataclass(frozen=True)
class Finding:
    """One claim checked on one table: what was estimated, its interval and the verdict.

    Attributes:
        quantity: what the estimate is (for a claim of several comparisons, the deciding one).
        interval: the estimate, its interval and the images, models and attacks behind it.
        counted: what a counted row is ("attacks", "pairs", "test images", ...).
        verdict: ``agrees``, ``disagrees`` or ``inconclusive``.
        comparisons: how many interval comparisons the verdict rests on.
    """

    quantity: str
    interval: resampling.Bootstrap
    counted: str
    verdict: str
    comparisons: int = 1


#: The interval of no observation.
NO_INTERVAL = resampling.Bootstrap(np.nan, np.nan, np.nan, 0, 0, 0)


def not_decided(quantity: str, counted: str = "attacks") -> Finding:
    """The inconclusive finding of a claim that this table cannot check."""
    return Finding(quantity, NO_INTERVAL, counted, statistics.INCONCLUSIVE, 0)


def _absent(results: pd.DataFrame, *names: str) -> Finding | None:
    missing = [n for n in names if n not in set(results["schedule"])]
    return not_decided(f"schedule(s) {', '.join(missing)} not run") if missing else None


def success_rate(results: pd.DataFrame, name: str, rules: ClaimRules) -> resampling.Bootstrap:
    """``name``'s success rate over every usable attack of ``results``, resampled by image
    (models first where there are several)."""
    rows = results[usable(results) & (results["schedule"] == name)]
    return resampling.bootstrap_rows(
        rows["success"].to_numpy(float), resampling.clusters_of(rows, model="model"),
        statistic="rate", two_level=True, confidence=rules.confidence)


def _all_of(comparisons: list[tuple[str, resampling.Bootstrap, str]], counted: str) -> Finding:
    verdict, decisive = statistics.all_of([c[2] for c in comparisons])
    quantity, interval, _ = comparisons[decisive]
    return Finding(quantity, interval, counted, verdict, len(comparisons))


def reaches_full_success(name: str) -> Callable[..., Finding]:
    """"<name> reaches 100 % success": the rate's lower bound is at least full_success."""
    def check(results: pd.DataFrame, predictions: pd.DataFrame | None,
              rules: ClaimRules) -> Finding:
        if absent := _absent(results, name):
            return absent
        rate = success_rate(results, name, rules)
        return Finding(f"success rate of {name}, all attacked epochs", rate, "attacks",
                       statistics.verdict_at_least(rate.interval(), rules.full_success))
    return check


def falls_short(name: str) -> Callable[..., Finding]:
    """"<name> falls short of 100 %": the rate's upper bound is below full_success."""
    def check(results: pd.DataFrame, predictions: pd.DataFrame | None,
              rules: ClaimRules) -> Finding:
        if absent := _absent(results, name):
            return absent
        rate = success_rate(results, name, rules)
        return Finding(f"success rate of {name}, all attacked epochs", rate, "attacks",
                       statistics.verdict_below(rate.interval(), rules.full_success))
    return check


def constant_largest_l1(results: pd.DataFrame, predictions: pd.DataFrame | None,
                        rules: ClaimRules) -> Finding:
    """"constant gives the largest mean L1": constant minus every other schedule, paired on
    jointly successful (image, target) rows, has its whole interval above 0."""
    if absent := _absent(results, "constant"):
        return absent
    comparisons = []
    for other in (n for n in schedule_order(results) if n != "constant"):
        interval = paired_interval(results, "constant", other, confidence=rules.confidence)
        comparisons.append((f"mean L1 of constant minus {other} (x 1/255), paired", interval,
                            statistics.verdict_above(interval.interval(), 0.0)))
    if not comparisons:
        return not_decided("no other schedule run", "pairs")
    return _all_of(comparisons, "pairs")


def smaller_l1(name: str) -> Callable[..., Finding]:
    """"<name> gives a smaller mean L1 than constant and iteration": both paired differences
    (<name> minus each) have their whole interval below 0."""
    def check(results: pd.DataFrame, predictions: pd.DataFrame | None,
              rules: ClaimRules) -> Finding:
        if absent := _absent(results, name, "constant", "iteration"):
            return absent
        comparisons = []
        for other in ("constant", "iteration"):
            interval = paired_interval(results, name, other, confidence=rules.confidence)
            comparisons.append((f"mean L1 of {name} minus {other} (x 1/255), paired",
                                interval, statistics.verdict_below(interval.interval(), 0.0)))
        return _all_of(comparisons, "pairs")
    return check


def _iterations(results: pd.DataFrame, first: str, second: str,
                rules: ClaimRules) -> resampling.Bootstrap:
    """Mean iterations of ``first`` minus ``second`` at every model's last checkpoint, paired
    over every usable row (a failure counts max_iter)."""
    return paired_interval(last_epochs(results), first, second, value="iterations",
                           successful_only=False, scale=1.0, confidence=rules.confidence)


def most_iterations(results: pd.DataFrame, predictions: pd.DataFrame | None,
                    rules: ClaimRules) -> Finding:
    """"step and exponential need the most iterations" (last epoch): each of them minus every
    other schedule, paired over all usable rows, has its whole interval above 0."""
    if absent := _absent(results, "step", "exponential"):
        return absent
    others = [n for n in schedule_order(results) if n not in ("step", "exponential")]
    comparisons = []
    for name in ("step", "exponential"):
        for other in others:
            interval = _iterations(results, name, other, rules)
            comparisons.append((f"mean iterations of {name} minus {other}, paired", interval,
                                statistics.verdict_above(interval.interval(), 0.0)))
    if not comparisons:
        return not_decided("no other schedule run", "pairs")
    return _all_of(comparisons, "pairs")


def step_before_exponential(results: pd.DataFrame, predictions: pd.DataFrame | None,
                            rules: ClaimRules) -> Finding:
    """"step needs fewer iterations than exponential" (Figure 4's order, last epoch): the
    paired difference step minus exponential has its whole interval below 0."""
    if absent := _absent(results, "step", "exponential"):
        return absent
    interval = _iterations(results, "step", "exponential", rules)
    return Finding("mean iterations of step minus exponential, paired", interval, "pairs",
                   statistics.verdict_below(interval.interval(), 0.0))


def common_epochs(table: pd.DataFrame) -> list[int]:
    """The epochs every model of ``table`` has rows at, sorted."""
    per_model = table.groupby("model")["epoch"].apply(set)
    return sorted(set.intersection(*per_model)) if len(per_model) else []


def _epoch_difference(table: pd.DataFrame, value: str, high: int, low: int,
                      keys: list[str]) -> pd.DataFrame:
    """``value`` at epoch ``high`` minus at ``low`` per ``keys`` row present at both."""
    pivot = (table[table["epoch"].isin([high, low])]
             .pivot_table(index=keys, columns="epoch", values=value, aggfunc="first")
             .dropna())
    return (pivot[high] - pivot[low]).rename("difference").reset_index()


def success_stable(results: pd.DataFrame, predictions: pd.DataFrame | None,
                   rules: ClaimRules) -> Finding:
    """"success rate changes little across epochs": per schedule, the success rate at the
    epoch with the highest rate minus at the one with the lowest (among the epochs every model
    was attacked at), paired by (image, target) attacked at both, lies within
    +- stable_within."""
    epochs = common_epochs(results)
    if len(epochs) < 2:
        return not_decided("fewer than two epochs attacked (by every model)", "pairs")
    rows = results[usable(results) & results["epoch"].isin(epochs)]
    rows = rows.assign(hit=rows["success"].astype(float))
    comparisons = []
    for name, part in rows.groupby("schedule", sort=False):
        rates = part.groupby("epoch")["hit"].mean()
        high, low = int(rates.idxmax()), int(rates.idxmin())
        if high == low:
            high, low = epochs[-1], epochs[0]
        pairs = _epoch_difference(part, "hit", high, low, ["model", "image_id", "target"])
        interval = resampling.bootstrap_rows(
            pairs["difference"].to_numpy(float), resampling.clusters_of(pairs, model="model"),
            two_level=True, confidence=rules.confidence)
        comparisons.append((f"success rate of {name}, epoch {high} minus epoch {low}, paired "
                            "by (image, target)", interval,
                            statistics.verdict_within(interval.interval(), rules.stable_within)))
    return _all_of(comparisons, "pairs")


def accuracy_stable(results: pd.DataFrame, predictions: pd.DataFrame | None,
                    rules: ClaimRules) -> Finding:
    """"clean accuracy changes little across epochs": the paired difference (same test images)
    between the most and the least accurate epoch lies within +- stable_within. One model:
    Newcombe's paired interval (every test image an independent trial); several: the
    two-level bootstrap of the per-image differences."""
    epochs = [] if predictions is None else common_epochs(predictions)
    if len(epochs) < 2:
        return not_decided("fewer than two trained epochs", "test images")
    table = predictions[predictions["epoch"].isin(epochs)]
    table = table.assign(correct=(table["label"] == table["predicted"]).astype(float))
    accuracy = table.groupby("epoch")["correct"].mean()
    best, worst = int(accuracy.idxmax()), int(accuracy.idxmin())
    if best == worst:  # the same accuracy at every epoch: compare the last with the first
        best, worst = epochs[-1], epochs[0]
    scored = (table[table["epoch"].isin([best, worst])]
              .pivot_table(index=["model", "image_id"], columns="epoch", values="correct",
                           aggfunc="first").dropna().astype(bool).reset_index())
    right_best, right_worst = scored[best], scored[worst]
    clusters = resampling.clusters_of(scored, model="model")
    if clusters.n_models == 1:
        newcombe = statistics.paired_rate_difference_interval(
            both=int((right_best & right_worst).sum()),
            first_only=int((right_best & ~right_worst).sum()),
            second_only=int((~right_best & right_worst).sum()),
            neither=int((~right_best & ~right_worst).sum()), confidence=rules.confidence)
        interval = resampling.Bootstrap(newcombe.estimate, newcombe.low, newcombe.high,
                                        len(scored), 1, len(scored))
    else:  # thousands of test images per model: the same draw, counted per value
        interval = general_bootstrap.bootstrap_unit_values(
            right_best.to_numpy(float) - right_worst.to_numpy(float), scored["model"],
            confidence=rules.confidence)
    return Finding(f"test accuracy, epoch {best} minus epoch {worst}, paired", interval,
                   "test images", statistics.verdict_within(interval.interval(),
                                                            rules.stable_within))
