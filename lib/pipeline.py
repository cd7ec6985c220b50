"""Stages, profiles, run folders and manifests, and papermill execution.

A *stage* is one notebook in ``notebooks/`` (a jupytext percent script) with one cell tagged
``parameters``. A *profile* (``profiles/<name>.yaml``) names the run folder and the parameters
of every stage. ``python -m lib.pipeline run`` converts each stage's script, executes it with
papermill into ``<run_dir>/notebooks/<stage>.ipynb`` and stops at the first failing stage with
its error message; ``python -m lib.pipeline book`` hands the executed notebooks to the book.

Before a stage starts, :func:`check_stage` checks its parameters (types against the
notebook's own defaults, then their values), the run folder's manifest and the files the stage
will read; it only reads, so a stage with a bad input stops before anything is written.
``run`` calls it before starting papermill, and inside a notebook :func:`start_stage` calls it
again before recording the stage, so a run folder never holds results of two different
parameter sets (whether the stage is run through this module or through papermill directly).
``tests/bad_inputs.yaml`` lists the bad inputs the tests try; :func:`bad_inputs_markdown`
turns it into the book's table.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import copy
import datetime as _dt
import functools
import importlib.metadata
import json
import platform
import shlex
import shutil
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from lib import io
from lib.errors import (
    BorderlineError,
    CheckpointError,
    DatasetError,
    ParameterError,
    RunFolderError,
)

REPO = Path(__file__).resolve().parent.parent
NOTEBOOK_DIR = REPO / "notebooks"
PROFILE_DIR = REPO / "profiles"
STATIC_DIR = REPO / "_static"

#: The stages in the order data flows through them; each names the run-folder
#: subfolder it writes, which an overwrite clears.
STAGE_OUTPUTS: dict[str, str] = {
    "01_data": "data",
    "02_train": "train",
    "03_attack": "attack",
    "04_analysis": "analysis",
    "05_minimality": "minimality",
}
STAGES: tuple[str, ...] = tuple(STAGE_OUTPUTS)

#: Parameters that change how a stage runs but not what it computes; they are neither
#: recorded in the manifest nor compared when a stage continues in a run folder.
RUNTIME_PARAMETERS = frozenset({"run_dir", "device", "workers", "overwrite", "progress"})

#: Packages whose versions each stage records in the manifest.
RECORDED_PACKAGES = ("torch", "torchvision", "numpy", "pandas", "scikit-learn", "av", "altair")


# --------------------------------------------------------------------------- parameters


def notebook_path(stage: str) -> Path:
    """The jupytext script of ``stage``; ParameterError for an unknown stage."""
    if stage not in STAGE_OUTPUTS:
        raise ParameterError(f"unknown stage {stage!r}; the stages are {', '.join(STAGES)}")
    return NOTEBOOK_DIR / f"{stage}.py"


def notebook_defaults(stage: str) -> dict[str, Any]:
    """The names and default values of the ``parameters`` cell of ``stage``'s notebook.

    The cell must hold only assignments of literals (``name = 1  # comment``), which is what
    papermill can override.
    """
    path = notebook_path(stage)
    return copy.deepcopy(_parse_defaults(path, path.stat().st_mtime_ns))


@functools.lru_cache(maxsize=32)
def _parse_defaults(path: Path, mtime_ns: int) -> dict[str, Any]:
    # cached per file version: reading a script with jupytext takes a noticeable time
    import jupytext

    notebook = jupytext.read(path)
    cells = [c for c in notebook.cells if "parameters" in c.metadata.get("tags", [])]
    if len(cells) != 1:
        raise ParameterError(
            f"{path}: expected exactly one cell tagged 'parameters', found {len(cells)}"
        )
    defaults: dict[str, Any] = {}
    for node in ast.parse(cells[0].source).body:
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1
                and isinstance(node.targets[0], ast.Name)):
            raise ParameterError(
                f"{path}: the parameters cell may hold only `name = literal` lines"
            )
        defaults[node.targets[0].id] = ast.literal_eval(node.value)
    return defaults


def _type_name(value: Any) -> str:
    return "None" if value is None else type(value).__name__


def check_parameter_types(stage: str, values: Mapping[str, Any]) -> None:
    """Raise ParameterError for a name the stage does not have or a value of the wrong type.

    A value must have the type of the notebook's default; an int is accepted where a float is
    expected, and a parameter whose default is None accepts anything.
    """
    defaults = notebook_defaults(stage)
    for name, value in values.items():
        if name not in defaults:
            raise ParameterError(
                f"stage {stage} has no parameter {name!r}; its parameters are "
                f"{', '.join(sorted(defaults))}"
            )
        default = defaults[name]
        if default is None or value is None and name in RUNTIME_PARAMETERS:
            continue
        expected = type(default)
        ok = isinstance(value, expected) and not (expected is int and isinstance(value, bool))
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            ok = True
        if not ok:
            raise ParameterError(
                f"stage {stage}, parameter {name!r}: expected {expected.__name__} "
                f"(like the default {default!r}), got {_type_name(value)} {value!r}; "
                f"write it like the default, e.g. -p {name} {_command_line_value(default)}"
            )


def _command_line_value(value: Any) -> str:
    """``value`` as it is typed after ``-p name`` (YAML, quoted for the shell when needed)."""
    if isinstance(value, str):
        text = value if value and yaml.safe_load(value) == value else json.dumps(value)
    elif isinstance(value, bool):
        text = str(value)
    else:
        text = json.dumps(value)
    return shlex.quote(text)


def stage_parameters(stage: str, namespace: Mapping[str, Any]) -> dict[str, Any]:
    """The current values of ``stage``'s parameters, read from a notebook's ``globals()``."""
    return {name: namespace[name] for name in notebook_defaults(stage)}


def parameter_table(stage: str) -> list[tuple[str, Any, str]]:
    """``(name, default, comment)`` for each line of ``stage``'s parameters cell."""
    import jupytext

    notebook = jupytext.read(notebook_path(stage))
    cell = next(c for c in notebook.cells if "parameters" in c.metadata.get("tags", []))
    defaults = notebook_defaults(stage)
    rows = []
    for line in cell.source.splitlines():
        name = line.split("=", 1)[0].strip()
        if name in defaults:
            comment = line.split("#", 1)[1].strip() if "#" in line else ""
            rows.append((name, defaults[name], comment))
    return rows


# --------------------------------------------------------------------------- profiles


def available_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))


def load_profile_spec(name: str) -> dict[str, Any]:
    """The raw profile file: ``common``, ``stages`` and ``skip`` (stages this profile omits)."""
    path = PROFILE_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ParameterError(
            f"profile {name!r} does not exist (no profiles/{name}.yaml); "
            f"available profiles: {', '.join(available_profiles())}"
        )
    try:
        spec = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        # safe_load builds only plain values: a tag such as !!python/object is refused here,
        # never run.
        raise ParameterError(
            f"{path} is not a valid profile ({_first_line(error)}); a profile holds plain "
            "values only: fix the file, or compare it with profiles/default.yaml"
        ) from None
    if not isinstance(spec, dict):
        raise ParameterError(
            f"{path}: expected a mapping with common, stages and skip; compare it with "
            "profiles/default.yaml"
        )
    unknown = set(spec) - {"common", "stages", "skip"}
    if unknown:
        raise ParameterError(
            f"{path}: unknown top-level keys {sorted(unknown)}; use common, stages, skip"
        )
    return spec


def load_profile(name: str) -> dict[str, dict[str, Any]]:
    """Parameters per stage for profile ``name``: ``common`` merged into every stage.

    A ``common`` key is given to every stage whose notebook has that parameter.
    """
    spec = load_profile_spec(name)
    common = spec.get("common") or {}
    stages = spec.get("stages") or {}
    for stage in stages:
        notebook_path(stage)
    profile = {}
    for stage in STAGES:
        defaults = notebook_defaults(stage) if notebook_path(stage).exists() else {}
        params = {k: v for k, v in common.items() if k in defaults}
        params.update(stages.get(stage) or {})
        profile[stage] = params
    return profile


# --------------------------------------------------------------------------- run folders


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in RECORDED_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def _manifest_path(run_dir: Path) -> Path:
    return Path(run_dir) / "manifest.json"


def read_manifest(run_dir: str | Path) -> dict[str, Any]:
    """The run folder's manifest (``{"stages": {}}`` for a new folder)."""
    path = _manifest_path(Path(run_dir))
    return io.read_json(path) if path.exists() else {"stages": {}}


def differing_parameters(recorded: Mapping[str, Any], asked: Mapping[str, Any]) -> list[str]:
    """Human-readable lines for every parameter whose value differs (or exists on one side)."""
    lines = []
    for name in sorted(set(recorded) | set(asked)):
        if recorded.get(name, "<absent>") != asked.get(name, "<absent>"):
            lines.append(
                f"  {name}: run folder has {recorded.get(name, '<absent>')!r}, "
                f"now {asked.get(name, '<absent>')!r}"
            )
    return lines


# --------------------------------------------------------------------------- checks before a stage
#
# Every check below only reads: a stage whose parameters or inputs are bad stops before
# anything is written, so its run folder stays exactly as it was and a corrected rerun starts
# cleanly. ``run`` calls :func:`check_stage` before it starts papermill (no kernel, no
# notebook written); the notebooks call it again through :func:`start_stage`, for users who
# run them with papermill directly.

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
    from lib.model import resolve_device

    resolve_device(parameters["device"])


def _check_data_values(p: Mapping[str, Any]) -> None:
    """The data stage's parameters (no file is read)."""
    from lib import datasets
    from lib.model import check_image_size

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
    from lib import training

    training._check_hyperparameters(
        epochs=p["epochs"], batch_size=p["batch_size"], lr=p["lr"], momentum=p["momentum"],
        weight_decay=p["weight_decay"], augment=p["augment"], balance=p["balance"],
        seed=p["seed"], num_workers=0,
    )  # fmt: skip
    _check_device(p)


def attack_settings_of(p: Mapping[str, Any]) -> Any:
    """The :class:`lib.robustness.AttackSettings` of the attack stage's parameters (checked)."""
    import dataclasses

    from lib import robustness

    _whole_numbers(p["epochs"], 1, "epochs")
    constants = p["schedule_constants"]
    for name, values in constants.items():
        if not isinstance(values, dict):
            raise ParameterError(
                f"schedule_constants[{name!r}] must map constant names to numbers, e.g. "
                f"{{\"step\": {{\"drop\": 0.5}}}}, got {values!r}"
            )
    fields = {f.name for f in dataclasses.fields(robustness.AttackSettings)}
    return robustness.AttackSettings(**{k: v for k, v in p.items() if k in fields})


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


def _check_minimality_values(p: Mapping[str, Any]) -> None:
    """The minimality stage's parameters (no file is read)."""
    from lib.minimality import REFERENCE_ATTACKS

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
    asked = {k: v for k, v in parameters.items() if k not in RUNTIME_PARAMETERS}
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
    from lib import datasets

    _check_folder_parameter(p["cache_dir"], "cache_dir")
    datasets.check_dataset(p["dataset_kind"], p["dataset_root"],
                           train_videos=p["train_videos"], test_videos=p["test_videos"])


def _check_train_inputs(p: Mapping[str, Any]) -> None:
    if p["weights_path"]:
        from lib.model import build_model

        build_model(weights_path=p["weights_path"])  # reads and fits the weights, as training will


def _check_attack_inputs(p: Mapping[str, Any]) -> None:
    from lib import robustness
    from lib.model import check_checkpoint

    job = robustness.plan_job(p["run_dir"], attack_settings_of(p))  # epochs, selection
    for epoch in job.settings.epochs:
        check_checkpoint(robustness.checkpoint_path(p["run_dir"], epoch))


def _check_minimality_inputs(p: Mapping[str, Any]) -> None:
    from lib import robustness
    from lib.model import check_checkpoint

    job_file = Path(p["run_dir"]) / "attack" / "job.json"
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
        check_checkpoint(robustness.checkpoint_path(p["run_dir"], epoch))


#: The checks of each stage's files: the dataset, weights and checkpoints it will read.
INPUT_CHECKS = {
    "01_data": _check_data_inputs,
    "02_train": _check_train_inputs,
    "03_attack": _check_attack_inputs,
    "04_analysis": lambda p: None,  # its inputs are the finished attack stage's tables
    "05_minimality": _check_minimality_inputs,
}


@contextlib.contextmanager
def _naming_stage(stage: str):
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
    with _naming_stage(stage):
        check_stage_parameters(stage, parameters)
        values = complete_parameters(stage, parameters)
        if overwrite is None:
            overwrite = bool(values.get("overwrite", False))
        check_run_folder(stage, values["run_dir"], values, overwrite=overwrite)
        INPUT_CHECKS[stage](values)


def start_stage(
    stage: str,
    *,
    run_dir: str | Path,
    parameters: Mapping[str, Any],
    overwrite: bool = False,
) -> Path:
    """Check and record a stage's parameters in the run folder; return the stage's folder.

    Nothing is written when a check fails.

    Args:
        stage: one of ``STAGES``.
        run_dir: the run folder; created by the first stage, required by the others.
        parameters: every parameter of the notebook (runtime ones are dropped here).
        overwrite: discard this stage's earlier results (and those of every later stage)
            when they were made with other parameters, instead of refusing.

    Raises:
        ParameterError: a parameter the notebook does not have, of the wrong type, or out of
            range.
        DatasetError: a bad dataset folder or file (see :func:`check_stage`).
        CheckpointError: a bad weights or checkpoint file (see :func:`check_stage`).
        RunFolderError: the run folder is missing (for a later stage), an earlier stage has
            not run, or this stage ran with other parameters and ``overwrite`` is False.
    """
    check_stage(stage, {**parameters, "run_dir": str(run_dir)}, overwrite=overwrite)
    run_dir = Path(run_dir)
    index = STAGES.index(stage)
    run_dir.mkdir(parents=True, exist_ok=True)
    manifest = read_manifest(run_dir)
    recorded_stages = manifest.setdefault("stages", {})
    asked = {k: v for k, v in parameters.items() if k not in RUNTIME_PARAMETERS}
    previous = recorded_stages.get(stage)
    if previous is not None and previous["parameters"] != asked:
        for later in STAGES[index:]:
            shutil.rmtree(run_dir / STAGE_OUTPUTS[later], ignore_errors=True)
            recorded_stages.pop(later, None)
    recorded_stages[stage] = {
        "parameters": asked,
        "versions": package_versions(),
        "started": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "finished": False,
    }
    io.write_json(_manifest_path(run_dir), manifest)
    out = run_dir / STAGE_OUTPUTS[stage]
    out.mkdir(exist_ok=True)
    return out


def finish_stage(stage: str, *, run_dir: str | Path) -> None:
    """Mark ``stage`` finished in the manifest (later stages require it)."""
    manifest = read_manifest(run_dir)
    manifest["stages"][stage]["finished"] = True
    io.write_json(_manifest_path(Path(run_dir)), manifest)


# --------------------------------------------------------------------------- execution


def execute_stage(
    stage: str,
    parameters: Mapping[str, Any],
    *,
    output_path: str | Path,
    progress: bool = True,
) -> Path:
    """Execute ``stage``'s notebook with papermill; the executed notebook goes to ``output_path``.

    The notebook is written under a temporary name and renamed only when every cell ran; on
    failure the partly executed notebook is kept beside it as ``<stage>.failed.ipynb`` for
    inspection and a BorderlineError carries the cell's error message.
    """
    import jupytext
    import papermill

    check_parameter_types(stage, parameters)
    notebook = jupytext.read(notebook_path(stage))
    notebook.metadata["kernelspec"] = {
        "name": "python3", "display_name": "Python 3", "language": "python"
    }
    output_path = Path(output_path)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    failed = output_path.with_name(f"{stage}.failed.ipynb")
    failed.unlink(missing_ok=True)
    with io.atomic_path(output_path, suffix=".tmp.ipynb") as tmp:
        try:
            papermill.execute_notebook(
                notebook,
                str(tmp),
                parameters=dict(parameters),
                kernel_name="python3",
                cwd=str(REPO),
                progress_bar=progress,
            )
        except papermill.PapermillExecutionError as error:
            shutil.copyfile(tmp, failed)
            raise BorderlineError(
                f"stage {stage} failed: {error.ename}: {error.evalue}\n"
                f"(the partly executed notebook is {failed})"
            ) from None
    return output_path


def run(profile: str, *, stages: Sequence[str] | None = None,
        overrides: Mapping[str, Any] | None = None, progress: bool = True) -> Path:
    """Run ``stages`` (default: all) of ``profile`` in order; return the run folder.

    ``overrides`` apply to every selected stage that has the parameter; a name no selected
    stage has is an error.
    """
    plan = load_profile(profile)
    skipped = set(load_profile_spec(profile).get("skip") or [])
    stages = list(stages or [s for s in STAGES if s not in skipped and notebook_path(s).exists()])
    overrides = dict(overrides or {})
    for stage in stages:
        notebook_path(stage)
    known = set().union(*(notebook_defaults(s) for s in stages))
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ParameterError(
            f"no selected stage has parameter(s) {', '.join(unknown)}; "
            f"their parameters are {', '.join(sorted(known))}"
        )
    planned = {}
    for stage in stages:
        defaults = notebook_defaults(stage)
        params = dict(plan[stage])
        params.update({k: v for k, v in overrides.items() if k in defaults})
        with _naming_stage(stage):
            check_stage_parameters(stage, params)  # every stage's values before the first runs
        planned[stage] = params
    run_dir = None
    for stage, params in planned.items():
        run_dir = Path(complete_parameters(stage, params)["run_dir"])
        check_stage(stage, params)  # the run folder and inputs, once the stages before ran
        print(f"[{stage}] run folder {run_dir}", flush=True)
        execute_stage(stage, params, output_path=run_dir / "notebooks" / f"{stage}.ipynb",
                      progress=progress)
    return run_dir


# --------------------------------------------------------------------------- book


def write_vega_scripts(static_dir: Path = STATIC_DIR) -> list[Path]:
    """Write the vega, vega-lite and vega-embed JavaScript for offline charts in the book.

    Both files come from the installed packages, so they match altair's versions: the bundle
    from ``vl_convert.javascript_bundle`` (wrapped in a function scope so its top-level
    declarations cannot clash with the page's other scripts) and ``VEGA_DEBUG``, which tells
    altair's chart loader that these versions are present and need no download.
    """
    import altair as alt
    import vl_convert

    minor = ".".join(alt.VEGALITE_VERSION.split(".")[:2])
    bundle = vl_convert.javascript_bundle(vl_version=minor)
    versions = (
        "var VEGA_DEBUG = {"
        f'vega_version: "{alt.VEGA_VERSION}", '
        f'vegalite_version: "{alt.VEGALITE_VERSION}", '
        f'vegaembed_version: "{alt.VEGAEMBED_VERSION}"'
        "};\n"
    )
    bundle_path = static_dir / "vega-bundle.js"
    versions_path = static_dir / "vega-versions.js"
    io.write_text(bundle_path, "(function(){\n" + bundle + "\n})();\n")
    io.write_text(versions_path, versions)
    return [versions_path, bundle_path]


def parameters_markdown() -> str:
    """One Markdown table per stage: every papermill parameter, its default and its meaning."""
    parts = []
    for stage in STAGES:
        if not notebook_path(stage).exists():
            continue
        parts.append(f"### {stage}\n\n| parameter | default | meaning |\n|---|---|---|")
        for name, default, comment in parameter_table(stage):
            comment = comment.replace("|", "\\|")
            parts.append(f"| `{name}` | `{default!r}` | {comment} |")
        parts.append("")
    return "\n".join(parts) + "\n"


BAD_INPUTS_FILE = REPO / "tests" / "bad_inputs.yaml"


def bad_input_cases(path: Path = BAD_INPUTS_FILE) -> list[dict[str, Any]]:
    """The cases of the bad-input matrix (``tests/bad_inputs.yaml``), in file order."""
    return yaml.safe_load(path.read_text())["cases"]


def _table_cell(text: str, *, code: bool = False) -> str:
    text = str(text).replace("|", "\\|")
    return f"`{text}`" if code else text


def _bad_input_row(case: Mapping[str, Any]) -> str:
    name = case["input"]
    looks_like_code = ":" in name or name.startswith("-")
    if case.get("outcome", "error") == "error":
        seen = "stops; the message says " + " … ".join(
            _table_cell(f, code=True) for f in case["expect"])
    else:
        seen = "runs; " + " ".join(_table_cell(f) for f in case["expect"])
    how = case.get("checked_by", "stage command")
    return (f"| {_table_cell(name, code=looks_like_code)} | {_table_cell(case['bad'])} | "
            f"{seen} | {how} |")


def bad_inputs_markdown(path: Path = BAD_INPUTS_FILE) -> str:
    """The bad-input matrix as one Markdown table: a row per case of ``tests/bad_inputs.yaml``."""
    rows = [_bad_input_row(case) for case in bad_input_cases(path)]
    header = "| input | bad value | what happens | checked by |\n|---|---|---|---|"
    return "\n".join([header, *rows]) + "\n"


def _skipped_stage_notebook(stage: str, profile: str) -> Any:
    import nbformat

    text = (
        f"# {stage}: not run in this build\n\n"
        f"The profile `{profile}` does not run this stage. Run it with "
        f"`make stage STAGE={stage} PROFILE={profile}` and build the book again."
    )
    return nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell(text)])


def prepare_book(profile: str, *, run_dir: str | Path | None = None,
                 book_root: Path = REPO) -> None:
    """Hand the profile's executed notebooks to the book (``<book_root>/book/executed/``).

    Also writes the generated pages the chapters include (``parameters.md``,
    ``bad_inputs.md``) and the vega
    scripts for offline charts (``<book_root>/_static/``). A stage the profile skipped gets a
    one-paragraph page that says so; a stage that should have run and did not is an error.
    ``run_dir`` replaces the profile's run folder (the tests build a book from a temporary run).
    """
    import nbformat

    plan = load_profile(profile)
    skipped = set(load_profile_spec(profile).get("skip") or [])
    executed_dir = Path(book_root) / "book" / "executed"
    executed_dir.mkdir(parents=True, exist_ok=True)
    for stage in STAGES:
        if not notebook_path(stage).exists():
            continue
        target = executed_dir / f"{stage}.ipynb"
        if stage in skipped:
            nbformat.write(_skipped_stage_notebook(stage, profile), target)
            continue
        stage_run = Path(run_dir or plan[stage].get("run_dir")
                         or notebook_defaults(stage)["run_dir"])
        executed = stage_run / "notebooks" / f"{stage}.ipynb"
        if not executed.exists():
            raise RunFolderError(
                f"no executed notebook {executed}; run the stages first "
                f"(make stages PROFILE={profile})"
            )
        shutil.copyfile(executed, target)
        # the chapters link the stage's tables as downloads, relative to the notebook
        output = STAGE_OUTPUTS[stage]
        tables = sorted((stage_run / output).glob("*.csv")) if stage == "04_analysis" else []
        if tables:
            shutil.rmtree(executed_dir / output, ignore_errors=True)
            (executed_dir / output).mkdir(parents=True)
            for table in tables:
                shutil.copyfile(table, executed_dir / output / table.name)
    io.write_text(executed_dir / "parameters.md", parameters_markdown())
    io.write_text(executed_dir / "bad_inputs.md", bad_inputs_markdown())
    write_vega_scripts(Path(book_root) / "_static")


# --------------------------------------------------------------------------- command line


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def _parse_overrides(pairs: Sequence[Sequence[str]]) -> dict[str, Any]:
    """``-p name value`` pairs; values are read as YAML (papermill's ``-y`` rules): 3 is an
    int, 0.5 a float, true a bool, and anything else a string."""
    values = {}
    for name, value in pairs:
        try:
            values[name] = yaml.safe_load(value)
        except yaml.YAMLError as error:
            # safe_load builds only plain values: a tag such as !!python/object is refused
            raise ParameterError(
                f"-p {name}: {value!r} is not a plain value ({_first_line(error)}); give a "
                "number, true/false, a string or a [list]"
            ) from None
    return values


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lib.pipeline", description=__doc__.split("\n\n")[0]
    )
    commands = parser.add_subparsers(dest="command", required=True)
    run_parser = commands.add_parser("run", help="execute stages of a profile")
    run_parser.add_argument("--profile", default="default", help="profiles/<name>.yaml")
    run_parser.add_argument("--stage", action="append", help="a stage (repeatable); default all")
    run_parser.add_argument("-p", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                            help="override a parameter, e.g. -p lr0 0.01")
    run_parser.add_argument("--no-progress", action="store_true")
    book_parser = commands.add_parser("book", help="hand executed notebooks to the book")
    book_parser.add_argument("--profile", default="default")
    args = parser.parse_args(argv)
    try:
        if args.command == "run":
            run(args.profile, stages=args.stage, overrides=_parse_overrides(args.p),
                progress=not args.no_progress)
        else:
            prepare_book(args.profile)
    except BorderlineError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
