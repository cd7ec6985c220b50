"""The same attacks under two losses: the paper's cross-entropy and the logit margin.

Whether a failed attack failed because of the attack or because of the model is tested by
running it again, unchanged but for the loss its steps follow (:mod:`lib.attack.losses`): an
attack that the logit margin solves was not out of reach, the cross-entropy's steps missed it;
one that neither solves is out of reach of this attack's budget and step sizes (a schedule
whose total step is spent cannot reach it with any loss).

:func:`rerun_sample` picks the rows to run again (failed and, for the distances, some
successful ones); :func:`loss_comparison` compares the two runs of those rows per schedule and
checkpoint; :func:`rescued_by_outcome` counts the rescued failures per outcome class of
:mod:`lib.analysis.failures`; :func:`margins_with_rerun` says how much the reruns lower the
per-image margins. Every interval resamples images.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from lib.analysis import resampling
from lib.analysis.failures import OUTCOMES
from lib.analysis.margins import BEST_OF_SCHEDULES, attack_distances, image_margins
from lib.checking import check_int

#: ``quantity`` of :func:`loss_comparison`: the share of failures the logit margin solves.
RESCUED = "failures solved by the logit margin"
#: ``quantity``: the share of successes the logit margin solves too.
KEPT = "successes kept by the logit margin"
#: ``quantity``: the median log ratio of the two losses' distances where both succeeded.
LOG_RATIO = "log distance ratio, logit margin / cross-entropy"
#: The keys that tie a rerun row to its original row.
ROW_KEYS = ("epoch", "row_id")


def rerun_sample(results: pd.DataFrame, *, epochs: Sequence[int], failures: int,
                 successes: int, seed: int = 0) -> pd.DataFrame:
    """The attacks to run again: per (epoch, schedule) of ``epochs``, up to ``failures`` failed
    and up to ``successes`` successful attacks (status "ok"), drawn without replacement.

    Args:
        results: attack rows (``attack/results.csv``).
        epochs: the checkpoints sampled.
        failures, successes: rows per (epoch, schedule), >= 0.
        seed: the draw's seed (the same table and seed give the same rows).

    Returns:
        The chosen rows of ``results``, sorted by (epoch, row_id).
    """
    check_int(failures, "failures", low=0)
    check_int(successes, "successes", low=0)
    table = results[results["epoch"].isin(list(epochs))]
    if "status" in table.columns:
        table = table[table["status"] == "ok"]
    solved = table["success"].astype(bool)
    parts = []
    for wanted, rows in ((failures, table[~solved]), (successes, table[solved])):
        for _, part in rows.groupby(["epoch", "schedule"], sort=True):
            parts.append(part.sample(n=min(wanted, len(part)), random_state=seed))
    if not parts:
        return table.iloc[:0]
    chosen = pd.concat(parts)
    return chosen.sort_values(list(ROW_KEYS), kind="stable").reset_index(drop=True)


def paired_rows(original: pd.DataFrame, rerun: pd.DataFrame, *, norm: str) -> pd.DataFrame:
    """The rerun rows beside their original rows: ``epoch, row_id, schedule, image_id`` (and
    ``model``), ``ce_success, margin_success`` (bool) and ``ce_distance, margin_distance`` in
    ``norm`` (``inf`` where that run failed)."""
    keys = [c for c in ("model", *ROW_KEYS) if c in rerun.columns and c in original.columns]
    left = original.assign(ce_distance=attack_distances(original, norm),
                           ce_success=original["success"].astype(bool))
    right = rerun.assign(margin_distance=attack_distances(rerun, norm),
                         margin_success=rerun["success"].astype(bool))
    extra = [c for c in ("model",) if c in left.columns and c not in keys]
    joined = right[[*keys, "margin_success", "margin_distance"]].merge(
        left[[*keys, *extra, "schedule", "image_id", "ce_success", "ce_distance"]], on=keys,
        how="inner", validate="one_to_one")
    return joined


def loss_comparison(original: pd.DataFrame, rerun: pd.DataFrame, *, norm: str = "linf",
                    confidence: float = resampling.CONFIDENCE,
                    resamples: int = resampling.RESAMPLES,
                    seed: int = resampling.SEED) -> pd.DataFrame:
    """Per checkpoint and schedule: the rerun rows under both losses.

    Quantities (each with its image-bootstrap interval; models then images where the tables
    have several models):

    - :data:`RESCUED`: the share of the cross-entropy failures that the logit margin solves;
    - :data:`KEPT`: the share of the cross-entropy successes that it solves too;
    - :data:`LOG_RATIO`: the median of log(margin distance / cross-entropy distance) over the
      rows both solved (< 0: the margin loss stops closer to the clean image).

    Returns:
        ``epoch, schedule, quantity, norm, estimate, low, high, n_images, n_models,
        n_attacks``.
    """
    pairs = paired_rows(original, rerun, norm=norm)
    both = pairs["ce_success"] & pairs["margin_success"]
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = np.log(pairs["margin_distance"].to_numpy(float)) - np.log(
            pairs["ce_distance"].to_numpy(float))
    table = pairs.assign(
        rescued=pairs["margin_success"].astype(float).where(~pairs["ce_success"]),
        kept=pairs["margin_success"].astype(float).where(pairs["ce_success"]),
        log_ratio=np.where(both & np.isfinite(ratio), ratio, np.nan))
    model = "model" if "model" in table.columns and table["model"].nunique() > 1 else None
    options = {"by": ["epoch", "schedule"], "model": model, "confidence": confidence,
               "resamples": resamples, "seed": seed}
    parts = [resampling.cluster_bootstrap(table, value="rescued", **options).assign(
                 quantity=RESCUED),
             resampling.cluster_bootstrap(table, value="kept", **options).assign(quantity=KEPT),
             resampling.cluster_bootstrap(table, value="log_ratio", statistic="median",
                                          **options).assign(quantity=LOG_RATIO)]
    result = pd.concat(parts, ignore_index=True).assign(norm=norm)
    result = result.sort_values(["epoch", "schedule"], kind="stable").reset_index(drop=True)
    return result[["epoch", "schedule", "quantity", "norm", *resampling.INTERVAL_COLUMNS]]


def rescued_by_outcome(failures: pd.DataFrame, rerun: pd.DataFrame) -> pd.DataFrame:
    """How many cross-entropy failures of each outcome class the logit margin solves.

    Args:
        failures: :func:`lib.analysis.failures.failed_attacks` (with ``epoch, row_id``).
        rerun: the rerun rows (``epoch, row_id, success``).

    Returns:
        One row per outcome of :data:`lib.analysis.failures.OUTCOMES`: ``outcome, rerun``
        (failures of that class that were run again), ``solved`` and ``share`` (NaN where none
        was run again).
    """
    keys = [c for c in ("model", *ROW_KEYS) if c in failures.columns and c in rerun.columns]
    joined = failures[[*keys, "outcome"]].merge(rerun[[*keys, "success"]], on=keys,
                                                how="inner")
    counts = joined.groupby("outcome")["success"].agg(["size", "sum"]).reindex(
        list(OUTCOMES), fill_value=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        share = np.where(counts["size"] > 0, counts["sum"] / counts["size"], np.nan)
    return pd.DataFrame({"outcome": list(OUTCOMES), "rerun": counts["size"].to_numpy(np.int64),
                         "solved": counts["sum"].to_numpy(np.int64), "share": share})


def margins_with_rerun(original: pd.DataFrame, rerun: pd.DataFrame) -> pd.DataFrame:
    """Per image, norm and checkpoint of the rerun: the margin (best of schedules) from the
    original attacks, and from the original attacks with the logit-margin reruns added.

    Returns:
        ``model, epoch, image_id, norm, cross_entropy, both_losses`` (``both_losses <=
        cross_entropy``; ``inf`` where no attack found a boundary), images of the rerun only.
    """
    keys = ["model", "epoch", "image_id", "norm"]
    if rerun.empty:
        return pd.DataFrame(columns=[*keys, "cross_entropy", "both_losses"])
    epochs = rerun["epoch"].unique()
    images = set(rerun["image_id"])
    base = original[original["epoch"].isin(epochs) & original["image_id"].isin(images)]
    before = image_margins(base)
    after = image_margins(pd.concat([base, rerun], ignore_index=True))
    pick = [*keys, "margin"]
    chosen = (before["method"] == BEST_OF_SCHEDULES) & (before["mode"] == "targeted")
    table = before.loc[chosen, pick].merge(
        after.loc[(after["method"] == BEST_OF_SCHEDULES) & (after["mode"] == "targeted"), pick],
        on=keys, suffixes=("_ce", "_both"))
    return table.rename(columns={"margin_ce": "cross_entropy", "margin_both": "both_losses"})
