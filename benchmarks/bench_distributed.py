"""The attack stage as 1 process x 2 threads against 2 processes x 1 thread (torchrun, gloo).

Usage: ``.venv/bin/python benchmarks/bench_distributed.py [--max-iter 5]``

Builds a small run folder (one untrained AlexNet checkpoint at 64 px, 7 test images, every
schedule: 210 attacks), then runs the real commands on fresh copies of it, each timed from
start to exit (imports and start-up included, as a user sees them):

- ``python -m lib.run.distributed attack --threads 2``   (one plain process)
- ``torchrun --standalone --nproc_per_node=2 -m lib.run.distributed attack --threads 1``

and prints the wall times, their ratio (one run each, measured back to back after a warm-up
run), and the cost model of :func:`scaling_estimate` fed with the measured
rate: the expected speed-up on K devices, for this job and for the paper's.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from lib.errors import ParameterError  # noqa: E402
from lib.run import tables  # noqa: E402
from tests.test_distributed import make_alexnet_run  # noqa: E402  (the tests' tiny run folder)


def scaling_estimate(
    *,
    passes: float,
    passes_per_second: float,
    devices: Sequence[int],
    largest_chunk_passes: float = 0.0,
    startup_seconds: float = 0.0,
) -> pd.DataFrame:
    """Expected wall time and speed-up of the attack stage on K devices (cost model).

    The stage's work is ``passes`` model passes (``sum(iterations + 1)`` over every attack:
    measured, or ``attacks * (mean iterations + 1)``); one device does ``passes_per_second``
    (measured on one device at the stage's batch size). Sharded by
    :func:`lib.run.distributed.shard_chunks`,
    the slowest of K devices does at most ``passes / K + largest_chunk_passes``; each process also
    pays ``startup_seconds`` (imports, reading the test split, loading checkpoints).

    Returns:
        One row per K: ``devices``, ``seconds`` (expected: perfect balance), ``seconds_worst``
        (the balance bound), ``speedup`` and ``speedup_worst`` against one device, and
        ``efficiency`` (``speedup / K``).
    """
    if passes_per_second <= 0 or passes < 0:
        raise ParameterError("passes must be >= 0 and passes_per_second > 0")
    rows = []
    one = startup_seconds + passes / passes_per_second
    for k in devices:
        if k < 1:
            raise ParameterError(f"device counts must be >= 1, got {k}")
        spread = largest_chunk_passes if k > 1 else 0.0
        seconds = startup_seconds + passes / k / passes_per_second
        worst = startup_seconds + (passes / k + spread) / passes_per_second
        rows.append({"devices": k, "seconds": seconds, "seconds_worst": worst,
                     "speedup": one / seconds, "speedup_worst": one / worst,
                     "efficiency": one / seconds / k})
    return pd.DataFrame(rows)


def timed(command: list[str]) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode:
        sys.exit(f"failed: {' '.join(command)}\n{done.stderr[-3000:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-iter", type=int, default=5)
    args = parser.parse_args()
    params = ["--param", "epochs=[]", "--param", f"max_iter={args.max_iter}",
              "--param", "n_per_class=1", "--param", "lr0=0.004", "--param", "batch_size=32",
              "--param", "chunk_size=32", "--param", "sweep_lr0=[]", "--param", "gallery_images=0",
              "--param", "precision=float32", "--param", "refine_tolerance=null"]
    plain = [sys.executable, "-m", "lib.run.distributed", "attack", "--no-progress"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node=2", "-m", "lib.run.distributed", "attack", "--no-progress"]
    with tempfile.TemporaryDirectory() as scratch:
        source = make_alexnet_run(Path(scratch) / "source" / "run")

        def fresh(name: str) -> Path:
            target = Path(scratch) / name
            shutil.copytree(source, target)
            return target

        # warm-up: the first heavy run on a machine is slower
        timed([*plain, "--run-dir", str(fresh("warm-up")), "--threads", "2", *params,
               "--param", "max_iter=1"])
        one = fresh("one")
        one_seconds = timed([*plain, "--run-dir", str(one), "--threads", "2", *params])
        two = fresh("two")
        two_seconds = timed([*torchrun, "--run-dir", str(two), "--threads", "1", *params])
        same = (tables.table_path(one, "results").read_bytes()
                == tables.table_path(two, "results").read_bytes())
        results = tables.read_results(one)
        startup = timed([sys.executable, "-c", "import lib.run.distributed, lib.data.datasets"])

    passes = float((results["iterations"] + 1).sum())
    print(f"job: {len(results)} attacks, max_iter {args.max_iter}, {passes:.0f} model passes "
          f"(sum of iterations + 1), {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}")
    print(f"1 process x 2 threads:  {one_seconds:6.1f} s")
    print(f"2 processes x 1 thread: {two_seconds:6.1f} s   (torchrun, gloo)")
    print(f"ratio (1x2 / 2x1):      {one_seconds / two_seconds:6.2f}   "
          f"results.csv identical: {same}   (one run each)")
    print(f"start-up of one interpreter (imports): {startup:.1f} s")

    rate = passes / max(one_seconds - startup, 1e-9)
    print(f"\ncost model, measured rate {rate:.1f} passes/s per device (this job):")
    print(scaling_estimate(
        passes=passes, passes_per_second=rate, devices=[1, 2, 4, 8],
        largest_chunk_passes=32 * (args.max_iter + 1), startup_seconds=startup,
    ).round(2).to_string(index=False))
    # the paper's job: 2,100 attacks x 5 schedules x 10 epochs; mean iterations about 40 over
    # the schedules (step and exponential near 50 and 83); chunks of 420 attacks
    paper_passes = 2100 * 5 * 10 * (40 + 1)
    print(f"\nthe paper's job ({paper_passes:.3g} passes at 224 px) at a rate of R passes/s "
          "per device: hours on K devices for R = 1000")
    print(scaling_estimate(
        passes=paper_passes, passes_per_second=1000.0, devices=[1, 2, 4, 8],
        largest_chunk_passes=420 * 101, startup_seconds=60.0,
    ).assign(hours=lambda t: t["seconds"] / 3600).round(2).to_string(index=False))


if __name__ == "__main__":
    main()
