"""The attack benchmark's own arithmetic, its plain loop and its last line."""

from __future__ import annotations

import importlib.util
import math
import re
from pathlib import Path

import pandas as pd
import pytest
import torch
from torch import nn

from lib.attack import api

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


@pytest.mark.parametrize(
    ("work", "rate", "budget", "batch_size", "count"),
    [
        ([10] * 210, 2.6, 40.0, 32, 32),  # bfloat16 emulated: 104 passes fit, one batch anyway
        ([10] * 210, 20.0, 40.0, 32, 64),  # 800 passes: 2.5 batches of 320 passes -> 2
        ([10] * 210, 1000.0, 40.0, 32, 210),  # everything fits: every row
        ([1, 3] * 50, 10.0, 20.0, 8, 96),  # mean work 2: 200 passes are 12.5 batches of 16
        ([5] * 5, 0.1, 1.0, 8, 5),  # fewer rows than a batch: every row
    ],
)
def test_the_precision_job_fills_whole_batches(bench, work, rate, budget, batch_size, count):
    chosen = bench.precision_rows(work, rate=rate, budget=budget, batch_size=batch_size)
    assert len(chosen) == min(count, len(work))
    assert len(chosen) == len(work) or len(chosen) % batch_size == 0
    assert len(chosen) >= min(batch_size, len(work))  # at least one full batch
    assert chosen == sorted(set(chosen)) and chosen[0] == 0 and chosen[-1] < len(work)
    gaps = {b - a for a, b in zip(chosen, chosen[1:], strict=False)}
    assert max(gaps, default=1) - min(gaps, default=1) <= 1  # evenly spaced
    expected_work = sum(work) / len(work) * len(chosen)
    assert expected_work <= rate * budget or len(chosen) == min(batch_size, len(work))


def test_row_passes_count_the_certified_stop(bench):
    frame = pd.DataFrame({"iterations": [0, 100, 100, 37],
                          "certified_at": pd.array([None, 24, None, None], dtype="Int64")})
    assert bench.row_passes(frame).tolist() == [1, 25, 101, 38]


def test_agreement_counts_flags_and_compares_medians_per_schedule(bench):
    float32 = pd.DataFrame({
        "row_id": range(6), "schedule": ["constant"] * 3 + ["step"] * 3,
        "success": [True, True, True, True, True, False],
        "l1": [0.010, 0.020, 0.030, 0.100, 0.200, 0.300],
    })
    fast = float32.copy()
    fast["success"] = [True, True, False, True, True, False]  # row 2 differs: 5 of 6 agree
    fast["l1"] = [0.011, 0.021, 0.5, 0.100, 0.200, 0.9]
    same, shift, medians = bench.agreement(float32, fast)
    assert same == pytest.approx(5 / 6)
    # constant: rows 0, 1 in both: medians 0.015 and 0.016 -> shift 1/15; step: 0.15 -> 0
    assert medians.loc["constant", "rows"] == 2 and medians.loc["step", "rows"] == 2
    assert shift == pytest.approx(0.016 / 0.015 - 1)


def test_agreement_without_common_successes_is_nan(bench):
    frame = pd.DataFrame({"row_id": [0], "schedule": ["step"], "success": [False], "l1": [0.1]})
    same, shift, _ = bench.agreement(frame, frame)
    assert same == 1.0 and math.isnan(shift)


def test_the_last_line_has_exactly_the_issues_format(bench):
    values = dict(zip(bench.LAST_LINE_KEYS, [0.97, 0.012, 0.61, 1.04, 1.0, 0.0123, 1.01],
                      strict=True))
    line = bench.last_line(values)
    assert line == ("engine_vs_limit=0.97 fast_vs_float32=0.01 fast_vs_fast_limit=0.61 "
                    "engine_vs_plain=1.04 success_agreement=1.00 l1_shift=0.01 "
                    "memory_4x_over_1x=1.01")
    assert re.fullmatch(
        r"engine_vs_limit=\S+ fast_vs_float32=\S+ fast_vs_fast_limit=\S+ engine_vs_plain=\S+ "
        r"success_agreement=\S+ l1_shift=\S+ memory_4x_over_1x=\S+", line)


def tiny_problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 8 * 8, 7)).double().eval()
    pool = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(1)).double()
    return model, pool


@pytest.mark.parametrize("batch_size", [1, 5, 64])
def test_the_plain_loop_attacks_exactly_like_the_engine_in_float64(bench, batch_size):
    model, pool = tiny_problem()
    rows = bench.make_rows(model, pool)
    assert len(rows) == 4 * 6 * 5
    finished = [f for _, done in bench.plain_loop(model, pool, rows, lr0=0.02, max_iter=15,
                                                  batch_size=batch_size) for f in done]
    plain = sorted(finished)
    result = api.attack_rows(model, pool, rows, targeted=True, lr0=0.02, max_iter=15,
                             batch_size=7, certify=False)
    assert [r[0] for r in plain] == result.row_id.tolist()
    assert [r[1] for r in plain] == result.success.tolist()
    assert [r[2] for r in plain] == result.iterations.tolist()
    assert 0 < result.success.float().mean() < 1  # a job with successes and failures


def test_the_plain_loop_counts_one_sample_iteration_per_row_and_pass(bench):
    model, pool = tiny_problem()
    rows = bench.make_rows(model, pool)[:30]
    steps = list(bench.plain_loop(model, pool, rows, lr0=0.02, max_iter=15, batch_size=8))
    result = api.attack_rows(model, pool, rows, targeted=True, lr0=0.02, max_iter=15,
                             certify=False)
    assert sum(s[0] for s in steps) == int(result.iterations.sum()) + len(rows)
    assert all(s[0] <= 8 for s in steps)


def test_flops_of_a_linear_model_are_forward_plus_input_gradient(bench):
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 2 * 2, 7))
    pool = torch.rand(4, 3, 2, 2)
    # forward 2 * 12 * 7 (addmm), input gradient 2 * 12 * 7 (mm); no weight gradient
    assert bench.flops_per_sample_iteration(model, pool) == 2 * (2 * 12 * 7)
    assert all(p.requires_grad for p in model.parameters())  # flags restored


def test_flops_of_alexnet_at_64_px(bench):
    from lib.model.checkpoints import build_model

    flops = bench.flops_per_sample_iteration(build_model().eval(), torch.rand(1, 3, 64, 64))
    # convolutions 2 x 39.5 MFLOP, fully connected 2 x 54.6 MFLOP (torchvision AlexNet, 7 classes)
    assert flops == 376_310_528


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matmul_peak_is_a_plausible_rate(bench, dtype):
    rate = bench.matmul_peak(size=128, repeats=2, dtype=dtype)
    assert 1e6 < rate < 1e15  # FLOP/s: above a slow interpreter, below any CPU


def test_the_bfloat16_limit_sampler_counts_its_samples(bench):
    model, pool = tiny_problem()
    model = model.float()
    sampler = bench.LimitSampler(model, pool.float(), 3, "bfloat16")
    sampler.sample()
    sampler.sample()
    assert sampler.samples == 6 and sampler.rate > 0
    assert all(p.requires_grad for p in model.parameters())  # frozen only during the pass
