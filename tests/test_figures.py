"""Chart builders for the attack results (lib/analysis/figures.py), fed by the tables of
lib/analysis/aggregates.py."""

from __future__ import annotations

import numpy as np
import pytest

from lib.analysis import aggregates, figures, minimality, paired
from tests.test_metrics import AGREEING, SCHEDULES, many_attacks, results_table

RESULTS = results_table()


def inline_rows(spec: dict) -> int:
    """Rows of data embedded in a chart spec (altair puts them in ``datasets``)."""
    return sum(len(rows) for rows in spec.get("datasets", {}).values())


@pytest.mark.parametrize(
    ("build", "table"),
    [
        (figures.success_rate_chart, lambda: aggregates.success_rates(RESULTS)),
        (figures.l1_chart, lambda: aggregates.mean_l1(RESULTS)),
        (figures.iterations_lr_chart, lambda: aggregates.iterations_and_lr(RESULTS)),
        (figures.class_pair_chart, lambda: aggregates.class_pair_l1(RESULTS)),
        (figures.l1_histogram_chart, lambda: aggregates.l1_histogram(RESULTS, bins=5)),
        (figures.lr0_sensitivity_chart,
         lambda: aggregates.lr0_sensitivity(RESULTS.assign(lr0=0.004))),
    ],
    ids=["success-rate", "l1", "iterations-lr", "class-pairs", "l1-histogram", "lr0"],
)
def test_charts_are_valid_and_carry_only_the_aggregated_rows(build, table) -> None:
    data = table()
    spec = build(data).to_dict()  # validates against the Vega-Lite schema
    assert inline_rows(spec) == len(data)
    assert len(data) < len(RESULTS) or build is figures.class_pair_chart


def test_schedule_colours_follow_the_stage_order() -> None:
    spec = figures.success_rate_chart(aggregates.success_rates(RESULTS)).to_dict()
    assert spec["layer"][0]["encoding"]["color"]["scale"]["domain"] == SCHEDULES


def layer_marks(spec: dict) -> list:
    """(mark type, encoded fields) of every layer, however deep the spec nests them."""
    found = []
    if "mark" in spec:
        mark = spec["mark"]["type"] if isinstance(spec["mark"], dict) else spec["mark"]
        found.append((mark, {k: v.get("field") for k, v in spec.get("encoding", {}).items()
                             if isinstance(v, dict)}))
    for key in ("layer", "hconcat", "vconcat"):
        for part in spec.get(key, []):
            found += layer_marks(part)
    if "spec" in spec:
        found += layer_marks(spec["spec"])
    return found


@pytest.mark.parametrize(
    ("build", "table", "low", "high"),
    [
        (figures.success_rate_chart, lambda: aggregates.success_rates(RESULTS),
         "success_rate_low", "success_rate_high"),
        (figures.l1_chart, lambda: aggregates.mean_l1(RESULTS),
         "mean_l1_255_low", "mean_l1_255_high"),
        (figures.iterations_lr_chart, lambda: aggregates.iterations_and_lr(RESULTS),
         "mean_iterations_low", "mean_iterations_high"),
        (figures.lr0_sensitivity_chart,
         lambda: aggregates.lr0_sensitivity(RESULTS.assign(lr0=0.004)),
         "mean_l1_255_low", "mean_l1_255_high"),
        (figures.paired_difference_chart,
         lambda: paired.paired_schedule_differences(many_attacks(AGREEING)), "low", "high"),
    ],
    ids=["success-rate", "l1", "iterations-lr", "lr0", "paired"],
)
def test_charts_draw_their_intervals(build, table, low, high) -> None:
    data = table()
    spec = build(data).to_dict()
    marks = layer_marks(spec)
    drawn = [fields for mark, fields in marks if mark in ("errorbar", "rule")]
    assert any(set(fields.values()) >= {low, high} for fields in drawn), marks
    assert inline_rows(spec) == len(data)


def test_class_pair_chart_has_a_schedule_selector_and_one_panel_per_epoch() -> None:
    spec = figures.class_pair_chart(aggregates.class_pair_l1(RESULTS)).to_dict()
    (param,) = spec["params"]
    assert param["bind"]["options"] == SCHEDULES
    assert spec["facet"]["column"]["field"] == "epoch"
    # every cell says how many successful attacks its mean holds
    texts = [fields["text"] for mark, fields in layer_marks(spec) if mark == "text"]
    assert texts == ["mean_l1_255", "count_label"]
    (rows,) = spec["datasets"].values()
    cell = next(r for r in rows if (r["epoch"], r["schedule"], r["source"], r["target"])
                == (1, "constant", 0, 1))
    assert cell["count_label"] == "n=1"


def test_per_image_chart() -> None:
    results = many_attacks(AGREEING, images=3)
    per_image = aggregates.per_image_l1(results, ["img0", "img2"])
    means = aggregates.mean_l1(results)
    spec = figures.per_image_chart(per_image, means).to_dict()
    assert spec["facet"]["column"]["field"] == "schedule"
    assert inline_rows(spec) == len(per_image) + len(means)
    marks = layer_marks(spec)
    assert ("errorbar", {"x": "epoch", "y": "mean_l1_255_low", "y2": "mean_l1_255_high"}) in marks


def test_refinement_chart_draws_both_distances() -> None:
    from tests.test_metrics import with_refinement

    refined = with_refinement(many_attacks(AGREEING), dict.fromkeys(SCHEDULES, 0.5))
    ranking = aggregates.refinement_ranking(refined)
    spec = figures.refinement_chart(ranking).to_dict()
    (rows,) = spec["datasets"].values()
    assert len(rows) == 2 * len(ranking)
    assert {r["distance"] for r in rows} == {"path (first iterate past)",
                                             "refined (at the boundary)"}


def test_minimality_charts_draw_their_intervals() -> None:
    ours = many_attacks(AGREEING, images=10, epochs=(1,))
    best = (ours[ours["success"]].groupby(["epoch", "image_id", "target"])["l1"].min()
            .rename("best_l1").reset_index())
    table = minimality.minimality_intervals(ours, best)
    assert set(table["schedule"]) == set(SCHEDULES)
    row = table.set_index("schedule").loc["exponential"]  # always the smallest when it succeeds
    assert row["median_ratio"] == pytest.approx(1.0) and row["successful"] == 10
    assert row["optimality_low"] <= row["optimality"] <= row["optimality_high"]
    for build, low in ((figures.minimality_ratio_chart, "median_ratio_low"),
                       (figures.optimality_chart, "optimality_low")):
        marks = layer_marks(build(table).to_dict())
        assert any(fields.get("x") == low for mark, fields in marks if mark == "rule")


def test_trace_chart() -> None:
    traces = {"epoch": np.array([2, 2]), "row_id": np.array([0, 1]),
              "lr": np.full((2, 4), 0.004), "loss": np.ones((2, 4))}
    summary = aggregates.trace_summary(traces, RESULTS)
    spec = figures.trace_chart(summary).to_dict()
    assert len(spec["hconcat"]) == 3 and inline_rows(spec) == len(summary) == 4


@pytest.mark.parametrize("scale", [1, 2])
def test_gallery_picture_layout(scale: int) -> None:
    size, names = 8, ["constant", "step"]
    rng = np.random.default_rng(0)
    original = rng.integers(0, 256, (1, 3, size, size), dtype=np.uint8)
    borderline = np.clip(original / 255 + rng.normal(0, 0.01, (2, 3, size, size)), 0, 1)
    gallery = {"original": np.repeat(original, 2, axis=0), "borderline": borderline,
               "image_id": np.array(["a", "a"]), "schedule": np.array(names),
               "source": np.array([0, 0]), "target": np.array([1, 1])}
    picture = figures.gallery_picture(gallery, scale=scale)
    columns = 1 + 2 * len(names)
    assert picture.width == (columns * (size + 2) + 2) * scale
    assert picture.height > (size + 4) * scale  # the header line plus one row of images
    # the original tile is the original image, upscaled
    pixels = np.asarray(picture)
    top = picture.height - (size + 2) * scale
    tile = pixels[top: top + size * scale: scale, 2 * scale: (2 + size) * scale: scale]
    assert np.array_equal(tile.transpose(2, 0, 1), original[0])


def test_gallery_leaves_a_missing_schedule_blank() -> None:
    size = 8
    original = np.zeros((1, 3, size, size), dtype=np.uint8)
    gallery = {"original": original, "borderline": np.full((1, 3, size, size), 0.01),
               "image_id": np.array(["a"]), "schedule": np.array(["constant"]),
               "source": np.array([0]), "target": np.array([1])}
    picture = np.asarray(figures.gallery_picture(gallery, scale=1,
                                                 schedules=["constant", "step"]))
    top = picture.shape[0] - (size + 2)
    step_tile = picture[top: top + size, 2 + 2 * (size + 2): 2 + 2 * (size + 2) + size]
    assert (step_tile == 255).all()  # white: no image for this schedule
    constant_tile = picture[top: top + size, 2 + (size + 2): 2 + (size + 2) + size]
    assert (constant_tile == round(0.01 * 255)).all()


def test_accuracy_chart_draws_intervals_when_given() -> None:
    import pandas as pd

    plain = pd.DataFrame({"epoch": [1, 2], "accuracy": [0.5, 0.9], "macro_f1": [0.4, 0.8]})
    assert "layer" not in figures.accuracy_f1_chart(plain).to_dict()
    bounded = plain.assign(accuracy_low=[0.4, 0.85], accuracy_high=[0.6, 0.95],
                           macro_f1_low=[0.3, 0.7], macro_f1_high=[0.5, 0.9])
    marks = layer_marks(figures.accuracy_f1_chart(bounded).to_dict())
    assert ("errorbar", {"x": "epoch", "color": "metric", "y": "low", "y2": "high"}) in marks
