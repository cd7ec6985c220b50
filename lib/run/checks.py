"""Checks before a stage: its parameters, its run folder and the files it will read.

:func:`check_stage` checks, in order, the types of a stage's parameters (against their
defaults) and their values (the stage's settings class, :mod:`lib.run.parameters`), the run
folder's manifest (the stage before
finished, the same parameters as an earlier run of this stage unless ``overwrite``), and the
input files (dataset folder, weights, checkpoints). Every check only reads, so a stage with a
bad input stops before anything is written and its run folder stays as it was.

Who calls them: :func:`lib.run.pipeline.run` (``python -m lib.run.pipeline run``) checks every
stage before it starts papermill, and :func:`lib.run.pipeline.start_stage`, which each notebook
calls, checks again for users who run the notebooks with papermill directly.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from lib.errors import (
    BorderlineError,
    CheckpointError,
    DatasetError,
    ParameterError,
    RunFolderError,
)
from lib.run import tables
from lib.run.layout import (
    ANALYSIS_STAGE,
    ATTACK_STAGE,
    BORDERLINE_STAGE,
    DATA_STAGE,
    MARGINS_STAGE,
    MINIMALITY_STAGE,
    PREVIOUS_STAGE,
    TRAIN_STAGE,
    checkpoint_path,
)
from lib.run.manifest import differing_parameters, read_manifest, recorded_parameters
from lib.run.parameters import (
    check_parameter_types,
    check_runtime,
    complete_parameters,
    stage_settings,
)

# --------------------------------------------------------------------------- checks before a stage
#
# Every check below only reads: a stage whose parameters or inputs are bad stops before
# anything is written, so its run folder stays exactly as it was and a corrected rerun starts
# cleanly. ``run`` calls :func:`check_stage` before it starts papermill (no kernel, no
# notebook written); the notebooks call it again through
# :func:`~lib.run.pipeline.start_stage`, for users who run them with papermill directly.


def check_stage_parameters(stage: str, parameters: Mapping[str, Any]) -> None:
    """Types and values of a stage's parameters; reads no file of the run.

    The types are checked against the defaults, the values by the stage's settings class
    (:func:`lib.run.parameters.stage_settings`) and the runtime settings (the device).

    Raises:
        ParameterError: naming the parameter, the bad value and what to give instead.
    """
    check_parameter_types(stage, parameters)
    values = complete_parameters(stage, parameters)
    stage_settings(stage, values)
    check_runtime(values)


def check_run_folder(stage: str, run_dir: str | Path, parameters: Mapping[str, Any], *,
                     overwrite: bool = False) -> None:
    """Check that ``stage`` may start in ``run_dir`` with ``parameters`` (reads only).

    Raises:
        RunFolderError: the run folder is a file or is missing (for a later stage), the stage
            before has not finished, or this stage ran with other parameters and
            ``overwrite`` is False.
    """
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise RunFolderError(
            f"run folder {run_dir} is a file, not a folder; set run_dir to a folder path"
        )
    if stage in PREVIOUS_STAGE and not run_dir.is_dir():
        raise RunFolderError(
            f"run folder {run_dir} does not exist; run the data stage (01_data) first, "
            f"or name an existing run folder with run_dir"
        )
    recorded = read_manifest(run_dir).get("stages", {})
    if stage in PREVIOUS_STAGE:
        before = PREVIOUS_STAGE[stage]
        if not recorded.get(before, {}).get("finished"):
            raise RunFolderError(
                f"run folder {run_dir} has no finished stage {before}; run it first "
                f"(make stage STAGE={before}), or name another run folder with run_dir"
            )
    asked = recorded_parameters(parameters)
    previous = recorded.get(stage)
    if previous is not None and previous["parameters"] != asked and not overwrite:
        diff = "\n".join(differing_parameters(previous["parameters"], asked))
        raise RunFolderError(
            f"run folder {run_dir} holds stage {stage} results made with other "
            f"parameters:\n{diff}\nUse a new run folder (-p run_dir ...), or pass "
            f"-p overwrite True to discard them and the results of every later stage."
        )


def _check_folder_parameter(path: str, name: str) -> None:
    if Path(path).exists() and not Path(path).is_dir():
        raise ParameterError(f"{name} {path} is a file, not a folder; set {name} to a folder path")


def _check_data_inputs(p: Mapping[str, Any]) -> None:
    from lib.data import datasets

    _check_folder_parameter(p["cache_dir"], "cache_dir")
    datasets.check_dataset(p["dataset_kind"], p["dataset_root"],
                           train_videos=p["train_videos"], test_videos=p["test_videos"])


def _check_train_inputs(p: Mapping[str, Any]) -> None:
    if p["weights_path"]:
        from lib.model.checkpoints import build_model

        build_model(weights_path=p["weights_path"])  # reads and fits the weights, as training will


def _check_attack_inputs(p: Mapping[str, Any]) -> None:
    from lib.model.checkpoints import check_checkpoint
    from lib.run import attack_stage

    settings = stage_settings(ATTACK_STAGE, p)
    job = attack_stage.plan_job(p["run_dir"], settings)  # models, epochs, selection
    for model, epoch in job.chunks[["model", "epoch"]].drop_duplicates().itertuples(index=False):
        check_checkpoint(checkpoint_path(p["run_dir"], epoch, model=model))


def _check_minimality_inputs(p: Mapping[str, Any]) -> None:
    from lib.model.checkpoints import check_checkpoint

    job_file = tables.record_path(p["run_dir"], "job")
    settings = tables.read_record(p["run_dir"], "job")["settings"]
    if settings["mode"] != "targeted":
        raise RunFolderError(
            f"{job_file}: the attack stage ran with mode {settings['mode']!r}; the minimality "
            "stage compares targeted attacks, so run 03_attack with -p mode targeted"
        )
    attacked, first = list(settings["epochs"]), settings["models"][0]
    missing = sorted(set(p["epochs"]) - set(attacked))
    if missing:
        raise ParameterError(
            f"epochs {missing} were not attacked (the attack stage attacked {attacked} of the "
            f"first model, seed {first}); choose epochs among those, or [] for the last one"
        )
    for epoch in p["epochs"] or attacked[-1:]:
        check_checkpoint(checkpoint_path(p["run_dir"], epoch, model=first))


def _check_borderline_inputs(p: Mapping[str, Any]) -> None:
    from lib.model.checkpoints import check_checkpoint
    from lib.run import borderline_stage

    settings = stage_settings(BORDERLINE_STAGE, p)
    start = borderline_stage.start_epoch(p["run_dir"], settings)  # trained?
    check_checkpoint(checkpoint_path(p["run_dir"], start,
                                     model=borderline_stage.clean_model(p["run_dir"])))
    borderline_stage.pgd_radius(p["run_dir"], settings, epoch=start)  # attacked, if needed
def _check_margins_inputs(p: Mapping[str, Any]) -> None:
    from lib.model.checkpoints import check_checkpoint
    from lib.run import margins_stage

    results = margins_stage.rerun_model_rows(tables.read_results(p["run_dir"]))
    settings = stage_settings(MARGINS_STAGE, p)
    model = margins_stage.rerun_model(results)
    for epoch in margins_stage.compared_epochs(results, settings):
        check_checkpoint(checkpoint_path(p["run_dir"], epoch, model=model))


#: The checks of each stage's files: the dataset, weights and checkpoints it will read.
INPUT_CHECKS = {
    DATA_STAGE: _check_data_inputs,
    TRAIN_STAGE: _check_train_inputs,
    ATTACK_STAGE: _check_attack_inputs,
    ANALYSIS_STAGE: lambda p: None,  # its inputs are the finished attack stage's tables
    MINIMALITY_STAGE: _check_minimality_inputs,
    BORDERLINE_STAGE: _check_borderline_inputs,
    MARGINS_STAGE: _check_margins_inputs,
}


@contextlib.contextmanager
def naming_stage(stage: str) -> Iterator[None]:
    """Prefix every BorderlineError raised inside with the stage's name."""
    try:
        yield
    except BorderlineError as error:
        message = str(error)
        if message.startswith(f"stage {stage}"):
            raise
        kind = next(k for k in (DatasetError, CheckpointError, ParameterError, RunFolderError,
                                BorderlineError) if isinstance(error, k))
        raise kind(f"stage {stage}: {message}") from error


def check_stage(stage: str, parameters: Mapping[str, Any], *,
                overwrite: bool | None = None) -> None:
    """Everything ``stage`` needs, checked before it writes anything.

    In order: the parameters' types and values, the run folder (the stage before finished,
    the same parameters as an earlier run of this stage unless ``overwrite``), and the input
    files (dataset folder, weights, checkpoints). Only reads; the first problem raises a
    BorderlineError that names the stage, the input and what to do.
    """
    with naming_stage(stage):
        check_stage_parameters(stage, parameters)
        values = complete_parameters(stage, parameters)
        if overwrite is None:
            overwrite = bool(values.get("overwrite", False))
        check_run_folder(stage, values["run_dir"], values, overwrite=overwrite)
        INPUT_CHECKS[stage](values)
