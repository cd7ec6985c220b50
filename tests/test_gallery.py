"""The borderline gallery (lib/analysis/gallery.py): whole at the book's width, failed attacks
marked, the amplification stated, the caption's numbers measured on what is shown."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from lib.analysis import gallery as gallery_lib

NAMES = ["constant", "iteration", "exponential", "step", "loss-adaptive"]
SIZE = 16


def make_gallery(*, failed: set[str], change: float = 4 / 255) -> tuple[dict, pd.DataFrame]:
    """One image attacked by every schedule: pixel values move by ``change`` (each schedule
    one more grey level), the ``failed`` schedules did not reach the target."""
    original = np.full((3, SIZE, SIZE), 100, dtype=np.uint8)
    rows, arrays = [], {k: [] for k in ("epoch", "row_id", "image_id", "schedule", "source",
                                        "target", "original", "borderline")}
    for k, name in enumerate(NAMES):
        moved = original / 255 + change + k / 255
        for key, value in (("epoch", 5), ("row_id", k), ("image_id", "img"), ("schedule", name),
                           ("source", 2), ("target", 3), ("original", original),
                           ("borderline", moved)):
            arrays[key].append(value)
        rows.append({"epoch": 5, "row_id": k, "success": name not in failed,
                     "l1_255": (change * 255 + k)})
    return {k: np.array(v) for k, v in arrays.items()}, pd.DataFrame(rows)


def test_the_picture_has_the_book_width_whatever_the_schedules() -> None:
    gallery, results = make_gallery(failed=set())
    for names in (NAMES, NAMES[:2]):
        picture = gallery_lib.gallery_picture(gallery, results, schedules=names)
        assert picture.width == gallery_lib.GALLERY_WIDTH


def test_a_failed_attack_is_framed_in_red() -> None:
    gallery, results = make_gallery(failed={"step"})
    picture = np.asarray(gallery_lib.gallery_picture(gallery, results, schedules=NAMES))
    red = (picture[..., 0] > 180) & (picture[..., 1] < 60) & (picture[..., 2] < 60)
    columns = np.nonzero(red.any(axis=0))[0]
    tile = (gallery_lib.GALLERY_WIDTH - 6 * len(NAMES)) // (1 + len(NAMES))
    step_column = NAMES.index("step") + 1
    left = step_column * (tile + 6)
    assert columns.min() >= left and columns.max() < left + tile  # only the step tile ...
    assert red[:, left].sum() >= tile - 1  # ... and a frame down its whole side, not a label


@pytest.mark.parametrize("failed", [set(), {"step", "exponential"}])
def test_the_summary_counts_what_is_shown(failed: set[str]) -> None:
    gallery, results = make_gallery(failed=failed)
    examples = gallery_lib.gallery_examples(gallery, results)
    (example,) = examples
    assert example.source == 2 and example.target == 3
    assert example.peak == pytest.approx((4 + 4) / 255, abs=1e-6)  # loss-adaptive moved most
    summary = gallery_lib.gallery_summary(examples)
    assert summary["attacks"] == 5 and summary["failed"] == len(failed)
    successful = [k for k, name in enumerate(NAMES) if name not in failed]
    assert summary["largest_change_255"] == pytest.approx(4 + max(successful), abs=1e-3)
    assert summary["mean_l1_255"] == pytest.approx(np.mean([4 + k for k in successful]))
