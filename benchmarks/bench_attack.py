"""Benchmark of the attack engine on AlexNet (7 classes) on the CPU: ratios, not absolute times.

Usage: ``.venv/bin/python benchmarks/bench_attack.py [--size 64|224] [--quick]`` (``make bench``).

What is measured (the machine is shared, so only ratios measured side by side mean anything;
every ratio is the median over rounds):

- limit: the model's raw forward + backward-to-input throughput with frozen weights at the
  engine's batch size, in sample-iterations per second. It is sampled *inside* each of the
  loops below (one batched pass after every few units of their work, its time excluded from
  theirs), and each loop's rate is divided by the limit sampled during it, so a change of the
  machine's load between or during the measurements cancels;
- engine: the whole job through :func:`lib.attack.iter_attack_rows` (rows mix schedules);
  its work is sum(iterations + 1) sample-iterations. The job's mean batch fill (a replay of
  the refill rule) is printed too: when the queue runs dry the batch shrinks, and a tail of
  long attacks runs at small, inefficient batch sizes; the larger the job, the smaller it is;
- per-image: one image at a time, as the paper's algorithm reads, weights frozen; and naive:
  the same loop with the weights left requiring grad. These are slow, so each round runs
  them on evenly spaced rows up to a work budget, counting sample-iterations themselves;
- memory: peak resident memory of a streamed job of N and of 4N rows (results dropped as they
  finish), each in a fresh subprocess. Each subprocess warms up, reads its resident set,
  resets the kernel's peak counter (``/proc/self/clear_refs``), runs the job and reads the peak
  (``VmHWM``). The ratio is of the job's peak growth over that warm baseline, which is the
  memory that could grow with the number of rows; a control run that keeps every result with
  its image shows that the measurement sees such growth. The subprocesses run with glibc's
  mmap threshold fixed at its default 128 KiB (``MALLOC_MMAP_THRESHOLD_``). Left dynamic, it
  rises after large blocks are freed, later blocks of that size come from the heap, and the
  peak then depends on the order of allocations: streamed jobs of 512, 2048 and 4096 rows at
  batch 256 grew by 35, 80 and 39 MB, against 101.5, 101.9 and 101.9 MB with it fixed;
- ceiling: what the CPU allows at all. The FLOPs of one forward + backward-to-input per
  sample are counted (``torch.utils.flop_counter``) and the machine's float32 matmul peak is
  timed (a 4096 x 4096 sgemm, before and after the rounds); peak / FLOPs bounds any engine's
  rate, so ceiling / per-image and ceiling / naive bound the two speed-up ratios. ``--profile``
  adds torch.profiler tables of one engine-sized pass, one per-image and one naive iteration.

The model is torchvision's AlexNet with random weights and the normalisation inside; its last
layer is fitted in closed form (ridge regression on the penultimate features) so that the pool
images get varied classes and margins and the attacks need varied numbers of iterations. lr0
is calibrated so that the constant schedule needs a median of about 8 iterations; step and
exponential decay (bounded sums of steps) then often fail at max_iter, as in the paper.

The last line printed is, exactly:
``engine_vs_limit=<r> engine_vs_per_image=<r> engine_vs_naive=<r> memory_4x_over_1x=<r>``
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lib import attack as engine  # noqa: E402
from lib import schedules  # noqa: E402

NUM_CLASSES = 7
SCHEDULE_NAMES = list(schedules.SCHEDULES)
PROBE_LR0 = 1 / 255  # calibration step; the job's lr0 is scaled from it (see calibrate_lr0)
CONSTANT_ITERATIONS = 8  # wanted median iterations of the constant schedule (paper-like job)
# glibc's default mmap threshold (128 KiB), fixed in the memory probes (module docstring)
MMAP_THRESHOLD = 128 * 1024


class Normalized(nn.Module):
    """AlexNet taking [0, 1] images, ImageNet normalisation as its first step."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)

    def penultimate(self, x: torch.Tensor) -> torch.Tensor:
        net = self.net
        h = net.avgpool(net.features((x - self.mean) / self.std)).flatten(1)
        return net.classifier[:-1](h)


def make_pool(size: int, per_class: int, seed: int) -> torch.Tensor:
    """Smooth random images in [0, 1], [7 * per_class, 3, size, size]."""
    generator = torch.Generator().manual_seed(seed)
    low = torch.rand(NUM_CLASSES * per_class, 3, 6, 6, generator=generator)
    images = F.interpolate(low, size=size, mode="bilinear", align_corners=False)
    noise = 0.03 * torch.randn(images.shape, generator=generator)
    return (images + noise).clamp(0, 1)


def make_model(pool: torch.Tensor, *, seed: int) -> Normalized:
    """Random AlexNet whose last layer maps pool image i to class i % 7 (ridge fit).

    The fitted logit margins run from 2 to 12 over the pool, so attacks need from a few to
    many iterations.
    """
    torch.manual_seed(seed)
    model = Normalized(torchvision.models.alexnet(num_classes=NUM_CLASSES)).eval()
    with torch.no_grad():
        features = model.penultimate(pool).double()
        labels = torch.arange(len(pool)) % NUM_CLASSES
        margin = torch.linspace(2, 12, len(pool), dtype=torch.float64)[torch.randperm(len(pool))]
        wanted = margin[:, None] * (F.one_hot(labels, NUM_CLASSES).double() - 1 / NUM_CLASSES)
        mean = features.mean(0)
        centred = features - mean
        gram = centred @ centred.T
        ridge = 1e-3 * gram.diagonal().mean()
        dual = torch.linalg.solve(gram + ridge * torch.eye(len(pool), dtype=gram.dtype), wanted)
        weight = centred.T @ dual  # [4096, 7]
        last = model.net.classifier[-1]
        last.weight.copy_(weight.T.float())
        last.bias.copy_((-(mean @ weight)).float())
    return model


def make_rows(model: nn.Module, pool: torch.Tensor) -> list[engine.AttackRow]:
    """Every pool image towards each other class with each schedule, in that order."""
    with torch.no_grad():
        sources = model(pool).argmax(1).tolist()
    rows = []
    for image, source in enumerate(sources):
        for target in range(NUM_CLASSES):
            if target == source:
                continue
            for schedule in SCHEDULE_NAMES:
                rows.append(engine.AttackRow(len(rows), image, source, target, schedule))
    return rows


# --------------------------------------------------------------------------- measurements


def calibrate_lr0(model: nn.Module, pool: torch.Tensor, rows: list) -> float:
    """lr0 at which constant-schedule attacks need a median of about CONSTANT_ITERATIONS.

    The random model's sensitivity depends on the pool, so a fixed lr0 gives jobs from trivial
    to hopeless; the number of steps to a flip scales about as 1 / lr0.
    """
    probe = [r for r in rows if r.schedule == "constant"][:64]
    result = engine.attack_rows(model, pool, probe, lr0=PROBE_LR0, max_iter=100)
    median = max(float(result.iterations.double().median()), 1.0)
    return PROBE_LR0 * median / CONSTANT_ITERATIONS


@contextlib.contextmanager
def frozen_weights(model: nn.Module):
    """Weights not requiring grad inside the block; each parameter's flag restored after."""
    flags = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(model.parameters(), flags, strict=True):
            p.requires_grad_(flag)


class LimitSampler:
    """The limit, sampled inside another measurement: one batched pass at a time.

    One pass is a forward + backward to the input of ``batch_size`` pool images with frozen
    weights. Calling :meth:`sample` between units of another loop's work (whose own time
    excludes the pass) measures the limit under the same machine load as that loop.
    """

    def __init__(self, model: nn.Module, pool: torch.Tensor, batch_size: int):
        repeats = -(-batch_size // len(pool))
        self.model = model
        self.x = pool.repeat(repeats, 1, 1, 1)[:batch_size].clone()
        self.targets = torch.arange(batch_size) % NUM_CLASSES
        self.seconds = 0.0
        self.samples = 0

    def sample(self) -> None:
        with frozen_weights(self.model):
            start = time.perf_counter()
            x = self.x.clone().requires_grad_(True)
            loss = F.cross_entropy(self.model(x), self.targets, reduction="none").sum()
            torch.autograd.grad(loss, x)
            self.seconds += time.perf_counter() - start
        self.samples += len(self.x)

    @property
    def rate(self) -> float:
        """Sample-iterations per second over the passes so far."""
        return self.samples / self.seconds


def run_engine(model, pool, rows, *, lr0: float, max_iter: int, batch_size: int,
               limit: LimitSampler, every: int = 8):
    """The whole job through the engine, a limit pass after every ``every``-th result chunk.

    Returns the engine's seconds (the limit passes excluded), its work sum(iterations + 1)
    and the results' scalars.
    """
    work, frames, seconds = 0, [], 0.0
    stream = engine.iter_attack_rows(
        model, pool, rows, lr0=lr0, max_iter=max_iter, batch_size=batch_size
    )
    for k in itertools.count():
        start = time.perf_counter()
        chunk = next(stream, None)
        seconds += time.perf_counter() - start
        if chunk is None:
            break
        work += int(chunk.iterations.sum()) + len(chunk)
        frames.append(chunk.to_frame())
        if k % every == 0:
            limit.sample()
    frame = pd.concat(frames).sort_values("row_id", kind="stable")
    return seconds, work, frame


def per_image_loop(
    model, pool, rows, *, lr0: float, max_iter: int, frozen: bool, budget: int,
    limit: LimitSampler,
) -> tuple[float, int]:
    """One image at a time, the paper's loop; seconds and sample-iterations (forwards).

    Runs whole rows, in order, until ``budget`` sample-iterations are done, with a limit pass
    after each row (its time excluded). It calls ``loss.backward()``, so with
    ``frozen=False`` the weight gradients are computed too (as in a plain implementation),
    while ``autograd.grad(loss, x)`` would skip them.
    """
    bound = {name: schedules.bind(name, lr0=lr0) for name in SCHEDULE_NAMES}
    work, seconds = 0, 0.0
    for row in rows:
        if frozen:
            model.requires_grad_(False)
        start = time.perf_counter()
        x = pool[row.image : row.image + 1].clone()
        target = torch.tensor([row.target])
        losses = torch.full((1, max_iter), float("nan"))
        for i in range(1, max_iter + 2):
            x.requires_grad_(True)
            logits = model(x)
            work += 1
            if logits.argmax(1).item() == row.target or i > max_iter:
                break
            loss = F.cross_entropy(logits, target)
            model.zero_grad(set_to_none=True)
            loss.backward()  # as the algorithm is usually written; x.grad is the gradient
            losses[0, i - 1] = loss.item()
            lr = bound[row.schedule](torch.tensor([i]), losses)
            x = (x.detach() - lr * x.grad.sign()).clamp(0, 1)
        seconds += time.perf_counter() - start
        model.requires_grad_(True)
        limit.sample()
        if work >= budget:
            break
    return seconds, work


def occupancy(iterations: list[int], batch_size: int) -> tuple[float, int]:
    """Mean batch fill of the engine's schedule for these per-row iterations, and loop count.

    Replays the refill rule: every slot does one forward per loop; a row needs
    iterations + 1 of them; freed slots take the next rows in order.
    """
    queue = [i + 1 for i in iterations]
    slots = queue[:batch_size]
    position, loops, work = len(slots), 0, 0
    while slots:
        loops += 1
        work += len(slots)
        remaining = [r - 1 for r in slots]
        slots = []
        for r in remaining:
            if r > 0:
                slots.append(r)
            elif position < len(queue):
                slots.append(queue[position])
                position += 1
    return work / (loops * batch_size), loops


def flops_per_sample_iteration(model: nn.Module, pool: torch.Tensor) -> int:
    """FLOPs of one forward + backward to the input of one image, weights frozen."""
    x = pool[:1].clone().requires_grad_(True)
    with frozen_weights(model), FlopCounterMode(display=False) as counter:
        # backward() rather than autograd.grad: the counter's hooks need a full backward
        F.cross_entropy(model(x), torch.tensor([0])).backward()
    return counter.get_total_flops()


def matmul_peak(size: int = 4096, repeats: int = 5) -> float:
    """The machine's float32 matmul rate in FLOP/s: best of ``repeats`` square sgemms."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b  # warm-up
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def profile_tables(model, pool, *, batch_size: int, rows: int = 12) -> None:
    """torch.profiler tables (self CPU time) of an engine-sized pass and per-image iterations."""

    batched_pass = LimitSampler(model, pool, batch_size).sample  # the limit's own pass
    def per_image_iteration():
        x = pool[:1].clone().requires_grad_(True)
        loss = F.cross_entropy(model(x), torch.tensor([0]))
        model.zero_grad(set_to_none=True)
        loss.backward()

    cases = (
        (f"one pass at batch {batch_size}, weights frozen", batched_pass, False, 2),
        ("per-image iteration, weights frozen", per_image_iteration, False, 10),
        ("per-image iteration, weights need grad (naive)", per_image_iteration, True, 10),
    )
    for title, work, weight_grads, count in cases:
        model.requires_grad_(weight_grads)
        work()  # warm-up
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(count):
                work()
        print(f"\nprofile: {title}, {count} runs")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))
    model.requires_grad_(True)


def memory_probe(args: argparse.Namespace) -> None:
    """Subprocess entry: peak RSS growth of one streamed job of ``args.memory_probe`` rows."""
    pool = make_pool(args.size, args.per_class, seed=0)
    model = make_model(pool, seed=0)
    base_rows = make_rows(model, pool)
    lr0 = args.lr0 or PROBE_LR0
    count = args.memory_probe
    rows = [
        base_rows[k % len(base_rows)]._replace(row_id=k) for k in range(count)
    ]  # the same images and targets, cycled to the job size
    options = dict(lr0=lr0, max_iter=args.probe_iter, batch_size=args.batch_size)
    for _ in engine.iter_attack_rows(model, pool, rows[: 2 * args.batch_size], **options):
        pass  # warm-up: allocator, oneDNN primitives, code paths
    baseline = _status_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # reset VmHWM to the current resident set
    kept = []
    for chunk in engine.iter_attack_rows(
        model, pool, rows, keep_images=args.keep_all, **options
    ):
        if args.keep_all:
            kept.append(chunk)  # control: a consumer that holds everything
    peak = _status_kb("VmHWM")
    print(json.dumps({"rows": count, "baseline_kb": baseline, "peak_kb": peak}))


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure_memory(args: argparse.Namespace, rows: int, *, keep_all: bool) -> dict:
    command = [
        sys.executable, __file__, "--memory-probe", str(rows), "--size", str(args.size),
        "--per-class", str(args.per_class), "--batch-size", str(args.batch_size),
        "--probe-iter", str(args.probe_iter), "--lr0", repr(args.lr0),
    ] + (["--keep-all"] if keep_all else []) + (["--quick"] if args.quick else [])
    environment = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD)}
    output = subprocess.run(
        command, check=True, capture_output=True, text=True, env=environment
    ).stdout
    return json.loads(output.strip().splitlines()[-1])


# --------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=64, choices=[64, 224])
    parser.add_argument("--quick", action="store_true", help="fewer images and rounds")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--per-class", type=int, default=None, help="pool images per class")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--max-iter", type=int, default=100)
    parser.add_argument("--memory-probe", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--keep-all", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--probe-iter", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--lr0", type=float, default=None, help="default: calibrated")
    parser.add_argument("--profile", action="store_true", help="print torch.profiler tables")
    args = parser.parse_args()
    if args.per_class is None:
        args.per_class = 3 if args.quick else 6
    if args.probe_iter is None:
        args.probe_iter = (5 if args.quick else 10) if args.size == 64 else 3
    if args.memory_probe:
        memory_probe(args)
        return
    rounds = args.rounds or (2 if args.quick else 3)

    pool = make_pool(args.size, args.per_class, seed=0)
    model = make_model(pool, seed=0)
    rows = make_rows(model, pool)
    lr0 = args.lr0 = args.lr0 or calibrate_lr0(model, pool, rows)
    spread = rows[:: max(1, len(rows) // 48)]  # evenly spaced: every schedule and target
    # work budgets (sample-iterations) of the slow loops per round: about 20 s each unloaded
    budget = {"per_image": 600 if args.quick else 900, "naive": 100 if args.quick else 150}
    if args.size == 224:
        budget = {k: v // 3 for k, v in budget.items()}
    print(
        f"AlexNet {args.size}px, {torch.get_num_threads()} threads, batch {args.batch_size}, "
        f"{len(rows)} rows ({len(pool)} images x 6 targets x {len(SCHEDULE_NAMES)} schedules), "
        f"lr0 {lr0:.4g} (x255 = {lr0 * 255:.3g}), max_iter {args.max_iter}, {rounds} rounds",
        flush=True,
    )

    # warm-up: every path once
    warm = LimitSampler(model, pool, args.batch_size)
    warm.sample()
    run_engine(model, pool, rows[: args.batch_size], lr0=lr0, max_iter=3,
               batch_size=args.batch_size, limit=warm)
    per_image_loop(model, pool, rows[:2], lr0=lr0, max_iter=2, frozen=True, budget=4,
                   limit=warm)
    if args.profile:
        profile_tables(model, pool, batch_size=args.batch_size)
    flops = flops_per_sample_iteration(model, pool)
    peaks = [matmul_peak()]

    rates = {"limit": [], "engine": [], "per_image": [], "naive": []}
    ratios = {"engine_vs_limit": [], "engine_vs_per_image": [], "engine_vs_naive": []}
    work, frame = 0, None
    for round_ in range(rounds):
        limit = {k: LimitSampler(model, pool, args.batch_size) for k in ("engine", "p", "n")}
        seconds, work, frame = run_engine(
            model, pool, rows, lr0=lr0, max_iter=args.max_iter, batch_size=args.batch_size,
            limit=limit["engine"],
        )
        engine_rate = work / seconds
        offset = spread[round_ % 2 :: 2]  # alternate halves: more rows seen over the rounds
        seconds, count = per_image_loop(
            model, pool, offset, lr0=lr0, max_iter=args.max_iter, frozen=True,
            budget=budget["per_image"], limit=limit["p"],
        )
        per_image = count / seconds
        seconds, count = per_image_loop(
            model, pool, offset[::-1], lr0=lr0, max_iter=args.max_iter, frozen=False,
            budget=budget["naive"], limit=limit["n"],
        )
        naive = count / seconds
        for name, value in zip(rates, (limit["engine"].rate, engine_rate, per_image, naive),
                               strict=True):
            rates[name].append(value)
        # every rate relative to the limit sampled during it: a shared machine's speed drifts
        engine_relative = engine_rate / limit["engine"].rate
        ratios["engine_vs_limit"].append(engine_relative)
        ratios["engine_vs_per_image"].append(engine_relative / (per_image / limit["p"].rate))
        ratios["engine_vs_naive"].append(engine_relative / (naive / limit["n"].rate))
        print(
            f"round {round_ + 1}: engine {engine_rate:.1f} (limit {limit['engine'].rate:.1f}), "
            f"per-image {per_image:.2f} (limit {limit['p'].rate:.1f}), naive {naive:.2f} "
            f"(limit {limit['n'].rate:.1f}) sample-iterations/s; "
            + " ".join(f"{k}={v[-1]:.2f}" for k, v in ratios.items()),
            flush=True,
        )

    peaks.append(matmul_peak())
    frame["schedule"] = [r.schedule for r in rows]
    fill, loops = occupancy(frame["iterations"].tolist(), args.batch_size)
    n = 2 * args.batch_size
    memory = {
        (keep, count): measure_memory(args, count, keep_all=keep)
        for keep in ((False, True) if not args.quick else (False,))
        for count in (n, 4 * n)
    }

    med = {name: statistics.median(v) for name, v in rates.items()}
    print()
    print("job: iterations per schedule (mean, max), success rate")
    summary = frame.groupby("schedule", sort=False).agg(
        iterations=("iterations", "mean"), max_iter=("iterations", "max"),
        success=("success", "mean"),
    )
    print(summary.round(2).to_string())
    print(f"work sum(iterations + 1) = {work} sample-iterations over {len(rows)} rows")
    print(f"engine loop: {loops} batched iterations, mean batch fill {fill:.2f} (1 = always full)")
    print()
    print(f"{'how':<42}{'sample-it/s (median)':>22}{'engine / it (raw)':>20}")
    for label, key in (
        ("limit (sampled during the engine run)", "limit"),
        ("engine: stream, early stop, refill", "engine"),
        ("per-image loop, frozen", "per_image"),
        ("per-image loop, weights need grad", "naive"),
    ):
        print(f"{label:<42}{med[key]:>22.2f}{med['engine'] / med[key]:>20.2f}")
    ceiling = max(peaks) / flops
    print()
    print(
        f"ceiling: {flops / 1e9:.3f} GFLOP per sample-iteration (forward + backward to the "
        f"input), float32 matmul peak {max(peaks) / 1e9:.1f} GFLOP/s (sgemm 4096, before "
        f"{peaks[0] / 1e9:.1f}, after {peaks[1] / 1e9:.1f})"
    )
    print(
        f"  so at most {ceiling:.1f} sample-it/s on this machine; the limit reaches "
        f"{med['limit'] / ceiling:.0%} of it, the engine {med['engine'] / ceiling:.0%}"
    )
    print(
        f"  highest reachable ratios: vs per-image {ceiling / med['per_image']:.2f}, "
        f"vs naive {ceiling / med['naive']:.2f}"
    )
    print()
    print(f"{'memory (streamed job)':<42}{'rows':>8}{'baseline MB':>14}{'peak growth MB':>16}")
    growth = {}
    for (keep, count), m in memory.items():
        growth[keep, count] = (m["peak_kb"] - m["baseline_kb"]) / 1024
        label = "results kept with images (control)" if keep else "results dropped as they finish"
        print(f"{label:<42}{count:>8}{m['baseline_kb'] / 1024:>14.0f}{growth[keep, count]:>16.1f}")
    if not args.quick:
        control = growth[True, 4 * n] / growth[True, n]
        print(f"control 4N/N growth ratio (> 1.2 when the probe sees growth): {control:.2f}")
    print(f"(memory probes run with glibc's mmap threshold fixed at {MMAP_THRESHOLD // 1024} KiB)")
    print("ratios: medians over rounds; in each round every rate is divided by the limit")
    print("sampled during it (interleaved passes), so drift of the machine's speed cancels")
    result = {name: statistics.median(values) for name, values in ratios.items()}
    result["memory_4x_over_1x"] = growth[False, 4 * n] / growth[False, n]
    print(" ".join(f"{k}={v:.2f}" for k, v in result.items()))


if __name__ == "__main__":
    main()
