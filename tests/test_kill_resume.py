"""Resume after SIGKILL: the attack stage and training, killed at seeded random moments in real
child processes, end with exactly the files of an uninterrupted run.

Every run is a child process in a session of its own, and a kill takes its whole process tree
(:func:`kill_tree`): papermill starts its kernel in yet another session, so killing only the
command's process group would leave the kernel computing and writing for up to a second.

- The attack stage is killed many times in a child that calls :mod:`lib.run.attack_stage` exactly as
  ``notebooks/03_attack.py`` does, on the 8 px template run of ``tests/test_robustness.py``
  (a whole stage in seconds, in about 60 chunks). The real stage command (``python -m
  lib.run.pipeline run --stage 03_attack``, whose start-up alone takes about 20 s) is killed once,
  on a run folder of the tiny profile's data trained by the child below.
- Training (a child that does what ``notebooks/02_train.py`` does) is killed while epoch 1 is
  in flight, mid-way through epoch 2 and while epoch 3's checkpoint is being written.

Children run torch on one thread (float32 results depend on the thread count), the references
too. ``python -m tests.test_kill_resume`` is the children's entry point.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from lib.attack import plan
from lib.run import attack_stage, layout, manifest, parameters, pipeline, tables
from tests.conftest import tiny_overrides
from tests.test_robustness import copy_inputs, load_template_net, make_run

# Linux only: kill_tree walks /proc to find every process of a stage.
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
SEED = 8061
#: Kills of the attack child: one before any chunk is finished, the others spread over the run.
ATTACK_KILLS = 6
#: The many-chunk attack job on the template run: about 60 chunks of 12 attacks, with the
#: certified stop on: step decay's rows that fail are finished after update 16 of 24.
TEMPLATE_SETTINGS = plan.AttackSettings(
    epochs=[], schedules=["constant", "step", "loss-adaptive"], lr0=0.1, max_iter=24,
    n_per_class=2, batch_size=8, chunk_size=12, sweep_lr0=[0.05, 0.2], sweep_per_class=1,
    gallery_images=3, precision="float32", refine_tolerance=None, certify=True,
)
#: The tiny profile's training, 3 epochs of 7 SGD steps (its 52 train images in batches of 8),
#: one model (the seeds' loop resumes through each model's own folder).
TRAIN_OVERRIDES = {"epochs": 3, "batch_size": 8, "seeds": [0]}
#: The tiny profile's attack stage, cut to a few chunks of AlexNet attacks.
COMMAND_OVERRIDES = {
    "epochs": [3], "schedules": ["constant"], "sweep_lr0": [], "chunk_size": 2, "batch_size": 2,
}
#: Names of temporaries: lib.io.atomic_path's, and the one safetensors' writer makes beside
#: the file it is given (Rust tempfile's ".tmpXXXXXX") before renaming it onto that name.
TEMPORARY = re.compile(r"^\..+\.tmp(\.ipynb)?$|^\.tmp\w{6}$")
POLL = 0.005  # seconds between looks at a child's files
TIMEOUT = 600  # seconds any one child may take


# --------------------------------------------------------------------------- children


def child_main(argv: Sequence[str]) -> int:
    """``attack RUN_DIR SETTINGS_JSON template|checkpoint`` or ``train RUN_DIR PARAMS_JSON``."""
    import torch

    torch.set_num_threads(1)
    command, run_dir, values = argv[0], Path(argv[1]), json.loads(argv[2])
    if command == "attack":
        attack_child(run_dir, plan.AttackSettings(**values), loader=argv[3])
    elif command == "train":
        train_child(run_dir, values)
    else:
        raise SystemExit(f"unknown child command {command!r}")
    return 0


def attack_child(run_dir: Path, settings: plan.AttackSettings, *, loader: str) -> None:
    """The attack stage's calls, in the order and with the arguments of 03_attack.py."""
    load_model = load_template_net if loader == "template" else None
    job = attack_stage.plan_job(run_dir, settings)
    attack_stage.save_plan(job, run_dir)
    attack_stage.run_chunks(job, run_dir, device="cpu", progress=False, load_model=load_model)
    attack_stage.merge(job, run_dir)


def train_child(run_dir: Path, params: dict[str, Any]) -> None:
    """The training stage's calls, as in 02_train.py (without its figures)."""
    from lib.run import data_stage
    from lib.train.loop import fit

    pipeline.start_stage("02_train", run_dir=run_dir, overwrite=False, parameters=params)
    train_set = data_stage.load_run_split(run_dir, "train")
    test_set = data_stage.load_run_split(run_dir, "test")
    for seed in params["seeds"]:
        fit(
            train_set, test_set, out_dir=layout.model_dir(run_dir, seed), epochs=params["epochs"],
            batch_size=params["batch_size"], lr=params["lr"], lr_decay=params["lr_decay"],
            momentum=params["momentum"], weight_decay=params["weight_decay"],
            augment=params["augment"], balance=params["balance"], seed=seed,
            device=params["device"], weights_path=params["weights_path"] or None,
            precision=params["precision"], progress=False,
        )  # fmt: skip
    pipeline.finish_stage("02_train", run_dir=run_dir)


def stage_parameters(stage: str, **overrides: Any) -> dict[str, Any]:
    """What the tiny profile gives ``stage``'s notebook: its defaults, the profile, overrides."""
    return parameters.merged_parameters(stage, profile="tiny", overrides=overrides,
                                    with_defaults=True)


def attack_settings(params: Mapping[str, Any]) -> plan.AttackSettings:
    """The settings of the attack stage's parameters."""
    return parameters.stage_settings("03_attack", params)


def attack_args(run_dir: Path, settings: plan.AttackSettings, loader: str) -> list[str]:
    return [sys.executable, "-m", "tests.test_kill_resume", "attack", str(run_dir),
            json.dumps(settings.to_json()), loader]


def template_attack(run_dir: Path) -> list[str]:
    return attack_args(run_dir, TEMPLATE_SETTINGS, "template")


def train_args(run_dir: Path) -> list[str]:
    params = stage_parameters("02_train", run_dir=str(run_dir), **TRAIN_OVERRIDES)
    return [sys.executable, "-m", "tests.test_kill_resume", "train", str(run_dir),
            json.dumps(params)]


def stage_command(run_dir: Path) -> list[str]:
    """The real stage command, with the overrides as ``-p`` pairs (JSON is valid YAML)."""
    pairs = {"run_dir": str(run_dir), **COMMAND_OVERRIDES}
    options = [item for name, value in pairs.items() for item in ("-p", name, json.dumps(value))]
    return [sys.executable, "-m", "lib.run.pipeline", "run", "--profile", "tiny",
            "--stage", "03_attack", *options, "--no-progress"]


# --------------------------------------------------------------------------- processes


class Child:
    """A child process in a new session, its output in a log file."""

    def __init__(self, args: Sequence[str], log: Path) -> None:
        self.log = log
        log.parent.mkdir(parents=True, exist_ok=True)
        # one torch thread in every process, a papermill kernel included
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        with open(log, "ab") as out:
            self.process = subprocess.Popen(
                list(args), cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def finish(self) -> None:
        """Wait for a successful exit."""
        code = self.process.wait(timeout=TIMEOUT)
        assert code == 0, f"child failed with exit code {code}:\n{self.output()}"

    def wait_for(self, condition: Callable[[], bool]) -> None:
        """Poll ``condition``; fail if the child exits (or the time runs out) before it holds."""
        deadline = time.monotonic() + TIMEOUT
        while not condition():
            code = self.process.poll()
            assert code is None, f"child exited ({code}) before the kill point:\n{self.output()}"
            assert time.monotonic() < deadline, "timed out waiting for the kill point"
            time.sleep(POLL)


def process_tree(root: int) -> list[int]:
    """``root`` and its live descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            if fields[0] != "Z":
                children.setdefault(int(fields[1]), []).append(int(entry.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def is_dead(pid: int) -> bool:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return True
    return fields[0] in ("Z", "X")


def kill_tree(child: Child) -> int:
    """SIGKILL every process group of the child's tree; return how many processes died.

    The groups are stopped first, so no process can start another between the look at the
    tree and the kill; the call returns once every process is gone, so nothing writes after it.
    """
    own = os.getpgid(0)
    groups: set[int] = set()
    pids: set[int] = set()
    for sig in (signal.SIGSTOP, signal.SIGKILL):
        for pid in process_tree(child.process.pid):
            with contextlib.suppress(ProcessLookupError):
                groups.add(os.getpgid(pid))
                pids.add(pid)
        assert own not in groups, "a child joined the test's own process group"
        for group in groups:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(group, sig)
    child.process.wait(timeout=60)
    deadline = time.monotonic() + 60
    while not all(is_dead(pid) for pid in pids):
        assert time.monotonic() < deadline, f"processes {sorted(pids)} survived SIGKILL"
        time.sleep(POLL)
    return len(pids)


# --------------------------------------------------------------------------- files


def visible_files(folder: Path) -> list[str]:
    """Relative paths of the files under ``folder`` that readers may open (no dot names)."""
    names = (path.relative_to(folder) for path in folder.rglob("*") if path.is_file())
    return sorted(str(name) for name in names if not any(p.startswith(".") for p in name.parts))


def temporaries(folder: Path) -> list[Path]:
    """Hidden files under ``folder``: what a write in flight left behind."""
    return sorted(path for path in folder.rglob(".*") if path.is_file())


def assert_same_files(actual: Path, expected: Path) -> None:
    """The same visible files with the same bytes."""
    names = visible_files(expected)
    assert visible_files(actual) == names
    differing = [n for n in names if (actual / n).read_bytes() != (expected / n).read_bytes()]
    assert differing == [], f"files differ from the uninterrupted run's: {differing}"


def assert_same_tables(actual: Path, expected: Path) -> None:
    """CSV tables row for row and npz arrays element for element (readable failures)."""
    for path in sorted(expected.glob("*.csv")):
        pd.testing.assert_frame_equal(
            pd.read_csv(actual / path.name, dtype={"image_id": str}),
            pd.read_csv(path, dtype={"image_id": str}), obj=path.name,
        )
    for path in sorted(expected.glob("*.npz")):
        with np.load(actual / path.name) as got, np.load(path) as want:
            assert sorted(got.files) == sorted(want.files), path.name
            for key in want.files:
                np.testing.assert_array_equal(got[key], want[key], err_msg=f"{path.name}:{key}")


def check_leftovers(folder: Path) -> int:
    """Every hidden file is an atomic write's temporary; return how many there are."""
    found = temporaries(folder)
    assert all(TEMPORARY.match(path.name) for path in found), found
    return len(found)


# --------------------------------------------------------------------------- attack chunks


def chunk_dir(run_dir: Path) -> Path:
    return layout.attack_dir(run_dir) / layout.CHUNK_DIR


def done_chunks(run_dir: Path) -> int:
    """Chunks whose result rows are written (the CSV marks a chunk done)."""
    return len(list(chunk_dir(run_dir).glob("*/chunk_*.csv")))


def chunk_seconds(run_dir: Path) -> float:
    """The median time between two chunks finishing in an uninterrupted run."""
    times = sorted(p.stat().st_mtime for p in chunk_dir(run_dir).glob("*/chunk_*.csv"))
    return statistics.median(b - a for a, b in zip(times, times[1:], strict=False))


def assert_chunk_files_whole(job: plan.AttackJob, run_dir: Path) -> None:
    """Every visible chunk file parses completely and holds the planned rows of its chunk."""
    for name in visible_files(chunk_dir(run_dir)):
        path = chunk_dir(run_dir) / name
        part, chunk = path.parent.name, int(path.stem.split("_")[1])
        planned = job.chunk_rows(part, chunk)["row_id"].to_numpy()
        assert len(planned), f"{name} is no chunk of the job"
        if path.suffix == ".csv":
            table = pd.read_csv(path, dtype={"image_id": str})
            assert tuple(table.columns) == tables.RESULT_COLUMNS, name
            assert np.array_equal(table["row_id"].to_numpy(), planned), name
        else:
            with np.load(path) as arrays:
                assert np.array_equal(arrays["row_id"], planned), name
                for key in arrays.files:
                    arrays[key]  # reads the member: a truncated file raises here
                assert arrays["lr"].shape == (len(planned), job.settings.max_iter), name


@dataclasses.dataclass
class AttackKill:
    """One kill of the attack stage and what it left."""

    waited_for: int  # finished chunks the kill waited for
    delay: float  # seconds after that
    done: int  # chunks finished when the child was dead
    pending: int
    temporaries: int  # hidden files of interrupted writes in attack/ so far


def kill_attack(child: Child, job: plan.AttackJob, run_dir: Path, *, waited_for: int,
                delay: float) -> AttackKill:
    """Kill at ``delay`` s after ``waited_for`` chunks are done (0: after the plan is saved),
    then check that everything visible is whole and nothing is merged while chunks pend."""
    if waited_for:
        child.wait_for(lambda: done_chunks(run_dir) >= waited_for)
    else:
        child.wait_for((layout.attack_dir(run_dir) / "job.json").is_file)
    time.sleep(delay)
    kill_tree(child)
    pending = len(attack_stage.pending_chunks(job, run_dir))
    assert_chunk_files_whole(job, run_dir)
    if pending:
        merged = [n for n in ("results.csv", "traces.npz", "gallery.npz", "lr0_sweep.csv")
                  if (layout.attack_dir(run_dir) / n).exists()]
        assert merged == [], f"merged tables written while {pending} chunks pend: {merged}"
    return AttackKill(waited_for, delay, len(job.chunks) - pending, pending,
                      check_leftovers(layout.attack_dir(run_dir)))


def assert_same_attack(actual: Path, expected: Path) -> None:
    assert_same_tables(layout.attack_dir(actual), layout.attack_dir(expected))
    # every file the stage writes: tables, plan, selection and every chunk
    assert_same_files(layout.attack_dir(actual), layout.attack_dir(expected))


def test_attack_stage_killed_six_times_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    started = time.monotonic()
    template = make_run(tmp_path / "template" / "run")
    reference = copy_inputs(template, tmp_path / "reference")
    Child(template_attack(reference), tmp_path / "reference.log").finish()
    job = attack_stage.plan_job(reference, TEMPLATE_SETTINGS)
    count = len(job.chunks)
    assert count >= 40
    certified = tables.read_results(reference)["certified_at"].notna()
    assert certified.sum() >= 20  # the stop finished rows in many chunks
    rng = random.Random(SEED)
    chunk_time = chunk_seconds(reference)
    waits = [0, *sorted(rng.sample(range(1, count - 2), ATTACK_KILLS - 1))]

    killed = copy_inputs(template, tmp_path / "killed")
    kills: list[AttackKill] = []
    for k, wait in enumerate(waits):
        # every run after the first finishes a chunk of its own before it is killed
        wait = max(wait, done_chunks(killed) + 1) if k else 0
        child = Child(template_attack(killed), tmp_path / f"kill{k}.log")
        kills.append(kill_attack(child, job, killed, waited_for=wait,
                                 delay=rng.uniform(0, chunk_time)))
    Child(template_attack(killed), tmp_path / "final.log").finish()

    print(f"\nattack stage: survived {len(kills)} kills of {count} chunks "
          f"({chunk_time:.3f} s each), finished chunks at each kill: "
          f"{[kill.done for kill in kills]}; {kills[-1].temporaries} interrupted writes left "
          f"temporaries; {time.monotonic() - started:.0f} s")
    assert len(kills) >= 5
    assert len([kill for kill in kills if kill.pending]) >= 3
    # the kills are spread over the run: at least three different interior chunk counts
    assert len({kill.done for kill in kills if 0 < kill.done < count}) >= 3
    assert_same_attack(killed, reference)


# --------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder with the tiny profile's data stage (01_data) executed by papermill."""
    root = tmp_path_factory.mktemp("tiny-data")
    return pipeline.run("tiny", stages=["01_data"], overrides=tiny_overrides(root),
                        progress=False)


def logged_epochs(train_dir: Path) -> list[int]:
    """Epochs with a metrics.csv row, the mark of a finished epoch."""
    path = train_dir / "metrics.csv"
    return sorted(pd.read_csv(path)["epoch"].tolist()) if path.is_file() else []


@dataclasses.dataclass
class TrainingRuns:
    reference: Path
    killed: Path
    #: per kill: its name, the finished epochs it left, the temporaries in train/ after it
    kills: list[tuple[str, list[int], int]]
    seconds: float


@pytest.fixture(scope="module")
def training_runs(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory):
    """Training to 3 epochs, uninterrupted and killed three times. Both ``train/`` folders
    (about 1 GB of checkpoints each) are removed afterwards; the logs stay."""
    started = time.monotonic()
    root = tmp_path_factory.mktemp("training")
    reference, killed = root / "reference", root / "killed"
    for run_dir in (reference, killed):
        shutil.copytree(tiny_data, run_dir)
    Child(train_args(reference), root / "reference.log").finish()
    train = layout.model_dir(reference, 0)
    began = (train / "train_params.json").stat().st_mtime
    first = (train / "epoch_01.safetensors").stat().st_mtime
    epoch_time = (train / "epoch_02.safetensors").stat().st_mtime - first
    rng = random.Random(SEED)
    kills = []

    def kill(name: str, condition: Callable[[], bool], delay: float) -> None:
        child = Child(train_args(killed), root / f"{name}.log")
        child.wait_for(condition)
        time.sleep(delay)
        kill_tree(child)
        kills.append((name, logged_epochs(layout.model_dir(killed, 0)),
                      check_leftovers(layout.model_dir(killed, 0))))

    # epoch 1 in flight: after fit recorded its parameters, before the first checkpoint
    kill("epoch 1", (layout.model_dir(killed, 0) / "train_params.json").is_file,
         rng.uniform(0, 0.8) * (first - began))
    kill("mid epoch 2", lambda: logged_epochs(layout.model_dir(killed, 0)) == [1],
         rng.uniform(0.1, 0.7) * epoch_time)
    # half-way through writing epoch 3's checkpoint (its temporary exists)
    kill("epoch 3 checkpoint write",
         lambda: any(layout.model_dir(killed, 0).glob(".epoch_03.safetensors.*")), 0.0)
    Child(train_args(killed), root / "final.log").finish()
    yield TrainingRuns(reference, killed, kills, time.monotonic() - started)
    for run_dir in (reference, killed):
        shutil.rmtree(run_dir / "train", ignore_errors=True)


def test_training_killed_in_epochs_1_2_and_3_equals_an_uninterrupted_run(
    training_runs: TrainingRuns,
) -> None:
    runs = training_runs
    print(f"\ntraining: survived {len(runs.kills)} kills (name, finished epochs, temporaries "
          f"left): {runs.kills}; {runs.seconds:.0f} s")
    assert [finished for _, finished, _ in runs.kills] == [[], [1], [1, 2]]
    assert runs.kills[-1][2] >= 1  # the checkpoint's half-written temporary was left behind
    reference, killed = layout.model_dir(runs.reference, 0), layout.model_dir(runs.killed, 0)
    for name in ("metrics", "losses", "per_class", "confusion", "predictions"):
        pd.testing.assert_frame_equal(
            pd.read_csv(killed / f"{name}.csv", dtype={"image_id": str}),
            pd.read_csv(reference / f"{name}.csv", dtype={"image_id": str}), obj=name,
        )
    # the checkpoints, the optimizer state, every table and the parameters, byte for byte
    assert_same_files(killed, reference)
    assert manifest.read_manifest(runs.killed)["stages"]["02_train"]["finished"]


# --------------------------------------------------------------------------- the real command


def clone_run(source: Path, target: Path) -> Path:
    """A copy of a run folder whose (read-only) checkpoints are hard links: every writer
    replaces files atomically, so neither folder can change the other."""

    def link_or_copy(src: str, dst: str) -> None:
        if src.endswith(".safetensors"):
            os.link(src, dst)
        else:
            shutil.copy2(src, dst)

    shutil.copytree(source, target, copy_function=link_or_copy)
    return target


@pytest.fixture
def attack_runs(training_runs: TrainingRuns, tmp_path: Path):
    """Two clones of the trained reference run; their checkpoint links are removed afterwards."""
    runs = [clone_run(training_runs.reference, tmp_path / name) for name in ("direct", "command")]
    yield runs
    for run_dir in runs:
        shutil.rmtree(run_dir / "train", ignore_errors=True)


def test_attack_stage_command_killed_once_equals_an_uninterrupted_run(
    attack_runs: list[Path], tmp_path: Path
) -> None:
    started = time.monotonic()
    direct, command = attack_runs
    settings = attack_settings(
        stage_parameters("03_attack", run_dir=str(command), **COMMAND_OVERRIDES)
    )
    Child(attack_args(direct, settings, "checkpoint"), tmp_path / "direct.log").finish()
    job = attack_stage.plan_job(direct, settings)
    assert len(job.chunks) >= 3

    child = Child(stage_command(command), tmp_path / "killed.log")
    child.wait_for(lambda: done_chunks(command) >= 1)
    time.sleep(random.Random(SEED).uniform(0, chunk_seconds(direct)))
    processes = kill_tree(child)
    pending = len(attack_stage.pending_chunks(job, command))
    assert processes >= 2  # the command and its kernel
    assert pending > 0
    assert_chunk_files_whole(job, command)
    assert not (layout.attack_dir(command) / "results.csv").exists()
    assert not manifest.read_manifest(command)["stages"]["03_attack"]["finished"]
    check_leftovers(command)
    Child(stage_command(command), tmp_path / "resumed.log").finish()

    print(f"\nattack stage command: survived 1 kill ({processes} processes) with "
          f"{len(job.chunks) - pending} of {len(job.chunks)} chunks finished; "
          f"{time.monotonic() - started:.0f} s")
    assert manifest.read_manifest(command)["stages"]["03_attack"]["finished"]
    assert_same_attack(command, direct)


if __name__ == "__main__":
    sys.exit(child_main(sys.argv[1:]))
