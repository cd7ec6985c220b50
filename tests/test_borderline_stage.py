"""The borderline-training stage (notebooks/06_borderline.py) on the tiny profile's real stage
output: what it writes, and that a stage command killed twice ends with the files of an
uninterrupted one."""

from __future__ import annotations

import json
import random
import shutil
import sys
import time
from pathlib import Path

import nbformat
import pytest

from lib import io
from lib.analysis import statistics
from lib.run import layout, manifest, tables
from lib.run.borderline_measures import HELD_OUT_STEPS, MODELS
from tests.test_kill_resume import Child, clone_run, kill_tree, visible_files

pytestmark = pytest.mark.slow
STAGE = layout.BORDERLINE_STAGE


def test_the_stage_trains_three_arms_and_measures_four_models(tiny_run: Path) -> None:
    stages = manifest.read_manifest(tiny_run)["stages"]
    assert stages[STAGE]["finished"]
    trained = tables.read_training_metrics(tiny_run)["epoch"].max()
    last = trained + 1  # the tiny profile: one epoch from the last clean checkpoint
    steps = {}
    for arm in ("control", "borderline", "pgd"):
        folder = layout.arm_dir(tiny_run, arm)
        assert layout.checkpoint_file(folder, last).is_file()
        assert not layout.checkpoint_file(folder, trained).exists()
        assert list(tables.read_train_table(folder, "metrics")["epoch"]) == [last]
        steps[arm] = tables.read_train_table(folder, "steps")
    images = steps["control"]["images"]
    assert (steps["control"]["passes"] == images).all()
    assert steps["borderline"]["attack_passes"].sum() > 0
    pgd_steps = int(steps["pgd"]["attack_passes"].sum() / images.sum())
    assert (steps["pgd"]["attack_passes"] == pgd_steps * steps["pgd"]["images"]).all()
    assert tables.read_margins(layout.arm_dir(tiny_run, "borderline"), last) is not None

    fmn = tables.read_table(tiny_run, "fmn_margins")
    per_model = fmn.groupby(["model", "norm"]).size()
    assert set(fmn["model"]) == set(MODELS) and per_model.nunique() == 1
    assert (fmn.loc[~fmn["correct"], "margin"] == 0).all()
    held = tables.read_table(tiny_run, "held_out")
    assert list(held["model"]) == list(MODELS) and (held["robust"] <= held["correct"]).all()
    assert HELD_OUT_STEPS >= 1
    modes = tables.read_table(tiny_run, "attack_modes")
    assert len(modes) == 2 * len(MODELS) and (modes["train_forwards"] == 0).all()

    claims = tables.read_table(tiny_run, "claims")
    assert len(claims) == 4 and set(claims["verdict"]) <= set(statistics.VERDICTS)
    compared = tables.read_table(tiny_run, "comparisons")
    assert len(compared) == 12  # six pairs of models, two norms


def test_the_chapter_opens_with_sentences_from_the_verdicts(tiny_run: Path) -> None:
    notebook = nbformat.read(layout.executed_notebook(tiny_run, STAGE), as_version=4)
    glued = {}
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            record = output.get("metadata", {}).get("scrapbook", {})
            if record:
                text = output["data"][record["mime_prefix"] + "text/plain"]
                glued[record["name"]] = text.strip("'\"")
    claims = tables.read_table(tiny_run, "claims")
    assert f"(verdict: {claims.loc[0, 'verdict']})" in glued["bl_found_linf"]
    assert f"(verdict: {claims.loc[1, 'verdict']})" in glued["bl_found_accuracy"]
    assert {"bl_found_l2", "bl_found_pgd", "bl_found_guards", "bl_limits"} <= set(glued)


def without_stage(source: Path, target: Path) -> Path:
    """A clone of ``source`` as it was before the borderline-training stage ran."""
    clone_run(source, target)
    shutil.rmtree(layout.stage_dir(target, STAGE))
    record = manifest.read_manifest(target)
    del record["stages"][STAGE]
    io.write_json(layout.manifest_file(target), record)
    (layout.executed_notebook(target, STAGE)).unlink()
    return target


def stage_command(run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "lib.run.pipeline", "run", "--profile", "tiny", "--stage",
            STAGE, "-p", "run_dir", json.dumps(str(run_dir)), "--no-progress"]


def test_a_killed_stage_ends_with_the_files_of_an_uninterrupted_one(tiny_run: Path,
                                                                     tmp_path: Path) -> None:
    rng = random.Random(2506)
    reference = without_stage(tiny_run, tmp_path / "reference")
    killed = without_stage(tiny_run, tmp_path / "killed")
    Child(stage_command(reference), tmp_path / "reference.log").finish()
    kills = []
    points = [  # mid-way through the borderline arm, then in the measurements
        layout.arm_dir(killed, "borderline") / "train_params.json",
        layout.borderline_file(killed, "fmn_margins"),
    ]
    for point in points:
        child = Child(stage_command(killed), tmp_path / "killed.log")
        child.wait_for(point.is_file)
        time.sleep(rng.uniform(0, 1.0))
        kills.append(kill_tree(child))
        assert not manifest.read_manifest(killed)["stages"][STAGE]["finished"]
    Child(stage_command(killed), tmp_path / "killed.log").finish()
    assert all(processes >= 2 for processes in kills)  # the command and its kernel

    folder = layout.stage_dir
    timings = layout.borderline_file("", "arm_timings").name  # wall times differ
    names = [n for n in visible_files(folder(reference, STAGE)) if n != timings]
    assert [n for n in visible_files(folder(killed, STAGE)) if n != timings] == names
    differing = [n for n in names if (folder(killed, STAGE) / n).read_bytes()
                 != (folder(reference, STAGE) / n).read_bytes()]
    assert differing == []
    assert manifest.read_manifest(killed)["stages"][STAGE]["finished"]
