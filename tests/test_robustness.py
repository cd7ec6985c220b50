"""The attack stage's job (lib/run/attack_stage.py): plan, chunks, resume, merge, errors.

A tiny run folder: an ImageFolder dataset of 8 x 8 images (a noisy colour template per class)
and two "checkpoints" of a nearest-template linear classifier, loaded through the stage's
``load_model`` hook, so a whole stage runs in a fraction of a second.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import safetensors.torch
import torch
from PIL import Image
from torch import nn

from lib import NUM_CLASSES, TOOLS
from lib.analysis import aggregates
from lib.attack import plan
from lib.data import datasets
from lib.errors import ParameterError, RunFolderError
from lib.run import attack_stage, data_stage, layout, tables

SIZE = 8
TEST_PER_CLASS = 3


class TemplateNet(nn.Sequential):
    """logits_c = <x, T_c> - ||T_c||^2 / 2: the nearest class template wins (a flatten and a
    linear layer, so the certified stop's interval bounds cover it)."""

    def __init__(self, templates: torch.Tensor) -> None:
        flat = templates.flatten(1)
        linear = nn.Linear(flat.shape[1], len(templates))
        with torch.no_grad():
            linear.weight.copy_(flat)
            linear.bias.copy_(-0.5 * (flat**2).sum(1))
        super().__init__(nn.Flatten(), linear)


def load_template_net(path: Path, device: torch.device) -> nn.Module:
    tensors = safetensors.torch.load_file(str(path))
    net = TemplateNet(torch.zeros(NUM_CLASSES, 3, SIZE, SIZE))
    net.load_state_dict(tensors)
    return net.to(device).eval()


def _templates(seed: int) -> torch.Tensor:
    return torch.rand(NUM_CLASSES, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def make_run(run_dir: Path, *, epochs: int = 2, wrong_epoch: int | None = None,
             models: tuple[int, ...] = (0,)) -> Path:
    """A run folder with data/ (ImageFolder) and train/ (a folder per model seed with
    checkpoints, metrics and predictions).

    ``wrong_epoch``: that epoch's predictions are all wrong (an empty selection).
    ``models``: the seeds of the trained models; the seed blurs the templates a little more.
    """
    templates = _templates(0)
    generator = torch.Generator().manual_seed(1)
    root = run_dir.parent / f"{run_dir.name}-images"
    for split, count in (("train", 1), ("test", TEST_PER_CLASS)):
        for label, tool in enumerate(TOOLS):
            folder = root / split / tool
            folder.mkdir(parents=True, exist_ok=True)
            for k in range(count):
                noise = 0.15 * torch.randn(3, SIZE, SIZE, generator=generator)
                image = (templates[label] + noise).clamp(0, 1)
                array = (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
                Image.fromarray(array).save(folder / f"img{k}.png")
    splits = datasets.load_image_folder(root, image_size=SIZE, progress=False)
    data_stage.write_run_data(run_dir, splits)
    for model in models:
        _train_folder(layout.model_dir(run_dir, model), splits["test"], templates,
                      epochs=epochs, wrong_epoch=wrong_epoch, blur=0.05 * model)
    return run_dir


def _train_folder(train: Path, test, templates: torch.Tensor, *, epochs: int,
                  wrong_epoch: int | None, blur: float) -> None:
    """One model's training folder: every epoch's template net, metrics and predictions."""
    train.mkdir(parents=True)
    metric_rows, prediction_rows = [], []
    for epoch in range(1, epochs + 1):
        # each epoch's model: the templates, slightly blurred toward their mean
        mix = 0.1 * (epoch - 1) + blur
        net = TemplateNet((1 - mix) * templates + mix * templates.mean(0, keepdim=True))
        safetensors.torch.save_file(
            {k: v.contiguous() for k, v in net.state_dict().items()},
            str(train / f"epoch_{epoch:02d}.safetensors"),
        )
        with torch.no_grad():
            predicted = net(test.float_images()).argmax(1).numpy()
        if epoch == wrong_epoch:
            predicted = (test.labels.numpy() + 1) % NUM_CLASSES
        prediction_rows.append(
            pd.DataFrame(
                {
                    "epoch": epoch,
                    "image_id": test.index["image_id"],
                    "label": test.labels.numpy(),
                    "predicted": predicted,
                }
            )
        )
        accuracy = float((predicted == test.labels.numpy()).mean())
        metric_rows.append((epoch, accuracy, accuracy, 1.0, 1.0))
    pd.DataFrame(
        metric_rows, columns=["epoch", "accuracy", "macro_f1", "train_loss", "test_loss"]
    ).to_csv(train / "metrics.csv", index=False)
    pd.concat(prediction_rows).to_csv(train / "predictions.csv", index=False)


@pytest.fixture(scope="module")
def template_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_run(tmp_path_factory.mktemp("runs") / "run")


SCHEDULES = ["constant", "exponential"]
LR0 = 0.1
MAX_ITER = 10
CHUNK_SIZE = 32


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: thread hand-offs would cost more than the work on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def settings(**changes) -> plan.AttackSettings:
    values = dict(
        epochs=[],
        schedules=SCHEDULES,
        lr0=LR0,
        max_iter=MAX_ITER,
        n_per_class=2,
        mode="targeted",
        seed=0,
        batch_size=16,
        chunk_size=CHUNK_SIZE,
        sweep_lr0=[0.05, 0.2],
        sweep_per_class=1,
        sweep_epoch=0,
        gallery_images=3,
        precision="float32",
        refine_tolerance=None,
    )
    values.update(changes)
    return plan.AttackSettings(**values)


def copy_inputs(source: Path, target: Path) -> Path:
    """A fresh run folder with the same data/ and train/ (no attack/)."""
    import shutil

    shutil.copytree(source / "data", target / "data")
    shutil.copytree(source / "train", target / "train")
    return target


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run_all(run_dir: Path, job: plan.AttackJob) -> None:
    attack_stage.run_chunks(job, run_dir, progress=False, load_model=load_template_net)


# --------------------------------------------------------------------------- the plan


@pytest.mark.parametrize(("mode", "per_image"), [("targeted", NUM_CLASSES - 1), ("untargeted", 1)])
def test_plan_has_one_row_per_image_target_and_schedule(
    template_run: Path, mode: str, per_image: int
) -> None:
    job = attack_stage.plan_job(template_run, settings(mode=mode))
    assert job.settings.epochs == (1, 2) and job.settings.models == (0,)
    assert job.settings.sweep_epoch == 2
    main = job.rows[job.rows["kind"] == "main"]
    images = job.selection.images
    assert len(images) == 2 * NUM_CLASSES * 2  # epochs x classes x n_per_class (all correct)
    assert len(main) == len(images) * per_image * len(SCHEDULES)
    for _, part in main.groupby("epoch"):
        assert part["row_id"].tolist() == list(range(len(part)))
        assert (part.groupby("chunk").size() <= CHUNK_SIZE).all()
        # rank by rank across the classes: the first 7 images are every class's rank 0
        first = part.drop_duplicates("image_id").head(NUM_CLASSES)
        assert sorted(first["source"]) == list(range(NUM_CLASSES))
        assert (first["rank"] == 0).all()
    if mode == "targeted":
        assert (main["source"] != main["target"]).all()
        counts = main.groupby(["epoch", "image_id", "schedule"]).size()
        assert (counts == NUM_CLASSES - 1).all()
    else:
        assert (main["target"] == -1).all()
    sweep = job.rows[job.rows["kind"] == "sweep"]
    assert sorted(sweep["lr0"].unique()) == [0.05, 0.2]
    assert (sweep["epoch"] == 2).all() and (sweep["rank"] == 0).all()
    assert len(sweep) == 2 * NUM_CLASSES * per_image * len(SCHEDULES)
    gallery = job.rows[job.rows["gallery"]]
    assert (gallery["epoch"] == 2).all() and (gallery["rank"] == 0).all()
    assert sorted(gallery["source"].unique()) == [0, 1, 2]
    assert len(gallery) == 3 * len(SCHEDULES)  # one target per image, every schedule
    assert job.chunks["rows"].sum() == len(job.rows)


def test_plan_is_deterministic(template_run: Path) -> None:
    first = attack_stage.plan_job(template_run, settings())
    second = attack_stage.plan_job(template_run, settings())
    pd.testing.assert_frame_equal(first.rows, second.rows)
    assert plan.plan_record(first) == plan.plan_record(second)


# --------------------------------------------------------------------------- running


@pytest.fixture(scope="module")
def finished_run(template_run: Path, tmp_path_factory: pytest.TempPathFactory):
    """The whole stage, uninterrupted, in one process: the reference for the other tests."""
    run_dir = copy_inputs(template_run, tmp_path_factory.mktemp("whole") / "run")
    job = attack_stage.run_attack_stage(
        run_dir, settings(), progress=False, load_model=load_template_net
    )
    return run_dir, job


def test_stage_writes_tidy_tables(finished_run) -> None:
    run_dir, job = finished_run
    attack = run_dir / "attack"
    results = pd.read_csv(attack / "results.csv", dtype={"image_id": str})
    assert tuple(results.columns) == tables.RESULT_COLUMNS
    main = job.rows[job.rows["kind"] == "main"]
    assert len(results) == len(main)
    assert (results["model"] == 0).all()
    assert results[["epoch", "row_id"]].equals(
        results[["epoch", "row_id"]].sort_values(["epoch", "row_id"])
    )
    assert (results["status"] == "ok").all() and (results["mode"] == "targeted").all()
    assert results["iterations"].between(0, MAX_ITER).all()
    constant = results[results["schedule"] == "constant"]
    assert constant["success"].all()  # a linear model falls to a constant step within budget
    hits = results[results["success"]]
    assert (hits["l1"] > 0).all() and np.allclose(hits["l1_255"], hits["l1"] * 255)
    assert (hits["final_class"] == hits["target"]).all()
    assert (hits["target_prob"] > 1 / NUM_CLASSES).all()
    assert (results.loc[~results["success"], "iterations"] == MAX_ITER).all()
    # sign steps of size lr_i: no pixel moves further than the sum of the steps
    assert (hits["linf"] <= hits["iterations"] * LR0 + 1e-6).all()
    with np.load(attack / "traces.npz") as traces:
        assert traces["lr"].shape == (len(results), MAX_ITER)
        assert np.array_equal(traces["row_id"], results["row_id"].to_numpy())
        # a trace holds exactly `iterations` step sizes, NaN after the stop
        finite = np.isfinite(traces["lr"]).sum(1)
        assert np.array_equal(finite, results["iterations"].to_numpy())
        steps = traces["lr"][(results["schedule"] == "constant").to_numpy()]
        assert np.allclose(steps[np.isfinite(steps)], LR0)
    with np.load(attack / "gallery.npz") as gallery:
        assert gallery["borderline"].shape == (3 * len(SCHEDULES), 3, SIZE, SIZE)
        assert gallery["original"].dtype == np.uint8
        keyed = results.set_index(["epoch", "row_id"])
        for epoch, row_id, borderline, original in zip(
            gallery["epoch"],
            gallery["row_id"],
            gallery["borderline"],
            gallery["original"],
            strict=True,
        ):
            l1 = np.abs(borderline - original / 255.0).mean()
            assert l1 == pytest.approx(keyed.loc[(epoch, row_id), "l1"], abs=1e-6)
    sweep = pd.read_csv(attack / "lr0_sweep.csv")
    assert tuple(sweep.columns) == tables.SWEEP_COLUMNS
    assert sorted(sweep["lr0"].unique()) == [0.05, 0.2]
    selection = pd.read_csv(attack / "selection.csv")
    assert list(selection.columns) == ["model", "epoch", "image_id", "label", "rank"]
    assert len(selection) == 2 * NUM_CLASSES * 2


def test_sweep_value_equal_to_lr0_reuses_the_main_rows(finished_run, template_run: Path,
                                                       tmp_path: Path) -> None:
    whole, whole_job = finished_run
    run_dir = copy_inputs(template_run, tmp_path / "reuse")
    job = attack_stage.plan_job(run_dir, settings(sweep_lr0=[0.05, LR0, 0.2]))
    sweep_rows = job.rows[job.rows["kind"] == "sweep"]
    assert sorted(sweep_rows["lr0"].unique()) == [0.05, 0.2]  # LR0 is not attacked again
    assert len(job.rows) == len(whole_job.rows)
    run_all(run_dir, job)
    attack_stage.merge(job, run_dir)
    sweep = pd.read_csv(run_dir / "attack" / "lr0_sweep.csv", dtype={"image_id": str})
    assert sorted(sweep["lr0"].unique()) == [0.05, LR0, 0.2]
    at_lr0 = sweep[sweep["lr0"] == LR0].drop(columns="lr0").reset_index(drop=True)
    per_lr0 = sweep.groupby("lr0").size()
    assert per_lr0[LR0] == per_lr0[0.05] == NUM_CLASSES * (NUM_CLASSES - 1) * len(SCHEDULES)
    # the rows a sweep part would have planned: same ids, images, targets and schedules
    planned = sweep[sweep["lr0"] == 0.05].reset_index(drop=True)
    keys = ["model", "epoch", "row_id", "image_id", "source", "target", "schedule"]
    assert at_lr0[keys].equals(planned[keys])
    # and their results are the main attack's rows
    results = pd.read_csv(run_dir / "attack" / "results.csv", dtype={"image_id": str})
    main = results.merge(at_lr0[["epoch", "row_id"]], on=["epoch", "row_id"])
    assert len(main) == len(at_lr0)
    assert main.reset_index(drop=True).equals(at_lr0[list(tables.RESULT_COLUMNS)])


def test_rerun_finds_every_chunk_done(finished_run) -> None:
    run_dir, job = finished_run
    before = digest(run_dir / "attack" / "results.csv")
    assert attack_stage.run_chunks(job, run_dir, progress=False, load_model=load_template_net) == 0
    attack_stage.merge(job, run_dir)
    assert digest(run_dir / "attack" / "results.csv") == before


def test_resume_after_lost_chunks_gives_identical_tables(
    finished_run, template_run: Path, tmp_path: Path
) -> None:
    whole, job = finished_run
    pieces = copy_inputs(template_run, tmp_path / "pieces")
    keys = list(zip(job.chunks["part"], job.chunks["chunk"], strict=True))
    attack_stage.run_chunks(
        job, pieces, chunks=keys[:4], progress=False, load_model=load_template_net
    )
    with pytest.raises(RunFolderError, match="chunks have no results yet"):
        attack_stage.merge(job, pieces)
    # one chunk lost entirely, one killed between writing its traces and its rows
    csv0, npz0 = layout.chunk_files(pieces, *keys[0])
    csv1, _ = layout.chunk_files(pieces, *keys[1])
    csv0.unlink()
    npz0.unlink()
    csv1.unlink()
    assert len(attack_stage.pending_chunks(job, pieces)) == len(keys) - 2
    attack_stage.run_chunks(job, pieces, progress=False, load_model=load_template_net)
    attack_stage.merge(job, pieces)
    for name in ("results.csv", "lr0_sweep.csv", "selection.csv", "traces.npz", "gallery.npz"):
        assert digest(pieces / "attack" / name) == digest(whole / "attack" / name), name


class PoisonedNet(nn.Module):
    """The template net, but NaN logits for every image of class ``POISONED`` (its true
    class is read off the image: the pixel nearest to that class's template)."""

    def __init__(self, net: nn.Module, templates: torch.Tensor) -> None:
        super().__init__()
        self.net = net
        self.templates = templates.flatten(1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = self.net(images)
        nearest = torch.cdist(images.flatten(1), self.templates.to(images)).argmin(1)
        return torch.where((nearest == POISONED)[:, None], torch.nan, logits)


POISONED = 3


def test_nonfinite_logits_fail_their_attacks_and_stay_out_of_the_means(
    template_run: Path, tmp_path: Path
) -> None:
    run_dir = copy_inputs(template_run, tmp_path / "poisoned")
    # a model of its own layers: the certified stop's bounds do not cover it
    job = attack_stage.plan_job(run_dir, settings(sweep_lr0=[], gallery_images=0, certify=False))
    attack_stage.run_chunks(
        job, run_dir, progress=False,
        load_model=lambda path, device: PoisonedNet(load_template_net(path, device), _templates(0)),
    )
    attack_stage.merge(job, run_dir)
    results = tables.read_results(run_dir)
    poisoned = results["source"] == POISONED
    # every attack on a poisoned image starts from NaN logits; an attack on another image
    # fails the same way only if it moves into the poisoned class's region
    assert (results.loc[poisoned, "status"] == "nonfinite").all()
    assert not results.loc[poisoned, "success"].astype(bool).any()
    others = results.loc[~poisoned]
    assert (others["status"] == "ok").sum() > len(others) // 2
    assert set(others.loc[others["status"] != "ok", "target"]) <= {POISONED}
    nonfinite = results["status"] == "nonfinite"
    rates = aggregates.success_rates(results)
    keys = ["model", "epoch", "schedule"]
    expected_skipped = results[nonfinite].groupby(keys).size()
    skipped = rates.set_index(keys)["skipped"]
    assert (skipped.reindex(expected_skipped.index) == expected_skipped).all()
    assert (rates["attacks"] + rates["skipped"]).eq(
        results.groupby(keys).size().reindex(
            pd.MultiIndex.from_frame(rates[keys])).to_numpy()).all()
    assert aggregates.skipped_counts(results)["count"].sum() == nonfinite.sum()
    assert np.isfinite(aggregates.mean_l1(results)["mean_l1"]).all()


def test_shards_merge_into_the_one_process_tables(
    finished_run, template_run: Path, tmp_path: Path
) -> None:
    processes = 3
    whole, job = finished_run
    sharded = copy_inputs(template_run, tmp_path / "sharded")
    keys = list(zip(job.chunks["part"], job.chunks["chunk"], strict=True))
    for rank in range(processes):  # each "process" its own share of the chunks
        attack_stage.run_chunks(
            job, sharded, chunks=keys[rank::processes], progress=False, load_model=load_template_net
        )
    attack_stage.merge(job, sharded)
    for name in ("results.csv", "lr0_sweep.csv", "traces.npz"):
        assert digest(sharded / "attack" / name) == digest(whole / "attack" / name), name


def test_metrics_read_the_stage_output(finished_run) -> None:
    run_dir, _ = finished_run
    results = tables.read_results(run_dir)
    rates = aggregates.success_rates(results)
    assert len(rates) == 2 * len(SCHEDULES)
    assert rates["attacks"].eq(NUM_CLASSES * 2 * (NUM_CLASSES - 1)).all()
    summary = aggregates.trace_summary(tables.read_arrays(run_dir, "traces.npz"), results)
    assert rates["images"].eq(NUM_CLASSES * 2).all()  # 2 per class, each its 6 targets
    assert set(summary["schedule"]) == set(SCHEDULES)
    first = summary[summary["iteration"] == 1]
    assert np.allclose(first["mean_lr_255"], LR0 * 255)  # every schedule starts at lr0
    sensitivity = aggregates.lr0_sensitivity(tables.read_sweep(run_dir))
    assert len(sensitivity) == 2 * len(SCHEDULES)


# --------------------------------------------------------------------------- errors


def test_changed_settings_are_refused(template_run: Path, tmp_path: Path) -> None:
    run_dir = copy_inputs(template_run, tmp_path / "run")
    attack_stage.save_plan(attack_stage.plan_job(run_dir, settings()), run_dir)
    other = attack_stage.plan_job(run_dir, settings(lr0=0.3))
    with pytest.raises(RunFolderError, match="another attack job(.|\n)*lr0"):
        attack_stage.run_chunks(other, run_dir, progress=False, load_model=load_template_net)


def test_run_folder_without_checkpoints(tmp_path: Path) -> None:
    (tmp_path / "run" / "train").mkdir(parents=True)
    with pytest.raises(RunFolderError, match=r"no trained model.*\(02_train\)"):
        attack_stage.plan_job(tmp_path / "run", settings())
    (tmp_path / "run" / "train" / "seed_0").mkdir()
    with pytest.raises(RunFolderError, match=r"no checkpoints.*\(02_train\)"):
        attack_stage.plan_job(tmp_path / "run", settings())
    with pytest.raises(RunFolderError, match="does not exist"):
        attack_stage.plan_job(tmp_path / "nowhere", settings())


def test_epoch_that_was_not_trained(template_run: Path) -> None:
    with pytest.raises(ParameterError, match=r"epoch\(s\) \[5\] were not trained.*1, 2"):
        attack_stage.plan_job(template_run, settings(epochs=[1, 5]))


def test_empty_selection(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path / "run", wrong_epoch=2)
    with pytest.raises(ParameterError, match=r"empty selection.*epoch\(s\) \[2\]"):
        attack_stage.plan_job(run_dir, settings())
    assert len(attack_stage.plan_job(run_dir, settings(epochs=[1])).rows) > 0


def test_analysis_without_attack_results(template_run: Path) -> None:
    with pytest.raises(RunFolderError, match=r"no attack results.*\(03_attack\)"):
        tables.read_results(template_run)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"schedules": ["constant", "cosine"]}, "schedule 'cosine' is not known"),
        ({"schedules": []}, "schedules is empty"),
        ({"schedules": ["step", "step"]}, "twice"),
        ({"schedules": "constant"}, "schedules must be a list"),
        ({"lr0": 0.0}, "lr0 must be a finite number > 0"),
        ({"lr0": -1.0}, "lr0 must be a finite number > 0"),
        ({"max_iter": 0}, "max_iter must be an int >= 1"),
        ({"n_per_class": 0}, "n_per_class must be an int >= 1"),
        ({"n_per_class": 2.5}, "n_per_class must be an int >= 1"),
        ({"chunk_size": 0}, "chunk_size must be an int >= 1"),
        ({"batch_size": 0}, "batch_size must be an int >= 1"),
        ({"mode": "both"}, "mode must be one of 'targeted', 'untargeted'"),
        ({"sweep_per_class": 3}, "exceeds n_per_class"),
        ({"sweep_lr0": [0.01, 0]}, "every value of sweep_lr0 must be a finite number > 0"),
        ({"schedule_constants": {"step": {"drop": 0.5}}}, "not in schedules"),
        ({"schedule_constants": {"exponential": {"drop": 0.5}}}, "takes no constant"),
        ({"epochs": [0]}, "every value of epochs must be an int >= 1"),
    ],
)
def test_bad_settings(changes: dict, message: str) -> None:
    with pytest.raises(ParameterError, match=message):
        settings(**changes)
