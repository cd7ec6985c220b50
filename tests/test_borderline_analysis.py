"""The borderline-training arms compared and judged (lib/analysis/arms.py, arm_verdicts.py), on
hand-made tables whose answers are known."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from lib.analysis import arm_verdicts, arms, statistics

MODELS = ("start", "control", "borderline", "pgd")


def margins_table(values: dict[str, list[float]], *, norm: str = "linf") -> pd.DataFrame:
    """An fmn_margins table: one row per (model, image); margin 0 means misclassified."""
    rows = []
    for model, margins in values.items():
        for i, margin in enumerate(margins):
            rows.append({"model": model, "image_id": f"img{i}", "label": i % 7, "norm": norm,
                         "correct": margin > 0, "success": math.isfinite(margin) and margin > 0,
                         "margin": margin})
    return pd.DataFrame(rows)


def test_the_paired_change_is_the_median_log_ratio_per_image() -> None:
    fmn = margins_table({"control": [0.01, 0.02, 0.0, 0.04, 0.0],
                         "borderline": [0.02, 0.04, 0.01, 0.0, 0.0]})
    row = arms.paired_change(fmn, model="borderline", against="control", norm="linf")
    # log ratios: log 2, log 2, +inf (misclassified by control only), -inf; img4: both 0
    assert row["estimate"] == pytest.approx(math.log(2))
    assert row["factor"] == pytest.approx(2.0)
    assert (row["grew"], row["shrank"], row["unresolved"], row["n_images"]) == (3, 1, 1, 4)
    assert row["median_model"] == pytest.approx(0.01)  # of all five paired images
    assert row["median_against"] == pytest.approx(0.01)


def test_a_margin_doubled_on_every_image_grows_and_the_claim_agrees() -> None:
    control = list(np.linspace(0.01, 0.05, 12))
    fmn = pd.concat([
        margins_table({"control": control, "borderline": [2 * m for m in control],
                       "pgd": control}),
        margins_table({"control": control, "borderline": [0.5 * m for m in control],
                       "pgd": control}, norm="l2"),
    ])
    compared = arms.comparisons(fmn)
    linf = compared[(compared["model"] == "borderline") & (compared["against"] == "control")
                    & (compared["norm"] == "linf")].iloc[0]
    assert linf["direction"] == "grows"
    assert linf["low"] == pytest.approx(math.log(2)) == pytest.approx(linf["high"])
    accuracy = statistics.Interval(-0.005, -0.01, 0.0, 1000)  # borderline - control
    claims = arm_verdicts.arm_claims(compared, accuracy, accuracy_cost=2.0, pgd_mismatch=0.05)
    assert list(claims["verdict"]) == [statistics.AGREES, statistics.AGREES, statistics.AGREES,
                                       statistics.DISAGREES]
    assert claims.loc[1, "estimate"] == pytest.approx(0.5)  # points lost
    assert (claims.loc[1, "low"], claims.loc[1, "high"]) == pytest.approx((0.0, 1.0))
    # the same margins compared with PGD at a cost 30 % apart: not at equal cost
    unequal = arm_verdicts.arm_claims(compared, accuracy, accuracy_cost=2.0, pgd_mismatch=0.3)
    assert unequal.loc[2, "verdict"] == statistics.INCONCLUSIVE
    assert "not at equal cost" in unequal.loc[2, "detail"]


def test_an_accuracy_cost_above_the_allowed_one_disagrees() -> None:
    compared = arms.comparisons(margins_table({"control": [0.01, 0.02],
                                               "borderline": [0.02, 0.03]}))
    lost = statistics.Interval(-0.2, -0.25, -0.15, 1000)  # 15 to 25 points lost
    claims = arm_verdicts.arm_claims(compared, lost, accuracy_cost=2.0, pgd_mismatch=0.0)
    assert claims.loc[1, "verdict"] == statistics.DISAGREES
    assert claims.loc[2, "verdict"] == statistics.INCONCLUSIVE  # no PGD margins: no interval


def test_robust_accuracy_is_the_share_correct_with_a_margin_above_epsilon() -> None:
    fmn = margins_table({"control": [0.0, 0.15, 0.25, 0.3]})
    curve = arms.robust_accuracy_curves(fmn, norm="linf", points=4)
    assert list(curve["epsilon"]) == pytest.approx([0.0, 0.1, 0.2, 0.3])
    assert list(curve["estimate"]) == pytest.approx([0.75, 0.75, 0.5, 0.0])
    assert (curve["low"] <= curve["estimate"]).all() and (curve["estimate"] <= curve["high"]).all()
    assert (curve["n_images"] == 4).all()


def test_the_best_known_margin_is_the_smallest_any_attack_found() -> None:
    fmn = margins_table({"control": [0.0, 0.1, 0.2], "borderline": [0.05, 0.3, math.inf]})
    transfer = margins_table({"borderline": [0.0, 0.2, 0.4]}).rename(
        columns={"margin": "distance"})
    best = arms.best_known(fmn, transfer)
    assert list(best["margin"]) == pytest.approx([0.0, 0.1, 0.2, 0.0, 0.2, 0.4])
    assert list(best.columns) == list(fmn.columns)


def test_the_margin_summary_counts_found_boundaries() -> None:
    fmn = margins_table({"control": [0.0, 0.1, 0.2, math.inf]})
    row = arms.margin_summary(fmn).iloc[0]
    assert (row["images"], row["correct"], row["found"]) == (4, 3, 2)
    assert row["median"] == pytest.approx(0.15)


def test_the_paired_accuracy_change_counts_each_image_once() -> None:
    ids = [f"t{i}" for i in range(10)]
    labels = [0] * 10
    control = pd.DataFrame({"image_id": ids, "label": labels, "predicted": [0] * 8 + [1] * 2})
    border = pd.DataFrame({"image_id": ids[::-1], "label": labels,
                           "predicted": [1] * 3 + [0] * 7})  # ids reversed: t9, t8, t7 wrong
    change = arms.accuracy_change(border, control)
    assert change.estimate == pytest.approx(0.7 - 0.8) and change.n == 10
    assert change.low < change.estimate < change.high


def test_the_cost_table_gives_passes_per_image_and_the_multiple_of_control() -> None:
    def steps(passes: float, attack: int) -> pd.DataFrame:
        return pd.DataFrame({"epoch": [6, 6], "step": [1, 2], "images": [64, 64],
                             "train_passes": [64, 64], "attack_passes": [attack, attack],
                             "forwards": [0, 0], "passes": [passes, passes]})

    timings = pd.DataFrame({"model": ["control", "borderline"], "phase": ["training"] * 2,
                            "epochs": [1, 2], "seconds": [10.0, 80.0]})
    costs = arms.cost_table({"borderline": steps(512.0, 448), "control": steps(64.0, 0)},
                            timings).set_index("model")
    assert list(costs.index) == ["control", "borderline"]  # in the book's order
    assert costs.loc["borderline", "passes"] == 8.0 and costs.loc["borderline", "attack"] == 7.0
    assert costs.loc["borderline", "multiple"] == 8.0
    assert costs.loc["borderline", "seconds_per_epoch"] == 40.0


@pytest.mark.parametrize(("robust", "passed"), [(20, True), (6, False)])
def test_the_held_out_guard_catches_a_collapse(robust: int, passed: bool) -> None:
    held = pd.DataFrame({"model": ["start", "pgd", "pgd"], "epoch": [5, 6, 7],
                         "images": [64] * 3, "correct": [60] * 3, "robust": [32, 30, robust]})
    outcome = arm_verdicts.held_out_guard(held, "pgd")
    assert outcome.passed is passed
    assert outcome.value == pytest.approx(min(30 / 32, robust / 30))


def measured_tables(*, flat: str | None = None) -> dict[str, pd.DataFrame]:
    """Measurement tables of four models on three images; ``flat``: a model whose gradient
    is zero everywhere (a masked model)."""
    fmn = pd.concat([margins_table({m: [0.01, 0.02, 0.03] for m in MODELS}, norm=norm)
                     for norm in ("linf", "l2")])
    transfer = margins_table({m: [0.02, 0.03, 0.04] for m in MODELS if m != "control"}).rename(
        columns={"margin": "distance"}).assign(scale=1.0)
    gradients = pd.DataFrame([{"model": m, "image_id": f"img{i}", "correct": True,
                               "grad_l1": 0.0 if m == flat else 5.0} for m in MODELS
                              for i in range(3)])
    held = pd.DataFrame({"model": list(MODELS), "epoch": [5, 6, 6, 6], "images": 8,
                         "correct": 8, "robust": 4})
    modes = pd.DataFrame([{"model": m, "attack": f"fmn_{n}", "forwards": 10,
                           "train_forwards": 0, "restored": True}
                          for m in MODELS for n in ("linf", "l2")])
    return {"fmn_margins": fmn, "transfer": transfer, "gradients": gradients,
            "held_out": held, "attack_modes": modes}


def test_every_guard_of_every_model_is_a_row_and_a_masked_gradient_fails() -> None:
    guards = arm_verdicts.guard_table(measured_tables())
    # start: 2 success + transfer + gradient + 2 modes; control: no transfer, held-out;
    # borderline and pgd: all seven
    assert guards.groupby("model").size().to_dict() == {"start": 6, "control": 6,
                                                        "borderline": 7, "pgd": 7}
    assert guards["passed"].all()
    masked = arm_verdicts.guard_table(measured_tables(flat="borderline"))
    failed = masked[~masked["passed"]]
    assert list(zip(failed["model"], failed["guard"], strict=True)) == [
        ("borderline", "gradient not vanishing")]
    sentences = arm_verdicts.findings(
        arm_verdicts.arm_claims(arms.comparisons(measured_tables()["fmn_margins"]),
                                statistics.Interval(0.0, -0.01, 0.01, 100),
                                accuracy_cost=2.0, pgd_mismatch=0.0),
        arms.comparisons(measured_tables()["fmn_margins"]), masked, pgd_mismatch=0.0)
    assert "1 of 26 guard checks failed (borderline: gradient not vanishing)" in sentences["guards"]
    assert "by a factor 1.00" in sentences["linf"]
    assert "widens the margin is contradicted (verdict: disagrees)" in sentences["linf"]
    assert ("costs at most 2 points of clean accuracy holds (verdict: agrees)"
            in sentences["accuracy"])
