"""Where this process sits among the ranks of a torchrun launch, and what the ranks agree on.

:func:`current_launch` reads the process group (a plain process when none is initialised);
:func:`collective_step` runs a step on every rank (or on rank 0) and makes every rank learn
whether any failed, so no rank goes on alone; :func:`broadcast` shares rank 0's value.
``lib.train.loop.fit`` and the launcher ``lib.run.distributed`` both use them.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import traceback
from collections.abc import Callable, Mapping
from typing import TypeVar

import torch.distributed as dist

from lib.errors import BorderlineError, ParameterError

T = TypeVar("T")


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


def current_launch() -> Launch:
    """This process's place in the initialised process group (a plain process when none is)."""
    if not (dist.is_available() and dist.is_initialized()):
        return Launch()
    local = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
    return Launch(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local)


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


def broadcast(launch: Launch, value: T) -> T:
    """Rank 0's ``value`` on every rank."""
    if not launch.distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
