"""Aggregates of the attack results: the tables behind the analysis figures.

Everything here is computed from tables (the attack stage's results, traces and lr0 sweep, the
training stage's predictions); nothing attacks, loads a model or reads a file.

Units: distances are reported in 1/255 pixel units (columns ending ``_255``: 1.0 means one
grey level on average over all C*H*W values), step sizes likewise; success rates in [0, 1].

Every table is per trained model (its seed, the ``model`` column) and checkpoint, and every
compared number carries a 95 % interval and the units behind it. The unit is the test image:
all attacks on one image (every target) share its distances to the class boundaries, so
intervals come from a cluster bootstrap that resamples images with all their attacks
(:mod:`lib.analysis.resampling`; columns ``*_low``, ``*_high`` and ``images`` beside the
attacks). Clean accuracy, where every test image is one independent trial, keeps its Wilson
interval. Schedules compared pair by pair are :mod:`lib.analysis.paired`.

Attacks whose ``status`` is not ``"ok"`` (e.g. ``"nonfinite"``: the model's output stopped
being finite) or whose distances are not finite are *skipped*: they enter no mean and no rate,
and :func:`skipped_counts` (and the ``skipped`` columns) say how many there were.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from lib import NUM_CLASSES, TOOLS
from lib.analysis import resampling, statistics
from lib.attack.results import result_columns

#: The columns that name one checkpoint of one trained model.
CHECKPOINT = ("model", "epoch")

#: Refined distances (boundary located by bisection along the last step), when the run has them.
REFINED_COLUMNS = tuple(name for name in result_columns() if name.startswith("refine"))


def usable(results: pd.DataFrame) -> pd.Series:
    """True for attacks that enter the aggregates: status "ok" and finite distances."""
    finite = np.isfinite(results[["l1", "iterations"]].to_numpy(float)).all(axis=1)
    return (results["status"] == "ok") & finite


def skipped_counts(results: pd.DataFrame) -> pd.DataFrame:
    """Attacks left out of every aggregate: ``epoch, schedule, status, count`` (may be empty)."""
    left_out = results[~usable(results)]
    return (left_out.groupby([*CHECKPOINT, "schedule", "status"], sort=True).size()
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


def last_epochs(results: pd.DataFrame) -> pd.DataFrame:
    """The rows of every model's last attacked checkpoint."""
    last = results.groupby("model")["epoch"].transform("max")
    return results[results["epoch"] == last]


def with_wilson(table: pd.DataFrame, *, successes: str = "successes", trials: str = "attacks",
                rate: str = "success_rate",
                confidence: float = statistics.CONFIDENCE) -> pd.DataFrame:
    """Add ``<rate>_low`` and ``<rate>_high``: the Wilson interval of every row's rate (for
    independent trials only, such as distinct test images of one checkpoint)."""
    bounds = [statistics.wilson_interval(int(k), int(n), confidence=confidence)
              for k, n in zip(table[successes], table[trials], strict=True)]
    return table.assign(**{f"{rate}_low": [b.low for b in bounds],
                           f"{rate}_high": [b.high for b in bounds]})


def bootstrap_columns(rows: pd.DataFrame, keys: Sequence[str], column: str, name: str, *,
                      scale: float = 1.0, statistic: resampling.Statistic = "mean",
                      confidence: float = statistics.CONFIDENCE) -> pd.DataFrame:
    """Per group of ``keys``: the image-bootstrap interval of the mean, median or rate of
    ``column`` (NaN rows left out).

    The image is the unit; when ``keys`` do not separate the models, images are resampled
    within models resampled first (the two-level bootstrap).

    Returns:
        ``keys..., <name>_low, <name>_high, images`` (values times ``scale``; ``images`` counts
        the (model, image) units behind the interval).
    """
    pooled = "model" in rows.columns and "model" not in keys
    table = rows.assign(_value=rows[column].astype(float) * scale)
    result = resampling.cluster_bootstrap(
        table, value="_value", statistic=statistic, by=list(keys), cluster="image_id",
        model="model" if pooled else None, confidence=confidence)
    return (result.rename(columns={"low": f"{name}_low", "high": f"{name}_high",
                                   "n_images": "images"})
            [[*keys, f"{name}_low", f"{name}_high", "images"]])


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
    """Figure 1 with intervals: test accuracy (Wilson: every test image is one independent
    trial) and macro F1 (bootstrap over the test images) per model and epoch, from every
    model's ``predictions.csv``.

    Returns:
        ``model, epoch, test_images, accuracy, accuracy_low, accuracy_high, macro_f1,
        macro_f1_low, macro_f1_high``.
    """
    rows = []
    for (model, epoch), part in predictions.groupby(list(CHECKPOINT), sort=True):
        labels = part["label"].to_numpy(np.int64)
        predicted = part["predicted"].to_numpy(np.int64)
        accuracy = statistics.wilson_interval(int((labels == predicted).sum()), len(part),
                                              confidence=confidence)
        f1 = statistics.bootstrap_statistic((labels, predicted), lambda a, b: _macro_f1(
            a.astype(np.int64), b.astype(np.int64)), confidence=confidence)
        rows.append({"model": int(model), "epoch": int(epoch), "test_images": len(part),
                     "accuracy": accuracy.estimate, "accuracy_low": accuracy.low,
                     "accuracy_high": accuracy.high, "macro_f1": f1.estimate,
                     "macro_f1_low": f1.low, "macro_f1_high": f1.high})
    return pd.DataFrame(rows, columns=[*CHECKPOINT, "test_images", "accuracy", "accuracy_low",
                                       "accuracy_high", "macro_f1", "macro_f1_low",
                                       "macro_f1_high"])


def success_rates(results: pd.DataFrame, *,
                  confidence: float = statistics.CONFIDENCE) -> pd.DataFrame:
    """Figure 2: the share of attacks that reached their target within ``max_iter``.

    Returns:
        ``model, epoch, schedule, images, attacks, successes, success_rate, success_rate_low,
        success_rate_high, skipped`` per model, checkpoint and schedule; ``attacks`` counts
        the usable attacks, ``success_rate = successes / attacks`` (NaN when none is usable),
        with its 95 % image-bootstrap interval (resampling ``images``).
    """
    keys = [*CHECKPOINT, "schedule"]
    ok = usable(results)
    table = (
        results.assign(_ok=ok, _hit=ok & results["success"].astype(bool), _skip=~ok)
        .groupby(keys, sort=False)
        .agg(attacks=("_ok", "sum"), successes=("_hit", "sum"), skipped=("_skip", "sum"))
        .reset_index()
    )
    table["success_rate"] = table["successes"] / table["attacks"].where(table["attacks"] > 0)
    hits = results[ok].assign(_hit=results["success"].astype(float))
    table = table.merge(bootstrap_columns(hits, keys, "_hit", "success_rate",
                                          statistic="rate", confidence=confidence),
                        on=keys, how="left")
    table["images"] = table["images"].fillna(0).astype(np.int64)
    table = table[[*keys, "images", "attacks", "successes", "success_rate", "success_rate_low",
                   "success_rate_high", "skipped"]]
    return ordered(table, schedule_order(results), keys)


def mean_l1(results: pd.DataFrame, *, confidence: float = statistics.CONFIDENCE) -> pd.DataFrame:
    """Figure 3: mean L1 of the *successful* attacks per model, checkpoint and schedule.

    Returns:
        ``model, epoch, schedule, images, successes, mean_l1`` ([0, 1] units),
        ``mean_l1_255`` with its 95 % image-bootstrap interval ``mean_l1_255_low,
        mean_l1_255_high``, ``median_l1_255`` and ``sd_l1_255``; ``images`` counts the images
        with at least one successful attack.
    """
    keys = [*CHECKPOINT, "schedule"]
    hits = successful(results)
    grouped = hits.groupby(keys, sort=False)["l1"]
    table = grouped.agg(successes="size", mean_l1="mean", sd="std").reset_index()
    table["mean_l1_255"] = table["mean_l1"] * 255
    table["sd_l1_255"] = table.pop("sd") * 255
    table["median_l1_255"] = grouped.median().to_numpy() * 255
    table = table.merge(bootstrap_columns(hits, keys, "l1", "mean_l1_255", scale=255,
                                          confidence=confidence), on=keys, how="left")
    # schedules without a single success still get a row (with NaN), so charts show the gap
    grid = results[keys].drop_duplicates()
    table = grid.merge(table, on=keys, how="left")
    table["successes"] = table["successes"].fillna(0).astype(np.int64)
    table["images"] = table["images"].fillna(0).astype(np.int64)
    table = table[[*keys, "images", "successes", "mean_l1", "mean_l1_255", "mean_l1_255_low",
                   "mean_l1_255_high", "median_l1_255", "sd_l1_255"]]
    return ordered(table, schedule_order(results), keys)


def iterations_and_lr(results: pd.DataFrame, *,
                      confidence: float = statistics.CONFIDENCE) -> pd.DataFrame:
    """Figure 4: mean iterations and mean step size per schedule at every model's last
    attacked checkpoint.

    Over all usable attacks, successful or not (a failed attack counts ``max_iter``); the mean
    step size is the mean of the attacks' own mean steps (attacks with no update are left out).

    Returns:
        ``model, epoch, schedule, images, attacks, mean_iterations, mean_iterations_low,
        mean_iterations_high, mean_lr, mean_lr_255, mean_lr_255_low, mean_lr_255_high,
        success_rate`` (intervals: 95 % image bootstrap).
    """
    keys = [*CHECKPOINT, "schedule"]
    chosen = last_epochs(results[usable(results)])
    table = (
        chosen.groupby(keys, sort=False)
        .agg(attacks=("row_id", "size"), mean_iterations=("iterations", "mean"),
             mean_lr=("mean_lr", "mean"), success_rate=("success", "mean"))
        .reset_index()
    )
    table["mean_lr_255"] = table["mean_lr"] * 255
    table = (table
             .merge(bootstrap_columns(chosen, keys, "iterations", "mean_iterations",
                                      confidence=confidence), on=keys, how="left")
             .merge(bootstrap_columns(chosen, keys, "mean_lr", "mean_lr_255", scale=255,
                                      confidence=confidence).drop(columns="images"),
                    on=keys, how="left"))
    table = table[[*keys, "images", "attacks", "mean_iterations", "mean_iterations_low",
                   "mean_iterations_high", "mean_lr", "mean_lr_255", "mean_lr_255_low",
                   "mean_lr_255_high", "success_rate"]]
    return ordered(table, schedule_order(results), keys)


def class_pair_l1(results: pd.DataFrame) -> pd.DataFrame:
    """The source x target matrix: mean L1 of successful attacks per model, epoch, schedule
    and pair.

    Every one of the 7 x 6 off-diagonal pairs gets a row per model, epoch and schedule (NaN
    mean when no attack of the pair succeeded). Each image of a cell is attacked once per
    target, so a cell's attacks are its images.

    Returns:
        ``model, epoch, schedule, source, target, source_tool, target_tool, attacks,
        successes, mean_l1_255``.
    """
    ok = results[usable(results) & (results["target"] >= 0)]
    hits = ok[ok["success"].astype(bool)]
    keys = [*CHECKPOINT, "schedule", "source", "target"]
    counts = ok.groupby(keys).size().rename("attacks")
    means = hits.groupby(keys).agg(successes=("l1", "size"), mean_l1=("l1", "mean"))
    pairs = [(s, t) for s in range(NUM_CLASSES) for t in range(NUM_CLASSES) if s != t]
    grid = pd.DataFrame(
        [(*checkpoint, s, t) for checkpoint in results[[*CHECKPOINT, "schedule"]]
         .drop_duplicates().itertuples(index=False) for s, t in pairs],
        columns=keys,
    )
    table = grid.join(counts, on=keys).join(means, on=keys)
    table["attacks"] = table["attacks"].fillna(0).astype(np.int64)
    table["successes"] = table["successes"].fillna(0).astype(np.int64)
    table["mean_l1_255"] = table.pop("mean_l1") * 255
    table.insert(5, "source_tool", table["source"].map(dict(enumerate(TOOLS))))
    table.insert(6, "target_tool", table["target"].map(dict(enumerate(TOOLS))))
    return ordered(table, schedule_order(results), keys)


def _last_epoch(results: pd.DataFrame, epoch: int | None) -> int:
    if results["model"].nunique() > 1:
        raise ValueError("this view is of one model: pass one model's rows")
    return int(results["epoch"].max()) if epoch is None else int(epoch)


def l1_histogram(results: pd.DataFrame, *, epoch: int | None = None,
                 bins: int = 30) -> pd.DataFrame:
    """L1 distribution of the successful attacks per schedule at one epoch (default last) of
    one model.

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
    """Mean step size and loss over the iterations per schedule at one epoch (default last) of
    one model.

    At iteration i the means are over the attacks still running (those that applied update i):
    the step size over every attack with a step size there, the loss over every attack with a
    loss there (an attack the certified stop finished after update k has the full loop's step
    sizes to the end of its budget and its losses up to k).

    Args:
        traces: ``attack/traces.npz``: ``model``, ``epoch``, ``row_id`` [R], ``lr``, ``loss``
            [R, max_iter].
        results: ``attack/results.csv`` rows of one model (give each trace its schedule and
            status).

    Returns:
        ``epoch, schedule, iteration`` (1-based), ``running`` (attacks), ``mean_lr_255``,
        ``mean_loss``.
    """
    epoch = _last_epoch(results, epoch)
    model = int(results["model"].iloc[0])
    keyed = results[usable(results)].set_index(["epoch", "row_id"])["schedule"]
    mask = (traces["epoch"] == epoch) & (traces["model"] == model)
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


def lr0_sensitivity(sweep: pd.DataFrame, *,
                    confidence: float = statistics.CONFIDENCE) -> pd.DataFrame:
    """Success rate, mean L1 (successful) and mean iterations per schedule at each swept lr0.

    Returns:
        ``model, epoch, lr0, lr0_255, schedule, images, attacks, successes, success_rate``
        (with its image-bootstrap interval ``success_rate_low, success_rate_high``),
        ``mean_l1_255`` (with its image-bootstrap interval ``mean_l1_255_low,
        mean_l1_255_high``), ``mean_iterations, skipped``.
    """
    keys = [*CHECKPOINT, "lr0", "schedule"]
    ok = usable(sweep)
    table = sweep.assign(_ok=ok, _skip=~ok, _hit=ok & sweep["success"].astype(bool),
                         _l1=sweep["l1"].where(ok & sweep["success"].astype(bool)),
                         _it=sweep["iterations"].where(ok))
    table = (table.groupby(keys, sort=False)
             .agg(attacks=("_ok", "sum"), successes=("_hit", "sum"), mean_l1=("_l1", "mean"),
                  mean_iterations=("_it", "mean"), skipped=("_skip", "sum"))
             .reset_index())
    table["success_rate"] = table["successes"] / table["attacks"].where(table["attacks"] > 0)
    table["mean_l1_255"] = table.pop("mean_l1") * 255
    table["lr0_255"] = table["lr0"] * 255
    hits = sweep[ok].assign(_hit=sweep["success"].astype(float))
    table = (table
             .merge(bootstrap_columns(hits, keys, "_hit", "success_rate", statistic="rate",
                                      confidence=confidence), on=keys, how="left")
             .merge(bootstrap_columns(successful(sweep), keys, "l1", "mean_l1_255", scale=255,
                                      confidence=confidence).drop(columns="images"),
                    on=keys, how="left"))
    table["images"] = table["images"].fillna(0).astype(np.int64)
    table = table[[*CHECKPOINT, "lr0", "lr0_255", "schedule", "images", "attacks", "successes",
                   "success_rate", "success_rate_low", "success_rate_high", "mean_l1_255",
                   "mean_l1_255_low", "mean_l1_255_high", "mean_iterations", "skipped"]]
    return ordered(table, schedule_order(sweep), ["model", "lr0", "schedule"])


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
    """Path L1 against refined L1 (overshoot removed) per model, epoch and schedule, with ranks.

    ``refined_l1`` is in the units of ``l1`` (mean ``|x_b - x|`` over all values, [0, 1]); the
    overshoot of an attack is ``l1 - refined_l1``. Means over successful attacks with a refined
    distance; rank 1 is the smallest mean.

    Returns:
        ``model, epoch, schedule, images, successes, mean_l1_255(_low, _high),
        mean_refined_l1_255(_low, _high), mean_overshoot_255(_low, _high) (95 % image
        bootstrap), mean_refine_forwards, rank_path, rank_refined`` (ranks within a model's
        checkpoint); None when the run has no refined distances.
    """
    if not refined_available(results):
        return None
    hits = successful(results)
    hits = hits[hits["refined_l1"].notna()].assign(overshoot=lambda t: t["l1"] - t["refined_l1"])
    keys = [*CHECKPOINT, "schedule"]
    table = (hits.groupby(keys, sort=False)
             .agg(successes=("l1", "size"), images=("image_id", "nunique"),
                  mean_l1_255=("l1", "mean"),
                  mean_refined_l1_255=("refined_l1", "mean"),
                  mean_overshoot_255=("overshoot", "mean"),
                  mean_refine_forwards=("refine_forwards", "mean"))
             .reset_index())
    for column, name in (("l1", "mean_l1_255"), ("refined_l1", "mean_refined_l1_255"),
                         ("overshoot", "mean_overshoot_255")):
        table[name] = table[name] * 255
        table = table.merge(bootstrap_columns(hits, keys, column, name, scale=255,
                                              confidence=confidence).drop(columns="images"),
                            on=keys, how="left")
    by_epoch = table.groupby(list(CHECKPOINT))
    table["rank_path"] = by_epoch["mean_l1_255"].rank(method="min").astype(np.int64)
    table["rank_refined"] = by_epoch["mean_refined_l1_255"].rank(method="min").astype(np.int64)
    return ordered(table, schedule_order(results), keys)


def ranking_changes(ranking: pd.DataFrame) -> pd.DataFrame:
    """Per model and epoch: the schedules from smallest to largest mean L1, along the path and
    refined.

    Returns:
        ``model, epoch, order_path, order_refined, changed`` (bool: the two orders differ).
    """
    rows = []
    for (model, epoch), part in ranking.groupby(list(CHECKPOINT), sort=True):
        path = part.sort_values(["rank_path", "schedule"])["schedule"].tolist()
        refined = part.sort_values(["rank_refined", "schedule"])["schedule"].tolist()
        rows.append((int(model), int(epoch), " < ".join(path), " < ".join(refined),
                     path != refined))
    return pd.DataFrame(rows, columns=[*CHECKPOINT, "order_path", "order_refined", "changed"])
