"""The data stage's files in the run folder: the dataset's index, written once and read by every
later stage to rebuild a split without decoding.

:func:`write_run_data` writes ``data/dataset.json`` (where the frames came from and at which
size), ``data/frames.csv`` (one row per single-tool frame) and ``data/counts.csv``;
:func:`load_run_split` rebuilds one split from them and the frame cache.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from lib.data.cache import cache_folder
from lib.data.counts import class_counts
from lib.data.datasets import frames_from_cache, image_folder_split
from lib.data.frames import INDEX_COLUMNS, FrameSet
from lib.errors import ParameterError, RunFolderError
from lib.run import layout, tables


def write_run_data(
    run_dir: str | os.PathLike[str],
    splits: Mapping[str, FrameSet],
    *,
    dataset_meta: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``data/dataset.json``, ``data/frames.csv`` and ``data/counts.csv`` (atomically).

    Args:
        run_dir: the run folder (``data/runs/<profile>``).
        splits: ``{"train": FrameSet, "test": FrameSet}`` from a loader.
        dataset_meta: the ``dataset.json`` fields; default: ``meta["dataset"]`` of the splits.

    Returns:
        The ``data/`` folder.
    """
    if dataset_meta is None:
        dataset_meta = next(iter(splits.values())).meta.get("dataset")
        if dataset_meta is None:
            raise ParameterError("dataset_meta not given and the FrameSets carry none.")
    tables.write_record(run_dir, "dataset", dict(dataset_meta))
    frames = pd.concat([splits[split].index for split in splits], ignore_index=True)
    tables.write_table(run_dir, "frames", frames[list(INDEX_COLUMNS)])
    tables.write_table(run_dir, "counts", class_counts(splits))
    return layout.stage_dir(run_dir, layout.DATA_STAGE)


def load_run_split(run_dir: str | os.PathLike[str], split: str) -> FrameSet:
    """Rebuild one split from a run folder's ``data/`` files and the frame cache.

    Raises:
        RunFolderError: ``data/dataset.json``, ``data/frames.csv`` or a cache file is missing
            (run the data stage first), or the split has no rows.
    """
    dataset = tables.read_record(run_dir, "dataset")
    frames = tables.read_table(run_dir, "frames")
    rows = frames[frames["split"] == split]
    if rows.empty:
        raise RunFolderError(
            f"{tables.table_path(run_dir, 'frames')}: no rows for split {split!r} (splits there: "
            f"{sorted(frames['split'].unique())}); run the data stage (01_data) first."
        )
    image_size = int(dataset["image_size"])
    meta = {"dataset": dataset, "decoded_videos": []}
    if dataset["kind"] == "imagefolder":
        root = Path(dataset["root"])
        files = list(zip(rows["source"], rows["label"].tolist(), strict=True))
        return image_folder_split(root, files, split=split, image_size=image_size, meta=meta)
    folder = cache_folder(dataset["root"], cache_dir=dataset["cache_dir"], image_size=image_size)
    videos = [
        (source, group[["frame", "label"]], folder / f"{source}.npy")
        for source, group in rows.groupby("source", sort=False)
    ]
    frame_set = frames_from_cache(videos, split=split, image_size=image_size, meta=meta)
    # back into the order of frames.csv (an index permutation: no image is read)
    order = pd.Index(frame_set.index["image_id"]).get_indexer(rows["image_id"])
    return frame_set.subset(order)
