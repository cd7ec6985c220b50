"""The rehearsal of the paper profile: Cholec80's frame size and the paper's settings, small counts.

``profiles/rehearsal.yaml`` may differ from ``profiles/paper.yaml`` only in what it is allowed
to (the data source, the device, counts and sizes of work); the rest of the paper's settings
(224 px, split, schedules, batch and chunk sizes, the stage chain) come through unchanged.
The slow test runs it end to end on the CPU and prints its time (target: at most 5 minutes).
"""

from __future__ import annotations

import time
from pathlib import Path

import av
import numpy as np
import pandas as pd
import pytest

from lib.run import data_stage, manifest, parameters, pipeline

#: Parameters the rehearsal may set differently from the paper profile, and why.
ALLOWED = {
    "run_dir", "dataset_root",  # its own folders
    "dataset_kind", "synthetic_videos", "synthetic_seconds", "synthetic_width",
    "synthetic_height",  # synthetic videos at Cholec80's frame size instead of Cholec80
    "workers", "device",  # the CPU of a test machine
    "epochs", "seeds", "max_iter", "n_per_class", "sweep_per_class", "gallery_images",
    "n_pairs", "steps", "train_images", "eval_per_class", "fmn_steps", "apgd_steps",
    "held_out",  # counts (seeds: one trained model instead of three)
    "progress",  # quiet in tests
}


def test_rehearsal_keeps_the_paper_settings_but_counts():
    paper, rehearsal = parameters.load_profile("paper"), parameters.load_profile("rehearsal")
    assert list(paper) == list(rehearsal)
    for stage in paper:
        differ = {key for key in set(paper[stage]) | set(rehearsal[stage])
                  if paper[stage].get(key) != rehearsal[stage].get(key)}
        assert differ <= ALLOWED, (stage, sorted(differ - ALLOWED))
    assert rehearsal["01_data"]["image_size"] == 224
    assert (rehearsal["01_data"]["synthetic_width"], rehearsal["01_data"]["synthetic_height"]) \
        == (854, 480)
    spec = parameters.load_profile_spec("rehearsal")
    assert spec["skip"] == parameters.load_profile_spec("paper")["skip"]


@pytest.mark.slow
def test_rehearsal_runs_the_paper_chain_at_real_frame_size(tmp_path: Path) -> None:
    overrides = {"run_dir": str(tmp_path / "run"), "dataset_root": str(tmp_path / "c80"),
                 "cache_dir": str(tmp_path / "cache")}
    start = time.perf_counter()
    run_dir = pipeline.run("rehearsal", overrides=overrides, progress=False)
    print(f"\nrehearsal: {time.perf_counter() - start:.0f} s (target: at most 300 s on the CPU)")
    video = next((tmp_path / "c80" / "videos").glob("video*.mp4"))
    with av.open(str(video)) as container:
        stream = container.streams.video[0]
        assert (stream.codec_context.width, stream.codec_context.height) == (854, 480)
        assert stream.average_rate == 25
    test_set = data_stage.load_run_split(run_dir, "test")
    assert test_set.image_size == 224 and test_set.images[0].shape == (3, 224, 224)
    # one seed: one model folder, and every table of one model
    assert sorted(p.name for p in (run_dir / "train").iterdir()) == ["seed_0"]
    assert sorted(p.name for p in (run_dir / "train" / "seed_0").glob("epoch_*.safetensors")) == [
        "epoch_01.safetensors", "epoch_02.safetensors"]
    selection = pd.read_csv(run_dir / "attack" / "selection.csv")
    assert set(selection["epoch"]) <= {1, 2} and set(selection["model"]) == {0}
    claims = pd.read_csv(run_dir / "analysis" / "paper_claims.csv")
    assert (claims["models"] <= 1).all()
    attacked = claims[claims["attacks"] > 0]
    assert attacked["model_verdicts"].str.fullmatch(r"seed 0: \w+").all()
    stages = manifest.read_manifest(run_dir)["stages"]
    assert all(stages[s]["finished"] for s in ("01_data", "02_train", "03_attack", "04_analysis"))
    assert "05_minimality" not in stages  # skipped, as in the paper profile
    cache = next((tmp_path / "cache").rglob("*.npy"))
    assert np.load(cache, mmap_mode="r").shape[1:] == (3, 224, 224)
