"""The minimality chapter's charts: each schedule's distance against the best known one
and its closeness, per checkpoint and norm. The look they share with every chart is
:mod:`lib.analysis.figures`.
"""

from __future__ import annotations

import altair as alt
import pandas as pd

from lib.analysis.figures import (
    field_tooltip,
    finish,
    interval_tooltips,
    log_ticks,
    schedules_in,
    spans_a_decade,
    top_legend,
)
from lib.analysis.margins import NORM_NAMES


def _checkpoint_label(table: pd.DataFrame) -> pd.DataFrame:
    return table.assign(checkpoint="epoch " + table["epoch"].astype(str))


def _schedule_rows(table: pd.DataFrame, tooltips: list) -> alt.Chart:
    """A chart of one row per schedule, the checkpoints side by side within it in their own
    colours; its tooltip names the schedule and epoch, then ``tooltips``."""
    return alt.Chart(table).encode(
        y=alt.Y("schedule:N", sort=schedules_in(table), title=None),
        yOffset=alt.YOffset("checkpoint:N"),
        color=alt.Color("checkpoint:N", title="checkpoint", legend=top_legend()),
        tooltip=[field_tooltip("schedule", "schedule"), field_tooltip("epoch", "epoch"), *tooltips])


def _by_norm(table: pd.DataFrame, panel) -> alt.TopLevelMixin:
    """One panel per norm of ``table`` (Linf, L2, L1 in this order), stacked, each with its own
    axis; a table without a ``norm`` column is one panel."""
    if "norm" not in table.columns:
        return panel(table, "")
    norms = [n for n in NORM_NAMES if n in set(table["norm"])]
    panels = [panel(table[table["norm"] == n], NORM_NAMES[n]) for n in norms]
    return alt.vconcat(*panels).resolve_scale(x="independent")


def minimality_ratio_chart(ratios: pd.DataFrame) -> alt.TopLevelMixin:
    """Median ratio of each schedule's distance to the best-known distance, with its 95 %
    interval; one panel per norm.

    Args:
        ratios: :func:`lib.analysis.minimality_norms.minimality_by_norm` (schedule, epoch,
            norm, successful, median_ratio, median_ratio_low, median_ratio_high, q25_ratio,
            q75_ratio).
    """
    def panel(part: pd.DataFrame, norm: str) -> alt.LayerChart:
        table = _checkpoint_label(part)
        title = f"{norm} distance / best known (median, 95 % interval)".strip()
        base = _schedule_rows(table, [
            field_tooltip("successful", "successful pairs"),
            *interval_tooltips("median_ratio", "median ratio", ".2f"),
            field_tooltip("q25_ratio:Q", "first quartile", format=".2f"),
            field_tooltip("q75_ratio:Q", "third quartile", format=".2f")])
        low = float(table["median_ratio_low"].min()) if len(table) else 1.0
        high = float(table["median_ratio_high"].max()) if len(table) else 1.0
        if spans_a_decade(low, high):  # ratios from near 1 to far beyond: a log axis
            scale = alt.Scale(type="log", domain=[low / 1.2, high * 1.2], nice=False)
            axis = alt.Axis(values=log_ticks(low / 1.2, high * 1.2), format="~g")
        else:
            scale, axis = alt.Scale(zero=False), alt.Axis()
        whiskers = base.mark_rule(strokeWidth=2).encode(
            x=alt.X("median_ratio_low:Q", title=title, scale=scale, axis=axis),
            x2="median_ratio_high:Q")
        points = base.mark_point(filled=True, size=60).encode(
            x=alt.X("median_ratio:Q", title=title))
        return (whiskers + points).properties(width=520, height=170)

    return finish(_by_norm(ratios, panel))


def optimality_chart(optimality: pd.DataFrame) -> alt.TopLevelMixin:
    """Closeness (bars: the mean of best-known / own distance, a failure counting 0) and
    AttackBench's optimality score (diamonds, only where no single pair sets its window) per
    schedule, with the closeness's 95 % interval; one panel per norm.

    Args:
        optimality: :func:`lib.analysis.minimality_norms.minimality_by_norm` (schedule, epoch,
            norm, pairs, closeness with closeness_low/high, optimality with
            optimality_low/high, optimality_robust).
    """
    def panel(part: pd.DataFrame, norm: str) -> alt.LayerChart:
        robust = part["optimality_robust"].astype(bool)
        table = _checkpoint_label(part).assign(shown=part["optimality"].where(robust))
        title = f"{norm} closeness (95 % interval); optimality as diamonds".strip()
        base = _schedule_rows(table, [
            field_tooltip("pairs", "pairs"),
            *interval_tooltips("closeness", "closeness", ".3f"),
            field_tooltip("optimality:Q", "optimality", format=".3f"),
            field_tooltip("optimality_robust:N", "no single pair sets it")])
        bars = base.mark_bar(opacity=0.6).encode(
            x=alt.X("closeness:Q", scale=alt.Scale(domain=[0, 1]), title=title))
        whiskers = base.mark_rule(color="black").encode(
            x=alt.X("closeness_low:Q", title=title), x2="closeness_high:Q")
        diamonds = base.transform_filter("isValid(datum.shown)").mark_point(
            shape="diamond", filled=True, color="black", size=50).encode(
            x=alt.X("shown:Q", title=title))
        return (bars + whiskers + diamonds).properties(width=520, height=170)

    return finish(_by_norm(optimality, panel))
