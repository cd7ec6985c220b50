"""The paper's claims, each checked against our numbers with an interval and a verdict.

Every claim is one small function of the attack results (and, for clean accuracy, the training
stage's predictions) that returns one row: the claim, the paper's figure, the quantity
estimated, the estimate with its 95 % interval, how many attacks, pairs or images are behind
it, and the verdict read off the interval (:mod:`lib.analysis.statistics`): ``agrees``,
``disagrees`` or ``inconclusive``. :func:`paper_claims` collects them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from lib.analysis import statistics
from lib.analysis.aggregates import schedule_order, success_rates, usable
from lib.analysis.paired import paired_interval
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


#: The columns of the claims table (:func:`paper_claims`).
CLAIM_COLUMNS = ("claim", "paper", "quantity", "estimate", "low", "high", "n", "counted",
                 "verdict")


def _claim(claim: str, paper: str, quantity: str, interval: statistics.Interval, counted: str,
           verdict: str) -> dict:
    return {"claim": claim, "paper": paper, "quantity": quantity,
            "estimate": interval.estimate, "low": interval.low, "high": interval.high,
            "n": interval.n, "counted": counted, "verdict": verdict}


def _not_run(claim: str, paper: str, results: pd.DataFrame, *names: str) -> dict | None:
    absent = [n for n in names if n not in set(results["schedule"])]
    if not absent:
        return None
    return _claim(claim, paper, f"schedule(s) {', '.join(absent)} not run",
                  statistics.NAN_INTERVAL, "attacks", statistics.INCONCLUSIVE)


def _pooled_rate(results: pd.DataFrame, name: str, rules: ClaimRules) -> statistics.Interval:
    rows = results[usable(results) & (results["schedule"] == name)]
    return statistics.wilson_interval(int(rows["success"].astype(bool).sum()), len(rows),
                                      confidence=rules.confidence)


def claim_reaches_full_success(results: pd.DataFrame, name: str, rules: ClaimRules) -> dict:
    """"<name> reaches 100 % success": Wilson lower bound of the pooled rate >= full_success."""
    claim = f"{name} reaches 100 % success within max_iter"
    paper = "Fig. 2: 100 % at every epoch"
    if row := _not_run(claim, paper, results, name):
        return row
    rate = _pooled_rate(results, name, rules)
    return _claim(claim, paper, f"success rate of {name}, all attacked epochs", rate, "attacks",
                  statistics.verdict_at_least(rate, rules.full_success))


def claim_falls_short(results: pd.DataFrame, name: str, rules: ClaimRules) -> dict:
    """"<name> falls short of 100 %": Wilson upper bound of the pooled rate < full_success."""
    claim = f"{name} falls short of 100 % success"
    paper = "Fig. 2: below 100 %"
    if row := _not_run(claim, paper, results, name):
        return row
    rate = _pooled_rate(results, name, rules)
    return _claim(claim, paper, f"success rate of {name}, all attacked epochs", rate, "attacks",
                  statistics.verdict_below(rate, rules.full_success))


def _all_comparisons(claim: str, paper: str, comparisons: list[tuple[str, statistics.Interval,
                                                                     str]], counted: str) -> dict:
    verdict, decisive = statistics.all_of([c[2] for c in comparisons])
    quantity, interval, _ = comparisons[decisive]
    return _claim(claim, paper, quantity, interval, counted, verdict)


def claim_constant_largest_l1(results: pd.DataFrame, rules: ClaimRules) -> dict:
    """"constant gives the largest mean L1": constant minus every other schedule, paired on
    jointly successful (image, target) rows, has a 95 % interval above 0."""
    claim = "constant gives the largest mean L1 (successful attacks)"
    paper = "Fig. 3"
    if row := _not_run(claim, paper, results, "constant"):
        return row
    comparisons = []
    for other in (n for n in schedule_order(results) if n != "constant"):
        interval = paired_interval(results, "constant", other, confidence=rules.confidence)
        comparisons.append((f"mean L1 of constant minus {other} (x 1/255), paired", interval,
                            statistics.verdict_above(interval, 0.0)))
    if not comparisons:
        return _claim(claim, paper, "no other schedule run", statistics.NAN_INTERVAL, "pairs",
                      statistics.INCONCLUSIVE)
    return _all_comparisons(claim, paper, comparisons, "pairs")


def claim_smaller_l1(results: pd.DataFrame, name: str, rules: ClaimRules) -> dict:
    """"<name> gives a smaller mean L1 than constant and iteration": both paired differences
    (<name> minus each) have a 95 % interval below 0."""
    claim = f"{name} gives a smaller mean L1 than constant and iteration"
    paper = "Fig. 3"
    if row := _not_run(claim, paper, results, name, "constant", "iteration"):
        return row
    comparisons = []
    for other in ("constant", "iteration"):
        interval = paired_interval(results, name, other, confidence=rules.confidence)
        comparisons.append((f"mean L1 of {name} minus {other} (x 1/255), paired", interval,
                            statistics.verdict_below(interval, 0.0)))
    return _all_comparisons(claim, paper, comparisons, "pairs")


def claim_most_iterations(results: pd.DataFrame, rules: ClaimRules) -> dict:
    """"step and exponential need the most iterations" (last epoch): each of them minus every
    other schedule, paired over all usable rows (a failure counts max_iter), above 0."""
    claim = "step and exponential need the most iterations (last epoch)"
    paper = "Fig. 4: mean 50 (step) and 83 (exponential) at epoch 10"
    if row := _not_run(claim, paper, results, "step", "exponential"):
        return row
    last = results[results["epoch"] == results["epoch"].max()]
    others = [n for n in schedule_order(last) if n not in ("step", "exponential")]
    comparisons = []
    for name in ("step", "exponential"):
        for other in others:
            interval = paired_interval(last, name, other, value="iterations",
                                       successful_only=False, scale=1.0,
                                       confidence=rules.confidence)
            comparisons.append((f"mean iterations of {name} minus {other}, paired", interval,
                                statistics.verdict_above(interval, 0.0)))
    if not comparisons:
        return _claim(claim, paper, "no other schedule run", statistics.NAN_INTERVAL, "pairs",
                      statistics.INCONCLUSIVE)
    return _all_comparisons(claim, paper, comparisons, "pairs")


def claim_success_stable(results: pd.DataFrame, rules: ClaimRules) -> dict:
    """"success rate changes little across epochs": per schedule, the Newcombe interval of the
    highest minus the lowest epoch's rate lies within +- stable_within."""
    claim = "success rate changes little across epochs"
    paper = (f"Fig. 2: about the same at every epoch (we call a change within "
             f"+-{100 * rules.stable_within:.0f} points little)")
    rates = success_rates(results)
    if rates["epoch"].nunique() < 2:
        return _claim(claim, paper, "one epoch attacked", statistics.NAN_INTERVAL, "attacks",
                      statistics.INCONCLUSIVE)
    comparisons = []
    for name, part in rates.groupby("schedule", sort=False):
        part = part[part["attacks"] > 0]
        high, low = part.loc[part["success_rate"].idxmax()], part.loc[part["success_rate"].idxmin()]
        interval = statistics.rate_difference_interval(
            (high["successes"], high["attacks"]), (low["successes"], low["attacks"]),
            confidence=rules.confidence)
        comparisons.append((f"success rate of {name}, epoch {high['epoch']} minus epoch "
                            f"{low['epoch']}", interval,
                            statistics.verdict_within(interval, rules.stable_within)))
    return _all_comparisons(claim, paper, comparisons, "attacks per epoch (fewer of the two)")


def claim_accuracy_stable(predictions: pd.DataFrame | None, rules: ClaimRules) -> dict:
    """"clean accuracy changes little across epochs": the paired difference (same test images)
    between the most and the least accurate epoch lies within +- stable_within."""
    claim = "clean accuracy changes little across epochs"
    paper = (f"Fig. 1: similar at every epoch (we call a change within "
             f"+-{100 * rules.stable_within:.0f} points little)")
    if predictions is None or predictions["epoch"].nunique() < 2:
        return _claim(claim, paper, "fewer than two trained epochs", statistics.NAN_INTERVAL,
                      "test images", statistics.INCONCLUSIVE)
    table = predictions.assign(correct=predictions["label"] == predictions["predicted"])
    accuracy = table.groupby("epoch")["correct"].mean()
    best, worst = int(accuracy.idxmax()), int(accuracy.idxmin())
    if best == worst:  # the same accuracy at every epoch: compare the last with the first
        best, worst = int(accuracy.index.max()), int(accuracy.index.min())
    scored = (table[table["epoch"].isin([best, worst])]
              .pivot(index="image_id", columns="epoch", values="correct").dropna().astype(bool))
    right_best, right_worst = scored[best], scored[worst]
    interval = statistics.paired_rate_difference_interval(
        both=int((right_best & right_worst).sum()),
        first_only=int((right_best & ~right_worst).sum()),
        second_only=int((~right_best & right_worst).sum()),
        neither=int((~right_best & ~right_worst).sum()), confidence=rules.confidence)
    return _claim(claim, paper, f"test accuracy, epoch {best} minus epoch {worst}, paired",
                  interval, "test images",
                  statistics.verdict_within(interval, rules.stable_within))


def paper_claims(results: pd.DataFrame, predictions: pd.DataFrame | None = None, *,
                 rules: ClaimRules = ClaimRules()) -> pd.DataFrame:
    """The paper's claims (the results chapter lists them with their verdict rules), each with
    its estimate, interval and verdict.

    Args:
        results: ``attack/results.csv``.
        predictions: ``train/predictions.csv`` for the claim on clean accuracy; None leaves it
            inconclusive.
        rules: the levels of the verdicts.

    Returns:
        :data:`CLAIM_COLUMNS`: the claim, the paper's figure, the quantity estimated, its
        estimate with the 95 % interval ``low, high``, ``n`` (how many ``counted`` are behind
        it) and the verdict ``agrees``, ``disagrees`` or ``inconclusive``. Where a claim needs
        several comparisons to hold, the row shows the one that decides the verdict.
    """
    rows = [claim_reaches_full_success(results, n, rules)
            for n in ("constant", "iteration", "loss-adaptive")]
    rows += [claim_falls_short(results, n, rules) for n in ("step", "exponential")]
    rows.append(claim_constant_largest_l1(results, rules))
    rows += [claim_smaller_l1(results, n, rules) for n in ("step", "exponential", "loss-adaptive")]
    rows.append(claim_most_iterations(results, rules))
    rows.append(claim_success_stable(results, rules))
    rows.append(claim_accuracy_stable(predictions, rules))
    return pd.DataFrame(rows, columns=list(CLAIM_COLUMNS))


def readable_claims(claims: pd.DataFrame) -> pd.DataFrame:
    """The claims table as the book shows it: the estimate and its interval in one cell.

    Returns:
        ``claim, paper, quantity, estimate (95 % interval), n, verdict``.
    """
    def interval(row: pd.Series) -> str:
        if not np.isfinite(row["estimate"]):
            return "-"
        return f"{row['estimate']:.3g} [{row['low']:.3g}, {row['high']:.3g}]"

    return pd.DataFrame({
        "claim": claims["claim"], "paper": claims["paper"], "quantity": claims["quantity"],
        "estimate (95 % interval)": claims.apply(interval, axis=1),
        "n": [f"{n} {what}" for n, what in zip(claims["n"], claims["counted"], strict=True)],
        "verdict": claims["verdict"]})


def claims_conclusion(claims: pd.DataFrame) -> str:
    """The chapter's conclusion, written from the verdicts (Markdown): how many claims agree,
    disagree or stay inconclusive, and which."""
    shown = readable_claims(claims)
    count = claims["verdict"].value_counts()
    lines = [f"Of the paper's {len(claims)} claims, our run **agrees** with "
             f"{count.get(statistics.AGREES, 0)}, **disagrees** with "
             f"{count.get(statistics.DISAGREES, 0)} and leaves "
             f"{count.get(statistics.INCONCLUSIVE, 0)} **inconclusive** (the 95 % interval "
             "does not decide).", ""]
    for verdict in statistics.VERDICTS:
        chosen = shown[shown["verdict"] == verdict]
        if chosen.empty:
            continue
        lines.append(f"- {verdict.capitalize()}:")
        lines += [f"  - {row['claim']}: {row['quantity']} = {row['estimate (95 % interval)']}"
                  f" ({row['n']})" for row in chosen.to_dict("records")]
    return "\n".join(lines)
