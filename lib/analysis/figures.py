"""Altair chart builders shared by the notebooks, sized and coloured for the book.

Every chart takes a tidy DataFrame (one row per observation, columns named as in the run
folder's tables) and returns a finished ``alt.Chart`` (or layered, faceted or concatenated
chart); the notebooks only choose them. Charts get their data inline, so callers pass
aggregated tables, not raw per-attack rows.

Three rules hold for every chart here (tests check them on every chart of a built book):

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
from lib.analysis.margins import NORM_NAMES

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


def _schedules(table: pd.DataFrame) -> list[str]:
    """The table's schedules in the order it lists them (the stage's order)."""
    return [str(s) for s in dict.fromkeys(table["schedule"])]


def _schedule_colour(table: pd.DataFrame, *, legend: bool = True) -> alt.Color:
    order = _schedules(table)
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


def _interval(base: alt.Chart, low: str, high: str, *, title: str,
              axis: str = "y", **mark: object) -> alt.Chart:
    """Error bars from the table's ``low`` to ``high`` columns (a 95 % interval), under the
    same axis title as the estimate they belong to."""
    channel = alt.Y if axis == "y" else alt.X
    encoding = {axis: channel(f"{low}:Q", title=title), f"{axis}2": f"{high}:Q"}
    if "color" in mark:  # a fixed colour wins over the base chart's colour encoding
        encoding["color"] = alt.value(mark.pop("color"))
    return base.mark_errorbar(ticks=True, **mark).encode(**encoding)


def _tooltip(field: str, title: str, *, format: str | None = None) -> alt.Tooltip:
    return alt.Tooltip(field, title=title, **({"format": format} if format else {}))


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
            tooltip=[_tooltip("split", "split"), _tooltip("tool", "tool"),
                     _tooltip("frames", "frames")],
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
            tooltip=[_tooltip("split", "split"), _tooltip("tools_present", "tools in frame"),
                     _tooltip("frames", "frames"),
                     _tooltip("share:Q", "share", format=".1%")],
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
        tooltip=[_tooltip("epoch", "epoch"), _tooltip("step", "step"),
                 _tooltip("loss:Q", "loss", format=".4f")])
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
    tooltip = [_tooltip("epoch", "epoch"), _tooltip("metric", "score"),
               _tooltip("value:Q", "value", format=".3f")]
    y = alt.Y("value:Q", scale=alt.Scale(domain=[0, 1]), title=title)
    x = alt.X("epoch:O", title="epoch", axis=alt.Axis(labelAngle=0))
    if not bounded:
        lines = alt.Chart(table).mark_line(point=True).encode(x=x, y=y, color=color,
                                                              tooltip=tooltip)
        return finish(lines.properties(width=560, height=220))
    # with intervals, the two scores stand side by side at each epoch so the bars never overlap
    base = alt.Chart(table).encode(x=x, xOffset=alt.XOffset("metric:N"), color=color)
    points = base.mark_point(filled=True, size=50).encode(y=y, tooltip=tooltip)
    return finish((_interval(base, "low", "high", title=title) + points)
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
            tooltip=[_tooltip("epoch", "epoch"), _tooltip("tool", "tool"),
                     _tooltip("f1:Q", "F1", format=".3f"),
                     _tooltip("support", "test frames")],
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
        tooltip=[_tooltip("true_tool", "true tool"), _tooltip("predicted_tool", "predicted"),
                 _tooltip("count", "frames"), _tooltip("share:Q", "share", format=".1%")],
    )
    labels = base.mark_text(fontSize=_LABEL_SIZE).encode(
        text=alt.Text("count:Q"),
        color=alt.condition("datum.share > 0.5", alt.value("white"), alt.value("black")),
    )
    return finish((cells + labels).properties(width=420, height=320))


# --------------------------------------------------------------------------- attack results
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
        xOffset=alt.XOffset("schedule:N", sort=_schedules(rates)),
        color=_schedule_colour(rates))
    points = base.mark_point(filled=True, size=50).encode(
        y=alt.Y("success_rate:Q", title=title, axis=alt.Axis(format="%"),
                scale=alt.Scale(zero=False)),
        tooltip=[_tooltip("epoch", "epoch"), _tooltip("schedule", "schedule"),
                 _tooltip("images", "images"), _tooltip("attacks", "attacks"),
                 _tooltip("successes", "successes"),
                 _tooltip("success_rate:Q", "success rate", format=".1%"),
                 _tooltip("success_rate_low:Q", "95 % low", format=".1%"),
                 _tooltip("success_rate_high:Q", "95 % high", format=".1%"),
                 _tooltip("skipped", "not finite (left out)")],
    )
    bars = _interval(base, "success_rate_low", "success_rate_high", title=title)
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
        xOffset=alt.XOffset("schedule:N", sort=_schedules(l1)), color=_schedule_colour(l1))
    points = base.mark_point(filled=True, size=50).encode(
        y=alt.Y("mean_l1_255:Q", title=title),
        tooltip=[_tooltip("epoch", "epoch"), _tooltip("schedule", "schedule"),
                 _tooltip("images", "images"), _tooltip("successes", "successful attacks"),
                 _tooltip("mean_l1_255:Q", "mean L1 (x 1/255)", format=".3f"),
                 _tooltip("mean_l1_255_low:Q", "95 % low", format=".3f"),
                 _tooltip("mean_l1_255_high:Q", "95 % high", format=".3f")],
    )
    bars = _interval(base, "mean_l1_255_low", "mean_l1_255_high", title=title)
    return finish((bars + points).properties(width=600, height=240))


def iterations_lr_chart(summary: pd.DataFrame) -> alt.HConcatChart:
    """The paper's Figure 4: mean iterations and mean step size per schedule at one epoch.

    Args:
        summary: :func:`lib.analysis.aggregates.iterations_and_lr` of one model (schedule,
            images, attacks, mean_iterations and mean_lr_255, each with its image-bootstrap
            interval ``_low``/``_high``, success_rate).
    """
    order = _schedules(summary)
    base = alt.Chart(summary).encode(
        x=alt.X("schedule:N", sort=order, title=None, axis=alt.Axis(labelAngle=-30)),
        color=_schedule_colour(summary, legend=False),
        tooltip=[_tooltip("schedule", "schedule"), _tooltip("images", "images"),
                 _tooltip("attacks", "attacks"),
                 _tooltip("mean_iterations:Q", "mean iterations", format=".1f"),
                 _tooltip("mean_lr_255:Q", "mean step (x 1/255)", format=".3f"),
                 _tooltip("success_rate:Q", "success rate", format=".1%")],
    )
    panels = []
    for column, title in (("mean_iterations", "mean iterations per attack"),
                          ("mean_lr_255", "mean step size (x 1/255)")):
        bars = base.mark_bar(opacity=0.7).encode(y=alt.Y(f"{column}:Q", title=title))
        whiskers = _interval(base, f"{column}_low", f"{column}_high", title=title,
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
    order = _schedules(matrix)
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
        tooltip=[_tooltip("epoch", "epoch"), _tooltip("schedule", "schedule"),
                 _tooltip("source_tool", "source tool"), _tooltip("target_tool", "target tool"),
                 _tooltip("attacks", "attacks"), _tooltip("successes", "successful attacks"),
                 _tooltip("mean_l1_255:Q", "mean L1 (x 1/255)", format=".3f")],
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
    order = _schedules(histogram)
    return finish(
        alt.Chart(histogram)
        .mark_bar()
        .encode(
            x=alt.X("bin_start_255:Q", title="L1 of successful attacks (x 1/255)"),
            x2="bin_end_255:Q",
            y=alt.Y("count:Q", title="attacks", axis=alt.Axis(tickMinStep=1)),
            color=_schedule_colour(histogram, legend=False),
            tooltip=[_tooltip("schedule", "schedule"),
                     _tooltip("bin_start_255:Q", "from (x 1/255)", format=".3f"),
                     _tooltip("bin_end_255:Q", "to (x 1/255)", format=".3f"),
                     _tooltip("count", "attacks")],
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
        color=_schedule_colour(summary),
        tooltip=[_tooltip("schedule", "schedule"), _tooltip("iteration", "iteration"),
                 _tooltip("running", "attacks running"),
                 _tooltip("mean_lr_255:Q", "mean step (x 1/255)", format=".3f"),
                 _tooltip("mean_loss:Q", "mean loss", format=".3f")],
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


def spans_a_decade(low: float, high: float) -> bool:
    """Whether positive values from ``low`` to ``high`` span a factor of 10: the rule for a
    logarithmic axis (below that, a log axis only spreads its tick labels unevenly)."""
    return low > 0 and high / low >= 10


def _log_ticks(low: float, high: float) -> list[float]:
    """Ticks at 1, 2 and 5 times the powers of ten from ``low`` to ``high`` (never crowded)."""
    ticks = [m * 10.0 ** e for e in range(int(np.floor(np.log10(low))),
                                          int(np.ceil(np.log10(high))) + 1) for m in (1, 2, 5)]
    return [t for t in ticks if low <= t <= high]


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
        color=_schedule_colour(sensitivity),
        tooltip=[_tooltip("schedule", "schedule"),
                 _tooltip("lr0_255:Q", "lr0 (x 1/255)", format=".3g"),
                 _tooltip("images", "images"), _tooltip("attacks", "attacks"),
                 _tooltip("success_rate:Q", "success rate", format=".1%"),
                 _tooltip("mean_l1_255:Q", "mean L1 (x 1/255)", format=".3f"),
                 _tooltip("mean_iterations:Q", "mean iterations", format=".1f")],
    )
    panels = []
    for column, title, axis in (
            ("success_rate", "success rate", alt.Axis(format="%")),
            ("mean_l1_255", "mean L1 of successes (x 1/255)", alt.Axis())):
        line = base.mark_line(point=True).encode(y=alt.Y(f"{column}:Q", title=title, axis=axis))
        bars = _interval(base, f"{column}_low", f"{column}_high", title=title)
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
        y=alt.Y("schedule:N", sort=_schedules(differences), title=None),
        color=_schedule_colour(differences, legend=False),
        tooltip=[_tooltip("epoch", "epoch"), _tooltip("schedule", "schedule"),
                 _tooltip("reference", "reference"), _tooltip("images", "images"),
                 _tooltip("pairs", "pairs"),
                 _tooltip("mean_difference:Q", "mean difference", format=".3f"),
                 _tooltip("low:Q", "95 % low", format=".3f"),
                 _tooltip("high:Q", "95 % high", format=".3f"),
                 _tooltip("p_signed_rank:Q", "signed-rank p", format=".2g")],
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
    order = _schedules(means)
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
        tooltip=[_tooltip("image_id", "image"), _tooltip("source_tool", "tool"),
                 _tooltip("epoch", "epoch"), _tooltip("targets", "targets"),
                 _tooltip("mean_l1_255:Q", "mean L1 (x 1/255)", format=".3f")])
    mean = base.transform_filter(alt.datum.kind == "mean")
    mean_line = mean.mark_line(color="black", point=alt.OverlayMarkDef(color="black")).encode(
        y=alt.Y("mean_l1_255:Q", title=title),
        tooltip=[_tooltip("epoch", "epoch"),
                 _tooltip("mean_l1_255:Q", "mean of the selection (x 1/255)", format=".3f")])
    mean_bars = _interval(mean, "mean_l1_255_low", "mean_l1_255_high", title=title,
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
    order = _schedules(ranking)
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
        tooltip=[_tooltip("epoch", "epoch"), _tooltip("schedule", "schedule"),
                 _tooltip("distance", "L1 measured"), _tooltip("successes", "successes"),
                 _tooltip("mean:Q", "mean (x 1/255)", format=".3f"),
                 _tooltip("low:Q", "95 % low", format=".3f"),
                 _tooltip("high:Q", "95 % high", format=".3f")])
    points = base.mark_point(filled=True).encode(y=alt.Y("mean:Q", title=title))
    bars = _interval(base, "low", "high", title=title)
    return finish(alt.layer(bars, points, data=table).properties(width=250, height=200)
                   .facet(facet=alt.Facet("epoch:O", title="epoch"), columns=columns))


# --------------------------------------------------------------------------- minimality


def _checkpoint_label(table: pd.DataFrame) -> pd.DataFrame:
    return table.assign(checkpoint="epoch " + table["epoch"].astype(str))


def _interval_tooltips(column: str, title: str, format: str) -> list[alt.Tooltip]:
    """Tooltips of an estimate in ``column`` and its 95 % interval (``column``_low/_high)."""
    return [_tooltip(f"{column}:Q", title, format=format),
            _tooltip(f"{column}_low:Q", "95 % low", format=format),
            _tooltip(f"{column}_high:Q", "95 % high", format=format)]


def _schedule_rows(table: pd.DataFrame, tooltips: list) -> alt.Chart:
    """A chart of one row per schedule, the checkpoints side by side within it in their own
    colours; its tooltip names the schedule and epoch, then ``tooltips``."""
    return alt.Chart(table).encode(
        y=alt.Y("schedule:N", sort=_schedules(table), title=None),
        yOffset=alt.YOffset("checkpoint:N"),
        color=alt.Color("checkpoint:N", title="checkpoint", legend=top_legend()),
        tooltip=[_tooltip("schedule", "schedule"), _tooltip("epoch", "epoch"), *tooltips])


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
            _tooltip("successful", "successful pairs"),
            *_interval_tooltips("median_ratio", "median ratio", ".2f"),
            _tooltip("q25_ratio:Q", "first quartile", format=".2f"),
            _tooltip("q75_ratio:Q", "third quartile", format=".2f")])
        low = float(table["median_ratio_low"].min()) if len(table) else 1.0
        high = float(table["median_ratio_high"].max()) if len(table) else 1.0
        if spans_a_decade(low, high):  # ratios from near 1 to far beyond: a log axis
            scale = alt.Scale(type="log", domain=[low / 1.2, high * 1.2], nice=False)
            axis = alt.Axis(values=_log_ticks(low / 1.2, high * 1.2), format="~g")
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
            _tooltip("pairs", "pairs"),
            *_interval_tooltips("closeness", "closeness", ".3f"),
            _tooltip("optimality:Q", "optimality", format=".3f"),
            _tooltip("optimality_robust:N", "no single pair sets it")])
        bars = base.mark_bar(opacity=0.6).encode(
            x=alt.X("closeness:Q", scale=alt.Scale(domain=[0, 1]), title=title))
        whiskers = base.mark_rule(color="black").encode(
            x=alt.X("closeness_low:Q", title=title), x2="closeness_high:Q")
        diamonds = base.transform_filter("isValid(datum.shown)").mark_point(
            shape="diamond", filled=True, color="black", size=50).encode(
            x=alt.X("shown:Q", title=title))
        return (bars + whiskers + diamonds).properties(width=520, height=170)

    return finish(_by_norm(optimality, panel))


# --------------------------------------------------------------------------- several models


def per_model(build, table: pd.DataFrame, *, title: str = "model of seed {model}"):
    """One chart per trained model, one under the other, each ``build`` of that model's rows.

    Args:
        build: a chart builder of this module (e.g. :func:`success_rate_chart`).
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

