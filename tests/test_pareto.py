"""The fair comparison of schedules (lib/analysis/pareto.py) on hand-made lr0 sweeps."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from lib.analysis import pareto as pr
from lib.analysis import statistics
from lib.errors import ParameterError

IMAGES = [f"img{k:02d}" for k in range(20)]
LR0S = (1 / 255, 2 / 255, 4 / 255)


def sweep_rows(schedule: str, lr0: float, success: float, linf: float,
               rng: np.random.Generator) -> list[dict]:
    """Two targets per image; the first ``success`` share of the attacks succeed."""
    rows = []
    for k, image in enumerate(IMAGES):
        for target in (1, 2):
            solved = (2 * k + target - 1) < success * 2 * len(IMAGES)
            rows.append({"epoch": 5, "lr0": lr0, "schedule": schedule, "image_id": image,
                         "source": 0, "target": target, "success": solved, "status": "ok",
                         "linf": linf * (1 + 0.1 * rng.random()), "l1": linf / 10,
                         "l2": 10 * linf})
    return rows


@pytest.fixture
def sweep() -> pd.DataFrame:
    """"fast" dominates: at every lr0 more success and smaller distances than "slow"."""
    rng = np.random.default_rng(0)
    rows = []
    for k, lr0 in enumerate(LR0S):
        rows += sweep_rows("fast", lr0, 0.9 + 0.025 * k, 0.01 * (k + 1), rng)
        rows += sweep_rows("slow", lr0, 0.3 + 0.2 * k, 0.05 * (k + 1), rng)
    return pd.DataFrame(rows)


def test_the_dominating_schedule_owns_the_front(sweep: pd.DataFrame) -> None:
    points = pr.sweep_points(sweep)
    front = pr.pareto_front(points)
    assert len(front) == 6
    assert set(front.loc[front["pareto_optimal"], "schedule"]) == {"fast"}
    assert front.loc[front["schedule"] == "fast", "pareto_optimal"].all()  # a trade-off each
    assert not front.loc[front["schedule"] == "slow", "pareto_optimal"].any()


def test_points_carry_rates_and_medians_with_intervals(sweep: pd.DataFrame) -> None:
    points = pr.sweep_points(sweep)
    assert list(points.columns) == ["schedule", "lr0", "lr0_255", "norm", "quantity",
                                    "estimate", "low", "high", "n_images", "n_models",
                                    "n_attacks"]
    rate = points[(points["quantity"] == pr.SUCCESS_RATE) & (points["schedule"] == "slow")]
    assert rate["estimate"].tolist() == pytest.approx([0.3, 0.5, 0.7])
    assert (rate["n_images"] == 20).all() and (rate["n_attacks"] == 40).all()
    everything = points[(points["quantity"] == pr.MEDIAN_ALL) & (points["schedule"] == "slow")]
    assert everything["estimate"].iloc[0] == math.inf  # 30 % success: the median is a failure
    assert np.isfinite(everything["estimate"].iloc[2])
    solved = points[points["quantity"] == pr.MEDIAN_SUCCESSES]
    assert (solved["low"] <= solved["estimate"]).all()
    assert (solved["estimate"] <= solved["high"]).all()


def test_dominated_points_by_hand() -> None:
    flags = pr.dominated(np.array([0.9, 0.8, 0.9, 0.5, np.nan]),
                         np.array([1.0, 0.5, 2.0, 0.5, 0.1]))
    assert flags.tolist() == [False, False, True, True, True]


def test_distance_at_matched_success(sweep: pd.DataFrame) -> None:
    table = pr.distance_at_success(sweep, levels=[0.5, 0.9, 0.99])
    fast = table[table["schedule"] == "fast"].set_index("level")["estimate"]
    slow = table[table["schedule"] == "slow"].set_index("level")["estimate"]
    assert fast[0.5] < 0.0111 and fast[0.5] >= 0.01  # lr0 1/255 already reaches 90 %
    assert slow[0.5] >= 0.10 and slow[0.9] == math.inf and fast[0.99] == math.inf
    compared = pr.matched_success_difference(sweep, "fast", "slow", levels=[0.5, 0.9, 0.99])
    assert compared["verdict"].tolist() == [statistics.AGREES, statistics.AGREES,
                                            statistics.INCONCLUSIVE]
    assert compared.loc[1, "estimate"] == -math.inf and math.isnan(compared.loc[2, "estimate"])
    reverse = pr.matched_success_difference(sweep, "slow", "fast", levels=[0.5])
    assert reverse.loc[0, "verdict"] == statistics.DISAGREES


def test_a_schedule_that_never_reaches_the_level_loses(sweep: pd.DataFrame) -> None:
    never = sweep[sweep["schedule"] == "slow"].assign(schedule="never", success=False)
    compared = pr.matched_success_difference(pd.concat([sweep, never]), "fast", "never",
                                             levels=[0.5])
    row = compared.iloc[0]
    assert (row["estimate"], row["low"], row["high"]) == (-math.inf, -math.inf, -math.inf)
    assert row["verdict"] == statistics.AGREES
    assert pr.closer_verdict(math.inf, math.inf, math.inf) == statistics.DISAGREES
    assert pr.closer_verdict(-1.0, -math.inf, 0.5) == statistics.INCONCLUSIVE


def test_paired_at_lr0_on_joint_successes() -> None:
    rng = np.random.default_rng(1)
    a = pd.DataFrame(sweep_rows("a", 0.01, 1.0, 0.02, rng))
    b = a.assign(schedule="b", linf=a["linf"] + 0.005)
    b.loc[b.index[:4], "success"] = False  # those four pairs leave the comparison
    paired = pr.paired_at_lr0(pd.concat([a, b], ignore_index=True), "a", "b")
    row = paired.iloc[0]
    assert row["estimate"] == pytest.approx(-0.005) and row["n_attacks"] == 36
    assert row["low"] == pytest.approx(-0.005) and row["high"] == pytest.approx(-0.005)


def test_a_sweep_of_several_epochs_is_refused(sweep: pd.DataFrame) -> None:
    with pytest.raises(ParameterError, match="one epoch"):
        pr.sweep_points(pd.concat([sweep, sweep.assign(epoch=1)]))
    with pytest.raises(ParameterError, match="levels"):
        pr.distance_at_success(sweep, levels=[0.0])


def test_the_closer_claim_needs_every_comparison(sweep: pd.DataFrame) -> None:
    fast = sweep[sweep["schedule"] == "fast"]
    jitter = np.random.default_rng(3).uniform(0.9, 1.1, len(fast))
    third = fast.assign(schedule="twin", linf=fast["linf"] * jitter)  # about as close as "fast"
    table = pd.concat([sweep, third], ignore_index=True)
    won = pr.closer_at_matched_success(table, "fast", ["slow"], levels=[0.5],
                                       norms=["linf", "l1"])
    assert won["norm"].tolist() == ["linf", "l1"]
    assert (won["claim_verdict"] == statistics.AGREES).all()
    tied = pr.closer_at_matched_success(table, "fast", ["slow", "twin"], levels=[0.5])
    assert tied["verdict"].tolist() == [statistics.AGREES, statistics.INCONCLUSIVE]
    assert (tied["claim_verdict"] == statistics.INCONCLUSIVE).all()
    assert tied["decisive"].tolist() == [False, True]
    lost = pr.closer_at_matched_success(table, "slow", ["fast", "twin"], levels=[0.5])
    assert (lost["claim_verdict"] == statistics.DISAGREES).all()
    # a schedule the sweep did not run cannot make the claim agree
    absent = pr.closer_at_matched_success(table, "fast", ["slow", "cosine"], levels=[0.5])
    assert (absent["claim_verdict"] == statistics.INCONCLUSIVE).all()
    assert pr.closer_at_matched_success(table, "cosine", ["slow"], levels=[0.5]).empty


def test_several_models_are_resampled_models_then_images(sweep: pd.DataFrame) -> None:
    models = pd.concat([sweep.assign(model=m) for m in ("m1", "m2", "m3")], ignore_index=True)
    points = pr.sweep_points(models)
    rates = points["quantity"] == pr.SUCCESS_RATE
    assert (points["n_models"] == 3).all() and (points.loc[rates, "n_images"] == 60).all()
    one = pr.sweep_points(sweep)
    # identical models: the same estimates as one model
    assert points.loc[rates, "estimate"].tolist() == pytest.approx(
        one.loc[one["quantity"] == pr.SUCCESS_RATE, "estimate"].tolist())
    matched = pr.matched_success_difference(models, "fast", "slow", levels=[0.5])
    assert (matched.loc[0, "n_models"], matched.loc[0, "verdict"]) == (3, statistics.AGREES)
