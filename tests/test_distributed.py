"""The attack stage under torchrun (lib/run/distributed.py): sharding, equality with one process,
a failing rank.

The multi-process tests start two ranks the way torchrun does (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT`` in the environment; gloo on the CPU) by forking
the test process, because a fresh interpreter per rank (torchrun) spends most of a test's time
importing torch on a busy 2-core machine; the command line itself is the same entry
(:func:`lib.run.distributed.main`). Every process uses one torch thread, so one and two processes
compute identically.
"""

from __future__ import annotations

import hashlib
import os
import socket
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image

from lib import NUM_CLASSES, TOOLS
from lib.attack import plan
from lib.data import datasets, frames
from lib.errors import ParameterError
from lib.model.checkpoints import build_model, save_checkpoint
from lib.run import attack_stage, data_stage, distributed, layout, ranks
from lib.run.parameters import stage_settings
from lib.train.loop import fit
from tests.test_robustness import load_template_net, make_run


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def plain_process(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------- sharding


@pytest.mark.parametrize("world_size", [1, 2, 3, 5])
@pytest.mark.parametrize("count", [0, 1, 4, 13, 50])
def test_every_chunk_is_in_exactly_one_balanced_shard(world_size: int, count: int) -> None:
    generator = np.random.default_rng(count)
    costs = {("epoch_01", k): float(c) for k, c in enumerate(generator.integers(1, 100, count))}
    shards = distributed.shard_chunks(costs, world_size)
    assert len(shards) == world_size
    flat = [key for shard in shards for key in shard]
    assert sorted(flat) == sorted(costs) and len(flat) == len(costs)
    for shard in shards:  # each shard keeps the order of work
        assert shard == sorted(shard)
    loads = [sum(costs[k] for k in shard) for shard in shards]
    largest = max(costs.values(), default=0.0)
    assert max(loads) - min(loads) <= largest
    assert max(loads) <= sum(loads) / world_size + largest
    assert distributed.shard_chunks(costs, world_size) == shards  # the same on every rank


def test_equal_costs_deal_round_robin_and_empty_shards_are_allowed() -> None:
    costs = {k: 1.0 for k in "abcde"}
    assert distributed.shard_chunks(costs, 2) == [["a", "c", "e"], ["b", "d"]]
    assert distributed.shard_chunks({"a": 3.0}, 3) == [["a"], [], []]


@pytest.mark.parametrize("world_size", [0, -1, 1.5, True])
def test_shard_chunks_rejects_bad_world_sizes(world_size) -> None:
    with pytest.raises(ParameterError, match="world_size"):
        distributed.shard_chunks({"a": 1.0}, world_size)


def test_chunk_costs_weight_schedules_that_run_the_whole_budget(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path / "run", epochs=1)
    settings = plan.AttackSettings(
        epochs=[],
        schedules=["constant", "exponential"],
        lr0=0.1,
        max_iter=10,
        n_per_class=2,
        batch_size=4,
        chunk_size=5,
        sweep_lr0=[],
        sweep_per_class=0,
        gallery_images=0,
        precision="float32",
        refine_tolerance=None,
    )
    job = attack_stage.plan_job(run_dir, settings)
    costs = distributed.chunk_costs(job, job.chunks)
    assert list(costs) == list(zip(job.chunks["part"], job.chunks["chunk"], strict=True))
    # constant: 0.2 * 10 + 1 = 3 passes, exponential: 10 + 1 = 11; a chunk of 5 rows
    # alternating between them holds 3 of one and 2 of the other
    assert costs[("seed_0_epoch_01", 0)] == 3 * 3 + 2 * 11
    assert costs[("seed_0_epoch_01", 1)] == 2 * 3 + 3 * 11
    assert sum(costs.values()) == pytest.approx(len(job.rows) / 2 * (3 + 11))


def test_scaling_estimate() -> None:
    import importlib.util

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_distributed.py"
    spec = importlib.util.spec_from_file_location("bench_distributed", script)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    table = bench.scaling_estimate(
        passes=1000.0,
        passes_per_second=10.0,
        devices=[1, 2, 4],
        largest_chunk_passes=50.0,
        startup_seconds=5.0,
    )
    assert table["seconds"].tolist() == pytest.approx([105.0, 55.0, 30.0])
    assert table["seconds_worst"].tolist() == pytest.approx([105.0, 60.0, 35.0])
    assert table["speedup"].iloc[0] == 1.0
    assert (table["efficiency"] <= 1.0).all()
    ideal = bench.scaling_estimate(passes=1000.0, passes_per_second=10.0, devices=[8])
    assert ideal["speedup"].iloc[0] == pytest.approx(8.0)


# --------------------------------------------------------------------------- launch and parameters


def test_launch_reads_torchrun_environment() -> None:
    assert not ranks.launch_from_env({}).distributed
    launch = ranks.launch_from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"})
    assert (launch.rank, launch.world_size, launch.local_rank) == (3, 4, 1)
    assert ranks.rank_device(launch, "cuda") == "cuda:1"
    assert ranks.rank_device(launch, "cpu") == "cpu"
    assert ranks.rank_device(ranks.Launch(), "cuda:1") == "cuda:1"
    with pytest.raises(ParameterError, match="inconsistent"):
        ranks.launch_from_env({"RANK": "4", "WORLD_SIZE": "4"})


def test_parameters_as_name_value_pairs_and_settings() -> None:
    values = distributed.parse_params(["lr0=0.01", "schedules=[constant, step]", "epochs=[]"])
    assert values == {"lr0": 0.01, "schedules": ["constant", "step"], "epochs": []}
    settings = stage_settings("03_attack", {**values, "run_dir": "x", "device": "cpu"})
    assert settings.schedules == ("constant", "step") and settings.lr0 == 0.01
    with pytest.raises(ParameterError, match="lr_0"):
        stage_settings("03_attack", {"lr_0": 0.01})
    with pytest.raises(ParameterError, match="name=value"):
        distributed.parse_params(["lr0"])


# --------------------------------------------------------------------------- two processes


SIZE = 64  # AlexNet's smallest input is 63 px
ATTACK_PARAMS = {
    "epochs": "[]",
    "schedules": "[constant, exponential]",
    "lr0": "0.05",
    "max_iter": "2",
    "n_per_class": "1",
    "batch_size": "21",
    "chunk_size": "21",
    "gallery_images": "2",
    "sweep_lr0": "[]",
    "sweep_per_class": "0",
    "precision": "float32",
    "refine_tolerance": "null",
}
MERGED = ("results.csv", "traces.npz", "gallery.npz", "selection.csv", "job.json")


def make_alexnet_data(run_dir: Path) -> dict[str, frames.FrameSet]:
    """data/: an ImageFolder of one 64 px image per class and split."""
    generator = np.random.default_rng(0)
    root = run_dir.parent / "images"
    for split in ("train", "test"):
        for label, tool in enumerate(TOOLS):
            (root / split / tool).mkdir(parents=True)
            colour = np.array([label * 36, 255 - label * 36, 128], dtype=float)
            pixels = colour + generator.normal(0, 40, (SIZE, SIZE, 3))
            Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(
                root / split / tool / "a.png"
            )
    splits = datasets.load_image_folder(root, image_size=SIZE, progress=False)
    data_stage.write_run_data(run_dir, splits)
    return splits


def make_alexnet_run(run_dir: Path) -> Path:
    """data/ and train/: one AlexNet checkpoint; predictions.csv calls every test image
    correct, so each class is attacked."""
    splits = make_alexnet_data(run_dir)
    train = layout.model_dir(run_dir, 0)  # the model of seed 0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        save_checkpoint(build_model(num_classes=NUM_CLASSES), train / "epoch_01.safetensors")
    test = splits["test"]
    pd.DataFrame(
        {
            "epoch": 1,
            "image_id": test.index["image_id"],
            "label": test.labels.numpy(),
            "predicted": test.labels.numpy(),
        }
    ).to_csv(train / "predictions.csv", index=False)
    pd.DataFrame(
        [(1, 1.0, 1.0, 1.0, 1.0)],
        columns=["epoch", "accuracy", "macro_f1", "train_loss", "test_loss"],
    ).to_csv(train / "metrics.csv", index=False)
    return run_dir


def cli_params() -> list[str]:
    return [arg for name, value in ATTACK_PARAMS.items() for arg in ("--param", f"{name}={value}")]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _torchrun_environment(rank: int, world_size: int, port: int) -> None:
    """What torchrun sets for each worker (a single machine: LOCAL_RANK = RANK)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))


def _cli_rank(rank: int, world_size: int, port: int, argv: list[str]) -> None:
    _torchrun_environment(rank, world_size, port)
    code = distributed.main(argv)
    assert code == 0, f"rank {rank} exited with {code}"


def start_ranks(function, world_size: int, *args) -> None:
    """``world_size`` processes as torchrun would start them, on a free port. Forked, so they
    inherit the imported modules: a fresh interpreter importing torch takes seconds."""
    mp.start_processes(function, args=(world_size, _free_port(), *args), nprocs=world_size,
                       start_method="fork")


@pytest.mark.slow
def test_two_processes_write_the_one_process_tables(tmp_path: Path,
                                                    capfd: pytest.CaptureFixture) -> None:
    one = make_alexnet_run(tmp_path / "one" / "run")
    two = make_alexnet_run(tmp_path / "two" / "run")
    overrides = distributed.parse_params([f"{k}={v}" for k, v in ATTACK_PARAMS.items()])
    parameters = distributed.launch_parameters("03_attack", run_dir=one, overrides=overrides)
    job = attack_stage.plan_job(one, stage_settings("03_attack", parameters))
    assert len(job.chunks) == 4 and len(job.rows) == 84  # 7 images x 6 targets x 2 schedules

    # a plain process finished one chunk before: the two ranks attack only the other three
    attack_stage.run_chunks(job, two, chunks=[("seed_0_epoch_01", 1)], progress=False)
    start_ranks(_cli_rank, 2, ["attack", "--run-dir", str(two), "--threads", "1",
                               "--no-progress", *cli_params()])
    # the costlier chunk alone on one rank, the other two on the other
    assert "3 of 4 chunks pending; rank 0 takes 1 (34% of the expected cost), rank 1 takes 2" \
        in capfd.readouterr().out

    argv = ["attack", "--run-dir", str(one), "--no-progress", *cli_params()]
    assert distributed.main(argv) == 0  # WORLD_SIZE unset: one plain process
    for name in MERGED:
        assert digest(two / "attack" / name) == digest(one / "attack" / name), name
    results = pd.read_csv(two / "attack" / "results.csv")
    assert results["row_id"].tolist() == list(range(84))


# --------------------------------------------------------------------------- a failing rank


TEMPLATE_SETTINGS = {"epochs": [], "schedules": ["constant"], "lr0": 0.1, "max_iter": 5,
                     "n_per_class": 1, "batch_size": 4, "chunk_size": 4, "sweep_lr0": [],
                     "sweep_per_class": 0, "precision": "float32", "refine_tolerance": None}


def failing_on_rank_1(path: Path, device: torch.device) -> torch.nn.Module:
    if torch.distributed.get_rank() == 1:
        raise RuntimeError("injected failure while loading the checkpoint")
    return load_template_net(path, device)


def _failing_rank(rank: int, world_size: int, port: int, run_dir: str, report: str) -> None:
    _torchrun_environment(rank, world_size, port)
    launch = ranks.launch_from_env()
    outcome = "finished"
    try:
        with distributed.process_group(launch, "cpu", timeout_minutes=2):
            distributed.attack_stage({"run_dir": run_dir, "device": "cpu", **TEMPLATE_SETTINGS},
                                     launch=launch, progress=False,
                                     load_model=failing_on_rank_1)
    except ranks.RankFailure as error:
        outcome = str(error)
    Path(report, f"rank{rank}.txt").write_text(outcome)


def test_a_failing_rank_stops_every_rank_and_nothing_is_merged(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path / "run", epochs=1)
    start_ranks(_failing_rank, 2, str(run_dir), str(tmp_path))
    for rank in range(2):
        message = (tmp_path / f"rank{rank}.txt").read_text()
        assert "rank 1 (on" in message and "injected failure" in message, message
        assert "rank 0 (on" not in message and "merged nothing" in message
    assert not (run_dir / "attack" / "results.csv").exists()
    # rank 0 kept its finished chunks: a plain rerun attacks only rank 1's, then merges
    job = attack_stage.plan_job(run_dir, stage_settings("03_attack", TEMPLATE_SETTINGS))
    assert 0 < len(attack_stage.pending_chunks(job, run_dir)) < len(job.chunks)
    distributed.attack_stage({"run_dir": str(run_dir), "device": "cpu", **TEMPLATE_SETTINGS},
                             progress=False, load_model=load_template_net)
    assert len(pd.read_csv(run_dir / "attack" / "results.csv")) == len(job.rows)


# --------------------------------------------------------------------------- training


TRAIN_PARAMS = ["epochs=1", "batch_size=2", "lr=0.01", "lr_decay=1.0", "augment=false",
                "balance=none", "seeds=[3]", "precision=float32"]


@pytest.mark.slow
def test_two_process_training_writes_what_the_training_stage_continues(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    splits = make_alexnet_data(run_dir)
    argv = ["train", "--run-dir", str(run_dir), "--threads", "1", "--no-progress"]
    start_ranks(_cli_rank, 2, [*argv, *(a for p in TRAIN_PARAMS for a in ("--param", p))])
    train = run_dir / "train" / "seed_3"
    assert (train / "epoch_01.safetensors").is_file()
    losses = pd.read_csv(train / "losses.csv")
    assert losses["step"].tolist() == [1, 2, 3, 4]  # 7 images in global batches of 2
    assert np.isfinite(losses["loss"]).all()
    predictions = pd.read_csv(train / "predictions.csv")
    assert len(predictions) == len(splits["test"])
    # the one-process training (02_train's call) accepts the folder and finds epoch 1 done
    metrics = fit(splits["train"], splits["test"], out_dir=train, epochs=1, batch_size=2,
                  lr=0.01, lr_decay=1.0, augment=False, balance="none", seed=3,
                  precision="float32", progress=False)
    assert metrics["epoch"].tolist() == [1]
    assert metrics.equals(pd.read_csv(train / "metrics.csv"))
