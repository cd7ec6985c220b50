"""The attack benchmark's own arithmetic, and one small run of the whole command."""

from __future__ import annotations

import importlib.util
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_attack.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_attack", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("iterations", "batch_size", "fill", "loops"),
    [
        ([0, 0, 0, 0], 2, 1.0, 2),  # four one-pass rows, two at a time
        ([3, 0], 2, 5 / 8, 4),  # 4 + 1 passes; the second slot idles for 3 loops
        ([1, 0, 0], 2, 1.0, 2),  # the freed slot takes row 3: 2 + 1 + 1 passes in 2 loops
        ([2, 2, 2], 4, 9 / 12, 3),  # fewer rows than slots
    ],
)
def test_occupancy_replays_the_refill_rule(bench, iterations, batch_size, fill, loops):
    assert bench.occupancy(iterations, batch_size) == (pytest.approx(fill), loops)


def test_flops_of_a_linear_model_are_forward_plus_input_gradient(bench):
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 2 * 2, 7))
    pool = torch.rand(4, 3, 2, 2)
    # forward 2 * 12 * 7 (addmm), input gradient 2 * 12 * 7 (mm); no weight gradient
    assert bench.flops_per_sample_iteration(model, pool) == 2 * (2 * 12 * 7)
    assert all(p.requires_grad for p in model.parameters())  # flags restored


def test_flops_of_alexnet_at_64_px(bench):
    pool = bench.make_pool(64, 1, seed=0)
    model = bench.make_model(pool, seed=0)
    flops = bench.flops_per_sample_iteration(model, pool)
    # convolutions 2 x 39.5 MFLOP, fully connected 2 x 54.6 MFLOP (torchvision AlexNet, 7 classes)
    assert flops == 376_310_528


def test_matmul_peak_is_a_plausible_rate(bench):
    rate = bench.matmul_peak(size=256, repeats=3)
    assert 1e8 < rate < 1e14  # FLOP/s: above a slow interpreter, below any CPU


def test_the_command_prints_its_table_and_last_line():
    command = [
        sys.executable, str(SCRIPT), "--size", "64", "--quick", "--per-class", "1",
        "--rounds", "1", "--batch-size", "8", "--max-iter", "3", "--lr0", "0.004",
    ]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    lines = output.strip().splitlines()
    assert "210 rows (7 images x 6 targets x 5 schedules)" in lines[0]
    assert any(line.startswith("ceiling: 0.376 GFLOP per sample-iteration") for line in lines)
    last = re.fullmatch(
        r"engine_vs_limit=(\S+) engine_vs_per_image=(\S+) engine_vs_naive=(\S+) "
        r"memory_4x_over_1x=(\S+)",
        lines[-1],
    )
    assert last is not None, lines[-1]
    ratios = [float(value) for value in last.groups()]
    assert all(math.isfinite(r) and r > 0 for r in ratios)
