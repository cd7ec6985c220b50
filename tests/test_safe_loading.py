"""No file the project reads can run code: every loader refuses a crafted pickle.

Each case writes a pickle whose unpickling would create a marker file, puts it where the
project reads a file of that kind, and checks that the read is refused (or, for a cache,
ignored) and that the marker never appears. Checkpoints and ImageNet weights are covered in
test_model.py (``test_crafted_pickle_never_runs``).
"""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest

from lib import io
from lib.attack import plan
from lib.data import cache
from lib.errors import CheckpointError, ParameterError, RunFolderError
from lib.run import attack_stage, layout, parameters, pipeline, tables
from lib.train.loop import fit
from tests.test_robustness import load_template_net, make_run, settings
from tests.test_training import RUN, colour_frames


class WritesMarker:
    """Unpickling this calls open(marker, "w"): code execution, made visible as a file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (os.fspath(self.marker), "w"))


def pickled_npz(path: Path, marker: Path, *, key: str = "evil", **plain: np.ndarray) -> None:
    """An npz whose array ``key`` is an object array: numpy stores it as a pickle."""
    evil = np.empty(1, dtype=object)
    evil[0] = WritesMarker(marker)
    with open(path, "wb") as handle:
        np.savez(handle, **{key: evil}, **plain)


def test_the_payload_runs_when_unpickled(tmp_path: Path) -> None:
    # Positive control: the payload really runs code when something does unpickle it.
    marker = tmp_path / "marker"
    pickle.loads(pickle.dumps(WritesMarker(marker)))
    assert marker.exists()
    marker.unlink()
    pickled_npz(tmp_path / "x.npz", marker)
    np.load(tmp_path / "x.npz", allow_pickle=True)["evil"]
    assert marker.exists()


def test_npz_with_a_pickled_array_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    path = tmp_path / "arrays.npz"
    pickled_npz(path, marker, row_id=np.arange(3))
    with pytest.raises(RunFolderError, match=r"arrays\.npz cannot be read: it holds a pickled"):
        io.read_npz(path)
    assert not marker.exists()


@pytest.fixture(scope="module")
def attacked_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, plan.AttackJob]:
    run_dir = make_run(tmp_path_factory.mktemp("attacked") / "run")
    job = attack_stage.plan_job(run_dir, settings(sweep_lr0=[], gallery_images=0))
    attack_stage.run_chunks(job, run_dir, progress=False, load_model=load_template_net)
    attack_stage.merge(job, run_dir)
    return run_dir, job


def test_attack_chunk_with_a_pickle_is_refused(attacked_run, tmp_path: Path) -> None:
    source, job = attacked_run
    run_dir = tmp_path / "run"
    shutil.copytree(source, run_dir)
    marker = tmp_path / "marker"
    _, npz_path = layout.chunk_files(run_dir, job.chunks["part"].iloc[0],
                                         int(job.chunks["chunk"].iloc[0]))
    plain = io.read_npz(npz_path)
    pickled_npz(npz_path, marker, key="lr", **{k: v for k, v in plain.items() if k != "lr"})
    with pytest.raises(RunFolderError, match="pickled"):
        attack_stage.merge(job, run_dir)
    assert not marker.exists()


def test_traces_with_a_pickle_are_refused(attacked_run, tmp_path: Path) -> None:
    source, _ = attacked_run
    run_dir = tmp_path / "run"
    shutil.copytree(source, run_dir)
    marker = tmp_path / "marker"
    pickled_npz(run_dir / "attack" / "traces.npz", marker, key="row_id")
    with pytest.raises(RunFolderError, match=r"traces\.npz cannot be read"):
        tables.read_arrays(run_dir, "traces.npz")
    assert not marker.exists()


def test_frame_cache_with_a_pickle_is_ignored(tmp_path: Path) -> None:
    # A cache file is only a shortcut: one that does not load cleanly is decoded again.
    marker = tmp_path / "marker"
    path = tmp_path / "video01.npy"
    evil = np.empty(2, dtype=object)
    evil[:] = [WritesMarker(marker), WritesMarker(marker)]
    np.save(path, evil, allow_pickle=True)
    io.write_json(cache.cache_sidecar(path),
                  {"frames": [0, 25], "source_size": 1, "source_mtime_ns": 1})
    assert cache.read_frame_cache(path) is None
    with pytest.raises(cache.FrameCacheError, match="expected C-ordered uint8"):
        cache.MappedFrames(path)
    assert not marker.exists()


@pytest.mark.parametrize("replaced", ["epoch_01.safetensors", "optimizer_01.safetensors"])
def test_training_resume_refuses_a_pickled_state(tmp_path: Path, replaced: str) -> None:
    train_set = colour_frames(2, seed=0, split="train")
    test_set = colour_frames(1, seed=1, split="test")
    out_dir = tmp_path / "train"
    fit(train_set, test_set, out_dir=out_dir, epochs=1, **RUN)
    marker = tmp_path / "marker"
    (out_dir / replaced).write_bytes(pickle.dumps({"state": WritesMarker(marker)}))
    with pytest.raises(CheckpointError, match=replaced.replace(".", r"\.")):
        fit(train_set, test_set, out_dir=out_dir, epochs=2, **RUN)
    assert not marker.exists()


def test_profile_with_a_python_tag_is_refused(tmp_path: Path, monkeypatch) -> None:
    marker = tmp_path / "marker"
    (tmp_path / "evil.yaml").write_text(
        f"common:\n  run_dir: !!python/object/apply:os.system ['touch {marker}']\n"
    )
    monkeypatch.setattr(parameters, "PROFILE_DIR", tmp_path)
    with pytest.raises(ParameterError, match=r"evil\.yaml"):
        parameters.load_profile("evil")
    assert not marker.exists()


def test_parameter_override_with_a_python_tag_is_refused(tmp_path: Path, capsys) -> None:
    marker = tmp_path / "marker"
    status = pipeline.main(["run", "--profile", "tiny", "--stage", "03_attack", "-p", "lr0",
                            f"!!python/object/apply:os.system ['touch {marker}']"])
    assert status != 0
    assert "lr0" in capsys.readouterr().err
    assert not marker.exists()
