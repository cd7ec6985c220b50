"""How minimal are the borderline images? A best-known reference from minimum-norm attacks.

For the same (image, target) pairs that the attack stage attacked, state-of-the-art targeted
minimum-norm attacks from adv-lib (Rony et al., https://github.com/jeromerony/adversarial-library)
search for the smallest perturbation that makes the model predict the target:

- ``fmn_l1`` / ``fmn_linf``: Fast Minimum-Norm (Pintor et al. 2021, arXiv:2102.12827), L1 and
  Linf (Linf is the geometry of the sign steps our schedules take);
- ``alma_l1``: Augmented Lagrangian Method for Adversarial attacks (Rony et al. 2021,
  arXiv:2011.11857) with the L1 distance;
- ``pdpgd_l1``: Primal-Dual Proximal Gradient Descent (Matyasko and Chau 2021,
  arXiv:2106.01538) with the L1 proximal operator.

Every returned image is classified again here, so "success" means what it means for our own
attacks (argmax == target), and its L1 is ours: mean ``|x* - x|`` over the C*H*W values, in [0, 1].
The smallest successful L1 of a sample over every reference attack, and over our own schedules
when the caller passes them, is its *best-known* L1. Two measures compare a schedule with it:
the median ratio of L1 to the best-known L1 (:func:`l1_ratio_table`) and AttackBench's
optimality score (:func:`eval_optimality`, :func:`optimality_table`).

Adding a reference attack is one small function ``fn(model, images, targets, *, steps) ->
adversarial images`` plus an entry in :data:`REFERENCE_ATTACKS`.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from lib import io, stages
from lib.errors import ParameterError
from lib.model import frozen
from lib.progress import progress_bar

#: A reference attack: (model, images [B,C,H,W] in [0,1], targets [B], *, steps) -> images.
ReferenceAttack = Callable[..., Tensor]

#: Default key of one attacked pair when the caller gives none: its index in ``images``.
SAMPLE = "sample"

#: A perturbation value counts as changed above half a grey level (it survives uint8 storage).
CHANGED_THRESHOLD = 0.5 / 255


def _adv_lib_attacks():
    """Import adv-lib's attack module (lazily: the tables below do not need it).

    adv-lib 0.2.8 compares torch versions with ``distutils.version.LooseVersion`` at import,
    which warns on every import; the warning is about adv-lib, not about anything we can fix.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="distutils Version classes are deprecated")
        warnings.filterwarnings("ignore", category=DeprecationWarning, module="distutils")
        from adv_lib import attacks
    return attacks


def fmn_l1(model: nn.Module, images: Tensor, targets: Tensor, *, steps: int) -> Tensor:
    """Targeted FMN minimising the L1 norm (adv-lib defaults otherwise)."""
    return _adv_lib_attacks().fmn(model, images, targets, norm=1, targeted=True, steps=steps)


def fmn_linf(model: nn.Module, images: Tensor, targets: Tensor, *, steps: int) -> Tensor:
    """Targeted FMN minimising the Linf norm (the geometry of sign-gradient steps)."""
    return _adv_lib_attacks().fmn(
        model, images, targets, norm=float("inf"), targeted=True, steps=steps
    )


def alma_l1(model: nn.Module, images: Tensor, targets: Tensor, *, steps: int) -> Tensor:
    """Targeted ALMA with the L1 distance (adv-lib defaults otherwise).

    adv-lib's targeted ALMA normalises its loss by the four largest logits, so the model needs
    at least four classes.
    """
    return _adv_lib_attacks().alma(
        model, images, targets, targeted=True, num_steps=steps, distance="l1"
    )


def pdpgd_l1(model: nn.Module, images: Tensor, targets: Tensor, *, steps: int) -> Tensor:
    """Targeted PDPGD with the L1 norm and its proximal operator (adv-lib defaults otherwise)."""
    return _adv_lib_attacks().pdpgd(model, images, targets, norm=1, targeted=True, num_steps=steps)


#: Reference minimum-norm attacks by name.
REFERENCE_ATTACKS: dict[str, ReferenceAttack] = {
    "fmn_l1": fmn_l1,
    "alma_l1": alma_l1,
    "pdpgd_l1": pdpgd_l1,
    "fmn_linf": fmn_linf,
}

DEFAULT_ATTACKS: tuple[str, ...] = tuple(REFERENCE_ATTACKS)


def perturbation_sizes(original: Tensor, perturbed: Tensor) -> dict[str, Tensor]:
    """Sizes of ``perturbed - original`` per sample ([N,C,H,W] -> [N] each), in [0, 1] units.

    ``l1`` is the project's L1, mean ``|x* - x|`` over the C*H*W values; ``linf`` the largest
    absolute change; ``changed_fraction`` the share of values changed by more than half a grey
    level (how sparse the perturbation is).
    """
    delta = (perturbed - original).flatten(1).abs()
    return {
        "l1": delta.mean(dim=1),
        "linf": delta.amax(dim=1),
        "changed_fraction": (delta > CHANGED_THRESHOLD).float().mean(dim=1),
    }


def _check_inputs(
    images: Tensor,
    targets: Tensor,
    keys: pd.DataFrame | None,
    attacks: Sequence[str],
    steps: Sequence[int],
    batch_size: int,
) -> pd.DataFrame:
    if images.ndim != 4 or not images.is_floating_point():
        raise ParameterError(
            f"best_known_l1: images must be a float tensor [N, C, H, W]; got dtype {images.dtype}"
            f" and shape {tuple(images.shape)}. Convert uint8 frames with .float() / 255."
        )
    if images.numel() and (images.min() < 0 or images.max() > 1):
        raise ParameterError(
            f"best_known_l1: images must lie in [0, 1]; got values in "
            f"[{images.min().item():.3g}, {images.max().item():.3g}]. Pass pixel-space images; "
            "the model normalises them itself."
        )
    if targets.shape != (len(images),):
        raise ParameterError(
            f"best_known_l1: targets must have shape [{len(images)}] (one per image); got "
            f"{tuple(targets.shape)}."
        )
    unknown = [name for name in attacks if name not in REFERENCE_ATTACKS]
    if unknown:
        raise ParameterError(
            f"best_known_l1: unknown attack(s) {unknown}; expected names from "
            f"{sorted(REFERENCE_ATTACKS)}. Register a new one in REFERENCE_ATTACKS."
        )
    if not steps or any(int(s) < 2 for s in steps):
        raise ParameterError(
            f"best_known_l1: steps must be a non-empty list of budgets >= 2; got {list(steps)}."
        )
    if batch_size < 1:
        raise ParameterError(f"best_known_l1: batch_size must be >= 1; got {batch_size}.")
    if keys is None:
        return pd.DataFrame({SAMPLE: np.arange(len(images))})
    if len(keys) != len(images):
        raise ParameterError(
            f"best_known_l1: keys must have one row per image ({len(images)}); got {len(keys)}."
        )
    if keys.duplicated().any():
        raise ParameterError(
            "best_known_l1: keys must identify each attacked pair uniquely; rows "
            f"{np.flatnonzero(keys.duplicated()).tolist()[:5]} repeat an earlier row."
        )
    return keys.reset_index(drop=True)


def run_reference_attacks(
    model: nn.Module,
    images: Tensor,
    targets: Tensor,
    *,
    keys: pd.DataFrame | None = None,
    steps: Sequence[int] = (1000,),
    attacks: Sequence[str] = DEFAULT_ATTACKS,
    device: str | torch.device = "cpu",
    batch_size: int = 64,
    seed: int = 0,
    progress: bool = True,
) -> pd.DataFrame:
    """Run every reference attack at every step budget; one row per (sample, attack, steps).

    Args:
        model: classifier taking images in [0, 1] and returning logits [B, K].
        images: float [N, C, H, W] in [0, 1], the clean images.
        targets: int64 [N], the target class of each pair.
        keys: optional [N]-row table identifying each pair (e.g. epoch, image_id, target);
            copied into the result. Default: a ``sample`` column 0..N-1.
        steps: step budgets; each attack runs once per budget.
        attacks: names from :data:`REFERENCE_ATTACKS`.
        device: where the attacks run (the model is moved there).
        batch_size: images per attack call.
        seed: torch is seeded with it before every (attack, steps) run; the caller's RNG state
            is restored afterwards.
        progress: show a progress bar (:mod:`lib.progress`).

    Returns:
        DataFrame: key columns, ``attack``, ``steps``, ``success`` (the returned image is
        classified as the target, checked here), ``l1``, ``linf``, ``changed_fraction`` (of
        the returned image, successful or not), ``seconds`` (attack time per sample).
    """
    keys = _check_inputs(images, targets, keys, attacks, steps, batch_size)
    device = torch.device(device)
    model = model.to(device)
    runs = [(name, int(budget)) for name in attacks for budget in steps]
    starts = range(0, len(images), batch_size)
    rows: list[pd.DataFrame] = []
    bar = progress_bar(len(runs) * len(starts), desc="reference attacks", unit="batch",
                       enabled=progress)
    fork_devices = []
    if device.type == "cuda":
        fork_devices = [device.index if device.index is not None else torch.cuda.current_device()]
    with frozen(model), torch.random.fork_rng(devices=fork_devices):
        for name, budget in runs:
            torch.manual_seed(seed)
            for start in starts:
                clean = images[start : start + batch_size].to(device)
                wanted = targets[start : start + batch_size].to(device)
                began = time.perf_counter()
                perturbed = REFERENCE_ATTACKS[name](model, clean, wanted, steps=budget).detach()
                seconds = time.perf_counter() - began
                with torch.no_grad():
                    success = model(perturbed).argmax(dim=1) == wanted
                sizes = perturbation_sizes(clean, perturbed)
                chunk = (
                    keys.iloc[start : start + batch_size]
                    .reset_index(drop=True)
                    .assign(
                        attack=name,
                        steps=budget,
                        success=success.cpu().numpy(),
                        **{k: v.double().cpu().numpy() for k, v in sizes.items()},
                        seconds=seconds / len(clean),
                    )
                )
                rows.append(chunk)
                bar.update()
    bar.close()
    return pd.concat(rows, ignore_index=True)


@dataclass(frozen=True)
class ReferenceTables:
    """What the minimality stage compares: the checkpoints, our attacks, the references."""

    #: the attacked checkpoints compared (the ``epochs`` asked, or the last attacked one)
    epochs: list[int]
    #: the attack stage's targeted results on those checkpoints (results.csv rows)
    ours: pd.DataFrame
    #: one row per (pair, reference attack, budget), as :func:`run_reference_attacks`
    #: returns it without ``seconds`` (the times are in ``timings.csv``)
    reference: pd.DataFrame


def reference_tables(
    run_dir: str | os.PathLike[str],
    *,
    epochs: Sequence[int],
    n_pairs: int,
    steps: Sequence[int],
    attacks: Sequence[str],
    device: str | torch.device = "cpu",
    batch_size: int = 64,
    seed: int = 0,
    progress: bool = True,
) -> ReferenceTables:
    """The minimality stage's reference step: pick the pairs, attack them, write the files.

    For each checkpoint of ``epochs`` (empty: the last attacked one) the first ``n_pairs``
    distinct (image, target) pairs of the attack stage's targeted results are attacked by
    every reference attack at every budget of ``steps``, on the test images of the run
    folder and the checkpoint of that epoch. ``reference.csv`` (results) and ``timings.csv``
    (seconds per pair, which differ from run to run) are written to the stage's folder; when
    ``reference.csv`` exists it is read instead, so a finished step is never repeated.
    """
    from lib.datasets import load_run_split
    from lib.model import load_checkpoint

    results = pd.read_csv(stages.attack_file(run_dir, "results"), dtype={"image_id": str},
                          keep_default_na=False, na_values=[""])
    targeted = results[results["mode"] == "targeted"]
    chosen = [int(e) for e in epochs] or [int(targeted["epoch"].max())]
    ours = targeted[targeted["epoch"].isin(chosen)]
    path = stages.minimality_file(run_dir, "reference")
    if path.exists():
        return ReferenceTables(chosen, ours, pd.read_csv(path))
    test_set = load_run_split(run_dir, "test")
    position = {image_id: i for i, image_id in enumerate(test_set.index["image_id"])}
    parts = []
    for epoch in chosen:
        pairs = (targeted[targeted["epoch"] == epoch]
                 .drop_duplicates(["image_id", "target"])
                 .head(n_pairs)[["epoch", "image_id", "target"]]
                 .reset_index(drop=True))
        images = test_set.images[[position[i] for i in pairs["image_id"]]].float() / 255
        model = load_checkpoint(stages.checkpoint_path(run_dir, epoch), map_location=device)
        parts.append(run_reference_attacks(
            model, images, torch.tensor(pairs["target"].to_numpy()), keys=pairs,
            steps=list(steps), attacks=list(attacks), device=device, batch_size=batch_size,
            seed=seed, progress=progress,
        ))
    reference = pd.concat(parts, ignore_index=True)
    io.write_csv(stages.minimality_file(run_dir, "timings"),
                 reference[["epoch", "image_id", "target", "attack", "steps", "seconds"]])
    reference = reference.drop(columns="seconds")
    io.write_csv(path, reference)
    return ReferenceTables(chosen, ours, reference)


def best_per_sample(
    reference: pd.DataFrame,
    own: pd.DataFrame | None = None,
    *,
    on: Sequence[str] | None = None,
) -> pd.DataFrame:
    """The best-known L1 of every pair: the smallest successful L1 over every method.

    Args:
        reference: rows of :func:`run_reference_attacks` (key columns, attack, steps, success,
            l1).
        own: optional rows of our own attacks on the same pairs (key columns, schedule,
            success, l1), e.g. the attack stage's results for this epoch. A best-known
            reference should include every method, so pass them when you have them.
        on: key columns that identify a pair; default: the reference's columns before
            ``attack``.

    Returns:
        One row per pair of ``reference``: key columns, ``best_l1`` (``inf`` when no method
        succeeded), ``best_method`` (``"fmn_l1@1000"``, ``"schedule:constant"``, or ``""``).
    """
    on = _key_columns(reference, on)
    candidates = [
        reference.assign(method=reference["attack"] + "@" + reference["steps"].astype(str))
    ]
    if own is not None:
        missing = [c for c in (*on, "schedule", "success", "l1") if c not in own.columns]
        if missing:
            raise ParameterError(
                f"best_per_sample: own results lack columns {missing}; expected the key columns "
                f"{list(on)} and schedule, success, l1 (as in attack/results.csv)."
            )
        candidates.append(own.assign(method="schedule:" + own["schedule"].astype(str)))
    pairs = reference[list(on)].drop_duplicates().reset_index(drop=True)
    found = pd.concat([c[[*on, "method", "success", "l1"]] for c in candidates], ignore_index=True)
    found = found[found["success"].astype(bool) & np.isfinite(found["l1"])]
    found = found.sort_values([*on, "l1", "method"], kind="stable").drop_duplicates(list(on))
    best = pairs.merge(found[[*on, "l1", "method"]], on=list(on), how="left")
    return best.rename(columns={"l1": "best_l1", "method": "best_method"}).fillna(
        {"best_l1": np.inf, "best_method": ""}
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

    Runs :func:`run_reference_attacks` (see there for the arguments) and adds the columns of
    :func:`best_per_sample`: ``best_l1`` and ``best_method`` (the same on every row of a pair),
    over the reference attacks and, when ``own`` is given, our own schedules' successful rows.
    Reduce to one row per pair with ``table.drop_duplicates(keys)`` or :func:`best_per_sample`.

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
    results: pd.DataFrame, best: pd.DataFrame, on: Sequence[str], by: Sequence[str]
) -> pd.DataFrame:
    """Our results joined to the best-known L1 of their pair (pairs without a reference drop)."""
    missing = [c for c in (*on, *by, "success", "l1") if c not in results.columns]
    missing += [f"best.{c}" for c in (*on, "best_l1") if c not in best.columns]
    if missing:
        raise ParameterError(
            f"minimality: missing columns {missing}; results need {[*on, *by, 'success', 'l1']}"
            f" and best needs {[*on, 'best_l1']}. Pass on=/by= to match your tables."
        )
    best = best[[*on, "best_l1"]].drop_duplicates(list(on))
    return results.merge(best, on=list(on), how="inner")


def l1_ratio_table(
    results: pd.DataFrame,
    best: pd.DataFrame,
    *,
    on: Sequence[str] = ("epoch", "image_id", "target"),
    by: Sequence[str] = ("schedule", "epoch"),
) -> pd.DataFrame:
    """Per schedule and epoch: how many times larger our L1 is than the best-known L1.

    Only successful rows of pairs with a finite, positive best-known L1 enter the ratio.

    Args:
        results: our attacks (columns ``on``, ``by``, success, l1), e.g. attack/results.csv.
        best: best-known L1 per pair (columns ``on``, best_l1), e.g. from :func:`best_known_l1`.
        on: columns identifying a pair in both tables.
        by: grouping columns.

    Returns:
        One row per group: ``by`` columns, ``pairs`` (rows with a reference), ``successful``
        (rows in the ratio), ``median_ratio``, ``q25_ratio``, ``q75_ratio`` (NaN when no row).
    """
    joined = _with_best(results, best, on, by)
    usable = (
        joined["success"].astype(bool) & np.isfinite(joined["best_l1"]) & (joined["best_l1"] > 0)
    )
    joined = joined.assign(ratio=np.where(usable, joined["l1"] / joined["best_l1"], np.nan))
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
    on: Sequence[str] = ("epoch", "image_id", "target"),
    by: Sequence[str] = ("schedule", "epoch"),
    integration: Literal["step", "trapezoid"] = "step",
) -> pd.DataFrame:
    """Per schedule and epoch: AttackBench's optimality score against the best-known L1.

    A failed attack counts as distance ``inf``. The best-known L1 should include our own
    schedules (``own=`` in :func:`best_known_l1`); otherwise a schedule that beats every
    reference attack can score above 1.

    Returns:
        One row per group: ``by`` columns, ``pairs`` (rows with a reference),
        ``success_rate``, ``optimality`` (see :func:`eval_optimality`).
    """
    joined = _with_best(results, best, on, by)
    joined = joined.assign(distance=np.where(joined["success"].astype(bool), joined["l1"], np.inf))
    rows = []
    for group, part in joined.groupby(list(by), sort=True):
        rows.append(
            {
                **dict(zip(by, group, strict=True)),
                "pairs": len(part),
                "success_rate": part["success"].astype(bool).mean(),
                "optimality": eval_optimality(
                    part["distance"], part["best_l1"], integration=integration
                ),
            }
        )
    return pd.DataFrame(rows, columns=[*by, "pairs", "success_rate", "optimality"])
