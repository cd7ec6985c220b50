"""The training loop's objective hook and start point (lib/train/loop.py): the control arm is
the clean loop file for file, a run continued from a checkpoint repeats the clean run's next
epoch, a killed borderline arm resumes with identical files, and bad starts write nothing.

Every run is tiny (the colour task of tests/test_training.py: 56 images of 64 px, 7 SGD
steps per epoch), but each AlexNet checkpoint is about 230 MB, so runs are shared by
module-scoped fixtures.
"""

from __future__ import annotations

import filecmp
import json
from pathlib import Path

import pandas as pd
import pytest

from lib.errors import CheckpointError, ParameterError
from lib.run import layout, tables
from lib.train.borderline import FORWARD_WEIGHT, BorderlineSettings
from lib.train.loop import fit
from tests.test_training import RUN, colour_frames

#: The clean runs here: the class-weighted loss (so the objective gets the weights too) and
#: no momentum (so a continued run, whose momentum starts at zero, can equal the clean one).
CLEAN = {**RUN, "balance": "weights", "momentum": 0.0, "lr_decay": 0.5}
#: A cheap borderline arm: few updates, a drawn half of the correct images, random targets.
BORDER = BorderlineSettings(arm="borderline", lr0=0.02, max_updates=4, share=0.5,
                            target="random", seed=5)


@pytest.fixture(scope="module")
def splits():
    return colour_frames(8, seed=0, split="train"), colour_frames(4, seed=1, split="test")


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory, splits) -> Path:
    """Two clean epochs (objective None)."""
    out_dir = tmp_path_factory.mktemp("clean") / "train"
    fit(*splits, out_dir=out_dir, epochs=2, **CLEAN)
    return out_dir


def files(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir())


def test_the_control_arm_is_the_clean_loop_file_for_file(tmp_path, splits, clean_run) -> None:
    control = tmp_path / "control"
    fit(*splits, out_dir=control, epochs=1, objective=BorderlineSettings(arm="control"),
        **CLEAN)
    assert files(control) == ["confusion.csv", "epoch_01.safetensors", "losses.csv",
                              "metrics.csv", "optimizer_01.safetensors", "per_class.csv",
                              "predictions.csv", "steps.csv", "train_params.json"]
    assert filecmp.cmp(layout.checkpoint_file(control, 1), layout.checkpoint_file(clean_run, 1),
                       shallow=False)
    for name in tables.TRAIN_TABLES:  # the clean run's epoch-1 rows, written the same way
        clean = tables.read_train_table(clean_run, name)
        tables.write_train_table(tmp_path, name, clean[clean["epoch"] == 1])
        assert filecmp.cmp(layout.train_table(control, name), layout.train_table(tmp_path, name),
                           shallow=False), name
    recorded = json.loads((control / "train_params.json").read_text())
    clean_params = json.loads((clean_run / "train_params.json").read_text())
    assert recorded.pop("objective")["arm"] == "control" and recorded == clean_params
    steps = tables.read_train_table(control, "steps")
    assert list(steps["step"]) == list(range(1, 8))  # 7 steps of 8 images
    assert (steps["train_passes"] == steps["images"]).all()
    assert (steps["attack_passes"] == 0).all() and (steps["passes"] == steps["images"]).all()


def test_a_continued_run_repeats_the_clean_runs_next_epoch(tmp_path, splits, clean_run) -> None:
    continued = tmp_path / "continued"
    metrics = fit(*splits, out_dir=continued, epochs=2, start_epoch=1,
                  start_checkpoint=layout.checkpoint_file(clean_run, 1), **CLEAN)
    assert list(metrics["epoch"]) == [2]  # its own epochs only
    assert not layout.checkpoint_file(continued, 1).exists()
    # same weights, the clean schedule's learning rate of epoch 2, the same batches
    assert filecmp.cmp(layout.checkpoint_file(continued, 2),
                       layout.checkpoint_file(clean_run, 2), shallow=False)
    for name in tables.TRAIN_TABLES:
        clean = tables.read_train_table(clean_run, name)
        pd.testing.assert_frame_equal(
            tables.read_train_table(continued, name),
            clean[clean["epoch"] == 2].reset_index(drop=True), obj=name)
    recorded = json.loads((continued / "train_params.json").read_text())
    assert recorded["start_epoch"] == 1 and len(recorded["start_checkpoint"]) == 16


@pytest.fixture(scope="module")
def border_runs(tmp_path_factory, splits, clean_run) -> tuple[Path, Path]:
    """The borderline arm from clean epoch 1 to epoch 3: uninterrupted, and killed.

    The kill is simulated by what it leaves: epoch 2 finished, then a garbage checkpoint of
    epoch 3 and epoch-3 rows in the tables written before metrics.csv.
    """
    root = tmp_path_factory.mktemp("border")
    start = {"start_epoch": 1, "start_checkpoint": layout.checkpoint_file(clean_run, 1)}
    straight, killed = root / "straight", root / "killed"
    fit(*splits, out_dir=straight, epochs=3, objective=BORDER, **start, **CLEAN)
    fit(*splits, out_dir=killed, epochs=2, objective=BORDER, **start, **CLEAN)
    layout.checkpoint_file(killed, 3).write_bytes(b"not finished")
    for name in ("losses", "steps"):
        table = tables.read_train_table(killed, name)
        tables.write_train_table(killed, name, pd.concat([table, table.assign(epoch=3)]))
    fit(*splits, out_dir=killed, epochs=3, objective=BORDER, **start, **CLEAN)
    return straight, killed


def test_a_killed_borderline_arm_resumes_with_identical_files(border_runs) -> None:
    straight, killed = border_runs
    assert files(killed) == files(straight)
    assert {"margins_02.csv", "margins_03.csv", "steps.csv"} <= set(files(straight))
    for name in files(straight):
        assert filecmp.cmp(killed / name, straight / name, shallow=False), name


def test_the_borderline_arm_records_its_passes_and_margins(border_runs) -> None:
    straight, _ = border_runs
    steps = tables.read_train_table(straight, "steps")
    assert list(steps["epoch"].unique()) == [2, 3] and len(steps) == 14
    assert (steps["passes"] == steps["train_passes"] + steps["attack_passes"]
            + FORWARD_WEIGHT * steps["forwards"]).all()
    # a drawn half of the correct images, rounded up; each found one is trained on too
    assert (steps["attacked"] == (steps["correct"] + 1) // 2).all()
    assert (steps["train_passes"] == steps["images"] + steps["trained_border"]).all()
    assert (steps["attacked"] > 0).any() and (steps["attack_passes"] >= 2 * steps["attacked"]).all()
    margins = tables.read_margins(straight, 3)
    looked = margins[margins["epoch"] > 0]
    assert len(margins) == 56 and len(looked) > 0
    assert (looked["margin"] >= 0).all()
    assert (looked.loc[looked["margin"].between(0, 1, inclusive="neither"), "margin"]
            <= BORDER.lr0 * BORDER.max_updates + 1e-9).all()  # no search goes further


def test_a_start_epoch_without_a_checkpoint_writes_nothing(tmp_path, splits) -> None:
    out_dir = tmp_path / "arm"
    with pytest.raises(CheckpointError, match="start_epoch 4: no checkpoint .* was not trained"):
        fit(*splits, out_dir=out_dir, epochs=5, start_epoch=4,
            start_checkpoint=tmp_path / "epoch_04.safetensors", **CLEAN)
    assert not out_dir.exists()


@pytest.mark.parametrize(("start", "match"), [
    ({"start_epoch": -1}, "start_epoch must be an int >= 0, got -1"),
    ({"start_epoch": 0, "start_checkpoint": "x.safetensors"},
     "start_checkpoint is given but start_epoch is 0"),
])
def test_bad_start_points_write_nothing(tmp_path, splits, start, match) -> None:
    with pytest.raises(ParameterError, match=match):
        fit(*splits, out_dir=tmp_path / "arm", epochs=2, **start, **CLEAN)
    assert not (tmp_path / "arm").exists()


def test_nothing_left_to_train_is_refused(tmp_path, splits, clean_run) -> None:
    with pytest.raises(ParameterError, match="epochs=2 must exceed start_epoch=2"):
        fit(*splits, out_dir=tmp_path / "arm", epochs=2, start_epoch=2,
            start_checkpoint=layout.checkpoint_file(clean_run, 2), **CLEAN)
    assert not (tmp_path / "arm").exists()


def test_an_unknown_arm_names_the_setting() -> None:
    with pytest.raises(ParameterError, match="arm must be one of control, borderline, pgd"):
        BorderlineSettings(arm="mixup")
