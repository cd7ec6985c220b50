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


def test_the_tiny_chain_feeds_the_replicate_analysis(tiny_run: Path) -> None:
    # the tiny profile trains two models (seeds 0 and 1); every table carries the model and
    # every claim its pooled verdict beside each model's own
    from lib.analysis.claim_table import CLAIMS
    from lib.run import tables

    seeds = read_manifest(tiny_run)["stages"]["02_train"]["parameters"]["seeds"]
    assert seeds == [0, 1] and list(layout.model_dirs(tiny_run)) == seeds
    results = tables.read_results(tiny_run)
    assert sorted(results["model"].unique()) == seeds
    job = tables.read_record(tiny_run, "job")["settings"]
    assert job["models"] == seeds and job["replicate_epochs"] == [1, 2]
    claims = tables.read_analysis_table(tiny_run, "paper_claims")
    assert len(claims) == len(CLAIMS)
    attack_claims = claims[claims["setting"].notna()]
    assert attack_claims["model_verdicts"].str.fullmatch(
        r"seed 0: \w+; seed 1: \w+").all()
    rates_of = claims[claims["claim"].str.contains("reaches 100 %")]
    assert (rates_of["models"] == 2).all()  # every attack of both models enters
    assert claims["models"].between(0, 2).all()
    rates = tables.read_analysis_table(tiny_run, "success_rate")
    assert sorted(rates["model"].unique()) == seeds
    assert (rates["images"] <= rates["attacks"]).all()
