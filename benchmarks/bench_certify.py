"""What the certified early stop saves on a run folder's attack job, and what it costs.

Usage::

    .venv/bin/python benchmarks/bench_certify.py --run-dir data/runs/default [--epochs 5]
    .venv/bin/python benchmarks/bench_certify.py --run-dir data/runs/default --engine \
        [--sweep] [--max-rows 840] [--rounds 1]

``--engine`` times the engine itself on the attack stage's job, as the stage runs it
(:func:`engine_timing`): the rows of one part of the run folder's planned job (default: the
last attacked checkpoint's main attack; ``--sweep``: every part of the lr0 sweep), cut to
``--max-rows`` rows each (default: the whole part), attacked with the stage's settings in
float32 with the stop off and on (rounds interleaved). Printed per part: the passes (a row costs
iterations + 1 without the stop, certified_at + 1 when the stop finished it) and the checks,
the time of each run, the share of passes and of time the stop saves, whether every row's
success and iterations are equal, and the machine's float32 rate (forward + backward to the
input at the job's batch size, images/s). The last line is
``certify_passes_saved=<share> certify_time_saved=<share> outcomes_equal=<share>``.

Without ``--engine``, the stop is replayed by hand on the failed rows (below).

For the attacked checkpoints chosen (default: the last), the failed rows of the schedules with
a remaining-step bound (default: exponential and step) are attacked again in float32 by a
plain loop, the engine's loop written out, so that each iterate x_k can be bounded: after
every update k, from the first one whose reachable radius is at most ``--start-radius``, the
interval bounds (:mod:`lib.attack.bounds`) of the box of radius R_k around x_k (R_k from
:mod:`lib.attack.step_bounds`, widened for float rounding) say whether the row is certified
to fail. Checks go on for ``--tail`` updates after the first certified one, and the loop runs
on to max_iter to confirm that no certified row crosses later and that x_N lies in the box.

Printed:

- per schedule: failed rows, rows certified, the first certified update k (quartiles), the
  passes the stop would save (max_iter - k per row) against every pass of the checkpoint's
  job and of the whole main job (sum of iterations + 1 over results.csv, every schedule);
- check strategies simulated from the recorded bounds: a check every m updates, and a
  predicted check (the first check at ``--start-radius``, then only where the last check's
  width, scaled linearly with the radius, would leave the row certified), with their number
  of checks per row and the passes saved net of the checks' cost;
- the cost of one check against one forward + backward pass at the same batch (medians of
  interleaved rounds: the machine is shared, only ratios mean anything).

The replayed loop is the engine's in float32; the run's own precision (``auto``) may have been
bfloat16, whose paths differ; the agreement of the replayed final L1 with results.csv is
printed. Timings are figures, not assertions.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lib.attack import (  # noqa: E402
    api,
    bounds,
    schedules,  # noqa: E402
    step_bounds,
)
from lib.attack.plan import AttackSettings  # noqa: E402
from lib.attack.results import AttackResult  # noqa: E402
from lib.model import precision as precision_lib  # noqa: E402
from lib.model.checkpoints import load_checkpoint  # noqa: E402
from lib.model.network import frozen  # noqa: E402
from lib.run import attack_stage, data_stage, tables  # noqa: E402


@dataclass
class Replay:
    """Per failed row: the certified gap and radius after every checked update (NaN where not
    checked), the centre gap of the forward at every iterate, and the loop's checks."""

    gap: np.ndarray  # [rows, N + 1]: certified_gap at x_k (k updates applied)
    radius: np.ndarray  # [rows, N + 1]: R_k
    centre: np.ndarray  # [rows, N + 1]: gap of the model's logits at x_k (> 0: not crossed)
    crossed: np.ndarray  # [rows] bool: some iterate crossed (the row did not fail here)
    outside: np.ndarray  # [rows]: max over k >= k* of |x_N - x_k*|_inf / R_k* (<= 1: in box)
    l1: np.ndarray  # [rows]: final L1 of the replay
    first: np.ndarray  # [rows]: the first certified update k, -1 if none


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run-dir", default="data/runs/default")
    parser.add_argument("--epochs", type=int, nargs="*", default=None,
                        help="attacked epochs to replay (default: the last)")
    parser.add_argument("--sweep", action="store_true",
                        help="replay rows of the lr0 sweep (attack/lr0_sweep.csv) instead of "
                             "the main job's results")
    parser.add_argument("--lr0", type=float, default=None,
                        help="the rows' lr0 (default: the job's); with --sweep, also selects "
                             "that lr0's rows")
    parser.add_argument("--schedules", nargs="*", default=["exponential", "step"])
    parser.add_argument("--batch-size", type=int, default=0, help="default: the job's")
    parser.add_argument("--start-radius", type=float, default=1e-5)
    parser.add_argument("--tail", type=int, default=8)
    parser.add_argument("--max-rows", type=int, default=0, help="per epoch; 0 = all")
    parser.add_argument("--cost-rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--engine", action="store_true",
                        help="time the engine with the stop off and on (see the docstring)")
    parser.add_argument("--rounds", type=int, default=1, help="with --engine")
    return parser.parse_args()


def load_job(run_dir: Path, sweep: bool) -> tuple[dict, pd.DataFrame]:
    settings = tables.read_record(run_dir, "job")["settings"]
    return settings, tables.read_sweep(run_dir) if sweep else tables.read_results(run_dir)


def load_images(run_dir: Path, image_ids: pd.Series) -> torch.Tensor:
    test_set = data_stage.load_run_split(run_dir, "test")
    position = pd.Series(np.arange(len(test_set)), index=test_set.index["image_id"].to_numpy())
    index = torch.from_numpy(position.loc[image_ids].to_numpy(np.int64, copy=True))
    return test_set.images[index].float() / 255


def gap_of(logits: torch.Tensor, anchor: torch.Tensor, targeted: bool) -> torch.Tensor:
    own = logits.gather(1, anchor[:, None]).squeeze(1)
    others = logits.scatter(1, anchor[:, None], -torch.inf).amax(1)
    return others - own if targeted else own - others


def replay(model, network, images, anchor, *, schedule: str, settings: dict, targeted: bool,
           start_radius: float, tail: int) -> Replay:
    """The engine's loop for one batch of rows of one schedule, with bounds after each update
    (see the module docstring)."""
    max_iter = settings["max_iter"]
    constants = settings["schedule_constants"].get(schedule, {})
    rate = schedules.bind(schedule, lr0=settings["lr0"], **constants)
    remaining = step_bounds.bind_remaining(schedule, lr0=settings["lr0"], max_iter=max_iter,
                                           **constants)
    rows = len(images)
    gap, radius, centre = (np.full((rows, max_iter + 1), np.nan) for _ in range(3))
    crossed, first = np.zeros(rows, dtype=bool), np.full(rows, -1)
    x, kept = images.clone(), images.clone()
    losses = torch.full((rows, max_iter), torch.nan)
    for k in range(max_iter + 1):  # x holds x_k: k updates applied
        x.requires_grad_(True)
        with torch.enable_grad():
            logits = model(x)
            loss = F.cross_entropy(logits, anchor, reduction="none")
            grad = torch.autograd.grad(loss.sum(), x)[0] if k < max_iter else None
        x = x.detach()
        centre[:, k] = gap_of(logits.detach(), anchor, targeted).numpy()
        crossed |= centre[:, k] <= 0
        step = torch.full((rows,), k + 1)
        reach = bounds.reachable_radius(remaining(step, losses), dtype=x.dtype)
        radius[:, k] = reach.numpy()
        check = (reach <= start_radius).numpy() & ((first < 0) | (k <= first + tail)) & (k > 0)
        if check.any():
            index = np.flatnonzero(check)
            found = bounds.certified_gap(network, x[index], reach[index],
                                         target=anchor[index], source=anchor[index],
                                         targeted=targeted).numpy()
            gap[index, k] = found
            new = index[(found > 0) & (first[index] < 0)]
            first[new] = k
            kept[new] = x[new]
        if grad is None:
            break
        losses[:, k] = loss.detach()
        lr = rate(step, losses).to(x.dtype)
        direction = -1.0 if targeted else 1.0
        x = (x + (direction * lr)[:, None, None, None] * grad.sign()).clamp_(0, 1)
    certified = first >= 0
    at_first = radius[np.arange(rows), first.clip(0)]
    moved = (x - kept).flatten(1).abs().amax(1).numpy()
    outside = np.divide(moved, at_first, out=np.zeros(rows), where=certified & (at_first > 0))
    l1 = (x - images).flatten(1).abs().mean(1).numpy()
    return Replay(gap=gap, radius=radius, centre=centre, crossed=crossed, outside=outside, l1=l1,
                  first=first)


def replay_epoch(run_dir: Path, epoch: int, settings: dict, results: pd.DataFrame,
                 args: argparse.Namespace) -> pd.DataFrame:
    """Replay the failed rows of the chosen schedules at one epoch; one record per row."""
    model = load_checkpoint(run_dir / "train" / f"epoch_{epoch:02d}.safetensors").eval()
    targeted = settings["mode"] == "targeted"
    chosen = results[(results["epoch"] == epoch) & ~results["success"].astype(bool)
                     & results["schedule"].isin(args.schedules)]
    if args.max_rows:
        chosen = chosen.groupby("schedule", sort=False).head(args.max_rows)
    images = load_images(run_dir, chosen["image_id"])
    anchor = torch.from_numpy(chosen["target" if targeted else "source"]
                              .to_numpy(np.int64, copy=True))
    batch = args.batch_size or settings["batch_size"]
    records = []
    with frozen(model):
        network = bounds.IntervalNetwork(model)
        for schedule in args.schedules:
            positions = np.flatnonzero((chosen["schedule"] == schedule).to_numpy())
            for start in range(0, len(positions), batch):
                part = positions[start:start + batch]
                done = replay(model, network, images[part], anchor[part], schedule=schedule,
                              settings=settings, targeted=targeted,
                              start_radius=args.start_radius, tail=args.tail)
                records.append(_records(chosen.iloc[part], done))
                print(f"  epoch {epoch} {schedule}: {start + len(part)}/{len(positions)} rows "
                      "replayed", flush=True)
    return pd.concat(records, ignore_index=True)


def _records(rows: pd.DataFrame, done: Replay) -> pd.DataFrame:
    return pd.DataFrame({
        "epoch": rows["epoch"].to_numpy(), "schedule": rows["schedule"].to_numpy(),
        "row_id": rows["row_id"].to_numpy(), "first": done.first, "crossed": done.crossed,
        "outside": done.outside, "l1": done.l1, "l1_run": rows["l1"].to_numpy(),
        "gap": list(done.gap), "radius": list(done.radius), "centre": list(done.centre),
    })


# --------------------------------------------------------------------------- strategies


def every(record: pd.Series, m: int, max_iter: int) -> tuple[int, int]:
    """(certified update or max_iter, checks made) when checking at multiples of m."""
    checked = np.flatnonzero(~np.isnan(record["gap"]))
    start = int(checked[0]) if len(checked) else max_iter
    checks = 0
    for k in range(-(-start // m) * m, max_iter + 1, m):
        if np.isnan(record["gap"][k]):
            return max_iter, checks  # beyond the recorded checks: counted as never stopped
        checks += 1
        if record["gap"][k] > 0:
            return k, checks
    return max_iter, checks


def predicted(record: pd.Series, max_iter: int, optimism: float) -> tuple[int, int]:
    """(certified update or max_iter, checks made) for the predicted strategy: check first
    where the radius falls to --start-radius, then where the last check's width, scaled
    linearly with the radius and divided by ``optimism``, would leave the centre gap
    positive (widths grow faster than linearly at large radii: a check at a large radius
    overestimates the width at a smaller one)."""
    gap, radius, centre = record["gap"], record["radius"], record["centre"]
    checked = np.flatnonzero(~np.isnan(gap))
    if not len(checked):
        return max_iter, 0
    k, checks = int(checked[0]), 0
    while k <= max_iter and not np.isnan(gap[k]):
        checks += 1
        if gap[k] > 0:
            return k, checks
        slope = (centre[k] - gap[k]) / max(radius[k], 1e-300)
        later = np.arange(k + 1, max_iter + 1)
        hopeful = later[centre[later] - slope * radius[later] / optimism > 0]
        if not len(hopeful):
            return max_iter, checks
        k = int(hopeful[0])
    return max_iter, checks


def geometric(record: pd.Series, max_iter: int, factor: float) -> tuple[int, int]:
    """(certified update or max_iter, checks made) when checking first where the radius falls
    to --start-radius, then each time it has fallen by ``factor`` since the last check."""
    gap, radius = record["gap"], record["radius"]
    checked = np.flatnonzero(~np.isnan(gap))
    if not len(checked):
        return max_iter, 0
    k, checks = int(checked[0]), 0
    while k <= max_iter and not np.isnan(gap[k]):
        checks += 1
        if gap[k] > 0:
            return k, checks
        later = np.flatnonzero(radius <= radius[k] / factor)
        later = later[later > k]
        if not len(later):
            return max_iter, checks
        k = int(later[0])
    return max_iter, checks


def strategy_table(records: pd.DataFrame, max_iter: int, passes: int,
                   check_cost: float) -> pd.DataFrame:
    usable = records[~records["crossed"]]
    rows = []
    plans = [(f"every {m}", lambda r, m=m: every(r, m, max_iter)) for m in (1, 2, 4, 8)]
    plans += [(f"predicted /{f}", lambda r, f=f: predicted(r, max_iter, f)) for f in (1, 4, 16)]
    plans += [(f"radius /{f}", lambda r, f=f: geometric(r, max_iter, f)) for f in (4, 16)]
    for name, plan in plans:
        outcome = np.array([plan(r) for _, r in usable.iterrows()]).reshape(-1, 2)
        saved = int((max_iter - outcome[:, 0]).sum())
        checks = int(outcome[:, 1].sum())
        rows.append({"strategy": name, "certified": int((outcome[:, 0] < max_iter).sum()),
                     "checks_per_row": checks / max(len(usable), 1), "passes_saved": saved,
                     "share_saved": saved / passes,
                     "share_saved_net": (saved - checks * check_cost) / passes})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- cost


def check_cost(model, images: torch.Tensor, anchor: torch.Tensor, rounds: int) -> dict:
    """Median time of one bound check over one forward + backward pass, same batch."""
    network = bounds.IntervalNetwork(model)
    start = time.perf_counter()
    bounds.IntervalNetwork(model)
    build = time.perf_counter() - start
    radius = torch.full((len(images),), 1e-9)

    def pass_() -> None:
        x = images.clone().requires_grad_(True)
        with torch.enable_grad():
            loss = F.cross_entropy(model(x), anchor)
            torch.autograd.grad(loss, x)

    def check() -> None:
        bounds.certified_gap(network, images, radius, target=anchor)

    ratios, passes = [], []
    for work in (pass_, check):
        work()  # warm-up
    for _ in range(rounds):
        timed = []
        for work in (pass_, check):
            start = time.perf_counter()
            work()
            timed.append(time.perf_counter() - start)
        passes.append(timed[0])
        ratios.append(timed[1] / timed[0])
    return {"batch": len(images), "pass_s": statistics.median(passes),
            "check_over_pass": statistics.median(ratios),
            "build_over_pass": build / statistics.median(passes)}


# --------------------------------------------------------------------------- the engine


def stage_parts(run_dir: Path, settings: AttackSettings, *, sweep: bool,
                max_rows: int) -> list[pd.DataFrame]:
    """The planned rows of the parts to time (the run folder is only read)."""
    job = attack_stage.plan_job(run_dir, settings)
    rows = job.rows
    if sweep:
        chosen = rows[rows["kind"] == "sweep"]
    else:
        last = int(rows.loc[rows["kind"] == "main", "epoch"].max())
        chosen = rows[(rows["kind"] == "main") & (rows["epoch"] == last)]
    parts = [part for _, part in chosen.groupby("part", sort=False)]
    return [part.head(max_rows) if max_rows else part for part in parts]


def engine_rows(part: pd.DataFrame, run_dir: Path) -> tuple[torch.Tensor, pd.DataFrame]:
    """The pool and the engine's row table of one part, as the attack stage builds them."""
    ids = sorted(part["image_id"].unique())
    images = load_images(run_dir, pd.Series(ids))
    index = pd.Series(np.arange(len(ids)), index=ids)
    rows = pd.DataFrame({
        "row_id": part["row_id"].to_numpy(np.int64),
        "image": index.loc[part["image_id"]].to_numpy(np.int64),
        "source": part["source"].to_numpy(np.int64), "target": part["target"].to_numpy(np.int64),
        "schedule": part["schedule"].to_numpy(),
    })
    return images, rows


def row_passes(result: AttackResult) -> int:
    """Forward + backward passes the rows cost: iterations + 1, or certified_at + 1."""
    stopped = result.certified_at >= 0
    return int(torch.where(stopped, result.certified_at, result.iterations).sum()) + len(result)


def time_part(model, images, rows, settings: AttackSettings, *, lr0: float,
              rounds: int) -> dict:
    """The part through the engine with the stop off and on, rounds interleaved."""
    options = dict(targeted=settings.mode == "targeted", lr0=lr0, max_iter=settings.max_iter,
                   batch_size=settings.batch_size, refine_tolerance=settings.refine_tolerance,
                   schedule_constants=settings.schedule_constants,
                   precision=precision_lib.resolve(settings.precision, "cpu"))
    seconds: dict[bool, list[float]] = {False: [], True: []}
    results: dict[bool, AttackResult] = {}
    for _ in range(rounds):
        for certify in (False, True):
            start = time.perf_counter()
            results[certify] = api.attack_rows(model, images, rows, certify=certify, **options)
            seconds[certify].append(time.perf_counter() - start)
    full, stopped = results[False], results[True]
    order = rows.set_index("row_id").loc[full.row_id.numpy(), "schedule"].to_numpy()
    certified = (stopped.certified_at >= 0).numpy()
    failed = ~full.success.numpy()
    at = stopped.certified_at.numpy()[certified]
    per_schedule = {name: f"{int((certified & (order == name)).sum())}/"
                          f"{int((failed & (order == name)).sum())}"
                    for name in dict.fromkeys(order)}
    return {
        "stopped_of_failed": per_schedule,
        "certified_at": np.percentile(at, [0, 25, 50, 75, 100]) if len(at) else [],
        "rows": len(rows), "precision": options["precision"],
        "passes_off": row_passes(full), "passes_on": row_passes(stopped),
        "checks": int(stopped.certify_checks.sum()),
        "certified": int((stopped.certified_at >= 0).sum()),
        "seconds_off": statistics.median(seconds[False]),
        "seconds_on": statistics.median(seconds[True]),
        "success_equal": int((full.success == stopped.success).sum()),
        "iterations_equal": int((full.iterations == stopped.iterations).sum()),
        "both_equal": int(((full.success == stopped.success)
                           & (full.iterations == stopped.iterations)).sum()),
    }


def engine_timing(args: argparse.Namespace) -> None:
    """``--engine``: the stage's job with the stop off and on (see the module docstring)."""
    run_dir = Path(args.run_dir)
    recorded = tables.read_record(run_dir, "job")["settings"]
    settings = AttackSettings(**recorded)
    parts = stage_parts(run_dir, settings, sweep=args.sweep, max_rows=args.max_rows)
    records = []
    for part in parts:
        epoch, lr0 = int(part["epoch"].iloc[0]), float(part["lr0"].iloc[0])
        model = load_checkpoint(run_dir / "train" / f"epoch_{epoch:02d}.safetensors").eval()
        images, rows = engine_rows(part, run_dir)
        with frozen(model):
            cost = check_cost(model, images[rows["image"].to_numpy()[:settings.batch_size]],
                              torch.from_numpy(rows["target"].clip(lower=0).to_numpy()[
                                  :settings.batch_size]), args.cost_rounds)
        record = time_part(model, images, rows, settings, lr0=lr0, rounds=args.rounds)
        record.update(part=part["part"].iloc[0], epoch=epoch, lr0=lr0,
                      rate=cost["batch"] / cost["pass_s"], check_over_pass=cost["check_over_pass"])
        records.append(record)
        print_part(record, settings)
    total = pd.DataFrame(records)
    saved = 1 - total["passes_on"].sum() / total["passes_off"].sum()
    timed = 1 - total["seconds_on"].sum() / total["seconds_off"].sum()
    equal = total["both_equal"].sum() / total["rows"].sum()
    print(f"certify_passes_saved={saved:.4f} certify_time_saved={timed:.4f} "
          f"outcomes_equal={equal:.4f}")


def print_part(record: dict, settings: AttackSettings) -> None:
    off, on = record["passes_off"], record["passes_on"]
    print(f"\n{record['part']} (epoch {record['epoch']}, lr0 {record['lr0']}): {record['rows']} "
          f"rows, batch {settings.batch_size}, {record['precision']}, refine "
          f"{settings.refine_tolerance}, max_iter {settings.max_iter}")
    print(f"  stop off: {off} passes in {record['seconds_off']:.1f} s "
          f"({off / record['seconds_off']:.1f} passes/s)")
    print(f"  stop on:  {on} passes + {record['checks']} checks ({record['certified']} rows "
          f"certified) in {record['seconds_on']:.1f} s")
    net = on + record["checks"] * record["check_over_pass"]
    print(f"  passes saved {1 - on / off:.1%} ({1 - net / off:.1%} net of the checks at "
          f"{record['check_over_pass']:.2f} passes each); time saved "
          f"{1 - record['seconds_on'] / record['seconds_off']:.1%}")
    stops = ", ".join(f"{k} {v}" for k, v in record["stopped_of_failed"].items())
    quartiles = "/".join(f"{q:.0f}" for q in record["certified_at"])
    print(f"  attacks stopped of the failed ones: {stops}; certified_at min/q1/median/q3/max "
          f"{quartiles}")
    print(f"  outcomes: success equal on {record['success_equal']}/{record['rows']} rows, "
          f"iterations on {record['iterations_equal']}/{record['rows']}")
    print(f"  machine: float32 AlexNet forward + backward to the input at batch "
          f"{settings.batch_size}: {record['rate']:.1f} images/s")


# --------------------------------------------------------------------------- main


def summary(records: pd.DataFrame, max_iter: int) -> pd.DataFrame:
    rows = []
    for (epoch, schedule), group in records.groupby(["epoch", "schedule"], sort=False):
        certified = group[(group["first"] >= 0) & (group["first"] < max_iter)
                          & ~group["crossed"]]
        quartiles = np.percentile(certified["first"], [0, 25, 50, 75, 100]) \
            if len(certified) else [np.nan] * 5
        rows.append({
            "epoch": epoch, "schedule": schedule, "failed": len(group),
            "crossed_in_replay": int(group["crossed"].sum()), "certified": len(certified),
            "k_min": quartiles[0], "k_q1": quartiles[1], "k_median": quartiles[2],
            "k_q3": quartiles[3], "k_max": quartiles[4],
            "passes_saved": int((max_iter - certified["first"]).sum()),
            "max_outside": float(group["outside"].max()),
            "l1_agree": float(np.mean(np.isclose(group["l1"], group["l1_run"], rtol=1e-3))),
        })
    return pd.DataFrame(rows)


def main() -> None:
    args = parse()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.engine:
        engine_timing(args)
        return
    run_dir = Path(args.run_dir)
    settings, results = load_job(run_dir, args.sweep)
    if args.lr0 is not None:
        settings["lr0"] = args.lr0
        if "lr0" in results.columns:  # lr0_sweep.csv: the rows of that lr0
            results = results[np.isclose(results["lr0"], args.lr0)]
    max_iter = settings["max_iter"]
    epochs = args.epochs or [int(results["epoch"].max())]
    records = pd.concat([replay_epoch(run_dir, e, settings, results, args) for e in epochs],
                        ignore_index=True)
    job_passes = int((results["iterations"] + 1).sum())
    epoch_passes = int((results.loc[results["epoch"].isin(epochs), "iterations"] + 1).sum())
    table = summary(records, max_iter)
    pd.set_option("display.width", 160)
    print(f"\nfailed rows replayed: {len(records)}; max_iter {max_iter}; passes of the "
          f"replayed epochs' jobs {epoch_passes}, of the whole main job {job_passes}")
    print(table.to_string(index=False))
    saved = int(table["passes_saved"].sum())
    print(f"passes saved (every update checked): {saved} = {saved / epoch_passes:.3f} of the "
          f"epochs' passes, {saved / job_passes:.3f} of the main job's")
    model = load_checkpoint(run_dir / "train" / f"epoch_{epochs[-1]:02d}.safetensors").eval()
    chosen = results[results["epoch"] == epochs[-1]].head(args.batch_size
                                                         or settings["batch_size"])
    with frozen(model):
        cost = check_cost(model, load_images(run_dir, chosen["image_id"]),
                          torch.from_numpy(chosen["target"].to_numpy(np.int64, copy=True)),
                          args.cost_rounds)
    print(f"cost at batch {cost['batch']}: one check = {cost['check_over_pass']:.2f} forward + "
          f"backward passes (median of {args.cost_rounds} interleaved rounds, pass "
          f"{cost['pass_s'] * 1e3:.0f} ms); preparing the bounds once = "
          f"{cost['build_over_pass']:.2f} passes")
    strategies = strategy_table(records, max_iter, epoch_passes, cost["check_over_pass"])
    print(strategies.to_string(index=False))
    best = strategies.loc[strategies["strategy"] == "predicted /4"].iloc[0]
    print(f"certify_share_saved={saved / epoch_passes:.4f} "
          f"predicted_share_saved_net={best['share_saved_net']:.4f} "
          f"check_over_pass={cost['check_over_pass']:.3f}")


if __name__ == "__main__":
    main()
