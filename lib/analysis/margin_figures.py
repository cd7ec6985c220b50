"""Altair charts of the margins chapter: robust accuracy, the margin over training, the
schedules' Pareto view, the outcome classes of failed attacks and the two losses.

Each chart takes a table of :mod:`lib.analysis.margins`, :mod:`lib.analysis.pareto`,
:mod:`lib.analysis.failures` or :mod:`lib.analysis.loss_comparison` as the margins stage keeps
it, and returns an ``alt.Chart``. Distances are shown in grey levels (x 255) for Linf and L1
and in [0, 1] pixel units for L2, as the book writes them.
"""

from __future__ import annotations

import altair as alt
import numpy as np
import pandas as pd

from lib.analysis.failures import OUTCOMES

#: How a norm's distances are shown: (factor, axis title).
NORM_UNITS = {"linf": (255.0, "Linf (x 1/255)"), "l2": (1.0, "L2 ([0, 1] pixel units)"),
              "l1": (255.0, "L1, mean per value (x 1/255)")}


def shown(values: pd.Series | np.ndarray, norm: str) -> np.ndarray:
    """Distances in ``norm`` as the book shows them (Linf and L1 in grey levels)."""
    return np.asarray(values, dtype=float) * NORM_UNITS[norm][0]


def _method_color(table: pd.DataFrame) -> alt.Color:
    order = list(dict.fromkeys(table["method"]))
    return alt.Color("method:N", sort=order, scale=alt.Scale(domain=order, scheme="dark2"),
                     title="attack", legend=alt.Legend(labelLimit=260, symbolOpacity=1))


def robust_accuracy_chart(curves: pd.DataFrame, *, norm: str) -> alt.FacetChart:
    """Robust accuracy against epsilon with its 95 % band, one line per attack (schedule, best
    of schedules, untargeted), one panel per checkpoint.

    Args:
        curves: :func:`lib.analysis.margins.robust_accuracy` rows of one norm (model, epoch,
            method, epsilon, estimate, low, high, n_images).
    """
    table = curves.assign(eps=shown(curves["epsilon"], norm))
    base = alt.Chart(table).encode(
        x=alt.X("eps:Q", title=f"epsilon, {NORM_UNITS[norm][1]}"), color=_method_color(table))
    band = base.mark_area(opacity=0.15).encode(y=alt.Y("low:Q"), y2="high:Q")
    line = base.mark_line(interpolate="step-after").encode(
        y=alt.Y("estimate:Q", title="robust accuracy (95 % band)", axis=alt.Axis(format="%"),
                scale=alt.Scale(domain=[0, 1])),
        tooltip=["epoch", "method", alt.Tooltip("eps:Q", format=".3g", title="epsilon"),
                 alt.Tooltip("estimate:Q", format=".1%"), alt.Tooltip("low:Q", format=".1%"),
                 alt.Tooltip("high:Q", format=".1%"), "n_images"])
    return (band + line).properties(width=230, height=180).facet(
        column=alt.Column("epoch:O", title="checkpoint (epoch)"))


def margin_change_chart(pairs: pd.DataFrame) -> alt.HConcatChart:
    """Every paired image's margin at the first (x) and the last (y) attacked checkpoint, log
    scales, with the diagonal of no change; one panel per norm, each with its own scales. An
    image above the diagonal moved away from the boundary while the network trained.

    Args:
        pairs: :func:`lib.analysis.margins.paired_log_ratios` rows with a ``norm`` column
            (first, last in [0, 1] pixel units; ``inf`` ends are left out).
    """
    finite = pairs[np.isfinite(pairs["first"]) & np.isfinite(pairs["last"])
                   & (pairs["first"] > 0) & (pairs["last"] > 0)]
    panels = []
    for norm in [n for n in NORM_UNITS if n in set(finite["norm"])]:
        part = finite[finite["norm"] == norm]
        part = part.assign(x=shown(part["first"], norm), y=shown(part["last"], norm))
        ends = [min(part["x"].min(), part["y"].min()), max(part["x"].max(), part["y"].max())]
        diagonal = alt.Chart(pd.DataFrame({"v": ends})).mark_line(
            color="gray", strokeDash=[4, 4]).encode(x="v:Q", y="v:Q")
        points = alt.Chart(part).mark_point(filled=True, opacity=0.7).encode(
            x=alt.X("x:Q", scale=alt.Scale(type="log"), title="first checkpoint"),
            y=alt.Y("y:Q", scale=alt.Scale(type="log"), title="last checkpoint"),
            color=alt.Color("model:N", title="model"),
            tooltip=["image_id", alt.Tooltip("x:Q", format=".3g", title="first"),
                     alt.Tooltip("y:Q", format=".3g", title="last")])
        panels.append(alt.layer(diagonal, points).properties(
            width=200, height=200, title=f"margin, {NORM_UNITS[norm][1]}"))
    return alt.hconcat(*panels).resolve_scale(x="independent", y="independent")


def pareto_chart(front: pd.DataFrame, *, norm: str) -> alt.LayerChart:
    """Success rate against the median distance of the successes, one point per (schedule,
    lr0), a schedule's points joined in lr0 order; filled points are Pareto-optimal (no other
    point has at least the success and at most the distance).

    Args:
        front: :func:`lib.analysis.pareto.pareto_front` rows of one norm (schedule, lr0,
            lr0_255, success_rate, distance, pareto_optimal).
    """
    table = front.assign(shown_distance=shown(front["distance"], norm),
                         lr0_label=front["lr0_255"].map(lambda v: f"{v:.2g}/255"))
    table = table[np.isfinite(table["shown_distance"])]
    order = list(dict.fromkeys(front["schedule"]))
    color = alt.Color("schedule:N", sort=order, scale=alt.Scale(domain=order, scheme="dark2"))
    base = alt.Chart(table).encode(
        x=alt.X("shown_distance:Q", title=f"median distance of the successes, "
                f"{NORM_UNITS[norm][1]}", scale=alt.Scale(zero=False)),
        y=alt.Y("success_rate:Q", title="success rate", axis=alt.Axis(format="%"),
                scale=alt.Scale(domain=[0, 1])),
        color=color)
    lines = base.mark_line(opacity=0.5).encode(order="lr0:Q")
    points = base.mark_point(size=70).encode(
        fill=alt.condition("datum.pareto_optimal", color, alt.value("white")),
        tooltip=["schedule", "lr0_label", alt.Tooltip("success_rate:Q", format=".1%"),
                 alt.Tooltip("shown_distance:Q", format=".3g", title="median distance"),
                 "pareto_optimal"])
    labels = base.mark_text(dx=6, dy=-6, fontSize=9, align="left").encode(text="lr0_label:N")
    return (lines + points + labels).properties(width=420, height=260)


def outcome_chart(shares: pd.DataFrame) -> alt.FacetChart:
    """Failed attacks per outcome class, stacked, per checkpoint; one panel per schedule.

    Args:
        shares: :func:`lib.analysis.failures.outcome_shares` (epoch, schedule, outcome,
            failures, estimate with low/high: the class's share of the group's failures).
    """
    table = shares[shares["failures"] > 0]
    order = list(dict.fromkeys(shares["schedule"]))
    return alt.Chart(table).mark_bar().encode(
        x=alt.X("epoch:O", title="epoch"),
        y=alt.Y("failures:Q", title="failed attacks"),
        color=alt.Color("outcome:N", sort=list(OUTCOMES), scale=alt.Scale(
            domain=list(OUTCOMES), scheme="tableau10"), title="outcome"),
        order=alt.Order("outcome_rank:Q"),
        tooltip=["epoch", "schedule", "outcome", "failures",
                 alt.Tooltip("estimate:Q", format=".0%", title="share"),
                 alt.Tooltip("low:Q", format=".0%", title="95 % low"),
                 alt.Tooltip("high:Q", format=".0%", title="95 % high"), "n_images"],
    ).transform_calculate(
        outcome_rank=f"indexof({list(OUTCOMES)!r}, datum.outcome)"
    ).properties(width=110, height=200).facet(
        column=alt.Column("schedule:N", sort=order, title=None))


def loss_chart(comparison: pd.DataFrame) -> alt.LayerChart:
    """Share of the sampled cross-entropy failures that the logit margin solves, per schedule
    and checkpoint, with 95 % intervals.

    Args:
        comparison: :func:`lib.analysis.loss_comparison.loss_comparison` rows of the quantity
            :data:`lib.analysis.loss_comparison.RESCUED`.
    """
    table = comparison[comparison["n_images"] > 0].assign(
        epoch_label="epoch " + comparison["epoch"].astype(str))
    base = alt.Chart(table).encode(
        y=alt.Y("schedule:N", sort=None, title=None), yOffset="epoch_label:N",
        color=alt.Color("epoch_label:N", title="checkpoint"),
        tooltip=["schedule", "epoch", alt.Tooltip("estimate:Q", format=".0%"),
                 alt.Tooltip("low:Q", format=".0%", title="95 % low"),
                 alt.Tooltip("high:Q", format=".0%", title="95 % high"),
                 "n_attacks", "n_images"])
    whiskers = base.mark_rule().encode(
        x=alt.X("low:Q", title="failures solved by the logit margin (95 % interval)",
                axis=alt.Axis(format="%"), scale=alt.Scale(domain=[0, 1])), x2="high:Q")
    points = base.mark_point(filled=True, size=60).encode(x="estimate:Q")
    return (whiskers + points).properties(width=380, height=200)
