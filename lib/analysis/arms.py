"""The borderline-training arms compared: margins, robust accuracy, accuracy and cost.

The tables here come from the borderline-training stage: per model (the clean start
checkpoint ``"start"`` and the arms ``"control"``, ``"borderline"``, ``"pgd"``) and test image,
the minimum-norm margin in Linf and L2 (0 for a misclassified image, ``inf`` where the attack
found no boundary within its budget), the fixed-epsilon outcome, the training passes of every
step and the held-out robust accuracy per epoch.

Every model is measured on the same test images, so arms are compared *per image*: the change
of an image's margin from model B to model A is ``log(margin_A / margin_B)``, summarised by its
median over images with an image-bootstrap interval (as the margin's change over training is,
:func:`lib.analysis.margins.margin_change`; an image misclassified by one model and not the
other is a change of known direction and unknown size, ``-inf`` or ``+inf``; one
misclassified by both says nothing and is counted as ``unresolved``). ``factor`` is
``exp(median)``: the median image's margin is multiplied by it. Clean accuracy is compared on
the whole test split, paired by image (Newcombe's interval for paired rates).

The margins compared are the best known (:func:`best_known`): the smallest perturbation that
any attack of the stage found for the image, FMN in either norm or control's FMN perturbation
carried over to the model. The measured images are the same number per tool, so the robust
accuracy here is the class-balanced one: the mean over images of "correct and margin above
epsilon".
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from lib.analysis import resampling, statistics
from lib.analysis.margins import direction

#: The models in the order tables show them.
MODELS: tuple[str, ...] = ("start", "control", "borderline", "pgd")
#: The pairs compared per image: (model, against).
COMPARED: tuple[tuple[str, str], ...] = (
    ("borderline", "control"), ("pgd", "control"), ("borderline", "pgd"),
    ("control", "start"), ("borderline", "start"), ("pgd", "start"),
)


def _by_image(fmn: pd.DataFrame, model: str, norm: str) -> pd.Series:
    rows = fmn[(fmn["model"] == model) & (fmn["norm"] == norm)]
    return rows.set_index("image_id")["margin"].astype(float)


def best_known(fmn: pd.DataFrame, transfer: pd.DataFrame) -> pd.DataFrame:
    """Each image's margin as the smallest perturbation any attack found: FMN's (in either
    norm) or the transferred one (:func:`lib.attack.evaluation.transfer_distances`), per
    model and norm.

    Args:
        fmn: the stage's ``fmn_margins`` table (``model, image_id, norm, correct, margin``...).
        transfer: the stage's ``transfer`` table (``model, image_id, norm, distance``); a
            model without rows (the source of the transferred perturbations) keeps its FMN
            margins.

    Returns:
        ``fmn`` with ``margin`` replaced by the smaller of the two (0 stays 0).
    """
    keys = ["model", "image_id", "norm"]
    joined = fmn.merge(transfer[[*keys, "distance"]], on=keys, how="left", validate="one_to_one")
    smaller = np.fmin(joined["margin"].to_numpy(float), joined["distance"].to_numpy(float))
    return joined.drop(columns="distance").assign(margin=smaller)


def margin_summary(fmn: pd.DataFrame, *, confidence: float = statistics.CONFIDENCE,
                   resamples: int = statistics.RESAMPLES,
                   seed: int = statistics.SEED) -> pd.DataFrame:
    """Per model and norm: the median margin over the measured images (misclassified images
    at 0) with its image-bootstrap interval, the quartiles, and the attack's success on the
    correctly classified images.

    Returns:
        ``model, norm, images, correct, found, median, low, high, q25, q75``.
    """
    rows = []
    for (model, norm), part in fmn.groupby(["model", "norm"], sort=False):
        values = part["margin"].to_numpy(float)
        result = resampling.bootstrap_rows(
            values, resampling.clusters_of(part), statistic="median", confidence=confidence,
            resamples=resamples, seed=seed)
        correct = part["correct"].astype(bool)
        rows.append({"model": model, "norm": norm, "images": len(part),
                     "correct": int(correct.sum()),
                     "found": int((correct & part["success"].astype(bool)).sum()),
                     "median": result.estimate, "low": result.low, "high": result.high,
                     "q25": float(np.quantile(values, 0.25)),
                     "q75": float(np.quantile(values, 0.75))})
    return _ordered(pd.DataFrame(rows))


def robust_accuracy_curves(fmn: pd.DataFrame, *, norm: str, points: int = 51,
                           confidence: float = statistics.CONFIDENCE,
                           resamples: int = statistics.RESAMPLES,
                           seed: int = statistics.SEED) -> pd.DataFrame:
    """Class-balanced robust accuracy against epsilon per model, with image-bootstrap bands.

    Args:
        fmn: the stage's ``fmn_margins`` table.
        norm: "linf" or "l2"; epsilons run from 0 to the largest finite margin of any model.
        points: epsilons on the grid (>= 2).

    Returns:
        ``model, norm, epsilon, estimate, low, high, n_images``: the share of the measured
        images classified correctly with a margin above epsilon (1 at no image).
    """
    chosen = fmn[fmn["norm"] == norm]
    finite = chosen["margin"].to_numpy(float)
    finite = finite[np.isfinite(finite)]
    grid = np.linspace(0.0, float(finite.max()) if finite.size else 1.0, points)
    parts = []
    for model, part in chosen.groupby("model", sort=False):
        above = (part["margin"].to_numpy(float)[:, None] > grid[None, :]).astype(float)
        curve = resampling.bootstrap_curve(above, resampling.clusters_of(part),
                                           confidence=confidence, resamples=resamples,
                                           seed=seed)
        parts.append(curve.assign(model=model, norm=norm, epsilon=grid))
    columns = ["model", "norm", "epsilon", "estimate", "low", "high", "n_images"]
    return _ordered(pd.concat(parts, ignore_index=True)[columns])


def paired_change(fmn: pd.DataFrame, *, model: str, against: str, norm: str,
                  confidence: float = statistics.CONFIDENCE,
                  resamples: int = statistics.RESAMPLES,
                  seed: int = statistics.SEED) -> dict[str, object]:
    """The per-image change of the margin from ``against`` to ``model`` in ``norm``.

    Returns:
        One row of the ``comparisons`` table: ``model, against, norm, median_model,
        median_against`` (medians over the paired images), ``estimate, low, high`` (median of
        ``log(margin_model / margin_against)`` and its interval), ``n_images`` (images with a
        known change), ``factor, factor_low, factor_high`` (their exponentials), ``grew,
        shrank, unresolved`` (image counts) and ``direction`` ("grows", "shrinks",
        "inconclusive").
    """
    joined = pd.concat({"model": _by_image(fmn, model, norm),
                        "against": _by_image(fmn, against, norm)}, axis=1).dropna()
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = np.log(joined["model"].to_numpy()) - np.log(joined["against"].to_numpy())
    known = ~np.isnan(ratio)
    table = pd.DataFrame({"image_id": joined.index[known], "ratio": ratio[known]})
    result = resampling.bootstrap_rows(table["ratio"].to_numpy(), resampling.clusters_of(table),
                                       statistic="median", confidence=confidence,
                                       resamples=resamples, seed=seed)
    return {"model": model, "against": against, "norm": norm,
            "median_model": float(np.median(joined["model"])) if len(joined) else np.nan,
            "median_against": float(np.median(joined["against"])) if len(joined) else np.nan,
            "estimate": result.estimate, "low": result.low, "high": result.high,
            "n_images": result.n_images, "factor": np.exp(result.estimate),
            "factor_low": np.exp(result.low), "factor_high": np.exp(result.high),
            "grew": int((table["ratio"] > 0).sum()), "shrank": int((table["ratio"] < 0).sum()),
            "unresolved": int((~known).sum()), "direction": direction(result.interval())}


def comparisons(fmn: pd.DataFrame, *, pairs: Sequence[tuple[str, str]] = COMPARED,
                norms: Sequence[str] = ("linf", "l2"), **bootstrap: float) -> pd.DataFrame:
    """:func:`paired_change` for every pair of models present and every norm."""
    present = set(fmn["model"])
    rows = [paired_change(fmn, model=model, against=against, norm=norm, **bootstrap)
            for norm in norms for model, against in pairs
            if model in present and against in present]
    return pd.DataFrame(rows)


def accuracy_table(predictions: Mapping[str, pd.DataFrame], *,
                   confidence: float = statistics.CONFIDENCE) -> pd.DataFrame:
    """Clean accuracy of every model on the whole test split with its Wilson interval.

    Args:
        predictions: model -> its rows of ``predictions.csv`` at the measured epoch
            (``image_id, label, predicted``).

    Returns:
        ``model, epoch, test_images, correct, accuracy, low, high``.
    """
    rows = []
    for model, table in predictions.items():
        right = int((table["label"] == table["predicted"]).sum())
        interval = statistics.wilson_interval(right, len(table), confidence=confidence)
        rows.append({"model": model, "epoch": int(table["epoch"].iloc[0]),
                     "test_images": len(table), "correct": right,
                     "accuracy": interval.estimate, "low": interval.low, "high": interval.high})
    return _ordered(pd.DataFrame(rows))


def accuracy_change(model: pd.DataFrame, against: pd.DataFrame, *,
                    confidence: float = statistics.CONFIDENCE) -> statistics.Interval:
    """accuracy(model) - accuracy(against) on the same test images, with Newcombe's interval
    for paired rates (rows of ``predictions.csv``, joined by ``image_id``)."""
    joined = model.merge(against, on="image_id", suffixes=("_m", "_a"), validate="one_to_one")
    first = (joined["label_m"] == joined["predicted_m"]).to_numpy()
    second = (joined["label_a"] == joined["predicted_a"]).to_numpy()
    return statistics.paired_rate_difference_interval(
        both=int((first & second).sum()), first_only=int((first & ~second).sum()),
        second_only=int((~first & second).sum()), neither=int((~first & ~second).sum()),
        confidence=confidence)


def fixed_epsilon_table(fixed: pd.DataFrame, *,
                        confidence: float = statistics.CONFIDENCE) -> pd.DataFrame:
    """Per model: the measured images that keep their class under APGD at the fixed epsilon
    (misclassified ones count as not robust), with the Wilson interval of the share.

    Returns:
        ``model, epsilon, images, correct, robust, share, low, high``.
    """
    rows = []
    for model, part in fixed.groupby("model", sort=False):
        robust = int(part["robust"].astype(bool).sum())
        interval = statistics.wilson_interval(robust, len(part), confidence=confidence)
        rows.append({"model": model, "epsilon": float(part["epsilon"].iloc[0]),
                     "images": len(part), "correct": int(part["correct"].astype(bool).sum()),
                     "robust": robust, "share": interval.estimate, "low": interval.low,
                     "high": interval.high})
    return _ordered(pd.DataFrame(rows))


def cost_table(steps: Mapping[str, pd.DataFrame],
               timings: pd.DataFrame | None = None) -> pd.DataFrame:
    """Per arm: training steps and images, passes per training image by kind (a forward
    alone counted as a third of a pass), the multiple of the control arm's passes, and the
    measured wall time per epoch where ``timings`` has it.

    Returns:
        ``model, epochs, steps, images, train, attack, forwards, passes, multiple,
        seconds_per_epoch``.
    """
    rows = []
    for model, table in steps.items():
        images = int(table["images"].sum())
        rows.append({"model": model, "epochs": int(table["epoch"].nunique()),
                     "steps": len(table), "images": images,
                     "train": table["train_passes"].sum() / images,
                     "attack": table["attack_passes"].sum() / images,
                     "forwards": table["forwards"].sum() / images,
                     "passes": table["passes"].sum() / images})
    costs = pd.DataFrame(rows)
    control = costs.loc[costs["model"] == "control", "passes"]
    costs["multiple"] = costs["passes"] / (control.iloc[0] if len(control) else np.nan)
    costs["seconds_per_epoch"] = np.nan
    if timings is not None:
        trained = timings[timings["phase"] == "training"].set_index("model")
        per_epoch = trained["seconds"] / trained["epochs"].where(trained["epochs"] > 0)
        costs["seconds_per_epoch"] = costs["model"].map(per_epoch)
    return _ordered(costs)


def _ordered(table: pd.DataFrame) -> pd.DataFrame:
    """Rows in :data:`MODELS` order (stable within a model)."""
    rank = {model: i for i, model in enumerate(MODELS)}
    order = table["model"].map(rank).fillna(len(MODELS))
    return table.iloc[np.argsort(order.to_numpy(), kind="stable")].reset_index(drop=True)
