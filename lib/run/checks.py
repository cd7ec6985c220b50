"""Checks before a stage: its parameters, its run folder and the files it will read.

:func:`check_stage` checks, in order, the types of a stage's parameters (against the
notebook's own defaults) and their values, the run folder's manifest (the stage before
finished, the same parameters as an earlier run of this stage unless ``overwrite``), and the
input files (dataset folder, weights, checkpoints). Every check only reads, so a stage with a
bad input stops before anything is written and its run folder stays as it was.

Who calls them: :func:`lib.run.pipeline.run` (``python -m lib.run.pipeline run``) checks every stage
before it starts papermill, and :func:`lib.run.pipeline.start_stage`, which each notebook calls,
checks again for users who run the notebooks with papermill directly. The tests call
:func:`complete_parameters`, :func:`check_stage` and :func:`attack_settings_of` directly.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from lib import io
from lib.attack import schedules
from lib.errors import (
    BorderlineError,
    CheckpointError,
    DatasetError,
    ParameterError,
    RunFolderError,
)
from lib.model import precision
from lib.run.layout import STAGES, attack_file, checkpoint_path
from lib.run.manifest import differing_parameters, read_manifest, recorded_parameters
from lib.run.parameters import check_parameter_types, notebook_defaults

# --------------------------------------------------------------------------- checks before a stage
#
# Every check below only reads: a stage whose parameters or inputs are bad stops before
# anything is written, so its run folder stays exactly as it was and a corrected rerun starts
# cleanly. ``run`` calls :func:`check_stage` before it starts papermill (no kernel, no
# notebook written); the notebooks call it again through
# :func:`~lib.run.pipeline.start_stage`, for users who run them with papermill directly.

DATASET_KINDS: tuple[str, ...] = ("synthetic", "cholec80", "imagefolder")


def _whole_number(value: Any, low: int, name: str, high: int | None = None) -> None:
    """ParameterError unless ``value`` is an int in ``[low, high]``."""
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= low
    if not ok or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"from {low} to {high}"
        raise ParameterError(f"{name} must be an int {bound}, got {value!r}")


def _whole_numbers(values: Any, low: int, name: str) -> None:
    """ParameterError unless ``values`` is a list of ints >= ``low``."""
    if not isinstance(values, list | tuple):
        raise ParameterError(f"{name} must be a list of ints >= {low}, got {values!r}")
    for value in values:
        _whole_number(value, low, f"every value of {name}")


def _one_of(value: Any, choices: Sequence[str], name: str) -> None:
    if value not in choices:
        raise ParameterError(
            f"{name} {value!r} is not known; use one of: {', '.join(map(repr, choices))}"
        )


def _check_device(parameters: Mapping[str, Any]) -> None:
    from lib.model.network import resolve_device

    resolve_device(parameters["device"])


def _check_data_values(p: Mapping[str, Any]) -> None:
    """The data stage's parameters (no file is read)."""
    from lib.data import datasets
    from lib.model.network import check_image_size

    _one_of(p["dataset_kind"], DATASET_KINDS, "dataset_kind")
    _whole_number(p["image_size"], 1, "image_size")
    check_image_size(p["image_size"])
    if p["dataset_kind"] != "imagefolder":
        train = datasets.parse_video_ids(p["train_videos"])
        test = datasets.parse_video_ids(p["test_videos"])
        overlap = sorted(set(train) & set(test))
        if overlap:
            raise ParameterError(
                f"videos {overlap} are in both train_videos and test_videos; the split is by "
                "video, so give each video to one split only"
            )
    if p["dataset_kind"] == "synthetic":
        _whole_number(p["synthetic_videos"], 2, "synthetic_videos", 80)
        _whole_number(p["synthetic_seconds"], 2, "synthetic_seconds")
        for name in ("synthetic_width", "synthetic_height"):
            _whole_number(p[name], 32, name)
            if p[name] % 2:
                raise ParameterError(
                    f"{name} must be even (H.264 with 4:2:0 colour needs even sizes), "
                    f"got {p[name]}; use {p[name] + 1}"
                )
    _whole_number(p["seed"], 0, "seed")
    _whole_number(p["workers"], 1, "workers")


def _check_train_values(p: Mapping[str, Any]) -> None:
    """The training stage's parameters (no file is read)."""
    from lib.train.loop import check_hyperparameters

    check_hyperparameters(
        epochs=p["epochs"], batch_size=p["batch_size"], lr=p["lr"], lr_decay=p["lr_decay"],
        momentum=p["momentum"], weight_decay=p["weight_decay"], augment=p["augment"],
        balance=p["balance"],
        seed=p["seed"], num_workers=0,
    )  # fmt: skip
    _whole_number(p["workers"], 0, "workers")
    precision.check(p["precision"])
    _check_device(p)


def attack_settings_of(p: Mapping[str, Any]) -> Any:
    """The :class:`lib.attack.plan.AttackSettings` of the attack stage's parameters (checked)."""
    from lib.run import attack_stage

    _whole_numbers(p["epochs"], 1, "epochs")
    constants = p["schedule_constants"]
    for name, values in constants.items():
        if not isinstance(values, dict):
            raise ParameterError(
                f"schedule_constants[{name!r}] must map constant names to numbers, e.g. "
                f"{{\"step\": {{\"drop\": 0.5}}}}, got {values!r}"
            )
    return attack_stage.settings_from_parameters(p)


def _check_attack_values(p: Mapping[str, Any]) -> None:
    """The attack stage's parameters (no file is read)."""
    attack_settings_of(p)
    _check_device(p)


def _check_analysis_values(p: Mapping[str, Any]) -> None:
    """The analysis stage's parameters."""
    share = p["stable_within"]
    if not 0 <= share <= 1:
        raise ParameterError(
            f"stable_within must be a share from 0 to 1 (0.05 means 5 %), got {share!r}"
        )
    _whole_number(p["histogram_bins"], 1, "histogram_bins")
    level = p["full_success"]
    if not 0 < level <= 1:
        raise ParameterError(
            f"full_success must be a share above 0 and at most 1 (0.95 reads '100 %' as at "
            f"least 95 %), got {level!r}"
        )
    schedules.get_schedule(p["reference_schedule"])  # refuses an unknown name, listing the known


def _check_minimality_values(p: Mapping[str, Any]) -> None:
    """The minimality stage's parameters (no file is read)."""
    from lib.attack.reference import REFERENCE_ATTACKS

    _whole_numbers(p["epochs"], 1, "epochs")
    _whole_number(p["n_pairs"], 1, "n_pairs")
    _whole_numbers(p["steps"], 2, "steps")
    if not p["steps"]:
        raise ParameterError("steps is empty; give at least one step budget, e.g. [100]")
    if not p["attacks"]:
        raise ParameterError(
            f"attacks is empty; name at least one of: {', '.join(REFERENCE_ATTACKS)}"
        )
    for name in p["attacks"]:
        _one_of(name, list(REFERENCE_ATTACKS), "reference attack")
    _whole_number(p["batch_size"], 1, "batch_size")
    _whole_number(p["seed"], 0, "seed")
    _check_device(p)


#: The value checks of each stage's parameters, beyond their types.
VALUE_CHECKS = {
    "01_data": _check_data_values,
    "02_train": _check_train_values,
    "03_attack": _check_attack_values,
    "04_analysis": _check_analysis_values,
    "05_minimality": _check_minimality_values,
}


def complete_parameters(stage: str, parameters: Mapping[str, Any]) -> dict[str, Any]:
    """``parameters`` with the notebook's defaults for every parameter not given."""
    return {**notebook_defaults(stage), **parameters}


def check_stage_parameters(stage: str, parameters: Mapping[str, Any]) -> None:
    """Types and values of a stage's parameters; reads no file of the run.

    Raises:
        ParameterError: naming the parameter, the bad value and what to give instead.
    """
    check_parameter_types(stage, parameters)
    VALUE_CHECKS[stage](complete_parameters(stage, parameters))


def _previous_stage(stage: str) -> str:
    return "03_attack" if stage == "05_minimality" else STAGES[STAGES.index(stage) - 1]


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
    if STAGES.index(stage) > 0 and not run_dir.is_dir():
        raise RunFolderError(
            f"run folder {run_dir} does not exist; run the data stage (01_data) first, "
            f"or name an existing run folder with run_dir"
        )
    recorded = read_manifest(run_dir).get("stages", {})
    if STAGES.index(stage) > 0:
        before = _previous_stage(stage)
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

    job = attack_stage.plan_job(p["run_dir"], attack_settings_of(p))  # epochs, selection
    for epoch in job.settings.epochs:
        check_checkpoint(checkpoint_path(p["run_dir"], epoch))


def _check_minimality_inputs(p: Mapping[str, Any]) -> None:
    from lib.model.checkpoints import check_checkpoint

    job_file = attack_file(p["run_dir"], "job")
    if not job_file.is_file():
        raise RunFolderError(f"{job_file} is missing; run the attack stage (03_attack) first")
    settings = io.read_json(job_file)["settings"]
    if settings["mode"] != "targeted":
        raise RunFolderError(
            f"{job_file}: the attack stage ran with mode {settings['mode']!r}; the minimality "
            "stage compares targeted attacks, so run 03_attack with -p mode targeted"
        )
    attacked = list(settings["epochs"])
    missing = sorted(set(p["epochs"]) - set(attacked))
    if missing:
        raise ParameterError(
            f"epochs {missing} were not attacked (the attack stage attacked {attacked}); "
            "choose epochs among those, or [] for the last one"
        )
    for epoch in p["epochs"] or attacked[-1:]:
        check_checkpoint(checkpoint_path(p["run_dir"], epoch))


#: The checks of each stage's files: the dataset, weights and checkpoints it will read.
INPUT_CHECKS = {
    "01_data": _check_data_inputs,
    "02_train": _check_train_inputs,
    "03_attack": _check_attack_inputs,
    "04_analysis": lambda p: None,  # its inputs are the finished attack stage's tables
    "05_minimality": _check_minimality_inputs,
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
