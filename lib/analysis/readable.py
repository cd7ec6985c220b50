"""Tables as the book shows them: headers in words with units, an estimate and its interval in
one cell, p-values that never read 0, and every cell in full.

The functions take the aggregated tables of :mod:`lib.analysis.aggregates` and
:mod:`lib.analysis.paired` (whose column names are the run folder's) and return new
DataFrames for display only; :func:`html` renders one without the index and without cutting
long cells.
"""

from __future__ import annotations

import math

import pandas as pd
from IPython.display import HTML

#: p-values below this print as "< P_FLOOR" (a test with thousands of pairs gives p far
#: below anything a reader compares).
P_FLOOR = 0.0001
#: Keeps an interval's two bounds (and a number and its %) on one line in a narrow column.
_NBSP = "\u00a0"


def p_value_text(p: float) -> str:
    """A p-value for a table: two significant digits, ``"< 0.0001"`` below :data:`P_FLOOR`,
    ``"-"`` where there is none (NaN: too few pairs, or every difference zero)."""
    if p is None or not math.isfinite(p):
        return "-"
    if p < P_FLOOR:
        return f"< {P_FLOOR:g}"
    return f"{p:.2g}"


def number_text(value: float, *, digits: int = 3) -> str:
    """``value`` with ``digits`` significant digits (``"-"`` for NaN)."""
    return f"{value:.{digits}g}" if math.isfinite(value) else "-"


def bounds_text(low: float, high: float, *, digits: int = 3) -> str:
    """``"[low, high]"`` with ``digits`` significant digits (``"-"`` without bounds)."""
    if not (math.isfinite(low) and math.isfinite(high)):
        return "-"
    return f"[{low:.{digits}g},{_NBSP}{high:.{digits}g}]"


def interval_text(estimate: float, low: float, high: float, *, digits: int = 3) -> str:
    """``"estimate [low, high]"`` with ``digits`` significant digits, ``"-"`` without an
    estimate."""
    if not math.isfinite(estimate):
        return "-"
    return f"{estimate:.{digits}g} [{low:.{digits}g},{_NBSP}{high:.{digits}g}]"


def paired_table(differences: pd.DataFrame, *, unit: str) -> pd.DataFrame:
    """Paired differences against the reference schedule, one row per epoch and schedule.

    Seven columns, so that the table fits the book's text column: the reference schedule is
    named in the schedule column's header when every row has the same one (a ``minus``
    column otherwise), and images and pairs share a column.

    Args:
        differences: :func:`lib.analysis.paired.paired_schedule_differences`.
        unit: what the difference measures, e.g. ``"L1, x 1/255"`` or ``"iterations"``.

    Returns:
        ``model, epoch, schedule (minus <reference>), images / pairs, mean difference
        (<unit>), 95 % interval, signed-rank p`` (the signed-rank test of the images' mean
        differences).
    """
    references = list(dict.fromkeys(differences["reference"]))
    if len(references) == 1:
        compared = {f"schedule (minus {references[0]})": differences["schedule"]}
    else:
        compared = {"schedule": differences["schedule"], "minus": differences["reference"]}
    return pd.DataFrame({
        "model": differences["model"],
        "epoch": differences["epoch"],
        **compared,
        "images / pairs": [f"{r.images} / {r.pairs}" for r in differences.itertuples()],
        f"mean difference ({unit})": differences["mean_difference"].map(number_text),
        "95 % interval": [bounds_text(r.low, r.high) for r in differences.itertuples()],
        "signed-rank p": differences["p_signed_rank"].map(p_value_text),
    })


def per_image_change_table(change: pd.DataFrame) -> pd.DataFrame:
    """The change of the followed images' L1 from the first to the last attacked epoch.

    Args:
        change: :func:`lib.analysis.trends.per_image_change`.

    Returns:
        ``model, schedule, epochs, images, mean change of L1 (x 1/255), 95 % interval,
        signed-rank p``.
    """
    return pd.DataFrame({
        "model": change["model"],
        "schedule": change["schedule"],
        "epochs": [f"{r.first_epoch} to {r.last_epoch}" for r in change.itertuples()],
        "images": change["images"],
        "mean change of L1 (x 1/255)": change["mean_change_255"].map(number_text),
        "95 % interval": [bounds_text(r.low, r.high) for r in change.itertuples()],
        "signed-rank p": change["p_signed_rank"].map(p_value_text),
    })


def ranking_table(changes: pd.DataFrame) -> pd.DataFrame:
    """The schedules ordered by mean L1, along the path and refined, per epoch.

    Args:
        changes: :func:`lib.analysis.aggregates.ranking_changes`.

    Returns:
        ``model, epoch, ordered by path L1, ordered by refined L1, order changed`` (yes/no).
    """
    return pd.DataFrame({
        "model": changes["model"],
        "epoch": changes["epoch"],
        "ordered by path L1 (smallest first)": changes["order_path"],
        "ordered by refined L1 (smallest first)": changes["order_refined"],
        "order changed": changes["changed"].map({True: "yes", False: "no"}),
    })


def percent_text(estimate: float, low: float, high: float) -> str:
    """A rate and its interval in percent: ``"66.7 % [39.1, 86.2]"`` (``"-"`` without one)."""
    if not math.isfinite(estimate):
        return "-"
    return f"{100 * estimate:.1f}{_NBSP}% [{100 * low:.1f},{_NBSP}{100 * high:.1f}]"


def _units(row, count: str) -> str:
    """``" (12 images, 72 attacks)"`` of a table row, ``" (n=72)"`` without images."""
    number = getattr(row, count)
    if not hasattr(row, "images"):
        return f" (n={number})"
    return f" ({row.images} images, {number} {count})"


def interval_pivot(table: pd.DataFrame, *, value: str, order: list[str],
                   count: str | None = None, percent: bool = False) -> pd.DataFrame:
    """Models and epochs down, schedules across, each cell ``"estimate [low, high]"`` (and
    the units behind it).

    Args:
        table: an aggregate with ``epoch``, ``schedule``, ``<value>``, ``<value>_low``,
            ``<value>_high`` (a ``model`` column, ``images`` and ``count`` when it has them).
        value: the estimate's column.
        order: the schedules' column order.
        count: a column whose number follows each cell, e.g. ``(12 images, 72 attacks)``
            (``(n=72)`` for a table without images).
        percent: the value is a rate in [0, 1], shown in percent.
    """
    text = percent_text if percent else interval_text
    cells = [text(getattr(r, value), getattr(r, f"{value}_low"), getattr(r, f"{value}_high"))
             + (_units(r, count) if count else "") for r in table.itertuples()]
    index = [c for c in ("model", "epoch") if c in table.columns]
    shown = table.assign(cell=cells).pivot(index=index, columns="schedule", values="cell")
    shown = shown[[s for s in order if s in shown.columns]].reset_index()
    shown.columns.name = None
    return shown


def html(table: pd.DataFrame) -> HTML:
    """``table`` as HTML for a notebook: no index column, every cell in full, whole numbers
    with thousands separators."""
    formatters = {column: "{:,}".format for column in table.columns
                  if pd.api.types.is_integer_dtype(table[column])
                  and column not in ("model", "epoch", "from epoch", "to epoch")}
    return HTML(table.to_html(index=False, border=0, na_rep="-", formatters=formatters,
                              justify="left"))
