"""Aggregates of the attack results: the tables behind the analysis figures and the claims.

Everything here is computed from the attack stage's files alone (``attack/results.csv``,
``traces.npz``, ``lr0_sweep.csv``) plus, for the claim about clean accuracy, the training
stage's ``train/metrics.csv``; nothing attacks or loads a model.

Units: distances are reported in 1/255 pixel units (columns ending ``_255``: 1.0 means one
grey level on average over all C*H*W values), step sizes likewise; success rates in [0, 1].

Attacks whose ``status`` is not ``"ok"`` (e.g. ``"nonfinite"``: the model's output stopped
being finite) or whose distances are not finite are *skipped*: they enter no mean and no rate,
and :func:`skipped_counts` (and the ``skipped`` columns) say how many there were.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from lib import NUM_CLASSES, TOOLS, io
from lib.errors import RunFolderError

#: Claims of Ding & Moeller (2023) on the schedules, as METHOD.md lists them.
PAPER_MEAN_ITERATIONS = {"step": 50, "exponential": 83}
#: "Changes little across epochs": the largest change we still call little (5 percentage points).
STABLE_WITHIN = 0.05

AGREES, DISAGREES, NOT_TESTABLE = "agrees", "disagrees", "not testable"


# --------------------------------------------------------------------------- reading


def _attack_file(run_dir: str | os.PathLike[str], name: str) -> Path:
    path = Path(run_dir) / "attack" / name
    if not path.is_file():
        raise RunFolderError(
            f"{path} is missing: the run folder has no attack results; run the attack stage "
            "(03_attack) first"
        )
    return path


def read_results(run_dir: str | os.PathLike[str]) -> pd.DataFrame:
    """``attack/results.csv`` (one row per attack); RunFolderError naming 03_attack if absent."""
    return pd.read_csv(_attack_file(run_dir, "results.csv"), dtype={"image_id": str},
                       keep_default_na=False, na_values=[""])


def read_sweep(run_dir: str | os.PathLike[str]) -> pd.DataFrame | None:
    """``attack/lr0_sweep.csv``, or None when the stage ran without a sweep."""
    path = Path(run_dir) / "attack" / "lr0_sweep.csv"
    if not path.is_file():
        return None
    return pd.read_csv(path, dtype={"image_id": str}, keep_default_na=False, na_values=[""])


def read_npz(run_dir: str | os.PathLike[str], name: str) -> dict[str, np.ndarray] | None:
    """The arrays of ``attack/<name>`` (``traces.npz``, ``gallery.npz``), or None if absent."""
    path = Path(run_dir) / "attack" / name
    if not path.is_file():
        return None
    return io.read_npz(path)


def read_training_metrics(run_dir: str | os.PathLike[str]) -> pd.DataFrame:
    """``train/metrics.csv``; RunFolderError naming 02_train if absent."""
    path = Path(run_dir) / "train" / "metrics.csv"
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


# --------------------------------------------------------------------------- aggregates


def success_rates(results: pd.DataFrame) -> pd.DataFrame:
    """Figure 2: the share of attacks that reached their target within ``max_iter``.

    Returns:
        ``epoch, schedule, attacks, successes, success_rate, skipped``; ``attacks`` counts the
        usable attacks, ``success_rate = successes / attacks`` (NaN when none is usable).
    """
    ok = usable(results)
    table = (
        results.assign(_ok=ok, _hit=ok & results["success"].astype(bool), _skip=~ok)
        .groupby(["epoch", "schedule"], sort=False)
        .agg(attacks=("_ok", "sum"), successes=("_hit", "sum"), skipped=("_skip", "sum"))
        .reset_index()
    )
    table["success_rate"] = table["successes"] / table["attacks"].where(table["attacks"] > 0)
    table = table[["epoch", "schedule", "attacks", "successes", "success_rate", "skipped"]]
    return _ordered(table, schedule_order(results), ["epoch", "schedule"])


def mean_l1(results: pd.DataFrame) -> pd.DataFrame:
    """Figure 3: mean L1 of the *successful* attacks per epoch and schedule.

    Returns:
        ``epoch, schedule, successes, mean_l1`` ([0, 1] units), ``mean_l1_255``, ``sd_l1_255``
        and ``sem_l1_255`` (standard error of the mean; NaN for fewer than two attacks).
    """
    hits = results[usable(results) & results["success"].astype(bool)]
    grouped = hits.groupby(["epoch", "schedule"], sort=False)["l1"]
    table = grouped.agg(successes="size", mean_l1="mean", sd="std").reset_index()
    table["mean_l1_255"] = table["mean_l1"] * 255
    table["sd_l1_255"] = table["sd"] * 255
    table["sem_l1_255"] = table["sd_l1_255"] / np.sqrt(table["successes"])
    table = table.drop(columns="sd")
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
        ``epoch, schedule, attacks, mean_iterations, mean_lr, mean_lr_255, success_rate``.
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
    table = table[["epoch", "schedule", "attacks", "mean_iterations", "mean_lr", "mean_lr_255",
                   "success_rate"]]
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
        ``epoch, lr0, lr0_255, schedule, attacks, success_rate, mean_l1_255, mean_iterations,
        skipped``.
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
    table = table[["epoch", "lr0", "lr0_255", "schedule", "attacks", "success_rate",
                   "mean_l1_255", "mean_iterations", "skipped"]]
    return _ordered(table, schedule_order(sweep), ["lr0", "schedule"])


# --------------------------------------------------------------------------- claims


def _percent(value: float) -> str:
    return f"{100 * value:.1f} %"


def paper_claims(results: pd.DataFrame, training_metrics: pd.DataFrame | None = None, *,
                 stable_within: float = STABLE_WITHIN) -> pd.DataFrame:
    """The paper's claims (METHOD.md's list) checked against our results.

    Args:
        results: ``attack/results.csv``.
        training_metrics: ``train/metrics.csv`` (epoch, accuracy, ...), for the claim on clean
            accuracy; None leaves that claim not testable.
        stable_within: the largest change across epochs (max - min) still called "little".

    Returns:
        ``claim, paper, ours, verdict``; verdict is ``"agrees"``, ``"disagrees"`` or
        ``"not testable"`` (a schedule that was not run, or a single epoch for a claim about
        epochs).
    """
    rates = success_rates(results)
    l1 = mean_l1(results)
    epochs = sorted(rates["epoch"].unique().tolist())
    last = epochs[-1] if epochs else None
    rate = {(r.epoch, r.schedule): r.success_rate for r in rates.itertuples()}
    dist = {(r.epoch, r.schedule): r.mean_l1_255 for r in l1.itertuples()}
    ran = schedule_order(rates)  # a list, not a set: ties go to the first schedule run
    claims: list[tuple[str, str, str, str]] = []

    def missing(*names: str) -> str | None:
        absent = [n for n in names if n not in ran]
        return f"schedule(s) {', '.join(absent)} not run" if absent else None

    for name in ("constant", "iteration", "loss-adaptive"):
        claim = f"{name} reaches 100 % success within max_iter"
        if note := missing(name):
            claims.append((claim, "Fig. 2: 100 % at every epoch", note, NOT_TESTABLE))
            continue
        values = [rate[(e, name)] for e in epochs]
        low = int(np.nanargmin(values))
        ours = f"lowest {_percent(values[low])} (epoch {epochs[low]}) over {len(epochs)} epoch(s)"
        claims.append((claim, "Fig. 2: 100 % at every epoch", ours,
                       AGREES if min(values) == 1.0 else DISAGREES))
    for name in ("step", "exponential"):
        claim = f"{name} falls short of 100 % success"
        if note := missing(name):
            claims.append((claim, "Fig. 2: below 100 %", note, NOT_TESTABLE))
            continue
        subset = rates[rates["schedule"] == name]
        overall = subset["successes"].sum() / max(subset["attacks"].sum(), 1)
        ours = (f"{_percent(overall)} overall; per epoch {_percent(subset['success_rate'].min())}"
                f" to {_percent(subset['success_rate'].max())}")
        claims.append((claim, "Fig. 2: below 100 %", ours, AGREES if overall < 1 else DISAGREES))

    claim = "constant gives the largest mean L1 (successful attacks)"
    if note := missing("constant"):
        claims.append((claim, "Fig. 3", note, NOT_TESTABLE))
    else:
        largest = [max((n for n in ran if np.isfinite(dist.get((e, n), np.nan))),
                       key=lambda n: dist[(e, n)], default=None) for e in epochs]
        wins = sum(w == "constant" for w in largest)
        ranking = sorted((n for n in ran if np.isfinite(dist.get((last, n), np.nan))),
                         key=lambda n: -dist[(last, n)])
        ours = (f"largest at {wins} of {len(epochs)} epoch(s); epoch {last}: "
                + ", ".join(f"{n} {dist[(last, n)]:.3g}" for n in ranking) + " (x 1/255)")
        claims.append((claim, "Fig. 3", ours, AGREES if wins == len(epochs) else DISAGREES))

    for name in ("step", "exponential", "loss-adaptive"):
        claim = f"{name} gives a smaller mean L1 than constant and iteration"
        if note := missing(name, "constant", "iteration"):
            claims.append((claim, "Fig. 3", note, NOT_TESTABLE))
            continue
        smaller = [dist[(e, name)] < min(dist[(e, "constant")], dist[(e, "iteration")])
                   for e in epochs]
        ours = (f"smaller at {sum(smaller)} of {len(epochs)} epoch(s); epoch {last}: "
                f"{dist[(last, name)]:.3g} vs {dist[(last, 'constant')]:.3g} and "
                f"{dist[(last, 'iteration')]:.3g} (x 1/255)")
        claims.append((claim, "Fig. 3", ours, AGREES if all(smaller) else DISAGREES))

    claim = "step and exponential need the most iterations (last epoch)"
    paper = "Fig. 4: mean 50 (step) and 83 (exponential) at epoch 10"
    if note := missing("step", "exponential"):
        claims.append((claim, paper, note, NOT_TESTABLE))
    else:
        effort = iterations_and_lr(results, epoch=last).set_index("schedule")["mean_iterations"]
        top_two = set(effort.sort_values(ascending=False, kind="stable").index[:2])
        ours = f"epoch {last}: " + ", ".join(f"{n} {v:.1f}" for n, v in effort.items())
        claims.append((claim, paper, ours,
                       AGREES if top_two == {"step", "exponential"} else DISAGREES))

    claim = "success rate changes little across epochs"
    paper = f"Fig. 2: about the same at every epoch (we call <= {_percent(stable_within)} little)"
    if len(epochs) < 2:
        claims.append((claim, paper, "one epoch attacked", NOT_TESTABLE))
    else:
        by_schedule = rates.groupby("schedule", sort=False)["success_rate"]
        spread = by_schedule.max() - by_schedule.min()
        worst = spread.idxmax()
        ours = f"largest change {100 * spread[worst]:.1f} points ({worst})"
        claims.append((claim, paper, ours,
                       AGREES if spread.max() <= stable_within else DISAGREES))

    claim = "clean accuracy changes little across epochs"
    paper = f"Fig. 1: similar at every epoch (we call <= {_percent(stable_within)} little)"
    if training_metrics is None or len(training_metrics) < 2:
        claims.append((claim, paper, "fewer than two trained epochs", NOT_TESTABLE))
    else:
        accuracy = training_metrics.set_index("epoch")["accuracy"]
        change = accuracy.max() - accuracy.min()
        ours = (f"{accuracy.min():.3f} (epoch {accuracy.idxmin()}) to {accuracy.max():.3f} "
                f"(epoch {accuracy.idxmax()}) over epochs {accuracy.index.min()}-"
                f"{accuracy.index.max()}")
        claims.append((claim, paper, ours, AGREES if change <= stable_within else DISAGREES))
    return pd.DataFrame(claims, columns=["claim", "paper", "ours", "verdict"])
