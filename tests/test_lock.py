"""The run folder's lock (lib/run/layout.py): one stage at a time per run folder.

A holder process takes the lock the way a stage does (:func:`lib.run.lock.hold_run_folder`) and
then waits; a second stage command on the same folder must stop at once with a message naming
the holder and change nothing. After ``kill -9`` of the holder the operating system has
released the lock, and the next command runs; it removes what a killed write left behind.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
from contextlib import redirect_stderr
from pathlib import Path

import pytest

from lib.errors import RunFolderError
from lib.run import layout, lock, manifest, parameters, pipeline
from tests.conftest import tiny_overrides

REPO = Path(__file__).resolve().parents[1]
HOLDER = """
import sys, time
from lib.run import lock
with lock.hold_run_folder(sys.argv[1], sys.argv[2]):
    print("held", flush=True)
    time.sleep(600)
"""


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (hidden ones too) with its SHA-256."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def holder(tmp_path: Path):
    """A process holding ``tmp_path / "run"`` as stage 02_train; killed with SIGKILL after."""
    run_dir = tmp_path / "run"
    process = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(run_dir), "02_train"], cwd=REPO,
        stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert process.stdout.readline().strip() == "held"
    yield process, run_dir
    if process.poll() is None:
        process.kill()
        process.wait()


def _kill(process: subprocess.Popen) -> None:
    os.kill(process.pid, signal.SIGKILL)
    process.wait()


def test_the_lock_names_its_holder(holder) -> None:
    process, run_dir = holder
    record = json.loads(layout.lock_file(run_dir).read_text())
    assert record["stage"] == "02_train" and record["pid"] == process.pid
    with pytest.raises(RunFolderError) as error:
        with lock.hold_run_folder(run_dir, "03_attack"):
            pass
    message = str(error.value)
    assert "stage 02_train" in message and f"process {process.pid}" in message
    assert record["since"] in message
    with pytest.raises(RunFolderError, match=f"process {process.pid}"):
        lock.check_not_held(run_dir)


def test_a_second_stage_command_is_refused_at_once_and_writes_nothing(holder,
                                                                      tmp_path: Path) -> None:
    process, run_dir = holder
    (run_dir / "data").mkdir()
    (run_dir / "data" / ".frames.csv.x1.tmp").write_text("half")
    before = snapshot(tmp_path)
    stderr = io.StringIO()
    args = ["run", "--profile", "tiny", "--stage", "01_data", "--no-progress"]
    for name, value in tiny_overrides(tmp_path).items():
        args += ["-p", name, value]
    with redirect_stderr(stderr):
        status = pipeline.main(args)
    assert status == 1
    message = stderr.getvalue()
    assert "stage 01_data" in message and "is in use by stage 02_train" in message
    assert f"process {process.pid}" in message and "since" in message
    assert snapshot(tmp_path) == before  # not even the leftover was touched


def test_the_lock_is_reentrant_and_released(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    with lock.hold_run_folder(run_dir, "01_data"):
        assert lock.holds_run_folder(run_dir)
        assert os.environ[lock.LOCK_ENVIRONMENT] == str(run_dir.resolve())
        with lock.hold_run_folder(run_dir, "01_data"):
            pass
        assert lock.holds_run_folder(run_dir)
    assert not lock.holds_run_folder(run_dir)
    assert lock.LOCK_ENVIRONMENT not in os.environ
    lock.check_not_held(run_dir)  # free again


def test_leftovers_are_removed_only_when_they_are_temporary_files(tmp_path: Path) -> None:
    folder = tmp_path / "attack"
    (folder / "chunks" / "epoch_01").mkdir(parents=True)
    left = [folder / ".results.csv.k2j3.tmp",
            folder / "chunks" / "epoch_01" / ".chunk_00000.npz.ab.tmp",
            folder / ".03_attack.ipynb.q1.tmp.ipynb"]
    kept = [folder / "results.csv", folder / ".hidden", folder / "chunks" / "epoch_01" / "x.tmp"]
    for path in left + kept:
        path.write_text("x")
    assert sorted(lock.remove_leftovers(folder)) == sorted(left)
    assert [p.exists() for p in left] == [False] * 3
    assert [p.exists() for p in kept] == [True] * 3


def test_start_stage_removes_leftovers_of_its_own_folder(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    params = {**parameters.stage_defaults("01_data"), **tiny_overrides(tmp_path)}
    pipeline.start_stage("01_data", run_dir=run_dir, parameters=params)
    leftover = run_dir / "data" / ".frames.csv.zz9.tmp"
    leftover.write_text("half")
    pipeline.start_stage("01_data", run_dir=run_dir, parameters=params)
    assert not leftover.exists()
    assert not lock.holds_run_folder(run_dir)  # start_stage holds it only while recording


@pytest.mark.pipeline
def test_after_kill_9_of_the_holder_the_next_command_runs_and_cleans_up(
    holder, tmp_path: Path
) -> None:
    process, run_dir = holder
    command = [sys.executable, "-m", "lib.run.pipeline", "run", "--profile", "tiny", "--stage",
               "01_data", "--no-progress"]
    for name, value in tiny_overrides(tmp_path).items():
        command += ["-p", name, value]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    refused = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    assert refused.returncode == 1
    assert f"is in use by stage 02_train (process {process.pid}" in refused.stderr
    # a killed run's half-written files, in the stage's folder and the notebooks folder
    (run_dir / "data").mkdir()
    (run_dir / "notebooks").mkdir()
    leftovers = [run_dir / "data" / ".frames.csv.a1b2.tmp",
                 run_dir / "notebooks" / ".01_data.ipynb.c3d4.tmp.ipynb"]
    for path in leftovers:
        path.write_text("half")
    _kill(process)
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert manifest.read_manifest(run_dir)["stages"]["01_data"]["finished"]
    assert [p.exists() for p in leftovers] == [False, False]
    assert json.loads(layout.lock_file(run_dir).read_text())["stage"] == "01_data"
