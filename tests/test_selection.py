"""The selection rule (lib/attack/selection.py) on hand-made prediction tables."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from lib import NUM_CLASSES, TOOLS
from lib.attack import selection
from lib.errors import ParameterError, RunFolderError


def predictions(correct: dict[int, set[str]], labels: dict[str, int]) -> pd.DataFrame:
    """One row per (epoch, image); ``correct[epoch]`` names the correctly classified images."""
    rows = []
    for epoch, right in correct.items():
        for image_id, label in labels.items():
            predicted = label if image_id in right else (label + 1) % NUM_CLASSES
            rows.append((epoch, image_id, label, predicted))
    return pd.DataFrame(rows, columns=["epoch", "image_id", "label", "predicted"])


# 4 Graspers (label 0), 3 Hooks (label 2), 1 Scissors (label 3); the other classes are absent
LABELS = {"g0": 0, "g1": 0, "g2": 0, "g3": 0, "h0": 2, "h1": 2, "h2": 2, "s0": 3}


def order(seed: int) -> list[str]:
    return selection.permuted_test_ids(list(LABELS), seed=seed)


def test_permutation_depends_only_on_the_set_of_ids_and_the_seed() -> None:
    ids = list(LABELS)
    assert selection.permuted_test_ids(ids, seed=3) == selection.permuted_test_ids(
        ids[::-1], seed=3
    )
    assert sorted(selection.permuted_test_ids(ids, seed=3)) == sorted(ids)
    assert selection.permuted_test_ids(ids, seed=3) != selection.permuted_test_ids(ids, seed=4)


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_first_correct_images_in_permutation_order(seed: int) -> None:
    everything = set(LABELS)
    table = predictions({1: everything}, LABELS)
    chosen = selection.select_images(table, n_per_class=2, seed=seed).images
    permuted = order(seed)
    for label in (0, 2):
        expected = [i for i in permuted if LABELS[i] == label][:2]
        got = chosen[chosen["label"] == label].sort_values("rank")["image_id"].tolist()
        assert got == expected
    assert chosen.loc[chosen["label"] == 3, "image_id"].tolist() == ["s0"]
    assert chosen.groupby("label")["rank"].apply(list).to_dict() == {0: [0, 1], 2: [0, 1], 3: [0]}


def test_misclassified_images_are_skipped_and_the_order_is_shared_across_epochs() -> None:
    permuted = order(0)
    graspers = [i for i in permuted if LABELS[i] == 0]
    # epoch 2 gets the first Grasper of the permutation wrong
    table = predictions({1: set(LABELS), 2: set(LABELS) - {graspers[0]}}, LABELS)
    chosen = selection.select_images(table, n_per_class=2, seed=0).images
    first = chosen[(chosen["epoch"] == 1) & (chosen["label"] == 0)]["image_id"].tolist()
    second = chosen[(chosen["epoch"] == 2) & (chosen["label"] == 0)]["image_id"].tolist()
    assert first == graspers[:2]
    assert second == graspers[1:3]  # the same order, one image further
    # the classes the epochs agree on are attacked with the same images
    for label in (2, 3):
        a = chosen[(chosen["epoch"] == 1) & (chosen["label"] == label)]["image_id"].tolist()
        b = chosen[(chosen["epoch"] == 2) & (chosen["label"] == label)]["image_id"].tolist()
        assert a == b


def test_shortfall_reports_classes_with_too_few_correct_images() -> None:
    table = predictions({1: set(LABELS) - {"h0", "h1"}, 3: set(LABELS)}, LABELS)
    result = selection.select_images(table, n_per_class=3, seed=0)
    counts = result.images.groupby(["epoch", "label"]).size().to_dict()
    assert counts == {(1, 0): 3, (1, 2): 1, (1, 3): 1, (3, 0): 3, (3, 2): 3, (3, 3): 1}
    short = result.shortfall.set_index(["epoch", "label"])
    assert list(result.shortfall.columns) == ["epoch", "label", "tool", "wanted", "available"]
    assert short.loc[(1, 2), "available"] == 1 and short.loc[(1, 2), "wanted"] == 3
    assert short.loc[(1, 3), "available"] == 1
    assert short.loc[(3, 3), "available"] == 1
    assert (3, 2) not in short.index and (1, 0) not in short.index
    # absent classes are reported with 0 available
    assert short.loc[(1, 1), "available"] == 0 and short.loc[(1, 1), "tool"] == TOOLS[1]
    # absent classes 1, 4, 5, 6 at both epochs, Hook and Scissors at epoch 1, Scissors at 3
    assert len(result.shortfall) == 2 * 4 + 2 + 1


def test_only_the_requested_epochs() -> None:
    table = predictions({1: set(LABELS), 2: set(LABELS), 3: set()}, LABELS)
    chosen = selection.select_images(table, n_per_class=1, seed=0, epochs=[2]).images
    assert chosen["epoch"].unique().tolist() == [2]
    everything = selection.select_images(table, n_per_class=1, seed=0).images
    assert (everything["epoch"] == 3).sum() == 0  # nothing correct at epoch 3


def test_row_order_of_the_table_does_not_matter() -> None:
    table = predictions({1: set(LABELS) - {"g2"}, 2: set(LABELS)}, LABELS)
    shuffled = table.sample(frac=1.0, random_state=5)
    a = selection.select_images(table, n_per_class=2, seed=2)
    b = selection.select_images(shuffled, n_per_class=2, seed=2)
    pd.testing.assert_frame_equal(a.images, b.images)
    pd.testing.assert_frame_equal(a.shortfall, b.shortfall)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"n_per_class": 0}, ParameterError, "n_per_class must be an int >= 1"),
        ({"n_per_class": 2.0}, ParameterError, "n_per_class must be an int >= 1"),
        ({"seed": -1}, ParameterError, "seed must be an int >= 0"),
        ({"epochs": [9]}, ParameterError, r"no predictions for epoch\(s\) \[9\]"),
    ],
)
def test_bad_arguments(kwargs: dict, error: type, message: str) -> None:
    table = predictions({1: set(LABELS)}, LABELS)
    arguments = {"n_per_class": 1, "seed": 0, **kwargs}
    with pytest.raises(error, match=message):
        selection.select_images(table, **arguments)


def test_missing_columns_and_inconsistent_epochs() -> None:
    table = predictions({1: set(LABELS), 2: set(LABELS)}, LABELS)
    with pytest.raises(ParameterError, match="lacks column.*predicted"):
        selection.select_images(table.drop(columns="predicted"), n_per_class=1, seed=0)
    uneven = table[~((table["epoch"] == 2) & (table["image_id"] == "g0"))]
    with pytest.raises(RunFolderError, match="epoch 2 do not cover the same test images"):
        selection.select_images(uneven, n_per_class=1, seed=0)


def test_selection_dtypes() -> None:
    chosen = selection.select_images(
        predictions({1: set(LABELS)}, LABELS), n_per_class=1, seed=0
    ).images
    assert chosen["epoch"].dtype == np.int64 and chosen["rank"].dtype == np.int64
    assert list(chosen.columns) == ["epoch", "image_id", "label", "rank"]


# Three checkpoints; g1 and h0 are wrong at epoch 2, g3 wrong at epoch 3.
TRACKED = {1: {"g0", "g1", "g2", "g3", "h0", "h1", "s0"},
           2: {"g0", "g2", "g3", "h1", "h2", "s0"},
           3: {"g0", "g1", "g2", "h0", "h1", "h2", "s0"}}


def test_correct_at_every_epoch_on_a_hand_made_table() -> None:
    table = predictions(TRACKED, LABELS)
    assert selection.correct_at_every_epoch(table, epochs=[1, 2, 3]) == ["g0", "g2", "h1", "s0"]
    assert selection.correct_at_every_epoch(table, epochs=[1, 3]) == [
        "g0", "g1", "g2", "h0", "h1", "s0"]
    with pytest.raises(ParameterError, match="epoch"):
        selection.correct_at_every_epoch(table, epochs=[4])


def test_followed_images_are_attacked_at_every_epoch() -> None:
    table = predictions(TRACKED, LABELS)
    chosen = selection.select_images(table, n_per_class=2, seed=0)
    followed = selection.followed_images(chosen.images)
    attacked = {e: set(chosen.images.loc[chosen.images["epoch"] == e, "image_id"])
                for e in (1, 2, 3)}
    assert set(followed["image_id"]) == attacked[1] & attacked[2] & attacked[3]
    # every followed image is correct at every epoch
    assert set(followed["image_id"]) <= {"g0", "g2", "h1", "s0"}
    assert "s0" in set(followed["image_id"])  # the only Scissors, correct everywhere
    assert followed["label"].is_monotonic_increasing


def test_followed_images_by_hand() -> None:
    images = pd.DataFrame({"epoch": [1, 1, 1, 2, 2, 3, 3],
                           "image_id": ["a", "b", "c", "a", "c", "a", "b"],
                           "label": [2, 0, 1, 2, 1, 2, 0], "rank": 0})
    assert selection.followed_images(images)["image_id"].tolist() == ["a"]
    assert selection.followed_images(images, epochs=[1, 2])["image_id"].tolist() == ["c", "a"]
    assert selection.followed_images(images, epochs=[1, 3])["image_id"].tolist() == ["b", "a"]
