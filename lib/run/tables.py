"""The run folder's tables: every reader of a table an earlier stage wrote.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from lib import io
from lib.errors import RunFolderError
from lib.run import layout


def required_attack_file(run_dir: str | os.PathLike[str], kind: str) -> Path:
    path = layout.attack_file(run_dir, kind)
    if not path.is_file():
        raise RunFolderError(
            f"{path} is missing: the run folder has no attack results; run the attack stage "
            "(03_attack) first"
        )
    return path


def read_results(run_dir: str | os.PathLike[str]) -> pd.DataFrame:
    """``attack/results.csv`` (one row per attack); RunFolderError naming 03_attack if absent."""
    return pd.read_csv(required_attack_file(run_dir, "results"), dtype={"image_id": str},
                       keep_default_na=False, na_values=[""])


def read_sweep(run_dir: str | os.PathLike[str]) -> pd.DataFrame | None:
    """``attack/lr0_sweep.csv``, or None when the stage ran without a sweep."""
    path = layout.attack_file(run_dir, "lr0_sweep")
    if not path.is_file():
        return None
    return pd.read_csv(path, dtype={"image_id": str}, keep_default_na=False, na_values=[""])


def read_npz(run_dir: str | os.PathLike[str], kind: str) -> dict[str, np.ndarray] | None:
    """The arrays of the attack stage's ``kind`` file (``"traces"``, ``"gallery"``), or None
    if absent."""
    path = layout.attack_file(run_dir, kind)
    if not path.is_file():
        return None
    return io.read_npz(path)


def read_training_predictions(run_dir: str | os.PathLike[str]) -> pd.DataFrame:
    """``train/predictions.csv`` (epoch, image_id, label, predicted); RunFolderError if absent."""
    path = layout.train_table(layout.train_dir(run_dir), "predictions")
    if not path.is_file():
        raise RunFolderError(f"{path} is missing; run the training stage (02_train) first")
    return pd.read_csv(path, dtype={"image_id": str})


def read_training_metrics(run_dir: str | os.PathLike[str]) -> pd.DataFrame:
    """``train/metrics.csv``; RunFolderError naming 02_train if absent."""
    path = layout.train_table(layout.train_dir(run_dir), "metrics")
    if not path.is_file():
        raise RunFolderError(f"{path} is missing; run the training stage (02_train) first")
    return pd.read_csv(path)
