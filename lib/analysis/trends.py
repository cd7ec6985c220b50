"""Over-training trends per model: each followed image's distance across checkpoints.

Each checkpoint attacks its own selection of correctly classified images, so the means of two
checkpoints compare partly different images. An image that a model's every attacked
checkpoint selects is *followed* (:func:`lib.attack.selection.followed_images`); its distance
at two checkpoints is a paired observation of the same image, and the change per image,
resampled by image, is the trend of that model. Every model has its own trend: the models
differ in their seed, so a trend that holds for each of them is a statement about the
training, not about one network.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from lib import TOOLS
from lib.analysis import resampling, statistics
from lib.analysis.aggregates import ordered, schedule_order, successful
from lib.attack.selection import followed_images

#: The columns of :func:`per_image_change`.
CHANGE_COLUMNS = ("model", "schedule", "first_epoch", "last_epoch", "images",
                  "mean_change_255", "low", "high", "p_signed_rank")


def per_image_l1(results: pd.DataFrame, selection: pd.DataFrame) -> pd.DataFrame:
    """The L1 of each followed image at every attacked epoch of its model, per schedule.

    Only (image, target, schedule) attacks that succeeded at *every* attacked epoch of the
    model enter, so an image's values at two epochs average over the same targets (paired
    across epochs).

    Args:
        results: ``attack/results.csv``.
        selection: ``attack/selection.csv`` (model, epoch, image_id, label, rank).

    Returns:
        ``model, image_id, source, source_tool, schedule, epoch, targets, mean_l1_255``.
    """
    parts = []
    for model, rows in results.groupby("model", sort=True):
        followed = followed_images(selection[selection["model"] == model])["image_id"]
        epochs = rows["epoch"].nunique()
        hits = successful(rows)
        hits = hits[hits["image_id"].isin(set(followed))]
        complete = hits.groupby(["image_id", "target", "schedule"])["epoch"].transform(
            "nunique") == epochs
        parts.append(hits[complete].groupby(
            ["model", "image_id", "source", "schedule", "epoch"], sort=False)
            .agg(targets=("l1", "size"), mean_l1_255=("l1", "mean")).reset_index())
    columns = ["model", "image_id", "source", "schedule", "epoch", "targets", "mean_l1_255"]
    table = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=columns)
    table["mean_l1_255"] = table["mean_l1_255"].astype(float) * 255
    table.insert(3, "source_tool", table["source"].map(dict(enumerate(TOOLS))))
    return ordered(table, schedule_order(results), ["model", "image_id", "schedule", "epoch"])


def per_image_change(per_image: pd.DataFrame, *,
                     confidence: float = statistics.CONFIDENCE) -> pd.DataFrame:
    """Per model and schedule: the mean change of a followed image's L1 from the model's
    first to its last attacked epoch.

    Paired per image (each image against itself); the interval resamples images (one row per
    image: the ordinary percentile bootstrap), the Wilcoxon signed-rank p-value treats the
    images as the independent units they are.

    Returns:
        :data:`CHANGE_COLUMNS`, one row per model and schedule whose model was attacked at two
        or more epochs.
    """
    rows = []
    for model, own in per_image.groupby("model", sort=True):
        epochs = sorted(own["epoch"].unique())
        if len(epochs) < 2:
            continue
        first, last = epochs[0], epochs[-1]
        for name in schedule_order(own):
            part = own[own["schedule"] == name]
            part = part.assign(schedule=part["epoch"].map({first: "first", last: "last"}))
            part = part[part["schedule"].notna()]
            differences = statistics.paired_differences(
                part, first="last", second="first", value="mean_l1_255", keys=["image_id"])
            change = resampling.cluster_bootstrap(differences, value="difference",
                                                  confidence=confidence).iloc[0]
            rows.append({"model": int(model), "schedule": name, "first_epoch": int(first),
                         "last_epoch": int(last), "images": int(change["n_images"]),
                         "mean_change_255": change["estimate"], "low": change["low"],
                         "high": change["high"],
                         "p_signed_rank": statistics.signed_rank_p(differences["difference"])})
    table = pd.DataFrame(rows, columns=list(CHANGE_COLUMNS))
    return table.astype({"model": np.int64}) if len(table) else table
