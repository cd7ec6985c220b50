"""Tests of lib.analysis.minimality and lib.attack.reference: the best-known L1 reference, the
ratio and the optimality score."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from lib.analysis import minimality, minimality_norms
from lib.attack import reference
from lib.errors import ParameterError

SHAPE = (3, 4, 4)
SOURCE, TARGET, NUM_CLASSES = 0, 1, 7


class TargetMargin(nn.Module):
    """7-class linear model: logit[TARGET] = w.x + c, logit[SOURCE] = 0, the others -10.

    The prediction is TARGET exactly when w.x + c > 0, so the minimal perturbation towards
    TARGET is the minimal one crossing a hyperplane inside the box [0, 1] (a known answer).
    Seven classes because adv-lib's targeted ALMA needs at least four logits.
    """

    def __init__(self, weight: torch.Tensor, offset: float):
        super().__init__()
        self.weight = nn.Parameter(weight.flatten().clone())
        self.offset = offset

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        margin = images.flatten(1) @ self.weight + self.offset
        others = torch.full((len(images), NUM_CLASSES), -10.0, dtype=images.dtype)
        source = torch.zeros(len(images), 1, dtype=images.dtype)
        return torch.cat([source, margin[:, None], others[:, 2:]], dim=1)


def minimal_l1(weight: torch.Tensor, image: torch.Tensor, offset: float) -> float:
    """Exact minimal mean-L1 change of ``image`` in [0,1] that makes w.x + c reach 0.

    Raising the margin by m through coordinate i costs m / |w_i| and coordinate i can add at
    most |w_i| * (room to the box edge in the sign of w_i): a fractional knapsack, solved by
    spending on the largest |w_i| first.
    """
    w = weight.flatten().double().numpy()
    x = image.flatten().double().numpy()
    needed = -(w @ x + offset)
    gain_room = np.abs(w) * np.where(w > 0, 1 - x, x)
    total = 0.0
    for i in np.argsort(-np.abs(w), kind="stable"):
        if needed <= 0:
            break
        gain = min(gain_room[i], needed)
        total += gain / abs(w[i])
        needed -= gain
    assert needed <= 1e-12, "the test case must be reachable inside the box"
    return total / x.size


@pytest.fixture(scope="module")
def linear_case():
    generator = torch.Generator().manual_seed(0)
    # Heavy-tailed weights: the minimal L1 perturbation moves a few coordinates to the box edge.
    weight = torch.randn(SHAPE, generator=generator) * torch.rand(SHAPE, generator=generator) ** 3
    images = torch.rand((6, *SHAPE), generator=generator)
    offset = -float((images.flatten(1) @ weight.flatten()).max()) - 0.3
    model = TargetMargin(weight, offset)
    exact = np.array([minimal_l1(weight, image, offset) for image in images])
    targets = torch.full((len(images),), TARGET)
    assert (model(images).argmax(dim=1) == SOURCE).all()
    return model, images, targets, exact


@pytest.fixture(scope="module")
def linear_reference(linear_case):
    model, images, targets, _ = linear_case
    return minimality.best_known_l1(
        model, images, targets, steps=(200,), batch_size=4, progress=False
    )


def test_best_known_finds_the_closed_form_minimum(linear_case, linear_reference):
    _, images, _, exact = linear_case
    best = linear_reference.drop_duplicates("sample").sort_values("sample")
    assert len(best) == len(images)
    ratio = best["best_l1"].to_numpy() / exact
    assert (ratio >= 1 - 1e-4).all(), "nothing can beat the exact minimum"
    assert (ratio <= 1.25).all(), ratio


def test_reference_rows_are_checked_and_measured(linear_case, linear_reference):
    model, images, targets, exact = linear_case
    table = linear_reference
    assert len(table) == len(images) * len(reference.DEFAULT_ATTACKS)
    assert set(table["attack"]) == set(reference.DEFAULT_ATTACKS)
    assert (table["steps"] == 200).all()
    successful = table[table["success"]]
    assert len(successful) >= len(images)
    # Every successful L1 is at least the exact minimum: success was checked on the image.
    assert (successful["l1"].to_numpy() >= exact[successful["sample"]] * (1 - 1e-4)).all()
    assert ((table["linf"] >= table["l1"]) & (table["l1"] >= 0)).all()
    assert table["changed_fraction"].between(0, 1).all()
    # The best of a sample is the smallest successful L1 among its rows.
    smallest = successful.groupby("sample")["l1"].min()
    per_sample = table.drop_duplicates("sample").set_index("sample")["best_l1"]
    np.testing.assert_allclose(per_sample.loc[smallest.index], smallest)


@pytest.fixture
def unchanged_attack(monkeypatch):
    """A registered reference attack that returns the images unchanged (it always fails)."""
    monkeypatch.setitem(
        reference.REFERENCE_ATTACKS, "unchanged", lambda model, x, t, *, steps: x.clone()
    )
    return "unchanged"


@pytest.mark.parametrize("batch_size", [1, 4, 64])
def test_failure_is_detected_by_reclassifying(linear_case, unchanged_attack, batch_size):
    model, images, targets, _ = linear_case
    table = minimality.best_known_l1(
        model,
        images,
        targets,
        attacks=[unchanged_attack],
        steps=(5, 7),
        batch_size=batch_size,
        progress=False,
    )
    assert len(table) == 2 * len(images)
    assert sorted(table["sample"].unique()) == list(range(len(images)))
    assert not table["success"].any()
    assert (table["l1"] == 0).all()
    assert np.isinf(table["best_l1"]).all() and (table["best_method"] == "").all()


def test_own_results_join_the_best_known(linear_case, unchanged_attack):
    model, images, targets, _ = linear_case
    keys = pd.DataFrame({"epoch": 3, "image_id": [f"img{i}" for i in range(6)], "target": 1})
    own = pd.DataFrame(
        {
            "epoch": 3,
            "image_id": ["img0", "img0", "img1", "img2"],
            "target": 1,
            "schedule": ["constant", "step", "constant", "step"],
            "success": [True, True, False, True],
            "l1": [0.5, 0.25, 0.125, 0.75],
        }
    )
    table = minimality.best_known_l1(
        model,
        images,
        targets,
        keys=keys,
        own=own,
        attacks=[unchanged_attack],
        steps=(3,),
        progress=False,
    )
    assert list(table.columns[:3]) == ["epoch", "image_id", "target"]
    best = table.set_index("image_id")
    assert (
        best.loc["img0", "best_l1"] == 0.25 and best.loc["img0", "best_method"] == "schedule:step"
    )
    assert math.isinf(best.loc["img1", "best_l1"]), "a failed own row is not a best"
    assert best.loc["img2", "best_method"] == "schedule:step"
    assert math.isinf(best.loc["img5", "best_l1"])


def test_rng_is_seeded_and_restored(linear_case, monkeypatch):
    model, images, targets, _ = linear_case
    draws = []

    def noisy(model, x, t, *, steps):
        draws.append(torch.rand(1).item())
        return x.clone()

    monkeypatch.setitem(reference.REFERENCE_ATTACKS, "noisy", noisy)
    torch.manual_seed(123)
    expected_next = torch.rand(1).item()
    torch.manual_seed(123)
    for _ in range(2):
        reference.run_reference_attacks(
            model, images, targets, attacks=["noisy"], steps=(2,), seed=7, progress=False
        )
    assert torch.rand(1).item() == expected_next, "the caller's RNG state is restored"
    assert draws[0] == draws[1], "each run starts from the same seed"


def test_model_state_is_restored(linear_case, unchanged_attack):
    model, images, targets, _ = linear_case
    model.train()
    reference.run_reference_attacks(
        model, images, targets, attacks=[unchanged_attack], steps=(2,), progress=False
    )
    assert model.training and all(p.requires_grad for p in model.parameters())
    model.eval()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"images": torch.rand(2, 3, 4, 4) * 2}, "in \\[0, 1\\]"),
        ({"targets": torch.tensor([1])}, "targets must have shape"),
        ({"attacks": ["cw"]}, "unknown attack"),
        ({"steps": (1,)}, "steps"),
        ({"keys": pd.DataFrame({"a": [1, 1]})}, "uniquely"),
    ],
)
def test_bad_arguments_are_named(linear_case, change, message):
    model = linear_case[0]
    arguments = {"images": torch.rand(2, 3, 4, 4), "targets": torch.tensor([1, 1])} | change
    images, targets = arguments.pop("images"), arguments.pop("targets")
    with pytest.raises(ParameterError, match=message):
        reference.run_reference_attacks(model, images, targets, progress=False, **arguments)


# --- the measures, on hand-made tables -----------------------------------------------------


def hand_results() -> tuple[pd.DataFrame, pd.DataFrame]:
    """Two schedules at epoch 1 on pairs p1..p3, plus a pair and an epoch without a reference."""
    best = pd.DataFrame(
        {
            "epoch": 1,
            "image_id": ["p1", "p2", "p3", "p4"],
            "target": 2,
            "best_l1": [1.0, 1.0, 3.0, np.inf],
        }
    )
    results = pd.DataFrame(
        {
            "epoch": [1, 1, 1, 1, 1, 1, 2],
            "schedule": ["A", "A", "A", "B", "B", "B", "A"],
            "image_id": ["p1", "p2", "p3", "p1", "p2", "p3", "p1"],
            "target": 2,
            "success": [True, True, False, True, True, True, True],
            "l1": [2.0, 3.0, 9.0, 1.0, 1.5, 6.0, 5.0],
        }
    )
    return results, best


def test_ratio_table_by_hand():
    results, best = hand_results()
    extra = pd.DataFrame(
        {
            "epoch": [1],
            "schedule": ["B"],
            "image_id": ["p4"],
            "target": [2],
            "success": [True],
            "l1": [4.0],
        }
    )
    table = minimality.ratio_table(pd.concat([results, extra]), best)
    assert list(table.columns) == [
        "schedule",
        "epoch",
        "pairs",
        "successful",
        "median_ratio",
        "q25_ratio",
        "q75_ratio",
    ]
    a, b = table.set_index("schedule").loc["A"], table.set_index("schedule").loc["B"]
    # A: ratios 2 and 3 (p3 failed).  B: ratios 1, 1.5, 2 (p4 has no finite best).
    assert (a["pairs"], a["successful"], a["median_ratio"]) == (3, 2, 2.5)
    assert (a["q25_ratio"], a["q75_ratio"]) == (2.25, 2.75)
    assert (b["pairs"], b["successful"], b["median_ratio"]) == (4, 3, 1.5)
    assert len(table) == 2, "epoch 2 has no reference pairs"


@pytest.mark.parametrize(
    ("adv", "best", "expected"),
    [
        # Curves: best 1 on [0,1), .75 on [1,2), .25 on [2,4) -> area 9/4; attack 1 on [0,2),
        # .5 on [2,4) -> area 3; room above the best curve 4 - 9/4 = 7/4: 1 - (3/4)/(7/4).
        ([2, 2, np.inf, 4], [1, 2, 2, 4], 4 / 7),
        # A sample already adversarial (distance 0): clean accuracy 2/3, window [0, 3].
        ([0, 2, np.inf], [0, 1, 3], 0.5),
        ([0, 3, np.inf], [0, 1, 3], 0.0),
        ([1, 2, 2, 4], [1, 2, 2, 4], 1.0),
        # A sample no method broke stays up in both curves.
        ([1.5, 2, np.inf], [1, 2, np.inf], 0.5),
    ],
)
def test_optimality_step_areas_by_hand(adv, best, expected):
    assert minimality.eval_optimality(adv, best) == pytest.approx(expected)


def test_optimality_trapezoid_reproduces_attackbench_code():
    # AttackBench's trapezoids: best points (1,.75), (2,.25), (4,0) -> .5 + .25 = .75;
    # attack clipped to 4: points (2,.5), (4,0) -> .5; 1 - (.5 - .75) / (4 - .75) = 14/13.
    score = minimality.eval_optimality([2, 2, np.inf, 4], [1, 2, 2, 4], integration="trapezoid")
    assert score == pytest.approx(14 / 13)


@pytest.mark.parametrize("best", [[], [np.inf, np.inf], [2.0, 2.0]])
def test_optimality_undefined_is_nan(best):
    assert math.isnan(minimality.eval_optimality([1.0] * len(best), best))


def test_optimality_table_by_hand():
    results, best = hand_results()
    table = minimality.optimality_table(results, best).set_index("schedule")
    # Window [0, 3], best area (1 + 1 + 3) / 3 = 5/3, room 3 - 5/3 = 4/3.
    # A: distances 2, 3, inf -> area 8/3 -> 1 - 1 / (4/3).  B: 1, 1.5, 3 -> 5.5/3 -> 1 - 1/8.
    assert table.loc["A", "optimality"] == pytest.approx(0.25)
    assert table.loc["B", "optimality"] == pytest.approx(0.875)
    assert table.loc["A", "success_rate"] == pytest.approx(2 / 3)
    assert list(table["pairs"]) == [3, 3]


def test_robust_accuracy_is_a_right_continuous_step():
    accuracy = minimality.robust_accuracy([0, 1, np.inf], [0, 0.5, 1, 10])
    np.testing.assert_allclose(accuracy, [2 / 3, 2 / 3, 1 / 3, 1 / 3])


def test_scored_pairs_define_ratio_and_distance_once():
    results, best = hand_results()
    scored = minimality.scored_pairs(results, best, on=["epoch", "image_id", "target"],
                                     by=["schedule", "epoch"]).set_index(["schedule", "image_id"])
    # A on p1: l1 2 against best 1; A on p3 failed: no ratio, never flipped (infinite distance)
    assert (scored.loc[("A", "p1"), "ratio"], scored.loc[("A", "p1"), "distance"]) == (2.0, 2.0)
    assert math.isnan(scored.loc[("A", "p3"), "ratio"])
    assert scored.loc[("A", "p3"), "distance"] == np.inf
    # the intervals' point estimates are the tables' ones
    intervals = minimality_norms.norm_intervals(results, best, norm="l1").set_index("schedule")
    ratios = minimality.ratio_table(results, best).set_index("schedule")
    optimality = minimality.optimality_table(results, best).set_index("schedule")
    for name in ("A", "B"):
        assert intervals.loc[name, "median_ratio"] == ratios.loc[name, "median_ratio"]
        assert intervals.loc[name, "optimality"] == pytest.approx(optimality.loc[name,
                                                                                 "optimality"])


def interval_rows(**ranges):
    """A minimality_intervals table at epoch 1: schedule -> (estimate, low, high)."""
    return pd.DataFrame([{"schedule": name, "epoch": 1, "successful": 10, "median_ratio": e,
                          "median_ratio_low": lo, "median_ratio_high": hi}
                         for name, (e, lo, hi) in ranges.items()])


@pytest.mark.parametrize(
    ("ranges", "verdict", "outcome"),
    [
        ({"loss-adaptive": (1.2, 1.1, 1.3), "constant": (2.0, 1.8, 2.2),
          "step": (1.6, 1.4, 1.8)}, "closer to minimal than every other schedule", "agrees"),
        ({"loss-adaptive": (2.0, 1.8, 2.2), "constant": (1.2, 1.1, 1.3),
          "step": (1.9, 1.7, 2.1)}, "further from minimal than constant (the", "disagrees"),
        ({"loss-adaptive": (1.5, 1.2, 1.8), "constant": (1.6, 1.3, 1.9)},
         "the 95 % intervals overlap, so the ranking is inconclusive", "inconclusive"),
    ],
    ids=["closest", "further", "overlapping"],
)
def test_closeness_verdict_reads_the_intervals(ranges, verdict, outcome):
    closeness = minimality_norms.closeness_verdict(interval_rows(**ranges), "loss-adaptive",
                                                   epoch=1)
    assert verdict in closeness["verdict"] and closeness["outcome"] == outcome
    estimate, low, high = ranges["loss-adaptive"]
    assert closeness["ratio"] == f"{estimate:.1f} [{low:.1f}, {high:.1f}]"


def test_closeness_verdict_of_a_schedule_that_did_not_run():
    closeness = minimality_norms.closeness_verdict(interval_rows(constant=(1.0, 0.9, 1.1)),
                                                   "loss-adaptive", epoch=1)
    assert closeness == {"ratio": "not measured", "verdict": "not part of this run",
                         "outcome": "inconclusive"}


# --- per norm ------------------------------------------------------------------------------


def norm_tables() -> tuple[pd.DataFrame, pd.DataFrame]:
    """Reference rows in three norms and our rows (refined distances where the stage refined)
    on pairs p1, p2 of image a and p3 of image b."""
    reference_rows = pd.DataFrame({
        "epoch": 1, "image_id": ["a", "a", "b"], "target": [1, 2, 1], "attack": "fmn",
        "steps": 100, "success": [True, True, False],
        "l1": [0.1, 0.2, 0.3], "l2": [1.0, 2.0, 3.0], "linf": [0.05, 0.06, 0.07]})
    ours = pd.DataFrame({
        "epoch": 1, "schedule": "A", "image_id": ["a", "a", "b"], "target": [1, 2, 1],
        "success": [True, True, True], "status": "ok",
        "l1": [0.4, 0.4, 0.6], "l2": [2.0, 2.0, 6.0], "linf": [0.05, 0.09, 0.08],
        "refined_l1": [0.3, 0.4, 0.6], "refined_l2": [2.0, 2.0, 6.0],
        "refined_linf": [0.05, 0.03, 0.08]})
    return reference_rows, ours


def test_the_best_known_distance_is_taken_per_norm() -> None:
    reference_rows, ours = norm_tables()
    linf = minimality.best_per_sample(reference_rows, ours, on=["epoch", "image_id", "target"],
                                      norm="linf").set_index("target")
    # pair (a, 2): our refined Linf 0.03 beats the reference's 0.06; pair (b, 1): the
    # reference failed, so our 0.08 is the best known
    assert linf["best_linf"].tolist() == [0.05, 0.03, 0.08]
    assert linf["best_method"].tolist() == ["fmn@100", "schedule:A", "schedule:A"]
    l1 = minimality.best_per_sample(reference_rows, ours, on=["epoch", "image_id", "target"],
                                    norm="l1")
    assert l1["best_l1"].tolist() == [0.1, 0.2, 0.6]


def test_closeness_and_ratios_per_norm_by_hand() -> None:
    reference_rows, ours = norm_tables()
    table = minimality_norms.minimality_by_norm(ours, reference_rows, resamples=200)
    assert table["norm"].tolist() == ["linf", "l2", "l1"]
    row = table.set_index("norm").loc["l1"]
    # L1 ratios 0.3/0.1, 0.4/0.2, 0.6/0.6 -> median 2; closeness mean(1/3, 1/2, 1)
    assert row["median_ratio"] == pytest.approx(2.0)
    assert row["closeness"] == pytest.approx((1 / 3 + 1 / 2 + 1) / 3)
    assert (row["pairs"], row["successful"], row["n_images"]) == (3, 3, 2)
    linf = table.set_index("norm").loc["linf"]
    assert linf["closeness"] == pytest.approx(1.0) and linf["median_ratio"] == 1.0


def test_a_reference_without_a_norm_leaves_that_norm_out() -> None:
    reference_rows, ours = norm_tables()
    table = minimality_norms.minimality_by_norm(ours, reference_rows.drop(columns="l2"),
                                                resamples=200)
    assert table["norm"].unique().tolist() == ["linf", "l1"]


def test_weighted_optimality_is_the_score_of_the_drawn_rows() -> None:
    adv = np.array([2.0, 2.0, np.inf, 4.0])
    best = np.array([1.0, 2.0, 2.0, 4.0])
    weights = np.array([[1, 1, 1, 1], [2, 0, 1, 1], [0, 0, 3, 0]])
    scores = minimality_norms.weighted_optimality(adv, best, weights)
    assert scores[0] == pytest.approx(minimality.eval_optimality(adv, best))
    drawn = np.repeat(np.arange(4), weights[1])
    assert scores[1] == pytest.approx(minimality.eval_optimality(adv[drawn], best[drawn]))
    assert np.isnan(scores[2]), "one distinct best distance: no room above the best curve"


def test_a_score_set_by_one_pair_is_not_robust() -> None:
    best = np.array([1.0, 1.0, 1.0, 1.0, 50.0])
    # the window ends at 50: with it the attack's distances 2 look close, without it they do not
    adv = np.array([2.0, 2.0, 2.0, 2.0, 50.0])
    assert not minimality_norms.window_robust(adv, best)
    spread = np.linspace(1.0, 5.0, 30)
    assert minimality_norms.window_robust(spread * 1.1, spread)


def test_pairs_span_every_tool_image_and_target() -> None:
    from lib.run.minimality_stage import spread_pairs

    rows = pd.DataFrame([(1, f"img{s}_{k}", s, t) for s in range(7) for k in range(2)
                         for t in range(7) if t != s],
                        columns=["epoch", "image_id", "source", "target"])
    pairs = spread_pairs(rows, 14)
    assert len(pairs) == 14 and not pairs.duplicated(["image_id", "target"]).any()
    assert sorted(pairs["source"].value_counts()) == [2] * 7
    assert pairs["image_id"].nunique() == 14, "every image once before any image twice"
    assert set(pairs["target"]) == set(range(7))
    # tool 6: its first image toward 6 + 1 = 0, its second toward 6 + 2 = 1
    assert pairs.loc[pairs["source"] == 6, ["image_id", "target"]].values.tolist() == [
        ["img6_0", 0], ["img6_1", 1]]
    more = spread_pairs(rows, 30)
    assert len(more) == 30 and not more.duplicated(["image_id", "target"]).any()
    assert more["image_id"].nunique() == 14
