"""Stage commands: papermill execution, the notebooks' start and finish of a stage, the CLI.

``python -m lib.run.pipeline run`` converts each stage's script, executes it with papermill into
the run folder's ``notebooks/<stage>.ipynb`` and stops at the first failing stage with its
error message; ``python -m lib.run.pipeline book`` hands the executed notebooks to the book.
Each stage holds its run folder's lock (:mod:`lib.run.lock`) from its checks to its executed
notebook.

The stage's parameters (:mod:`lib.run.parameters`), the run folder's paths
(:mod:`lib.run.layout`) and manifest (:mod:`lib.run.manifest`) have their own modules, and so
have two jobs of the command:

- :mod:`lib.run.checks`: the checks before a stage. :func:`~lib.run.checks.check_stage` checks
  its parameters (types against their defaults, then their values), the run folder's manifest
  and the files the stage will read; it only reads, so a stage with a bad input stops before
  anything is written. ``run`` calls it before starting papermill, and inside a notebook
  :func:`start_stage` calls it again before recording the stage, so a run folder never holds
  results of two different parameter sets (whether the stage is run through this module or
  through papermill directly).
- :mod:`lib.run.book`: the book's generated files. :func:`~lib.run.book.prepare_book` (the
  ``book`` command) copies the executed notebooks and writes the parameter table, the bad-input
  table (:func:`~lib.run.book.bad_inputs_markdown`, from ``tests/bad_inputs.yaml``, which lists
  the bad inputs the tests try) and the vega scripts for offline charts.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lib import io
from lib.errors import BorderlineError, ParameterError
from lib.progress import relay
from lib.run.book import prepare_book
from lib.run.checks import check_stage, check_stage_parameters, naming_stage
from lib.run.layout import REPO, STAGES, executed_notebook, notebook_path
from lib.run.lock import check_not_held, hold_run_folder, remove_leftovers
from lib.run.manifest import record_finish, record_start
from lib.run.parameters import (
    check_parameter_types,
    complete_parameters,
    load_profile_spec,
    merged_parameters,
    parse_value,
    stage_defaults,
)

# --------------------------------------------------------------------------- stages in a notebook


def start_stage(
    stage: str,
    *,
    run_dir: str | Path,
    parameters: Mapping[str, Any],
    overwrite: bool = False,
) -> Path:
    """Check and record a stage's parameters in the run folder; return the stage's folder.

    Nothing is written when a check fails. The run folder's lock is held while the manifest
    changes (by the stage command itself when it started this notebook), and the temporary
    files that a killed run left in the stage's folder are removed.

    Args:
        stage: one of ``STAGES``.
        run_dir: the run folder; created by the first stage, required by the others.
        parameters: every parameter of the notebook (runtime ones are dropped here).
        overwrite: discard this stage's earlier results (and those of every later stage)
            when they were made with other parameters, instead of refusing.

    Raises:
        ParameterError: a parameter the notebook does not have, of the wrong type, or out of
            range.
        DatasetError: a bad dataset folder or file (see :func:`~lib.run.checks.check_stage`).
        CheckpointError: a bad weights or checkpoint file (see :func:`~lib.run.checks.check_stage`).
        RunFolderError: the run folder is missing (for a later stage), an earlier stage has
            not run, this stage ran with other parameters and ``overwrite`` is False, or
            another stage command holds the folder.
    """
    check_not_held(run_dir)
    check_stage(stage, {**parameters, "run_dir": str(run_dir)}, overwrite=overwrite)
    return record_start(stage, run_dir, parameters)


def finish_stage(stage: str, *, run_dir: str | Path) -> None:
    """Mark ``stage`` finished in the manifest (later stages require it)."""
    record_finish(stage, run_dir)


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
    # the notebook's own progress bars go to this terminal, not into the notebook
    with io.atomic_path(output_path, suffix=".tmp.ipynb") as tmp, relay(enabled=progress):
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
    stage has is an error. Each stage holds its run folder's lock from its checks to its
    executed notebook (:func:`lib.run.lock.hold_run_folder`); another command already holding
    it makes this one stop at once, before it writes anything.
    """
    selected = _selected_stages(profile, stages)
    overrides = dict(overrides or {})
    known = set().union(*(stage_defaults(s) for s in selected))
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ParameterError(
            f"no selected stage has parameter(s) {', '.join(unknown)}; "
            f"their parameters are {', '.join(sorted(known))}"
        )
    planned = {}
    for stage in selected:
        with naming_stage(stage):
            defaults = stage_defaults(stage)
            params = merged_parameters(stage, profile=profile, overrides={
                k: v for k, v in overrides.items() if k in defaults})
            check_stage_parameters(stage, params)  # every stage's values before the first runs
        planned[stage] = params
    run_dir = None
    for stage, params in planned.items():
        run_dir = Path(complete_parameters(stage, params)["run_dir"])
        _run_locked(stage, params, run_dir, progress=progress)
    return run_dir


def _selected_stages(profile: str, stages: Sequence[str] | None) -> list[str]:
    skipped = set(load_profile_spec(profile).get("skip") or [])
    selected = list(stages or [s for s in STAGES
                               if s not in skipped and notebook_path(s).exists()])
    for stage in selected:
        notebook_path(stage)
    return selected


def _run_locked(stage: str, params: Mapping[str, Any], run_dir: Path, *,
                progress: bool) -> None:
    """Check ``stage`` (reads only), then execute it holding the run folder's lock."""
    with naming_stage(stage):
        check_not_held(run_dir)  # refused at once, before the slower checks
    check_stage(stage, params)  # the run folder and inputs, once the stages before ran
    with contextlib.ExitStack() as held:
        with naming_stage(stage):
            held.enter_context(hold_run_folder(run_dir, stage))
        output = executed_notebook(run_dir, stage)
        remove_leftovers(output.parent)  # a killed run's half-written notebooks
        print(f"[{stage}] run folder {run_dir}", flush=True)
        execute_stage(stage, params, output_path=output, progress=progress)


# --------------------------------------------------------------------------- command line


def _parse_overrides(pairs: Sequence[Sequence[str]]) -> dict[str, Any]:
    """``-p name value`` pairs, each value read by :func:`lib.run.parameters.parse_value`."""
    return {name: parse_value(name, value) for name, value in pairs}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lib.run.pipeline", description=__doc__.split("\n\n")[0]
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
