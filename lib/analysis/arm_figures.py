"""Altair charts of the borderline-training chapter: robust accuracy against epsilon and the
per-image margins of the fine-tuned models (arms), each arm in its one colour and in the book's
style (:func:`lib.analysis.figures.finish`), no wider than
:data:`lib.analysis.figures.PAGE_WIDTH`."""

from __future__ import annotations

import altair as alt
import numpy as np
import pandas as pd

from lib.analysis.figures import (
    PAGE_WIDTH,
    add_palette,
    colour_of,
    colour_scale,
    finish,
    top_legend,
)
from lib.analysis.margin_figures import axis_title, shown


def tooltip(field: str, title: str, *, format: str | None = None) -> alt.Tooltip:
    """A tooltip entry titled in words."""
    return alt.Tooltip(field, title=title, **({"format": format} if format else {}))


#: The models of the borderline-training chapter, each with its colour in every chart.
add_palette("arm", {"start": "#999999", "control": "#0072B2", "borderline": "#D55E00",
                    "pgd": "#009E73"})


def arm_robustness_chart(curves: pd.DataFrame) -> alt.VConcatChart:
    """Robust accuracy against epsilon per model (line) with its 95 % band, one panel per
    norm (Linf in grey levels, x 1/255; L2 in [0, 1] pixel units).

    Args:
        curves: :func:`lib.analysis.arms.robust_accuracy_curves` of both norms (model, norm,
            epsilon, estimate, low, high).
    """
    models = list(dict.fromkeys(curves["model"]))
    panels = []
    for norm, part in curves.groupby("norm", sort=False):
        base = alt.Chart(part.assign(size=shown(part["epsilon"], norm))).encode(
            x=alt.X("size:Q", title=axis_title("perturbation size epsilon", norm)),
            color=alt.Color("model:N", sort=models, scale=colour_scale("arm", models),
                            title="model", legend=top_legend()))
        band = base.mark_area(opacity=0.15).encode(
            y=alt.Y("low:Q", title="robust accuracy (95 % band)"), y2="high:Q")
        line = base.mark_line().encode(
            y=alt.Y("estimate:Q", title="robust accuracy", scale=alt.Scale(domain=[0, 1])),
            tooltip=[tooltip("model", "model"), tooltip("size:Q", "epsilon", format=".3g"),
                     tooltip("estimate:Q", "robust accuracy", format=".2f")])
        panels.append((band + line).properties(width=PAGE_WIDTH - 180, height=180))
    return finish(alt.vconcat(*panels, spacing=20))


def arm_margin_chart(margins: pd.DataFrame, *, model: str, against: str) -> alt.HConcatChart:
    """Per test image: its margin under ``model`` against its margin under ``against`` (log
    axes; points above the dashed diagonal grew), one panel per norm. Misclassified images
    (margin 0) and images with no boundary found are left out of the picture.

    Args:
        margins: the stage's per-image margins (model, image_id, norm, margin).
    """
    panels = []
    for norm in ("linf", "l2"):
        chosen = margins[(margins["norm"] == norm) & margins["model"].isin([model, against])]
        wide = chosen.pivot_table(index="image_id", columns="model", values="margin")
        pairs = pd.DataFrame({"image": wide.index, "x": shown(wide[against], norm),
                              "y": shown(wide[model], norm)})
        pairs = pairs[(pairs["x"] > 0) & (pairs["y"] > 0)
                      & np.isfinite(pairs["x"]) & np.isfinite(pairs["y"])]
        ends = [float(pairs[["x", "y"]].min().min()), float(pairs[["x", "y"]].max().max())] \
            if len(pairs) else [1.0, 2.0]
        axis = alt.Scale(type="log", domain=ends, nice=False)
        points = alt.Chart(pairs).mark_circle(size=40, opacity=0.7,
                                              color=colour_of("arm", model)).encode(
            x=alt.X("x:Q", scale=axis, title=axis_title(f"margin under {against}", norm)),
            y=alt.Y("y:Q", scale=axis, title=axis_title(f"margin under {model}", norm)),
            tooltip=[tooltip("image", "test image"), tooltip("x:Q", against, format=".3g"),
                     tooltip("y:Q", model, format=".3g")])
        diagonal = alt.Chart(pd.DataFrame({"x": ends, "y": ends})).mark_line(
            color="grey", strokeDash=[4, 4]).encode(x="x:Q", y="y:Q")
        panels.append((diagonal + points).properties(width=260, height=260))
    return finish(alt.hconcat(*panels, spacing=30))
