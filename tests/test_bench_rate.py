"""The machine-rate benchmark (benchmarks/bench_rate.py) counts the work it times."""

from __future__ import annotations

import importlib.util

import torch
from torch import nn

from lib.run.layout import REPO

SPEC = importlib.util.spec_from_file_location("bench_rate", REPO / "benchmarks" / "bench_rate.py")
bench_rate = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(bench_rate)


def test_the_rate_counts_every_batch_it_times_and_leaves_the_weights_without_gradients() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 7)).requires_grad_(False)
    calls = []
    model.register_forward_hook(lambda module, args, out: calls.append(len(args[0])))
    rate, batches = bench_rate.images_per_second(model, torch.rand(4, 3, 8, 8),
                                                 seconds=0.05, rounds=2)
    assert calls == [4] * (batches + 2)  # two warm-up batches, then every timed one
    assert rate > 0 and all(p.grad is None for p in model.parameters())
