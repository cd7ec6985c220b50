"""The look every chart of the book shares (sizes, colours, legends, axes, one chart per
model), and the data and training chapters' charts. The attack chapter's charts are in
:mod:`lib.analysis.attack_figures`, the minimality chapter's in
:mod:`lib.analysis.minimality_figures`, the margins chapter's in
:mod:`lib.analysis.margin_figures` and the borderline-training chapter's in
:mod:`lib.analysis.arm_figures`.

Every chart takes a tidy DataFrame (one row per observation, columns named as in the run
folder's tables) and returns a finished ``alt.Chart`` (or layered, faceted or concatenated
chart); the notebooks only choose them. Charts get their data inline, so callers pass
aggregated tables, not raw per-attack rows.

Three rules hold for every chart of these modules (tests check them on every chart of a built book):

- its whole drawing (axes, legend, every panel) is at most :data:`PAGE_WIDTH` pixels wide,
  the book's text column at an 800 px window, so nothing is cut and no page scrolls sideways:
  facets wrap or stack instead of growing sideways;
- every axis and legend title is words with the unit, never a column name. Vega-Lite joins
  the titles of layered encodings, so interval layers carry the same explicit title;
- a category has one colour in every chart: :data:`PALETTES` maps each schedule (and each
  tool) to its colour, and :func:`add_palette` adds the colours of a new kind of category
  (a model, a training arm) in the same way.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Mapping

import altair as alt
import numpy as np
import pandas as pd
import torch
from PIL import Image
from torchvision.utils import make_grid

from lib import TOOLS

#: The widest drawing, in CSS pixels, of any chart (the text column is 736 px wide at an
#: 800 px window and 784 px at 1400 px; a margin is left for the chart's action menu).
PAGE_WIDTH = 700

#: One colour per step-size schedule (Okabe and Ito's colour-blind-safe palette); the
#: paper's proposal, loss-adaptive, has the most salient one.
SCHEDULE_COLOURS: dict[str, str] = {
    "constant": "#0072B2",
    "iteration": "#E69F00",
    "exponential": "#009E73",
    "step": "#CC79A7",
    "loss-adaptive": "#D55E00",
}
#: One colour per tool (Tableau 10), in label order.
TOOL_COLOURS: dict[str, str] = dict(zip(TOOLS, (
    "#4E79A7", "#F28E2B", "#E15759", "#76B7B2", "#59A14F", "#EDC948", "#B07AA1"), strict=True))
#: Colours of names that a palette does not list, each picked by the name itself, so a new
#: schedule also keeps its colour from chart to chart.
SPARE_COLOURS: tuple[str, ...] = ("#56B4E9", "#000000", "#999999", "#8C564B", "#BCBD22")
#: The palettes by kind of category: ``schedule``, ``tool``, and any added by
#: :func:`add_palette`.
PALETTES: dict[str, dict[str, str]] = {"schedule": SCHEDULE_COLOURS, "tool": TOOL_COLOURS}

_LABEL_SIZE = 12
_TITLE_SIZE = 13


def add_palette(kind: str, colours: Mapping[str, str]) -> None:
    """Give every name of a new kind of category (e.g. ``"arm"``) its colour in every chart.

    Args:
        kind: the palette's name, used by :func:`colour_scale`.
        colours: name -> CSS colour (``"#RRGGBB"``).
    """
    PALETTES.setdefault(kind, {}).update(colours)


def colour_of(kind: str, name: str) -> str:
    """The colour of ``name`` in the palette ``kind`` (a spare colour chosen by the name when
    the palette does not list it)."""
    palette = PALETTES[kind]
    if name in palette:
        return palette[name]
    return SPARE_COLOURS[zlib.crc32(name.encode("utf-8")) % len(SPARE_COLOURS)]


def colour_scale(kind: str, names: Iterable[str]) -> alt.Scale:
    """A colour scale that maps each of ``names`` (in this order) to its palette colour."""
    names = [str(n) for n in dict.fromkeys(names)]
    return alt.Scale(domain=names, range=[colour_of(kind, n) for n in names])


def schedules_in(table: pd.DataFrame) -> list[str]:
    """The table's schedules in the order it lists them (the stage's order)."""
    return [str(s) for s in dict.fromkeys(table["schedule"])]


def schedule_colour(table: pd.DataFrame, *, legend: bool = True) -> alt.Color:
    order = schedules_in(table)
    return alt.Color("schedule:N", sort=order, scale=colour_scale("schedule", order),
                     title="schedule", legend=top_legend() if legend else None)


def top_legend(**options: object) -> alt.Legend:
    """A legend above the plot, so that it takes no width from it."""
    return alt.Legend(orient="top", direction="horizontal", titleAnchor="start", **options)


def finish(chart: alt.TopLevelMixin) -> alt.TopLevelMixin:
    """The book's type sizes on a finished chart."""
    return (chart
            .configure_axis(labelFontSize=_LABEL_SIZE, titleFontSize=_TITLE_SIZE)
            .configure_legend(labelFontSize=_LABEL_SIZE, titleFontSize=_TITLE_SIZE,
                              labelLimit=240, titleLimit=PAGE_WIDTH)
            .configure_header(labelFontSize=_TITLE_SIZE, titleFontSize=_TITLE_SIZE))


def interval_bars(base: alt.Chart, low: str, high: str, *, title: str,
              axis: str = "y", **mark: object) -> alt.Chart:
    """Error bars from the table's ``low`` to ``high`` columns (a 95 % interval), under the
    same axis title as the estimate they belong to."""
    channel = alt.Y if axis == "y" else alt.X
    encoding = {axis: channel(f"{low}:Q", title=title), f"{axis}2": f"{high}:Q"}
    if "color" in mark:  # a fixed colour wins over the base chart's colour encoding
        encoding["color"] = alt.value(mark.pop("color"))
    return base.mark_errorbar(ticks=True, **mark).encode(**encoding)


def field_tooltip(field: str, title: str, *, format: str | None = None) -> alt.Tooltip:
    """A tooltip line: the table's ``field`` under ``title``, in ``format`` (a d3 format)."""
    return alt.Tooltip(field, title=title, **({"format": format} if format else {}))


def interval_tooltips(column: str, title: str, format: str) -> list[alt.Tooltip]:
    """Tooltips of an estimate in ``column`` and its 95 % interval (the columns
    ``<column>_low`` and ``<column>_high``)."""
    return [field_tooltip(f"{column}:Q", title, format=format),
            field_tooltip(f"{column}_low:Q", "95 % low", format=format),
            field_tooltip(f"{column}_high:Q", "95 % high", format=format)]


# --------------------------------------------------------------------------- data


def class_counts_chart(counts: pd.DataFrame) -> alt.Chart:
    """Grouped bars of frames per tool and split.

    Args:
        counts: columns ``split`` ("train"/"test"), ``tool`` (a name of ``lib.TOOLS``),
            ``frames`` (int >= 0).
    """
    return finish(
        alt.Chart(counts)
        .mark_bar()
        .encode(
            x=alt.X("tool:N", sort=list(TOOLS), title=None, axis=alt.Axis(labelAngle=0)),
            xOffset=alt.XOffset("split:N", sort=["train", "test"]),
            y=alt.Y("frames:Q", title="single-tool frames"),
            color=alt.Color("split:N", sort=["train", "test"], title="split", legend=top_legend()),
            tooltip=[field_tooltip("split", "split"), field_tooltip("tool", "tool"),
                     field_tooltip("frames", "frames")],
        )
        .properties(width=600, height=220)
    )


def tool_share_chart(shares: pd.DataFrame) -> alt.Chart:
    """Stacked bars: the share of annotated frames with 0, 1 and 2+ tools per split.

    Args:
        shares: columns ``split``, ``tools_present`` ("0", "1", "2+"), ``frames`` (int),
            ``share`` (in [0, 1]).
    """
    return finish(
        alt.Chart(shares)
        .mark_bar()
        .encode(
            y=alt.Y("split:N", sort=["train", "test"], title=None),
            x=alt.X("share:Q", stack="normalize", axis=alt.Axis(format="%"),
                    title="share of annotated frames"),
            color=alt.Color("tools_present:N", sort=["0", "1", "2+"], title="tools in frame",
                            legend=top_legend()),
            order=alt.Order("tools_present:N"),
            tooltip=[field_tooltip("split", "split"),
                     field_tooltip("tools_present", "tools in frame"),
                     field_tooltip("frames", "frames"),
                     field_tooltip("share:Q", "share", format=".1%")],
        )
        .properties(width=600, height=80)
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


# --------------------------------------------------------------------------- training


def loss_positions(losses: pd.DataFrame) -> pd.Series:
    """Where each SGD step lies on an axis of epochs: step k of an epoch of n steps at
    ``epoch - 1 + k / n``, so epoch e spans (e - 1, e] whatever the steps' numbering.

    Args:
        losses: columns ``epoch`` (1-based) and ``step`` (increasing within each epoch; numbered
            from the start of training, as ``train/losses.csv`` does, or within the epoch).
    """
    by_epoch = losses.groupby("epoch")["step"]
    return (losses["epoch"] - 1) + by_epoch.rank(method="first") / by_epoch.transform("size")


def loss_curve_chart(losses: pd.DataFrame, *, window: int = 20) -> alt.LayerChart:
    """Training loss per SGD step (light) and its running mean over ``window`` steps.

    Args:
        losses: ``train/losses.csv``: columns ``epoch`` (1-based), ``step`` (numbered from the
            start of training), ``loss`` (>= 0).
    """
    table = losses.sort_values(["epoch", "step"]).reset_index(drop=True)
    table = table.assign(position=loss_positions(table),
                         smoothed=table["loss"].rolling(window, min_periods=1).mean())
    epochs = int(table["epoch"].max()) if len(table) else 1
    base = alt.Chart(table).encode(x=alt.X(
        "position:Q", title="training progress (epochs)",
        scale=alt.Scale(domain=[0, epochs], nice=False),
        axis=alt.Axis(values=list(range(epochs + 1)), format="d")))
    title = "training loss"
    raw = base.mark_line(opacity=0.3, color="gray").encode(
        y=alt.Y("loss:Q", title=title),
        tooltip=[field_tooltip("epoch", "epoch"), field_tooltip("step", "step"),
                 field_tooltip("loss:Q", "loss", format=".4f")])
    mean = base.mark_line(color="black").encode(y=alt.Y("smoothed:Q", title=title))
    return finish((raw + mean).properties(width=600, height=220))


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
    bounded = "low" in table.columns
    title = "test score" + (" (95 % interval)" if bounded else "")
    color = alt.Color("metric:N", title="score", legend=top_legend())
    tooltip = [field_tooltip("epoch", "epoch"), field_tooltip("metric", "score"),
               field_tooltip("value:Q", "value", format=".3f")]
    y = alt.Y("value:Q", scale=alt.Scale(domain=[0, 1]), title=title)
    x = alt.X("epoch:O", title="epoch", axis=alt.Axis(labelAngle=0))
    if not bounded:
        lines = alt.Chart(table).mark_line(point=True).encode(x=x, y=y, color=color,
                                                              tooltip=tooltip)
        return finish(lines.properties(width=560, height=220))
    # with intervals, the two scores stand side by side at each epoch so the bars never overlap
    base = alt.Chart(table).encode(x=x, xOffset=alt.XOffset("metric:N"), color=color)
    points = base.mark_point(filled=True, size=50).encode(y=y, tooltip=tooltip)
    return finish((interval_bars(base, "low", "high", title=title) + points)
                   .properties(width=560, height=220))


def per_class_f1_chart(per_class: pd.DataFrame) -> alt.Chart:
    """F1 of every tool per epoch.

    Args:
        per_class: columns ``epoch``, ``tool``, ``f1`` (in [0, 1]), ``support`` (int).
    """
    return finish(
        alt.Chart(per_class)
        .mark_line(point=True)
        .encode(
            x=alt.X("epoch:O", title="epoch", axis=alt.Axis(labelAngle=0)),
            y=alt.Y("f1:Q", scale=alt.Scale(domain=[0, 1]), title="test F1"),
            color=alt.Color("tool:N", sort=list(TOOLS), scale=colour_scale("tool", TOOLS),
                            title="tool", legend=top_legend(columns=4)),
            tooltip=[field_tooltip("epoch", "epoch"), field_tooltip("tool", "tool"),
                     field_tooltip("f1:Q", "F1", format=".3f"),
                     field_tooltip("support", "test frames")],
        )
        .properties(width=600, height=220)
    )


def confusion_chart(confusion: pd.DataFrame) -> alt.LayerChart:
    """Heatmap of a confusion matrix, rows normalised (each true class sums to 1).

    Args:
        confusion: one epoch's cells: columns ``true`` and ``predicted`` (labels 0-6),
            ``count`` (int >= 0).
    """
    table = confusion.copy()
    totals = table.groupby("true")["count"].transform("sum")
    table["share"] = (table["count"] / totals.where(totals > 0)).fillna(0.0)
    table["true_tool"] = table["true"].map(dict(enumerate(TOOLS)))
    table["predicted_tool"] = table["predicted"].map(dict(enumerate(TOOLS)))
    base = alt.Chart(table).encode(
        x=alt.X("predicted_tool:N", sort=list(TOOLS), title="predicted tool",
                axis=alt.Axis(labelAngle=-30)),
        y=alt.Y("true_tool:N", sort=list(TOOLS), title="true tool"),
    )
    cells = base.mark_rect().encode(
        color=alt.Color("share:Q", scale=alt.Scale(scheme="blues", domain=[0, 1]),
                        title="share of the true tool's frames",
                        legend=top_legend(format="%", gradientLength=240)),
        tooltip=[field_tooltip("true_tool", "true tool"),
                 field_tooltip("predicted_tool", "predicted"),
                 field_tooltip("count", "frames"), field_tooltip("share:Q", "share", format=".1%")],
    )
    labels = base.mark_text(fontSize=_LABEL_SIZE).encode(
        text=alt.Text("count:Q"),
        color=alt.condition("datum.share > 0.5", alt.value("white"), alt.value("black")),
    )
    return finish((cells + labels).properties(width=420, height=320))


# --------------------------------------------------------------------------- axes


def spans_a_decade(low: float, high: float) -> bool:
    """Whether positive values from ``low`` to ``high`` span a factor of 10: the rule for a
    logarithmic axis (below that, a log axis only spreads its tick labels unevenly)."""
    return low > 0 and high / low >= 10


def log_ticks(low: float, high: float) -> list[float]:
    """Ticks at 1, 2 and 5 times the powers of ten from ``low`` to ``high`` (never crowded)."""
    ticks = [m * 10.0 ** e for e in range(int(np.floor(np.log10(low))),
                                          int(np.ceil(np.log10(high))) + 1) for m in (1, 2, 5)]
    return [t for t in ticks if low <= t <= high]


# --------------------------------------------------------------------------- several models


def per_model(build, table: pd.DataFrame, *, title: str = "model of seed {model}"):
    """One chart per trained model, one under the other, each ``build`` of that model's rows.

    Args:
        build: a chart builder that takes a table
            (e.g. :func:`lib.analysis.attack_figures.success_rate_chart`).
        table: its table with a ``model`` column (the seed); without one, or with a single
            model, the chart is ``build(table)`` itself.
        title: each panel's title; ``{model}`` is replaced by the seed.
    """
    if "model" not in table.columns or table["model"].nunique() <= 1:
        return build(table)
    charts = []
    for model, part in table.groupby("model", sort=True):
        chart = build(part.reset_index(drop=True)).copy()
        chart.config = alt.Undefined  # the type sizes go on the whole figure, once
        charts.append(chart.properties(title=title.format(model=model)))
    return finish(alt.vconcat(*charts, spacing=30))
