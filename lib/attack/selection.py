"""Which test images each checkpoint attacks (the method chapter, "Which images are attacked").

The rule: one seeded permutation of the test split, the same for every checkpoint; for each
checkpoint and each class, the first ``n_per_class`` images in that order that the checkpoint
classifies correctly. Sharing the permutation makes the attacked sets of two checkpoints
overlap as much as their predictions allow, so differences between epochs come from the model,
not from a new draw of images.

A class with fewer correctly classified images than ``n_per_class`` keeps what it has; the
:attr:`Selection.shortfall` table says so, and the attack stage reports it.

Input is the training stage's ``train/predictions.csv`` (epoch, image_id, label, predicted),
which covers the whole test split at every epoch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from lib import NUM_CLASSES, TOOLS
from lib.checking import check_int
from lib.errors import ParameterError, RunFolderError

PREDICTION_COLUMNS = ("epoch", "image_id", "label", "predicted")
SELECTION_COLUMNS = ("epoch", "image_id", "label", "rank")
SHORTFALL_COLUMNS = ("epoch", "label", "tool", "wanted", "available")


@dataclass(frozen=True)
class Selection:
    """The attacked images of every checkpoint.

    Attributes:
        images: one row per (epoch, image) of one model (the attack plan puts several
            models' selections under each other, with a leading ``model`` column):
            ``epoch`` (int), ``image_id`` (str), ``label``
            (int 0-6, the true class, which the checkpoint predicts), ``rank`` (int, 0-based
            position among the chosen images of that class and epoch, in permutation order).
            Sorted by epoch, label, rank.
        shortfall: one row per (epoch, class) with fewer than ``n_per_class`` correct images:
            ``epoch``, ``label``, ``tool``, ``wanted`` (= n_per_class), ``available``. Empty when
            every class is complete.
    """

    images: pd.DataFrame
    shortfall: pd.DataFrame


def permuted_test_ids(image_ids: Sequence[str], *, seed: int) -> list[str]:
    """The seeded order of the test split: ``image_ids`` sorted, then permuted by ``seed``.

    Sorting first makes the order depend only on the set of ids and the seed, not on the row
    order of the table they came from.
    """
    ids = sorted(set(image_ids))
    order = np.random.default_rng(seed).permutation(len(ids))
    return [ids[k] for k in order]


def select_images(
    predictions: pd.DataFrame,
    *,
    n_per_class: int,
    seed: int,
    epochs: Sequence[int] | None = None,
) -> Selection:
    """Apply the selection rule to a prediction table.

    Args:
        predictions: columns ``epoch``, ``image_id``, ``label``, ``predicted`` (labels 0-6),
            one row per test image and epoch, every epoch covering the same images.
        n_per_class: images wanted per class and epoch (>= 1; the paper: 50).
        seed: the permutation's seed (>= 0).
        epochs: the epochs to select for; default every epoch of ``predictions``.

    Returns:
        :class:`Selection`.

    Raises:
        ParameterError: ``n_per_class < 1``, a negative seed, missing columns, or an epoch not
            in the table.
        RunFolderError: the epochs do not all cover the same test images.
    """
    check_int(n_per_class, "n_per_class", low=1)
    check_int(seed, "seed", low=0)
    missing = [c for c in PREDICTION_COLUMNS if c not in predictions.columns]
    if missing:
        raise ParameterError(
            f"the prediction table lacks column(s) {', '.join(missing)}; expected "
            f"{', '.join(PREDICTION_COLUMNS)} (train/predictions.csv)"
        )
    table = predictions.astype({"epoch": np.int64, "image_id": str, "label": np.int64,
                                "predicted": np.int64})
    available = sorted(table["epoch"].unique().tolist())
    chosen_epochs = available if epochs is None else [int(e) for e in epochs]
    absent = [e for e in chosen_epochs if e not in available]
    if absent:
        raise ParameterError(
            f"no predictions for epoch(s) {absent}; the table has epochs {available}"
        )
    first = chosen_epochs[0] if chosen_epochs else None
    reference = set(table.loc[table["epoch"] == first, "image_id"])
    order = permuted_test_ids(sorted(reference), seed=seed)
    position = pd.Series(np.arange(len(order)), index=order)

    picked, short = [], []
    for epoch in chosen_epochs:
        rows = table[table["epoch"] == epoch]
        if set(rows["image_id"]) != reference or rows["image_id"].duplicated().any():
            raise RunFolderError(
                f"predictions of epoch {epoch} do not cover the same test images (once each) as "
                f"epoch {chosen_epochs[0]}; the training tables are inconsistent: rerun the "
                "training stage (02_train) with overwrite"
            )
        correct = rows[rows["label"] == rows["predicted"]]
        correct = correct.assign(position=position.loc[correct["image_id"]].to_numpy())
        correct = correct.sort_values("position", kind="stable")
        for label in range(NUM_CLASSES):
            of_class = correct[correct["label"] == label].head(n_per_class)
            picked.append(pd.DataFrame({
                "epoch": epoch,
                "image_id": of_class["image_id"].to_numpy(),
                "label": label,
                "rank": np.arange(len(of_class)),
            }))
            if len(of_class) < n_per_class:
                short.append((epoch, label, TOOLS[label], n_per_class, len(of_class)))
    images = (
        pd.concat(picked, ignore_index=True) if picked
        else pd.DataFrame(columns=list(SELECTION_COLUMNS))
    ).astype({"epoch": np.int64, "image_id": str, "label": np.int64, "rank": np.int64})
    shortfall = pd.DataFrame(short, columns=list(SHORTFALL_COLUMNS)).astype(
        {"epoch": np.int64, "label": np.int64, "tool": str, "wanted": np.int64,
         "available": np.int64}
    )
    return Selection(images=images[list(SELECTION_COLUMNS)], shortfall=shortfall)


def correct_at_every_epoch(predictions: pd.DataFrame, *, epochs: Sequence[int]) -> list[str]:
    """Test images that every one of ``epochs`` classifies correctly, sorted by id.

    Args:
        predictions: ``train/predictions.csv`` (epoch, image_id, label, predicted).
        epochs: the attacked epochs (at least one, each present in the table).
    """
    chosen = [int(e) for e in epochs]
    if not chosen:
        raise ParameterError("correct_at_every_epoch needs at least one epoch")
    absent = sorted(set(chosen) - set(predictions["epoch"].astype(int)))
    if absent:
        raise ParameterError(f"no predictions for epoch(s) {absent}")
    rows = predictions[predictions["epoch"].astype(int).isin(chosen)]
    right = rows.assign(correct=rows["label"] == rows["predicted"])
    counts = right[right["correct"]].groupby(right["image_id"].astype(str))["epoch"].nunique()
    return sorted(counts.index[counts == len(chosen)].tolist())


def followed_images(images: pd.DataFrame, *, epochs: Sequence[int] | None = None) -> pd.DataFrame:
    """The images followed across checkpoints: attacked at every one of ``epochs``.

    An attacked image is correctly classified by its checkpoint, so a followed image is
    correctly classified at every attacked checkpoint; it is also among the first
    ``n_per_class`` of its class in the shared order at each of them, which is what gives it
    an attack result to compare at every epoch.

    Args:
        images: :attr:`Selection.images` (or ``attack/selection.csv``): epoch, image_id, label.
        epochs: the attacked epochs; default every epoch of ``images``.

    Returns:
        ``image_id, label`` sorted by label, then id (empty when no image is attacked at every
        epoch).
    """
    chosen = sorted(set(images["epoch"].astype(int))) if epochs is None else [int(e)
                                                                            for e in epochs]
    rows = images[images["epoch"].astype(int).isin(chosen)]
    counts = rows.groupby(rows["image_id"].astype(str))["epoch"].nunique()
    kept = set(counts.index[counts == len(chosen)]) if chosen else set()
    table = (rows.assign(image_id=rows["image_id"].astype(str))
             .loc[lambda t: t["image_id"].isin(kept), ["image_id", "label"]]
             .drop_duplicates("image_id")
             .astype({"label": np.int64}))
    return table.sort_values(["label", "image_id"]).reset_index(drop=True)
