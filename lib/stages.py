"""The stage contract and the run folder: the one place that names stages, parameters and paths.

A *stage* is one notebook in ``notebooks/`` (a jupytext percent script) with one cell tagged
``parameters``; it writes one subfolder of the run folder (:data:`STAGE_OUTPUTS`). A *profile*
(``profiles/<name>.yaml``) names the run folder and the parameters of every stage; a stage's
parameters are the notebook's defaults, then the profile's values, then the command line's
(:func:`merged_parameters`, with values read by :func:`parse_value`).

A run folder looks like this (every name below is spelt only here; other modules ask the
functions of this module for paths)::

    <run_dir>/
      manifest.json               parameters, versions, start time, finished flag per stage
      run.lock                    who holds the folder (see :func:`hold_run_folder`)
      notebooks/<stage>.ipynb     executed notebooks
      data/                       dataset.json, frames.csv, counts.csv    (data_file)
      train/                      epoch_NN.safetensors, optimizer_NN.safetensors,
                                  <table>.csv, train_params.json          (checkpoint_file, ...)
      attack/                     job.json, selection.csv, results.csv, traces.npz, ...,
                                  chunks/<part>/chunk_NNNNN.{csv,npz}    (attack_file, chunk_files)
      analysis/                   the analysis tables                    (analysis_file)
      minimality/                 reference.csv, timings.csv, ratios.csv (minimality_file)

**The lock.** A stage holds an exclusive ``flock`` on ``<run_dir>/run.lock`` while it runs; the
operating system releases it when the process ends, however it ends, so a killed run never
leaves a stale lock. A second stage on the same folder is refused at once with a
:class:`~lib.errors.RunFolderError` that names the holding stage, its process id and since
when, and writes nothing. A stage that starts removes the temporary files of interrupted
atomic writes (:func:`remove_leftovers`) from its own folder.
"""

from __future__ import annotations

import ast
import contextlib
import copy
import datetime as dt
import fcntl
import functools
import importlib.metadata
import json
import os
import platform
import shlex
import shutil
import socket
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

from lib import io
from lib.errors import ParameterError, RunFolderError

REPO = Path(__file__).resolve().parent.parent
NOTEBOOK_DIR = REPO / "notebooks"
PROFILE_DIR = REPO / "profiles"

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

#: The folder of the attack stage's finished chunks, inside ``attack/``.
CHUNK_DIR = "chunks"

#: Set in a stage command's environment while it holds a run folder's lock, so the notebook
#: kernel it starts knows that its parent holds the folder.
LOCK_ENVIRONMENT = "BORDERLINE_HELD_RUN_DIR"


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


def _parameters_cell(path: Path) -> str:
    import jupytext  # reading a script with jupytext takes a noticeable time

    notebook = jupytext.read(path)
    cells = [c for c in notebook.cells if "parameters" in c.metadata.get("tags", [])]
    if len(cells) != 1:
        raise ParameterError(
            f"{path}: expected exactly one cell tagged 'parameters', found {len(cells)}"
        )
    return cells[0].source


@functools.lru_cache(maxsize=32)
def _parse_defaults(path: Path, mtime_ns: int) -> dict[str, Any]:
    # cached per file version
    defaults: dict[str, Any] = {}
    for node in ast.parse(_parameters_cell(path)).body:
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
                f"write it like the default, e.g. -p {name} {command_line_value(default)}"
            )


def command_line_value(value: Any) -> str:
    """``value`` as it is typed after ``-p name`` (YAML, quoted for the shell when needed)."""
    if isinstance(value, str):
        text = value if value and yaml.safe_load(value) == value else json.dumps(value)
    elif isinstance(value, bool):
        text = str(value)
    else:
        text = json.dumps(value)
    return shlex.quote(text)


def first_line(error: Exception) -> str:
    """The first line of an error's message (its type's name when the message is empty)."""
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def parse_value(name: str, text: str) -> Any:
    """A command-line parameter value read as YAML (papermill's ``-y`` rules): 3 is an int,
    0.5 a float, true a bool, [a, b] a list, anything else a string.

    Raises:
        ParameterError: the text is not a plain YAML value (a tag such as ``!!python/object``
            is refused, never run: safe_load builds only plain values).
    """
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ParameterError(
            f"-p {name}: {text!r} is not a plain value ({first_line(error)}); give a "
            "number, true/false, a string or a [list]"
        ) from None


def stage_parameters(stage: str, namespace: Mapping[str, Any]) -> dict[str, Any]:
    """The current values of ``stage``'s parameters, read from a notebook's ``globals()``."""
    return {name: namespace[name] for name in notebook_defaults(stage)}


def parameter_table(stage: str) -> list[tuple[str, Any, str]]:
    """``(name, default, comment)`` for each line of ``stage``'s parameters cell."""
    defaults = notebook_defaults(stage)
    rows = []
    for line in _parameters_cell(notebook_path(stage)).splitlines():
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
            f"{path} is not a valid profile ({first_line(error)}); a profile holds plain "
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


def merged_parameters(
    stage: str,
    *,
    profile: str | None = None,
    overrides: Mapping[str, Any] | None = None,
    with_defaults: bool = False,
) -> dict[str, Any]:
    """A stage's parameters: (the notebook's defaults,) the profile's values, then
    ``overrides``; a name the notebook does not have or a value of the wrong type raises
    ParameterError.

    This is the one merge of defaults, profile and command line: the stage command and the
    torchrun launcher both use it.
    """
    values = notebook_defaults(stage) if with_defaults else {}
    if profile:
        values.update(load_profile(profile)[stage])
    values.update(overrides or {})
    check_parameter_types(stage, values)
    return values


# --------------------------------------------------------------------------- run-folder paths


def stage_dir(run_dir: str | os.PathLike[str], stage: str) -> Path:
    """The folder ``stage`` writes inside ``run_dir``."""
    notebook_path(stage)
    return Path(run_dir) / STAGE_OUTPUTS[stage]


def manifest_file(run_dir: str | os.PathLike[str]) -> Path:
    return Path(run_dir) / "manifest.json"


def executed_notebook(run_dir: str | os.PathLike[str], stage: str) -> Path:
    """Where the stage command puts ``stage``'s executed notebook."""
    return Path(run_dir) / "notebooks" / f"{stage}.ipynb"


def data_file(run_dir: str | os.PathLike[str], kind: str) -> Path:
    """A file of the data stage by kind (see ``DATA_FILES``)."""
    return stage_dir(run_dir, "01_data") / _file_name(DATA_FILES, kind, "data")


def train_dir(run_dir: str | os.PathLike[str]) -> Path:
    return stage_dir(run_dir, "02_train")


def checkpoint_file(train_folder: str | os.PathLike[str], epoch: int) -> Path:
    """The model after ``epoch`` in a training folder (the run folder's ``train/``)."""
    return Path(train_folder) / f"epoch_{epoch:02d}.safetensors"


def checkpoint_path(run_dir: str | os.PathLike[str], epoch: int) -> Path:
    """The model after ``epoch`` in a run folder."""
    return checkpoint_file(train_dir(run_dir), epoch)


def optimizer_file(train_folder: str | os.PathLike[str], epoch: int) -> Path:
    """The SGD momentum buffers after ``epoch`` in a training folder."""
    return Path(train_folder) / f"optimizer_{epoch:02d}.safetensors"


def train_table(train_folder: str | os.PathLike[str], name: str) -> Path:
    """A training table (``metrics``, ``losses``, ``per_class``, ``confusion``,
    ``predictions``) in a training folder."""
    return Path(train_folder) / f"{name}.csv"


def train_params_file(train_folder: str | os.PathLike[str]) -> Path:
    return Path(train_folder) / "train_params.json"


def has_checkpoints(train_folder: str | os.PathLike[str]) -> bool:
    return any(Path(train_folder).glob("epoch_*.safetensors"))


def logged_epochs(train_folder: str | os.PathLike[str]) -> list[int]:
    """Sorted epochs with a ``metrics.csv`` row (written last in an epoch) and a checkpoint."""
    import pandas as pd

    metrics = train_table(train_folder, "metrics")
    if not metrics.is_file():
        return []
    logged = set(pd.read_csv(metrics)["epoch"].astype(int))
    return sorted(e for e in logged if checkpoint_file(train_folder, e).is_file())


def finished_epochs(train_folder: str | os.PathLike[str]) -> int:
    """k such that epochs 1..k each have a checkpoint and a metrics row."""
    logged = set(logged_epochs(train_folder))
    finished = 0
    while finished + 1 in logged:
        finished += 1
    return finished


def attack_dir(run_dir: str | os.PathLike[str]) -> Path:
    return stage_dir(run_dir, "03_attack")


def attack_file(run_dir: str | os.PathLike[str], kind: str) -> Path:
    """A file of the attack stage by kind (see ``ATTACK_FILES``)."""
    return attack_dir(run_dir) / _file_name(ATTACK_FILES, kind, "attack")


def chunk_files(run_dir: str | os.PathLike[str], part: str, chunk: int) -> tuple[Path, Path]:
    """``(csv, npz)`` of an attack chunk; the CSV exists only once the chunk is complete."""
    folder = attack_dir(run_dir) / CHUNK_DIR / part
    return folder / f"chunk_{chunk:05d}.csv", folder / f"chunk_{chunk:05d}.npz"


def analysis_file(run_dir: str | os.PathLike[str], table: str) -> Path:
    """An analysis table (``<table>.csv``)."""
    return stage_dir(run_dir, "04_analysis") / f"{table}.csv"


def minimality_file(run_dir: str | os.PathLike[str], kind: str) -> Path:
    """A file of the minimality stage by kind (see ``MINIMALITY_FILES``)."""
    return stage_dir(run_dir, "05_minimality") / _file_name(MINIMALITY_FILES, kind, "minimality")


def _file_name(files: Mapping[str, str], kind: str, stage: str) -> str:
    # the file name itself is accepted too, for callers that still hold one
    if kind in files:
        return files[kind]
    if kind in files.values():
        return kind
    raise ValueError(f"the {stage} stage writes no file {kind!r}; its files are {dict(files)}")


def lock_file(run_dir: str | os.PathLike[str]) -> Path:
    # not a hidden name: every hidden file in a run folder is an interrupted write's temporary
    return Path(run_dir) / "run.lock"


# --------------------------------------------------------------------------- manifests


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in RECORDED_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def read_manifest(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The run folder's manifest (``{"stages": {}}`` for a new folder)."""
    path = manifest_file(run_dir)
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


def used_precision(parameters: Mapping[str, Any]) -> dict[str, str]:
    """``{"precision_used": "float32" | "bfloat16", "bfloat16_native": bool,
    "bfloat16_cpu_flags": [...]}``: what a stage with a ``precision`` parameter computes in on
    its device ("auto" resolved), whether the device computes bfloat16 natively and, on a CPU,
    which of the instructions that do so it has; ``{}`` for other stages. The manifest
    records it beside the package versions: it describes the machine, not a parameter, so it
    is never compared when a stage runs again."""
    if "precision" not in parameters:
        return {}
    from lib import precision  # torch: only for the stages that have the parameter

    device = parameters.get("device", "cpu")
    flags = (sorted(precision.cpu_flags() & set(precision.BF16_CPU_FLAGS))
             if str(device).startswith("cpu") else [])
    return {"precision_used": precision.resolve(parameters["precision"], device),
            "bfloat16_native": precision.bf16_is_fast(device), "bfloat16_cpu_flags": flags}


def recorded_parameters(parameters: Mapping[str, Any]) -> dict[str, Any]:
    """The parameters a manifest records: all but the runtime ones."""
    return {k: v for k, v in parameters.items() if k not in RUNTIME_PARAMETERS}


def record_start(stage: str, run_dir: str | os.PathLike[str],
                 parameters: Mapping[str, Any]) -> Path:
    """Record ``stage`` as started with ``parameters`` in the manifest; return its folder.

    When the stage ran before with other parameters, its results and those of every later
    stage are removed first. The caller has checked the folder (``lib.checks``).
    """
    run_dir = Path(run_dir)
    with hold_run_folder(run_dir, stage):
        manifest = read_manifest(run_dir)
        recorded = manifest.setdefault("stages", {})
        asked = recorded_parameters(parameters)
        previous = recorded.get(stage)
        if previous is not None and previous["parameters"] != asked:
            for later in STAGES[STAGES.index(stage):]:
                shutil.rmtree(stage_dir(run_dir, later), ignore_errors=True)
                recorded.pop(later, None)
        recorded[stage] = {
            "parameters": asked,
            "versions": package_versions(),
            **used_precision(parameters),
            "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "finished": False,
        }
        remove_leftovers(stage_dir(run_dir, stage))
        io.write_json(manifest_file(run_dir), manifest)
        out = stage_dir(run_dir, stage)
        out.mkdir(exist_ok=True)
    return out


def record_finish(stage: str, run_dir: str | os.PathLike[str]) -> None:
    """Mark ``stage`` finished in the manifest (later stages require it)."""
    with hold_run_folder(run_dir, stage):
        manifest = read_manifest(run_dir)
        manifest["stages"][stage]["finished"] = True
        io.write_json(manifest_file(run_dir), manifest)


# --------------------------------------------------------------------------- the lock


#: Run folders this process holds: resolved path -> (open lock file, depth of nesting).
_held: dict[Path, list[Any]] = {}


def _holder_text(run_dir: Path) -> str:
    try:
        holder = json.loads(lock_file(run_dir).read_text() or "{}")
    except (OSError, ValueError):
        holder = {}
    if not holder:
        return "another process"
    return (f"stage {holder.get('stage', '?')} (process {holder.get('pid', '?')} on "
            f"{holder.get('host', '?')}, since {holder.get('since', '?')})")


def _in_use(run_dir: Path) -> RunFolderError:
    return RunFolderError(
        f"run folder {run_dir} is in use by {_holder_text(run_dir)}; wait until it "
        "finishes, or use another run folder (-p run_dir ...)"
    )


def _held_by_parent(run_dir: Path) -> bool:
    return os.environ.get(LOCK_ENVIRONMENT) == str(run_dir)


@contextlib.contextmanager
def hold_run_folder(run_dir: str | os.PathLike[str], stage: str) -> Iterator[Path]:
    """Hold ``run_dir``'s lock for the block (created, with the folder, when missing).

    Re-entrant within a process; a block inside a stage command's notebook kernel finds the
    lock held by its parent command (through :data:`LOCK_ENVIRONMENT`) and takes nothing.
    While held, ``LOCK_ENVIRONMENT`` names the folder for the processes this one starts.

    Raises:
        RunFolderError: another process holds the folder; the message names its stage,
            process id and start time. Nothing is written then.
    """
    run_dir = Path(run_dir).resolve()
    if run_dir in _held or _held_by_parent(run_dir):
        if run_dir in _held:
            _held[run_dir][1] += 1
        try:
            yield run_dir
        finally:
            if run_dir in _held:
                _release(run_dir)
        return
    _acquire(run_dir, stage)
    try:
        yield run_dir
    finally:
        _release(run_dir)


def _acquire(run_dir: Path, stage: str) -> None:
    if run_dir.exists() and not run_dir.is_dir():
        raise RunFolderError(
            f"run folder {run_dir} is a file, not a folder; set run_dir to a folder path"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    handle = open(lock_file(run_dir), "a+")  # noqa: SIM115 -- kept open while held
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise _in_use(run_dir) from None
    handle.seek(0)
    handle.truncate()
    handle.write(json.dumps({
        "stage": stage, "pid": os.getpid(), "host": socket.gethostname(),
        "since": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }) + "\n")
    handle.flush()
    _held[run_dir] = [handle, 1, os.environ.get(LOCK_ENVIRONMENT)]
    os.environ[LOCK_ENVIRONMENT] = str(run_dir)


def _release(run_dir: Path) -> None:
    entry = _held[run_dir]
    entry[1] -= 1
    if entry[1]:
        return
    del _held[run_dir]
    if entry[2] is None:
        os.environ.pop(LOCK_ENVIRONMENT, None)
    else:
        os.environ[LOCK_ENVIRONMENT] = entry[2]
    entry[0].close()  # closing the file releases the flock


def holds_run_folder(run_dir: str | os.PathLike[str]) -> bool:
    """Whether this process (or the stage command that started it) holds ``run_dir``."""
    run_dir = Path(run_dir).resolve()
    return run_dir in _held or _held_by_parent(run_dir)


def is_leftover(path: Path) -> bool:
    """A temporary file of an interrupted atomic write (``.<name>.<random>.tmp...``)."""
    return path.name.startswith(".") and ".tmp" in path.name and path.is_file()


def remove_leftovers(folder: str | os.PathLike[str]) -> list[Path]:
    """Remove the temporary files that a killed run left under ``folder``; return them.

    Call only while holding the run folder, so no write in flight is removed.
    """
    folder = Path(folder)
    found = sorted(p for p in folder.rglob(".*") if is_leftover(p)) if folder.is_dir() else []
    for path in found:
        path.unlink(missing_ok=True)
    return found


def check_not_held(run_dir: str | os.PathLike[str]) -> None:
    """RunFolderError when another process holds ``run_dir``; only reads (writes nothing).

    The stage command calls it before its checks, so a second command is refused at once.
    """
    run_dir = Path(run_dir).resolve()
    path = lock_file(run_dir)
    if holds_run_folder(run_dir) or not path.is_file():
        return
    with open(path) as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _in_use(run_dir) from None
