"""Altair charts of the margins chapter: robust accuracy, the margin over training, the
schedules' Pareto view, the outcome classes of failed attacks and the two losses.

Each chart takes a table of :mod:`lib.analysis.margins`, :mod:`lib.analysis.pareto`,
:mod:`lib.analysis.failures` or :mod:`lib.analysis.loss_comparison` as the margins stage keeps
it, and returns a finished chart in the book's style (:func:`lib.analysis.figures.finish`):
every schedule in its colour (:data:`lib.analysis.figures.SCHEDULE_COLOURS`), legends above the
plot, no wider than :data:`lib.analysis.figures.PAGE_WIDTH`. Distances are shown in grey
levels (x 1/255) for Linf and L1 and in [0, 1] pixel units for L2, as the book writes them.
"""

from __future__ import annotations

import altair as alt
import numpy as np
import pandas as pd

from lib.analysis.failures import OUTCOMES
from lib.analysis.figures import colour_scale, finish, top_legend
from lib.analysis.margins import NORM_NAMES

#: How a norm's distances are shown: the factor from [0, 1] pixel units, the unit's words.
NORM_UNITS = {"linf": (255.0, "x 1/255"), "l2": (1.0, "[0, 1] pixel units"),
              "l1": (255.0, "x 1/255, mean per value")}
#: One colour per outcome class of a failed attack.
OUTCOME_COLOURS = dict(zip(OUTCOMES, ("#D55E00", "#999999", "#E69F00", "#0072B2", "#009E73",
                                      "#000000"), strict=True))


def shown(values: pd.Series | np.ndarray, norm: str) -> np.ndarray:
    """Distances in ``norm`` as the book shows them (Linf and L1 in grey levels)."""
    return np.asarray(values, dtype=float) * NORM_UNITS[norm][0]


def axis_title(what: str, norm: str) -> str:
    """``"<what>, Linf (x 1/255)"`` and the like."""
    return f"{what}, {NORM_NAMES[norm]} ({NORM_UNITS[norm][1]})"


def robust_accuracy_chart(curves: pd.DataFrame, *, norm: str, columns: int = 2
                          ) -> alt.FacetChart:
    """Robust accuracy against epsilon with its 95 % band, one line per attack (each schedule,
    the best of the schedules, the untargeted attacks), one panel per checkpoint.

    Args:
        curves: :func:`lib.analysis.margins.robust_accuracy` rows of one norm and one model
            (epoch, method, epsilon, estimate, low, high, n_images).
        columns: panels per row.
    """
    order = list(dict.fromkeys(curves["method"]))
    table = curves.assign(eps=shown(curves["epsilon"], norm),
                          checkpoint="epoch " + curves["epoch"].astype(str))
    colour = alt.Color("method:N", sort=order, scale=colour_scale("schedule", order),
                       title="attack", legend=top_legend(columns=3))
    base = alt.Chart(table).encode(
        x=alt.X("eps:Q", title=axis_title("epsilon", norm)), color=colour)
    band = base.mark_area(opacity=0.12, interpolate="step-after").encode(
        y=alt.Y("low:Q", title="robust accuracy (95 % band)"), y2="high:Q")
    line = base.mark_line(interpolate="step-after").encode(
        y=alt.Y("estimate:Q", title="robust accuracy (95 % band)", axis=alt.Axis(format="%"),
                scale=alt.Scale(domain=[0, 1])),
        tooltip=[alt.Tooltip("checkpoint:N", title="checkpoint"),
                 alt.Tooltip("method:N", title="attack"),
                 alt.Tooltip("eps:Q", format=".3g", title="epsilon"),
                 alt.Tooltip("estimate:Q", format=".1%", title="robust accuracy"),
                 alt.Tooltip("low:Q", format=".1%", title="95 % low"),
                 alt.Tooltip("high:Q", format=".1%", title="95 % high"),
                 alt.Tooltip("n_images:Q", title="images")])
    return finish((band + line).properties(width=270, height=170).facet(
        facet=alt.Facet("checkpoint:N", title=None, sort=sorted(
            table["checkpoint"].unique(), key=lambda c: int(c.split()[1]))),
        columns=columns))


def margin_change_chart(pairs: pd.DataFrame) -> alt.VConcatChart:
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
        part = part.assign(x=shown(part["first"], norm), y=shown(part["last"], norm),
                           trained=part["model"].astype(str))
        ends = [min(part["x"].min(), part["y"].min()), max(part["x"].max(), part["y"].max())]
        diagonal = alt.Chart(pd.DataFrame({"v": ends})).mark_line(
            color="#999999", strokeDash=[4, 4]).encode(x="v:Q", y="v:Q")
        axis = alt.Axis(format="~g", tickCount=4)
        points = alt.Chart(part).mark_point(filled=True, opacity=0.7, color="#0072B2").encode(
            x=alt.X("x:Q", scale=alt.Scale(type="log"), axis=axis,
                    title=axis_title("first checkpoint", norm)),
            y=alt.Y("y:Q", scale=alt.Scale(type="log"), axis=axis, title="last checkpoint"),
            tooltip=[alt.Tooltip("image_id:N", title="image"),
                     alt.Tooltip("trained:N", title="model"),
                     alt.Tooltip("x:Q", format=".3g", title="first"),
                     alt.Tooltip("y:Q", format=".3g", title="last")])
        panels.append(alt.layer(diagonal, points).properties(width=240, height=190))
    return finish(alt.hconcat(*panels[:2]) if len(panels) <= 2 else alt.vconcat(
        alt.hconcat(*panels[:2]), alt.hconcat(*panels[2:])))


def pareto_chart(front: pd.DataFrame, *, norm: str) -> alt.LayerChart:
    """Success rate against the median distance of the successes, one point per (schedule,
    lr0), a schedule's points joined in lr0 order; filled points are Pareto-optimal (no other
    point has at least the success and at most the distance).

    Args:
        front: :func:`lib.analysis.pareto.pareto_front` rows of one norm and one model
            (schedule, lr0, lr0_255, success_rate, distance, pareto_optimal).
    """
    table = front.assign(shown_distance=shown(front["distance"], norm),
                         lr0_label=front["lr0_255"].map(lambda v: f"{v:.2g}/255"),
                         optimal=front["pareto_optimal"].map({True: "yes", False: "no"}))
    table = table[np.isfinite(table["shown_distance"])]
    order = list(dict.fromkeys(front["schedule"]))
    colour = alt.Color("schedule:N", sort=order, scale=colour_scale("schedule", order),
                       title="schedule", legend=top_legend())
    base = alt.Chart(table).encode(
        x=alt.X("shown_distance:Q", scale=alt.Scale(zero=False),
                title=axis_title("median distance of the successes", norm)),
        y=alt.Y("success_rate:Q", title="success rate", axis=alt.Axis(format="%"),
                scale=alt.Scale(domain=[0, 1])),
        color=colour)
    lines = base.mark_line(opacity=0.5).encode(order="lr0:Q")
    points = base.mark_point(size=70, filled=True).encode(
        shape=alt.Shape("optimal:N", title="Pareto-optimal", legend=top_legend(),
                        scale=alt.Scale(domain=["yes", "no"], range=["circle", "cross"])),
        tooltip=[alt.Tooltip("schedule:N", title="schedule"),
                 alt.Tooltip("lr0_label:N", title="lr0"),
                 alt.Tooltip("success_rate:Q", format=".1%", title="success rate"),
                 alt.Tooltip("shown_distance:Q", format=".3g", title="median distance"),
                 alt.Tooltip("optimal:N", title="Pareto-optimal")])
    labels = base.mark_text(dx=6, dy=-6, fontSize=10, align="left").encode(text="lr0_label:N")
    return finish((lines + points + labels).properties(width=560, height=280))


def outcome_chart(shares: pd.DataFrame, *, columns: int = 3) -> alt.FacetChart:
    """Failed attacks per outcome class, stacked, per checkpoint; one panel per schedule.

    Args:
        shares: :func:`lib.analysis.failures.outcome_shares` (epoch, schedule, outcome,
            failures, estimate with low/high: the class's share of the group's failures).
        columns: panels per row.
    """
    table = shares[shares["failures"] > 0].assign(
        rank=lambda t: t["outcome"].map({o: k for k, o in enumerate(OUTCOMES)}))
    present = [o for o in OUTCOMES if o in set(table["outcome"])]
    order = list(dict.fromkeys(shares["schedule"]))
    return finish(alt.Chart(table).mark_bar().encode(
        x=alt.X("epoch:O", title="checkpoint (epoch)", axis=alt.Axis(labelAngle=0)),
        y=alt.Y("failures:Q", title="failed attacks"),
        color=alt.Color("outcome:N", sort=present, title="outcome", legend=top_legend(),
                        scale=alt.Scale(domain=present,
                                        range=[OUTCOME_COLOURS[o] for o in present])),
        order=alt.Order("rank:Q"),
        tooltip=[alt.Tooltip("epoch:O", title="checkpoint"),
                 alt.Tooltip("schedule:N", title="schedule"),
                 alt.Tooltip("outcome:N", title="outcome"),
                 alt.Tooltip("failures:Q", title="failed attacks"),
                 alt.Tooltip("estimate:Q", format=".0%", title="share"),
                 alt.Tooltip("low:Q", format=".0%", title="95 % low"),
                 alt.Tooltip("high:Q", format=".0%", title="95 % high"),
                 alt.Tooltip("n_images:Q", title="images")],
    ).properties(width=170, height=170).facet(
        facet=alt.Facet("schedule:N", sort=order, title=None), columns=columns))


def loss_chart(comparison: pd.DataFrame) -> alt.LayerChart:
    """Share of the sampled cross-entropy failures that the logit margin solves, per schedule
    and checkpoint, with 95 % intervals.

    Args:
        comparison: :func:`lib.analysis.loss_comparison.loss_comparison` rows of the quantity
            :data:`lib.analysis.loss_comparison.RESCUED`.
    """
    table = comparison[comparison["n_images"] > 0]
    table = table.assign(checkpoint="epoch " + table["epoch"].astype(str))
    order = list(dict.fromkeys(comparison["schedule"]))
    title = "failures solved by the logit margin (95 % interval)"
    base = alt.Chart(table).encode(
        y=alt.Y("schedule:N", sort=order, title=None), yOffset=alt.YOffset("checkpoint:N"),
        color=alt.Color("checkpoint:N", title="checkpoint", legend=top_legend()),
        tooltip=[alt.Tooltip("schedule:N", title="schedule"),
                 alt.Tooltip("checkpoint:N", title="checkpoint"),
                 alt.Tooltip("estimate:Q", format=".0%", title="solved"),
                 alt.Tooltip("low:Q", format=".0%", title="95 % low"),
                 alt.Tooltip("high:Q", format=".0%", title="95 % high"),
                 alt.Tooltip("n_attacks:Q", title="failures run again"),
                 alt.Tooltip("n_images:Q", title="images")])
    whiskers = base.mark_rule(strokeWidth=2).encode(
        x=alt.X("low:Q", title=title, axis=alt.Axis(format="%"),
                scale=alt.Scale(domain=[0, 1])), x2="high:Q")
    points = base.mark_point(filled=True, size=60).encode(x=alt.X("estimate:Q", title=title))
    return finish((whiskers + points).properties(width=520, height=220))
