"""How minimal are the borderline images? Our distances against the best-known minimal ones.

The reference attacks of :mod:`lib.attack.reference` search the smallest perturbation of the
same (image, target) pairs our schedules attacked. The smallest successful distance of a pair
in a norm (Linf, L2 or L1) over every reference attack, and over our own schedules when the
caller passes them, is its *best-known* distance (:func:`best_per_sample`). Two measures
compare a schedule with it: the median ratio of its distance to the best-known one
(:func:`ratio_table`) and AttackBench's optimality score (:func:`eval_optimality`,
:func:`optimality_table`); :func:`lib.analysis.minimality_norms.norm_intervals` gives them with
the closeness and their image-bootstrap intervals, per norm.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Literal

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from lib.analysis.margins import attack_distances
from lib.attack.reference import DEFAULT_ATTACKS, run_reference_attacks
from lib.errors import ParameterError

#: The columns that identify a compared (image, target) pair of one model's checkpoint.
PAIR_KEYS = ("epoch", "image_id", "target")


def best_per_sample(
    reference: pd.DataFrame,
    own: pd.DataFrame | None = None,
    *,
    on: Sequence[str] | None = None,
    norm: str = "l1",
) -> pd.DataFrame:
    """The best-known distance of every pair in ``norm``: the smallest successful distance over
    every method.

    Args:
        reference: rows of :func:`~lib.attack.reference.run_reference_attacks` (key columns,
            attack, steps, success and the norms it measured; a table without ``norm`` adds no
            candidate).
        own: optional rows of our own attacks on the same pairs (key columns, schedule,
            success, the norm and optionally ``refined_<norm>``, which is used where present:
            :func:`lib.analysis.margins.attack_distances`), e.g. the attack stage's results for
            this epoch. A best-known reference should include every method, so pass them when
            you have them.
        on: key columns that identify a pair; default: the reference's columns before
            ``attack``.
        norm: ``"linf"``, ``"l2"`` or ``"l1"`` ([0, 1] pixel units; L1 the mean over values).

    Returns:
        One row per pair of ``reference``: key columns, ``best_<norm>`` (``inf`` when no method
        succeeded), ``best_method`` (``"fmn_l1@1000"``, ``"schedule:constant"``, or ``""``).
    """
    on = _key_columns(reference, on)
    column = f"best_{norm}"
    candidates = [reference.assign(
        method=reference["attack"] + "@" + reference["steps"].astype(str),
        distance=attack_distances(reference, norm))]
    if own is not None:
        missing = [c for c in (*on, "schedule", "success", norm) if c not in own.columns]
        if missing:
            raise ParameterError(
                f"best_per_sample: own results lack columns {missing}; expected the key columns "
                f"{list(on)} and schedule, success, {norm} (as in attack/results.csv)."
            )
        candidates.append(own.assign(method="schedule:" + own["schedule"].astype(str),
                                     distance=attack_distances(own, norm)))
    pairs = reference[list(on)].drop_duplicates().reset_index(drop=True)
    found = pd.concat([c[[*on, "method", "distance"]] for c in candidates], ignore_index=True)
    found = found[np.isfinite(found["distance"])]
    found = found.sort_values([*on, "distance", "method"], kind="stable").drop_duplicates(list(on))
    best = pairs.merge(found[[*on, "distance", "method"]], on=list(on), how="left")
    return best.rename(columns={"distance": column, "method": "best_method"}).fillna(
        {column: np.inf, "best_method": ""}
    )


def best_known_l1(
    model: nn.Module,
    images: Tensor,
    targets: Tensor,
    *,
    keys: pd.DataFrame | None = None,
    own: pd.DataFrame | None = None,
    steps: Sequence[int] = (1000,),
    attacks: Sequence[str] = DEFAULT_ATTACKS,
    device: str | torch.device = "cpu",
    batch_size: int = 64,
    seed: int = 0,
    progress: bool = True,
) -> pd.DataFrame:
    """Reference attacks on every pair, with each pair's best-known L1 on every row.

    Runs :func:`~lib.attack.reference.run_reference_attacks` (see there for the arguments) and
    adds the columns of :func:`best_per_sample`: ``best_l1`` and ``best_method`` (the same on
    every row of a pair), over the reference attacks and, when ``own`` is given, our own
    schedules' successful rows. Reduce to one row per pair with
    ``table.drop_duplicates(keys)`` or :func:`best_per_sample`.

    Returns:
        DataFrame, one row per (pair, attack, steps): key columns, attack, steps, success, l1,
        linf, changed_fraction, seconds, best_l1, best_method.
    """
    table = run_reference_attacks(
        model,
        images,
        targets,
        keys=keys,
        steps=steps,
        attacks=attacks,
        device=device,
        batch_size=batch_size,
        seed=seed,
        progress=progress,
    )
    on = _key_columns(table, None)
    return table.merge(best_per_sample(table, own, on=on), on=on, how="left")


def _key_columns(table: pd.DataFrame, on: Sequence[str] | None) -> list[str]:
    if on is not None:
        return list(on)
    if "attack" not in table.columns:
        raise ParameterError(
            "minimality: cannot infer the key columns (no 'attack' column); pass on=[...]."
        )
    return list(table.columns[: list(table.columns).index("attack")])


def _with_best(
    results: pd.DataFrame, best: pd.DataFrame, on: Sequence[str], by: Sequence[str], norm: str
) -> pd.DataFrame:
    """Our results joined to the best-known distance of their pair (pairs without a reference
    drop)."""
    column = f"best_{norm}"
    missing = [c for c in (*on, *by, "success", norm) if c not in results.columns]
    missing += [f"best.{c}" for c in (*on, column) if c not in best.columns]
    if missing:
        raise ParameterError(
            f"minimality: missing columns {missing}; results need {[*on, *by, 'success', norm]}"
            f" and best needs {[*on, column]}. Pass on=/by= to match your tables."
        )
    best = best[[*on, column]].drop_duplicates(list(on))
    return results.merge(best, on=list(on), how="inner")


def scored_pairs(results: pd.DataFrame, best: pd.DataFrame, *, on: Sequence[str],
                 by: Sequence[str], norm: str = "l1") -> pd.DataFrame:
    """Our results joined to the best-known distance of their pair, each with its scores.

    ``distance`` is the attack's distance in ``norm`` (refined where the table has it), or
    ``inf`` where it failed (it never flipped the class); ``best`` the pair's best-known
    distance; ``ratio`` is ``distance / best`` for a successful attack on a pair with a finite,
    positive best-known distance (NaN otherwise); ``closeness`` is ``best / distance`` in
    [0, 1] (0 for a failure, 1 for a pair whose best is 0 and which the attack flipped at 0).
    Pairs without a reference drop out.
    """
    joined = _with_best(results, best, on, by, norm)
    distance = attack_distances(joined, norm)
    reference = joined[f"best_{norm}"].to_numpy(float)
    usable = np.isfinite(distance) & np.isfinite(reference) & (reference > 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = np.where(usable, distance / reference, np.nan)
        near = np.where(distance > 0, reference / distance, 1.0)
    near = np.where(np.isfinite(distance), np.clip(near, 0.0, 1.0), 0.0)
    return joined.assign(ratio=ratio, distance=distance, best=reference, closeness=near)


def ratio_table(
    results: pd.DataFrame,
    best: pd.DataFrame,
    *,
    norm: str = "l1",
    on: Sequence[str] = ("epoch", "image_id", "target"),
    by: Sequence[str] = ("schedule", "epoch"),
) -> pd.DataFrame:
    """Per schedule and epoch: how many times larger our distance is than the best-known one.

    Only successful rows of pairs with a finite, positive best-known distance enter the ratio.

    Args:
        results: our attacks (columns ``on``, ``by``, success, the norm), e.g.
            attack/results.csv.
        best: best-known distance per pair (columns ``on``, ``best_<norm>``), e.g. from
            :func:`best_per_sample`.
        norm: ``"linf"``, ``"l2"`` or ``"l1"``.
        on: columns identifying a pair in both tables.
        by: grouping columns.

    Returns:
        One row per group: ``by`` columns, ``pairs`` (rows with a reference), ``successful``
        (rows in the ratio), ``median_ratio``, ``q25_ratio``, ``q75_ratio`` (NaN when no row).
    """
    joined = scored_pairs(results, best, on=on, by=by, norm=norm)
    grouped = joined.groupby(list(by), sort=True)["ratio"]
    return pd.DataFrame(
        {
            "pairs": grouped.size(),
            "successful": grouped.count(),
            "median_ratio": grouped.median(),
            "q25_ratio": grouped.quantile(0.25),
            "q75_ratio": grouped.quantile(0.75),
        }
    ).reset_index()


def robust_accuracy(distances: Iterable[float], sizes: Iterable[float]) -> np.ndarray:
    """Robust accuracy at each perturbation size: the share of samples with distance > size.

    A sample counts as broken at every size >= its distance; failed attacks have distance
    ``inf`` and are never broken; samples already adversarial have distance 0.
    """
    distances = np.asarray(list(distances), dtype=float)
    sizes = np.asarray(list(sizes), dtype=float)
    if distances.size == 0:
        return np.full(sizes.shape, np.nan)
    return (distances[None, :] > sizes[:, None]).mean(axis=1)


def eval_optimality(
    adv_distances: Iterable[float],
    best_distances: Iterable[float],
    *,
    integration: Literal["step", "trapezoid"] = "step",
) -> float:
    """AttackBench's optimality of an attack against the best-known distances, in [0, 1].

    AttackBench (Cinà et al. 2025, "AttackBench: Evaluating Gradient-based Attacks for
    Adversarial Examples", arXiv:2404.19460; code: github.com/attackbench/AttackBench,
    ``analysis/utils.py::eval_optimality``) compares the robust-accuracy-versus-perturbation
    curve rho_a of an attack with the curve rho_* of the best-known distances, over the window
    [0, eps*] where eps* is the largest best-known distance (the size at which rho_* reaches
    its floor). With clean accuracy rho_0 (share of best distances > 0) and A(rho) the area
    under a curve on that window::

        optimality = 1 - (A(rho_a) - A(rho_*)) / (rho_0 eps* - A(rho_*))

    the area between the attack's and the best curve, divided by the area between the clean
    accuracy line and the best curve. 1 means the attack matches the best known distances on
    every sample, 0 that it breaks nothing within the window.

    Args:
        adv_distances: per-sample distances of the attack ([n]; ``inf`` where it failed).
        best_distances: best-known distances of the same samples, in the same order.
        integration: ``"step"`` (default) integrates the step-shaped curves exactly; the area
            under rho on [0, eps*] is then mean(min(d_i, eps*)). ``"trapezoid"`` reproduces
            AttackBench's code, which joins the curve's values at the distinct distances with
            straight lines from the smallest distance on (numpy's trapezoid rule); it agrees
            with "step" for many samples but, on few, can leave [0, 1].

    Returns:
        The score, or NaN when it is undefined (no samples, no finite best distance, or a best
        curve with no area above it, e.g. all best distances equal).
    """
    adv = np.asarray(list(adv_distances), dtype=float)
    ref = np.asarray(list(best_distances), dtype=float)
    if adv.shape != ref.shape:
        raise ParameterError(
            f"eval_optimality: adv_distances and best_distances must pair up; got {adv.shape}"
            f" and {ref.shape}."
        )
    finite = ref[np.isfinite(ref)]
    if adv.size == 0 or finite.size == 0:
        return float("nan")
    window = finite.max()
    clean_accuracy = np.count_nonzero(ref) / ref.size
    if integration == "step":
        area_adv = np.minimum(adv, window).mean()
        area_best = np.minimum(ref, window).mean()
    elif integration == "trapezoid":
        area_adv = _trapezoid_area(np.minimum(adv, window))
        area_best = _trapezoid_area(np.minimum(ref, window))
    else:
        raise ParameterError(
            f"eval_optimality: integration must be 'step' or 'trapezoid'; got {integration!r}."
        )
    room = clean_accuracy * window - area_best
    if room <= 0:
        return float("nan")
    return float(1 - (area_adv - area_best) / room)


def _trapezoid_area(distances: np.ndarray) -> float:
    """Area under the robust-accuracy points (distinct distance, share above it), trapezoids."""
    sizes, counts = np.unique(distances, return_counts=True)
    accuracy = 1 - np.cumsum(counts) / distances.size
    return float(np.trapezoid(accuracy, sizes))


def optimality_table(
    results: pd.DataFrame,
    best: pd.DataFrame,
    *,
    norm: str = "l1",
    on: Sequence[str] = ("epoch", "image_id", "target"),
    by: Sequence[str] = ("schedule", "epoch"),
    integration: Literal["step", "trapezoid"] = "step",
) -> pd.DataFrame:
    """Per schedule and epoch: AttackBench's optimality score against the best-known distance.

    A failed attack counts as distance ``inf``. The best-known distance should include our own
    schedules (``own=`` in :func:`best_per_sample`); otherwise a schedule that beats every
    reference attack can score above 1.

    Returns:
        One row per group: ``by`` columns, ``pairs`` (rows with a reference),
        ``success_rate``, ``optimality`` (see :func:`eval_optimality`).
    """
    joined = scored_pairs(results, best, on=on, by=by, norm=norm)
    rows = []
    for group, part in joined.groupby(list(by), sort=True):
        rows.append(
            {
                **dict(zip(by, group, strict=True)),
                "pairs": len(part),
                "success_rate": part["success"].astype(bool).mean(),
                "optimality": eval_optimality(
                    part["distance"], part["best"], integration=integration
                ),
            }
        )
    return pd.DataFrame(rows, columns=[*by, "pairs", "success_rate", "optimality"])
