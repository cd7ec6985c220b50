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


def class_counts_chart(counts: pd.DataFrame) -> alt.Chart:
    """Grouped bars of frames per tool and split.

    Args:
        counts: columns ``split`` ("train"/"test"), ``tool`` (a name of :data:`lib.TOOLS`),
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
    raw = base.mark_line(opacity=0.25, color="gray").encode(y=alt.Y("loss:Q", title="training loss"))
    mean = base.mark_line(color="black").encode(y="smoothed:Q")
    return (raw + mean).properties(width=480, height=200)


def accuracy_f1_chart(metrics: pd.DataFrame) -> alt.Chart:
    """The paper's Figure 1: test accuracy and macro F1 per epoch.

    Args:
        metrics: columns ``epoch`` (1-based), ``accuracy`` and ``macro_f1`` (in [0, 1]).
    """
    table = metrics.melt(id_vars="epoch", value_vars=["accuracy", "macro_f1"],
                         var_name="metric", value_name="value")
    table["metric"] = table["metric"].map({"accuracy": "accuracy", "macro_f1": "macro F1"})
    return (
        alt.Chart(table)
        .mark_line(point=True)
        .encode(
            x=alt.X("epoch:O", title="epoch"),
            y=alt.Y("value:Q", scale=alt.Scale(domain=[0, 1]), title="on the test split"),
            color=alt.Color("metric:N", title=None),
            tooltip=["epoch", "metric", alt.Tooltip("value:Q", format=".3f")],
        )
        .properties(width=420, height=220)
    )


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
