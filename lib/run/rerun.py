"""The rerun proof: execute a run's notebooks again in a fresh folder and compare.

Two checks that a run can be reproduced byte for byte on the same machine:

* :func:`rerun_notebooks` copies the executed notebooks of a run folder, points their
  parameters at a fresh folder, and lets ``pytest --nbval`` (strict mode) execute them again
  from the first stage: every output of every cell must equal the output papermill stored.
  The sanitize file ``tests/nbval-sanitize.cfg`` masks only what legitimately varies
  between two executions: chart element ids, progress-bar redraws and timings (a
  notebook holds progress only when ``BORDERLINE_PROGRESS=stderr`` put it there) and measured
  durations.
* :func:`result_digests` hashes every result file of a run folder, so two runs can be
  compared file by file.

From the command line (``make nbval`` runs it on the default profile's run folder)::

    python -m lib.run.rerun data/runs/default
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import nbformat

from lib.errors import RunFolderError
from lib.run import layout
from lib.run.layout import REPO, STAGES, executed_notebook
from lib.run.parameters import stage_defaults

SANITIZE_FILE = REPO / "tests" / "nbval-sanitize.cfg"

#: Parameters that name a file or folder; relative values are relative to the repository,
#: where papermill ran the stage.
PATH_PARAMETERS = ("run_dir", "dataset_root", "cache_dir", "weights_path")

#: Files of a run folder that are records of a run rather than results: the manifest holds
#: start times, the lock file the process that last held the folder, the executed notebooks
#: execution timestamps, ``data/dataset.json`` the absolute paths of the dataset and frame
#: cache that were read, and ``minimality/timings.csv`` and ``borderline/timings.csv`` how
#: long each reference attack and each training arm took.
NOT_RESULTS = tuple(path.as_posix() for path in (
    layout.manifest_file(""), layout.lock_file(""), layout.executed_notebook("", STAGES[0]).parent,
    layout.data_file("", "dataset"), layout.minimality_file("", "timings"),
    layout.borderline_file("", "arm_timings"),
))


def executed_notebooks(run_dir: str | os.PathLike[str]) -> list[Path]:
    """The executed notebooks of ``run_dir`` in stage order.

    Raises:
        RunFolderError: the folder holds no executed notebook.
    """
    folder = executed_notebook(run_dir, STAGES[0]).parent
    found = [executed_notebook(run_dir, stage) for stage in STAGES
             if executed_notebook(run_dir, stage).is_file()]
    if not found:
        raise RunFolderError(
            f"{folder} holds no executed stage notebook; run the stages first "
            f"(make stages, or python -m lib.run.pipeline run --profile <name>)"
        )
    return found


def relocate(notebook: nbformat.NotebookNode, stage: str, into: Path) -> nbformat.NotebookNode:
    """``stage``'s executed ``notebook`` with its parameters pointed at the fresh folder ``into``.

    ``run_dir`` and ``cache_dir`` always move into ``into``. ``dataset_root`` moves only
    for the synthetic dataset, which the data stage generates again from its seed; a real
    dataset stays where it is, as an absolute path. Every other stored output is kept, for
    nbval to compare with.
    """
    from papermill.parameterize import parameterize_notebook

    defaults = stage_defaults(stage)
    parameters = defaults | dict(notebook.metadata.get("papermill", {}).get("parameters", {}))
    moved = {"run_dir": into / "run", "cache_dir": into / "cache"}
    if parameters.get("dataset_kind") == "synthetic":
        moved["dataset_root"] = into / "dataset"
    for name in PATH_PARAMETERS:
        if name not in parameters:
            continue
        if name in moved:
            parameters[name] = str(moved[name])
        elif parameters[name]:
            parameters[name] = str((REPO / parameters[name]).resolve())
    relocated = parameterize_notebook(notebook, parameters, report_mode=False)
    relocated.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                        "language": "python"}
    return relocated


def rerun_notebooks(run_dir: str | os.PathLike[str], into: str | os.PathLike[str], *,
                    quiet: bool = True) -> subprocess.CompletedProcess[str]:
    """Re-execute ``run_dir``'s notebooks under strict nbval with their outputs in ``into``.

    The relocated copies are written to ``into/notebooks``; the stages write their new
    results to ``into/run``. Returns the finished pytest process (``returncode`` 0 when every
    cell ran and every output matched; its ``stdout`` names any cell that differed).
    """
    into = Path(into).resolve()
    copies = into / "notebooks"
    copies.mkdir(parents=True, exist_ok=True)
    paths = []
    for path in executed_notebooks(run_dir):
        copy = copies / path.name
        notebook = nbformat.read(path, as_version=4)
        nbformat.write(relocate(notebook, path.stem, into), copy)
        paths.append(copy)
    # An empty ini file keeps the repository's pytest configuration (testpaths, markers)
    # out of this run, which collects only the notebooks.
    config = into / "pytest.ini"
    config.write_text("[pytest]\n", encoding="utf-8")
    command = [
        sys.executable, "-m", "pytest", "--nbval", "--nbval-current-env",
        "--nbval-sanitize-with", str(SANITIZE_FILE), "-p", "no:cacheprovider",
        "-c", str(config), "--rootdir", str(into), "-q" if quiet else "-v",
        *map(str, paths),
    ]
    return subprocess.run(command, capture_output=True, text=True, cwd=into)


def result_digests(run_dir: str | os.PathLike[str]) -> dict[str, str]:
    """SHA-256 of every result file in ``run_dir``, keyed by its path relative to it.

    Hidden files (unfinished temporary writes), the manifest and the executed notebooks are
    left out (see ``NOT_RESULTS``).
    """
    root = Path(run_dir)
    digests = {}
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root)
        if (not path.is_file()
                or any(relative.is_relative_to(record) for record in NOT_RESULTS)
                or any(part.startswith(".") for part in relative.parts)):
            continue
        digests[relative.as_posix()] = hashlib.sha256(path.read_bytes()).hexdigest()
    return digests


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lib.run.rerun",
        description="Execute a run folder's notebooks again in a fresh folder under strict "
                    "nbval; exit 0 when every output matches.")
    parser.add_argument("run_dir", help="a run folder, e.g. data/runs/default")
    parser.add_argument("--into", help="folder for the rerun (default: a new temporary folder)")
    args = parser.parse_args(argv)
    into = Path(args.into) if args.into else Path(tempfile.mkdtemp(prefix="borderline-rerun-"))
    try:
        completed = rerun_notebooks(args.run_dir, into, quiet=False)
    except RunFolderError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(completed.stdout, end="")
    print(completed.stderr, end="", file=sys.stderr)
    print(f"rerun folder: {into}")
    return completed.returncode


if __name__ == "__main__":
    sys.exit(main())
