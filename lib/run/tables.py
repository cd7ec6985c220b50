"""The run folder's tables and records: each declared once, with its one reader and writer.

Every CSV table a stage writes is declared in :data:`TABLES`: the stage that writes it, its
columns in file order and their dtypes. :func:`read_table` and :func:`write_table` are its one
reader and writer (the training stage's tables, which :func:`lib.train.loop.fit` writes into
any folder, go through :func:`read_train_table` and :func:`write_train_table`; the attack
stage's chunks through :func:`read_chunk` and :func:`write_chunk`). The JSON records
(``manifest.json``, ``dataset.json``, ``train_params.json``, ``job.json``) and the arrays
(``traces.npz``, ``gallery.npz``) have their readers and writers here too; the paths come from
:mod:`lib.run.layout`. No other module reads a file of the run folder.

The attack stage's result columns derive from the engine's result type
(:func:`lib.attack.results.result_columns`): the keys of an attack, then its values.

Tables are read with every declared dtype and only the empty field as missing, so a table read
back equals the table written and a merge of written chunks is byte-stable.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lib import io
from lib.analysis.minimality_norms import NORM_COLUMNS
from lib.attack.results import result_columns
from lib.attack.selection import PREDICTION_COLUMNS, SELECTION_COLUMNS, SHORTFALL_COLUMNS
from lib.data.frames import INDEX_COLUMNS
from lib.errors import RunFolderError
from lib.run import layout
from lib.run.layout import (
    ANALYSIS_STAGE,
    ATTACK_STAGE,
    BORDERLINE_STAGE,
    DATA_STAGE,
    MARGINS_STAGE,
    MINIMALITY_STAGE,
    TRAIN_STAGE,
)
from lib.run.stage_columns import BORDERLINE_COLUMNS, MARGIN_COLUMNS
from lib.train.borderline import STEP_COLUMNS


@dataclass(frozen=True)
class Table:
    """A CSV table of the run folder.

    Attributes:
        stage: the stage that writes it (its folder holds the file).
        columns: column name -> dtype ("str", "int64", "float64", "bool" or "Int64", an
            integer that may be missing: an empty field), in file order.
        holds: what the table holds, for the message when it is missing.
    """

    stage: str
    columns: Mapping[str, str]
    holds: str


def typed(names: tuple[str, ...], dtypes: tuple[str, ...]) -> dict[str, str]:
    """``{name: dtype}`` for columns declared by name elsewhere (one dtype per name)."""
    if len(names) != len(dtypes):
        raise ValueError(f"{len(names)} columns {names} but {len(dtypes)} dtypes")
    return dict(zip(names, dtypes, strict=True))


#: The column naming the trained model (its seed) in every table that pools several models:
#: the attack stage's tables and the run-wide views of the training tables.
MODEL_COLUMN: dict[str, str] = {"model": "int64"}

#: The keys of one attack in the attack stage's tables: which job row it is.
ATTACK_KEYS: dict[str, str] = {
    **MODEL_COLUMN, "epoch": "int64", "schedule": "str", "mode": "str", "row_id": "int64",
    "image_id": "str", "source": "int64", "target": "int64",
}


def attack_result_columns() -> dict[str, str]:
    """The columns of ``results.csv`` (and of every chunk): the keys of an attack, then the
    engine's per-attack values (row_id is a key), with ``l1_255`` (L1 in 1/255) after ``l1``."""
    columns = dict(ATTACK_KEYS)
    for name, dtype in result_columns().items():
        columns.setdefault(name, dtype)
        if name == "l1":
            columns["l1_255"] = "float64"
    return columns


#: The columns of ``results.csv``, one row per attack.
RESULT_COLUMNS: tuple[str, ...] = tuple(attack_result_columns())
#: The columns of ``lr0_sweep.csv``: the lr0 of the row, then the result columns.
SWEEP_COLUMNS: tuple[str, ...] = ("lr0", *RESULT_COLUMNS)
#: The training stage's tables; ``metrics`` is written last in every epoch, so an epoch counts
#: as finished once it has a metrics row.
TRAIN_TABLES: tuple[str, ...] = ("losses", "per_class", "confusion", "predictions", "metrics")
#: The table a training run with an objective (:mod:`lib.train.borderline`) adds to its
#: folder, one row per SGD step; the borderline arm also writes ``margins_NN.csv`` per epoch
#: (:func:`read_margins`, :func:`write_margins`).
OBJECTIVE_TABLES: tuple[str, ...] = ("steps",)
#: The analysis stage's tables, each the output of a function of :mod:`lib.analysis.aggregates`,
#: :mod:`lib.analysis.paired`, :mod:`lib.analysis.trends` or :mod:`lib.analysis.claim_table`
#: (whose docstring gives its columns); the book offers them for download.
ANALYSIS_TABLES: tuple[str, ...] = (
    "accuracy_f1", "success_rate", "mean_l1", "paired_l1", "iterations_lr", "paired_iterations",
    "class_pair_l1", "l1_histogram", "per_image_l1", "per_image_change", "refined_ranking",
    "ranking_changes", "traces_summary", "lr0_sensitivity", "paper_claims", "claims_lr0",
    "skipped",
)

_TRAINING = "training predictions"
#: The margins stage's tables: its own attacks (:mod:`lib.run.margins_stage`) and the outputs
#: of :mod:`lib.analysis.margins`, :mod:`lib.analysis.pareto`, :mod:`lib.analysis.failures`
#: and :mod:`lib.analysis.loss_comparison` (columns in :mod:`lib.run.stage_columns`).
MARGIN_TABLES: dict[str, Table] = {
    "untargeted": Table(MARGINS_STAGE, attack_result_columns(), "untargeted attacks"),
    "margin_loss": Table(MARGINS_STAGE, {**attack_result_columns(), "outcome": "str"},
                         "logit-margin reruns"),
    **{name: Table(MARGINS_STAGE, columns, holds)
       for name, (columns, holds) in MARGIN_COLUMNS.items()},
}
#: Every CSV table of the run folder but the analysis tables.
TABLES: dict[str, Table] = {
    "frames": Table(DATA_STAGE, typed(INDEX_COLUMNS, ("str", "str", "str", "int64", "int64")),
                    "dataset index"),
    "counts": Table(DATA_STAGE, {"split": "str", "tool": "str", "frames": "int64"},
                    "frame counts"),
    "losses": Table(TRAIN_STAGE, {"epoch": "int64", "step": "int64", "loss": "float64"},
                    "training losses"),
    "per_class": Table(TRAIN_STAGE, {
        "epoch": "int64", "tool": "str", "label": "int64", "precision": "float64",
        "recall": "float64", "f1": "float64", "support": "int64"}, "per-class scores"),
    "confusion": Table(TRAIN_STAGE, {"epoch": "int64", "true": "int64", "predicted": "int64",
                                     "count": "int64"}, "confusion matrices"),
    "predictions": Table(TRAIN_STAGE, typed(PREDICTION_COLUMNS, ("int64", "str", "int64",
                                                                 "int64")), _TRAINING),
    "metrics": Table(TRAIN_STAGE, {
        "epoch": "int64", "accuracy": "float64", "macro_f1": "float64", "train_loss": "float64",
        "test_loss": "float64"}, "training metrics"),
    "steps": Table(BORDERLINE_STAGE, typed(STEP_COLUMNS, (
        "int64", "int64", "int64", "float64", "int64", "int64", "int64", "float64", "int64",
        "int64", "int64", "int64", "float64")), "passes per training step"),
    "margins": Table(BORDERLINE_STAGE, {"image": "int64", "margin": "float64", "epoch": "int64",
                                        "step": "int64"}, "borderline margins of training images"),
    "selection": Table(ATTACK_STAGE, {**MODEL_COLUMN, **typed(SELECTION_COLUMNS, (
        "int64", "str", "int64", "int64"))}, "attack selection"),
    "shortfall": Table(ATTACK_STAGE, {**MODEL_COLUMN, **typed(SHORTFALL_COLUMNS, (
        "int64", "int64", "str", "int64", "int64"))}, "attack shortfall"),
    "results": Table(ATTACK_STAGE, attack_result_columns(), "attack results"),
    "lr0_sweep": Table(ATTACK_STAGE, {"lr0": "float64", **attack_result_columns()},
                       "lr0 sweep"),
    "reference": Table(MINIMALITY_STAGE, {
        "epoch": "int64", "image_id": "str", "target": "int64", "attack": "str",
        "steps": "int64", "success": "bool", "l1": "float64", "l2": "float64",
        "linf": "float64", "changed_fraction": "float64"}, "reference attacks"),
    "timings": Table(MINIMALITY_STAGE, {
        "epoch": "int64", "image_id": "str", "target": "int64", "attack": "str",
        "steps": "int64", "seconds": "float64"}, "reference attack timings"),
    "ratios": Table(MINIMALITY_STAGE, typed(NORM_COLUMNS, (
        "str", "int64", "str", "int64", "int64", "int64", *["float64"] * 11, "bool")),
        "minimality ratios per norm"),
    **MARGIN_TABLES,
    **{name: Table(BORDERLINE_STAGE, columns, holds)
       for name, (columns, holds) in BORDERLINE_COLUMNS.items()},
}
#: The stage names the messages use.
STAGE_WORDS = {DATA_STAGE: "data", TRAIN_STAGE: "training", ATTACK_STAGE: "attack",
               ANALYSIS_STAGE: "analysis", MINIMALITY_STAGE: "minimality",
               BORDERLINE_STAGE: "borderline-training", MARGINS_STAGE: "margins"}


# --------------------------------------------------------------------------- CSV tables


def table_path(run_dir: str | os.PathLike[str], name: str) -> Path:
    """Where table ``name`` of :data:`TABLES` lives in ``run_dir`` (not for the tables of a
    training folder, which :func:`read_train_table` and :func:`read_margins` read)."""
    stage = declared(name).stage
    if name in (*OBJECTIVE_TABLES, "margins"):
        raise ValueError(f"table {name!r} lives in a training folder; read it with "
                         "read_train_table or read_margins")
    if stage == DATA_STAGE:
        return layout.data_file(run_dir, name)
    if stage == TRAIN_STAGE:
        raise ValueError(f"{name!r} is a training table, one per model: read it with "
                         "read_model_tables (every model) or read_train_table (one folder)")
    if stage == ATTACK_STAGE:
        return layout.attack_file(run_dir, name)
    if stage == BORDERLINE_STAGE:
        return layout.borderline_file(run_dir, name)
    if stage == MARGINS_STAGE:
        return layout.margins_file(run_dir, name)
    return layout.minimality_file(run_dir, name)


def declared(name: str) -> Table:
    """The declaration of table ``name``; ValueError for a table nobody declared."""
    if name not in TABLES:
        raise ValueError(f"the run folder has no table {name!r}; its tables are "
                         f"{', '.join(TABLES)}")
    return TABLES[name]


def missing_table(path: Path, table: Table) -> RunFolderError:
    """The error for a table an earlier stage has not written yet."""
    return RunFolderError(
        f"{path} is missing: the run folder has no {table.holds}; run the "
        f"{STAGE_WORDS[table.stage]} stage ({table.stage}) first"
    )


def read_csv(path: Path, table: Table) -> pd.DataFrame:
    """A table's file with its declared dtypes (the one ``read_csv`` of the run folder)."""
    dtypes = {name: str if dtype == "str" else dtype for name, dtype in table.columns.items()}
    return pd.read_csv(path, dtype=dtypes, keep_default_na=False, na_values=[""])


def write_csv(path: Path, table: Table, frame: pd.DataFrame) -> None:
    """``frame`` as the table's file, its columns in the declared order (atomically).

    Raises:
        ValueError: the frame lacks a declared column or has one the table does not declare.
    """
    if set(frame.columns) != set(table.columns):
        raise ValueError(
            f"{path.name}: columns {sorted(set(frame.columns) ^ set(table.columns))} differ "
            f"from the declared ones {list(table.columns)}"
        )
    io.write_csv(path, frame[list(table.columns)])


def read_table(run_dir: str | os.PathLike[str], name: str, *,
               missing_ok: bool = False) -> pd.DataFrame | None:
    """Table ``name`` of ``run_dir``.

    Raises:
        RunFolderError: the table is missing (naming the stage to run), unless ``missing_ok``,
            which returns None instead.
    """
    table = declared(name)
    path = table_path(run_dir, name)
    if not path.is_file():
        if missing_ok:
            return None
        raise missing_table(path, table)
    return read_csv(path, table)


def write_table(run_dir: str | os.PathLike[str], name: str, frame: pd.DataFrame) -> Path:
    """Write table ``name`` of ``run_dir`` (its declared columns, atomically); its path."""
    path = table_path(run_dir, name)
    write_csv(path, declared(name), frame)
    return path


def read_results(run_dir: str | os.PathLike[str]) -> pd.DataFrame:
    """``attack/results.csv`` (one row per attack); RunFolderError naming 03_attack if absent."""
    return read_table(run_dir, "results")


def read_sweep(run_dir: str | os.PathLike[str]) -> pd.DataFrame | None:
    """``attack/lr0_sweep.csv``, or None when the stage ran without a sweep."""
    return read_table(run_dir, "lr0_sweep", missing_ok=True)


def read_model_tables(run_dir: str | os.PathLike[str], name: str) -> pd.DataFrame:
    """Training table ``name`` of every trained model, one under the other, with the
    :data:`MODEL_COLUMN` (the model's seed) first; smallest seed first.

    Raises:
        RunFolderError: no model folder of ``train/`` holds the table (run 02_train).
    """
    parts = []
    for model, folder in layout.model_dirs(run_dir).items():
        table = read_train_table(folder, name)
        if table is not None:
            parts.append(table.assign(model=model)[[*MODEL_COLUMN, *TABLES[name].columns]])
    if not parts:
        raise missing_table(layout.train_table(layout.model_dir(run_dir, 0), name), TABLES[name])
    return pd.concat(parts, ignore_index=True).astype(MODEL_COLUMN)


def read_predictions(run_dir: str | os.PathLike[str]) -> pd.DataFrame:
    """Every model's ``predictions.csv`` (model, epoch, image_id, label, predicted);
    RunFolderError naming 02_train if absent."""
    return read_model_tables(run_dir, "predictions")


def read_training_metrics(run_dir: str | os.PathLike[str]) -> pd.DataFrame:
    """Every model's ``metrics.csv``, with the model column; RunFolderError naming 02_train
    if absent."""
    return read_model_tables(run_dir, "metrics")


def read_analysis_table(run_dir: str | os.PathLike[str], name: str, *,
                        missing_ok: bool = False) -> pd.DataFrame | None:
    """``analysis/<name>.csv`` (one of :data:`ANALYSIS_TABLES`), its types as pandas reads
    them; RunFolderError naming 04_analysis if absent (None instead with ``missing_ok``)."""
    path = layout.analysis_file(run_dir, name)
    if name not in ANALYSIS_TABLES:
        raise ValueError(f"the analysis stage writes no table {name!r}; its tables are "
                         f"{', '.join(ANALYSIS_TABLES)}")
    if not path.is_file():
        if missing_ok:
            return None
        raise RunFolderError(f"{path} is missing; run the analysis stage ({ANALYSIS_STAGE})")
    return pd.read_csv(path)


def write_analysis_table(run_dir: str | os.PathLike[str], name: str,
                         frame: pd.DataFrame) -> Path:
    """Write an analysis table (one of :data:`ANALYSIS_TABLES`) as ``analysis/<name>.csv``."""
    if name not in ANALYSIS_TABLES:
        raise ValueError(f"the analysis stage writes no table {name!r}; its tables are "
                         f"{', '.join(ANALYSIS_TABLES)}")
    path = layout.analysis_file(run_dir, name)
    io.write_csv(path, frame)
    return path


def claim_tables(run_dir: str | os.PathLike[str]) -> dict[tuple[str, str], pd.DataFrame]:
    """Every claims table in the stages' folders of ``run_dir``: a CSV whose name contains
    "claims" and which has the columns ``claim`` and ``verdict`` (the analysis stage's
    ``paper_claims``, and those other stages add), keyed by (folder, table name)."""
    found = {}
    for stage in layout.STAGES:
        for path in sorted(layout.stage_dir(run_dir, stage).glob("*claims*.csv")):
            table = pd.read_csv(path, keep_default_na=False, na_values=[""])
            if {"claim", "verdict"} <= set(table.columns):
                found[(layout.STAGE_OUTPUTS[stage], path.stem)] = table
    return found


# --------------------------------------------------------------------------- training folders


def _train_table_name(name: str) -> str:
    if name not in (*TRAIN_TABLES, *OBJECTIVE_TABLES):
        raise ValueError(f"training writes no table {name!r}; its tables are "
                         f"{(*TRAIN_TABLES, *OBJECTIVE_TABLES)}")
    return name


def read_train_table(train_folder: str | os.PathLike[str], name: str) -> pd.DataFrame | None:
    """A training table (:data:`TRAIN_TABLES`, :data:`OBJECTIVE_TABLES`) of a training
    folder, or None when absent."""
    path = layout.train_table(train_folder, _train_table_name(name))
    return read_csv(path, TABLES[name]) if path.is_file() else None


def write_train_table(train_folder: str | os.PathLike[str], name: str,
                      frame: pd.DataFrame) -> None:
    """Write a training table (:data:`TRAIN_TABLES`, :data:`OBJECTIVE_TABLES`) into a
    training folder, atomically."""
    write_csv(layout.train_table(train_folder, _train_table_name(name)), TABLES[name], frame)


def read_margins(train_folder: str | os.PathLike[str], epoch: int) -> pd.DataFrame | None:
    """The borderline arm's margins of its training images after ``epoch`` (``margins_NN.csv``
    of a training folder), or None when absent."""
    path = layout.train_margins_file(train_folder, epoch)
    return read_csv(path, TABLES["margins"]) if path.is_file() else None


def write_margins(train_folder: str | os.PathLike[str], epoch: int,
                  frame: pd.DataFrame) -> None:
    """Write the margins of the training images after ``epoch`` into a training folder."""
    write_csv(layout.train_margins_file(train_folder, epoch), TABLES["margins"], frame)


def read_train_params(train_folder: str | os.PathLike[str]) -> dict[str, Any] | None:
    """``train_params.json`` of a training folder (what defines the run), or None."""
    path = layout.train_params_file(train_folder)
    return io.read_json(path) if path.is_file() else None


def write_train_params(train_folder: str | os.PathLike[str], params: Mapping[str, Any]) -> None:
    """Write ``train_params.json`` into a training folder."""
    io.write_json(layout.train_params_file(train_folder), dict(params))


# --------------------------------------------------------------------------- records


#: The JSON records of a run folder, by name: their path and the stage that writes them.
RECORDS = {
    "manifest": (layout.manifest_file, None),
    "dataset": (lambda run_dir: layout.data_file(run_dir, "dataset"), DATA_STAGE),
    "job": (lambda run_dir: layout.attack_file(run_dir, "job"), ATTACK_STAGE),
}


def record_path(run_dir: str | os.PathLike[str], name: str) -> Path:
    """Where record ``name`` (:data:`RECORDS`) lives in ``run_dir``."""
    if name not in RECORDS:
        raise ValueError(f"the run folder has no record {name!r}; its records are "
                         f"{', '.join(RECORDS)}")
    return RECORDS[name][0](run_dir)


def read_record(run_dir: str | os.PathLike[str], name: str, *,
                missing_ok: bool = False) -> Any:
    """Record ``name`` of ``run_dir`` (the manifest, ``dataset.json``, ``job.json``).

    Raises:
        RunFolderError: the record is missing (naming the stage to run), unless
            ``missing_ok``, which returns None instead.
    """
    path = record_path(run_dir, name)
    if path.is_file():
        return io.read_json(path)
    if missing_ok:
        return None
    stage = RECORDS[name][1]
    raise RunFolderError(
        f"{path} is missing; run the {STAGE_WORDS.get(stage, '')} stage ({stage}) first")


def write_record(run_dir: str | os.PathLike[str], name: str, record: Any) -> Path:
    """Write record ``name`` of ``run_dir`` as key-sorted JSON (atomically); its path."""
    path = record_path(run_dir, name)
    io.write_json(path, record)
    return path


# --------------------------------------------------------------------------- arrays and chunks


def _arrays_path(run_dir: str | os.PathLike[str], kind: str) -> Path:
    if kind in layout.BORDERLINE_FILES:
        return layout.borderline_file(run_dir, kind)
    return layout.attack_file(run_dir, kind)


def read_arrays(run_dir: str | os.PathLike[str], kind: str) -> dict[str, np.ndarray] | None:
    """The arrays of the attack stage's ``kind`` file (``"traces"``, ``"gallery"``) or of the
    borderline-training stage's (``"transfer_images"``), or None if absent."""
    path = _arrays_path(run_dir, kind)
    return io.read_npz(path) if path.is_file() else None


def write_arrays(run_dir: str | os.PathLike[str], kind: str, **arrays: np.ndarray) -> Path:
    """Write the arrays of ``kind`` (see :func:`read_arrays`); their path."""
    path = _arrays_path(run_dir, kind)
    io.write_npz(path, **arrays)
    return path


def chunk_done(run_dir: str | os.PathLike[str], part: str, chunk: int) -> bool:
    """Whether an attack chunk's rows are written (they are written last)."""
    return layout.chunk_files(run_dir, part, chunk)[0].is_file()


def write_chunk(run_dir: str | os.PathLike[str], part: str, chunk: int, rows: pd.DataFrame,
                arrays: Mapping[str, np.ndarray]) -> None:
    """Write an attack chunk: its arrays, then its result rows, whose file marks it done."""
    csv_path, npz_path = layout.chunk_files(run_dir, part, chunk)
    io.write_npz(npz_path, **arrays)
    write_csv(csv_path, TABLES["results"], rows)


def read_chunk(run_dir: str | os.PathLike[str], part: str, chunk: int) -> pd.DataFrame:
    """An attack chunk's result rows (the columns of ``results.csv``)."""
    return read_csv(layout.chunk_files(run_dir, part, chunk)[0], TABLES["results"])


def read_chunk_arrays(run_dir: str | os.PathLike[str], part: str,
                      chunk: int) -> dict[str, np.ndarray]:
    """An attack chunk's arrays (traces, and gallery images where it kept some).

    Raises:
        RunFolderError: the arrays of a chunk with written rows are missing.
    """
    csv_path, npz_path = layout.chunk_files(run_dir, part, chunk)
    if not npz_path.is_file():
        raise RunFolderError(f"{npz_path} is missing; delete {csv_path} and rerun the stage")
    return io.read_npz(npz_path)
