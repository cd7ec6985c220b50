"""The attack stage (and training) on several processes, GPUs or machines, launched by torchrun.

One machine with K GPUs::

    torchrun --standalone --nproc_per_node=K -m lib.distributed attack \\
        --run-dir data/runs/paper --profile paper

Several machines (the same command on every node; see ``examples/slurm_attack.sh``)::

    torchrun --nnodes=N --nproc_per_node=K --rdzv-backend=c10d \\
        --rdzv-endpoint=HOST:29500 --rdzv-id=JOB -m lib.distributed attack --run-dir ...

Without torchrun (``WORLD_SIZE`` unset or 1) the same command runs as one plain process.

**Attack.** Every rank plans the same job from the run folder (planning is deterministic);
rank 0 checks the run folder's manifest and saves the plan; rank 0 lists the chunks still
pending and every rank takes its shard of them (:func:`shard_chunks`, balanced by the expected
cost of :func:`chunk_costs`) and attacks it with :func:`lib.robustness.run_chunks` on its own
device (``cuda:LOCAL_RANK`` with NCCL, or the CPU with gloo). A chunk is one fresh engine call,
so its results are bit-identical on whichever rank it runs, and a finished chunk is a file:
an interrupted run, rerun with any number of processes, attacks only what is missing. After
every step the ranks exchange their outcome; if one failed, every rank stops with an error
naming it and nothing is merged. Otherwise rank 0 merges the chunks into exactly the tables a
one-process run writes. On several machines the run folder must be on a shared file system.

**Settings** come from where the stage notebook's come from: the notebook's defaults
(``notebooks/03_attack.py``), then the profile (``--profile``), then ``--param name=value``
(values read as YAML, like ``lib.pipeline run -p``). When the run folder has a manifest, rank 0
records and checks them exactly as the notebook does, so running ``03_attack`` afterwards with
the same parameters finds every chunk done and only merges and reports.

**Train.** ``train`` runs the training stage; with ``WORLD_SIZE > 1`` the model is wrapped in
DistributedDataParallel and each rank trains on its part of every batch (see :func:`fit_ddp`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as _dt
import functools
import heapq
import math
import os
import socket
import sys
import traceback
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist

from lib import NUM_CLASSES, pipeline, robustness
from lib.errors import BorderlineError, ParameterError, RunFolderError

Key = TypeVar("Key", bound=Hashable)
T = TypeVar("T")

ATTACK_STAGE = "03_attack"
TRAIN_STAGE = "02_train"

# --------------------------------------------------------------------------- cost model

#: Expected iterations of one attack as a share of ``max_iter``, per schedule. Step and
#: exponential decay have a bounded sum of steps (2 lr0 and about 2.5 lr0), so many of their
#: attacks never reach the target and run the whole budget; the others usually flip the class
#: after a small fraction of it (11 of 100 iterations on average in the measurement of
#: TOOLCHAIN.md). A schedule not listed here is assumed to run the whole budget.
ITERATION_SHARE: dict[str, float] = {
    "constant": 0.2,
    "iteration": 0.2,
    "loss-adaptive": 0.2,
    "step": 1.0,
    "exponential": 1.0,
}


def chunk_costs(job: robustness.AttackJob, chunks: pd.DataFrame) -> dict[tuple[str, int], float]:
    """Expected cost of each chunk, in model passes (forward + backward of one image).

    An attack costs ``ITERATION_SHARE[schedule] * max_iter + 1`` passes (the +1 is the final
    check of the class); a chunk costs the sum over its rows. Only the relative sizes matter:
    they decide the sharding, never the results.

    Args:
        job: from :func:`lib.robustness.plan_job`.
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
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ParameterError(f"world_size must be an int >= 1, got {world_size!r}")
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


def scaling_estimate(
    *,
    passes: float,
    passes_per_second: float,
    devices: Sequence[int],
    largest_chunk_passes: float = 0.0,
    startup_seconds: float = 0.0,
) -> pd.DataFrame:
    """Expected wall time and speed-up of the attack stage on K devices (for the book).

    The stage's work is ``passes`` model passes (``sum(iterations + 1)`` over every attack:
    measured, or ``attacks * (mean iterations + 1)``); one device does ``passes_per_second``
    (measured on one device at the stage's batch size). Sharded by :func:`shard_chunks`, the
    slowest of K devices does at most ``passes / K + largest_chunk_passes``; each process also
    pays ``startup_seconds`` (imports, reading the test split, loading checkpoints).

    Returns:
        One row per K: ``devices``, ``seconds`` (expected: perfect balance), ``seconds_worst``
        (the balance bound), ``speedup`` and ``speedup_worst`` against one device, and
        ``efficiency`` (``speedup / K``).
    """
    if passes_per_second <= 0 or passes < 0:
        raise ParameterError("passes must be >= 0 and passes_per_second > 0")
    rows = []
    one = startup_seconds + passes / passes_per_second
    for k in devices:
        if k < 1:
            raise ParameterError(f"device counts must be >= 1, got {k}")
        spread = largest_chunk_passes if k > 1 else 0.0
        seconds = startup_seconds + passes / k / passes_per_second
        worst = startup_seconds + (passes / k + spread) / passes_per_second
        rows.append({"devices": k, "seconds": seconds, "seconds_worst": worst,
                     "speedup": one / seconds, "speedup_worst": one / worst,
                     "efficiency": one / seconds / k})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- processes


@dataclasses.dataclass(frozen=True)
class Launch:
    """Where this process sits in a torchrun launch (``world_size == 1``: a plain process)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launch_from_env(environ: Mapping[str, str] | None = None) -> Launch:
    """The launch that torchrun describes in ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``."""
    environ = os.environ if environ is None else environ
    if "WORLD_SIZE" not in environ:
        return Launch()
    try:
        launch = Launch(rank=int(environ.get("RANK", 0)), world_size=int(environ["WORLD_SIZE"]),
                        local_rank=int(environ.get("LOCAL_RANK", 0)))
    except ValueError as error:
        raise ParameterError(
            f"RANK, WORLD_SIZE and LOCAL_RANK must be integers ({error})") from None
    if not (launch.world_size >= 1 and 0 <= launch.rank < launch.world_size):
        raise ParameterError(
            f"inconsistent launch: RANK={launch.rank}, WORLD_SIZE={launch.world_size}")
    return launch


def rank_device(launch: Launch, device: str) -> str:
    """This rank's device: ``cuda:LOCAL_RANK`` when ``device`` is a CUDA device and several
    processes share the machine, otherwise ``device`` unchanged."""
    if launch.distributed and str(device).startswith("cuda"):
        return f"cuda:{launch.local_rank}"
    return str(device)


@contextlib.contextmanager
def process_group(launch: Launch, device: str, *, timeout_minutes: float) -> Iterator[None]:
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


class RankFailure(BorderlineError):
    """One or more ranks of a distributed stage failed; the message names each with its error."""


def _agree(launch: Launch, step: str, error: str | None) -> None:
    """Every rank learns every rank's outcome of ``step``; raise RankFailure if any failed."""
    outcomes = [None] * launch.world_size
    dist.all_gather_object(outcomes, (socket.gethostname(), error))
    failed = [(rank, host, message) for rank, (host, message) in enumerate(outcomes) if message]
    if failed:
        if len(failed) == launch.world_size and len({m for _, _, m in failed}) == 1:
            lines = [f"every rank (0-{launch.world_size - 1}) failed while {step}: {failed[0][2]}"]
        else:
            lines = [f"rank {rank} (on {host}) failed while {step}: {message}"
                     for rank, host, message in failed]
        raise RankFailure(
            "\n".join(lines) + f"\nThe stage stopped on all {launch.world_size} ranks and merged "
            "nothing. Chunks finished by any rank are kept: fix the cause and run the same "
            "command again (with any number of processes) to attack only what is missing."
        )


def collective_step(launch: Launch, step: str, action: Callable[[], T], *,
                    main_only: bool = False) -> T | None:
    """Run ``action`` (on rank 0 only if ``main_only``), then agree on the outcome.

    A plain process runs ``action`` and lets its exception through unchanged. Under torchrun
    an exception is printed with its traceback on the failing rank, and every rank raises
    :class:`RankFailure` naming the failed ranks, so no rank goes on alone.
    """
    if not launch.distributed:
        return action()
    value, error = None, None
    if launch.is_main or not main_only:
        try:
            value = action()
        except Exception as exc:  # reported to every rank below
            traceback.print_exc()
            error = f"{type(exc).__name__}: {exc}"
    _agree(launch, step, error)
    return value


def _broadcast(launch: Launch, value: T) -> T:
    """Rank 0's ``value`` on every rank."""
    if not launch.distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# --------------------------------------------------------------------------- parameters


def stage_parameters(
    stage: str,
    *,
    run_dir: str | os.PathLike[str] | None = None,
    profile: str | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A stage's parameters as its notebook would see them under papermill.

    The notebook's defaults, then the profile's values for the stage, then ``overrides``, then
    ``run_dir`` (when given). Names the notebook does not have, and values of the wrong type,
    raise :class:`ParameterError` (the notebook's own check).
    """
    values: dict[str, Any] = {}
    has_notebook = pipeline.notebook_path(stage).exists()
    if has_notebook:
        values.update(_notebook_defaults(stage))
    if profile:
        values.update(pipeline.load_profile(profile)[stage])
    values.update(overrides or {})
    if run_dir is not None:
        values["run_dir"] = str(run_dir)
    if has_notebook:
        pipeline.check_parameter_types(stage, values)
    if not values.get("run_dir"):
        raise ParameterError("no run folder: pass --run-dir (or a profile that names run_dir)")
    return values


@functools.lru_cache
def _notebook_defaults(stage: str) -> dict[str, Any]:
    return pipeline.notebook_defaults(stage)  # parsing the notebook takes a second or two


def attack_settings(parameters: Mapping[str, Any]) -> robustness.AttackSettings:
    """The :class:`lib.robustness.AttackSettings` of the attack stage's parameters.

    Parameters named like a settings field set it; runtime ones (``run_dir``, ``device``,
    ``overwrite``, ``progress``, ...) do not change what is computed. Any other name is an
    error, so a misspelt parameter never passes silently.
    """
    fields = {f.name for f in dataclasses.fields(robustness.AttackSettings)}
    known = fields | pipeline.RUNTIME_PARAMETERS
    if pipeline.notebook_path(ATTACK_STAGE).exists():
        known |= set(_notebook_defaults(ATTACK_STAGE))
    unknown = sorted(set(parameters) - known)
    if unknown:
        raise ParameterError(
            f"unknown attack parameter(s) {', '.join(unknown)}; the settings are "
            f"{', '.join(sorted(fields))}"
        )
    return robustness.AttackSettings(**{k: v for k, v in parameters.items() if k in fields})


def _record_stage(stage: str, parameters: Mapping[str, Any]) -> None:
    """Check and record the parameters in the run folder's manifest, as the notebook does
    (only for run folders the pipeline manages, i.e. with a ``manifest.json``)."""
    run_dir = Path(parameters["run_dir"])
    if not (run_dir / "manifest.json").is_file() or not pipeline.notebook_path(stage).exists():
        return
    pipeline.start_stage(stage, run_dir=run_dir, parameters=parameters,
                         overwrite=bool(parameters.get("overwrite", False)))


# --------------------------------------------------------------------------- the attack stage


def attack_stage(
    parameters: Mapping[str, Any],
    *,
    launch: Launch | None = None,
    progress: bool = True,
    load_model: robustness.ModelLoader | None = None,
) -> robustness.AttackJob:
    """The attack stage on this rank of a launch (a plain process when ``launch`` is None).

    Call on every rank inside :func:`process_group`. See the module docstring for the steps.

    Args:
        parameters: from :func:`stage_parameters` (``run_dir``, ``device`` and the settings).
        launch: this process's place; default :func:`launch_from_env`.
        progress: a tqdm bar on rank 0 (over its own shard).
        load_model: passed to :func:`lib.robustness.run_chunks` (tests use small models).

    Returns:
        The job; its tables are merged under ``<run_dir>/attack/`` once every rank returns.

    Raises:
        RankFailure: under torchrun, any rank failed (every rank raises it).
        BorderlineError: in a plain process, what the stage raises.
    """
    launch = launch or launch_from_env()
    run_dir = Path(parameters["run_dir"])
    device = rank_device(launch, parameters.get("device", "cpu"))
    settings = attack_settings(parameters)

    collective_step(launch, "checking the run folder's manifest",
                    lambda: _record_stage(ATTACK_STAGE, parameters), main_only=True)
    job = collective_step(launch, "planning the job",
                          lambda: robustness.plan_job(run_dir, settings))
    collective_step(launch, "saving the plan", lambda: robustness.save_plan(job, run_dir),
                    main_only=True)
    # rank 0's view of the finished chunks, so every rank shards the same list
    pending = _broadcast(launch, robustness.pending_chunks(job, run_dir) if launch.is_main
                         else None)
    costs = chunk_costs(job, pending)
    shards = shard_chunks(costs, launch.world_size)
    if launch.is_main and launch.distributed:
        shares = [sum(costs[k] for k in shard) for shard in shards]
        total = sum(shares) or 1.0
        print(f"{len(pending)} of {len(job.chunks)} chunks pending; " + ", ".join(
            f"rank {r} takes {len(s)} ({shares[r] / total:.0%} of the expected cost)"
            for r, s in enumerate(shards)), flush=True)
    collective_step(
        launch, "attacking its chunks",
        lambda: robustness.run_chunks(job, run_dir, chunks=shards[launch.rank], device=device,
                                      progress=progress and launch.is_main,
                                      load_model=load_model),
    )
    collective_step(launch, "merging the chunks", lambda: _merge(job, run_dir, launch),
                    main_only=True)
    return job


def _merge(job: robustness.AttackJob, run_dir: Path, launch: Launch) -> None:
    missing = robustness.pending_chunks(job, run_dir)
    if launch.distributed and not missing.empty:
        raise RunFolderError(
            f"every rank finished, yet rank 0 sees {len(missing)} chunk(s) without results in "
            f"{robustness.attack_dir(run_dir) / robustness.CHUNK_DIR}: on several machines the "
            "run folder must be on a file system that every node shares"
        )
    robustness.merge(job, run_dir)


# --------------------------------------------------------------------------- training


def train_stage(
    parameters: Mapping[str, Any],
    *,
    launch: Launch | None = None,
    progress: bool = True,
) -> pd.DataFrame | None:
    """The training stage on this rank: :func:`lib.training.fit` in a plain process,
    :func:`fit_ddp` under torchrun with several processes.

    Returns:
        ``metrics.csv`` as a DataFrame on rank 0 (None on the other ranks).
    """
    from lib import datasets, training

    launch = launch or launch_from_env()
    run_dir = Path(parameters["run_dir"])
    device = rank_device(launch, parameters.get("device", "cpu"))
    collective_step(launch, "checking the run folder's manifest",
                    lambda: _record_stage(TRAIN_STAGE, parameters), main_only=True)
    splits = collective_step(launch, "reading the data", lambda: {
        split: datasets.load_run_split(run_dir, split) for split in ("train", "test")})
    hyper = {name: parameters[name] for name in (
        "epochs", "batch_size", "lr", "momentum", "weight_decay", "augment", "balance", "seed",
    ) if name in parameters}
    hyper["weights_path"] = parameters.get("weights_path") or None
    out_dir = run_dir / pipeline.STAGE_OUTPUTS[TRAIN_STAGE]
    if not launch.distributed:
        return training.fit(splits["train"], splits["test"], out_dir=out_dir, device=device,
                            progress=progress, **hyper)
    return fit_ddp(splits["train"], splits["test"], out_dir=out_dir, launch=launch,
                   device=device, progress=progress, **hyper)


def fit_ddp(
    train_set: Any,
    test_set: Any,
    *,
    out_dir: str | os.PathLike[str],
    launch: Launch,
    epochs: int = 10,
    batch_size: int = 64,
    lr: float = 0.01,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    augment: bool = True,
    balance: str = "weights",
    seed: int = 0,
    device: str = "cpu",
    weights_path: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> pd.DataFrame | None:
    """:func:`lib.training.fit` with DistributedDataParallel: same arguments, same files.

    Call on every rank inside :func:`process_group`. ``batch_size`` stays the *global* batch:
    each epoch's order is the one a single process draws (from ``(seed, epoch)``), and a
    DistributedSampler over it gives rank r the images ``r, r + K, ...`` of every batch of
    ``batch_size`` (so ``batch_size`` must be divisible by K). DDP averages the gradients, so
    each step sees the same images as in one process. What differs: augmentation and dropout
    draw from per-rank streams, and float sums are ordered differently, so the checkpoints are
    not bit-identical to one process (they are, on the CPU, for a fixed K). Rank 0 writes every
    file and evaluates the whole test split; a run continues from its last finished epoch like
    :func:`~lib.training.fit`, with any K. (Logged step losses are the mean over ranks.)

    Returns:
        ``metrics.csv`` as a DataFrame on rank 0, None on the other ranks.
    """
    from torch.nn.parallel import DistributedDataParallel
    from torch.utils.data import DataLoader, Subset
    from torch.utils.data.distributed import DistributedSampler
    from tqdm import tqdm

    from lib import training
    from lib.model import check_image_size, resolve_device

    world, rank = launch.world_size, launch.rank
    training._check_hyperparameters(
        epochs=epochs, batch_size=batch_size, lr=lr, momentum=momentum,
        weight_decay=weight_decay, augment=augment, balance=balance, seed=seed, num_workers=0,
    )  # fmt: skip
    if batch_size % world:
        raise ParameterError(
            f"batch_size={batch_size} is not divisible by the {world} processes; choose a "
            f"multiple of {world} (each process takes batch_size / {world} images per step)"
        )
    device = resolve_device(device)
    image_size = training._image_size(train_set, "train_set")
    check_image_size(image_size)
    train_labels = training._labels(train_set, "train_set")
    out_dir = Path(out_dir)
    # the same record as fit's, so the plain path (and 02_train) continue this run
    params = {
        "batch_size": batch_size, "lr": lr, "momentum": momentum, "weight_decay": weight_decay,
        "augment": augment, "balance": balance, "seed": seed, "image_size": image_size,
        "num_classes": NUM_CLASSES,
        "weights_path": None if weights_path is None else str(weights_path),
        "train_data": training._fingerprint(train_set),
        "test_data": training._fingerprint(test_set),
    }  # fmt: skip
    out_dir.mkdir(parents=True, exist_ok=True)
    collective_step(launch, "checking train/",
                    lambda: training._prepare_run_folder(out_dir, params), main_only=True)
    finished = _broadcast(launch, training._finished_epochs(out_dir) if launch.is_main else None)
    if finished >= epochs:
        return (training._read_tables(out_dir, up_to_epoch=epochs)["metrics"].reset_index(drop=True)
                if launch.is_main else None)
    done = _broadcast(launch, training._resumable_epoch(out_dir, finished)
                      if launch.is_main else None)
    tables = training._read_tables(out_dir, up_to_epoch=done) if launch.is_main else None
    model, optimizer = training._start_or_resume(
        out_dir, done=done, seed=seed, weights_path=weights_path, device=device,
        lr=lr, momentum=momentum, weight_decay=weight_decay,
    )  # fmt: skip
    ddp = DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None)
    criterion = torch.nn.CrossEntropyLoss(
        weight=training.class_weights(train_labels).to(device) if balance == "weights" else None
    )
    steps_per_epoch = math.ceil(len(train_set) / batch_size)
    for epoch in range(done + 1, epochs + 1):
        order = list(training._train_loader(
            train_set, train_labels, epoch=epoch, seed=seed, batch_size=batch_size,
            balance=balance, num_workers=0,
        ).sampler)  # fmt: skip
        ordered = Subset(train_set, order)
        sampler = DistributedSampler(ordered, num_replicas=world, rank=rank, shuffle=False)
        loader = DataLoader(ordered, batch_size=batch_size // world, sampler=sampler)
        augment_generator = (torch.Generator().manual_seed(
            _rank_seed(training._stream_seed(seed, epoch, "augment"), rank)) if augment else None)
        bar = tqdm(loader, desc=f"epoch {epoch}/{epochs}",
                   disable=not (progress and launch.is_main))
        with torch.random.fork_rng(**training._fork_kwargs(device)):
            torch.manual_seed(_rank_seed(training._stream_seed(seed, epoch, "dropout"), rank))
            step_losses = training._train_epoch(ddp, optimizer, criterion, bar, device=device,
                                                generator=augment_generator)
        everyone = [None] * world
        dist.all_gather_object(everyone, step_losses)
        finish = functools.partial(
            _finish_epoch, model, optimizer, test_set, tables, out_dir,
            _mean_step_losses(everyone), epoch=epoch, batch_size=batch_size, device=device,
            first_step=(epoch - 1) * steps_per_epoch + 1, progress=progress,
        )  # fmt: skip
        collective_step(launch, f"saving and evaluating epoch {epoch}", finish, main_only=True)
    return tables["metrics"].reset_index(drop=True) if launch.is_main else None


def _finish_epoch(model, optimizer, test_set, tables, out_dir: Path, step_losses, *, epoch: int,
                  batch_size: int, device, first_step: int, progress: bool) -> None:
    """Rank 0's end of an epoch, in fit's order: checkpoint, optimizer, evaluation, tables."""
    from tqdm import tqdm

    from lib import training
    from lib.model import save_checkpoint

    save_checkpoint(model, training._checkpoint_path(out_dir, epoch))
    training._save_optimizer(optimizer, out_dir / f"optimizer_{epoch:02d}.safetensors")
    evaluation = training.evaluate(model, test_set, batch_size=batch_size, device=device,
                                   epoch=epoch, progress=progress)
    evaluation["losses"] = training._losses_table(step_losses, epoch=epoch, first_step=first_step)
    evaluation["metrics"]["train_loss"] = training._mean_loss(step_losses)
    training._append_tables(out_dir, tables, evaluation)
    (out_dir / f"optimizer_{epoch - 1:02d}.safetensors").unlink(missing_ok=True)
    if progress:
        tqdm.write(training._epoch_summary(evaluation["metrics"].iloc[0]))


def _mean_step_losses(per_rank: Sequence[Sequence[tuple[float, int]]]) -> list[tuple[float, int]]:
    """Per step, the loss averaged over ranks (weighted by their batch sizes), and the size."""
    steps = min(len(losses) for losses in per_rank)
    merged = []
    for step in range(steps):
        pairs = [losses[step] for losses in per_rank]
        size = sum(n for _, n in pairs)
        merged.append((sum(loss * n for loss, n in pairs) / size, size))
    return merged


def _rank_seed(seed: int, rank: int) -> int:
    """A seed for ``rank`` derived from ``seed``; rank streams are independent."""
    state = np.random.SeedSequence([seed, rank]).generate_state(2)
    return int((int(state[0]) << 32 | int(state[1])) >> 1)


# --------------------------------------------------------------------------- command line


def _parse_params(pairs: Sequence[str]) -> dict[str, Any]:
    """``name=value`` strings; values read as YAML, as ``lib.pipeline run -p`` reads them."""
    import yaml

    values = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name.strip():
            raise ParameterError(f"--param expects name=value, got {pair!r}")
        values[name.strip()] = yaml.safe_load(value)
    return values


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="torchrun [...] -m lib.distributed",
        description="Run a stage on every rank of a torchrun launch (or as one plain process).",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    for name, stage in (("attack", ATTACK_STAGE), ("train", TRAIN_STAGE)):
        sub = commands.add_parser(name, help=f"the {stage} stage")
        sub.add_argument("--run-dir", help="the run folder (default: the profile's or notebook's)")
        sub.add_argument("--profile", help="profiles/<name>.yaml: its parameters for the stage")
        sub.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                         help="a stage parameter, as the notebook names it (repeatable)")
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
        launch = launch_from_env()
        parameters = stage_parameters(stage, run_dir=args.run_dir, profile=args.profile,
                                      overrides=_parse_params(args.param))
        device = rank_device(launch, parameters.get("device", "cpu"))
        with process_group(launch, device, timeout_minutes=args.timeout_minutes):
            run = attack_stage if args.command == "attack" else train_stage
            run(parameters, launch=launch, progress=not args.no_progress)
    except BorderlineError as error:
        if launch_from_env().is_main or not isinstance(error, RankFailure):
            print(f"error: {error}", file=sys.stderr)
        else:
            print("error: stopping with the other ranks (rank 0 reports why)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())


def measure_pass_rate(
    model: torch.nn.Module,
    *,
    image_size: int,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    repeats: int = 3,
) -> float:
    """Forward + backward-to-input passes per second of ``model`` with frozen weights.

    The rate the attack engine can reach at ``batch_size`` (one pass = one image through one
    attack iteration): the median of ``repeats`` timed batches after one warm-up batch.

    Args:
        model: takes images [B, 3, S, S] in [0, 1]; its weights are frozen for the measurement
            and restored afterwards.
        image_size: S, the side of the square random images used.
    """
    import time

    device = torch.device(device)
    flags = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)
    images = torch.rand(batch_size, 3, image_size, image_size, device=device)
    times = []
    try:
        for i in range(repeats + 1):
            x = images.clone().requires_grad_(True)
            start = time.perf_counter()
            model(x).logsumexp(dim=1).sum().backward()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i:
                times.append(time.perf_counter() - start)
    finally:
        for parameter, flag in zip(model.parameters(), flags, strict=True):
            parameter.requires_grad_(flag)
    return batch_size / sorted(times)[len(times) // 2]
