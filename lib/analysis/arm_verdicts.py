"""The borderline-training arms judged: their guards, the claims with verdicts, the findings.

- :func:`guard_table`: every guard against gradient masking and catastrophic overfitting of
  every model (:mod:`lib.attack.evaluation` holds the rules), one row each;
- :func:`arm_claims`: the claims of borderline training, each with its 95 % interval and a
  three-way verdict (:mod:`lib.analysis.statistics`);
- :func:`findings`: the sentences that open the chapter, glued together from those verdicts
  and intervals only.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd

from lib.analysis import statistics
from lib.analysis.arms import MODELS
from lib.attack import evaluation
from lib.attack.evaluation import GuardOutcome
from lib.errors import ParameterError

#: The columns of the claims table.
CLAIM_COLUMNS = ("claim", "quantity", "estimate", "low", "high", "n", "counted", "verdict",
                 "detail")
#: The columns of the guards table.
GUARD_COLUMNS = ("model", "guard", "passed", "value", "threshold", "images", "detail")
#: What a verdict says of its claim, in words.
VERDICT_WORDS = {statistics.AGREES: "holds (verdict: agrees)",
                 statistics.DISAGREES: "is contradicted (verdict: disagrees)",
                 statistics.INCONCLUSIVE: "is left undecided (verdict: inconclusive)"}


def _checked(name: str, guard: Callable[[], GuardOutcome]) -> GuardOutcome:
    """``guard()``, or a failed outcome saying why it could not be checked (a model with no
    correctly classified measured image leaves nothing to check)."""
    try:
        return guard()
    except ParameterError as error:
        return GuardOutcome(name, False, np.nan, np.nan, 0, f"not checked: {error}")


def _model_guards(measured: dict[str, pd.DataFrame], model: str) -> list[GuardOutcome]:
    """Every guard of one model (see :func:`guard_table`)."""
    mine = {name: table[table["model"] == model] for name, table in measured.items()}
    fmn = mine["fmn_margins"]
    outcomes = [_checked("reference success", lambda norm=norm: evaluation.success_guard(
        fmn[fmn["norm"] == norm])) for norm in ("linf", "l2")]
    transferred = mine["transfer"][mine["transfer"]["norm"] == "linf"]
    if len(transferred):
        white_box = fmn[fmn["norm"] == "linf"]
        outcomes.append(_checked("transfer not stronger", lambda: evaluation.transfer_guard(
            white_box.assign(sample=white_box["image_id"]),
            transferred.assign(sample=transferred["image_id"]))))
    outcomes.append(_checked("gradient not vanishing",
                             lambda: evaluation.gradient_guard(mine["gradients"])))
    if model != "start":
        outcomes.append(held_out_guard(measured["held_out"], model))
    return outcomes + [evaluation.eval_mode_guard(
        evaluation.ModeCheck(row.forwards, row.train_forwards, bool(row.restored)),
        name=f"{row.attack} in eval mode") for row in mine["attack_modes"].itertuples()]


def guard_table(measured: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Every guard of every model, one row each.

    Args:
        measured: the stage's measurement tables by name (``fmn_margins``, ``transfer``,
            ``gradients``, ``held_out``, ``attack_modes``).

    Returns:
        :data:`GUARD_COLUMNS`: per model the minimum-norm attack's success in Linf and L2, the
        transfer guard (every model but the source of the transferred perturbations), the
        gradient guard, the held-out collapse guard (the arms) and one eval-mode row per
        attack. A guard with nothing to check (no correctly classified image) fails, saying
        so.
    """
    rows = [{"model": model, **evaluation.guards_table([outcome]).iloc[0].to_dict()}
            for model in MODELS for outcome in _model_guards(measured, model)]
    return pd.DataFrame(rows, columns=list(GUARD_COLUMNS))


def held_out_guard(held_out: pd.DataFrame, model: str, *, collapse: float = 0.5) -> GuardOutcome:
    """No catastrophic overfitting: the held-out PGD robust accuracy of ``model`` never falls
    below ``collapse`` times that of the epoch before (the start checkpoint before the first
    epoch).

    Args:
        held_out: the stage's ``held_out`` table (the start row and the arm's epochs).
    """
    chain = pd.concat([held_out[held_out["model"] == "start"],
                       held_out[held_out["model"] == model].sort_values("epoch")])
    shares = (chain["robust"] / chain["images"]).to_numpy(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        ratios = np.where(shares[:-1] > 0, shares[1:] / shares[:-1], np.inf)
    worst = float(ratios.min()) if ratios.size else np.inf
    listing = ", ".join(f"{e}: {s:.2f}" for e, s in zip(chain["epoch"], shares, strict=True))
    return GuardOutcome(
        "no robust-accuracy collapse", bool(worst >= collapse), worst, collapse,
        int(chain["images"].iloc[-1]),
        f"held-out PGD robust accuracy by epoch ({listing}); the smallest ratio to the "
        f"epoch before is {worst:.2f}")


def _row(comparisons: pd.DataFrame, model: str, against: str, norm: str) -> pd.Series | None:
    chosen = comparisons[(comparisons["model"] == model) & (comparisons["against"] == against)
                         & (comparisons["norm"] == norm)]
    return chosen.iloc[0] if len(chosen) else None


def _interval(row: pd.Series | None) -> statistics.Interval:
    if row is None:
        return statistics.NAN_INTERVAL
    return statistics.Interval(row["estimate"], row["low"], row["high"], int(row["n_images"]))


def _verdict(interval: statistics.Interval, *, at_least: bool) -> str:
    """"above 0" (:func:`lib.analysis.statistics.verdict_above`'s rule) or, with
    ``at_least``, "at least 0" (:func:`~lib.analysis.statistics.verdict_at_least`'s), where an
    infinite bound counts (it comes from images misclassified by one of the two models, a
    change of known direction, as in :func:`lib.analysis.margins.direction`)."""
    if interval.n == 0 or np.isnan([interval.estimate, interval.low, interval.high]).any():
        return statistics.INCONCLUSIVE
    if interval.low >= 0 if at_least else interval.low > 0:
        return statistics.AGREES
    if interval.high < 0 if at_least else interval.high <= 0:
        return statistics.DISAGREES
    return statistics.INCONCLUSIVE


def _change_claim(claim: str, comparisons: pd.DataFrame, model: str, against: str,
                  norm: str, *, at_least: bool = False) -> dict[str, object]:
    row = _row(comparisons, model, against, norm)
    interval = _interval(row)
    verdict = _verdict(interval, at_least=at_least)
    detail = ("not measured" if row is None else
              f"the median image's margin times {row['factor']:.2f} [{row['factor_low']:.2f}, "
              f"{row['factor_high']:.2f}]; {row['grew']} images grew, {row['shrank']} shrank, "
              f"{row['unresolved']} misclassified by both")
    return {"claim": claim, "quantity": f"median over images of log({model} margin / "
            f"{against} margin), {norm}, minimum-norm attack", "estimate": interval.estimate,
            "low": interval.low, "high": interval.high, "n": interval.n, "counted": "images",
            "verdict": verdict, "detail": detail}


def arm_claims(comparisons: pd.DataFrame, accuracy: statistics.Interval, *,
               accuracy_cost: float, pgd_mismatch: float,
               tolerance: float = 0.1) -> pd.DataFrame:
    """The claims of borderline training, each with its interval and verdict.

    Args:
        comparisons: :func:`lib.analysis.arms.comparisons` of the stage's margins.
        accuracy: accuracy(borderline) - accuracy(control) on the test split
            (:func:`lib.analysis.arms.accuracy_change`), a share.
        accuracy_cost: the cost the second claim allows, in percentage points.
        pgd_mismatch: abs(PGD passes - borderline passes) / borderline passes, per image;
            the comparison with PGD is "at equal cost" only within ``tolerance``.

    Returns:
        :data:`CLAIM_COLUMNS`, one row per claim: the widening in Linf, the accuracy cost, the
        comparison with PGD, the widening in L2.
    """
    widens = _change_claim("borderline training widens the median Linf margin over control",
                           comparisons, "borderline", "control", "linf")
    cost = statistics.Interval(-100 * accuracy.estimate, -100 * accuracy.high,
                               -100 * accuracy.low, accuracy.n)
    costs = {"claim": f"borderline training costs at most {accuracy_cost:g} points of clean "
             "accuracy",
             "quantity": "accuracy(control) - accuracy(borderline), percentage points, whole "
             "test split (paired by image)", "estimate": cost.estimate, "low": cost.low,
             "high": cost.high, "n": cost.n, "counted": "test images",
             "verdict": statistics.verdict_below(cost, accuracy_cost),
             "detail": f"the claim holds when the whole interval lies below {accuracy_cost:g}"}
    versus = _change_claim("borderline training widens the Linf margin at least as much as "
                           "PGD training at equal cost", comparisons, "borderline", "pgd",
                           "linf", at_least=True)
    versus["detail"] += f"; PGD's passes per image differ by {pgd_mismatch:.0%}"
    if pgd_mismatch > tolerance:
        versus["verdict"] = statistics.INCONCLUSIVE
        versus["detail"] += f", more than {tolerance:.0%}: not at equal cost"
    holds = _change_claim("borderline training widens the median L2 margin over control too",
                          comparisons, "borderline", "control", "l2")
    return pd.DataFrame([widens, costs, versus, holds], columns=list(CLAIM_COLUMNS))


def _factor(comparisons: pd.DataFrame, model: str, against: str, norm: str) -> str:
    row = _row(comparisons, model, against, norm)
    if row is None:
        return "was not measured"
    return (f"by a factor {row['factor']:.2f} (95 % interval {row['factor_low']:.2f} to "
            f"{row['factor_high']:.2f}, {int(row['n_images'])} images)")


def findings(claims: pd.DataFrame, comparisons: pd.DataFrame, guards: pd.DataFrame, *,
             pgd_mismatch: float) -> dict[str, str]:
    """The sentences that open the chapter, from the claims, comparisons and guards only.

    Returns:
        ``{"linf", "l2", "accuracy", "pgd", "guards"}``: one sentence (or two) each.
    """
    said = [VERDICT_WORDS[verdict] for verdict in claims["verdict"]]
    cost = claims.iloc[1]
    failed = guards[~guards["passed"].astype(bool)]
    return {
        "linf": (f"Against the control arm, borderline training changed the median test "
                 f"image's Linf margin {_factor(comparisons, 'borderline', 'control', 'linf')}: "
                 f"the claim that it widens the margin {said[0]}."),
        "l2": (f"In L2 the margin changed {_factor(comparisons, 'borderline', 'control', 'l2')}"
               f"; the claim that the gain holds in L2 {said[3]}."),
        "accuracy": (f"Clean accuracy on the whole test split fell by {cost['estimate']:.1f} "
                     f"points (95 % interval {cost['low']:.1f} to {cost['high']:.1f}); the "
                     f"claim that {cost['claim']} {said[1]}."),
        "pgd": (f"Against PGD training, whose passes per image differ by {pgd_mismatch:.0%}, "
                f"the borderline arm's Linf margins differ "
                f"{_factor(comparisons, 'borderline', 'pgd', 'linf')}; the claim that borderline "
                f"training widens the margin at least as much {said[2]}."),
        "guards": ("Every guard against a masked gradient or a collapse passed." if failed.empty
                   else f"{len(failed)} of {len(guards)} guard checks failed ("
                   + "; ".join(f"{r.model}: {r.guard}" for r in failed.itertuples())
                   + "): read the margins of those models with care."),
    }
