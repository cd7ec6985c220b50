"""The training stage's settings: the hyperparameters of one training run.

:class:`TrainSettings` holds the only defaults of the training stage's parameters (those of the
default build) and their only value checks; :func:`lib.train.loop.fit` takes its defaults from
here. Its ``Attributes`` section is the meaning of each parameter that the book's parameter
table shows. The training chapter says why the default build trains this way.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lib.checking import (
    RUNTIME,
    check_bool,
    check_choice,
    check_int,
    check_ints,
    check_number,
    check_positive,
)
from lib.errors import ParameterError
from lib.model import precision as precision_lib

#: How training sees the imbalanced classes: not at all, through a loss weighted by inverse
#: class frequency, or through batches drawn with every class equally likely.
BALANCE_MODES: tuple[str, ...] = ("none", "weights", "sampler")


@dataclass(frozen=True)
class TrainSettings:
    """The training stage's parameters (checked when made).

    Attributes:
        epochs: training epochs, one checkpoint each (paper: 10).
        batch_size: images per SGD step (paper scale: 64).
        lr: SGD learning rate of the first epoch (AlexNet's 0.01).
        lr_decay: the learning rate is multiplied by this after every epoch; 1 keeps it
            constant (paper), 0.5 halves it (a constant 0.01 loses accuracy after the first
            epoch).
        momentum: SGD momentum (paper scale: 0.9).
        weight_decay: L2 penalty (paper scale: 0.0005).
        augment: random flip, crop and brightness/contrast jitter.
        balance: "none", "weights" (inverse-frequency loss) or "sampler" (balanced batches,
            which give a first checkpoint that classifies some images of every tool).
        seeds: one trained model per seed, each fixing its initialisation, order,
            augmentation and dropout; the models differ only in it (replicates). Increasing;
            the first model is the one every chapter shows in full; [0] trains one model.
        precision: training forwards: "float32", "bfloat16" (autocast, float32 weights) or
            "auto" (bfloat16 where the device computes it natively).
        weights_path: local ImageNet AlexNet weights to start from; "" trains from scratch.
        workers: DataLoader worker processes reading the frame cache (results do not change).
    """

    epochs: int = 5
    batch_size: int = 64
    lr: float = 0.01
    lr_decay: float = 0.5
    momentum: float = 0.9
    weight_decay: float = 0.0005
    augment: bool = True
    balance: str = "sampler"
    seeds: tuple[int, ...] = (0, 1, 2)
    precision: str = "auto"
    weights_path: str = ""
    workers: int = field(default=0, metadata=RUNTIME)

    def __post_init__(self) -> None:
        # a list from a notebook or JSON becomes a tuple, so settings compare as values
        object.__setattr__(self, "seeds", check_ints(self.seeds, "seeds", low=0))
        self.check()

    def check(self) -> None:
        """Raise :class:`~lib.errors.ParameterError` naming the first bad setting."""
        check_int(self.epochs, "epochs", low=1)
        check_int(self.batch_size, "batch_size", low=1)
        check_positive(self.lr, "lr")
        check_number(self.lr_decay, "lr_decay", low=0, high=1, low_open=True)
        check_number(self.momentum, "momentum", low=0, high=1, high_open=True)
        check_number(self.weight_decay, "weight_decay", low=0)
        check_bool(self.augment, "augment")
        check_choice(self.balance, BALANCE_MODES, "balance")
        if not self.seeds:
            raise ParameterError("seeds is empty; give at least one seed, e.g. [0]")
        if list(self.seeds) != sorted(set(self.seeds)):
            raise ParameterError(f"seeds must be increasing (each model its own seed), got "
                                 f"{list(self.seeds)}; e.g. [0, 1, 2]")
        precision_lib.check(self.precision)
        check_int(self.workers, "workers", low=0)
