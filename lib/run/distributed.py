"""The attack and training stages on several processes, GPUs or machines, under torchrun.

One machine with K GPUs: ``torchrun --standalone --nproc_per_node=K -m lib.run.distributed
attack --run-dir data/runs/paper --profile paper``; several machines: the same command on every
node with ``--nnodes=N --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 --rdzv-id=JOB`` (see
``examples/slurm_attack.sh``; the run folder must then be on a shared file system). Without
torchrun (``WORLD_SIZE`` unset or 1) the same command runs as one plain process.

**Attack.** Every rank plans the same job (planning is deterministic); rank 0 records the stage
in the manifest, saves the plan and lists the pending chunks; every rank attacks its shard
(:func:`shard_chunks`, balanced by :func:`chunk_costs`) with
:func:`lib.run.attack_stage.run_chunks` on its own device (``cuda:LOCAL_RANK`` with NCCL, or the
CPU with gloo). A chunk is one fresh engine call, so its results are bit-identical on any rank,
and a finished chunk is a file: a rerun with any number of processes attacks only what is
missing. After every step the ranks exchange their outcome
(:func:`lib.run.ranks.collective_step`); if one failed, every rank stops with an error naming it
and nothing is merged; otherwise rank 0 merges the chunks into exactly the tables of a
one-process run.

**Train.** :func:`lib.train.loop.fit`, which trains under DistributedDataParallel when the
process group has several ranks. **Parameters** merge like the stage command's
(:func:`launch_parameters`, by :func:`lib.run.parameters.merged_parameters`: the stage's
defaults, ``--profile``, ``--param name=value``). **The run folder** is held by rank 0 for the
whole stage (:func:`lib.run.lock.hold_run_folder`); a folder another stage holds stops every
rank at once.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import heapq
import math
import os
import sys
from collections.abc import Hashable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pandas as pd
import torch
import torch.distributed as dist

from lib.attack import plan
from lib.checking import check_int
from lib.errors import BorderlineError, ParameterError, RunFolderError
from lib.run import layout, lock, pipeline, ranks
from lib.run.attack_stage import (
    ModelLoader,
    merge,
    pending_chunks,
    plan_job,
    run_chunks,
    save_plan,
)
from lib.run.layout import ATTACK_STAGE, TRAIN_STAGE
from lib.run.parameters import merged_parameters, parse_value, stage_settings

Key = TypeVar("Key", bound=Hashable)


# --------------------------------------------------------------------------- cost model

#: Expected iterations of one attack as a share of ``max_iter``, per schedule. Step and
#: exponential decay have a bounded sum of steps (2 lr0 and about 2.5 lr0), so many of their
#: attacks never reach the target and run the whole budget; the others usually flip the class
#: after a small fraction of it (about 11 of 100 iterations on average in the attack benchmark,
#: make bench). A schedule not listed here is assumed to run the whole budget.
ITERATION_SHARE: dict[str, float] = {
    "constant": 0.2, "iteration": 0.2, "loss-adaptive": 0.2, "step": 1.0, "exponential": 1.0,
}


def chunk_costs(job: plan.AttackJob, chunks: pd.DataFrame) -> dict[tuple[str, int], float]:
    """Expected cost of each chunk, in model passes (forward + backward of one image).

    An attack costs ``ITERATION_SHARE[schedule] * max_iter + 1`` passes (the +1 is the final
    check of the class); a chunk costs the sum over its rows. Only the relative sizes matter:
    they decide the sharding, never the results.

    Args:
        job: from :func:`lib.run.attack_stage.plan_job`.
        chunks: rows of ``job.chunks`` (e.g. the pending ones).

    Returns:
        ``{(part, chunk): cost > 0}`` in the order of ``chunks``.
    """
    max_iter = job.settings.max_iter
    share = job.rows["schedule"].map(lambda name: ITERATION_SHARE.get(name, 1.0))
    per_row = share.to_numpy(float) * max_iter + 1
    totals = pd.Series(per_row).groupby(
        [job.rows["part"].to_numpy(), job.rows["chunk"].to_numpy()]
    ).sum()
    return {(str(p), int(c)): float(totals.loc[(p, c)])
            for p, c in zip(chunks["part"], chunks["chunk"], strict=True)}


def shard_chunks(chunk_costs: Mapping[Key, float], world_size: int) -> list[list[Key]]:
    """Split chunks over ``world_size`` ranks, balancing the expected cost (greedy LPT).

    The most expensive chunk goes first, each to the rank with the least cost so far (ties:
    the lower rank; equal costs keep the input order), so the result is the same on every rank.
    The heaviest shard exceeds the mean by less than the largest chunk cost.

    Args:
        chunk_costs: ``{chunk key: expected cost >= 0}``; the order of the mapping is the order
            of work.
        world_size: number of ranks >= 1.

    Returns:
        ``world_size`` lists; list ``r`` holds rank r's chunk keys in input order. Every key is
        in exactly one list (a list may be empty when there are fewer chunks than ranks).
    """
    check_int(world_size, "world_size", low=1)
    keys = list(chunk_costs)
    costs = [float(chunk_costs[k]) for k in keys]
    bad = [k for k, c in zip(keys, costs, strict=True) if not (math.isfinite(c) and c >= 0)]
    if bad:
        raise ParameterError(f"chunk costs must be finite and >= 0; {bad[0]!r} has "
                             f"{chunk_costs[bad[0]]!r}")
    order = sorted(range(len(keys)), key=lambda i: (-costs[i], i))
    loads = [(0.0, rank) for rank in range(world_size)]  # a heap of (cost so far, rank)
    owner = [0] * len(keys)
    for i in order:
        load, rank = heapq.heappop(loads)
        owner[i] = rank
        heapq.heappush(loads, (load + costs[i], rank))
    return [[k for k, r in zip(keys, owner, strict=True) if r == rank]
            for rank in range(world_size)]


# --------------------------------------------------------------------------- processes


@contextlib.contextmanager
def process_group(launch: ranks.Launch, device: str, *, timeout_minutes: float) -> Iterator[None]:
    """Join torchrun's process group (NCCL on CUDA, gloo on the CPU) for the block; a plain
    process joins nothing.

    ``timeout_minutes`` bounds how long a rank waits for the others at a collective; a rank
    that finished its shard waits for the slowest one, so make it longer than a whole shard.
    """
    if not launch.distributed:
        yield
        return
    cuda = str(device).startswith("cuda")
    if cuda:
        torch.cuda.set_device(torch.device(device))
    dist.init_process_group(backend="nccl" if cuda else "gloo",
                            timeout=_dt.timedelta(minutes=timeout_minutes))
    try:
        yield
    finally:
        dist.destroy_process_group()


# --------------------------------------------------------------------------- parameters


def launch_parameters(
    stage: str,
    *,
    run_dir: str | os.PathLike[str] | None = None,
    profile: str | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A stage's parameters under this launcher, as its notebook would see them under
    papermill.

    The stage's defaults, then the profile's values for the stage, then ``overrides``, then
    ``run_dir`` (when given), merged by :func:`lib.run.parameters.merged_parameters`. Names the
    stage does not have, and values of the wrong type, raise :class:`ParameterError`.
    """
    overrides = dict(overrides or {})
    if run_dir is not None:
        overrides["run_dir"] = str(run_dir)
    values = merged_parameters(stage, profile=profile, overrides=overrides, with_defaults=True)
    if not values.get("run_dir"):
        raise ParameterError("no run folder: pass --run-dir (or a profile that names run_dir)")
    return values


def parse_params(pairs: Sequence[str]) -> dict[str, Any]:
    """``name=value`` strings; values read by :func:`lib.run.parameters.parse_value`, as
    ``lib.run.pipeline run -p`` reads them."""
    values = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name.strip():
            raise ParameterError(f"--param expects name=value, got {pair!r}")
        values[name.strip()] = parse_value(name.strip(), value)
    return values


def _record_stage(stage: str, parameters: Mapping[str, Any]) -> None:
    """Check and record the parameters in the run folder's manifest, as the notebook does
    (only for run folders the pipeline manages, i.e. with a ``manifest.json``)."""
    run_dir = Path(parameters["run_dir"])
    if not layout.manifest_file(run_dir).is_file():
        return
    pipeline.start_stage(stage, run_dir=run_dir, parameters=parameters,
                         overwrite=bool(parameters.get("overwrite", False)))


@contextlib.contextmanager
def _holding(launch: ranks.Launch, run_dir: Path, stage: str) -> Iterator[None]:
    """Rank 0 holds the run folder's lock for the block; every rank learns if it could not.
    A missing folder is not created here: the stage's own checks report it."""
    held = contextlib.ExitStack()
    if not run_dir.is_dir():
        yield
        return
    with held:
        ranks.collective_step(launch, "locking the run folder",
                        lambda: held.enter_context(lock.hold_run_folder(run_dir, stage)),
                        main_only=True)
        yield


# --------------------------------------------------------------------------- the attack stage


def attack_stage(
    parameters: Mapping[str, Any],
    *,
    launch: ranks.Launch | None = None,
    progress: bool = True,
    load_model: ModelLoader | None = None,
) -> plan.AttackJob:
    """The attack stage on this rank (a plain process when ``launch`` is None), inside
    :func:`process_group` on every rank; see the module docstring for the steps.

    ``parameters`` come from :func:`launch_parameters`; ``load_model`` goes to
    :func:`lib.run.attack_stage.run_chunks` (tests use small models). Returns the job, its tables
    merged under the run folder's ``attack/``. Raises RankFailure under torchrun when any
    rank failed (on every rank), or what the stage raises in a plain process.
    """
    launch = launch or ranks.launch_from_env()
    run_dir = Path(parameters["run_dir"])
    device = ranks.rank_device(launch, parameters.get("device", "cpu"))
    settings = stage_settings(ATTACK_STAGE, parameters)

    ranks.collective_step(launch, "checking the run folder's manifest",
                    lambda: _record_stage(ATTACK_STAGE, parameters), main_only=True)
    job = ranks.collective_step(launch, "planning the job",
                          lambda: plan_job(run_dir, settings))
    ranks.collective_step(launch, "saving the plan", lambda: save_plan(job, run_dir),
                    main_only=True)
    # rank 0's view of the finished chunks, so every rank shards the same list
    pending = ranks.broadcast(launch, pending_chunks(job, run_dir) if launch.is_main
                         else None)
    costs = chunk_costs(job, pending)
    shards = shard_chunks(costs, launch.world_size)
    if launch.is_main and launch.distributed:
        shares = [sum(costs[k] for k in shard) for shard in shards]
        total = sum(shares) or 1.0
        print(f"{len(pending)} of {len(job.chunks)} chunks pending; " + ", ".join(
            f"rank {r} takes {len(s)} ({shares[r] / total:.0%} of the expected cost)"
            for r, s in enumerate(shards)), flush=True)
    ranks.collective_step(
        launch, "attacking its chunks",
        lambda: run_chunks(job, run_dir, chunks=shards[launch.rank], device=device,
                                      progress=progress and launch.is_main,
                                      load_model=load_model),
    )
    ranks.collective_step(launch, "merging the chunks", lambda: _merge(job, run_dir, launch),
                    main_only=True)
    return job


def _merge(job: plan.AttackJob, run_dir: Path, launch: ranks.Launch) -> None:
    missing = pending_chunks(job, run_dir)
    if launch.distributed and not missing.empty:
        raise RunFolderError(
            f"every rank finished, yet rank 0 sees {len(missing)} chunk(s) without results in "
            f"{layout.attack_dir(run_dir) / layout.CHUNK_DIR}: on several machines the "
            "run folder must be on a file system that every node shares"
        )
    merge(job, run_dir)


# --------------------------------------------------------------------------- training


def train_stage(
    parameters: Mapping[str, Any],
    *,
    launch: ranks.Launch | None = None,
    progress: bool = True,
) -> pd.DataFrame | None:
    """The training stage on this rank: :func:`lib.train.loop.fit` for every seed, one model
    after the other, each into its own folder; it trains under DistributedDataParallel when a
    process group with several ranks is initialised.

    Returns:
        Every model's ``metrics.csv`` with the model column, on rank 0 (None on the other
        ranks).
    """
    from lib.run import data_stage
    from lib.train.loop import fit

    launch = launch or ranks.launch_from_env()
    run_dir = Path(parameters["run_dir"])
    device = ranks.rank_device(launch, parameters.get("device", "cpu"))
    ranks.collective_step(launch, "checking the run folder's manifest",
                    lambda: _record_stage(TRAIN_STAGE, parameters), main_only=True)
    splits = ranks.collective_step(launch, "reading the data", lambda: {
        split: data_stage.load_run_split(run_dir, split) for split in ("train", "test")})
    settings = stage_settings(TRAIN_STAGE, parameters)
    hyper = {name: getattr(settings, name) for name in (
        "epochs", "batch_size", "lr", "lr_decay", "momentum", "weight_decay", "augment",
        "balance", "precision",
    )}
    hyper["weights_path"] = settings.weights_path or None
    metrics = [fit(splits["train"], splits["test"], out_dir=layout.model_dir(run_dir, seed),
                   seed=seed, device=device, progress=progress, **hyper)
               for seed in settings.seeds]
    if not launch.is_main:
        return None
    return pd.concat([m.assign(model=seed) for seed, m in zip(settings.seeds, metrics,
                                                               strict=True)], ignore_index=True)


# --------------------------------------------------------------------------- command line


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="torchrun [...] -m lib.run.distributed",
        description="Run a stage on every rank of a torchrun launch (or as one plain process).",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    for name, stage in (("attack", ATTACK_STAGE), ("train", TRAIN_STAGE)):
        sub = commands.add_parser(name, help=f"the {stage} stage")
        sub.add_argument("--run-dir",
                         help="the run folder (default: the profile's, else the stage's default)")
        sub.add_argument("--profile", help="profiles/<name>.yaml: its parameters for the stage")
        sub.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                         help="a stage parameter (repeatable)")
        sub.add_argument("--threads", type=int, default=0,
                         help="torch threads per process (default: torch's choice)")
        sub.add_argument("--timeout-minutes", type=float, default=24 * 60,
                         help="how long a rank waits for the others at a step (default 1440)")
        sub.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    stage = {"attack": ATTACK_STAGE, "train": TRAIN_STAGE}[args.command]
    try:
        launch = ranks.launch_from_env()
        parameters = launch_parameters(stage, run_dir=args.run_dir, profile=args.profile,
                                      overrides=parse_params(args.param))
        device = ranks.rank_device(launch, parameters.get("device", "cpu"))
        with process_group(launch, device, timeout_minutes=args.timeout_minutes), \
                _holding(launch, Path(parameters["run_dir"]), stage):
            run = attack_stage if args.command == "attack" else train_stage
            run(parameters, launch=launch, progress=not args.no_progress)
    except BorderlineError as error:
        if ranks.launch_from_env().is_main or not isinstance(error, ranks.RankFailure):
            print(f"error: {error}", file=sys.stderr)
        else:
            print("error: stopping with the other ranks (rank 0 reports why)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

