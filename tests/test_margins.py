"""Per-image margins, robust accuracy and the margin's change (lib/analysis/margins.py) on
hand-made tables with known answers."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from lib.analysis import margins as mg
from lib.analysis import statistics
from lib.errors import ParameterError


def attack(epoch: int, schedule: str, image: str, source: int, target: int, success: bool,
           linf: float, *, model: int | None = None, refined: float | None = None,
           mode: str = "targeted") -> dict:
    """One attack row; l2 = 10 x linf and l1 = linf / 10 so the norms stay apart."""
    row = {"epoch": epoch, "schedule": schedule, "mode": mode, "image_id": image,
           "source": source, "target": target, "success": success, "status": "ok",
           "final_class": target if success else source, "linf": linf, "l2": 10 * linf,
           "l1": linf / 10, "refined_linf": linf if refined is None else refined,
           "refined_l2": 10 * linf, "refined_l1": linf / 10}
    if model is not None:
        row["model"] = model
    return row


@pytest.fixture
def results() -> pd.DataFrame:
    rows = [
        attack(1, "constant", "a", 0, 1, True, 0.30, refined=0.20),
        attack(1, "constant", "a", 0, 2, True, 0.25),
        attack(1, "constant", "a", 0, 3, False, 0.90),
        attack(1, "step", "a", 0, 1, True, 0.40),
        attack(1, "step", "a", 0, 2, True, 0.10),
        attack(1, "step", "a", 0, 3, False, 0.05),  # failed: its small distance is no margin
        attack(1, "constant", "b", 1, 0, False, 0.5),
        attack(1, "constant", "b", 1, 2, False, 0.5),
        attack(1, "step", "b", 1, 0, False, 0.5),
        attack(1, "step", "b", 1, 2, False, 0.5),
    ]
    return pd.DataFrame(rows)


def margin_of(table: pd.DataFrame, image: str, method: str, norm: str = "linf",
              mode: str = "targeted") -> pd.Series:
    row = table[(table["image_id"] == image) & (table["method"] == method)
                & (table["norm"] == norm) & (table["mode"] == mode)]
    assert len(row) == 1
    return row.iloc[0]


def test_the_margin_is_the_smallest_success_over_targets(results: pd.DataFrame) -> None:
    table = mg.image_margins(results)
    assert list(table.columns) == list(mg.MARGIN_COLUMNS)
    constant = margin_of(table, "a", "constant")
    assert constant["margin"] == 0.20 and constant["closest_target"] == 1  # refined 0.20 < 0.25
    assert (constant["attacks"], constant["successes"]) == (3, 2)
    assert margin_of(table, "a", "step")["margin"] == 0.10
    best = margin_of(table, "a", mg.BEST_OF_SCHEDULES)
    assert best["margin"] == 0.10 and best["closest_target"] == 2 and best["attacks"] == 6
    assert margin_of(table, "a", "constant", norm="l2")["margin"] == pytest.approx(2.5)
    assert margin_of(table, "a", "step", norm="l1")["margin"] == pytest.approx(0.01)


def test_an_image_with_no_success_has_margin_inf(results: pd.DataFrame) -> None:
    table = mg.image_margins(results)
    row = margin_of(table, "b", mg.BEST_OF_SCHEDULES)
    assert row["margin"] == math.inf and row["closest_target"] == -1
    assert row["successes"] == 0 and row["attacks"] == 4


def test_reference_rows_enter_the_best_known_margin(results: pd.DataFrame) -> None:
    reference = pd.DataFrame({"epoch": [1, 1, 1], "image_id": ["a", "a", "b"],
                              "target": [3, 1, 0], "attack": ["fmn_linf"] * 3,
                              "success": [True, True, False], "linf": [0.04, 0.08, 0.01],
                              "l1": [0.5, 0.1, 0.1]})  # no l2 measured
    table = mg.image_margins(results, reference)
    assert margin_of(table, "a", mg.REFERENCE)["margin"] == 0.04
    known = margin_of(table, "a", mg.BEST_KNOWN, mode="any")
    assert known["margin"] == 0.04 and known["closest_target"] == 3
    assert margin_of(table, "a", mg.BEST_KNOWN, norm="l2", mode="any")["margin"] == 1.0
    assert margin_of(table, "a", mg.BEST_OF_SCHEDULES)["margin"] == 0.10  # schedules alone
    assert margin_of(table, "b", mg.BEST_KNOWN, mode="any")["margin"] == math.inf


def test_untargeted_rows_stand_beside(results: pd.DataFrame) -> None:
    untargeted = pd.DataFrame([attack(1, "constant", "a", 0, -1, True, 0.07, mode="untargeted")])
    untargeted["final_class"] = 4
    table = mg.image_margins(pd.concat([results, untargeted], ignore_index=True))
    row = margin_of(table, "a", mg.BEST_OF_SCHEDULES, mode="untargeted")
    assert row["margin"] == 0.07 and row["closest_target"] == 4
    beside = mg.untargeted_beside(table)
    a = beside[(beside["image_id"] == "a") & (beside["norm"] == "linf")].iloc[0]
    assert (a["targeted"], a["untargeted"]) == (0.10, 0.07)
    assert margin_of(table, "a", mg.BEST_KNOWN, mode="any")["margin"] == 0.07


def margin_table(values: list[float], *, sources: list[int] | None = None, epoch: int = 1,
                 model: int = 0) -> pd.DataFrame:
    sources = sources or [0] * len(values)
    return pd.DataFrame({"model": model, "epoch": epoch,
                         "image_id": [f"m{model}i{k}" for k in range(len(values))],
                         "source": sources, "mode": "targeted",
                         "method": mg.BEST_OF_SCHEDULES, "norm": "linf",
                         "margin": values, "closest_target": 1, "attacks": 6,
                         "successes": 6})


def accuracy_table(rows: list[tuple[int, int, int, int, int]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["model", "epoch", "source", "test_images", "correct"])


def test_robust_accuracy_counts_misclassified_images_as_zero() -> None:
    margins = margin_table([1.0, 2.0, 3.0, math.inf])
    accuracy = accuracy_table([(0, 1, 0, 10, 8)])
    curve = mg.robust_accuracy(margins, accuracy, epsilons=[0, 1.5, 2.5, 3.0, 10])
    assert curve["estimate"].tolist() == pytest.approx([0.8, 0.6, 0.4, 0.2, 0.2])
    assert curve["estimate"].is_monotonic_decreasing
    assert (curve["low"] <= curve["estimate"]).all() and (curve["estimate"] <= curve["high"]).all()
    assert curve["n_images"].tolist() == [4] * 5 and curve["n_attacks"].tolist() == [24] * 5


def test_robust_accuracy_weights_each_tool_by_its_correct_images() -> None:
    # tool 0: 30 correct (2 attacked, margins 1 and 3); tool 1: 10 correct (2 attacked, both 3)
    margins = margin_table([1.0, 3.0, 3.0, 3.0], sources=[0, 0, 1, 1])
    accuracy = accuracy_table([(0, 1, 0, 40, 30), (0, 1, 1, 10, 10)])
    curve = mg.robust_accuracy(margins, accuracy, epsilons=[0.0, 2.0])
    # clean accuracy 40/50; at 2: (30 x 1/2 + 10 x 1) / 50
    assert curve["estimate"].tolist() == pytest.approx([0.8, 25 / 50])


def test_robust_accuracy_area_is_the_mean_of_capped_margins() -> None:
    margins = margin_table([1.0, 2.0, 3.0, math.inf])
    accuracy = accuracy_table([(0, 1, 0, 10, 8)])
    area = mg.robust_accuracy_area(margins, accuracy, eps_max=2.0)
    assert area.loc[0, "estimate"] == pytest.approx(0.8 * (0.5 + 1 + 1 + 1) / 4)
    fine = np.linspace(0, 2.0, 2001)
    curve = mg.robust_accuracy(margins, accuracy, epsilons=fine, resamples=100)
    assert area.loc[0, "estimate"] == pytest.approx(curve["estimate"].mean(), abs=1e-3)


def test_robust_accuracy_band_of_the_clean_accuracy() -> None:
    margins = margin_table(list(np.linspace(1, 2, 20)))
    accuracy = accuracy_table([(0, 1, 0, 400, 300)])
    curve = mg.robust_accuracy(margins, accuracy, epsilons=[0.0])
    # every attacked margin exceeds 0: the band is the binomial one of 300 / 400
    half = 1.96 * math.sqrt(0.75 * 0.25 / 400)
    assert curve.loc[0, "low"] == pytest.approx(0.75 - half, abs=0.01)
    assert curve.loc[0, "high"] == pytest.approx(0.75 + half, abs=0.01)


def test_robust_accuracy_pooled_over_models_averages_them() -> None:
    margins = pd.concat([margin_table([1.0, 1.0, 3.0], model=0),
                         margin_table([3.0, 3.0, 3.0], model=1)], ignore_index=True)
    accuracy = accuracy_table([(0, 1, 0, 10, 9), (1, 1, 0, 10, 6)])
    pooled = mg.robust_accuracy(margins, accuracy, epsilons=[2.0], pool_models=True)
    assert pooled.loc[0, "model"] == mg.POOLED
    assert pooled.loc[0, "estimate"] == pytest.approx((0.9 / 3 + 0.6) / 2)
    assert (pooled.loc[0, "n_images"], pooled.loc[0, "n_models"]) == (6, 2)
    each = mg.robust_accuracy(margins, accuracy, epsilons=[2.0])
    assert each["estimate"].tolist() == pytest.approx([0.3, 0.6])


def test_robust_accuracy_needs_the_accuracy_of_every_tool() -> None:
    with pytest.raises(ParameterError, match="accuracy table"):
        mg.robust_accuracy(margin_table([1.0], sources=[2]), accuracy_table([(0, 1, 0, 5, 5)]),
                           epsilons=[0.0])


def two_epochs(first: list[float], last: list[float], *, model: int = 0) -> pd.DataFrame:
    return pd.concat([margin_table(first, epoch=1, model=model),
                      margin_table(last, epoch=5, model=model)], ignore_index=True)


def test_a_margin_that_doubles_grows_by_a_factor_two() -> None:
    first = list(np.linspace(0.01, 0.05, 12))
    change = mg.margin_change(two_epochs(first, [2 * v for v in first]))
    row = change.iloc[0]
    assert row["factor"] == pytest.approx(2.0) and row["direction"] == "grows"
    assert (row["first_epoch"], row["last_epoch"], row["n_images"]) == (1, 5, 12)
    assert (row["grew"], row["shrank"], row["unresolved"], row["n_attacks"]) == (12, 0, 0, 144)


def test_margin_change_shrinks_and_stays_inconclusive() -> None:
    first = np.linspace(0.01, 0.05, 20)
    shrink = mg.margin_change(two_epochs(list(first), list(first * 0.7)))
    assert shrink.loc[0, "direction"] == "shrinks"
    mixed = first * np.where(np.arange(20) % 2 == 0, 1.5, 1 / 1.5)
    assert mg.margin_change(two_epochs(list(first), list(mixed))).loc[0, "direction"] == \
        "inconclusive"


def test_inf_at_one_end_counts_in_its_direction_and_both_ends_are_dropped() -> None:
    first = [0.01, 0.02, 0.03, 0.04, math.inf, math.inf]
    last = [0.01, 0.02, math.inf, math.inf, 0.05, math.inf]
    pairs = mg.paired_log_ratios(two_epochs(first, last))
    assert pairs["log_ratio"].tolist()[:5] == [0.0, 0.0, math.inf, math.inf, -math.inf]
    assert math.isnan(pairs["log_ratio"].iloc[5])
    row = mg.margin_change(two_epochs(first, last)).iloc[0]
    assert (row["grew"], row["shrank"], row["unresolved"], row["n_images"]) == (2, 1, 1, 5)
    assert row["estimate"] == 0.0  # median of (0, 0, inf, inf, -inf)


def test_direction_reads_infinite_bounds() -> None:
    assert mg.direction(statistics.Interval(math.inf, 0.2, math.inf, 9)) == "grows"
    assert mg.direction(statistics.Interval(math.inf, math.inf, math.inf, 9)) == "grows"
    assert mg.direction(statistics.Interval(-0.3, -math.inf, -0.1, 9)) == "shrinks"
    assert mg.direction(statistics.Interval(0.1, -0.1, math.inf, 9)) == "inconclusive"
    assert mg.direction(statistics.Interval(0.1, np.nan, np.nan, 1)) == "inconclusive"


def test_margin_change_pooled_over_models() -> None:
    first = list(np.linspace(0.01, 0.05, 10))
    margins = pd.concat([two_epochs(first, [1.5 * v for v in first], model=0),
                         two_epochs(first, [1.2 * v for v in first], model=1)],
                        ignore_index=True)
    change = mg.margin_change(margins)
    assert change["model"].tolist() == [0, 1, mg.POOLED]
    assert change["factor"].iloc[:2].tolist() == pytest.approx([1.5, 1.2])
    pooled = change.iloc[2]
    assert (pooled["n_images"], pooled["n_models"]) == (20, 2)
    # two models: half the resamples draw one model twice, so the bounds are the two factors
    assert (pooled["factor_low"], pooled["factor_high"]) == pytest.approx((1.2, 1.5))


def test_epsilon_grid_spans_the_finite_margins() -> None:
    grid = mg.epsilon_grid(margin_table([0.5, 2.0, math.inf]), norm="linf", points=5)
    assert grid.tolist() == [0.0, 0.5, 1.0, 1.5, 2.0]
