"""Per-image margins, robust accuracy against epsilon, and the margin's change over training.

The field's robustness index is the *margin* of a correctly classified image: the smallest
perturbation that changes its class, over every wrong class. A targeted attack toward one class
gives an upper bound of the distance to that class, so the margin found here is the smallest
successful distance over all targets (and, for "best of schedules", over all schedules, and for
"best known" also over the reference minimum-norm attacks and the untargeted rows where a run
has them). The boundary is where the attack crossed, refined by bisection along the last step
where the attack stage refined it (``refined_<norm>``), else the path point.

A failed attack counts as distance ``inf``; an image with no successful attack for a method has
margin ``inf``. A finite search can only bound a margin from above: ``inf`` means "no boundary
found within the budget", not "robust", and a robust-accuracy curve built on these margins is an
upper bound of the true one.

Distances are in [0, 1] pixel units: ``linf`` the largest change of one value, ``l2`` the
Euclidean norm over all C*H*W values, ``l1`` the mean absolute change over all values (the
paper's L1). The book shows L1 and Linf times 255 (grey levels).

Robust accuracy at epsilon (:func:`robust_accuracy`) is the share of *all* test images that are
classified correctly and whose margin exceeds epsilon; misclassified images count as margin 0.
Only a sample of the correctly classified images is attacked (``n_per_class`` per tool), so the
curve is the clean accuracy times the share of attacked images whose margin exceeds epsilon,
each tool's attacked images standing for that tool's correctly classified ones (weights
``correct_c / attacked_c``). Its band resamples the attacked images (and, with several models,
models then images) and, independently, the clean accuracy of every drawn model (a binomial
draw over its test images).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from lib.analysis import resampling, statistics
from lib.errors import ParameterError

#: The norms of a margin, Linf first (the geometry of sign steps).
NORMS = ("linf", "l2", "l1")
#: How the book names each norm.
NORM_NAMES = {"linf": "Linf", "l2": "L2", "l1": "L1"}
#: ``method`` of the smallest distance over every schedule of a mode.
BEST_OF_SCHEDULES = "best of schedules"
#: ``method`` of the smallest distance over every reference (minimum-norm) attack.
REFERENCE = "reference"
#: ``method`` of the smallest distance over everything given (``mode`` "any").
BEST_KNOWN = "best known"
#: The model of a table without a model column.
ONE_MODEL = 0
#: ``model`` of a row pooled over several models (two-level bootstrap).
POOLED = "pooled"

#: The columns of :func:`image_margins`.
MARGIN_COLUMNS = ("model", "epoch", "image_id", "source", "mode", "method", "norm", "margin",
                  "closest_target", "attacks", "successes")


def attack_distances(table: pd.DataFrame, norm: str) -> np.ndarray:
    """Each attack's distance in ``norm``: refined where the table has it, ``inf`` on failure.

    Args:
        table: attack rows with ``success``, ``<norm>`` and optionally ``refined_<norm>`` and
            ``status`` (rows whose status is not "ok" count as failed).
        norm: ``"linf"``, ``"l2"`` or ``"l1"``.

    Returns:
        float [N] >= 0, ``inf`` where the attack failed; NaN where the table lacks the norm.
    """
    if norm not in NORMS:
        raise ParameterError(f"norm must be one of {NORMS}, got {norm!r}")
    if norm not in table.columns:
        return np.full(len(table), np.nan)
    distance = table[norm].to_numpy(float).copy()
    refined = f"refined_{norm}"
    if refined in table.columns:
        value = table[refined].to_numpy(float)
        distance = np.where(np.isnan(value), distance, value)
    failed = ~table["success"].astype(bool).to_numpy()
    if "status" in table.columns:
        failed |= (table["status"] != "ok").to_numpy()
    return np.where(failed, np.inf, distance)


def _with_model(table: pd.DataFrame, model: str) -> pd.DataFrame:
    if model in table.columns:
        return table.rename(columns={model: "model"}) if model != "model" else table
    return table.assign(model=ONE_MODEL)


def _candidates(results: pd.DataFrame, reference: pd.DataFrame | None) -> pd.DataFrame:
    """One row per (method, attack) with its distance in every norm."""
    mode = results["mode"] if "mode" in results.columns else "targeted"
    target = results["target"]
    if "final_class" in results.columns:  # untargeted: the class it crossed into
        target = target.where(target >= 0, results["final_class"])
    own = results.assign(mode=mode, method=results["schedule"], target=target)
    own = own.assign(**{norm: attack_distances(results, norm) for norm in NORMS})
    keys = ["model", "epoch", "image_id", "source", "mode", "method", "target", *NORMS]
    parts = [own[keys], own[keys].assign(method=BEST_OF_SCHEDULES)]
    if reference is not None and len(reference):
        sources = results.drop_duplicates("image_id").set_index("image_id")["source"]
        refs = reference.assign(mode="targeted", method=REFERENCE,
                                source=reference["image_id"].map(sources))
        parts.append(refs.assign(**{n: attack_distances(reference, n) for n in NORMS})[keys])
    table = pd.concat(parts, ignore_index=True)
    everything = table[table["method"] != BEST_OF_SCHEDULES]
    return pd.concat([table, everything.assign(mode="any", method=BEST_KNOWN)],
                     ignore_index=True)


def image_margins(results: pd.DataFrame, reference: pd.DataFrame | None = None, *,
                  model: str = "model") -> pd.DataFrame:
    """The margin of every attacked image per (model, epoch), method and norm.

    Args:
        results: attack rows (``attack/results.csv``): epoch, schedule, mode (default
            "targeted"), image_id, source, target, success, l1, l2, linf, optionally
            refined_*, status, final_class and a model column.
        reference: optional minimum-norm reference rows (epoch, image_id, target, attack,
            success and the norms it measured; a missing norm is left out, not a failure), with
            the model column when ``results`` has one.
        model: the column naming the trained model; absent means one model (``model`` 0).

    Returns:
        :data:`MARGIN_COLUMNS`, one row per (model, epoch, image, mode, method, norm):
        ``method`` is a schedule, "best of schedules" (per mode), "reference", or
        "best known" (mode "any": every row given); ``margin`` in [0, 1] pixel units or
        ``inf``; ``closest_target`` the class at the margin (-1 when ``inf``); ``attacks`` and
        ``successes`` count the attacks behind it. NaN margin: the norm was not measured.
    """
    results = _with_model(results, model)
    reference = None if reference is None else _with_model(reference, model)
    long = _candidates(results, reference).melt(
        id_vars=["model", "epoch", "image_id", "source", "mode", "method", "target"],
        value_vars=list(NORMS), var_name="norm", value_name="margin")
    long = long[long["margin"].notna()]
    keys = ["model", "epoch", "image_id", "source", "mode", "method", "norm"]
    grouped = long.groupby(keys, sort=True)
    table = grouped.agg(margin=("margin", "min"), attacks=("margin", "size"),
                        successes=("margin", lambda m: int(np.isfinite(m).sum())))
    closest = long.loc[grouped["margin"].idxmin(), [*keys, "target"]].set_index(keys)["target"]
    table["closest_target"] = closest.where(np.isfinite(table["margin"]), -1).astype(np.int64)
    return table.reset_index()[list(MARGIN_COLUMNS)]


def untargeted_beside(margins: pd.DataFrame) -> pd.DataFrame:
    """Targeted margin and untargeted borderline distance side by side, per image and norm.

    Returns:
        ``model, epoch, image_id, norm, targeted, untargeted`` (both "best of schedules" of
        their mode; NaN where a mode was not run).
    """
    best = margins[margins["method"] == BEST_OF_SCHEDULES]
    wide = best.pivot_table(index=["model", "epoch", "image_id", "norm"], columns="mode",
                            values="margin", aggfunc="min")
    return wide.reindex(columns=["targeted", "untargeted"]).reset_index().rename_axis(
        columns=None)


def clean_accuracy(predictions: pd.DataFrame, *, model: str = "model") -> pd.DataFrame:
    """Test images and correctly classified ones per (model, epoch, class).

    Args:
        predictions: ``train/predictions.csv`` rows: epoch, image_id, label, predicted (and a
            model column for several models).

    Returns:
        ``model, epoch, source, test_images, correct`` (``source`` = the true class).
    """
    table = _with_model(predictions, model)
    table = table.assign(source=table["label"], right=table["label"] == table["predicted"])
    return (table.groupby(["model", "epoch", "source"], sort=True)
            .agg(test_images=("right", "size"), correct=("right", "sum")).reset_index())


def epsilon_grid(margins: pd.DataFrame, *, norm: str, points: int = 101) -> np.ndarray:
    """``points`` epsilons from 0 to the largest finite margin in ``norm`` (every checkpoint and
    method of the table share it, so their curves are comparable). float [points]."""
    values = margins.loc[margins["norm"] == norm, "margin"].to_numpy(float)
    values = values[np.isfinite(values)]
    top = float(values.max()) if values.size else 1.0
    return np.linspace(0.0, top, points)


def _chosen(margins: pd.DataFrame, *, norm: str, method: str, mode: str) -> pd.DataFrame:
    chosen = margins[(margins["norm"] == norm) & (margins["method"] == method)
                     & (margins["mode"] == mode)]
    if chosen.empty:
        raise ParameterError(
            f"no margins for norm {norm!r}, method {method!r}, mode {mode!r}; the table has "
            f"methods {sorted(margins['method'].unique())} and modes "
            f"{sorted(margins['mode'].unique())}")
    return chosen


def _row_weights(part: pd.DataFrame, accuracy: pd.DataFrame) -> tuple[np.ndarray, pd.Series]:
    """Each attacked image's weight (its tool's correct / attacked, summing to 1 per model) and
    every model's (test images, correct)."""
    keys = ["model", "epoch", "source"]
    counts = accuracy.set_index(keys)
    index = pd.MultiIndex.from_frame(part[keys])
    missing = index.difference(counts.index)
    if len(missing):
        raise ParameterError(
            f"the accuracy table has no (model, epoch, class) row for {list(missing)[:3]}; "
            "pass clean_accuracy(predictions) of the same models and epochs")
    correct = counts["correct"].reindex(index).to_numpy(float)
    attacked = part.groupby(keys)["image_id"].transform("size").to_numpy(float)
    weight = correct / attacked
    total = pd.Series(weight).groupby(part["model"].to_numpy()).transform("sum").to_numpy()
    with np.errstate(invalid="ignore", divide="ignore"):
        weight = np.where(total > 0, weight / total, 0.0)
    epoch_rows = accuracy[accuracy["epoch"].isin(part["epoch"].unique())
                          & accuracy["model"].isin(part["model"].unique())]
    tests = epoch_rows.groupby("model")[["test_images", "correct"]].sum()
    return weight, tests


def _accuracy_weighted(part: pd.DataFrame, accuracy: pd.DataFrame, values: np.ndarray, *,
                       confidence: float, resamples: int, seed: int) -> pd.DataFrame:
    """Clean accuracy x weighted mean of ``values`` [n, K] per model, averaged over models,
    with its (two-level) bootstrap band. K rows of INTERVAL_COLUMNS."""
    clusters = resampling.clusters_of(part, cluster="image_id", model="model")
    weight, tests = _row_weights(part, accuracy)
    models = np.unique(part["model"].to_numpy())  # clusters_of numbers models in this order
    clean = (tests.loc[models, "correct"] / tests.loc[models, "test_images"]).to_numpy()
    member = clusters.cluster_model[clusters.row_cluster]
    share = np.stack([weight[member == m] @ values[member == m] for m in range(len(models))])
    estimate = (clean[:, None] * share).mean(axis=0)
    sizes = {"n_images": clusters.n_clusters, "n_models": clusters.n_models,
             "n_attacks": int(part["attacks"].sum())}
    low = high = np.full(values.shape[1], np.nan)
    if clusters.n_clusters > 1:
        counts = resampling.resample_counts(clusters, two_level=True, resamples=resamples,
                                            seed=seed)
        sums, _ = resampling.cluster_sums(values * weight[:, None], clusters)
        mass, _ = resampling.cluster_sums(weight, clusters)
        per_model = np.bincount(clusters.cluster_model)
        rng = np.random.default_rng([seed, 1])
        total = np.zeros((resamples, values.shape[1]))
        drawn_models = np.zeros((resamples, 1))
        for m in range(len(models)):
            mine = clusters.cluster_model == m
            drawn = counts[:, mine].astype(float)
            copies = drawn.sum(axis=1, keepdims=True) / per_model[m]
            with np.errstate(invalid="ignore", divide="ignore"):
                model_share = np.nan_to_num((drawn @ sums[mine]) / (drawn @ mass[mine]))
            trials = np.maximum(copies[:, 0], 1).astype(np.int64) * int(tests.loc[models[m],
                                                                          "test_images"])
            accuracy_draw = rng.binomial(trials, clean[m]) / trials
            total += copies * accuracy_draw[:, None] * model_share
            drawn_models += copies
        low, high = resampling.percentile_bounds(total / drawn_models, confidence=confidence)
    return pd.DataFrame({"estimate": estimate, "low": low, "high": high, **sizes},
                        columns=list(resampling.INTERVAL_COLUMNS))


def _groups(chosen: pd.DataFrame, pool_models: bool):
    if pool_models:
        for epoch, part in chosen.groupby("epoch", sort=True):
            yield {"model": POOLED, "epoch": epoch}, part
    else:
        for (model, epoch), part in chosen.groupby(["model", "epoch"], sort=True):
            yield {"model": model, "epoch": epoch}, part


def robust_accuracy(margins: pd.DataFrame, accuracy: pd.DataFrame, *,
                    epsilons: Sequence[float], norm: str = "linf",
                    method: str = BEST_OF_SCHEDULES, mode: str = "targeted",
                    pool_models: bool = False,
                    confidence: float = resampling.CONFIDENCE,
                    resamples: int = resampling.RESAMPLES,
                    seed: int = resampling.SEED) -> pd.DataFrame:
    """Robust accuracy against epsilon per (model, epoch), with its bootstrap band.

    Args:
        margins: :func:`image_margins`.
        accuracy: :func:`clean_accuracy` of the same models and epochs.
        epsilons: float [K] >= 0 in the units of ``norm`` ([0, 1] pixel units).
        norm, method, mode: which margins (a schedule, "best of schedules", "best known"...).
        pool_models: one curve per epoch over every model (``model`` "pooled", models then
            images resampled) instead of one per model (images resampled).
        confidence, resamples, seed: the bootstrap's.

    Returns:
        ``model, epoch, method, mode, norm, epsilon, estimate, low, high, n_images, n_models,
        n_attacks``: ``estimate`` in [0, 1], non-increasing in epsilon; at epsilon 0 it is the
        clean accuracy. ``n_images`` counts attacked images, ``n_attacks`` the attacks behind
        their margins.
    """
    chosen = _chosen(margins, norm=norm, method=method, mode=mode)
    grid = np.asarray(epsilons, dtype=float)
    if grid.ndim != 1 or (grid < 0).any():
        raise ParameterError(f"epsilons must be a 1-D list of values >= 0, got {epsilons!r}")
    parts = []
    for key, part in _groups(chosen, pool_models):
        values = (part["margin"].to_numpy(float)[:, None] > grid[None, :]).astype(float)
        curve = _accuracy_weighted(part, accuracy, values, confidence=confidence,
                                   resamples=resamples, seed=seed)
        parts.append(curve.assign(**key, method=method, mode=mode, norm=norm, epsilon=grid))
    columns = ["model", "epoch", "method", "mode", "norm", "epsilon",
               *resampling.INTERVAL_COLUMNS]
    return pd.concat(parts, ignore_index=True)[columns]


def robust_accuracy_area(margins: pd.DataFrame, accuracy: pd.DataFrame, *, eps_max: float,
                         norm: str = "linf", method: str = BEST_OF_SCHEDULES,
                         mode: str = "targeted", pool_models: bool = False,
                         confidence: float = resampling.CONFIDENCE,
                         resamples: int = resampling.RESAMPLES,
                         seed: int = resampling.SEED) -> pd.DataFrame:
    """The curve's mean height over [0, eps_max]: its area divided by ``eps_max``, in [0, 1].

    The area under the step curve is exact: an image of margin m adds ``min(m, eps_max)``,
    so the value is ``clean accuracy x weighted mean of min(m, eps_max) / eps_max``.

    Returns:
        ``model, epoch, method, mode, norm, eps_max, estimate, low, high, n_images,
        n_models, n_attacks``.
    """
    if not eps_max > 0:
        raise ParameterError(f"eps_max must be > 0 (the end of the integrated range), got "
                             f"{eps_max!r}")
    chosen = _chosen(margins, norm=norm, method=method, mode=mode)
    rows = []
    for key, part in _groups(chosen, pool_models):
        values = np.minimum(part["margin"].to_numpy(float), eps_max)[:, None] / eps_max
        area = _accuracy_weighted(part, accuracy, values, confidence=confidence,
                                  resamples=resamples, seed=seed)
        rows.append(area.assign(**key, method=method, mode=mode, norm=norm, eps_max=eps_max))
    columns = ["model", "epoch", "method", "mode", "norm", "eps_max",
               *resampling.INTERVAL_COLUMNS]
    return pd.concat(rows, ignore_index=True)[columns]


def paired_log_ratios(margins: pd.DataFrame, *, norm: str = "linf",
                      method: str = BEST_OF_SCHEDULES, mode: str = "targeted") -> pd.DataFrame:
    """Per model and image: the margin at the model's first and last attacked checkpoint and
    ``log(last / first)``; only images attacked at both.

    ``inf`` at one end gives ``+inf`` (no boundary found at the end) or ``-inf`` (none found at
    the start): the change points that way by an unknown amount. Both ends ``inf`` (or both 0)
    give NaN: the image says nothing about the change.

    Returns:
        ``model, image_id, first_epoch, last_epoch, first, last, log_ratio, attacks`` (the
        attacks behind both margins).
    """
    chosen = _chosen(margins, norm=norm, method=method, mode=mode)
    rows = []
    for model, part in chosen.groupby("model", sort=True):
        epochs = sorted(part["epoch"].unique())
        if len(epochs) < 2:
            continue
        ends = part[part["epoch"].isin([epochs[0], epochs[-1]])]
        wide = ends.pivot_table(index="image_id", columns="epoch", values="margin",
                                aggfunc="min").dropna()
        attacks = ends.groupby("image_id")["attacks"].sum().reindex(wide.index)
        first, last = wide[epochs[0]].to_numpy(), wide[epochs[-1]].to_numpy()
        with np.errstate(invalid="ignore", divide="ignore"):
            ratio = np.log(last) - np.log(first)
        rows.append(pd.DataFrame({"model": model, "image_id": wide.index, "first_epoch":
                                  epochs[0], "last_epoch": epochs[-1], "first": first,
                                  "last": last, "log_ratio": ratio,
                                  "attacks": attacks.to_numpy(np.int64)}))
    columns = ["model", "image_id", "first_epoch", "last_epoch", "first", "last", "log_ratio",
               "attacks"]
    return pd.concat(rows, ignore_index=True)[columns] if rows else pd.DataFrame(columns=columns)


def direction(interval: statistics.Interval) -> str:
    """"grows" when the interval of a log ratio lies above 0, "shrinks" when below, else
    "inconclusive": the rules of :func:`lib.analysis.statistics.verdict_above` and
    :func:`lib.analysis.statistics.verdict_below`, except that an infinite bound counts (a bound of
    ``+inf`` comes from images whose margin was found only at the start)."""
    low, high = interval.low, interval.high
    if interval.n == 0 or np.isnan([interval.estimate, low, high]).any():
        return statistics.INCONCLUSIVE
    if low > 0:
        return "grows"
    return "shrinks" if high < 0 else statistics.INCONCLUSIVE


def margin_change(margins: pd.DataFrame, *, norm: str = "linf",
                  method: str = BEST_OF_SCHEDULES, mode: str = "targeted",
                  confidence: float = resampling.CONFIDENCE,
                  resamples: int = resampling.RESAMPLES,
                  seed: int = resampling.SEED) -> pd.DataFrame:
    """Does the margin grow over training? The paired per-image change from each model's first
    to its last attacked checkpoint.

    The change of an image is ``log(last / first)`` (:func:`paired_log_ratios`) and the
    summary is its median over images, with the image-bootstrap interval (models then images
    for the pooled row). Why a median of log ratios: margins are scale quantities (2 -> 4
    grey levels is the growth of 20 -> 40), a mean of differences would be set by the few
    largest margins, and the median admits the images whose margin is ``inf`` at one end as
    what they are, a change in a known direction of unknown size, without inventing a value
    (capping at the largest finite distance would make the answer depend on the attack's
    budget). Images with ``inf`` at both ends are dropped and counted (``unresolved``).
    ``factor`` = exp(median): the median image's margin is multiplied by it.

    Returns:
        One row per model with two or more attacked checkpoints, then a ``"pooled"`` row when
        there are several models: ``model, first_epoch, last_epoch, median_first,
        median_last`` (margins of the paired images, [0, 1] units), ``estimate, low, high``
        (median log ratio), ``factor, factor_low, factor_high``, ``n_images, n_models,
        n_attacks`` (the attacks behind both ends' margins), ``grew, shrank, unresolved`` (image
        counts) and ``direction`` ("grows", "shrinks" or "inconclusive").
    """
    pairs = paired_log_ratios(margins, norm=norm, method=method, mode=mode)
    parts = [(model, part) for model, part in pairs.groupby("model", sort=True)]
    if len(parts) > 1:
        parts.append((POOLED, pairs))
    rows = []
    for model, part in parts:
        known = part[part["log_ratio"].notna()]
        result = resampling.bootstrap_rows(
            known["log_ratio"].to_numpy(float), resampling.clusters_of(known, model="model"),
            statistic="median", two_level=True, confidence=confidence, resamples=resamples,
            seed=seed)
        single = model != POOLED
        rows.append({
            "model": model, "norm": norm, "method": method,
            "first_epoch": int(part["first_epoch"].iloc[0]) if single else np.nan,
            "last_epoch": int(part["last_epoch"].iloc[0]) if single else np.nan,
            "median_first": float(np.median(known["first"])) if len(known) else np.nan,
            "median_last": float(np.median(known["last"])) if len(known) else np.nan,
            **result.as_dict(), "n_attacks": int(known["attacks"].sum()),
            "factor": np.exp(result.estimate), "factor_low": np.exp(result.low),
            "factor_high": np.exp(result.high),
            "grew": int((known["log_ratio"] > 0).sum()),
            "shrank": int((known["log_ratio"] < 0).sum()),
            "unresolved": int(part["log_ratio"].isna().sum()),
            "direction": direction(result.interval())})
    columns = ["model", "norm", "method", "first_epoch", "last_epoch", "median_first",
               "median_last", *resampling.INTERVAL_COLUMNS, "factor", "factor_low",
               "factor_high", "grew", "shrank", "unresolved", "direction"]
    return pd.DataFrame(rows, columns=columns)
