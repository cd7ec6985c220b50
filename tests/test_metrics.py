"""Aggregates and paired comparisons (lib/analysis/aggregates.py, paired.py, trends.py) on
hand-made results tables: the image (and the model) as the unit of every interval."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from lib import NUM_CLASSES
from lib.analysis import aggregates, paired, statistics, trends
from lib.run.tables import RESULT_COLUMNS

PAIRS = [(0, 1), (0, 2), (1, 0), (2, 0)]  # the four attacks of each (epoch, schedule)

# (schedule, epoch) -> four attacks: (success, iterations, mean_lr x255, l1 x255)
ATTACKS = {
    ("constant", 1): [(True, 3, 1.0, 4), (True, 3, 1.0, 4), (True, 5, 1.0, 6), (True, 5, 1.0, 6)],
    ("iteration", 1): [(True, 6, 0.5, 3)] * 4,
    ("exponential", 1): [
        (True, 10, 0.2, 1),
        (True, 10, 0.2, 2),
        (True, 10, 0.2, 3),
        (False, 100, 0.02, 4),
    ],
    ("step", 1): [
        (True, 20, 0.1, 1),
        (True, 20, 0.1, 1),
        (False, 100, 0.02, 2),
        (False, 100, 0.02, 2),
    ],
    ("loss-adaptive", 1): [(True, 8, 0.3, 2)] * 4,
}
for (name, _), attacks in list(ATTACKS.items()):
    ATTACKS[(name, 2)] = attacks
ATTACKS[("step", 2)] = [
    (True, 20, 0.1, 1),
    (True, 20, 0.1, 1),
    (True, 30, 0.1, 1),
    (True, 30, 0.1, 1),
]
SCHEDULES = ["constant", "iteration", "exponential", "step", "loss-adaptive"]


def results_table(attacks=ATTACKS, *, nonfinite: bool = True) -> pd.DataFrame:
    rows = []
    for epoch in sorted({e for _, e in attacks}):
        row_id = 0
        for name in SCHEDULES:
            for (source, target), (success, iterations, lr_255, l1_255) in zip(
                PAIRS, attacks.get((name, epoch), []), strict=False
            ):
                rows.append(
                    {
                        "model": 0,
                        "epoch": epoch,
                        "schedule": name,
                        "mode": "targeted",
                        "row_id": row_id,
                        "image_id": f"img{source}",
                        "source": source,
                        "target": target,
                        "success": success,
                        "iterations": iterations,
                        "mean_lr": lr_255 / 255,
                        "l1": l1_255 / 255,
                        "l1_255": float(l1_255),
                        "l2": 0.1,
                        "linf": 0.01,
                        "target_prob": 0.5 if success else 0.1,
                        "final_class": target if success else source,
                        "status": "ok",
                        "refined_l1": l1_255 / 255,
                        "refined_l2": 0.1,
                        "refined_linf": 0.01,
                        "refine_forwards": 0,
                        "certified_at": pd.NA,  # the full loop's row
                        "certify_checks": 0,
                    }
                )
                row_id += 1
    if nonfinite:
        rows.append(
            {
                **rows[-1],
                "row_id": 999,
                "success": False,
                "l1": np.nan,
                "l1_255": np.nan,
                "refined_l1": np.nan,
                "status": "nonfinite",
                "final_class": -1,
            }
        )
    return pd.DataFrame(rows)[list(RESULT_COLUMNS)]


def test_success_rates() -> None:
    rates = aggregates.success_rates(results_table()).set_index(["epoch", "schedule"])
    assert (rates["model"] == 0).all()
    assert rates.loc[(1, "step"), "images"] == 3  # img0 (two targets), img1, img2
    assert rates.loc[(1, "step"), "success_rate"] == 0.5
    assert rates.loc[(2, "step"), "success_rate"] == 1.0
    assert rates.loc[(1, "exponential"), "success_rate"] == 0.75
    assert rates.loc[(2, "loss-adaptive"), "success_rate"] == 1.0  # nonfinite row skipped
    assert rates.loc[(2, "loss-adaptive"), "skipped"] == 1
    assert rates.loc[(2, "loss-adaptive"), "attacks"] == 4
    assert rates["skipped"].sum() == 1
    # rows in the stage's schedule order within each epoch
    assert aggregates.success_rates(results_table())["schedule"].tolist()[:5] == SCHEDULES


def test_mean_l1_counts_successful_attacks_only() -> None:
    table = aggregates.mean_l1(results_table()).set_index(["epoch", "schedule"])
    assert table.loc[(1, "constant"), "mean_l1_255"] == pytest.approx(5.0)
    assert table.loc[(1, "constant"), "successes"] == 4
    assert table.loc[(1, "exponential"), "mean_l1_255"] == pytest.approx(2.0)  # not 2.5
    assert table.loc[(1, "exponential"), "successes"] == 3
    assert table.loc[(1, "step"), "mean_l1_255"] == pytest.approx(1.0)
    assert table.loc[(1, "iteration"), "sd_l1_255"] == pytest.approx(0.0)
    assert table.loc[(1, "constant"), "images"] == 3
    assert table.loc[(1, "exponential"), "images"] == 2  # img2's one attack failed


def test_mean_l1_keeps_a_schedule_without_successes() -> None:
    attacks = {("constant", 1): [(False, 100, 0.1, 3)] * 4, ("step", 1): [(True, 2, 1, 1)] * 4}
    table = aggregates.mean_l1(results_table(attacks, nonfinite=False)).set_index("schedule")
    assert table.loc["constant", "successes"] == 0
    assert np.isnan(table.loc["constant", "mean_l1_255"])


def test_iterations_and_lr_at_every_models_last_epoch() -> None:
    table = aggregates.iterations_and_lr(results_table()).set_index("schedule")
    assert (table["epoch"] == 2).all()
    assert table.loc["step", "mean_iterations"] == 25.0
    assert table.loc["exponential", "mean_iterations"] == pytest.approx(32.5)  # failures count
    assert table.loc["constant", "mean_lr_255"] == pytest.approx(1.0)
    assert table.loc["loss-adaptive", "attacks"] == 4
    # a second model attacked at epoch 1 only: its last epoch is 1
    one_epoch = results_table(nonfinite=False)
    one_epoch = one_epoch[one_epoch["epoch"] == 1].assign(model=1)
    both = aggregates.iterations_and_lr(pd.concat([results_table(), one_epoch]))
    second = both[both["model"] == 1].set_index("schedule")
    assert (second["epoch"] == 1).all() and second.loc["step", "mean_iterations"] == 60.0
    assert len(both) == 2 * len(SCHEDULES)


def test_class_pair_matrix_cells() -> None:
    matrix = aggregates.class_pair_l1(results_table())
    assert len(matrix) == 2 * len(SCHEDULES) * NUM_CLASSES * (NUM_CLASSES - 1)
    cell = matrix.set_index(["epoch", "schedule", "source", "target"])
    assert (matrix["model"] == 0).all()
    assert cell.loc[(1, "constant", 0, 1), "mean_l1_255"] == pytest.approx(4.0)
    assert cell.loc[(1, "constant", 1, 0), "mean_l1_255"] == pytest.approx(6.0)
    assert cell.loc[(1, "constant", 1, 0), "source_tool"] == "Bipolar"
    assert cell.loc[(1, "step", 1, 0), "attacks"] == 1
    assert cell.loc[(1, "step", 1, 0), "successes"] == 0
    assert np.isnan(cell.loc[(1, "step", 1, 0), "mean_l1_255"])
    assert cell.loc[(1, "constant", 3, 4), "attacks"] == 0


def test_l1_histogram_counts_every_successful_attack() -> None:
    histogram = aggregates.l1_histogram(results_table(), bins=6)
    counts = histogram.groupby("schedule")["count"].sum().to_dict()
    assert counts == {
        "constant": 4,
        "iteration": 4,
        "exponential": 3,
        "step": 4,
        "loss-adaptive": 4,
    }
    assert histogram["bin_end_255"].max() == pytest.approx(6.0)
    assert len(histogram) == 6 * len(SCHEDULES)


def test_trace_summary_averages_over_running_attacks() -> None:
    results = results_table({("constant", 1): [(True, 2, 1, 1), (True, 3, 1, 1)]}, nonfinite=False)
    nan = np.nan
    traces = {
        "model": np.array([0, 0]),
        "epoch": np.array([1, 1]),
        "row_id": np.array([0, 1]),
        "lr": np.array([[1.0, 1.0, nan, nan], [1.0, 3.0, 1.0, nan]]) / 255,
        "loss": np.array([[2.0, 1.0, nan, nan], [4.0, 3.0, 2.0, nan]]),
    }
    summary = aggregates.trace_summary(traces, results)
    assert summary["iteration"].tolist() == [1, 2, 3]
    assert summary["running"].tolist() == [2, 2, 1]
    assert np.allclose(summary["mean_lr_255"], [1.0, 2.0, 1.0])
    assert np.allclose(summary["mean_loss"], [3.0, 2.0, 2.0])


def test_trace_summary_averages_losses_over_the_attacks_that_have_them() -> None:
    # row 1 was finished by the certified stop after update 1: its step sizes go on to the end
    # of the budget (as in the full loop), its losses end at its last iterate
    results = results_table({("step", 1): [(True, 2, 1, 1), (False, 3, 1, 1)]}, nonfinite=False)
    nan = np.nan
    traces = {
        "model": np.array([0, 0]),
        "epoch": np.array([1, 1]),
        "row_id": np.array([0, 1]),
        "lr": np.array([[1.0, 1.0, nan], [1.0, 0.5, 0.25]]) / 255,
        "loss": np.array([[2.0, 1.0, nan], [4.0, nan, nan]]),
    }
    summary = aggregates.trace_summary(traces, results)
    assert summary["running"].tolist() == [2, 2, 1]
    assert np.allclose(summary["mean_lr_255"], [1.0, 0.75, 0.25])
    assert np.allclose(summary["mean_loss"], [3.0, 1.0, nan], equal_nan=True)


def test_lr0_sensitivity() -> None:
    sweep = pd.concat(
        [results_table(nonfinite=False).assign(lr0=value) for value in (1 / 255, 2 / 255)],
        ignore_index=True,
    )
    sweep = sweep[sweep["epoch"] == 1]
    table = aggregates.lr0_sensitivity(sweep)
    assert len(table) == 2 * len(SCHEDULES)
    assert np.allclose(sorted(table["lr0_255"].unique()), [1.0, 2.0])
    table = table.set_index(["lr0", "schedule"])
    assert table.loc[(1 / 255, "step"), "success_rate"] == 0.5
    row = table.loc[(2 / 255, "exponential")]
    assert row["mean_l1_255"] == pytest.approx(2.0)
    assert row["mean_iterations"] == pytest.approx(32.5)


def test_skipped_counts() -> None:
    skipped = aggregates.skipped_counts(results_table())
    assert skipped.to_dict("records") == [
        {"model": 0, "epoch": 2, "schedule": "loss-adaptive", "status": "nonfinite", "count": 1}
    ]


def many_attacks(spec: dict, *, images: int = 30, epochs=(1, 2), model: int = 0,
                 seed: int = 0) -> pd.DataFrame:
    """Two targets per image and ``images`` images per epoch; ``spec[(schedule, epoch)]`` (or
    ``spec[schedule]``) maps the row's position k to (success, iterations, l1 x255)."""
    rng = np.random.default_rng(seed)
    base = rng.uniform(1, 10, 2 * images)  # the pair's difficulty, shared by every schedule
    rows = []
    for epoch in epochs:
        row_id = 0
        for name in SCHEDULES:
            rule = spec.get((name, epoch), spec.get(name))
            if rule is None:
                continue
            for k in range(2 * images):
                source = (k // 2) % NUM_CLASSES
                target = (source + 1 + k % 2) % NUM_CLASSES
                success, iterations, l1_255 = rule(k, base[k])
                rows.append({"model": model, "epoch": epoch, "schedule": name,
                             "mode": "targeted",
                             "row_id": row_id, "image_id": f"img{k // 2}", "source": source,
                             "target": target, "success": success, "iterations": iterations,
                             "mean_lr": 1 / 255, "l1": l1_255 / 255, "l1_255": l1_255,
                             "l2": 0.1, "linf": 0.01, "target_prob": 0.5,
                             "final_class": target if success else source, "status": "ok",
                             # what the engine writes when the refinement is off
                             "refined_l1": l1_255 / 255, "refined_l2": 0.1,
                             "refined_linf": 0.01, "refine_forwards": 0,
                             "certified_at": pd.NA, "certify_checks": 0})
                row_id += 1
    return pd.DataFrame(rows)[list(RESULT_COLUMNS)]


def prediction_table(correct: dict[int, int], *, images: int = 100,
                     model: int = 0) -> pd.DataFrame:
    """``correct[epoch]`` of ``images`` test images right (the first ones), label 0."""
    return pd.DataFrame([(model, epoch, f"t{k}", 0, 0 if k < right else 1)
                         for epoch, right in correct.items() for k in range(images)],
                        columns=["model", "epoch", "image_id", "label", "predicted"])


AGREEING = {
    "constant": lambda k, b: (True, 5, b + 3),
    "iteration": lambda k, b: (True, 8, b + 2 + 0.01 * (k % 3)),
    "loss-adaptive": lambda k, b: (True, 10, b + 1),
    "step": lambda k, b: (k % 3 != 0, 40 if k % 3 else 100, b + 0.5),
    "exponential": lambda k, b: (k % 2 == 0, 60 if k % 2 == 0 else 100, b + 0.2),
}


def test_aggregates_carry_image_bootstrap_intervals() -> None:
    rates = aggregates.success_rates(results_table()).set_index(["epoch", "schedule"])
    # 2 of 4, both on img0 (its two targets), none on img1 and img2: three units. A draw of
    # the images gives 0 (no img0), 2/4, 4/5 or 1 (img0 thrice, probability 1/27 > 2.5 %)
    row = rates.loc[(1, "step")]
    assert (row["success_rate_low"], row["success_rate_high"]) == (0.0, 1.0)
    # 4 of 4 on three images: every resample agrees, so the Wilson interval of 3 of 3 units
    row = rates.loc[(2, "loss-adaptive")]
    wilson = statistics.wilson_interval(3, 3)
    assert (row["success_rate_low"], row["success_rate_high"]) == (wilson.low, wilson.high)
    table = aggregates.mean_l1(results_table()).set_index(["epoch", "schedule"])
    row = table.loc[(1, "constant")]  # 4, 4, 6, 6
    assert row["mean_l1_255_low"] <= 5.0 <= row["mean_l1_255_high"]
    assert 4.0 <= row["mean_l1_255_low"] and row["mean_l1_255_high"] <= 6.0
    assert table.loc[(1, "iteration"), "mean_l1_255_low"] == pytest.approx(3.0)  # all equal
    assert table.loc[(1, "constant"), "median_l1_255"] == pytest.approx(5.0)
    effort = aggregates.iterations_and_lr(results_table()).set_index("schedule")
    assert effort.loc["step", "mean_iterations_low"] <= 25 <= effort.loc["step",
                                                                          "mean_iterations_high"]
    assert aggregates.mean_l1(results_table()).equals(aggregates.mean_l1(results_table()))  # seeded


def test_paired_schedule_differences_per_epoch() -> None:
    table = paired.paired_schedule_differences(many_attacks(AGREEING))
    assert set(table["schedule"]) == {"iteration", "loss-adaptive", "step", "exponential"}
    row = table.set_index(["epoch", "schedule"]).loc[(1, "step")]
    assert row["pairs"] == 40  # step succeeded on 40 of the 60 rows, constant on all
    assert row["images"] == 30  # every image has a success among its two targets
    assert row["mean_difference"] == pytest.approx(-2.5)
    assert row["low"] == row["high"] == pytest.approx(-2.5)  # the same difference everywhere
    assert row["p_signed_rank"] < 1e-5  # 30 images, every one below 0
    iterations = paired.paired_schedule_differences(
        many_attacks(AGREEING), value="iterations", successful_only=False, scale=1.0)
    row = iterations.set_index(["epoch", "schedule"]).loc[(2, "exponential")]
    assert row["pairs"] == 60 and row["mean_difference"] == pytest.approx(75.0)  # 80 - 5
    assert paired.paired_schedule_differences(many_attacks(AGREEING), reference="none").empty


def with_refinement(results: pd.DataFrame, overshoot_255: dict[str, float]) -> pd.DataFrame:
    """Refined distances: l1 less a schedule's fixed overshoot (NaN for failed attacks)."""
    cut = results["schedule"].map(overshoot_255) / 255
    hit = results["success"].astype(bool)
    return results.assign(refined_l1=(results["l1"] - cut).where(hit),
                          refined_l2=results["l2"].where(hit),
                          refined_linf=results["linf"].where(hit),
                          refine_forwards=np.where(hit, 4, 0))


def test_refinement_absent_and_present() -> None:
    plain = many_attacks(AGREEING)
    assert not aggregates.refined_available(plain)
    assert aggregates.refinement_ranking(plain) is None
    # refinement switched off: the stage writes the path distances and 0 forwards
    off = plain.assign(refined_l1=plain["l1"], refined_l2=plain["l2"],
                       refined_linf=plain["linf"], refine_forwards=0)
    assert not aggregates.refined_available(off) and aggregates.refinement_ranking(off) is None
    no_values = with_refinement(plain, {}).assign(refined_l1=np.nan)
    assert aggregates.refinement_ranking(no_values) is None
    # constant overshoots by 2.9/255: once removed it is the smallest (b + 0.1)
    refined = with_refinement(plain, {"constant": 2.9, "iteration": 0.0, "loss-adaptive": 0.0,
                                      "step": 0.0, "exponential": 0.0})
    ranking = aggregates.refinement_ranking(refined).set_index(["epoch", "schedule"])
    assert ranking.loc[(1, "constant"), "mean_overshoot_255"] == pytest.approx(2.9)
    assert ranking.loc[(1, "constant"), "rank_path"] == 5
    assert ranking.loc[(1, "constant"), "rank_refined"] == 1
    assert ranking.loc[(1, "step"), "mean_refine_forwards"] == 4
    assert ranking.loc[(1, "step"), "successes"] == 40
    changes = aggregates.ranking_changes(ranking.reset_index())
    assert changes["changed"].tolist() == [True, True]
    assert changes.loc[0, "order_refined"].startswith("constant < ")
    same = with_refinement(plain, dict.fromkeys(SCHEDULES, 0.1))
    assert not aggregates.ranking_changes(aggregates.refinement_ranking(same))["changed"].any()


def selection_of(results: pd.DataFrame, images: list[str]) -> pd.DataFrame:
    """A selection table: ``images`` attacked at every epoch of every model of ``results``."""
    checkpoints = results[["model", "epoch"]].drop_duplicates()
    return pd.DataFrame([(m, e, image, 0, 0) for m, e in checkpoints.itertuples(index=False)
                         for image in images],
                        columns=["model", "epoch", "image_id", "label", "rank"])


def test_per_image_l1_follows_the_same_targets_across_epochs() -> None:
    results = many_attacks(AGREEING, images=3)  # img0..img2, two targets each
    # img1 is not followed; step fails on row k = 0 (img0, first target) at every epoch
    followed = selection_of(results, ["img0", "img2"])
    table = trends.per_image_l1(results, followed)
    assert set(table["image_id"]) == {"img0", "img2"}
    step = table[(table["schedule"] == "step") & (table["image_id"] == "img0")]
    assert step["targets"].tolist() == [1, 1]
    constant = table[(table["schedule"] == "constant") & (table["image_id"] == "img0")]
    assert constant["targets"].tolist() == [2, 2] and constant["epoch"].tolist() == [1, 2]
    change = trends.per_image_change(table).set_index("schedule")
    assert change.loc["constant", "images"] == 2
    assert change.loc["constant", "mean_change_255"] == pytest.approx(0.0)  # same at 1 and 2
    later = results.assign(l1=np.where(results["epoch"] == 2, results["l1"] + 1 / 255,
                                       results["l1"]))
    moved = trends.per_image_change(trends.per_image_l1(later, followed))
    assert moved.set_index("schedule").loc["iteration", "mean_change_255"] == pytest.approx(1.0)
    assert trends.per_image_change(table[table["epoch"] == 1]).empty


def test_trends_are_per_model() -> None:
    # model 0 moves away from the boundary by 1/255 per image, model 1 toward it by 2/255
    parts = []
    for model, shift in ((0, 1.0), (1, -2.0)):
        results = many_attacks(AGREEING, images=12, model=model, seed=model)
        parts.append(results.assign(l1=np.where(results["epoch"] == 2,
                                                results["l1"] + shift / 255, results["l1"])))
    results = pd.concat(parts, ignore_index=True)
    followed = pd.concat([selection_of(part, [f"img{k}" for k in range(12)]) for part in parts])
    change = trends.per_image_change(trends.per_image_l1(results, followed))
    constant = change[change["schedule"] == "constant"].set_index("model")
    assert constant.loc[0, "mean_change_255"] == pytest.approx(1.0)
    assert constant.loc[1, "mean_change_255"] == pytest.approx(-2.0)
    assert (constant["images"] == 12).all() and (constant["first_epoch"] == 1).all()
    assert len(change) == 2 * len(SCHEDULES)


def test_accuracy_f1_intervals_match_the_training_metrics() -> None:
    from sklearn.metrics import f1_score

    rng = np.random.default_rng(3)
    labels = rng.integers(0, NUM_CLASSES, 200)
    predicted = np.where(rng.random(200) < 0.7, labels, rng.integers(0, NUM_CLASSES, 200))
    table = pd.DataFrame({"model": 0, "epoch": 1, "image_id": [f"t{k}" for k in range(200)],
                          "label": labels, "predicted": predicted})
    (row,) = aggregates.accuracy_f1_intervals(table).to_dict("records")
    assert (row["model"], row["epoch"]) == (0, 1)
    assert row["test_images"] == 200
    assert row["accuracy"] == pytest.approx(np.mean(labels == predicted))
    expected = f1_score(labels, predicted, labels=list(range(NUM_CLASSES)), average="macro",
                        zero_division=0)
    assert row["macro_f1"] == pytest.approx(expected)
    assert row["accuracy_low"] < row["accuracy"] < row["accuracy_high"]
    assert row["macro_f1_low"] < row["macro_f1"] < row["macro_f1_high"]


def test_pooled_intervals_resample_models_then_images() -> None:
    # three models whose success rates differ (all images alike within a model): pooled, the
    # interval is the bootstrap of the three model rates; per model, a point
    rows = []
    for model, rate in ((0, 0.5), (1, 0.7), (2, 0.9)):
        hits = np.arange(10) < 10 * rate
        rows += [{"model": model, "image_id": f"img{i}", "hit": float(h), "epoch": 1}
                 for i in range(8) for h in hits]
    table = pd.DataFrame(rows)
    per_model = aggregates.bootstrap_columns(table, ["model"], "hit", "rate").set_index("model")
    assert (per_model["rate_low"] == per_model["rate_high"]).all()
    assert per_model["images"].tolist() == [8, 8, 8]
    pooled = aggregates.bootstrap_columns(table, ["epoch"], "hit", "rate").iloc[0]
    reference = statistics.bootstrap_statistic((np.array([0.5, 0.7, 0.9]),), np.mean)
    assert (pooled["rate_low"], pooled["rate_high"]) == pytest.approx(
        (reference.low, reference.high), rel=1e-12)
    assert pooled["images"] == 24
