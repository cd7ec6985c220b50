"""Stages, profiles, run folders and manifests, and papermill execution.

A *stage* is one notebook in ``notebooks/`` (a jupytext percent script) with one cell tagged
``parameters``. A *profile* (``profiles/<name>.yaml``) names the run folder and the parameters
of every stage. ``python -m lib.pipeline run`` converts each stage's script, executes it with
papermill into ``<run_dir>/notebooks/<stage>.ipynb`` and stops at the first failing stage with
its error message; ``python -m lib.pipeline book`` hands the executed notebooks to the book.

This module holds the stages and their notebook parameters, the profiles, the run folders and
their manifests (:func:`start_stage`, :func:`finish_stage`), papermill execution and the
command line. Two jobs live in their own modules:

- :mod:`lib.checks`: the checks before a stage. :func:`~lib.checks.check_stage` checks its
  parameters (types against the notebook's own defaults, then their values), the run folder's
  manifest and the files the stage will read; it only reads, so a stage with a bad input stops
  before anything is written. ``run`` calls it before starting papermill, and inside a
  notebook :func:`start_stage` calls it again before recording the stage, so a run folder
  never holds results of two different parameter sets (whether the stage is run through this
  module or through papermill directly).
- :mod:`lib.book`: the book's generated files. :func:`~lib.book.prepare_book` (the ``book``
  command) copies the executed notebooks and writes the parameter table, the bad-input table
  (:func:`~lib.book.bad_inputs_markdown`, from ``tests/bad_inputs.yaml``, which lists the bad
  inputs the tests try) and the vega scripts for offline charts.
"""

from __future__ import annotations

import argparse
import ast
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
from lib.errors import BorderlineError, ParameterError

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
        DatasetError: a bad dataset folder or file (see :func:`~lib.checks.check_stage`).
        CheckpointError: a bad weights or checkpoint file (see :func:`~lib.checks.check_stage`).
        RunFolderError: the run folder is missing (for a later stage), an earlier stage has
            not run, or this stage ran with other parameters and ``overwrite`` is False.
    """
    from lib.checks import check_stage

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
    from lib.checks import _naming_stage, check_stage, check_stage_parameters, complete_parameters

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
            from lib.book import prepare_book

            prepare_book(args.profile)
    except BorderlineError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
