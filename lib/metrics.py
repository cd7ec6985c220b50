"""Aggregates of the attack results: the tables behind the analysis figures and the claims.

Everything here is computed from the attack stage's files alone (``attack/results.csv``,
``traces.npz``, ``lr0_sweep.csv``) plus, for the claim about clean accuracy, the training
stage's ``train/metrics.csv``; nothing attacks or loads a model.

Units: distances are reported in 1/255 pixel units (columns ending ``_255``: 1.0 means one
grey level on average over all C*H*W values), step sizes likewise; success rates in [0, 1].

Every compared number carries a 95 % interval and the number behind it (``lib.statistics``):
rates a Wilson interval (columns ``*_low``, ``*_high``), means a seeded bootstrap interval.
Schedules are compared paired on the (epoch, image, target) rows they share
(:func:`paired_schedule_differences`).

Attacks whose ``status`` is not ``"ok"`` (e.g. ``"nonfinite"``: the model's output stopped
being finite) or whose distances are not finite are *skipped*: they enter no mean and no rate,
and :func:`skipped_counts` (and the ``skipped`` columns) say how many there were.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from lib import NUM_CLASSES, TOOLS, io, minimality, stages, statistics
from lib.errors import RunFolderError

#: The columns that identify one (image, target) attack shared by every schedule.
PAIR_KEYS = ("epoch", "image_id", "target")
#: Refined distances (boundary located by bisection along the last step), when the run has them.
REFINED_COLUMNS = ("refined_l1", "refined_l2", "refined_linf", "refine_forwards")


# --------------------------------------------------------------------------- reading


def _attack_file(run_dir: str | os.PathLike[str], kind: str) -> Path:
    path = stages.attack_file(run_dir, kind)
    if not path.is_file():
        raise RunFolderError(
            f"{path} is missing: the run folder has no attack results; run the attack stage "
            "(03_attack) first"
        )
    return path


def read_results(run_dir: str | os.PathLike[str]) -> pd.DataFrame:
    """``attack/results.csv`` (one row per attack); RunFolderError naming 03_attack if absent."""
    return pd.read_csv(_attack_file(run_dir, "results"), dtype={"image_id": str},
                       keep_default_na=False, na_values=[""])


def read_sweep(run_dir: str | os.PathLike[str]) -> pd.DataFrame | None:
    """``attack/lr0_sweep.csv``, or None when the stage ran without a sweep."""
    path = stages.attack_file(run_dir, "lr0_sweep")
    if not path.is_file():
        return None
    return pd.read_csv(path, dtype={"image_id": str}, keep_default_na=False, na_values=[""])


def read_npz(run_dir: str | os.PathLike[str], kind: str) -> dict[str, np.ndarray] | None:
    """The arrays of the attack stage's ``kind`` file (``"traces"``, ``"gallery"``), or None
    if absent."""
    path = stages.attack_file(run_dir, kind)
    if not path.is_file():
        return None
    return io.read_npz(path)


def read_training_predictions(run_dir: str | os.PathLike[str]) -> pd.DataFrame:
    """``train/predictions.csv`` (epoch, image_id, label, predicted); RunFolderError if absent."""
    path = stages.train_table(stages.train_dir(run_dir), "predictions")
    if not path.is_file():
        raise RunFolderError(f"{path} is missing; run the training stage (02_train) first")
    return pd.read_csv(path, dtype={"image_id": str})


def read_training_metrics(run_dir: str | os.PathLike[str]) -> pd.DataFrame:
    """``train/metrics.csv``; RunFolderError naming 02_train if absent."""
    path = stages.train_table(stages.train_dir(run_dir), "metrics")
    if not path.is_file():
        raise RunFolderError(f"{path} is missing; run the training stage (02_train) first")
    return pd.read_csv(path)


# --------------------------------------------------------------------------- helpers


def usable(results: pd.DataFrame) -> pd.Series:
    """True for attacks that enter the aggregates: status "ok" and finite distances."""
    finite = np.isfinite(results[["l1", "iterations"]].to_numpy(float)).all(axis=1)
    return (results["status"] == "ok") & finite


def skipped_counts(results: pd.DataFrame) -> pd.DataFrame:
    """Attacks left out of every aggregate: ``epoch, schedule, status, count`` (may be empty)."""
    left_out = results[~usable(results)]
    return (left_out.groupby(["epoch", "schedule", "status"], sort=True).size()
            .rename("count").reset_index())


def schedule_order(results: pd.DataFrame) -> list[str]:
    """The schedules in the order the stage ran them (their first appearance)."""
    return list(dict.fromkeys(results["schedule"]))


def _ordered(table: pd.DataFrame, order: Sequence[str], keys: Sequence[str]) -> pd.DataFrame:
    rank = {name: k for k, name in enumerate(order)}
    return (table.assign(_order=table["schedule"].map(rank))
            .sort_values([k if k != "schedule" else "_order" for k in keys], kind="stable")
            .drop(columns="_order").reset_index(drop=True))


def _last_epoch(results: pd.DataFrame, epoch: int | None) -> int:
    return int(results["epoch"].max()) if epoch is None else int(epoch)


def with_wilson(table: pd.DataFrame, *, successes: str = "successes", trials: str = "attacks",
                rate: str = "success_rate",
                confidence: float = statistics.CONFIDENCE) -> pd.DataFrame:
    """Add ``<rate>_low`` and ``<rate>_high``: the Wilson interval of every row's rate."""
    bounds = [statistics.wilson_interval(int(k), int(n), confidence=confidence)
              for k, n in zip(table[successes], table[trials], strict=True)]
    return table.assign(**{f"{rate}_low": [b.low for b in bounds],
                           f"{rate}_high": [b.high for b in bounds]})


def bootstrap_columns(rows: pd.DataFrame, keys: Sequence[str], column: str, name: str, *,
                      scale: float = 1.0, statistic: str = "mean",
                      confidence: float = statistics.CONFIDENCE) -> pd.DataFrame:
    """Per group of ``keys``: the bootstrap interval of the mean (or median) of ``column``.

    Returns:
        ``keys..., <name>_low, <name>_high`` (values times ``scale``).
    """
    out = []
    for key, part in rows.groupby(list(keys), sort=False):
        bound = statistics.bootstrap_interval(part[column].to_numpy(float) * scale,
                                              statistic=statistic, confidence=confidence)
        out.append((*(key if isinstance(key, tuple) else (key,)), bound.low, bound.high))
    return pd.DataFrame(out, columns=[*keys, f"{name}_low", f"{name}_high"])


def _successful(results: pd.DataFrame) -> pd.DataFrame:
    return results[usable(results) & results["success"].astype(bool)]


# --------------------------------------------------------------------------- aggregates


def _macro_f1(labels: np.ndarray, predicted: np.ndarray) -> float:
    """Macro F1: the unweighted mean over all 7 classes (as the training stage reports it; a
    class never present nor predicted counts 0)."""
    counts = np.bincount(labels * NUM_CLASSES + predicted, minlength=NUM_CLASSES ** 2)
    confusion = counts.reshape(NUM_CLASSES, NUM_CLASSES)
    hits = np.diag(confusion).astype(float)
    denominator = confusion.sum(axis=0) + confusion.sum(axis=1)
    f1 = np.divide(2 * hits, denominator, out=np.zeros(NUM_CLASSES), where=denominator > 0)
    return float(f1.mean())


def accuracy_f1_intervals(predictions: pd.DataFrame, *,
                          confidence: float = statistics.CONFIDENCE) -> pd.DataFrame:
    """Figure 1 with intervals: test accuracy (Wilson) and macro F1 (bootstrap over the test
    images) per epoch, from ``train/predictions.csv``.

    Returns:
        ``epoch, test_images, accuracy, accuracy_low, accuracy_high, macro_f1, macro_f1_low,
        macro_f1_high``.
    """
    rows = []
    for epoch, part in predictions.groupby("epoch", sort=True):
        labels = part["label"].to_numpy(np.int64)
        predicted = part["predicted"].to_numpy(np.int64)
        accuracy = statistics.wilson_interval(int((labels == predicted).sum()), len(part),
                                              confidence=confidence)
        f1 = statistics.bootstrap_statistic((labels, predicted), lambda a, b: _macro_f1(
            a.astype(np.int64), b.astype(np.int64)), confidence=confidence)
        rows.append({"epoch": int(epoch), "test_images": len(part),
                     "accuracy": accuracy.estimate, "accuracy_low": accuracy.low,
                     "accuracy_high": accuracy.high, "macro_f1": f1.estimate,
                     "macro_f1_low": f1.low, "macro_f1_high": f1.high})
    return pd.DataFrame(rows, columns=["epoch", "test_images", "accuracy", "accuracy_low",
                                       "accuracy_high", "macro_f1", "macro_f1_low",
                                       "macro_f1_high"])


def success_rates(results: pd.DataFrame) -> pd.DataFrame:
    """Figure 2: the share of attacks that reached their target within ``max_iter``.

    Returns:
        ``epoch, schedule, attacks, successes, success_rate, success_rate_low,
        success_rate_high, skipped``; ``attacks`` counts the usable attacks,
        ``success_rate = successes / attacks`` (NaN when none is usable), with its 95 % Wilson
        interval.
    """
    ok = usable(results)
    table = (
        results.assign(_ok=ok, _hit=ok & results["success"].astype(bool), _skip=~ok)
        .groupby(["epoch", "schedule"], sort=False)
        .agg(attacks=("_ok", "sum"), successes=("_hit", "sum"), skipped=("_skip", "sum"))
        .reset_index()
    )
    table["success_rate"] = table["successes"] / table["attacks"].where(table["attacks"] > 0)
    table = with_wilson(table)
    table = table[["epoch", "schedule", "attacks", "successes", "success_rate",
                   "success_rate_low", "success_rate_high", "skipped"]]
    return _ordered(table, schedule_order(results), ["epoch", "schedule"])


def mean_l1(results: pd.DataFrame) -> pd.DataFrame:
    """Figure 3: mean L1 of the *successful* attacks per epoch and schedule.

    Returns:
        ``epoch, schedule, successes, mean_l1`` ([0, 1] units), ``mean_l1_255`` with its 95 %
        bootstrap interval ``mean_l1_255_low, mean_l1_255_high``, ``median_l1_255``,
        ``sd_l1_255`` and ``sem_l1_255`` (standard error; NaN for fewer than two attacks).
    """
    hits = _successful(results)
    grouped = hits.groupby(["epoch", "schedule"], sort=False)["l1"]
    table = grouped.agg(successes="size", mean_l1="mean", sd="std").reset_index()
    table["mean_l1_255"] = table["mean_l1"] * 255
    table["sd_l1_255"] = table["sd"] * 255
    table["sem_l1_255"] = table["sd_l1_255"] / np.sqrt(table["successes"])
    table = table.drop(columns="sd")
    table["median_l1_255"] = grouped.median().to_numpy() * 255
    table = table.merge(bootstrap_columns(hits, ["epoch", "schedule"], "l1", "mean_l1_255",
                                          scale=255), on=["epoch", "schedule"], how="left")
    # schedules without a single success still get a row (with NaN), so charts show the gap
    grid = success_rates(results)[["epoch", "schedule"]]
    table = grid.merge(table, on=["epoch", "schedule"], how="left")
    table["successes"] = table["successes"].fillna(0).astype(np.int64)
    return _ordered(table, schedule_order(results), ["epoch", "schedule"])


def iterations_and_lr(results: pd.DataFrame, *, epoch: int | None = None) -> pd.DataFrame:
    """Figure 4: mean iterations and mean step size per schedule at one epoch (default last).

    Over all usable attacks, successful or not (a failed attack counts ``max_iter``); the mean
    step size is the mean of the attacks' own mean steps (attacks with no update are left out).

    Returns:
        ``epoch, schedule, attacks, mean_iterations, mean_iterations_low, mean_iterations_high,
        mean_lr, mean_lr_255, mean_lr_255_low, mean_lr_255_high, success_rate`` (intervals: 95 %
        bootstrap).
    """
    epoch = _last_epoch(results, epoch)
    chosen = results[(results["epoch"] == epoch) & usable(results)]
    table = (
        chosen.groupby("schedule", sort=False)
        .agg(attacks=("row_id", "size"), mean_iterations=("iterations", "mean"),
             mean_lr=("mean_lr", "mean"), success_rate=("success", "mean"))
        .reset_index()
    )
    table.insert(0, "epoch", epoch)
    table["mean_lr_255"] = table["mean_lr"] * 255
    table = (table
             .merge(bootstrap_columns(chosen, ["schedule"], "iterations", "mean_iterations"),
                    on="schedule", how="left")
             .merge(bootstrap_columns(chosen, ["schedule"], "mean_lr", "mean_lr_255", scale=255),
                    on="schedule", how="left"))
    table = table[["epoch", "schedule", "attacks", "mean_iterations", "mean_iterations_low",
                   "mean_iterations_high", "mean_lr", "mean_lr_255", "mean_lr_255_low",
                   "mean_lr_255_high", "success_rate"]]
    return _ordered(table, schedule_order(results), ["schedule"])


def class_pair_l1(results: pd.DataFrame) -> pd.DataFrame:
    """The source x target matrix: mean L1 of successful attacks per epoch, schedule and pair.

    Every one of the 7 x 6 off-diagonal pairs gets a row per epoch and schedule (NaN mean when
    no attack of the pair succeeded).

    Returns:
        ``epoch, schedule, source, target, source_tool, target_tool, attacks, successes,
        mean_l1_255``.
    """
    ok = results[usable(results) & (results["target"] >= 0)]
    hits = ok[ok["success"].astype(bool)]
    keys = ["epoch", "schedule", "source", "target"]
    counts = ok.groupby(keys).size().rename("attacks")
    means = hits.groupby(keys).agg(successes=("l1", "size"), mean_l1=("l1", "mean"))
    pairs = [(s, t) for s in range(NUM_CLASSES) for t in range(NUM_CLASSES) if s != t]
    grid = pd.DataFrame(
        [(e, name, s, t) for e, name in results[["epoch", "schedule"]].drop_duplicates()
         .itertuples(index=False) for s, t in pairs],
        columns=keys,
    )
    table = grid.join(counts, on=keys).join(means, on=keys)
    table["attacks"] = table["attacks"].fillna(0).astype(np.int64)
    table["successes"] = table["successes"].fillna(0).astype(np.int64)
    table["mean_l1_255"] = table.pop("mean_l1") * 255
    table.insert(4, "source_tool", table["source"].map(dict(enumerate(TOOLS))))
    table.insert(5, "target_tool", table["target"].map(dict(enumerate(TOOLS))))
    return _ordered(table, schedule_order(results), ["epoch", "schedule", "source", "target"])


def l1_histogram(results: pd.DataFrame, *, epoch: int | None = None,
                 bins: int = 30) -> pd.DataFrame:
    """L1 distribution of the successful attacks per schedule at one epoch (default last).

    Bins are shared by every schedule (equal width from 0 to the largest L1).

    Returns:
        ``epoch, schedule, bin_start_255, bin_end_255, count``.
    """
    epoch = _last_epoch(results, epoch)
    hits = results[(results["epoch"] == epoch) & usable(results) & results["success"].astype(bool)]
    top = float(hits["l1"].max() * 255) if len(hits) else 1.0
    edges = np.linspace(0.0, top if top > 0 else 1.0, bins + 1)
    rows = []
    for name in schedule_order(results):
        values = hits.loc[hits["schedule"] == name, "l1"].to_numpy() * 255
        counts, _ = np.histogram(values, bins=edges)
        rows.append(pd.DataFrame({"epoch": epoch, "schedule": name, "bin_start_255": edges[:-1],
                                  "bin_end_255": edges[1:], "count": counts.astype(np.int64)}))
    return pd.concat(rows, ignore_index=True)


def trace_summary(traces: dict[str, np.ndarray], results: pd.DataFrame, *,
                  epoch: int | None = None) -> pd.DataFrame:
    """Mean step size and loss over the iterations per schedule at one epoch (default last).

    At iteration i the means are over the attacks still running (those that applied update i).

    Args:
        traces: ``attack/traces.npz``: ``epoch``, ``row_id`` [R], ``lr``, ``loss`` [R, max_iter].
        results: ``attack/results.csv`` (gives each trace its schedule and status).

    Returns:
        ``epoch, schedule, iteration`` (1-based), ``running`` (attacks), ``mean_lr_255``,
        ``mean_loss``.
    """
    epoch = _last_epoch(results, epoch)
    keyed = results[usable(results)].set_index(["epoch", "row_id"])["schedule"]
    mask = traces["epoch"] == epoch
    index = pd.MultiIndex.from_arrays([traces["epoch"][mask], traces["row_id"][mask]])
    schedule = keyed.reindex(index).to_numpy()
    lr, loss = traces["lr"][mask], traces["loss"][mask]
    rows = []
    for name in schedule_order(results):
        pick = schedule == name
        if not pick.any():
            continue
        running = np.isfinite(lr[pick]).sum(axis=0)
        lr_sum = np.nansum(lr[pick], axis=0)
        loss_sum = np.nansum(loss[pick], axis=0)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean_lr = np.where(running > 0, lr_sum / running, np.nan)
            mean_loss = np.where(running > 0, loss_sum / running, np.nan)
        steps = np.arange(1, lr.shape[1] + 1)
        keep = running > 0
        rows.append(pd.DataFrame({"epoch": epoch, "schedule": name, "iteration": steps[keep],
                                  "running": running[keep].astype(np.int64),
                                  "mean_lr_255": mean_lr[keep] * 255,
                                  "mean_loss": mean_loss[keep]}))
    columns = ["epoch", "schedule", "iteration", "running", "mean_lr_255", "mean_loss"]
    return pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(columns=columns)


def lr0_sensitivity(sweep: pd.DataFrame) -> pd.DataFrame:
    """Success rate, mean L1 (successful) and mean iterations per schedule at each swept lr0.

    Returns:
        ``epoch, lr0, lr0_255, schedule, attacks, successes, success_rate`` (with its Wilson
        interval ``success_rate_low, success_rate_high``), ``mean_l1_255`` (with its bootstrap
        interval ``mean_l1_255_low, mean_l1_255_high``), ``mean_iterations, skipped``.
    """
    ok = usable(sweep)
    table = sweep.assign(_ok=ok, _skip=~ok, _hit=ok & sweep["success"].astype(bool),
                         _l1=sweep["l1"].where(ok & sweep["success"].astype(bool)),
                         _it=sweep["iterations"].where(ok))
    table = (table.groupby(["epoch", "lr0", "schedule"], sort=False)
             .agg(attacks=("_ok", "sum"), successes=("_hit", "sum"), mean_l1=("_l1", "mean"),
                  mean_iterations=("_it", "mean"), skipped=("_skip", "sum"))
             .reset_index())
    table["success_rate"] = table["successes"] / table["attacks"].where(table["attacks"] > 0)
    table["mean_l1_255"] = table.pop("mean_l1") * 255
    table.insert(2, "lr0_255", table["lr0"] * 255)
    table = with_wilson(table)
    table = table.merge(bootstrap_columns(_successful(sweep), ["epoch", "lr0", "schedule"], "l1",
                                          "mean_l1_255", scale=255),
                        on=["epoch", "lr0", "schedule"], how="left")
    table = table[["epoch", "lr0", "lr0_255", "schedule", "attacks", "successes", "success_rate",
                   "success_rate_low", "success_rate_high", "mean_l1_255", "mean_l1_255_low",
                   "mean_l1_255_high", "mean_iterations", "skipped"]]
    return _ordered(table, schedule_order(sweep), ["lr0", "schedule"])


# --------------------------------------------------------------------------- paired comparisons


def paired_rows(results: pd.DataFrame, value: str, *, successful_only: bool) -> pd.DataFrame:
    """Usable attacks with ``value`` blanked (NaN) where the attack failed, if asked: the input
    of :func:`lib.statistics.paired_differences` (a pair enters only if both have a value)."""
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


# --------------------------------------------------------------------------- refinement


def refined_available(results: pd.DataFrame) -> bool:
    """True when the run refined its crossings: the refined columns exist, hold values, and
    the refinement spent forward passes on some row. (With refinement off the attack stage
    writes the path distances there and 0 forwards.)"""
    if not all(c in results.columns for c in REFINED_COLUMNS):
        return False
    forwards = pd.to_numeric(results["refine_forwards"], errors="coerce").fillna(0)
    return bool(results["refined_l1"].notna().any() and (forwards > 0).any())


def refinement_ranking(results: pd.DataFrame, *,
                       confidence: float = statistics.CONFIDENCE) -> pd.DataFrame | None:
    """Path L1 against refined L1 (overshoot removed) per epoch and schedule, with ranks.

    ``refined_l1`` is in the units of ``l1`` (mean ``|x_b - x|`` over all values, [0, 1]); the
    overshoot of an attack is ``l1 - refined_l1``. Means over successful attacks with a refined
    distance; rank 1 is the smallest mean.

    Returns:
        ``epoch, schedule, successes, mean_l1_255(_low, _high), mean_refined_l1_255(_low,
        _high), mean_overshoot_255(_low, _high), mean_refine_forwards, rank_path,
        rank_refined``; None when the run has no refined distances.
    """
    if not refined_available(results):
        return None
    hits = _successful(results)
    hits = hits[hits["refined_l1"].notna()].assign(overshoot=lambda t: t["l1"] - t["refined_l1"])
    keys = ["epoch", "schedule"]
    table = (hits.groupby(keys, sort=False)
             .agg(successes=("l1", "size"), mean_l1_255=("l1", "mean"),
                  mean_refined_l1_255=("refined_l1", "mean"),
                  mean_overshoot_255=("overshoot", "mean"),
                  mean_refine_forwards=("refine_forwards", "mean"))
             .reset_index())
    for column, name in (("l1", "mean_l1_255"), ("refined_l1", "mean_refined_l1_255"),
                         ("overshoot", "mean_overshoot_255")):
        table[name] = table[name] * 255
        table = table.merge(bootstrap_columns(hits, keys, column, name, scale=255,
                                              confidence=confidence), on=keys, how="left")
    by_epoch = table.groupby("epoch")
    table["rank_path"] = by_epoch["mean_l1_255"].rank(method="min").astype(np.int64)
    table["rank_refined"] = by_epoch["mean_refined_l1_255"].rank(method="min").astype(np.int64)
    return _ordered(table, schedule_order(results), keys)


def ranking_changes(ranking: pd.DataFrame) -> pd.DataFrame:
    """Per epoch: the schedules from smallest to largest mean L1, along the path and refined.

    Returns:
        ``epoch, order_path, order_refined, changed`` (bool: the two orders differ).
    """
    rows = []
    for epoch, part in ranking.groupby("epoch", sort=True):
        path = part.sort_values(["rank_path", "schedule"])["schedule"].tolist()
        refined = part.sort_values(["rank_refined", "schedule"])["schedule"].tolist()
        rows.append((int(epoch), " < ".join(path), " < ".join(refined), path != refined))
    return pd.DataFrame(rows, columns=["epoch", "order_path", "order_refined", "changed"])


# --------------------------------------------------------------------------- per image


def per_image_l1(results: pd.DataFrame, followed: Sequence[str]) -> pd.DataFrame:
    """The L1 of each followed image at every attacked epoch, per schedule.

    Only (image, target, schedule) attacks that succeeded at *every* attacked epoch enter, so
    an image's values at two epochs average over the same targets (paired across epochs).

    Args:
        results: ``attack/results.csv``.
        followed: image ids attacked at every attacked epoch
            (:func:`lib.selection.followed_images`).

    Returns:
        ``image_id, source, source_tool, schedule, epoch, targets, mean_l1_255``.
    """
    epochs = sorted(results["epoch"].unique())
    hits = _successful(results)
    hits = hits[hits["image_id"].isin(set(followed))]
    keys = ["image_id", "target", "schedule"]
    complete = hits.groupby(keys)["epoch"].transform("nunique") == len(epochs)
    table = (hits[complete].groupby(["image_id", "source", "schedule", "epoch"], sort=False)
             .agg(targets=("l1", "size"), mean_l1_255=("l1", "mean")).reset_index())
    table["mean_l1_255"] *= 255
    table.insert(2, "source_tool", table["source"].map(dict(enumerate(TOOLS))))
    return _ordered(table, schedule_order(results), ["image_id", "schedule", "epoch"])


def per_image_change(per_image: pd.DataFrame, *,
                     confidence: float = statistics.CONFIDENCE) -> pd.DataFrame:
    """Per schedule: the mean change of a followed image's L1 from the first to the last epoch.

    Paired per image (each image against itself); the bootstrap resamples images.

    Returns:
        ``schedule, first_epoch, last_epoch, images, mean_change_255, low, high,
        p_signed_rank`` (empty when fewer than two epochs were attacked).
    """
    rows = []
    epochs = sorted(per_image["epoch"].unique())
    if len(epochs) >= 2:
        first, last = epochs[0], epochs[-1]
        for name in schedule_order(per_image):
            part = per_image[per_image["schedule"] == name].assign(
                schedule=lambda t: t["epoch"].map({first: "first", last: "last"}))
            part = part[part["schedule"].notna()]
            differences = statistics.paired_differences(
                part, first="last", second="first", value="mean_l1_255", keys=["image_id"])
            compared = statistics.paired_comparison(differences["difference"],
                                                    confidence=confidence)
            rows.append({"schedule": name, "first_epoch": int(first), "last_epoch": int(last),
                         "images": compared["pairs"],
                         "mean_change_255": compared["mean_difference"],
                         "low": compared["low"], "high": compared["high"],
                         "p_signed_rank": compared["p_signed_rank"]})
    columns = ["schedule", "first_epoch", "last_epoch", "images", "mean_change_255", "low",
               "high", "p_signed_rank"]
    return pd.DataFrame(rows, columns=columns)


# --------------------------------------------------------------------------- minimality


def minimality_intervals(results: pd.DataFrame, best: pd.DataFrame, *,
                         confidence: float = statistics.CONFIDENCE) -> pd.DataFrame:
    """Per schedule and epoch: the median ratio L1 / best-known L1 and AttackBench's optimality,
    each with a 95 % bootstrap interval over the pairs.

    Args:
        results: our attacks (attack/results.csv rows of the compared epochs).
        best: best-known L1 per pair (``epoch, image_id, target, best_l1``), e.g.
            :func:`lib.minimality.best_per_sample`.

    Returns:
        ``schedule, epoch, pairs, successful, median_ratio, median_ratio_low,
        median_ratio_high, q25_ratio, q75_ratio, optimality, optimality_low,
        optimality_high``.
    """
    keys = list(PAIR_KEYS)
    joined = results.merge(best[[*keys, "best_l1"]].drop_duplicates(keys), on=keys, how="inner")
    hit = joined["success"].astype(bool)
    ratio_ok = hit & np.isfinite(joined["best_l1"]) & (joined["best_l1"] > 0)
    joined = joined.assign(ratio=(joined["l1"] / joined["best_l1"]).where(ratio_ok),
                           distance=joined["l1"].where(hit, np.inf))
    rows = []
    for (name, epoch), part in joined.groupby(["schedule", "epoch"], sort=False):
        median = statistics.bootstrap_interval(part["ratio"], statistic="median",
                                               confidence=confidence)
        score = statistics.bootstrap_statistic(
            (part["distance"].to_numpy(), part["best_l1"].to_numpy()),
            minimality.eval_optimality, confidence=confidence)
        rows.append({"schedule": name, "epoch": int(epoch), "pairs": len(part),
                     "successful": median.n, "median_ratio": median.estimate,
                     "median_ratio_low": median.low, "median_ratio_high": median.high,
                     "q25_ratio": part["ratio"].quantile(0.25),
                     "q75_ratio": part["ratio"].quantile(0.75), "optimality": score.estimate,
                     "optimality_low": score.low, "optimality_high": score.high})
    columns = ["schedule", "epoch", "pairs", "successful", "median_ratio", "median_ratio_low",
               "median_ratio_high", "q25_ratio", "q75_ratio", "optimality", "optimality_low",
               "optimality_high"]
    return pd.DataFrame(rows, columns=columns)


# --------------------------------------------------------------------------- claims


@dataclass(frozen=True)
class ClaimRules:
    """The levels that turn an interval into a verdict (parameters of the analysis stage).

    Attributes:
        full_success: "reaches 100 %" is read as "success rate at least this" (in (0, 1]);
            a schedule "falls short" when its whole interval lies below it.
        stable_within: "changes little across epochs": the change between the epochs with the
            highest and the lowest value lies within +- this (rates and accuracies, [0, 1]).
        confidence: the intervals' confidence level.
    """

    full_success: float = 0.95
    stable_within: float = 0.05
    confidence: float = statistics.CONFIDENCE

    def __post_init__(self) -> None:
        from lib.errors import ParameterError

        if not 0 < self.full_success <= 1:
            raise ParameterError(
                f"full_success must lie in (0, 1] (0.95 reads '100 %' as at least 95 %), got "
                f"{self.full_success!r}")
        if not 0 <= self.stable_within <= 1:
            raise ParameterError(
                f"stable_within must be a share from 0 to 1 (0.05 means 5 points), got "
                f"{self.stable_within!r}")
        if not 0 < self.confidence < 1:
            raise ParameterError(f"confidence must lie in (0, 1), got {self.confidence!r}")


#: The columns of the claims table (:func:`paper_claims`).
CLAIM_COLUMNS = ("claim", "paper", "quantity", "estimate", "low", "high", "n", "counted",
                 "verdict")


def _claim(claim: str, paper: str, quantity: str, interval: statistics.Interval, counted: str,
           verdict: str) -> dict:
    return {"claim": claim, "paper": paper, "quantity": quantity,
            "estimate": interval.estimate, "low": interval.low, "high": interval.high,
            "n": interval.n, "counted": counted, "verdict": verdict}


def _not_run(claim: str, paper: str, results: pd.DataFrame, *names: str) -> dict | None:
    absent = [n for n in names if n not in set(results["schedule"])]
    if not absent:
        return None
    return _claim(claim, paper, f"schedule(s) {', '.join(absent)} not run",
                  statistics.NAN_INTERVAL, "attacks", statistics.INCONCLUSIVE)


def _pooled_rate(results: pd.DataFrame, name: str, rules: ClaimRules) -> statistics.Interval:
    rows = results[usable(results) & (results["schedule"] == name)]
    return statistics.wilson_interval(int(rows["success"].astype(bool).sum()), len(rows),
                                      confidence=rules.confidence)


def claim_reaches_full_success(results: pd.DataFrame, name: str, rules: ClaimRules) -> dict:
    """"<name> reaches 100 % success": Wilson lower bound of the pooled rate >= full_success."""
    claim = f"{name} reaches 100 % success within max_iter"
    paper = "Fig. 2: 100 % at every epoch"
    if row := _not_run(claim, paper, results, name):
        return row
    rate = _pooled_rate(results, name, rules)
    return _claim(claim, paper, f"success rate of {name}, all attacked epochs", rate, "attacks",
                  statistics.verdict_at_least(rate, rules.full_success))


def claim_falls_short(results: pd.DataFrame, name: str, rules: ClaimRules) -> dict:
    """"<name> falls short of 100 %": Wilson upper bound of the pooled rate < full_success."""
    claim = f"{name} falls short of 100 % success"
    paper = "Fig. 2: below 100 %"
    if row := _not_run(claim, paper, results, name):
        return row
    rate = _pooled_rate(results, name, rules)
    return _claim(claim, paper, f"success rate of {name}, all attacked epochs", rate, "attacks",
                  statistics.verdict_below(rate, rules.full_success))


def _all_comparisons(claim: str, paper: str, comparisons: list[tuple[str, statistics.Interval,
                                                                     str]], counted: str) -> dict:
    verdict, decisive = statistics.all_of([c[2] for c in comparisons])
    quantity, interval, _ = comparisons[decisive]
    return _claim(claim, paper, quantity, interval, counted, verdict)


def claim_constant_largest_l1(results: pd.DataFrame, rules: ClaimRules) -> dict:
    """"constant gives the largest mean L1": constant minus every other schedule, paired on
    jointly successful (image, target) rows, has a 95 % interval above 0."""
    claim = "constant gives the largest mean L1 (successful attacks)"
    paper = "Fig. 3"
    if row := _not_run(claim, paper, results, "constant"):
        return row
    comparisons = []
    for other in (n for n in schedule_order(results) if n != "constant"):
        interval = paired_interval(results, "constant", other, confidence=rules.confidence)
        comparisons.append((f"mean L1 of constant minus {other} (x 1/255), paired", interval,
                            statistics.verdict_above(interval, 0.0)))
    if not comparisons:
        return _claim(claim, paper, "no other schedule run", statistics.NAN_INTERVAL, "pairs",
                      statistics.INCONCLUSIVE)
    return _all_comparisons(claim, paper, comparisons, "pairs")


def claim_smaller_l1(results: pd.DataFrame, name: str, rules: ClaimRules) -> dict:
    """"<name> gives a smaller mean L1 than constant and iteration": both paired differences
    (<name> minus each) have a 95 % interval below 0."""
    claim = f"{name} gives a smaller mean L1 than constant and iteration"
    paper = "Fig. 3"
    if row := _not_run(claim, paper, results, name, "constant", "iteration"):
        return row
    comparisons = []
    for other in ("constant", "iteration"):
        interval = paired_interval(results, name, other, confidence=rules.confidence)
        comparisons.append((f"mean L1 of {name} minus {other} (x 1/255), paired", interval,
                            statistics.verdict_below(interval, 0.0)))
    return _all_comparisons(claim, paper, comparisons, "pairs")


def claim_most_iterations(results: pd.DataFrame, rules: ClaimRules) -> dict:
    """"step and exponential need the most iterations" (last epoch): each of them minus every
    other schedule, paired over all usable rows (a failure counts max_iter), above 0."""
    claim = "step and exponential need the most iterations (last epoch)"
    paper = "Fig. 4: mean 50 (step) and 83 (exponential) at epoch 10"
    if row := _not_run(claim, paper, results, "step", "exponential"):
        return row
    last = results[results["epoch"] == results["epoch"].max()]
    others = [n for n in schedule_order(last) if n not in ("step", "exponential")]
    comparisons = []
    for name in ("step", "exponential"):
        for other in others:
            interval = paired_interval(last, name, other, value="iterations",
                                       successful_only=False, scale=1.0,
                                       confidence=rules.confidence)
            comparisons.append((f"mean iterations of {name} minus {other}, paired", interval,
                                statistics.verdict_above(interval, 0.0)))
    if not comparisons:
        return _claim(claim, paper, "no other schedule run", statistics.NAN_INTERVAL, "pairs",
                      statistics.INCONCLUSIVE)
    return _all_comparisons(claim, paper, comparisons, "pairs")


def claim_success_stable(results: pd.DataFrame, rules: ClaimRules) -> dict:
    """"success rate changes little across epochs": per schedule, the Newcombe interval of the
    highest minus the lowest epoch's rate lies within +- stable_within."""
    claim = "success rate changes little across epochs"
    paper = (f"Fig. 2: about the same at every epoch (we call a change within "
             f"+-{100 * rules.stable_within:.0f} points little)")
    rates = success_rates(results)
    if rates["epoch"].nunique() < 2:
        return _claim(claim, paper, "one epoch attacked", statistics.NAN_INTERVAL, "attacks",
                      statistics.INCONCLUSIVE)
    comparisons = []
    for name, part in rates.groupby("schedule", sort=False):
        part = part[part["attacks"] > 0]
        high, low = part.loc[part["success_rate"].idxmax()], part.loc[part["success_rate"].idxmin()]
        interval = statistics.rate_difference_interval(
            (high["successes"], high["attacks"]), (low["successes"], low["attacks"]),
            confidence=rules.confidence)
        comparisons.append((f"success rate of {name}, epoch {high['epoch']} minus epoch "
                            f"{low['epoch']}", interval,
                            statistics.verdict_within(interval, rules.stable_within)))
    return _all_comparisons(claim, paper, comparisons, "attacks per epoch (fewer of the two)")


def claim_accuracy_stable(predictions: pd.DataFrame | None, rules: ClaimRules) -> dict:
    """"clean accuracy changes little across epochs": the paired difference (same test images)
    between the most and the least accurate epoch lies within +- stable_within."""
    claim = "clean accuracy changes little across epochs"
    paper = (f"Fig. 1: similar at every epoch (we call a change within "
             f"+-{100 * rules.stable_within:.0f} points little)")
    if predictions is None or predictions["epoch"].nunique() < 2:
        return _claim(claim, paper, "fewer than two trained epochs", statistics.NAN_INTERVAL,
                      "test images", statistics.INCONCLUSIVE)
    table = predictions.assign(correct=predictions["label"] == predictions["predicted"])
    accuracy = table.groupby("epoch")["correct"].mean()
    best, worst = int(accuracy.idxmax()), int(accuracy.idxmin())
    if best == worst:  # the same accuracy at every epoch: compare the last with the first
        best, worst = int(accuracy.index.max()), int(accuracy.index.min())
    scored = (table[table["epoch"].isin([best, worst])]
              .pivot(index="image_id", columns="epoch", values="correct").dropna().astype(bool))
    right_best, right_worst = scored[best], scored[worst]
    interval = statistics.paired_rate_difference_interval(
        both=int((right_best & right_worst).sum()),
        first_only=int((right_best & ~right_worst).sum()),
        second_only=int((~right_best & right_worst).sum()),
        neither=int((~right_best & ~right_worst).sum()), confidence=rules.confidence)
    return _claim(claim, paper, f"test accuracy, epoch {best} minus epoch {worst}, paired",
                  interval, "test images",
                  statistics.verdict_within(interval, rules.stable_within))


def paper_claims(results: pd.DataFrame, predictions: pd.DataFrame | None = None, *,
                 rules: ClaimRules = ClaimRules()) -> pd.DataFrame:
    """The paper's claims (METHOD.md's list), each with its estimate, interval and verdict.

    Args:
        results: ``attack/results.csv``.
        predictions: ``train/predictions.csv`` for the claim on clean accuracy; None leaves it
            inconclusive.
        rules: the levels of the verdicts.

    Returns:
        :data:`CLAIM_COLUMNS`: the claim, the paper's figure, the quantity estimated, its
        estimate with the 95 % interval ``low, high``, ``n`` (how many ``counted`` are behind
        it) and the verdict ``agrees``, ``disagrees`` or ``inconclusive``. Where a claim needs
        several comparisons to hold, the row shows the one that decides the verdict.
    """
    rows = [claim_reaches_full_success(results, n, rules)
            for n in ("constant", "iteration", "loss-adaptive")]
    rows += [claim_falls_short(results, n, rules) for n in ("step", "exponential")]
    rows.append(claim_constant_largest_l1(results, rules))
    rows += [claim_smaller_l1(results, n, rules) for n in ("step", "exponential", "loss-adaptive")]
    rows.append(claim_most_iterations(results, rules))
    rows.append(claim_success_stable(results, rules))
    rows.append(claim_accuracy_stable(predictions, rules))
    return pd.DataFrame(rows, columns=list(CLAIM_COLUMNS))


def readable_claims(claims: pd.DataFrame) -> pd.DataFrame:
    """The claims table as the book shows it: the estimate and its interval in one cell.

    Returns:
        ``claim, paper, quantity, estimate (95 % interval), n, verdict``.
    """
    def interval(row: pd.Series) -> str:
        if not np.isfinite(row["estimate"]):
            return "-"
        return f"{row['estimate']:.3g} [{row['low']:.3g}, {row['high']:.3g}]"

    return pd.DataFrame({
        "claim": claims["claim"], "paper": claims["paper"], "quantity": claims["quantity"],
        "estimate (95 % interval)": claims.apply(interval, axis=1),
        "n": [f"{n} {what}" for n, what in zip(claims["n"], claims["counted"], strict=True)],
        "verdict": claims["verdict"]})


def claims_conclusion(claims: pd.DataFrame) -> str:
    """The chapter's conclusion, written from the verdicts (Markdown): how many claims agree,
    disagree or stay inconclusive, and which."""
    shown = readable_claims(claims)
    count = claims["verdict"].value_counts()
    lines = [f"Of the paper's {len(claims)} claims, our run **agrees** with "
             f"{count.get(statistics.AGREES, 0)}, **disagrees** with "
             f"{count.get(statistics.DISAGREES, 0)} and leaves "
             f"{count.get(statistics.INCONCLUSIVE, 0)} **inconclusive** (the 95 % interval "
             "does not decide).", ""]
    for verdict in statistics.VERDICTS:
        chosen = shown[shown["verdict"] == verdict]
        if chosen.empty:
            continue
        lines.append(f"- {verdict.capitalize()}:")
        lines += [f"  - {row['claim']}: {row['quantity']} = {row['estimate (95 % interval)']}"
                  f" ({row['n']})" for row in chosen.to_dict("records")]
    return "\n".join(lines)
