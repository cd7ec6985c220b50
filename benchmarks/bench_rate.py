"""The machine's rate: the yardstick every time in the book is scaled by.

AlexNet (the project's classifier, random weights, eval mode, weights frozen) runs a float32
forward + backward to the input of one batch of random 64 px images, the work of one attack
update, again and again for ``--seconds`` per round (the GPU check's limit measurement,
:func:`gpu_check.limit_rate`, on the CPU); the best of ``--rounds`` rounds is printed in
images per second. The build budgets are stated at 500 images/s of this benchmark on its
defaults (batch 128, 64 px).

    python benchmarks/bench_rate.py [--seconds 3] [--rounds 5] [--batch-size 128] [--size 64]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_check import limit_rate  # noqa: E402  (it puts the repository on the path)

from lib.model.checkpoints import build_model  # noqa: E402


def best_rate(model: nn.Module, images: torch.Tensor, *, seconds: float, rounds: int) -> float:
    """The fastest of ``rounds`` float32 limit measurements on the CPU, in images/s.

    Args:
        images: uint8 [N, 3, H, W], one batch.
    """
    return max(limit_rate(model, images, precision="float32", device=torch.device("cpu"),
                          seconds=seconds) for _ in range(rounds))


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="length of one round")
    parser.add_argument("--rounds", type=int, default=5, help="rounds; the best is reported")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    model = build_model().eval()
    images = torch.randint(0, 256, (args.batch_size, 3, args.size, args.size), dtype=torch.uint8)
    rate = best_rate(model, images, seconds=args.seconds, rounds=args.rounds)
    print(f"AlexNet float32 forward + backward to the input, {args.size} px, batch "
          f"{args.batch_size}, {torch.get_num_threads()} threads: {rate:.1f} images/s "
          f"(best of {args.rounds} rounds of {args.seconds:g} s)")
    return rate


if __name__ == "__main__":
    main()
