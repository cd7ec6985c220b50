"""Schedules compared paired: every schedule attacks the same (model, epoch, image, target) rows.

A paired difference is taken per row the two schedules share (:func:`paired_interval`), so the
spread between images, much larger than the difference between schedules, cancels out. The
unit is still the image: an image's targets share its distances to the class boundaries, so
the mean difference carries an image-bootstrap interval (models, then images, where several
trained models are pooled; :mod:`lib.analysis.resampling`), the number of images and of pairs
behind it, and the Wilcoxon signed-rank p-value of the per-image mean differences.
"""

from __future__ import annotations

import pandas as pd

from lib.analysis import resampling, statistics
from lib.analysis.aggregates import CHECKPOINT, schedule_order, usable

#: The columns that identify one (image, target) attack shared by every schedule.
PAIR_KEYS = ("model", "epoch", "image_id", "target")


def paired_rows(results: pd.DataFrame, value: str, *, successful_only: bool) -> pd.DataFrame:
    """Usable attacks with ``value`` blanked (NaN) where the attack failed, if asked: the input
    of :func:`lib.analysis.statistics.paired_differences` (a pair enters only if both have a
    value)."""
    rows = results[usable(results)]
    if successful_only:
        rows = rows.assign(**{value: rows[value].where(rows["success"].astype(bool))})
    return rows


def paired_table(results: pd.DataFrame, first: str, second: str, *, value: str = "l1",
                 successful_only: bool = True, scale: float = 255.0) -> pd.DataFrame:
    """``value(first) - value(second)`` (times ``scale``) per (model, epoch, image, target)
    row the two schedules share: ``model, epoch, image_id, target, first, second,
    difference``."""
    rows = paired_rows(results, value, successful_only=successful_only)
    differences = statistics.paired_differences(rows, first=first, second=second, value=value,
                                                keys=PAIR_KEYS)
    return differences.assign(difference=differences["difference"] * scale)


def paired_interval(results: pd.DataFrame, first: str, second: str, *, value: str = "l1",
                    successful_only: bool = True, scale: float = 255.0,
                    confidence: float = statistics.CONFIDENCE) -> resampling.Bootstrap:
    """Mean of ``value(first) - value(second)`` over the rows the two schedules share, times
    ``scale``, with its 95 % bootstrap interval: images resampled with all their pairs
    (within models resampled first, when the rows hold several trained models).

    Returns:
        :class:`~lib.analysis.resampling.Bootstrap`: ``n_images`` (model, image) units,
        ``n_models``, and ``n_attacks`` the pairs.
    """
    differences = paired_table(results, first, second, value=value,
                               successful_only=successful_only, scale=scale)
    clusters = resampling.clusters_of(differences, model="model")
    return resampling.bootstrap_rows(differences["difference"].to_numpy(float), clusters,
                                     two_level=True, confidence=confidence)


def image_signed_rank_p(differences: pd.DataFrame) -> float:
    """Wilcoxon signed-rank p-value of the per-image mean differences (the images are the
    independent units; NaN when there is no non-zero one)."""
    per_image = differences.groupby(["model", "image_id"])["difference"].mean()
    return statistics.signed_rank_p(per_image.to_numpy())


def paired_schedule_differences(results: pd.DataFrame, *, reference: str = "constant",
                                value: str = "l1", successful_only: bool = True,
                                scale: float = 255.0,
                                confidence: float = statistics.CONFIDENCE) -> pd.DataFrame:
    """Every schedule against ``reference``, paired per (image, target), at every model's
    every epoch.

    Args:
        results: ``attack/results.csv`` (or any table with its columns and ``value``).
        reference: the schedule subtracted.
        value: the compared column (``"l1"``, ``"iterations"``, ``"refined_l1"``, ...).
        successful_only: compare only rows where both attacks succeeded (distances); False
            compares every usable row (iterations: a failure counts ``max_iter``).
        scale: unit of the differences (255: distances in 1/255; 1 for iterations).

    Returns:
        ``model, epoch, schedule, reference, images, pairs, mean_difference, low, high,
        p_signed_rank`` (schedule minus reference; ``low, high`` the 95 % image-bootstrap
        interval). Empty when the reference schedule did not run.
    """
    out = []
    for (model, epoch), part in results.groupby(list(CHECKPOINT), sort=True):
        if reference not in set(part["schedule"]):
            continue
        for name in schedule_order(part):
            if name == reference:
                continue
            differences = paired_table(part, name, reference, value=value,
                                       successful_only=successful_only, scale=scale)
            clusters = resampling.clusters_of(differences)
            interval = resampling.bootstrap_rows(differences["difference"].to_numpy(float),
                                                 clusters, confidence=confidence)
            out.append({"model": int(model), "epoch": int(epoch), "schedule": name,
                        "reference": reference, "images": interval.n_images,
                        "pairs": interval.n_attacks, "mean_difference": interval.estimate,
                        "low": interval.low, "high": interval.high,
                        "p_signed_rank": image_signed_rank_p(differences)})
    columns = ["model", "epoch", "schedule", "reference", "images", "pairs", "mean_difference",
               "low", "high", "p_signed_rank"]
    return pd.DataFrame(out, columns=columns)
