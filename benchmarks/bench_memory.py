"""Peak resident memory of the data path at 224 px: N against 4N cached frames.

A run folder is made whose frame cache holds N (then 4N) train and as many test frames at
224 px, in the format the data stage writes (one memory-mapped ``videoNN.npy`` per video and
its ``videoNN.json``). For each size a fresh subprocess imports torch and lib, warms up (one
fit of 8 images), reads its resident set, resets the kernel's peak counter
(``/proc/self/clear_refs``), then

1. loads both splits with :func:`lib.run.data_stage.load_run_split` (peak "load"),
2. trains one epoch and evaluates on the test split with :func:`lib.train.loop.fit`
   (batch 64, the paper's; peak "epoch").

Printed: both peaks (``VmHWM``) and their growth over the warm baseline, for N and 4N, and
the ratio of the 4N peak to the N peak (target <= 1.3). A control run that reads the train
split whole into memory (``FrameSet.float_images``) shows that the measurement sees a split
that is materialised. glibc's mmap threshold is fixed, as in bench_attack.py.

    python benchmarks/bench_memory.py            # N = 128 (4N = 512 frames per split)
    python benchmarks/bench_memory.py --frames 256
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

MMAP_THRESHOLD = 128 * 1024
IMAGE_SIZE = 224
FRAMES_PER_VIDEO = 64


def make_run(folder: Path, frames_per_split: int, *, seed: int = 0) -> Path:
    """A run folder whose data/ and frame cache hold ``frames_per_split`` frames per split."""
    from lib.data import datasets
    from lib.data.cache import cache_folder, write_frame_cache
    from lib.data.frames import INDEX_COLUMNS
    from lib.run import tables

    root = folder / "cholec80"
    cache_dir = folder / "cache"
    cache = cache_folder(root, cache_dir=cache_dir, image_size=IMAGE_SIZE)
    cache.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    video = 0
    for split in datasets.SPLITS:
        left = frames_per_split
        while left:
            video += 1
            count = min(FRAMES_PER_VIDEO, left)
            left -= count
            frames = np.arange(count, dtype=np.int64) * 25
            labels = rng.integers(0, 7, count)
            images = rng.integers(0, 256, (count, 3, IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
            write_frame_cache(cache / f"video{video:02d}.npy", frames, images, signature=(0, 0))
            rows += [(f"video{video:02d}-f{f:06d}", split, f"video{video:02d}", int(f), int(c))
                     for f, c in zip(frames, labels, strict=True)]
    run_dir = folder / "run"
    tables.write_record(run_dir, "dataset", {
        "kind": "cholec80", "root": str(root.resolve()), "image_size": IMAGE_SIZE,
        "cache_dir": str(cache_dir.resolve()), "train_videos": [], "test_videos": []})
    tables.write_table(run_dir, "frames", pd.DataFrame(rows, columns=list(INDEX_COLUMNS)))
    return run_dir


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def probe(run_dir: Path, *, materialise: bool) -> None:
    """Subprocess entry: peaks of loading both splits, one epoch and one evaluation."""
    import torch

    from lib.run import data_stage
    from lib.train.loop import fit

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    options = dict(epochs=1, batch_size=64, lr=0.001, balance="weights", precision="float32",
                   progress=False)
    with tempfile.TemporaryDirectory() as scratch:
        warm = data_stage.load_run_split(run_dir, "train").subset(range(8))
        fit(warm, warm, out_dir=Path(scratch) / "warm", **options)
        baseline = _status_kb("VmRSS")
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")  # reset VmHWM to the current resident set
        start = time.perf_counter()
        train = data_stage.load_run_split(run_dir, "train")
        test = data_stage.load_run_split(run_dir, "test")
        held = train.float_images() if materialise else None  # the control
        load_peak = _status_kb("VmHWM")
        fit(train, test, out_dir=Path(scratch) / "train", **options)
        seconds = time.perf_counter() - start
        peak = _status_kb("VmHWM")
    del held
    print(json.dumps({"frames": len(train), "baseline_kb": baseline, "load_peak_kb": load_peak,
                      "peak_kb": peak, "seconds": seconds}))


def measure(run_dir: Path, *, materialise: bool = False) -> dict:
    command = [sys.executable, __file__, "--probe", str(run_dir)]
    command += ["--materialise"] if materialise else []
    environment = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD)}
    output = subprocess.run(command, check=True, capture_output=True, text=True,
                            env=environment).stdout
    return json.loads(output.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--frames", type=int, default=128, help="N: frames per split")
    parser.add_argument("--probe", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--materialise", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--no-control", action="store_true", help="skip the control run")
    args = parser.parse_args()
    if args.probe is not None:
        probe(args.probe, materialise=args.materialise)
        return
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        for label, count in (("N", args.frames), ("4N", 4 * args.frames)):
            run_dir = make_run(Path(folder) / label, count)
            results[label] = measure(run_dir)
            if label == "4N" and not args.no_control:
                results["4N, split held in memory (control)"] = measure(run_dir, materialise=True)
    mb = 1024.0
    print(f"{'run':<36}{'frames/split':>13}{'baseline MB':>12}{'load peak MB':>13}"
          f"{'epoch peak MB':>14}{'growth MB':>10}{'s':>6}")
    for label, r in results.items():
        print(f"{label:<36}{r['frames']:>13}{r['baseline_kb'] / mb:>12.0f}"
              f"{r['load_peak_kb'] / mb:>13.0f}{r['peak_kb'] / mb:>14.0f}"
              f"{(r['peak_kb'] - r['baseline_kb']) / mb:>10.0f}{r['seconds']:>6.0f}")
    ratio = results["4N"]["peak_kb"] / results["N"]["peak_kb"]
    growth = ((results["4N"]["peak_kb"] - results["4N"]["baseline_kb"])
              / max(results["N"]["peak_kb"] - results["N"]["baseline_kb"], 1))
    print(f"peak N {results['N']['peak_kb'] / mb:.0f} MB, peak 4N "
          f"{results['4N']['peak_kb'] / mb:.0f} MB, ratio {ratio:.3f} (target <= 1.3), "
          f"growth ratio {growth:.3f}")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
