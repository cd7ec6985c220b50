"""Benchmark of the attack engine on a trained AlexNet (7 classes): ratios, not absolute times.

Usage: ``.venv/bin/python benchmarks/bench_attack.py [--size 64|224] [--quick]`` (``make bench``,
``make bench-quick``). ``--checkpoint FILE --pool FILE`` attack a given checkpoint and image
pool instead of the benchmark's own trained one.

The job. A checkpoint that has actually been trained: the benchmark writes a small synthetic
dataset in the Cholec80 layout (:mod:`lib.data.synthetic`), reads it like the pipeline does and
trains AlexNet with :func:`lib.train.loop.fit`, once; the dataset and checkpoint are kept under
``data/bench/`` and reused. The pool is the first correctly classified test images of each
class (``--per-class``), and the job every pool image toward every other class with every
schedule, at the attack stage's default lr0, so iterations, failures and successes are those of
a real run.

What is measured, in one process, warmed up (the machine is shared: only ratios measured side
by side mean anything; every ratio is a median over rounds):

- the limit of each precision: one forward + backward to the input of a batch with frozen
  weights, in sample-iterations per second. The float32 limit is sampled *inside* the loops
  below (a pass after every few units of their work, its time excluded) and each loop's rate is
  divided by the limit sampled during it, so load drifting between measurements cancels;
- the engine in float32 on the whole job (:func:`lib.attack.api.iter_attack_rows`, schedules
  mixed, the certified stop on as in the attack stage), work = the passes the engine needs:
  iterations + 1 per row, certified_at + 1 where the certified stop finished the row (the
  full loop's sum(iterations + 1) is printed beside it: its limit is the old one);
- a plain batched loop with early stop and refill (:func:`plain_loop`, about 30 lines, as one
  writes it without the engine) on the same rows and batch size;
- the per-image loop (the paper's algorithm, one image at a time, weights frozen), on evenly
  spaced rows up to a work budget;
- the engine in bfloat16 (``precision="bfloat16"``) and in float32 on the same rows, at the
  job's batch size: the bfloat16 limit is measured at that batch size, and the rows are an
  evenly spaced subset of whole batches whose expected work fits ``--fast-budget`` seconds at
  that limit (at least one batch; the whole job when it fits; :func:`precision_rows`).
  Agreement: the share of rows with the same success flag, and per schedule the median L1 of
  the rows successful in both (``--no-bfloat16`` leaves this part out: where bfloat16 is
  emulated, about 80x slower than float32, it would take hours);
- memory: peak resident memory of a streamed job of N and of 4N rows (results dropped as they
  finish), each in a fresh subprocess that warms up, resets the kernel's peak counter
  (``/proc/self/clear_refs``), runs the job and reads ``VmHWM``; the ratio is of the peak
  growths over the warm baseline. glibc's mmap threshold is fixed at its default 128 KiB
  (``MALLOC_MMAP_THRESHOLD_``): left dynamic, the peak depends on the order of allocations;
- the ceiling: FLOPs of one forward + backward to the input (``torch.utils.flop_counter``)
  against the measured matmul peak of each precision; peak / FLOPs bounds any loop's rate.

The last line printed is, exactly (issue 14):
``engine_vs_limit=<r> fast_vs_float32=<r> fast_vs_fast_limit=<r> engine_vs_plain=<r>
success_agreement=<share> l1_shift=<r> memory_4x_over_1x=<r>`` (one line).
"""

from __future__ import annotations

import argparse
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
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lib.attack import api, schedules  # noqa: E402
from lib.attack.results import AttackRow  # noqa: E402
from lib.data import datasets, synthetic  # noqa: E402
from lib.model import checkpoints  # noqa: E402
from lib.model import precision as precision_lib  # noqa: E402
from lib.model.network import frozen  # noqa: E402
from lib.train.loop import fit  # noqa: E402

NUM_CLASSES = 7
SCHEDULE_NAMES = list(schedules.SCHEDULES)
LR0 = 0.008  # the attack stage's default lr0 (about 2/255)
MMAP_THRESHOLD = 128 * 1024  # glibc's default mmap threshold, fixed in the memory probes
LAST_LINE_KEYS = (
    "engine_vs_limit", "fast_vs_float32", "fast_vs_fast_limit", "engine_vs_plain",
    "success_agreement", "l1_shift", "memory_4x_over_1x",
)


# --------------------------------------------------------------------------- the job


def trained_checkpoint(args: argparse.Namespace) -> tuple[Path, Path]:
    """Train (once) on a synthetic dataset; the checkpoint file and the attacked pool file."""
    name = f"synthetic-{args.videos}v-{args.seconds}s-{args.size}px-{args.epochs}ep"
    folder = ROOT / "data" / "bench" / name
    checkpoint = folder / "train" / f"epoch_{args.epochs:02d}.safetensors"
    pool_file = folder / f"pool-{args.per_class}.pt"
    if checkpoint.is_file() and pool_file.is_file():
        return checkpoint, pool_file
    start = time.perf_counter()
    root = synthetic.generate(folder / "dataset", n_videos=args.videos,
                              seconds_per_video=args.seconds, width=192, height=108, seed=0,
                              workers=1, progress=False)
    splits = datasets.load_cholec80(root, image_size=args.size, cache_dir=folder / "cache",
                                    workers=1, progress=False)
    metrics = fit(splits["train"], splits["test"], out_dir=folder / "train", epochs=args.epochs,
                  lr=0.003, lr_decay=1.0, balance="weights", precision="float32",
                  progress=False)
    model = checkpoints.load_checkpoint(checkpoint, map_location="cpu").eval()
    torch.save(select_pool(model, splits["test"], args.per_class), pool_file)
    last = metrics.iloc[-1]
    print(f"trained on {len(splits['train'])} synthetic frames for {args.epochs} epochs in "
          f"{time.perf_counter() - start:.0f} s: test accuracy {last['accuracy']:.3f}, macro F1 "
          f"{last['macro_f1']:.3f} ({len(splits['test'])} test frames)", flush=True)
    return checkpoint, pool_file


def select_pool(model: nn.Module, test_set, per_class: int) -> torch.Tensor:
    """The first ``per_class`` correctly classified test images of each class (seeded order)."""
    order = torch.randperm(len(test_set), generator=torch.Generator().manual_seed(0))
    images = test_set.images[order].float() / 255
    labels = test_set.labels[order]
    with frozen(model), torch.no_grad():
        predicted = torch.cat([model(images[k : k + 256]).argmax(1)
                               for k in range(0, len(images), 256)])
    chosen = [(labels == c) & (predicted == c) for c in range(NUM_CLASSES)]
    index = torch.cat([mask.nonzero().flatten()[:per_class] for mask in chosen])
    return images[index].contiguous()


def make_rows(model: nn.Module, pool: torch.Tensor) -> list[AttackRow]:
    """Every pool image towards each other class with each schedule, in that order."""
    with torch.no_grad():
        sources = model(pool).argmax(1).tolist()
    rows = []
    for image, source in enumerate(sources):
        for target in range(NUM_CLASSES):
            if target != source:
                for schedule in SCHEDULE_NAMES:
                    rows.append(AttackRow(len(rows), image, source, target, schedule))
    return rows


# --------------------------------------------------------------------------- the loops


class LimitSampler:
    """The limit, sampled inside another measurement: one batched pass at a time.

    One pass is a forward + backward to the input of ``batch_size`` pool images with frozen
    weights, in ``precision``; :meth:`sample` between units of another loop's work (whose own
    time excludes the pass) measures the limit under that loop's machine load.
    """

    def __init__(self, model: nn.Module, pool: torch.Tensor, batch_size: int,
                 precision: str = "float32"):
        repeats = -(-batch_size // len(pool))
        self.model, self.precision = model, precision
        self.x = pool.repeat(repeats, 1, 1, 1)[:batch_size].clone()
        self.targets = torch.arange(batch_size) % NUM_CLASSES
        self.seconds, self.samples = 0.0, 0

    def sample(self) -> None:
        with frozen(self.model):
            start = time.perf_counter()
            x = self.x.clone().requires_grad_(True)
            logits = precision_lib.forward(self.model, x, precision=self.precision)
            torch.autograd.grad(F.cross_entropy(logits, self.targets, reduction="sum"), x)
            self.seconds += time.perf_counter() - start
        self.samples += len(self.x)

    @property
    def rate(self) -> float:
        """Sample-iterations per second over the passes so far."""
        return self.samples / self.seconds


def timed(stream, limit: LimitSampler | None, every: int = 8) -> tuple[float, list]:
    """Consume ``stream``, timing only its own steps; a limit pass after every ``every``-th."""
    seconds, items = 0.0, []
    for k in itertools.count():
        start = time.perf_counter()
        item = next(stream, None)
        seconds += time.perf_counter() - start
        if item is None:
            return seconds, items
        items.append(item)
        if limit is not None and k % every == 0:
            limit.sample()


def row_passes(frame: pd.DataFrame) -> pd.Series:
    """The passes each row cost the engine: certified_at + 1 where the certified stop finished
    it, else iterations + 1."""
    return frame["certified_at"].fillna(frame["iterations"]).astype("int64") + 1


def run_engine(model, pool, rows, *, limit, **options) -> tuple[float, int, pd.DataFrame]:
    """The job through the engine: seconds, the passes it needed (:func:`row_passes`), the
    results' scalars."""
    stream = api.iter_attack_rows(model, pool, rows, targeted=True, lr0=LR0, **options)
    seconds, chunks = timed(stream, limit)
    frame = pd.concat([c.to_frame() for c in chunks]).sort_values("row_id", kind="stable")
    work = int(row_passes(frame).sum())
    frame["schedule"] = [r.schedule for r in sorted(rows, key=lambda r: r.row_id)]
    return seconds, work, frame.reset_index(drop=True)


def plain_loop(model, pool, rows, *, lr0: float, max_iter: int, batch_size: int):
    """A plain batched I-FGSM with early stop and refill, as written without the engine.

    Yields, per batched iteration, the sample-iterations done and the rows that finished as
    ``(row_id, success, iterations)``.
    """
    steps = {name: schedules.bind(name, lr0=lr0) for name in SCHEDULE_NAMES}
    queue, active = list(rows), []
    with frozen(model):
        while queue or active:
            while queue and len(active) < batch_size:
                row = queue.pop(0)
                active.append([row, pool[row.image].clone(), 0, torch.full((max_iter,), math.nan)])
            x = torch.stack([a[1] for a in active]).requires_grad_(True)
            target = torch.tensor([a[0].target for a in active])
            logits = model(x)
            loss = F.cross_entropy(logits, target, reduction="none")
            (grad,) = torch.autograd.grad(loss.sum(), x)
            hit = (logits.argmax(1) == target).tolist()
            finished, going = [], []
            for k, entry in enumerate(active):
                row, _, step, losses = entry
                if hit[k] or step == max_iter:
                    finished.append((row.row_id, hit[k], step))
                    continue
                losses[step] = loss[k].item()
                lr = steps[row.schedule](torch.tensor([step + 1]), losses[None]).item()
                entry[1] = (x[k].detach() - lr * grad[k].sign()).clamp(0, 1)
                entry[2] = step + 1
                going.append(entry)
            yield len(active), finished
            active = going


def per_image_loop(model, pool, rows, *, max_iter: int, budget: int, limit) -> tuple[float, int]:
    """One image at a time, the paper's loop, weights frozen: seconds and sample-iterations.

    Runs whole rows, in order, until ``budget`` sample-iterations are done, with a limit pass
    after each row (its time excluded).
    """
    steps = {name: schedules.bind(name, lr0=LR0) for name in SCHEDULE_NAMES}
    work, seconds = 0, 0.0
    for row in rows:
        with frozen(model):
            start = time.perf_counter()
            x = pool[row.image : row.image + 1].clone()
            target = torch.tensor([row.target])
            losses = torch.full((1, max_iter), math.nan)
            for i in range(1, max_iter + 2):
                x.requires_grad_(True)
                logits = model(x)
                work += 1
                if logits.argmax(1).item() == row.target or i > max_iter:
                    break
                loss = F.cross_entropy(logits, target)
                (grad,) = torch.autograd.grad(loss, x)
                losses[0, i - 1] = loss.item()
                lr = steps[row.schedule](torch.tensor([i]), losses)
                x = (x.detach() - lr * grad.sign()).clamp(0, 1)
            seconds += time.perf_counter() - start
        limit.sample()
        if work >= budget:
            break
    return seconds, work


# --------------------------------------------------------------------------- arithmetic


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


def precision_rows(work: list[int], *, rate: float, budget: float, batch_size: int) -> list[int]:
    """Positions of the rows of the precision job: an evenly spaced subset of whole batches.

    ``work`` is each row's passes, ``rate`` the limit (sample-iterations per second) measured
    at ``batch_size``, ``budget`` seconds. The subset holds ``batches * batch_size`` rows, the
    most whole batches whose expected work (mean work per row times rows) fits ``rate *
    budget``, and at least one batch; every row when they are fewer than that.
    """
    total = len(work)
    per_batch = sum(work) / total * batch_size
    batches = max(1, math.floor(rate * budget / per_batch))
    count = min(total, batches * batch_size)
    return [k * total // count for k in range(count)]


def agreement(float32: pd.DataFrame, fast: pd.DataFrame) -> tuple[float, float, pd.DataFrame]:
    """Success agreement, l1_shift and the per-schedule medians of two runs of the same rows.

    Both frames have ``row_id, schedule, success, l1``. ``success_agreement`` is the share of
    rows with the same success flag; per schedule the median L1 of the rows successful in both
    runs; ``l1_shift`` the largest |median fast / median float32 - 1| over schedules (NaN when
    no schedule has a row successful in both).
    """
    both = float32.merge(fast, on=["row_id", "schedule"], suffixes=("_32", "_16"),
                         validate="one_to_one")
    same = float((both["success_32"] == both["success_16"]).mean())
    ok = both[both["success_32"] & both["success_16"]]
    medians = ok.groupby("schedule", sort=False).agg(
        rows=("l1_32", "size"), l1_float32=("l1_32", "median"), l1_bfloat16=("l1_16", "median"))
    shifts = (medians["l1_bfloat16"] / medians["l1_float32"] - 1).abs()
    return same, float(shifts.max()) if len(shifts) else math.nan, medians


def last_line(result: dict[str, float]) -> str:
    """The benchmark's last line: every key of :data:`LAST_LINE_KEYS`, two decimals."""
    return " ".join(f"{key}={result[key]:.2f}" for key in LAST_LINE_KEYS)


def flops_per_sample_iteration(model: nn.Module, pool: torch.Tensor) -> int:
    """FLOPs of one forward + backward to the input of one image, weights frozen."""
    x = pool[:1].clone().requires_grad_(True)
    with frozen(model), FlopCounterMode(display=False) as counter:
        # backward() rather than autograd.grad: the counter's hooks need a full backward
        F.cross_entropy(model(x), torch.tensor([0])).backward()
    return counter.get_total_flops()


def matmul_peak(size: int = 2048, repeats: int = 3, dtype: torch.dtype = torch.float32) -> float:
    """The machine's matmul rate in ``dtype``, FLOP/s: best of ``repeats`` square products."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b  # warm-up
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


# --------------------------------------------------------------------------- memory


def memory_probe(args: argparse.Namespace) -> None:
    """Subprocess entry: peak RSS growth of one streamed job of ``args.memory_probe`` rows."""
    model = checkpoints.load_checkpoint(args.checkpoint, map_location="cpu").eval()
    pool = torch.load(args.pool)
    base_rows = make_rows(model, pool)
    rows = [base_rows[k % len(base_rows)]._replace(row_id=k) for k in range(args.memory_probe)]
    options = dict(targeted=True, lr0=LR0, max_iter=args.probe_iter, batch_size=args.batch_size)
    for _ in api.iter_attack_rows(model, pool, rows[: 2 * args.batch_size], **options):
        pass  # warm-up: allocator, oneDNN primitives, code paths
    baseline = _status_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # reset VmHWM to the current resident set
    for _ in api.iter_attack_rows(model, pool, rows, **options):
        pass
    print(json.dumps({"rows": len(rows), "baseline_kb": baseline, "peak_kb": _status_kb("VmHWM")}))


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure_memory(args: argparse.Namespace, rows: int) -> float:
    """Peak resident growth in MB of a streamed job of ``rows`` rows, in a fresh process."""
    command = [sys.executable, __file__, "--memory-probe", str(rows), "--checkpoint",
               str(args.checkpoint), "--pool", str(args.pool), "--batch-size",
               str(args.batch_size), "--probe-iter", str(args.probe_iter)]
    environment = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD)}
    output = subprocess.run(command, check=True, capture_output=True, text=True,
                            env=environment).stdout
    probe = json.loads(output.strip().splitlines()[-1])
    return (probe["peak_kb"] - probe["baseline_kb"]) / 1024


# --------------------------------------------------------------------------- main


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=64, choices=[64, 224])
    parser.add_argument("--quick", action="store_true", help="smaller job, fewer rounds")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--per-class", type=int, default=None, help="pool images per class")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--max-iter", type=int, default=None)
    parser.add_argument("--fast-budget", type=float, default=None,
                        help="seconds the bfloat16 engine run may take (sets the subset)")
    parser.add_argument("--no-bfloat16", action="store_true",
                        help="leave out the bfloat16 comparison (fast_* figures are nan)")
    parser.add_argument("--checkpoint", type=Path, default=None, help="attack this checkpoint")
    parser.add_argument("--pool", type=Path, default=None, help="with --checkpoint: images .pt")
    parser.add_argument("--memory-probe", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--probe-iter", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    quick = args.quick
    defaults = dict(batch_size=32 if quick else 256, per_class=1 if quick else 4,
                    rounds=2 if quick else 3, max_iter=20 if quick else 100,
                    fast_budget=40.0 if quick else 900.0, probe_iter=1 if quick else 10)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    # the training run of the default book (about 800 frames, 10 epochs: test accuracy 0.87),
    # shared by quick and full runs and kept under data/bench/; a smaller one barely learns
    args.videos, args.seconds, args.epochs = 16, 180, 10
    return args


def measure_float32(model, pool, rows, args) -> tuple[dict, dict, pd.DataFrame]:
    """Rounds of engine, plain loop and per-image loop; rates and per-round ratios."""
    rates = {k: [] for k in ("limit", "engine", "plain", "per_image")}
    ratios = {k: [] for k in ("engine_vs_limit", "engine_vs_plain", "engine_vs_per_image")}
    spread = rows[:: max(1, len(rows) // 48)]
    frame = None
    for round_ in range(args.rounds):
        limit = {k: LimitSampler(model, pool, args.batch_size) for k in ("e", "p", "i")}
        seconds, work, frame = run_engine(model, pool, rows, limit=limit["e"],
                                          max_iter=args.max_iter, batch_size=args.batch_size)
        engine_rate = work / seconds
        seconds, steps = timed(plain_loop(model, pool, rows, lr0=LR0, max_iter=args.max_iter,
                                          batch_size=args.batch_size), limit["p"])
        plain_rate = sum(s[0] for s in steps) / seconds
        seconds, count = per_image_loop(model, pool, spread[round_ % 2 :: 2],
                                        max_iter=args.max_iter, budget=args.per_image_budget,
                                        limit=limit["i"])
        per_image = count / seconds
        relative = engine_rate / limit["e"].rate
        for key, value in zip(rates, (limit["e"].rate, engine_rate, plain_rate, per_image),
                              strict=True):
            rates[key].append(value)
        ratios["engine_vs_limit"].append(relative)
        ratios["engine_vs_plain"].append(relative / (plain_rate / limit["p"].rate))
        ratios["engine_vs_per_image"].append(relative / (per_image / limit["i"].rate))
        print(f"round {round_ + 1}: engine {engine_rate:.1f} (limit {limit['e'].rate:.1f}), "
              f"plain {plain_rate:.1f} (limit {limit['p'].rate:.1f}), per-image "
              f"{per_image:.2f} (limit {limit['i'].rate:.1f}) sample-it/s; "
              + " ".join(f"{k}={v[-1]:.2f}" for k, v in ratios.items()), flush=True)
    return rates, ratios, frame


def measure_precisions(model, pool, rows, frame, args) -> dict:
    """The engine in float32 and bfloat16 on the same rows; limits of both; agreement."""
    batch = args.batch_size
    fast_limit = LimitSampler(model, pool, batch, "bfloat16")
    fast_limit.sample()  # warm-up at the job's batch size, then the limit there
    fast_limit = LimitSampler(model, pool, batch, "bfloat16")
    fast_limit.sample()
    chosen = precision_rows(row_passes(frame).tolist(), rate=fast_limit.rate,
                            budget=args.fast_budget, batch_size=batch)
    subset = [rows[k] for k in chosen]
    batch = min(batch, len(subset))
    print(f"precision job: {len(subset)} of {len(rows)} rows (evenly spaced, whole batches; the "
          f"bfloat16 limit here is {fast_limit.rate:.2f} sample-it/s at batch {batch})",
          flush=True)
    runs = {}
    for name in ("float32", "bfloat16"):
        limit = LimitSampler(model, pool, batch, name)
        limit.sample()  # warm-up at this batch size
        limit = LimitSampler(model, pool, batch, name)
        limit.sample()
        seconds, count, result = run_engine(model, pool, subset, limit=None,
                                            max_iter=args.max_iter, batch_size=batch,
                                            precision=name)
        limit.sample()
        runs[name] = dict(rate=count / seconds, limit=limit.rate, frame=result)
        print(f"  {name}: engine {count / seconds:.2f}, limit {limit.rate:.2f} sample-it/s "
              f"({count} sample-iterations in {seconds:.1f} s)", flush=True)
    same, shift, medians = agreement(runs["float32"]["frame"], runs["bfloat16"]["frame"])
    return dict(runs=runs, success_agreement=same, l1_shift=shift, medians=medians,
                rows=len(subset), batch=batch)


def skipped_precisions() -> dict:
    """What :func:`measure_precisions` gives when the bfloat16 comparison is left out."""
    run = dict(rate=math.nan, limit=math.nan)
    return dict(runs={"float32": run, "bfloat16": run}, success_agreement=math.nan,
                l1_shift=math.nan, medians=pd.DataFrame(), rows=0, batch=0)


def print_report(model, pool, frame, rates, ratios, fast, memory, args) -> dict:
    """The tables and ceilings; returns the last line's values."""
    med = {k: statistics.median(v) for k, v in rates.items()}
    needed = row_passes(frame)
    fill, loops = occupancy((needed - 1).tolist(), args.batch_size)
    print("\njob: iterations per schedule (mean, max), success rate")
    print(frame.groupby("schedule", sort=False).agg(
        iterations=("iterations", "mean"), max_iter=("iterations", "max"),
        success=("success", "mean")).round(2).to_string())
    print(f"engine loop: {loops} batched iterations, mean batch fill {fill:.2f}")
    full = int((frame["iterations"] + 1).sum())
    certified = int(frame["certified_at"].notna().sum())
    print(f"passes: {int(needed.sum())} with the certified stop ({certified} rows certified, "
          f"{int(frame['certify_checks'].sum())} checks), {full} in the full loop: the stop "
          f"saves {1 - needed.sum() / full:.1%}; the limit counts the former")
    print(f"\n{'float32, whole job':<40}{'sample-it/s (median)':>22}{'engine / it':>14}")
    for label, key in (("limit (sampled during the engine)", "limit"), ("engine", "engine"),
                       ("plain batched loop", "plain"), ("per-image loop", "per_image")):
        print(f"{label:<40}{med[key]:>22.2f}{med['engine'] / med[key]:>14.2f}")
    runs = fast["runs"]
    title = f"precision job ({fast['rows']} rows, batch {fast['batch']})"
    print(f"\n{title:<44}{'limit':>12}{'engine':>10}{'engine / limit':>16}")
    for name, run in runs.items():
        print(f"{name:<44}{run['limit']:>12.2f}{run['rate']:>10.2f}"
              f"{run['rate'] / run['limit']:>16.2f}")
    print(f"agreement: success flags equal on {fast['success_agreement']:.1%} of rows; "
          "median L1 of rows successful in both:")
    print(fast["medians"].to_string(float_format=lambda v: f"{v:.5f}"))
    flops = flops_per_sample_iteration(model, pool)
    print()
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        size = 2048 if name == "float32" or precision_lib.bf16_is_fast("cpu") else 512
        peak = matmul_peak(size=size, dtype=dtype)
        ceiling = peak / flops
        limit = med["limit"] if name == "float32" else runs[name]["limit"]
        print(f"ceiling {name}: {flops / 1e9:.3f} GFLOP per sample-iteration, {name} matmul "
              f"peak {peak / 1e9:.1f} GFLOP/s ({size}x{size}): at most {ceiling:.1f} sample-it/s;"
              f" the limit reaches {limit / ceiling:.0%} of it")
    print(f"bf16 hardware on this CPU: {precision_lib.bf16_is_fast('cpu')} "
          f"(torch capability {torch.backends.cpu.get_cpu_capability()}); precision 'auto' "
          f"resolves to {precision_lib.resolve('auto', 'cpu')}")
    print(f"\nmemory, streamed job: {memory[0]:.1f} MB growth at N, {memory[1]:.1f} MB at 4N "
          f"(N = {2 * args.batch_size} rows; glibc mmap threshold fixed at 128 KiB)")
    print("float32 ratios: medians over rounds, each rate divided by the limit sampled during it")
    return dict(
        engine_vs_limit=statistics.median(ratios["engine_vs_limit"]),
        fast_vs_float32=runs["bfloat16"]["rate"] / runs["float32"]["rate"],
        fast_vs_fast_limit=runs["bfloat16"]["rate"] / runs["bfloat16"]["limit"],
        engine_vs_plain=statistics.median(ratios["engine_vs_plain"]),
        success_agreement=fast["success_agreement"], l1_shift=fast["l1_shift"],
        memory_4x_over_1x=memory[1] / memory[0],
    )


def main() -> None:
    args = parse_arguments()
    if args.memory_probe:
        memory_probe(args)
        return
    started = time.perf_counter()
    if args.checkpoint is None:
        args.checkpoint, args.pool = trained_checkpoint(args)
    model = checkpoints.load_checkpoint(args.checkpoint, map_location="cpu").eval()
    pool = torch.load(args.pool)
    rows = make_rows(model, pool)
    args.per_image_budget = 100 if args.quick else 900
    print(f"AlexNet {args.size}px, {torch.get_num_threads()} threads, batch {args.batch_size}, "
          f"{len(rows)} rows ({len(pool)} images x 6 targets x {len(SCHEDULE_NAMES)} schedules), "
          f"lr0 {LR0}, max_iter {args.max_iter}, {args.rounds} rounds", flush=True)
    warm = LimitSampler(model, pool, args.batch_size)
    warm.sample()
    run_engine(model, pool, rows[: args.batch_size], limit=warm, max_iter=2,
               batch_size=args.batch_size)
    timed(plain_loop(model, pool, rows[: args.batch_size], lr0=LR0, max_iter=2,
                     batch_size=args.batch_size), warm)
    rates, ratios, frame = measure_float32(model, pool, rows, args)
    fast = (skipped_precisions() if args.no_bfloat16
            else measure_precisions(model, pool, rows, frame, args))
    n = 2 * args.batch_size
    memory = (measure_memory(args, n), measure_memory(args, 4 * n))
    result = print_report(model, pool, frame, rates, ratios, fast, memory, args)
    print(f"wall time {time.perf_counter() - started:.0f} s")
    print(last_line(result))


if __name__ == "__main__":
    main()
