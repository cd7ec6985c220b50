"""Every stage notebook runs on the tiny profile, and re-executes cleanly under nbval."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from lib.run import layout
from lib.run.manifest import read_manifest

pytestmark = pytest.mark.slow


def _executed(run_dir: Path) -> list[Path]:
    return [run_dir / "notebooks" / f"{stage}.ipynb" for stage in layout.STAGES
            if layout.notebook_path(stage).exists()]


def test_every_stage_ran_without_errors(tiny_run: Path) -> None:
    for path in _executed(tiny_run):
        notebook = nbformat.read(path, as_version=4)
        errors = [o for c in notebook.cells if c.cell_type == "code"
                  for o in c.get("outputs", []) if o.output_type == "error"]
        assert errors == [], path.name
    manifest = read_manifest(tiny_run)
    assert all(manifest["stages"][s]["finished"] for s in manifest["stages"])


def test_executed_notebooks_rerun_under_nbval_lax(tiny_run: Path, tmp_path: Path) -> None:
    # nbval executes each notebook again from its first cell, with the parameters papermill
    # injected; every stage continues from its finished outputs, so this is fast.
    config = tmp_path / "pytest.ini"
    config.write_text("[pytest]\n")
    completed = subprocess.run(
        [sys.executable, "-m", "pytest", "--nbval-lax", "--nbval-current-env", "-q",
         "-p", "no:cacheprovider", "-c", str(config), "--rootdir", str(tmp_path),
         *map(str, _executed(tiny_run))],
        capture_output=True, text=True, cwd=tmp_path,
    )
    assert completed.returncode == 0, completed.stdout[-3000:]
    assert " passed" in completed.stdout and "failed" not in completed.stdout
