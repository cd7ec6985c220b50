"""Chart builders for the attack results (lib/figures.py), fed by lib.metrics tables."""

from __future__ import annotations

import numpy as np
import pytest

from lib import figures, metrics
from tests.test_metrics import SCHEDULES, results_table

RESULTS = results_table()


def inline_rows(spec: dict) -> int:
    """Rows of data embedded in a chart spec (altair puts them in ``datasets``)."""
    return sum(len(rows) for rows in spec.get("datasets", {}).values())


@pytest.mark.parametrize(
    ("build", "table"),
    [
        (figures.success_rate_chart, lambda: metrics.success_rates(RESULTS)),
        (figures.l1_chart, lambda: metrics.mean_l1(RESULTS)),
        (figures.iterations_lr_chart, lambda: metrics.iterations_and_lr(RESULTS)),
        (figures.class_pair_chart, lambda: metrics.class_pair_l1(RESULTS)),
        (figures.l1_histogram_chart, lambda: metrics.l1_histogram(RESULTS, bins=5)),
        (figures.lr0_sensitivity_chart,
         lambda: metrics.lr0_sensitivity(RESULTS.assign(lr0=0.004))),
    ],
    ids=["success-rate", "l1", "iterations-lr", "class-pairs", "l1-histogram", "lr0"],
)
def test_charts_are_valid_and_carry_only_the_aggregated_rows(build, table) -> None:
    data = table()
    spec = build(data).to_dict()  # validates against the Vega-Lite schema
    assert inline_rows(spec) == len(data)
    assert len(data) < len(RESULTS) or build is figures.class_pair_chart


def test_schedule_colours_follow_the_stage_order() -> None:
    spec = figures.success_rate_chart(metrics.success_rates(RESULTS)).to_dict()
    assert spec["encoding"]["color"]["scale"]["domain"] == SCHEDULES


def test_class_pair_chart_has_a_schedule_selector_and_one_panel_per_epoch() -> None:
    spec = figures.class_pair_chart(metrics.class_pair_l1(RESULTS)).to_dict()
    (param,) = spec["params"]
    assert param["bind"]["options"] == SCHEDULES
    assert spec["facet"]["column"]["field"] == "epoch"


def test_trace_chart() -> None:
    traces = {"epoch": np.array([2, 2]), "row_id": np.array([0, 1]),
              "lr": np.full((2, 4), 0.004), "loss": np.ones((2, 4))}
    summary = metrics.trace_summary(traces, RESULTS)
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
