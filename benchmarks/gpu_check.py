"""GPU check: the attack engine and a training loop on CUDA, against the CPU and the model's limit.

One command on a bare GPU machine (needs torch, torchvision and lib's engine modules, which
bring numpy, pandas and safetensors; no video, notebook or book package)::

    python benchmarks/gpu_check.py                       # CUDA when present, within 8 minutes
    python benchmarks/gpu_check.py --precisions float32,tf32,bfloat16

Printed, as a table and a last line of ``key=value`` figures:

- agreement: the same attack rows (a small AlexNet trained here on synthetic tensors; five
  schedules) on the CPU and on the check's device in float32 (TF32 off): the share of rows
  with equal success and iterations, and the largest difference of their L1 distances;
- engine: sample-iterations per second of :func:`lib.attack.api.iter_attack_rows` at each batch
  size and precision, and the model's forward + backward-to-input limit at the same batch size
  and precision (frozen weights, images/s); engine / limit is the engine's efficiency;
- training: two epochs of SGD on random tensors, images/s, per precision (float32 and
  bfloat16 under ``torch.autocast``);
- peak device memory per configuration (``torch.cuda.max_memory_allocated``; "-" on the CPU).

Precisions: ``float32`` (TF32 off), ``tf32`` (``torch.backends.cuda.matmul.allow_tf32`` and
``torch.backends.cudnn.allow_tf32`` on; the same as float32 on the CPU) and ``bfloat16`` (the
engine's ``precision="bfloat16"``: autocast, every success confirmed in float32).
Without CUDA the same code runs on the CPU at tiny sizes (the test suite runs that mode).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lib import NUM_CLASSES  # noqa: E402
from lib.attack import api  # noqa: E402
from lib.attack.results import AttackRow  # noqa: E402
from lib.model import checkpoints, network  # noqa: E402
from lib.model import precision as precision_lib  # noqa: E402

SCHEDULES = ("constant", "iteration", "exponential", "step", "loss-adaptive")
PRECISIONS = ("float32", "tf32", "bfloat16")


# --------------------------------------------------------------------------- data and model


def synthetic_images(count: int, size: int, *, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images [count, 3, size, size] whose class (0-6) sets a colour and a stripe."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(count) % NUM_CLASSES
    noise = torch.rand(count, 3, size, size, generator=generator) * 0.5
    colour = torch.stack([(labels % 2), (labels // 2 % 2), (labels // 4 % 2)], 1).float()
    images = noise + 0.4 * colour[:, :, None, None]
    for label in range(NUM_CLASSES):
        rows = labels == label
        band = slice(label * size // NUM_CLASSES, (label + 1) * size // NUM_CLASSES)
        images[rows, :, band, :] += 0.1
    return (images.clamp(0, 1) * 255).to(torch.uint8), labels


@contextlib.contextmanager
def precision_mode(precision: str) -> Iterator[None]:
    """TF32 on for ``tf32`` only, restored afterwards."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    torch.backends.cudnn.allow_tf32 = precision == "tf32"
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def forward(model: nn.Module, x: torch.Tensor, precision: str) -> torch.Tensor:
    """Logits as the engine computes them: lib.model.precision's forward (tf32 is float32 here)."""
    return precision_lib.forward(model, x, precision="bfloat16" if precision == "bfloat16"
                                 else "float32")


def train_epochs(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, epochs: int,
    batch_size: int, precision: str, device: torch.device, seed: int = 0,
) -> float:
    """SGD (lr 0.01, momentum 0.9) for ``epochs`` on uint8 images on ``device``; images/s."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(epochs):
        order = torch.randperm(len(images), generator=generator)
        for first in range(0, len(images), batch_size):
            batch = order[first:first + batch_size].to(device)
            with precision_mode(precision):
                loss = F.cross_entropy(forward(model, images[batch].float() / 255, precision),
                                       labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    synchronize(device)
    return epochs * len(images) / (time.perf_counter() - start)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_mb(device: torch.device) -> float:
    if device.type != "cuda":
        return float("nan")
    return torch.cuda.max_memory_allocated(device) / 2**20


# --------------------------------------------------------------------------- the checks


def attack_rows(labels: torch.Tensor, per_image_targets: int) -> list[AttackRow]:
    """Rows over a pool: each image, ``per_image_targets`` other classes, every schedule."""
    rows = []
    for image, source in enumerate(labels.tolist()):
        for k in range(per_image_targets):
            target = (source + 1 + (image + k) % (NUM_CLASSES - 1)) % NUM_CLASSES
            for schedule in SCHEDULES:
                rows.append(AttackRow(len(rows), image, source, target, schedule))
    return rows


def agreement(model: nn.Module, pool: torch.Tensor, rows, *, device: torch.device,
              lr0: float, max_iter: int, batch_size: int) -> dict[str, float]:
    """The same rows on the CPU and on ``device`` in float32: share equal, largest L1 gap."""
    cpu, other = (
        api.attack_rows(model.to(where), pool, rows, targeted=True, lr0=lr0,
                        max_iter=max_iter, batch_size=batch_size)
        for where in (torch.device("cpu"), device)
    )
    same = (cpu.success == other.success) & (cpu.iterations == other.iterations)
    both = torch.isfinite(cpu.l1) & torch.isfinite(other.l1)
    gap = (cpu.l1[both] - other.l1[both]).abs().max().item() if both.any() else float("nan")
    return {"rows": len(rows), "equal_share": same.double().mean().item(), "max_l1_diff": gap,
            "success_share": cpu.success.double().mean().item()}


def limit_rate(model: nn.Module, images: torch.Tensor, *, precision: str,
               device: torch.device, seconds: float) -> float:
    """Forward + backward to the input of one batch, weights frozen: images/s."""
    x = images.to(device).float() / 255
    with network.frozen(model), precision_mode(precision):
        def one_pass() -> None:
            batch = x.clone().requires_grad_(True)
            loss = forward(model, batch, precision).logsumexp(1).sum()
            loss.backward()
        one_pass()
        synchronize(device)
        passes, start = 0, time.perf_counter()
        while True:
            one_pass()
            passes += 1
            synchronize(device)
            if time.perf_counter() - start >= seconds:
                break
    return passes * len(x) / (time.perf_counter() - start)


def engine_rate(model: nn.Module, pool: torch.Tensor, labels: torch.Tensor, *,
                precision: str, device: torch.device, batch_size: int,
                max_iter: int) -> float:
    """Sample-iterations per second of the engine on 3 x batch rows (weak lr0: long attacks)."""
    rows = [AttackRow(k, k % len(pool), int(labels[k % len(pool)]),
                             (int(labels[k % len(pool)]) + 1 + k % 6) % NUM_CLASSES,
                             SCHEDULES[k % len(SCHEDULES)]) for k in range(3 * batch_size)]
    # the certified stop off: every row runs its updates, so the rate counts real passes
    options = dict(targeted=True, lr0=1e-4, max_iter=max_iter, batch_size=batch_size,
                   precision="bfloat16" if precision == "bfloat16" else "float32",
                   certify=False)
    with precision_mode(precision):
        for _ in api.iter_attack_rows(model, pool, rows[:batch_size], **options):
            pass  # warm-up
        synchronize(device)
        start = time.perf_counter()
        work = sum(int(chunk.iterations.sum()) for chunk in
                   api.iter_attack_rows(model, pool, rows, **options))
        synchronize(device)
    return work / (time.perf_counter() - start)


# --------------------------------------------------------------------------- main


def settings(args: argparse.Namespace, device: torch.device) -> dict:
    """Sizes: the paper's on CUDA, tiny on the CPU (each overridable)."""
    on_gpu = device.type == "cuda"
    return {
        "size": args.size or (224 if on_gpu else 64),
        "batch_sizes": args.batch_sizes or ([64, 256, 1024] if on_gpu else [4]),
        "train_images": args.train_images or (4096 if on_gpu else 16),
        "agree_images": args.agree_images or (14 if on_gpu else 7),
        "agree_iter": 50 if on_gpu else 5,
        "max_iter": args.max_iter or (20 if on_gpu else 2),
        "seconds": args.seconds or (3.0 if on_gpu else 0.1),
    }


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="auto", help="auto (cuda when present), cpu, cuda")
    parser.add_argument("--precisions", default=",".join(PRECISIONS),
                        help="comma-separated subset of float32,tf32,bfloat16")
    parser.add_argument("--size", type=int, default=None, help="image side (CUDA 224, CPU 64)")
    parser.add_argument("--batch-sizes", type=lambda s: [int(b) for b in s.split(",")],
                        default=None, help="e.g. 64,256,1024")
    parser.add_argument("--train-images", type=int, default=None)
    parser.add_argument("--agree-images", type=int, default=None)
    parser.add_argument("--max-iter", type=int, default=None, help="engine-rate attacks")
    parser.add_argument("--seconds", type=float, default=None, help="per limit measurement")
    args = parser.parse_args(argv)
    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    unknown = sorted(set(precisions) - set(PRECISIONS))
    if unknown:
        parser.error(f"unknown precision(s) {unknown}; choose from {', '.join(PRECISIONS)}")
    name = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device
    device = network.resolve_device("cpu" if name == "auto" else name)
    s = settings(args, device)
    title = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (tiny sizes)"
    print(f"device: {title}; torch {torch.__version__}; {s}")
    figures: dict[str, float] = {}

    torch.manual_seed(0)
    model = checkpoints.build_model().to(device)
    images, labels = synthetic_images(max(s["train_images"] // 8, 14), s["size"], seed=0)
    train_epochs(model, images.to(device), labels.to(device), epochs=2, batch_size=16,
                 precision="float32", device=device)
    model.eval()
    pool, pool_labels = synthetic_images(s["agree_images"], s["size"], seed=1)
    agree = agreement(model, pool, attack_rows(pool_labels, 1), device=device, lr0=0.008,
                      max_iter=s["agree_iter"], batch_size=32)
    model.to(device)
    print(f"\nagreement, CPU vs {device.type}, float32: {agree['rows']} rows, "
          f"{agree['equal_share']:.3f} equal success and iterations, largest L1 difference "
          f"{agree['max_l1_diff']:.2e} (successes {agree['success_share']:.2f})")
    figures.update(agree_share=agree["equal_share"], agree_max_l1=agree["max_l1_diff"])

    print(f"\n{'precision':<10}{'batch':>6}{'engine it/s':>13}{'limit img/s':>13}"
          f"{'engine/limit':>13}{'peak MB':>9}")
    rate_pool, rate_labels = synthetic_images(256, s["size"], seed=2)
    for precision in precisions:
        for batch_size in s["batch_sizes"]:
            batch = rate_pool[torch.arange(batch_size) % len(rate_pool)]
            reset_peak(device)
            limit = limit_rate(model, batch, precision=precision, device=device,
                               seconds=s["seconds"])
            rate = engine_rate(model, rate_pool, rate_labels, precision=precision,
                               device=device, batch_size=batch_size, max_iter=s["max_iter"])
            peak = peak_mb(device)
            print(f"{precision:<10}{batch_size:>6}{rate:>13.0f}{limit:>13.0f}"
                  f"{rate / limit:>13.2f}{peak:>9.0f}")
            figures[f"engine_{precision}_b{batch_size}"] = rate
            figures[f"limit_{precision}_b{batch_size}"] = limit
            figures[f"peak_mb_{precision}_b{batch_size}"] = peak

    print(f"\n{'training':<10}{'images':>7}{'img/s':>9}{'peak MB':>9}")
    train_images, train_labels = synthetic_images(s["train_images"], s["size"], seed=3)
    for precision in [p for p in ("float32", "bfloat16") if p in precisions]:
        torch.manual_seed(0)
        net = checkpoints.build_model().to(device)
        reset_peak(device)
        rate = train_epochs(net, train_images.to(device), train_labels.to(device), epochs=2,
                            batch_size=64, precision=precision, device=device)
        peak = peak_mb(device)
        print(f"{precision:<10}{len(train_images):>7}{rate:>9.0f}{peak:>9.0f}")
        figures[f"train_{precision}"] = rate
        figures[f"train_peak_mb_{precision}"] = peak
    print(" ".join(f"{key}={value:.4g}" for key, value in figures.items()))
    return figures


if __name__ == "__main__":
    main()
