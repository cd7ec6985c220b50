"""Frame counts for the data chapter, and Cholec80's published counts to compare them with.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from lib import NUM_CLASSES, TOOLS
from lib.data import cholec80
from lib.data.datasets import DEFAULT_TEST_VIDEOS, DEFAULT_TRAIN_VIDEOS, SPLITS, split_records
from lib.data.frames import FrameSet

#: Single-tool frames of real Cholec80 per split and tool, as in Ding & Moeller (2023) and
#: reproduced by this package's reading of the annotations (the method chapter, "Decisions where
#: the paper is open").
PUBLISHED_COUNTS: Mapping[str, Mapping[str, int]] = {
    "train": {
        "Grasper": 11_728,
        "Bipolar": 1_085,
        "Hook": 15_057,
        "Scissors": 541,
        "Clipper": 1_028,
        "Irrigator": 1_334,
        "SpecimenBag": 704,
    },
    "test": {
        "Grasper": 11_779,
        "Bipolar": 2_137,
        "Hook": 29_830,
        "Scissors": 942,
        "Clipper": 1_619,
        "Irrigator": 1_565,
        "SpecimenBag": 841,
    },
}
#: Totals of the same table (single-tool frames per split).
PUBLISHED_TOTALS: Mapping[str, int] = {"train": 31_477, "test": 48_713}

#: All 80 videos of Cholec80, counted from its annotation files: annotated frames, and how many
#: show no tool, one tool (the paper's 80,190) or two or more.
PUBLISHED_TOOLS_PER_FRAME: Mapping[str, int] = {
    "annotated": 184_498,
    "0": 23_101,
    "1": 80_190,  # = 184,498 - 23,101 - 81,207 = 31,477 + 48,713
    "2+": 81_207,
}


def tools_per_frame(
    root: str | os.PathLike[str],
    *,
    train_videos: str | Iterable[int] = DEFAULT_TRAIN_VIDEOS,
    test_videos: str | Iterable[int] = DEFAULT_TEST_VIDEOS,
) -> pd.DataFrame:
    """How many annotated frames show 0, 1 or 2+ tools, per split (annotation files only).

    Returns:
        DataFrame ``split, tools ("0", "1", "2+"), frames, share`` (share of the split's
        annotated frames, in [0, 1]), plus ``split = "all"`` rows.
    """
    root = Path(root)
    splits = split_records(cholec80.find_videos(root), root, train_videos, test_videos)
    rows = []
    totals = {"0": 0, "1": 0, "2+": 0}
    for split in SPLITS:
        present = np.concatenate(
            [
                cholec80.read_tool_annotations(record.annotation_path)[list(TOOLS)]
                .to_numpy()
                .sum(axis=1)
                for record in splits[split]
            ]
        )
        counts = {"0": int((present == 0).sum()), "1": int((present == 1).sum())}
        counts["2+"] = int((present >= 2).sum())
        for tools, frames in counts.items():
            totals[tools] += frames
            rows.append((split, tools, frames, frames / max(len(present), 1)))
    grand = sum(totals.values())
    rows.extend(("all", tools, frames, frames / max(grand, 1)) for tools, frames in totals.items())
    return pd.DataFrame(rows, columns=["split", "tools", "frames", "share"])


def class_counts(splits: Mapping[str, FrameSet] | pd.DataFrame) -> pd.DataFrame:
    """Images per split and tool: DataFrame ``split, tool, frames`` (every tool, zeros too).

    Accepts ``{"train": FrameSet, ...}`` or an index table with ``split`` and ``label``.
    """
    if isinstance(splits, pd.DataFrame):
        index = splits
    else:
        index = pd.concat([frame_set.index for frame_set in splits.values()], ignore_index=True)
    present = [split for split in SPLITS if split in set(index["split"])]
    present += sorted(set(index["split"]) - set(SPLITS))
    rows = []
    for split in present:
        labels = index.loc[index["split"] == split, "label"].to_numpy(np.int64)
        counts = np.bincount(labels, minlength=NUM_CLASSES)
        rows.extend((split, tool, int(counts[label])) for label, tool in enumerate(TOOLS))
    return pd.DataFrame(rows, columns=["split", "tool", "frames"])


def compare_with_published(counts: pd.DataFrame) -> pd.DataFrame:
    """Our single-tool counts beside the published Cholec80 ones (:data:`PUBLISHED_COUNTS`).

    Args:
        counts: from :func:`class_counts` (``split, tool, frames``).

    Returns:
        DataFrame ``split, tool, frames, published, match`` for each split and tool, plus a
        ``tool = "all"`` row per split with the totals; ``match`` is a bool.
    """
    rows = []
    for split in SPLITS:
        ours = counts[counts["split"] == split].set_index("tool")["frames"]
        for tool in TOOLS:
            frames = int(ours.get(tool, 0))
            published = PUBLISHED_COUNTS[split][tool]
            rows.append((split, tool, frames, published, frames == published))
        total = int(ours.sum())
        rows.append(
            (split, "all", total, PUBLISHED_TOTALS[split], total == PUBLISHED_TOTALS[split])
        )
    return pd.DataFrame(rows, columns=["split", "tool", "frames", "published", "match"])
