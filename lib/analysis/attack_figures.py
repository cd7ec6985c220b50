"""The attack chapter's charts: success rates, distances, iterations and step sizes per
schedule and checkpoint, class pairs, traces, the lr0 sweep, paired differences and the
refined distances. The look they share (sizes, colours, legends, axes) is
:mod:`lib.analysis.figures`; the same rules hold for every chart here.
"""

from __future__ import annotations

import altair as alt
import numpy as np
import pandas as pd

from lib import TOOLS
from lib.analysis.figures import (
    colour_scale,
    field_tooltip,
    finish,
    interval_bars,
    interval_tooltips,
    schedule_colour,
    schedules_in,
    spans_a_decade,
    top_legend,
)

# Every chart below takes a table of lib.analysis.aggregates (aggregated, never the per-attack
# rows).


def success_rate_chart(rates: pd.DataFrame) -> alt.LayerChart:
    """The paper's Figure 2: success rate within ``max_iter`` per schedule and epoch.

    Args:
        rates: :func:`lib.analysis.aggregates.success_rates` of one model (epoch, schedule,
            images, attacks, successes, success_rate in [0, 1] with its image-bootstrap
            interval success_rate_low/high, skipped). The bars are the 95 % intervals.
    """
    title = "success rate (95 % interval)"
    base = alt.Chart(rates).encode(
        x=alt.X("epoch:O", title="epoch", axis=alt.Axis(labelAngle=0)),
        xOffset=alt.XOffset("schedule:N", sort=schedules_in(rates)),
        color=schedule_colour(rates))
    points = base.mark_point(filled=True, size=50).encode(
        y=alt.Y("success_rate:Q", title=title, axis=alt.Axis(format="%"),
                scale=alt.Scale(zero=False)),
        tooltip=[field_tooltip("epoch", "epoch"), field_tooltip("schedule", "schedule"),
                 field_tooltip("images", "images"), field_tooltip("attacks", "attacks"),
                 field_tooltip("successes", "successes"),
                 *interval_tooltips("success_rate", "success rate", ".1%"),
                 field_tooltip("skipped", "not finite (left out)")],
    )
    bars = interval_bars(base, "success_rate_low", "success_rate_high", title=title)
    return finish((bars + points).properties(width=600, height=240))


def l1_chart(l1: pd.DataFrame) -> alt.LayerChart:
    """The paper's Figure 3: mean L1 of the successful attacks per schedule and epoch.

    Args:
        l1: :func:`lib.analysis.aggregates.mean_l1` of one model (epoch, schedule, images,
            successes, mean_l1_255 with its image-bootstrap interval mean_l1_255_low/high). The
            bars are the 95 % intervals.
    """
    title = "mean L1 (x 1/255)"
    base = alt.Chart(l1).encode(
        x=alt.X("epoch:O", title="epoch", axis=alt.Axis(labelAngle=0)),
        xOffset=alt.XOffset("schedule:N", sort=schedules_in(l1)), color=schedule_colour(l1))
    points = base.mark_point(filled=True, size=50).encode(
        y=alt.Y("mean_l1_255:Q", title=title),
        tooltip=[field_tooltip("epoch", "epoch"), field_tooltip("schedule", "schedule"),
                 field_tooltip("images", "images"),
                 field_tooltip("successes", "successful attacks"),
                 field_tooltip("mean_l1_255:Q", "mean L1 (x 1/255)", format=".3f"),
                 field_tooltip("mean_l1_255_low:Q", "95 % low", format=".3f"),
                 field_tooltip("mean_l1_255_high:Q", "95 % high", format=".3f")],
    )
    bars = interval_bars(base, "mean_l1_255_low", "mean_l1_255_high", title=title)
    return finish((bars + points).properties(width=600, height=240))


def iterations_lr_chart(summary: pd.DataFrame) -> alt.HConcatChart:
    """The paper's Figure 4: mean iterations and mean step size per schedule at one epoch.

    Args:
        summary: :func:`lib.analysis.aggregates.iterations_and_lr` of one model (schedule,
            images, attacks, mean_iterations and mean_lr_255, each with its image-bootstrap
            interval ``_low``/``_high``, success_rate).
    """
    order = schedules_in(summary)
    base = alt.Chart(summary).encode(
        x=alt.X("schedule:N", sort=order, title=None, axis=alt.Axis(labelAngle=-30)),
        color=schedule_colour(summary, legend=False),
        tooltip=[field_tooltip("schedule", "schedule"), field_tooltip("images", "images"),
                 field_tooltip("attacks", "attacks"),
                 field_tooltip("mean_iterations:Q", "mean iterations", format=".1f"),
                 field_tooltip("mean_lr_255:Q", "mean step (x 1/255)", format=".3f"),
                 field_tooltip("success_rate:Q", "success rate", format=".1%")],
    )
    panels = []
    for column, title in (("mean_iterations", "mean iterations per attack"),
                          ("mean_lr_255", "mean step size (x 1/255)")):
        bars = base.mark_bar(opacity=0.7).encode(y=alt.Y(f"{column}:Q", title=title))
        whiskers = interval_bars(base, f"{column}_low", f"{column}_high", title=title,
                             color="black")
        panels.append((bars + whiskers).properties(width=230, height=220))
    return finish(alt.hconcat(*panels, spacing=40))


def class_pair_chart(matrix: pd.DataFrame, *, columns: int = 2) -> alt.FacetChart:
    """Source x target mean L1 per epoch (small multiples, ``columns`` per row), one schedule
    at a time (a selector).

    Each cell shows its mean L1 and, below it, how many successful attacks it averages
    (``n``); the tooltip adds the attacks tried.

    Args:
        matrix: :func:`lib.analysis.aggregates.class_pair_l1` (epoch, schedule, source_tool,
            target_tool, attacks, successes, mean_l1_255; NaN where no attack of the pair
            succeeded).
        columns: panels per row.
    """
    order = schedules_in(matrix)
    choice = alt.param(
        name="schedule_choice", value=order[0],
        bind=alt.binding_select(options=order, name="schedule "),
    )
    top = float(np.nanmax(matrix["mean_l1_255"])) if matrix["mean_l1_255"].notna().any() else 1.0
    table = matrix.assign(count_label="n=" + matrix["successes"].astype(str))
    base = alt.Chart().encode(
        x=alt.X("target_tool:N", sort=list(TOOLS), title="target tool",
                axis=alt.Axis(labelAngle=-45)),
        y=alt.Y("source_tool:N", sort=list(TOOLS), title="source tool"),
    )
    cells = base.mark_rect().encode(
        color=alt.Color("mean_l1_255:Q", scale=alt.Scale(scheme="viridis", domain=[0, top]),
                        title="mean L1 of successful attacks (x 1/255)",
                        legend=top_legend(gradientLength=240)),
        tooltip=[field_tooltip("epoch", "epoch"), field_tooltip("schedule", "schedule"),
                 field_tooltip("source_tool", "source tool"),
                 field_tooltip("target_tool", "target tool"), field_tooltip("attacks", "attacks"),
                 field_tooltip("successes", "successful attacks"),
                 field_tooltip("mean_l1_255:Q", "mean L1 (x 1/255)", format=".3f")],
    )
    shade = alt.condition(f"datum.mean_l1_255 > {top / 2}", alt.value("black"),
                          alt.value("white"))
    means = base.mark_text(fontSize=9, dy=-5).encode(
        text=alt.Text("mean_l1_255:Q", format=".1f"), color=shade)
    counts = base.mark_text(fontSize=8, dy=6).encode(text="count_label:N", color=shade)
    return finish(
        alt.layer(cells, means, counts, data=table)
        .transform_filter(alt.datum.schedule == choice)
        .properties(width=230, height=230)
        .facet(facet=alt.Facet("epoch:O", title="epoch"), columns=columns)
        .add_params(choice)
    )


def l1_histogram_chart(histogram: pd.DataFrame) -> alt.FacetChart:
    """L1 distribution of the successful attacks, one row per schedule.

    Args:
        histogram: :func:`lib.analysis.aggregates.l1_histogram` (schedule, bin_start_255,
            bin_end_255, count).
    """
    order = schedules_in(histogram)
    return finish(
        alt.Chart(histogram)
        .mark_bar()
        .encode(
            x=alt.X("bin_start_255:Q", title="L1 of successful attacks (x 1/255)"),
            x2="bin_end_255:Q",
            y=alt.Y("count:Q", title="attacks", axis=alt.Axis(tickMinStep=1)),
            color=schedule_colour(histogram, legend=False),
            tooltip=[field_tooltip("schedule", "schedule"),
                     field_tooltip("bin_start_255:Q", "from (x 1/255)", format=".3f"),
                     field_tooltip("bin_end_255:Q", "to (x 1/255)", format=".3f"),
                     field_tooltip("count", "attacks")],
        )
        .properties(width=540, height=60)
        .facet(row=alt.Row("schedule:N", sort=order, title=None,
                           header=alt.Header(labelAngle=0, labelAlign="left")))
    )


def trace_chart(summary: pd.DataFrame) -> alt.VConcatChart:
    """Step size, loss and attacks still running over the iterations, per schedule (three
    panels stacked, sharing the iteration axis).

    Args:
        summary: :func:`lib.analysis.aggregates.trace_summary` (schedule, iteration, running,
            mean_lr_255, mean_loss).
    """
    base = alt.Chart(summary).encode(
        color=schedule_colour(summary),
        tooltip=[field_tooltip("schedule", "schedule"), field_tooltip("iteration", "iteration"),
                 field_tooltip("running", "attacks running"),
                 field_tooltip("mean_lr_255:Q", "mean step (x 1/255)", format=".3f"),
                 field_tooltip("mean_loss:Q", "mean loss", format=".3f")],
    )
    rows = (("mean_lr_255", "mean step (x 1/255)"), ("mean_loss", "mean target loss"),
            ("running", "attacks running"))
    panels = []
    for k, (column, title) in enumerate(rows):
        last = k == len(rows) - 1  # the panels share the iteration axis: titled once, below
        x = alt.X("iteration:Q", title="iteration" if last else None,
                  axis=alt.Axis(tickMinStep=1, format="d", labels=last))
        panels.append(base.mark_line().encode(x=x, y=alt.Y(f"{column}:Q", title=title))
                      .properties(width=600, height=150))
    return finish(alt.vconcat(*panels, spacing=8))


def _step_axis(values: pd.Series, *, title: str) -> alt.X:
    """An x axis of the values tried, labelled at exactly those values; logarithmic only
    where they span a factor of 10 or more."""
    tried = sorted(float(v) for v in values.dropna().unique())
    spans = len(tried) > 1 and spans_a_decade(tried[0], tried[-1])
    scale = (alt.Scale(type="log", domain=[tried[0] / 1.2, tried[-1] * 1.2], nice=False)
             if spans else alt.Scale(zero=False, padding=20))
    return alt.X(f"{values.name}:Q", title=title, scale=scale,
                 axis=alt.Axis(values=tried, format=".3~g", labelOverlap=True))


def lr0_sensitivity_chart(sensitivity: pd.DataFrame) -> alt.HConcatChart:
    """Success rate and mean L1 against the initial step size lr0, per schedule, with 95 %
    intervals resampling images.

    Args:
        sensitivity: :func:`lib.analysis.aggregates.lr0_sensitivity` (lr0_255, schedule, attacks,
            success_rate(_low, _high), mean_l1_255(_low, _high), mean_iterations).
    """
    base = alt.Chart(sensitivity).encode(
        x=_step_axis(sensitivity["lr0_255"], title="initial step size lr0 (x 1/255)"),
        color=schedule_colour(sensitivity),
        tooltip=[field_tooltip("schedule", "schedule"),
                 field_tooltip("lr0_255:Q", "lr0 (x 1/255)", format=".3g"),
                 field_tooltip("images", "images"), field_tooltip("attacks", "attacks"),
                 field_tooltip("success_rate:Q", "success rate", format=".1%"),
                 field_tooltip("mean_l1_255:Q", "mean L1 (x 1/255)", format=".3f"),
                 field_tooltip("mean_iterations:Q", "mean iterations", format=".1f")],
    )
    panels = []
    for column, title, axis in (
            ("success_rate", "success rate", alt.Axis(format="%")),
            ("mean_l1_255", "mean L1 of successes (x 1/255)", alt.Axis())):
        line = base.mark_line(point=True).encode(y=alt.Y(f"{column}:Q", title=title, axis=axis))
        bars = interval_bars(base, f"{column}_low", f"{column}_high", title=title)
        panels.append((bars + line).properties(width=250, height=220))
    return finish(alt.hconcat(*panels, spacing=40))


def paired_difference_chart(differences: pd.DataFrame, *,
                            title: str = "L1 minus the reference's L1 (x 1/255)") -> alt.FacetChart:
    """Paired differences of every schedule against a reference, with 95 % intervals, one
    row of panels per epoch (stacked, sharing the difference axis).

    Args:
        differences: :func:`lib.analysis.paired.paired_schedule_differences` of one model
            (epoch, schedule, reference, images, pairs, mean_difference, low, high,
            p_signed_rank).
        title: the axis title (says what was subtracted, in which unit).
    """
    base = alt.Chart().encode(
        y=alt.Y("schedule:N", sort=schedules_in(differences), title=None),
        color=schedule_colour(differences, legend=False),
        tooltip=[field_tooltip("epoch", "epoch"), field_tooltip("schedule", "schedule"),
                 field_tooltip("reference", "reference"), field_tooltip("images", "images"),
                 field_tooltip("pairs", "pairs"),
                 field_tooltip("mean_difference:Q", "mean difference", format=".3f"),
                 field_tooltip("low:Q", "95 % low", format=".3f"),
                 field_tooltip("high:Q", "95 % high", format=".3f"),
                 field_tooltip("p_signed_rank:Q", "signed-rank p", format=".2g")],
    )
    zero = alt.Chart().mark_rule(color="gray", strokeDash=[4, 3]).encode(x=alt.datum(0))
    whiskers = base.mark_rule(strokeWidth=2).encode(x=alt.X("low:Q", title=title), x2="high:Q")
    points = base.mark_point(filled=True, size=60).encode(x=alt.X("mean_difference:Q",
                                                                  title=title))
    return finish(
        alt.layer(zero, whiskers, points, data=differences)
        .properties(width=520, height=alt.Step(18))
        .facet(row=alt.Row("epoch:O", title="epoch",
                           header=alt.Header(labelAngle=0, labelAlign="left")))
    )


def per_image_chart(per_image: pd.DataFrame, means: pd.DataFrame, *,
                    columns: int = 3) -> alt.FacetChart:
    """Robustness over training, image by image, beside the means of each checkpoint.

    Thin lines: each followed image's mean L1 at every epoch (the same targets at every
    epoch), coloured by its tool. Black: the mean over each checkpoint's own selection with
    its 95 % interval (:func:`lib.analysis.aggregates.mean_l1`). One panel per schedule,
    ``columns`` per row.

    Args:
        per_image: :func:`lib.analysis.trends.per_image_l1` (image_id, source_tool, schedule,
            epoch, targets, mean_l1_255).
        means: :func:`lib.analysis.aggregates.mean_l1` (epoch, schedule, mean_l1_255(_low, _high)).
        columns: panels per row.
    """
    order = schedules_in(means)
    table = pd.concat([
        per_image.assign(kind="image")[["kind", "image_id", "source_tool", "schedule", "epoch",
                                        "targets", "mean_l1_255"]],
        means.assign(kind="mean", image_id="mean", source_tool="all")[
            ["kind", "image_id", "source_tool", "schedule", "epoch", "mean_l1_255",
             "mean_l1_255_low", "mean_l1_255_high"]],
    ], ignore_index=True)
    title = "L1 (x 1/255)"
    base = alt.Chart().encode(x=alt.X("epoch:O", title="epoch", axis=alt.Axis(labelAngle=0)))
    tools = [t for t in TOOLS if t in set(per_image["source_tool"])]
    images = base.transform_filter(alt.datum.kind == "image").mark_line(
        opacity=0.5, strokeWidth=1, point=alt.OverlayMarkDef(size=12)).encode(
        y=alt.Y("mean_l1_255:Q", title=title), detail="image_id:N",
        color=alt.Color("source_tool:N", sort=tools, scale=colour_scale("tool", tools),
                        title="tool of the image", legend=top_legend(columns=4)),
        tooltip=[field_tooltip("image_id", "image"), field_tooltip("source_tool", "tool"),
                 field_tooltip("epoch", "epoch"), field_tooltip("targets", "targets"),
                 field_tooltip("mean_l1_255:Q", "mean L1 (x 1/255)", format=".3f")])
    mean = base.transform_filter(alt.datum.kind == "mean")
    mean_line = mean.mark_line(color="black", point=alt.OverlayMarkDef(color="black")).encode(
        y=alt.Y("mean_l1_255:Q", title=title),
        tooltip=[field_tooltip("epoch", "epoch"),
                 field_tooltip("mean_l1_255:Q", "mean of the selection (x 1/255)", format=".3f")])
    mean_bars = interval_bars(mean, "mean_l1_255_low", "mean_l1_255_high", title=title,
                          color="black")
    return finish(
        alt.layer(images, mean_bars, mean_line, data=table)
        .properties(width=160, height=180)
        .facet(facet=alt.Facet("schedule:N", sort=order, title=None), columns=columns)
    )


def refinement_chart(ranking: pd.DataFrame, *, columns: int = 2) -> alt.FacetChart:
    """Mean L1 along the path against the refined L1 (overshoot removed), with 95 % intervals,
    one panel per epoch (``columns`` per row).

    Args:
        ranking: :func:`lib.analysis.aggregates.refinement_ranking` (epoch, schedule, successes,
            mean_l1_255(_low, _high), mean_refined_l1_255(_low, _high)).
        columns: panels per row.
    """
    order = schedules_in(ranking)
    parts = []
    for column, kind in (("mean_l1_255", "path (first iterate past)"),
                         ("mean_refined_l1_255", "refined (at the boundary)")):
        parts.append(pd.DataFrame({
            "epoch": ranking["epoch"], "schedule": ranking["schedule"], "distance": kind,
            "successes": ranking["successes"], "mean": ranking[column],
            "low": ranking[f"{column}_low"], "high": ranking[f"{column}_high"]}))
    table = pd.concat(parts, ignore_index=True)
    title = "mean L1 (x 1/255)"
    base = alt.Chart().encode(
        x=alt.X("schedule:N", sort=order, title=None, axis=alt.Axis(labelAngle=-30)),
        xOffset=alt.XOffset("distance:N"),
        color=alt.Color("distance:N", title="L1 measured", legend=top_legend()),
        tooltip=[field_tooltip("epoch", "epoch"), field_tooltip("schedule", "schedule"),
                 field_tooltip("distance", "L1 measured"), field_tooltip("successes", "successes"),
                 field_tooltip("mean:Q", "mean (x 1/255)", format=".3f"),
                 field_tooltip("low:Q", "95 % low", format=".3f"),
                 field_tooltip("high:Q", "95 % high", format=".3f")])
    points = base.mark_point(filled=True).encode(y=alt.Y("mean:Q", title=title))
    bars = interval_bars(base, "low", "high", title=title)
    return finish(alt.layer(bars, points, data=table).properties(width=250, height=200)
                   .facet(facet=alt.Facet("epoch:O", title="epoch"), columns=columns))
