"""The run folder's layout: the stages, the folder each writes, and the path of every file in it.

A *stage* is one notebook in ``notebooks/`` (a jupytext percent script); it writes one
subfolder of the run folder (:data:`STAGE_OUTPUTS`). A run folder looks like this (every name
below is spelt only here; other modules ask the functions of this module for paths)::

    <run_dir>/
      manifest.json               parameters, versions, start time, finished flag per stage
      run.lock                    who holds the folder (:mod:`lib.run.lock`)
      notebooks/<stage>.ipynb     executed notebooks
      data/                       dataset.json, frames.csv, counts.csv    (data_file)
      train/seed_S/               one folder per trained model (its seed S):  (model_dir)
                                  epoch_NN.safetensors, optimizer_NN.safetensors,
                                  <table>.csv, train_params.json          (checkpoint_file, ...)
      attack/                     job.json, selection.csv, results.csv, traces.npz, ...,
                                  chunks/<part>/chunk_NNNNN.{csv,npz}    (attack_file, chunk_files)
      analysis/                   the analysis tables                    (analysis_file)
      minimality/                 reference.csv, timings.csv, ratios.csv (minimality_file)
      borderline/                 fmn_margins.csv, claims.csv, ...       (borderline_file)
        arms/<arm>/               a training folder per arm: epoch_NN.safetensors, the training
                                  tables, steps.csv, margins_NN.csv      (arm_dir,
                                                                          train_margins_file)
      margins/                    the margins stage's tables             (margins_file)
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from lib.errors import ParameterError

REPO = Path(__file__).resolve().parents[2]
NOTEBOOK_DIR = REPO / "notebooks"

#: The stages, each named once here; data flows through them in this order.
DATA_STAGE = "01_data"
TRAIN_STAGE = "02_train"
ATTACK_STAGE = "03_attack"
ANALYSIS_STAGE = "04_analysis"
MINIMALITY_STAGE = "05_minimality"
BORDERLINE_STAGE = "06_borderline"
MARGINS_STAGE = "07_margins"
#: The run-folder subfolder each stage writes, which an overwrite clears.
STAGE_OUTPUTS: dict[str, str] = {
    DATA_STAGE: "data",
    TRAIN_STAGE: "train",
    ATTACK_STAGE: "attack",
    ANALYSIS_STAGE: "analysis",
    MINIMALITY_STAGE: "minimality",
    BORDERLINE_STAGE: "borderline",
    MARGINS_STAGE: "margins",
}
#: The stages in the order data flows through them.
STAGES: tuple[str, ...] = tuple(STAGE_OUTPUTS)
#: The stage whose finished run another stage needs; the minimality and margins stages need the
#: attack stage's, not the analysis stage's (the margins stage also reads the minimality
#: stage's reference attacks where that stage ran); the borderline-training stage needs a
#: trained checkpoint (and reads the attack stage's margins only when it takes its PGD radius
#: there).
PREVIOUS_STAGE: dict[str, str] = {
    TRAIN_STAGE: DATA_STAGE,
    ATTACK_STAGE: TRAIN_STAGE,
    ANALYSIS_STAGE: ATTACK_STAGE,
    MINIMALITY_STAGE: ATTACK_STAGE,
    BORDERLINE_STAGE: TRAIN_STAGE,
    MARGINS_STAGE: ATTACK_STAGE,
}

#: The files of the data, attack and minimality stages, by kind.
DATA_FILES: dict[str, str] = {
    "dataset": "dataset.json", "frames": "frames.csv", "counts": "counts.csv",
}
ATTACK_FILES: dict[str, str] = {
    "job": "job.json", "selection": "selection.csv", "shortfall": "shortfall.csv",
    "results": "results.csv", "traces": "traces.npz", "gallery": "gallery.npz",
    "lr0_sweep": "lr0_sweep.csv",
}
MINIMALITY_FILES: dict[str, str] = {
    "reference": "reference.csv", "timings": "timings.csv", "ratios": "ratios.csv",
}
BORDERLINE_FILES: dict[str, str] = {
    "fmn_margins": "fmn_margins.csv", "fixed_epsilon": "fixed_epsilon.csv",
    "gradients": "gradients.csv", "transfer": "transfer.csv", "held_out": "held_out.csv",
    "attack_modes": "attack_modes.csv", "comparisons": "comparisons.csv",
    "claims": "claims.csv", "arm_timings": "timings.csv",
    "transfer_images": "transfer_images.npz",
}
#: The folder of the borderline-training stage's training folders (one per arm).
ARM_DIR = "arms"
#: The folder of the attack stage's finished chunks, inside ``attack/``.
CHUNK_DIR = "chunks"


def check_stage(stage: str) -> str:
    """``stage`` itself if it is one of :data:`STAGES`; ParameterError listing them if not."""
    if stage not in STAGE_OUTPUTS:
        raise ParameterError(f"unknown stage {stage!r}; the stages are {', '.join(STAGES)}")
    return stage


def notebook_path(stage: str) -> Path:
    """The jupytext script of ``stage``; ParameterError for an unknown stage."""
    return NOTEBOOK_DIR / f"{check_stage(stage)}.py"


def stage_dir(run_dir: str | os.PathLike[str], stage: str) -> Path:
    """The folder ``stage`` writes inside ``run_dir``."""
    return Path(run_dir) / STAGE_OUTPUTS[check_stage(stage)]


def manifest_file(run_dir: str | os.PathLike[str]) -> Path:
    """The run folder's manifest."""
    return Path(run_dir) / "manifest.json"


def executed_notebook(run_dir: str | os.PathLike[str], stage: str) -> Path:
    """Where the stage command puts ``stage``'s executed notebook."""
    return Path(run_dir) / "notebooks" / f"{stage}.ipynb"


def data_file(run_dir: str | os.PathLike[str], kind: str) -> Path:
    """A file of the data stage by kind (see ``DATA_FILES``)."""
    return stage_dir(run_dir, DATA_STAGE) / _file_name(DATA_FILES, kind, "data")


def train_dir(run_dir: str | os.PathLike[str]) -> Path:
    """The training stage's folder of a run folder (one subfolder per model)."""
    return stage_dir(run_dir, TRAIN_STAGE)


#: The prefix of a model's folder inside ``train/``; a model is named by its seed.
MODEL_PREFIX = "seed_"


def model_dir(run_dir: str | os.PathLike[str], model: int) -> Path:
    """The training folder of the model trained with seed ``model``."""
    return train_dir(run_dir) / f"{MODEL_PREFIX}{int(model)}"


def model_dirs(run_dir: str | os.PathLike[str]) -> dict[int, Path]:
    """The model folders present in ``train/``, by seed, smallest seed first."""
    found = {}
    folder = train_dir(run_dir)
    if folder.is_dir():
        for path in folder.glob(f"{MODEL_PREFIX}*"):
            seed = path.name[len(MODEL_PREFIX):]
            if path.is_dir() and seed.isdigit():
                found[int(seed)] = path
    return dict(sorted(found.items()))


def checkpoint_file(train_folder: str | os.PathLike[str], epoch: int) -> Path:
    """The model after ``epoch`` in a training folder (the run folder's ``train/``)."""
    return Path(train_folder) / f"epoch_{epoch:02d}.safetensors"


def checkpoint_path(run_dir: str | os.PathLike[str], epoch: int, *, model: int) -> Path:
    """The model of seed ``model`` after ``epoch`` in a run folder."""
    return checkpoint_file(model_dir(run_dir, model), epoch)


def optimizer_file(train_folder: str | os.PathLike[str], epoch: int) -> Path:
    """The SGD momentum buffers after ``epoch`` in a training folder."""
    return Path(train_folder) / f"optimizer_{epoch:02d}.safetensors"


def train_table(train_folder: str | os.PathLike[str], name: str) -> Path:
    """A training table (``metrics``, ``losses``, ``per_class``, ``confusion``,
    ``predictions``) in a training folder."""
    return Path(train_folder) / f"{name}.csv"


def train_params_file(train_folder: str | os.PathLike[str]) -> Path:
    """The parameters that define a training run, in its training folder."""
    return Path(train_folder) / "train_params.json"


def has_checkpoints(train_folder: str | os.PathLike[str]) -> bool:
    """Whether a training folder holds any checkpoint."""
    return any(Path(train_folder).glob("epoch_*.safetensors"))


def attack_dir(run_dir: str | os.PathLike[str]) -> Path:
    """The attack stage's folder of a run folder."""
    return stage_dir(run_dir, ATTACK_STAGE)


def attack_file(run_dir: str | os.PathLike[str], kind: str) -> Path:
    """A file of the attack stage by kind (see ``ATTACK_FILES``)."""
    return attack_dir(run_dir) / _file_name(ATTACK_FILES, kind, "attack")


def chunk_files(run_dir: str | os.PathLike[str], part: str, chunk: int) -> tuple[Path, Path]:
    """``(csv, npz)`` of an attack chunk; the CSV exists only once the chunk is complete."""
    folder = attack_dir(run_dir) / CHUNK_DIR / part
    return folder / f"chunk_{chunk:05d}.csv", folder / f"chunk_{chunk:05d}.npz"


def analysis_file(run_dir: str | os.PathLike[str], table: str) -> Path:
    """An analysis table (``<table>.csv``)."""
    return stage_dir(run_dir, ANALYSIS_STAGE) / f"{table}.csv"


def minimality_file(run_dir: str | os.PathLike[str], kind: str) -> Path:
    """A file of the minimality stage by kind (see ``MINIMALITY_FILES``)."""
    return stage_dir(run_dir, MINIMALITY_STAGE) / _file_name(MINIMALITY_FILES, kind, "minimality")


def margins_file(run_dir: str | os.PathLike[str], table: str) -> Path:
    """A table of the margins stage (``<table>.csv``)."""
    return stage_dir(run_dir, MARGINS_STAGE) / f"{table}.csv"


def borderline_file(run_dir: str | os.PathLike[str], kind: str) -> Path:
    """A file of the borderline-training stage by kind (see ``BORDERLINE_FILES``)."""
    return stage_dir(run_dir, BORDERLINE_STAGE) / _file_name(BORDERLINE_FILES, kind, "borderline")


def arm_dir(run_dir: str | os.PathLike[str], arm: str) -> Path:
    """The training folder of one arm of the borderline-training stage."""
    return stage_dir(run_dir, BORDERLINE_STAGE) / ARM_DIR / arm


def train_margins_file(train_folder: str | os.PathLike[str], epoch: int) -> Path:
    """The training images' margins after ``epoch`` in a training folder (borderline arm)."""
    return Path(train_folder) / f"margins_{epoch:02d}.csv"


def _file_name(files: Mapping[str, str], kind: str, stage: str) -> str:
    # the file name itself is accepted too, for callers that still hold one
    if kind in files:
        return files[kind]
    if kind in files.values():
        return kind
    raise ValueError(f"the {stage} stage writes no file {kind!r}; its files are {dict(files)}")


def lock_file(run_dir: str | os.PathLike[str]) -> Path:
    # not a hidden name: every hidden file in a run folder is an interrupted write's temporary
    """The run folder's lock file."""
    return Path(run_dir) / "run.lock"
