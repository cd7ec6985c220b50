"""Chart builders (lib/analysis/figures.py, attack_figures.py, minimality_figures.py), fed
by the tables of lib/analysis/aggregates.py."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from lib.analysis import (
    aggregates,
    attack_figures,
    figures,
    minimality_figures,
    minimality_norms,
    paired,
    trends,
)
from tests.chart_specs import colours_of, drawn
from tests.test_metrics import (
    AGREEING,
    SCHEDULES,
    many_attacks,
    prediction_table,
    results_table,
    selection_of,
)

RESULTS = results_table()


def inline_rows(spec: dict) -> int:
    """Rows of data embedded in a chart spec (altair puts them in ``datasets``)."""
    return sum(len(rows) for rows in spec.get("datasets", {}).values())


@pytest.mark.parametrize(
    ("build", "table"),
    [
        (attack_figures.success_rate_chart, lambda: aggregates.success_rates(RESULTS)),
        (attack_figures.l1_chart, lambda: aggregates.mean_l1(RESULTS)),
        (attack_figures.iterations_lr_chart, lambda: aggregates.iterations_and_lr(RESULTS)),
        (attack_figures.class_pair_chart, lambda: aggregates.class_pair_l1(RESULTS)),
        (attack_figures.l1_histogram_chart, lambda: aggregates.l1_histogram(RESULTS, bins=5)),
        (attack_figures.lr0_sensitivity_chart,
         lambda: aggregates.lr0_sensitivity(RESULTS.assign(lr0=0.004))),
    ],
    ids=["success-rate", "l1", "iterations-lr", "class-pairs", "l1-histogram", "lr0"],
)
def test_charts_are_valid_and_carry_only_the_aggregated_rows(build, table) -> None:
    data = table()
    spec = build(data).to_dict()  # validates against the Vega-Lite schema
    assert inline_rows(spec) == len(data)
    assert len(data) < len(RESULTS) or build is attack_figures.class_pair_chart


def test_schedule_colours_follow_the_stage_order_and_the_palette() -> None:
    spec = attack_figures.success_rate_chart(aggregates.success_rates(RESULTS)).to_dict()
    scale = spec["layer"][0]["encoding"]["color"]["scale"]
    assert scale["domain"] == SCHEDULES
    assert scale["range"] == [figures.SCHEDULE_COLOURS[s] for s in SCHEDULES]
    # a subset of schedules keeps each one's colour
    two = figures.colour_scale("schedule", ["step", "constant"]).to_dict()
    assert two["range"] == [figures.SCHEDULE_COLOURS["step"], figures.SCHEDULE_COLOURS["constant"]]


def test_a_new_kind_of_category_gets_its_palette_and_unknown_names_a_stable_colour() -> None:
    figures.add_palette("arm", {"baseline": "#111111", "borderline": "#222222"})
    try:
        assert figures.colour_scale("arm", ["borderline"]).to_dict()["range"] == ["#222222"]
    finally:
        figures.PALETTES.pop("arm")
    first = figures.colour_of("schedule", "a-new-schedule")
    assert first in figures.SPARE_COLOURS
    assert figures.colour_of("schedule", "a-new-schedule") == first


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
        (attack_figures.success_rate_chart, lambda: aggregates.success_rates(RESULTS),
         "success_rate_low", "success_rate_high"),
        (attack_figures.l1_chart, lambda: aggregates.mean_l1(RESULTS),
         "mean_l1_255_low", "mean_l1_255_high"),
        (attack_figures.iterations_lr_chart, lambda: aggregates.iterations_and_lr(RESULTS),
         "mean_iterations_low", "mean_iterations_high"),
        (attack_figures.lr0_sensitivity_chart,
         lambda: aggregates.lr0_sensitivity(RESULTS.assign(lr0=0.004)),
         "mean_l1_255_low", "mean_l1_255_high"),
        (attack_figures.paired_difference_chart,
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
    spec = attack_figures.class_pair_chart(aggregates.class_pair_l1(RESULTS)).to_dict()
    (param,) = spec["params"]
    assert param["bind"]["options"] == SCHEDULES
    assert spec["facet"]["field"] == "epoch" and spec["columns"] == 2
    # every cell says how many successful attacks its mean holds
    texts = [fields["text"] for mark, fields in layer_marks(spec) if mark == "text"]
    assert texts == ["mean_l1_255", "count_label"]
    (rows,) = spec["datasets"].values()
    cell = next(r for r in rows if (r["epoch"], r["schedule"], r["source"], r["target"])
                == (1, "constant", 0, 1))
    assert cell["count_label"] == "n=1"


def test_per_image_chart() -> None:
    results = many_attacks(AGREEING, images=3)
    per_image = trends.per_image_l1(results, selection_of(results, ["img0", "img2"]))
    means = aggregates.mean_l1(results)
    spec = attack_figures.per_image_chart(per_image, means).to_dict()
    assert spec["facet"]["field"] == "schedule" and spec["columns"] == 3
    assert inline_rows(spec) == len(per_image) + len(means)
    marks = layer_marks(spec)
    assert ("errorbar", {"x": "epoch", "y": "mean_l1_255_low", "y2": "mean_l1_255_high",
                         "color": None}) in marks  # black: a fixed colour


def test_refinement_chart_draws_both_distances() -> None:
    from tests.test_metrics import with_refinement

    refined = with_refinement(many_attacks(AGREEING), dict.fromkeys(SCHEDULES, 0.5))
    ranking = aggregates.refinement_ranking(refined)
    spec = attack_figures.refinement_chart(ranking).to_dict()
    (rows,) = spec["datasets"].values()
    assert len(rows) == 2 * len(ranking)
    assert {r["distance"] for r in rows} == {"path (first iterate past)",
                                             "refined (at the boundary)"}


def test_minimality_charts_draw_their_intervals() -> None:
    ours = many_attacks(AGREEING, images=10, epochs=(1,))
    best = (ours[ours["success"]].groupby(["epoch", "image_id", "target"])["l1"].min()
            .rename("best_l1").reset_index())
    table = minimality_norms.norm_intervals(ours, best, norm="l1", resamples=200)
    assert set(table["schedule"]) == set(SCHEDULES)
    row = table.set_index("schedule").loc["exponential"]  # always the smallest when it succeeds
    assert row["median_ratio"] == pytest.approx(1.0) and row["successful"] == 10
    assert row["optimality_low"] <= row["optimality"] <= row["optimality_high"]
    assert row["closeness_low"] <= row["closeness"] <= row["closeness_high"]
    for build, low in ((minimality_figures.minimality_ratio_chart, "median_ratio_low"),
                       (minimality_figures.optimality_chart, "closeness_low")):
        marks = layer_marks(build(table).to_dict())
        assert any(fields.get("x") == low for mark, fields in marks if mark == "rule")
    # several norms: one panel each, Linf first
    spec = minimality_figures.minimality_ratio_chart(pd.concat([table, table.assign(norm="linf")])
                                          ).to_dict()
    assert [panel["layer"][0]["encoding"]["x"]["title"] for panel in spec["vconcat"]] == [
        "Linf distance / best known (median, 95 % interval)",
        "L1 distance / best known (median, 95 % interval)"]


def test_trace_chart() -> None:
    traces = {"model": np.array([0, 0]), "epoch": np.array([2, 2]), "row_id": np.array([0, 1]),
              "lr": np.full((2, 4), 0.004), "loss": np.ones((2, 4))}
    summary = aggregates.trace_summary(traces, RESULTS)
    spec = attack_figures.trace_chart(summary).to_dict()
    assert len(spec["vconcat"]) == 3 and inline_rows(spec) == len(summary) == 4


def test_accuracy_chart_draws_intervals_when_given() -> None:

    plain = pd.DataFrame({"epoch": [1, 2], "accuracy": [0.5, 0.9], "macro_f1": [0.4, 0.8]})
    assert "layer" not in figures.accuracy_f1_chart(plain).to_dict()
    bounded = plain.assign(accuracy_low=[0.4, 0.85], accuracy_high=[0.6, 0.95],
                           macro_f1_low=[0.3, 0.7], macro_f1_high=[0.5, 0.9])
    marks = layer_marks(figures.accuracy_f1_chart(bounded).to_dict())
    assert ("errorbar", {"x": "epoch", "xOffset": "metric", "color": "metric", "y": "low",
                         "y2": "high"}) in marks


# --------------------------------------------------------------------------- the book's rules


def test_the_loss_curve_places_global_steps_inside_their_epochs(tmp_path) -> None:
    # train/losses.csv numbers steps from the start of training: 3 epochs of 4, 4 and 2 steps

    path = tmp_path / "losses.csv"
    path.write_text("epoch,step,loss\n" + "".join(
        f"{epoch},{step},2.0\n" for epoch, step in zip([1] * 4 + [2] * 4 + [3] * 2,
                                                       range(1, 11), strict=True)))
    losses = pd.read_csv(path)
    spec = figures.loss_curve_chart(losses).to_dict()
    (rows,) = spec["datasets"].values()
    assert [r["position"] for r in rows] == [0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0,
                                             2.5, 3.0]
    x = spec["layer"][0]["encoding"]["x"]
    assert x["scale"]["domain"] == [0, 3] and x["axis"]["values"] == [0, 1, 2, 3]
    # steps numbered within each epoch land on the same places
    within = losses.assign(step=[0, 1, 2, 3, 0, 1, 2, 3, 0, 1])
    assert figures.loss_positions(within).tolist() == [r["position"] for r in rows]


def _sample_charts() -> dict:
    """One chart of every builder, drawn from the hand-made tables."""

    from tests.test_metrics import with_refinement

    results = many_attacks(AGREEING, images=6)
    tools = list(figures.TOOLS)
    counts = pd.DataFrame({"split": ["train"] * 7 + ["test"] * 7, "tool": tools * 2,
                           "frames": range(14)})
    shares = pd.DataFrame({"split": ["train"] * 3, "tools_present": ["0", "1", "2+"],
                           "frames": [5, 80, 15], "share": [0.05, 0.8, 0.15]})
    metrics_table = pd.DataFrame({"epoch": [1, 2], "accuracy": [0.5, 0.9],
                                  "macro_f1": [0.4, 0.8]})
    per_class = pd.DataFrame({"epoch": [1] * 7 + [2] * 7, "tool": tools * 2,
                              "f1": [0.5] * 14, "support": [10] * 14})
    confusion = pd.DataFrame([(t, p, 3 if t == p else 1) for t in range(7) for p in range(7)],
                             columns=["true", "predicted", "count"])
    losses = pd.DataFrame({"epoch": [1] * 3 + [2] * 3, "step": range(1, 7),
                           "loss": [2, 1.8, 1.7, 1.5, 1.4, 1.2]})
    ours = many_attacks(AGREEING, images=10, epochs=(1, 5))
    best = (ours[ours["success"]].groupby(["epoch", "image_id", "target"])["l1"].min()
            .rename("best_l1").reset_index())
    intervals = minimality_norms.norm_intervals(ours, best, norm="l1", resamples=200)
    intervals = pd.concat([intervals.assign(norm="linf"), intervals], ignore_index=True)
    sweep = pd.concat([results.assign(lr0=v) for v in (0.004, 0.008, 0.016, 0.04)])
    traces = {"model": np.array([0, 0]), "epoch": np.array([2, 2]), "row_id": np.array([0, 1]),
              "lr": np.full((2, 4), 0.004), "loss": np.ones((2, 4))}
    two_models = pd.concat([results, results.assign(model=1)], ignore_index=True)
    return {
        "class-counts": figures.class_counts_chart(counts),
        "tools-per-frame": figures.tool_share_chart(shares),
        "loss": figures.loss_curve_chart(losses),
        "accuracy": figures.accuracy_f1_chart(metrics_table),
        "accuracy-intervals": figures.accuracy_f1_chart(
            aggregates.accuracy_f1_intervals(prediction_table({1: 50, 2: 80}))),
        "per-class-f1": figures.per_class_f1_chart(per_class),
        "confusion": figures.confusion_chart(confusion),
        "success-rate": attack_figures.success_rate_chart(aggregates.success_rates(results)),
        "l1": attack_figures.l1_chart(aggregates.mean_l1(results)),
        "paired": attack_figures.paired_difference_chart(
            paired.paired_schedule_differences(results)),
        "iterations-lr": attack_figures.iterations_lr_chart(aggregates.iterations_and_lr(results)),
        "class-pairs": attack_figures.class_pair_chart(aggregates.class_pair_l1(
            many_attacks(AGREEING, images=6, epochs=(1, 3, 4, 5)))),
        "l1-histogram": attack_figures.l1_histogram_chart(aggregates.l1_histogram(results, bins=5)),
        "per-image": attack_figures.per_image_chart(
            trends.per_image_l1(results, selection_of(results, ["img0", "img2"])),
            aggregates.mean_l1(results)),
        "refinement": attack_figures.refinement_chart(aggregates.refinement_ranking(
            with_refinement(many_attacks(AGREEING, epochs=(1, 3, 4, 5)),
                            dict.fromkeys(SCHEDULES, 0.5)))),
        "traces": attack_figures.trace_chart(aggregates.trace_summary(traces, RESULTS)),
        "lr0": attack_figures.lr0_sensitivity_chart(aggregates.lr0_sensitivity(sweep)),
        "minimality-ratio": minimality_figures.minimality_ratio_chart(intervals),
        "optimality": minimality_figures.optimality_chart(intervals),
        "per-model": figures.per_model(attack_figures.success_rate_chart,
                                       aggregates.success_rates(two_models)),
    }


@pytest.fixture(scope="module")
def sample_charts() -> dict:
    return {name: chart.to_dict() for name, chart in _sample_charts().items()}


def test_every_chart_fits_the_page_and_draws_no_column_name(sample_charts: dict) -> None:
    too_wide, named = {}, {}
    for name, spec in sample_charts.items():
        width, texts = drawn(spec)
        if width > figures.PAGE_WIDTH:
            too_wide[name] = width
        underscored = [t for t in texts if "_" in t]
        if underscored:
            named[name] = underscored
    assert too_wide == {} and named == {}


def test_every_chart_colours_each_schedule_with_its_palette_colour(sample_charts: dict) -> None:
    coloured = {}
    for name, spec in sample_charts.items():
        for schedule, colour in colours_of(spec, "schedule").items():
            assert colour == figures.SCHEDULE_COLOURS[schedule], (name, schedule)
            coloured[name] = True
    assert set(coloured) == {"success-rate", "l1", "paired", "iterations-lr", "l1-histogram",
                             "traces", "lr0", "per-model"}


def test_the_drawn_text_check_sees_a_column_name() -> None:
    # the check above would catch an untitled column: vega-lite titles it with its name
    import altair as alt

    chart = alt.Chart(pd.DataFrame({"mean_l1_255": [1.0]})).mark_point().encode(
        y="mean_l1_255:Q")
    _, texts = drawn(chart.to_dict())
    assert "mean_l1_255" in texts


@pytest.mark.parametrize(("values", "log"), [
    ([1.02, 2.04, 4.08, 10.2], True), ([1.02, 2.04, 4.08], False), ([2.04], False)])
def test_the_lr0_axis_is_logarithmic_only_over_a_factor_of_ten(values: list, log: bool) -> None:

    x = attack_figures._step_axis(pd.Series(values, name="lr0_255"), title="lr0").to_dict()
    assert (x["scale"].get("type") == "log") is log
    assert x["axis"]["values"] == sorted(values)  # ticks at the values tried, no others


@pytest.mark.parametrize(("high", "log"), [(3.0, False), (80.0, True)])
def test_the_minimality_ratio_axis_is_logarithmic_only_over_a_decade(high: float,
                                                                     log: bool) -> None:

    ratios = pd.DataFrame({"schedule": ["constant", "step"], "epoch": [1, 1],
                           "successful": [5, 5], "median_ratio": [2.0, high / 2],
                           "median_ratio_low": [1.5, high / 3], "median_ratio_high": [2.5, high],
                           "q25_ratio": [1.8, high / 2.5], "q75_ratio": [2.2, high / 1.5]})
    spec = minimality_figures.minimality_ratio_chart(ratios).to_dict()
    x = spec["layer"][0]["encoding"]["x"]
    assert (x.get("scale", {}).get("type") == "log") is log
    if log:  # ticks at 1, 2, 5 x 10^k inside the domain: never crowded
        assert x["axis"]["values"] == [2, 5, 10, 20, 50]
    width, texts = drawn(spec)
    assert width <= figures.PAGE_WIDTH


def test_one_panel_per_trained_model() -> None:

    two = pd.concat([RESULTS, RESULTS.assign(model=1)], ignore_index=True)
    rates = aggregates.success_rates(two)
    spec = figures.per_model(attack_figures.success_rate_chart, rates).to_dict()
    assert [panel["title"] for panel in spec["vconcat"]] == ["model of seed 0",
                                                           "model of seed 1"]
    assert inline_rows(spec) == len(rates)
    assert "config" in spec and all("config" not in panel for panel in spec["vconcat"])
    # one model: the chart itself
    alone = figures.per_model(attack_figures.success_rate_chart, aggregates.success_rates(RESULTS))
    assert "vconcat" not in alone.to_dict()
