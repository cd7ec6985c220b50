"""Schedules compared paired: every schedule attacks the same (epoch, image, target) rows.

A paired difference is taken per row the two schedules share (:func:`paired_interval`), so the
spread between images, much larger than the difference between schedules, cancels out; the
mean difference carries its bootstrap interval, the number of pairs and the Wilcoxon
signed-rank p-value (:mod:`lib.analysis.statistics`).
"""

from __future__ import annotations

import pandas as pd

from lib.analysis import statistics
from lib.analysis.aggregates import schedule_order, usable

#: The columns that identify one (image, target) attack shared by every schedule.
PAIR_KEYS = ("epoch", "image_id", "target")


def paired_rows(results: pd.DataFrame, value: str, *, successful_only: bool) -> pd.DataFrame:
    """Usable attacks with ``value`` blanked (NaN) where the attack failed, if asked: the input
    of :func:`lib.analysis.statistics.paired_differences` (a pair enters only if both have a
    value)."""
    rows = results[usable(results)]
    if successful_only:
        rows = rows.assign(**{value: rows[value].where(rows["success"].astype(bool))})
    return rows


def paired_interval(results: pd.DataFrame, first: str, second: str, *, value: str = "l1",
                    successful_only: bool = True, scale: float = 255.0,
                    confidence: float = statistics.CONFIDENCE) -> statistics.Interval:
    """Mean of ``value(first) - value(second)`` over the (epoch, image, target) rows the two
    schedules share, times ``scale``, with its 95 % bootstrap interval; ``n`` counts the pairs."""
    rows = paired_rows(results, value, successful_only=successful_only)
    differences = statistics.paired_differences(rows, first=first, second=second, value=value,
                                                keys=PAIR_KEYS)
    return statistics.bootstrap_interval(differences["difference"].to_numpy() * scale,
                                         confidence=confidence)


def paired_schedule_differences(results: pd.DataFrame, *, reference: str = "constant",
                                value: str = "l1", successful_only: bool = True,
                                scale: float = 255.0,
                                confidence: float = statistics.CONFIDENCE) -> pd.DataFrame:
    """Every schedule against ``reference``, paired per (image, target), at every epoch.

    Args:
        results: ``attack/results.csv`` (or any table with its columns and ``value``).
        reference: the schedule subtracted.
        value: the compared column (``"l1"``, ``"iterations"``, ``"refined_l1"``, ...).
        successful_only: compare only rows where both attacks succeeded (distances); False
            compares every usable row (iterations: a failure counts ``max_iter``).
        scale: unit of the differences (255: distances in 1/255; 1 for iterations).

    Returns:
        ``epoch, schedule, reference, pairs, mean_difference, low, high, p_signed_rank``
        (schedule minus reference; ``low, high`` the 95 % bootstrap interval). Empty when the
        reference schedule did not run.
    """
    rows = paired_rows(results, value, successful_only=successful_only)
    out = []
    for epoch in sorted(rows["epoch"].unique()):
        part = rows[rows["epoch"] == epoch]
        if reference not in set(part["schedule"]):
            continue
        for name in schedule_order(part):
            if name == reference:
                continue
            differences = statistics.paired_differences(part, first=name, second=reference,
                                                        value=value, keys=PAIR_KEYS)
            compared = statistics.paired_comparison(differences["difference"].to_numpy() * scale,
                                                    confidence=confidence)
            out.append({"epoch": int(epoch), "schedule": name, "reference": reference,
                        **compared})
    columns = ["epoch", "schedule", "reference", "mean_difference", "low", "high", "pairs",
               "p_signed_rank"]
    table = pd.DataFrame(out, columns=columns)
    return table[["epoch", "schedule", "reference", "pairs", "mean_difference", "low", "high",
                  "p_signed_rank"]]
