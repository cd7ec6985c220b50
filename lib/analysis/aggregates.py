"""Aggregates of the attack results: the tables behind the analysis figures.

Everything here is computed from tables (the attack stage's results, traces and lr0 sweep, the
training stage's predictions); nothing attacks, loads a model or reads a file.

Units: distances are reported in 1/255 pixel units (columns ending ``_255``: 1.0 means one
grey level on average over all C*H*W values), step sizes likewise; success rates in [0, 1].

Every compared number carries a 95 % interval and the number behind it
(:mod:`lib.analysis.statistics`): rates a Wilson interval (columns ``*_low``, ``*_high``),
means a seeded bootstrap interval. Schedules compared pair by pair are
:mod:`lib.analysis.paired`.

Attacks whose ``status`` is not ``"ok"`` (e.g. ``"nonfinite"``: the model's output stopped
being finite) or whose distances are not finite are *skipped*: they enter no mean and no rate,
and :func:`skipped_counts` (and the ``skipped`` columns) say how many there were.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from lib import NUM_CLASSES, TOOLS
from lib.analysis import statistics
from lib.attack.results import result_columns

#: Refined distances (boundary located by bisection along the last step), when the run has them.
REFINED_COLUMNS = tuple(name for name in result_columns() if name.startswith("refine"))


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


def ordered(table: pd.DataFrame, order: Sequence[str], keys: Sequence[str]) -> pd.DataFrame:
    """``table`` sorted by ``keys``, the schedules in ``order`` (not alphabetically)."""
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


def successful(results: pd.DataFrame) -> pd.DataFrame:
    """The usable attacks that reached their target."""
    return results[usable(results) & results["success"].astype(bool)]


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
    return ordered(table, schedule_order(results), ["epoch", "schedule"])


def mean_l1(results: pd.DataFrame) -> pd.DataFrame:
    """Figure 3: mean L1 of the *successful* attacks per epoch and schedule.

    Returns:
        ``epoch, schedule, successes, mean_l1`` ([0, 1] units), ``mean_l1_255`` with its 95 %
        bootstrap interval ``mean_l1_255_low, mean_l1_255_high``, ``median_l1_255``,
        ``sd_l1_255`` and ``sem_l1_255`` (standard error; NaN for fewer than two attacks).
    """
    hits = successful(results)
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
    return ordered(table, schedule_order(results), ["epoch", "schedule"])


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
    return ordered(table, schedule_order(results), ["schedule"])


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
    return ordered(table, schedule_order(results), ["epoch", "schedule", "source", "target"])


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

    At iteration i the means are over the attacks still running (those that applied update i):
    the step size over every attack with a step size there, the loss over every attack with a
    loss there (an attack the certified stop finished after update k has the full loop's step
    sizes to the end of its budget and its losses up to k).

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
        with_loss = np.isfinite(loss[pick]).sum(axis=0)
        lr_sum = np.nansum(lr[pick], axis=0)
        loss_sum = np.nansum(loss[pick], axis=0)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean_lr = np.where(running > 0, lr_sum / running, np.nan)
            mean_loss = np.where(with_loss > 0, loss_sum / with_loss, np.nan)
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
    table = table.merge(bootstrap_columns(successful(sweep), ["epoch", "lr0", "schedule"], "l1",
                                          "mean_l1_255", scale=255),
                        on=["epoch", "lr0", "schedule"], how="left")
    table = table[["epoch", "lr0", "lr0_255", "schedule", "attacks", "successes", "success_rate",
                   "success_rate_low", "success_rate_high", "mean_l1_255", "mean_l1_255_low",
                   "mean_l1_255_high", "mean_iterations", "skipped"]]
    return ordered(table, schedule_order(sweep), ["lr0", "schedule"])


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
    hits = successful(results)
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
    return ordered(table, schedule_order(results), keys)


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


def per_image_l1(results: pd.DataFrame, followed: Sequence[str]) -> pd.DataFrame:
    """The L1 of each followed image at every attacked epoch, per schedule.

    Only (image, target, schedule) attacks that succeeded at *every* attacked epoch enter, so
    an image's values at two epochs average over the same targets (paired across epochs).

    Args:
        results: ``attack/results.csv``.
        followed: image ids attacked at every attacked epoch
            (:func:`lib.attack.selection.followed_images`).

    Returns:
        ``image_id, source, source_tool, schedule, epoch, targets, mean_l1_255``.
    """
    epochs = sorted(results["epoch"].unique())
    hits = successful(results)
    hits = hits[hits["image_id"].isin(set(followed))]
    keys = ["image_id", "target", "schedule"]
    complete = hits.groupby(keys)["epoch"].transform("nunique") == len(epochs)
    table = (hits[complete].groupby(["image_id", "source", "schedule", "epoch"], sort=False)
             .agg(targets=("l1", "size"), mean_l1_255=("l1", "mean")).reset_index())
    table["mean_l1_255"] *= 255
    table.insert(2, "source_tool", table["source"].map(dict(enumerate(TOOLS))))
    return ordered(table, schedule_order(results), ["image_id", "schedule", "epoch"])


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
