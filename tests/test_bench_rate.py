"""The machine-rate benchmark (benchmarks/bench_rate.py): the best of its rounds of the GPU
check's limit measurement, float32 on the CPU."""

from __future__ import annotations

import importlib.util

import torch
from torch import nn

from lib.run.layout import REPO

SPEC = importlib.util.spec_from_file_location("bench_rate", REPO / "benchmarks" / "bench_rate.py")
bench_rate = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(bench_rate)


def test_the_rate_is_the_best_round_of_the_float32_cpu_limit(monkeypatch) -> None:
    rates, calls = iter([3.0, 7.0, 5.0]), []

    def limit(model, images, **options):
        calls.append(options)
        return next(rates)

    monkeypatch.setattr(bench_rate, "limit_rate", limit)
    assert bench_rate.best_rate(nn.Identity(), torch.zeros(2, 3, 4, 4, dtype=torch.uint8),
                                seconds=0.5, rounds=3) == 7.0
    assert calls == [{"precision": "float32", "device": torch.device("cpu"),
                      "seconds": 0.5}] * 3


def test_a_round_runs_whole_batches_and_leaves_the_weights_without_gradients() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 7))
    batches = []
    model.register_forward_hook(lambda module, args, out: batches.append(len(args[0])))
    rate = bench_rate.best_rate(model, torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8),
                                seconds=0.05, rounds=2)
    assert rate > 0 and len(batches) >= 4 and set(batches) == {4}
    assert all(p.grad is None and p.requires_grad for p in model.parameters())
