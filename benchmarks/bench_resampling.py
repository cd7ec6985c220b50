"""Benchmark of the cluster and two-level bootstrap (lib/analysis/resampling.py).

Usage: ``.venv/bin/python benchmarks/bench_resampling.py [--rows 3360] [--images 35]
[--models 1] [--resamples 2000]``.

Prints, per statistic, the seconds for one interval on a synthetic long table (rows spread
over images, images over models): a rate, a mean, a median (the path that needs the rows), a
curve at 101 epsilons and a two-level rate; the median over ``--rounds`` runs.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd

from lib.analysis import resampling


def table(rows: int, images: int, models: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame({"model": rng.integers(0, models, rows),
                         "image_id": rng.integers(0, images, rows),
                         "success": (rng.random(rows) < 0.9).astype(float),
                         "distance": rng.gamma(2.0, 0.01, rows)})


def seconds(function, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=3360)
    parser.add_argument("--images", type=int, default=35)
    parser.add_argument("--models", type=int, default=3)
    parser.add_argument("--resamples", type=int, default=resampling.RESAMPLES)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    data = table(args.rows, args.images, args.models)
    flat = resampling.clusters_of(data)
    nested = resampling.clusters_of(data, model="model")
    grid = np.linspace(0, 0.05, 101)
    curve = (data["distance"].to_numpy()[:, None] > grid[None, :]).astype(float)
    options = {"resamples": args.resamples}
    cases = {
        "rate (image clusters)": lambda: resampling.bootstrap_rows(
            data["success"].to_numpy(), flat, **options),
        "mean (image clusters)": lambda: resampling.bootstrap_rows(
            data["distance"].to_numpy(), flat, **options),
        "median (image clusters)": lambda: resampling.bootstrap_rows(
            data["distance"].to_numpy(), flat, statistic="median", **options),
        "curve, 101 epsilons": lambda: resampling.bootstrap_curve(curve, flat, **options),
        "rate (models, then images)": lambda: resampling.bootstrap_rows(
            data["success"].to_numpy(), nested, two_level=True, **options),
        "median (models, then images)": lambda: resampling.bootstrap_rows(
            data["distance"].to_numpy(), nested, statistic="median", two_level=True,
            **options),
    }
    print(f"{args.rows} rows, {flat.n_clusters} images, {nested.n_models} models, "
          f"{args.resamples} resamples; seconds per interval (median of {args.rounds})")
    for name, case in cases.items():
        print(f"  {name:32s} {seconds(case, args.rounds):8.4f}")


if __name__ == "__main__":
    main()
