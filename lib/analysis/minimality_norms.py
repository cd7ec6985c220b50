"""Minimality per norm: each schedule against the best-known distance in Linf, L2 and L1, with
image-bootstrap intervals, a score no single pair sets, and the verdict.

The measures of one (schedule, checkpoint, norm) over the pairs the reference attacks ran on
(:func:`lib.analysis.minimality.scored_pairs` defines them per pair):

- the **median ratio** of the schedule's distance to the best-known distance over its
  successful pairs (1: as small as the best known);
- the **closeness**, the mean over *all* pairs of best-known / own distance in [0, 1], a
  failure counting 0. Every pair weighs 1/n, so no single pair sets it, and a schedule that
  fails often cannot look close by being measured on its easy pairs only;
- AttackBench's **optimality** score (:func:`lib.analysis.minimality.eval_optimality`). Its
  window ends at the largest best-known distance, which one pair sets; on a few dozen pairs
  that pair can move the score from near 0 to near 1. ``optimality_robust`` says whether the
  score moves by at most :data:`WINDOW_TOLERANCE` when that pair is left out; the book reports
  the score only where it does.

Every interval resamples images (all pairs of an image move together,
:mod:`lib.analysis.resampling`). Sign steps are Linf steps, so Linf is the norm in which the
schedules can come close to minimal and comes first; L1, the paper's norm, favours sparse
perturbations that no sign step makes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from lib.analysis import resampling, statistics
from lib.analysis.margins import NORMS
from lib.analysis.minimality import PAIR_KEYS, best_per_sample, eval_optimality, scored_pairs
from lib.errors import ParameterError

#: The largest change of the optimality score, when the pair that sets its window is left out,
#: for which the score is reported.
WINDOW_TOLERANCE = 0.05

#: The columns of the per-norm table (``minimality/ratios.csv``).
NORM_COLUMNS = ("schedule", "epoch", "norm", "pairs", "successful", "n_images", "median_ratio",
                "median_ratio_low", "median_ratio_high", "q25_ratio", "q75_ratio", "closeness",
                "closeness_low", "closeness_high", "optimality", "optimality_low",
                "optimality_high", "optimality_robust")


def weighted_optimality(adv: np.ndarray, best: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """The step-integrated optimality score of rows drawn with ``weights``.

    Args:
        adv, best: float [n]: the attack's and the best-known distance per pair (``inf`` where
            none succeeded).
        weights: float [R, n] >= 0: how often each pair is drawn in each of R resamples.

    Returns:
        float [R]: :func:`lib.analysis.minimality.eval_optimality` ("step") of every draw; NaN
        where it is undefined (no finite best distance drawn, or no room above the best curve).
    """
    adv, best = np.asarray(adv, float), np.asarray(best, float)
    weights = np.asarray(weights, float).reshape(-1, best.size)
    drawn = weights > 0
    window = np.where(drawn & np.isfinite(best)[None, :], best[None, :], -np.inf).max(axis=1)
    total = weights.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        clean = (weights * (best > 0)[None, :]).sum(axis=1) / total
        area_adv = (weights * np.minimum(adv[None, :], window[:, None])).sum(axis=1) / total
        area_best = (weights * np.minimum(best[None, :], window[:, None])).sum(axis=1) / total
        room = clean * window - area_best
        score = 1 - (area_adv - area_best) / room
    return np.where(np.isfinite(window) & (room > 0), score, np.nan)


def window_robust(adv: np.ndarray, best: np.ndarray, *,
                  tolerance: float = WINDOW_TOLERANCE) -> bool:
    """Whether the optimality score moves by at most ``tolerance`` when the pair with the
    largest finite best-known distance (the one that sets the window) is left out; False when
    either score is undefined."""
    adv, best = np.asarray(adv, float), np.asarray(best, float)
    finite = np.flatnonzero(np.isfinite(best))
    if finite.size < 2:
        return False
    keep = np.ones(best.size, dtype=bool)
    keep[finite[np.argmax(best[finite])]] = False
    whole = eval_optimality(adv, best)
    without = eval_optimality(adv[keep], best[keep])
    return bool(np.isfinite(whole) and np.isfinite(without) and abs(whole - without) <= tolerance)


def _optimality_interval(part: pd.DataFrame, clusters: resampling.Clusters, *,
                         confidence: float, resamples: int, seed: int) -> tuple[float, float]:
    if clusters.n_clusters < 2:
        return np.nan, np.nan
    counts = resampling.resample_counts(clusters, resamples=resamples, seed=seed)
    weights = counts[:, clusters.row_cluster]
    replicates = weighted_optimality(part["distance"].to_numpy(), part["best"].to_numpy(),
                                     weights)
    low, high = resampling.percentile_bounds(replicates, confidence=confidence)
    return float(low[0]), float(high[0])


def norm_intervals(results: pd.DataFrame, best: pd.DataFrame, *, norm: str,
                   confidence: float = statistics.CONFIDENCE,
                   resamples: int = resampling.RESAMPLES, seed: int = resampling.SEED,
                   tolerance: float = WINDOW_TOLERANCE) -> pd.DataFrame:
    """Per schedule and epoch: median ratio, closeness and optimality in ``norm``, each with
    its image-bootstrap interval (see the module docstring).

    Args:
        results: our attacks on the compared checkpoints (attack/results.csv rows).
        best: :func:`lib.analysis.minimality.best_per_sample` in ``norm`` (``epoch, image_id,
            target, best_<norm>``).
        norm: ``"linf"``, ``"l2"`` or ``"l1"``.

    Returns:
        :data:`NORM_COLUMNS`; ratios are >= 1 where our schedules enter the best known,
        closeness and optimality in [0, 1].
    """
    joined = scored_pairs(results, best, on=PAIR_KEYS, by=("schedule", "epoch"), norm=norm)
    options = {"confidence": confidence, "resamples": resamples, "seed": seed}
    rows = []
    for (name, epoch), part in joined.groupby(["schedule", "epoch"], sort=False):
        part = part.reset_index(drop=True)
        clusters = resampling.clusters_of(part, cluster="image_id")
        median = resampling.bootstrap_rows(part["ratio"].to_numpy(float), clusters,
                                           statistic="median", **options)
        near = resampling.bootstrap_rows(part["closeness"].to_numpy(float), clusters, **options)
        low, high = _optimality_interval(part, clusters, **options)
        rows.append({
            "schedule": name, "epoch": int(epoch), "norm": norm, "pairs": len(part),
            "successful": int(part["ratio"].notna().sum()), "n_images": clusters.n_clusters,
            "median_ratio": median.estimate, "median_ratio_low": median.low,
            "median_ratio_high": median.high, "q25_ratio": part["ratio"].quantile(0.25),
            "q75_ratio": part["ratio"].quantile(0.75), "closeness": near.estimate,
            "closeness_low": near.low, "closeness_high": near.high,
            "optimality": eval_optimality(part["distance"], part["best"]),
            "optimality_low": low, "optimality_high": high,
            "optimality_robust": window_robust(part["distance"].to_numpy(),
                                               part["best"].to_numpy(), tolerance=tolerance)})
    return pd.DataFrame(rows, columns=list(NORM_COLUMNS))


def measured_norms(reference: pd.DataFrame) -> list[str]:
    """The norms of :data:`lib.analysis.margins.NORMS` that ``reference`` measured (a column
    with at least one value), Linf first."""
    return [n for n in NORMS if n in reference.columns and reference[n].notna().any()]


def minimality_by_norm(results: pd.DataFrame, reference: pd.DataFrame, *,
                       norms: Sequence[str] | None = None, **options: float) -> pd.DataFrame:
    """:func:`norm_intervals` in every norm the reference measured, our schedules included in
    the best known (so every ratio is >= 1 and every closeness <= 1).

    Args:
        results: our attacks on the compared checkpoints.
        reference: the minimality stage's ``reference.csv``.
        norms: the norms to compare; default :func:`measured_norms`.
        options: ``confidence``, ``resamples``, ``seed``, ``tolerance`` of
            :func:`norm_intervals`.

    Returns:
        :data:`NORM_COLUMNS`, the norms in the order of :data:`lib.analysis.margins.NORMS`.
    """
    chosen = measured_norms(reference) if norms is None else list(norms)
    unknown = [n for n in chosen if n not in NORMS]
    if unknown:
        raise ParameterError(f"norms must be among {NORMS}, got {unknown}")
    parts = [norm_intervals(results, best_per_sample(reference, results, on=PAIR_KEYS,
                                                     norm=norm), norm=norm, **options)
             for norm in chosen]
    if not parts:
        return pd.DataFrame(columns=list(NORM_COLUMNS))
    return pd.concat(parts, ignore_index=True)


def closeness_verdict(intervals: pd.DataFrame, schedule: str, *, epoch: int,
                      norm: str | None = None) -> dict[str, str]:
    """Whether ``schedule``'s borderline images are the closest to minimal at ``epoch`` (in
    ``norm`` where the table has several), in words, read off the 95 % intervals of the median
    ratio by :func:`lib.analysis.statistics.verdict_smallest`.

    Returns:
        ``ratio``: the schedule's median ratio with its interval (``"not measured"`` when the
        schedule did not run); ``verdict``: closer to minimal than every other schedule,
        further than the schedules named, or not distinguishable (the intervals overlap);
        ``outcome``: ``agrees``, ``disagrees`` or ``inconclusive`` (the verdict on "closest").
    """
    ranked = intervals[intervals["epoch"] == epoch]
    if norm is not None and "norm" in ranked.columns:
        ranked = ranked[ranked["norm"] == norm]
    ranked = ranked.set_index("schedule")
    if schedule not in ranked.index:
        return {"ratio": "not measured", "verdict": "not part of this run",
                "outcome": statistics.INCONCLUSIVE}
    estimates = {name: statistics.Interval(row["median_ratio"], row["median_ratio_low"],
                                           row["median_ratio_high"], int(row["successful"]))
                 for name, row in ranked.iterrows()}
    own = estimates.pop(schedule)
    verdict, smaller = statistics.verdict_smallest(own, estimates)
    if verdict == statistics.AGREES:
        words = "closer to minimal than every other schedule (the 95 % intervals do not overlap)"
    elif verdict == statistics.DISAGREES:
        words = (f"further from minimal than {', '.join(smaller)} (the 95 % intervals do not "
                 "overlap)")
    else:
        words = ("not distinguishable from the closest schedule on these pairs: the 95 % "
                 "intervals overlap, so the ranking is inconclusive")
    return {"ratio": f"{own.estimate:.1f} [{own.low:.1f}, {own.high:.1f}]", "verdict": words,
            "outcome": verdict}
