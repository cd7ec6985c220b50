"""Altair chart builders and image grids shared by the notebooks.

Every chart takes a tidy DataFrame (one row per observation, columns named as in the run
folder's tables) and returns an ``alt.Chart``; the notebooks only choose and arrange them.
Charts get their data inline, so callers pass aggregated tables, not raw per-attack rows.
"""

from __future__ import annotations

import altair as alt
import numpy as np
import pandas as pd
import torch
from PIL import Image
from torchvision.utils import make_grid

from lib import TOOLS

#: One colour per tool, fixed across every chart of the book.
TOOL_SCALE = alt.Scale(domain=list(TOOLS), scheme="tableau10")


def _interval_bars(base: alt.Chart, low: str, high: str) -> alt.Chart:
    """Error bars from the table's ``low`` to ``high`` columns (a 95 % interval)."""
    return base.mark_errorbar(ticks=True).encode(y=alt.Y(f"{low}:Q"), y2=f"{high}:Q")


def class_counts_chart(counts: pd.DataFrame) -> alt.Chart:
    """Grouped bars of frames per tool and split.

    Args:
        counts: columns ``split`` ("train"/"test"), ``tool`` (a name of ``lib.TOOLS``),
            ``frames`` (int >= 0).
    """
    return (
        alt.Chart(counts)
        .mark_bar()
        .encode(
            x=alt.X("tool:N", sort=list(TOOLS), title=None),
            xOffset=alt.XOffset("split:N", sort=["train", "test"]),
            y=alt.Y("frames:Q", title="single-tool frames"),
            color=alt.Color("split:N", sort=["train", "test"], title="split"),
            tooltip=["split", "tool", "frames"],
        )
        .properties(width=420, height=220)
    )


def tool_share_chart(shares: pd.DataFrame) -> alt.Chart:
    """Stacked bars: the share of annotated frames with 0, 1 and 2+ tools per split.

    Args:
        shares: columns ``split``, ``tools_present`` ("0", "1", "2+"), ``frames`` (int),
            ``share`` (in [0, 1]).
    """
    return (
        alt.Chart(shares)
        .mark_bar()
        .encode(
            y=alt.Y("split:N", sort=["train", "test"], title=None),
            x=alt.X("share:Q", stack="normalize", axis=alt.Axis(format="%"),
                    title="share of annotated frames"),
            color=alt.Color("tools_present:N", sort=["0", "1", "2+"], title="tools in frame"),
            order=alt.Order("tools_present:N"),
            tooltip=["split", "tools_present", "frames", alt.Tooltip("share:Q", format=".1%")],
        )
        .properties(width=420, height=80)
    )


def image_grid(images: torch.Tensor, *, columns: int, scale: int = 2) -> Image.Image:
    """Tile images into one picture for the book.

    Args:
        images: [N, 3, H, W], uint8 in [0, 255] or float in [0, 1].
        columns: images per row.
        scale: integer upscaling (nearest neighbour), so small frames stay visible.

    Returns:
        An RGB PIL image (notebooks display it as PNG).
    """
    if images.dtype == torch.uint8:
        images = images.float() / 255
    grid = make_grid(images.clamp(0, 1), nrow=columns, padding=2, pad_value=1.0)
    array = (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    picture = Image.fromarray(array)
    if scale != 1:
        picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
    return picture


def loss_curve_chart(losses: pd.DataFrame, *, window: int = 20) -> alt.Chart:
    """Training loss per SGD step (light) and its running mean over ``window`` steps.

    Args:
        losses: columns ``epoch`` (1-based), ``step`` (within the epoch), ``loss`` (>= 0).
    """
    table = losses.sort_values(["epoch", "step"]).reset_index(drop=True)
    steps_per_epoch = table.groupby("epoch")["step"].transform("max") + 1
    table = table.assign(
        position=(table["epoch"] - 1) + table["step"] / steps_per_epoch,
        smoothed=table["loss"].rolling(window, min_periods=1).mean(),
    )
    base = alt.Chart(table).encode(x=alt.X("position:Q", title="epoch"))
    raw = base.mark_line(opacity=0.25, color="gray").encode(
        y=alt.Y("loss:Q", title="training loss"))
    mean = base.mark_line(color="black").encode(y="smoothed:Q")
    return (raw + mean).properties(width=480, height=200)


def accuracy_f1_chart(metrics: pd.DataFrame) -> alt.Chart | alt.LayerChart:
    """The paper's Figure 1: test accuracy and macro F1 per epoch.

    Args:
        metrics: columns ``epoch`` (1-based), ``accuracy`` and ``macro_f1`` (in [0, 1]); with
            ``accuracy_low/high`` and ``macro_f1_low/high``
            (:func:`lib.analysis.aggregates.accuracy_f1_intervals`) the chart draws those
            intervals too.
    """
    names = {"accuracy": "accuracy", "macro_f1": "macro F1"}
    parts = []
    for column, label in names.items():
        part = pd.DataFrame({"epoch": metrics["epoch"], "metric": label,
                             "value": metrics[column]})
        if f"{column}_low" in metrics.columns:
            part = part.assign(low=metrics[f"{column}_low"], high=metrics[f"{column}_high"])
        parts.append(part)
    table = pd.concat(parts, ignore_index=True)
    base = alt.Chart(table).encode(x=alt.X("epoch:O", title="epoch"),
                                   color=alt.Color("metric:N", title=None))
    lines = base.mark_line(point=True).encode(
        y=alt.Y("value:Q", scale=alt.Scale(domain=[0, 1]), title="on the test split"),
        tooltip=["epoch", "metric", alt.Tooltip("value:Q", format=".3f")],
    )
    if "low" not in table.columns:
        return lines.properties(width=420, height=220)
    return (_interval_bars(base, "low", "high") + lines).properties(width=420, height=220)


def per_class_f1_chart(per_class: pd.DataFrame) -> alt.Chart:
    """F1 of every tool per epoch.

    Args:
        per_class: columns ``epoch``, ``tool``, ``f1`` (in [0, 1]), ``support`` (int).
    """
    return (
        alt.Chart(per_class)
        .mark_line(point=True)
        .encode(
            x=alt.X("epoch:O"),
            y=alt.Y("f1:Q", scale=alt.Scale(domain=[0, 1]), title="F1"),
            color=alt.Color("tool:N", scale=TOOL_SCALE),
            tooltip=["epoch", "tool", alt.Tooltip("f1:Q", format=".3f"), "support"],
        )
        .properties(width=420, height=220)
    )


def confusion_chart(confusion: pd.DataFrame) -> alt.Chart:
    """Heatmap of a confusion matrix, rows normalised (each true class sums to 1).

    Args:
        confusion: one epoch's cells: columns ``true`` and ``predicted`` (labels 0-6),
            ``count`` (int >= 0).
    """
    table = confusion.copy()
    totals = table.groupby("true")["count"].transform("sum")
    table["share"] = (table["count"] / totals.where(totals > 0)).fillna(0.0)
    table["true tool"] = table["true"].map(dict(enumerate(TOOLS)))
    table["predicted tool"] = table["predicted"].map(dict(enumerate(TOOLS)))
    base = alt.Chart(table).encode(
        x=alt.X("predicted tool:N", sort=list(TOOLS)),
        y=alt.Y("true tool:N", sort=list(TOOLS)),
    )
    cells = base.mark_rect().encode(
        color=alt.Color("share:Q", scale=alt.Scale(scheme="blues", domain=[0, 1]),
                        title="share of row"),
        tooltip=["true tool", "predicted tool", "count", alt.Tooltip("share:Q", format=".1%")],
    )
    labels = base.mark_text(fontSize=10).encode(
        text="count:Q",
        color=alt.condition("datum.share > 0.5", alt.value("white"), alt.value("black")),
    )
    return (cells + labels).properties(width=300, height=300)


# --------------------------------------------------------------------------- attack results
# Every chart below takes a table of lib.analysis.aggregates (aggregated, never the per-attack
# rows).


def _schedule_color(table: pd.DataFrame) -> alt.Color:
    """One colour per schedule, in the order the table lists them (the stage's order)."""
    order = list(dict.fromkeys(table["schedule"]))
    return alt.Color("schedule:N", sort=order, scale=alt.Scale(domain=order, scheme="dark2"),
                     title="schedule")


def success_rate_chart(rates: pd.DataFrame) -> alt.LayerChart:
    """The paper's Figure 2: success rate within ``max_iter`` per schedule and epoch.

    Args:
        rates: :func:`lib.analysis.aggregates.success_rates` (epoch, schedule, attacks, successes,
            success_rate in [0, 1] with its Wilson interval success_rate_low/high, skipped).
            The bars are the 95 % Wilson intervals.
    """
    base = alt.Chart(rates).encode(
        x=alt.X("epoch:O", title="epoch"), xOffset=alt.XOffset("schedule:N", sort=None),
        color=_schedule_color(rates))
    points = base.mark_point(filled=True).encode(
        y=alt.Y("success_rate:Q", title="success rate (95 % interval)",
                axis=alt.Axis(format="%"), scale=alt.Scale(zero=False)),
        tooltip=["epoch", "schedule", "attacks", "successes",
                 alt.Tooltip("success_rate:Q", format=".1%"),
                 alt.Tooltip("success_rate_low:Q", format=".1%", title="95 % low"),
                 alt.Tooltip("success_rate_high:Q", format=".1%", title="95 % high"),
                 "skipped"],
    )
    return (_interval_bars(base, "success_rate_low", "success_rate_high") + points).properties(
        width=420, height=240)


def l1_chart(l1: pd.DataFrame) -> alt.LayerChart:
    """The paper's Figure 3: mean L1 of the successful attacks per schedule and epoch.

    Args:
        l1: :func:`lib.analysis.aggregates.mean_l1` (epoch, schedule, successes, mean_l1_255
            with its bootstrap interval mean_l1_255_low/high). The bars are the 95 % intervals.
    """
    base = alt.Chart(l1).encode(x=alt.X("epoch:O", title="epoch"),
                                xOffset=alt.XOffset("schedule:N", sort=None),
                                color=_schedule_color(l1))
    points = base.mark_point(filled=True).encode(
        y=alt.Y("mean_l1_255:Q", title="mean L1, successful attacks (x 1/255)"),
        tooltip=["epoch", "schedule", "successes",
                 alt.Tooltip("mean_l1_255:Q", format=".3f", title="mean L1 (x 1/255)"),
                 alt.Tooltip("mean_l1_255_low:Q", format=".3f", title="95 % low"),
                 alt.Tooltip("mean_l1_255_high:Q", format=".3f", title="95 % high")],
    )
    return (_interval_bars(base, "mean_l1_255_low", "mean_l1_255_high") + points).properties(
        width=420, height=240)


def iterations_lr_chart(summary: pd.DataFrame) -> alt.HConcatChart:
    """The paper's Figure 4: mean iterations and mean step size per schedule at one epoch.

    Args:
        summary: :func:`lib.analysis.aggregates.iterations_and_lr` (schedule, attacks,
            mean_iterations and mean_lr_255, each with its bootstrap interval
            ``_low``/``_high``, success_rate).
    """
    order = list(dict.fromkeys(summary["schedule"]))
    base = alt.Chart(summary).encode(
        x=alt.X("schedule:N", sort=order, title=None, axis=alt.Axis(labelAngle=-30)),
        color=alt.Color("schedule:N", sort=order, scale=alt.Scale(domain=order, scheme="dark2"),
                        legend=None),
        tooltip=["schedule", "attacks", alt.Tooltip("mean_iterations:Q", format=".1f"),
                 alt.Tooltip("mean_lr_255:Q", format=".3f", title="mean step (x 1/255)"),
                 alt.Tooltip("success_rate:Q", format=".1%")],
    )
    panels = []
    for column, title in (("mean_iterations", "mean iterations (95 % interval)"),
                          ("mean_lr_255", "mean step size (x 1/255)")):
        bars = base.mark_bar(opacity=0.7).encode(y=alt.Y(f"{column}:Q", title=title))
        whiskers = base.mark_errorbar(ticks=True, color="black").encode(
            y=f"{column}_low:Q", y2=f"{column}_high:Q")
        panels.append((bars + whiskers).properties(width=200, height=220))
    return alt.hconcat(*panels)


def class_pair_chart(matrix: pd.DataFrame) -> alt.FacetChart:
    """Source x target mean L1 per epoch (small multiples), one schedule at a time (a selector).

    Each cell shows its mean L1 and, below it, how many successful attacks it averages
    (``n``); the tooltip adds the attacks tried.

    Args:
        matrix: :func:`lib.analysis.aggregates.class_pair_l1` (epoch, schedule, source_tool,
            target_tool, attacks, successes, mean_l1_255; NaN where no attack of the pair
            succeeded).
    """
    order = list(dict.fromkeys(matrix["schedule"]))
    choice = alt.param(
        name="schedule_choice", value=order[0],
        bind=alt.binding_select(options=order, name="schedule "),
    )
    top = float(np.nanmax(matrix["mean_l1_255"])) if matrix["mean_l1_255"].notna().any() else 1.0
    table = matrix.assign(count_label="n=" + matrix["successes"].astype(str))
    base = alt.Chart().encode(
        x=alt.X("target_tool:N", sort=list(TOOLS), title="target"),
        y=alt.Y("source_tool:N", sort=list(TOOLS), title="source"),
    )
    cells = base.mark_rect().encode(
        color=alt.Color("mean_l1_255:Q", scale=alt.Scale(scheme="viridis", domain=[0, top]),
                        title="mean L1 (x 1/255)"),
        tooltip=["epoch", "schedule", "source_tool", "target_tool", "attacks", "successes",
                 alt.Tooltip("mean_l1_255:Q", format=".3f")],
    )
    shade = alt.condition(f"datum.mean_l1_255 > {top / 2}", alt.value("black"),
                          alt.value("white"))
    means = base.mark_text(fontSize=8, dy=-5).encode(
        text=alt.Text("mean_l1_255:Q", format=".1f"), color=shade)
    counts = base.mark_text(fontSize=7, dy=6).encode(text="count_label:N", color=shade)
    return (
        alt.layer(cells, means, counts, data=table)
        .transform_filter(alt.datum.schedule == choice)
        .properties(width=240, height=240)
        .facet(column=alt.Column("epoch:O", title="epoch"))
        .add_params(choice)
    )


def l1_histogram_chart(histogram: pd.DataFrame) -> alt.FacetChart:
    """L1 distribution of the successful attacks, one row per schedule.

    Args:
        histogram: :func:`lib.analysis.aggregates.l1_histogram` (schedule, bin_start_255,
            bin_end_255, count).
    """
    order = list(dict.fromkeys(histogram["schedule"]))
    return (
        alt.Chart(histogram)
        .mark_bar()
        .encode(
            x=alt.X("bin_start_255:Q", title="L1 of successful attacks (x 1/255)"),
            x2="bin_end_255:Q",
            y=alt.Y("count:Q", title="attacks"),
            color=alt.Color("schedule:N", sort=order,
                            scale=alt.Scale(domain=order, scheme="dark2"), legend=None),
            tooltip=["schedule", alt.Tooltip("bin_start_255:Q", format=".3f"),
                     alt.Tooltip("bin_end_255:Q", format=".3f"), "count"],
        )
        .properties(width=420, height=60)
        .facet(row=alt.Row("schedule:N", sort=order, title=None))
    )


def trace_chart(summary: pd.DataFrame) -> alt.HConcatChart:
    """Step size, loss and attacks still running over the iterations, per schedule.

    Args:
        summary: :func:`lib.analysis.aggregates.trace_summary` (schedule, iteration, running,
            mean_lr_255, mean_loss).
    """
    base = alt.Chart(summary).encode(
        x=alt.X("iteration:Q", title="iteration"), color=_schedule_color(summary),
        tooltip=["schedule", "iteration", "running", alt.Tooltip("mean_lr_255:Q", format=".3f"),
                 alt.Tooltip("mean_loss:Q", format=".3f")],
    )
    panels = [
        base.mark_line().encode(y=alt.Y("mean_lr_255:Q", title="mean step size (x 1/255)")),
        base.mark_line().encode(y=alt.Y("mean_loss:Q", title="mean loss (cross-entropy)")),
        base.mark_line().encode(y=alt.Y("running:Q", title="attacks still running")),
    ]
    return alt.hconcat(*[p.properties(width=210, height=200) for p in panels])


def lr0_sensitivity_chart(sensitivity: pd.DataFrame) -> alt.HConcatChart:
    """Success rate and mean L1 against the initial step size lr0, per schedule, with 95 %
    intervals (Wilson for the rate, bootstrap for the mean).

    Args:
        sensitivity: :func:`lib.analysis.aggregates.lr0_sensitivity` (lr0_255, schedule, attacks,
            success_rate(_low, _high), mean_l1_255(_low, _high), mean_iterations).
    """
    base = alt.Chart(sensitivity).encode(
        x=alt.X("lr0_255:Q", scale=alt.Scale(type="log"), title="lr0 (x 1/255)"),
        color=_schedule_color(sensitivity),
        tooltip=["schedule", alt.Tooltip("lr0_255:Q", format=".3g"), "attacks",
                 alt.Tooltip("success_rate:Q", format=".1%"),
                 alt.Tooltip("mean_l1_255:Q", format=".3f"),
                 alt.Tooltip("mean_iterations:Q", format=".1f")],
    )
    rate = base.mark_line(point=True).encode(
        y=alt.Y("success_rate:Q", title="success rate", axis=alt.Axis(format="%")))
    distance = base.mark_line(point=True).encode(
        y=alt.Y("mean_l1_255:Q", title="mean L1 of successful attacks (x 1/255)"))
    return alt.hconcat(
        (_interval_bars(base, "success_rate_low", "success_rate_high") + rate)
        .properties(width=240, height=220),
        (_interval_bars(base, "mean_l1_255_low", "mean_l1_255_high") + distance)
        .properties(width=240, height=220))


def paired_difference_chart(differences: pd.DataFrame, *,
                            title: str = "L1 minus the reference's L1 (x 1/255)") -> alt.FacetChart:
    """Paired differences of every schedule against a reference, with 95 % intervals.

    Args:
        differences: :func:`lib.analysis.paired.paired_schedule_differences` (epoch, schedule,
            reference, pairs, mean_difference, low, high, p_signed_rank).
        title: the axis title (says what was subtracted, in which unit).
    """
    base = alt.Chart().encode(
        y=alt.Y("schedule:N", sort=None, title=None), color=_schedule_color(differences),
        tooltip=["epoch", "schedule", "reference", "pairs",
                 alt.Tooltip("mean_difference:Q", format=".3f"),
                 alt.Tooltip("low:Q", format=".3f", title="95 % low"),
                 alt.Tooltip("high:Q", format=".3f", title="95 % high"),
                 alt.Tooltip("p_signed_rank:Q", format=".2g", title="signed-rank p")],
    )
    zero = alt.Chart().mark_rule(color="gray", strokeDash=[4, 3]).encode(x=alt.datum(0))
    whiskers = base.mark_rule().encode(x=alt.X("low:Q", title=title), x2="high:Q")
    points = base.mark_point(filled=True, size=50).encode(x="mean_difference:Q")
    return (alt.layer(zero, whiskers, points, data=differences)
            .properties(width=220, height=110)
            .facet(column=alt.Column("epoch:O", title="epoch")))


def per_image_chart(per_image: pd.DataFrame, means: pd.DataFrame) -> alt.FacetChart:
    """Robustness over training, image by image, beside the means of each checkpoint.

    Thin lines: each followed image's mean L1 at every epoch (the same targets at every
    epoch), coloured by its tool. Black: the mean over each checkpoint's own selection with
    its 95 % interval (:func:`lib.analysis.aggregates.mean_l1`). One panel per schedule.

    Args:
        per_image: :func:`lib.analysis.aggregates.per_image_l1` (image_id, source_tool, schedule,
            epoch, targets, mean_l1_255).
        means: :func:`lib.analysis.aggregates.mean_l1` (epoch, schedule, mean_l1_255(_low, _high)).
    """
    order = list(dict.fromkeys(means["schedule"]))
    table = pd.concat([
        per_image.assign(kind="image")[["kind", "image_id", "source_tool", "schedule", "epoch",
                                        "targets", "mean_l1_255"]],
        means.assign(kind="mean", image_id="mean", source_tool="all")[
            ["kind", "image_id", "source_tool", "schedule", "epoch", "mean_l1_255",
             "mean_l1_255_low", "mean_l1_255_high"]],
    ], ignore_index=True)
    base = alt.Chart().encode(x=alt.X("epoch:O", title="epoch"))
    images = base.transform_filter(alt.datum.kind == "image").mark_line(
        opacity=0.45, strokeWidth=1, point=alt.OverlayMarkDef(size=12)).encode(
        y=alt.Y("mean_l1_255:Q", title="L1 of successful attacks (x 1/255)"),
        detail="image_id:N", color=alt.Color("source_tool:N", scale=TOOL_SCALE, title="tool"),
        tooltip=["image_id", "source_tool", "epoch", "targets",
                 alt.Tooltip("mean_l1_255:Q", format=".3f")])
    mean = base.transform_filter(alt.datum.kind == "mean")
    mean_line = mean.mark_line(color="black", point=alt.OverlayMarkDef(color="black")).encode(
        y="mean_l1_255:Q", tooltip=["epoch", alt.Tooltip("mean_l1_255:Q", format=".3f")])
    mean_bars = mean.mark_errorbar(ticks=True, color="black").encode(
        y="mean_l1_255_low:Q", y2="mean_l1_255_high:Q")
    return (alt.layer(images, mean_bars, mean_line, data=table)
            .properties(width=170, height=220)
            .facet(column=alt.Column("schedule:N", sort=order, title=None)))


def refinement_chart(ranking: pd.DataFrame) -> alt.FacetChart:
    """Mean L1 along the path against the refined L1 (overshoot removed), with 95 % intervals.

    Args:
        ranking: :func:`lib.analysis.aggregates.refinement_ranking` (epoch, schedule, successes,
            mean_l1_255(_low, _high), mean_refined_l1_255(_low, _high)).
    """
    order = list(dict.fromkeys(ranking["schedule"]))
    parts = []
    for column, kind in (("mean_l1_255", "path (first iterate past)"),
                         ("mean_refined_l1_255", "refined (at the boundary)")):
        parts.append(pd.DataFrame({
            "epoch": ranking["epoch"], "schedule": ranking["schedule"], "distance": kind,
            "successes": ranking["successes"], "mean": ranking[column],
            "low": ranking[f"{column}_low"], "high": ranking[f"{column}_high"]}))
    table = pd.concat(parts, ignore_index=True)
    base = alt.Chart().encode(
        x=alt.X("schedule:N", sort=order, title=None, axis=alt.Axis(labelAngle=-30)),
        xOffset=alt.XOffset("distance:N"),
        color=alt.Color("distance:N", title="L1 measured"),
        tooltip=["epoch", "schedule", "distance", "successes",
                 alt.Tooltip("mean:Q", format=".3f"), alt.Tooltip("low:Q", format=".3f"),
                 alt.Tooltip("high:Q", format=".3f")])
    points = base.mark_point(filled=True).encode(
        y=alt.Y("mean:Q", title="mean L1, successful attacks (x 1/255)"))
    bars = base.mark_errorbar(ticks=True).encode(y="low:Q", y2="high:Q")
    return (alt.layer(bars, points, data=table).properties(width=240, height=220)
            .facet(column=alt.Column("epoch:O", title="epoch")))


# --------------------------------------------------------------------------- minimality


def minimality_ratio_chart(ratios: pd.DataFrame) -> alt.LayerChart:
    """Median ratio of each schedule's L1 to the best-known L1, with its 95 % interval.

    Args:
        ratios: :func:`lib.analysis.minimality.minimality_intervals` (schedule, epoch, successful,
            median_ratio, median_ratio_low, median_ratio_high, q25_ratio, q75_ratio).
    """
    table = ratios.assign(epoch_label="epoch " + ratios["epoch"].astype(str))
    base = alt.Chart(table).encode(
        y=alt.Y("schedule:N", sort=None, title=None),
        yOffset=alt.YOffset("epoch_label:N"),
        color=alt.Color("epoch_label:N", title="checkpoint"),
        tooltip=["schedule", "epoch", "successful",
                 alt.Tooltip("median_ratio:Q", format=".2f"),
                 alt.Tooltip("median_ratio_low:Q", format=".2f", title="95 % low"),
                 alt.Tooltip("median_ratio_high:Q", format=".2f", title="95 % high"),
                 alt.Tooltip("q25_ratio:Q", format=".2f"),
                 alt.Tooltip("q75_ratio:Q", format=".2f")])
    whiskers = base.mark_rule().encode(
        x=alt.X("median_ratio_low:Q", title="L1 / best-known L1 (median, 95 % interval)",
                scale=alt.Scale(zero=False)), x2="median_ratio_high:Q")
    points = base.mark_point(filled=True, size=60).encode(x="median_ratio:Q")
    return (whiskers + points).properties(width=380, height=200)


def optimality_chart(optimality: pd.DataFrame) -> alt.LayerChart:
    """AttackBench's optimality score per schedule (1: the best known on every pair), with its
    95 % bootstrap interval over the pairs.

    Args:
        optimality: :func:`lib.analysis.minimality.minimality_intervals` (schedule, epoch, pairs,
            optimality, optimality_low, optimality_high).
    """
    table = optimality.assign(epoch_label="epoch " + optimality["epoch"].astype(str))
    base = alt.Chart(table).encode(
        y=alt.Y("schedule:N", sort=None, title=None),
        yOffset=alt.YOffset("epoch_label:N"),
        color=alt.Color("epoch_label:N", title="checkpoint"),
        tooltip=["schedule", "epoch", "pairs", alt.Tooltip("optimality:Q", format=".3f"),
                 alt.Tooltip("optimality_low:Q", format=".3f", title="95 % low"),
                 alt.Tooltip("optimality_high:Q", format=".3f", title="95 % high")])
    bars = base.mark_bar(opacity=0.6).encode(
        x=alt.X("optimality:Q", scale=alt.Scale(domain=[0, 1]),
                title="optimality score (95 % interval)"))
    whiskers = base.mark_rule(color="black").encode(x="optimality_low:Q", x2="optimality_high:Q")
    return (bars + whiskers).properties(width=380, height=200)


def gallery_picture(gallery: dict[str, np.ndarray], *, scale: int = 2,
                    schedules: list[str] | None = None) -> Image.Image:
    """Borderline images: per row one attack image; columns the original, then for every
    schedule the borderline image, then for every schedule the amplified perturbation.

    Perturbations are shown as ``0.5 + delta / (2 max |delta|)``, with the maximum taken over
    the row, so grey is no change and the schedules of one row share one amplification.

    Args:
        gallery: ``attack/gallery.npz``: ``original`` uint8 [G, 3, S, S], ``borderline`` float
            [G, 3, S, S] in [0, 1], ``image_id``, ``schedule``, ``source``, ``target`` [G].
        scale: integer upscaling of every image.
        schedules: column order; default the order of first appearance.

    Returns:
        An RGB PIL image with a header line naming the columns.
    """
    from PIL import ImageDraw

    names = schedules or list(dict.fromkeys(gallery["schedule"].tolist()))
    keys = list(dict.fromkeys(zip(gallery["image_id"].tolist(), gallery["target"].tolist(),
                                  strict=True)))
    tiles = []
    for image_id, target in keys:
        mask = (gallery["image_id"] == image_id) & (gallery["target"] == target)
        original = torch.as_tensor(gallery["original"][mask][0]).float() / 255
        borderline = {s: torch.as_tensor(b).float() for s, b in zip(
            gallery["schedule"][mask].tolist(), gallery["borderline"][mask], strict=True)}
        deltas = {s: borderline[s] - original for s in names if s in borderline}
        peak = max([float(d.abs().max()) for d in deltas.values()] + [1e-12])
        blank = torch.ones_like(original)
        tiles.append(original)
        tiles += [borderline.get(s, blank) for s in names]
        tiles += [0.5 + deltas[s] / (2 * peak) if s in deltas else blank for s in names]
    columns = 1 + 2 * len(names)
    grid = image_grid(torch.stack(tiles), columns=columns, scale=scale)
    cell = grid.width / columns
    header = Image.new("RGB", (grid.width, 28), "white")
    draw = ImageDraw.Draw(header)
    labels = ["original"] + names + [f"{n} (x)" for n in names]
    for k, label in enumerate(labels):
        draw.text((k * cell + 3, 2 + 12 * (k % 2)), label[: int(cell // 6)], fill="black")
    picture = Image.new("RGB", (grid.width, grid.height + header.height), "white")
    picture.paste(header, (0, 0))
    picture.paste(grid, (0, header.height))
    return picture
