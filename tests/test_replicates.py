"""Several trained models (replicates) through the attack stage and into the analysis
(lib/run/attack_stage.py, lib/attack/plan.py, lib/analysis/claim_table.py): the first model at
every chosen checkpoint, the others at their first and last with fewer images, the model column
in every table, and a rerun of the stage on one model."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pandas as pd
import pytest

from lib import NUM_CLASSES
from lib.analysis import aggregates
from lib.analysis.claim_table import CLAIMS, paper_claims
from lib.errors import ParameterError
from lib.run import attack_stage, layout, tables
from tests.test_robustness import copy_inputs, load_template_net, make_run, settings

SCHEDULES = 2  # settings() attacks with constant and exponential
TARGETS = NUM_CLASSES - 1


@pytest.fixture(scope="module")
def three_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three trained 'models' (seeds 0, 1, 2) of three epochs each."""
    return make_run(tmp_path_factory.mktemp("replicates") / "run", epochs=3, models=(0, 1, 2))


def replicate_settings(**changes):
    return settings(**{"replicate_per_class": 1, "sweep_lr0": [0.05], **changes})


def test_the_first_model_at_every_epoch_the_others_at_the_first_and_last(
        three_models: Path) -> None:
    job = attack_stage.plan_job(three_models, replicate_settings())
    assert job.settings.models == (0, 1, 2)
    assert job.settings.epochs == (1, 2, 3) and job.settings.replicate_epochs == (1, 3)
    images = job.selection.images
    per_checkpoint = images.groupby(["model", "epoch"]).size().to_dict()
    assert per_checkpoint == {(0, 1): 14, (0, 2): 14, (0, 3): 14,  # 2 per class
                              (1, 1): 7, (1, 3): 7, (2, 1): 7, (2, 3): 7}  # 1 per class
    main = job.rows[job.rows["kind"] == "main"]
    assert len(main) == (3 * 14 + 4 * 7) * TARGETS * SCHEDULES
    assert sorted(main["part"].unique()) == [
        "seed_0_epoch_01", "seed_0_epoch_02", "seed_0_epoch_03", "seed_1_epoch_01",
        "seed_1_epoch_03", "seed_2_epoch_01", "seed_2_epoch_03"]
    for _, part in main.groupby(["model", "epoch"]):  # row ids count within a model's epoch
        assert part["row_id"].tolist() == list(range(len(part)))
    sweep = job.rows[job.rows["kind"] == "sweep"]
    assert set(sweep["model"]) == {0} and set(sweep["epoch"]) == {3}
    gallery = job.rows[job.rows["gallery"]]
    assert set(gallery["model"]) == {0} and set(gallery["epoch"]) == {3}
    assert set(job.chunks["model"]) == {0, 1, 2}


def test_replicate_epochs_and_models_can_be_chosen(three_models: Path) -> None:
    job = attack_stage.plan_job(three_models, replicate_settings(replicate_epochs=[2]))
    main = job.rows[job.rows["kind"] == "main"]
    assert main.groupby("model")["epoch"].unique().map(list).to_dict() == {
        0: [1, 2, 3], 1: [2], 2: [2]}
    # a rerun on one model: that model is the first, attacked at every epoch in full
    one = attack_stage.plan_job(three_models, replicate_settings(models=[1]))
    assert one.settings.models == (1,) and one.settings.replicate_epochs == ()
    assert set(one.rows["model"]) == {1}
    assert one.selection.images.groupby("epoch").size().tolist() == [14, 14, 14]
    with pytest.raises(ParameterError, match=r"model\(s\) \[5\] were not trained.*\[0, 1, 2\]"):
        attack_stage.plan_job(three_models, replicate_settings(models=[0, 5]))
    with pytest.raises(ParameterError, match=r"epoch\(s\) \[4\] were not trained"):
        attack_stage.plan_job(three_models, replicate_settings(replicate_epochs=[4]))


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def attacked(three_models: Path, tmp_path_factory: pytest.TempPathFactory):
    run_dir = copy_inputs(three_models, tmp_path_factory.mktemp("attacked") / "run")
    job = attack_stage.run_attack_stage(run_dir, replicate_settings(), progress=False,
                                        load_model=load_template_net)
    return run_dir, job


def test_every_table_carries_the_model(attacked) -> None:
    run_dir, job = attacked
    results = tables.read_results(run_dir)
    assert results.groupby("model")["epoch"].unique().map(list).to_dict() == {
        0: [1, 2, 3], 1: [1, 3], 2: [1, 3]}
    order = results[["model", "epoch", "row_id"]]
    assert order.equals(order.sort_values(["model", "epoch", "row_id"]))
    traces = tables.read_arrays(run_dir, "traces")
    assert (traces["model"] == results["model"].to_numpy()).all()
    assert (traces["row_id"] == results["row_id"].to_numpy()).all()
    assert set(tables.read_arrays(run_dir, "gallery")["model"]) == {0}
    assert set(tables.read_table(run_dir, "selection")["model"]) == {0, 1, 2}
    assert set(tables.read_sweep(run_dir)["model"]) == {0}
    predictions = tables.read_predictions(run_dir)
    assert predictions.groupby("model")["epoch"].nunique().to_dict() == {0: 3, 1: 3, 2: 3}


def test_a_resumed_stage_gives_the_same_files(attacked, three_models: Path,
                                              tmp_path: Path) -> None:
    whole, job = attacked
    resumed = copy_inputs(three_models, tmp_path / "resumed")
    keys = list(zip(job.chunks["part"], job.chunks["chunk"], strict=True))
    attack_stage.run_chunks(job, resumed, chunks=keys[::2], progress=False,
                            load_model=load_template_net)
    attack_stage.run_chunks(job, resumed, progress=False, load_model=load_template_net)
    attack_stage.merge(job, resumed)
    for name in ("results", "traces", "gallery", "lr0_sweep", "selection"):
        path = layout.attack_file(whole, name)
        assert digest(layout.attack_file(resumed, name)) == digest(path), name


def test_the_analysis_reads_every_model(attacked) -> None:
    run_dir, _ = attacked
    results = tables.read_results(run_dir)
    rates = aggregates.success_rates(results)
    assert len(rates) == 7 * SCHEDULES  # one row per model, checkpoint and schedule
    assert rates.set_index(["model", "epoch"])["images"].groupby(level=[0, 1]).first().to_dict() \
        == {(0, 1): 14, (0, 2): 14, (0, 3): 14, (1, 1): 7, (1, 3): 7, (2, 1): 7, (2, 3): 7}
    claims = paper_claims(results, tables.read_predictions(run_dir)).set_index("claim")
    assert len(claims) == len(CLAIMS)
    row = claims.loc["constant reaches 100 % success within max_iter"]
    assert row["models"] == 3 and row["images"] == 14 + 7 + 7  # (model, image) units
    assert row["attacks"] == (3 * 14 + 4 * 7) * TARGETS
    assert row["model_verdicts"].startswith("seed 0: ") and "; seed 2: " in row["model_verdicts"]
    verdicts = [part.split(": ")[1] for part in row["model_verdicts"].split("; ")]
    assert row["models_agreeing"] == verdicts.count("agrees")
    frame = pd.DataFrame(claims)
    assert (frame["models"] <= 3).all()
