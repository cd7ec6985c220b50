"""The machine's rate: the yardstick every time in the book is scaled by.

AlexNet (the project's classifier, random weights, eval mode, weights frozen) runs a float32
forward + backward to the input of one batch of random 64 px images, the work of one attack
update, again and again for ``--seconds`` per round; the best of ``--rounds`` rounds is
printed in images per second. The build budgets are stated at 500 images/s of this benchmark
on its defaults (batch 128, 64 px).

    python benchmarks/bench_rate.py [--seconds 3] [--rounds 5] [--batch-size 128] [--size 64]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lib.model.checkpoints import build_model  # noqa: E402


def input_gradient_pass(model: nn.Module, images: torch.Tensor) -> None:
    """One forward + backward to ``images`` (N, 3, H, W) in [0, 1]; the weights get no grad."""
    x = images.clone().requires_grad_(True)
    model(x).logsumexp(dim=1).sum().backward()


def images_per_second(model: nn.Module, images: torch.Tensor, *, seconds: float,
                      rounds: int) -> tuple[float, int]:
    """The best rate over ``rounds`` rounds of at least ``seconds`` each, and the batches run.

    Returns:
        (images per second of the fastest round, batches run in all rounds; two warm-up
        batches before the first round are not counted).
    """
    for _ in range(2):
        input_gradient_pass(model, images)
    best, batches = 0.0, 0
    for _ in range(rounds):
        start, done = time.perf_counter(), 0
        while time.perf_counter() - start < seconds:
            input_gradient_pass(model, images)
            done += 1
        best = max(best, done * len(images) / (time.perf_counter() - start))
        batches += done
    return best, batches


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="length of one round")
    parser.add_argument("--rounds", type=int, default=5, help="rounds; the best is reported")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    model = build_model().eval()
    model.requires_grad_(False)
    images = torch.rand(args.batch_size, 3, args.size, args.size)
    rate, _ = images_per_second(model, images, seconds=args.seconds, rounds=args.rounds)
    print(f"AlexNet float32 forward + backward to the input, {args.size} px, batch "
          f"{args.batch_size}, {torch.get_num_threads()} threads: {rate:.1f} images/s "
          f"(best of {args.rounds} rounds of {args.seconds:g} s)")
    return rate


if __name__ == "__main__":
    main()
