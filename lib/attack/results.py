"""What the attack engine takes and gives back: one row per attack in, one result per attack out.

:class:`AttackRow` is one attack of a job (an image of the pool, its source class, a target
and a schedule); :class:`AttackResult` holds the per-attack results of many rows as tensors,
with the traces and, when asked for, the borderline images. The loop that turns rows into
results is :mod:`lib.attack.engine`; its entry points are in :mod:`lib.attack.api`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any, NamedTuple

import pandas as pd
import torch
from torch import Tensor

from lib.errors import ParameterError

MODES = ("targeted", "untargeted")
STATUS_OK = "ok"  #: the loop ran as specified (successful or not)
STATUS_NONFINITE = "nonfinite"  #: logits, loss or gradient stopped being finite: failed


class AttackRow(NamedTuple):
    """One attack of a job. ``target`` is ignored in untargeted mode (use -1)."""

    row_id: int
    image: int  #: index into the image pool
    source: int
    target: int
    schedule: str


#: The columns of a job's row table (:class:`AttackRow`'s fields).
ROW_COLUMNS = AttackRow._fields


#: A column dtype for an optional count: int64 in the tensor, where -1 means "none"; a nullable
#: integer (empty in the CSV) in the tables.
OPTIONAL_INT = "Int64"


def column(dtype: str) -> Any:
    """A field of :class:`AttackResult` with one value per attack: a column of the result
    tables, of ``dtype`` ("bool", "int64", "float64", "str" or :data:`OPTIONAL_INT`)."""
    return field(metadata={"column": dtype})


@dataclass
class AttackResult:
    """Per-attack results; row ``k`` belongs to ``row_id[k]``. Tensors are on the CPU.

    Every field made with :func:`column` is a column of the attack stage's result tables, in
    this order (:func:`result_columns`); a new per-attack result is one such field here and
    its value in the engine.

    Attributes:
        row_id: int64 [K].
        success: bool [K]: the final image is classified as the target (targeted) or not as
            the source (untargeted). Always False for status ``"nonfinite"``.
        iterations: int64 [K]: updates applied, 0 .. max_iter.
        mean_lr: [K]: mean step size over the applied updates; NaN when none was applied.
        l1: [K]: mean ``|x* - x|`` over the C*H*W values (the method chapter's L1, [0, 1]
            units).
        l2, linf: [K]: Euclidean and max norms of x* - x.
        target_prob: [K]: softmax probability at the final image of the target (targeted) or of
            ``final_class`` (untargeted); NaN if not finite.
        final_class: int64 [K]: argmax of the model at the final image (-1 if not finite).
        status: K strings, ``"ok"`` or ``"nonfinite"``.
        refined_l1, refined_l2, refined_linf: [K]: the same distances after the boundary
            refinement (``refine_tolerance``), each the smaller of the refined point's and the
            path point's distance (both are crossed). Equal to l1, l2, linf when refinement is
            off, for failed rows and for rows that crossed after 0 updates.
        refine_forwards: int64 [K]: forward passes the refinement cost this row (0 where it
            did not run).
        certified_at: int64 [K]: the update k at which the certified stop proved that the
            attack cannot succeed (:mod:`lib.attack.stop`), -1 where it did not stop the row
            (empty in the tables). Such a row reports what the full loop reports (``success``
            False, ``iterations`` = max_iter) with the distances, class and probability of its
            iterate x_k; the full loop's final image lies within the stop's reachable radius
            R_k (Linf) of it.
        certify_checks: int64 [K]: interval-bound checks the certified stop made for this row
            (each costs about one forward + backward pass).
        lr_trace, loss_trace: [K, max_iter]: lr_i and L_i in column i - 1 for the applied
            updates, NaN after the stop. A certified row's lr trace goes on to max_iter with
            the steps the full loop would take where the schedule does not read the loss
            (NaN where it does); its loss trace ends at x_k.
        borderline: [K, C, H, W] in [0, 1], the final images, or None when not kept.
        refined: [K, C, H, W] in [0, 1], the refined images (the borderline image where
            refinement did not run), or None when images are not kept.
    """

    row_id: Tensor = column("int64")
    success: Tensor = column("bool")
    iterations: Tensor = column("int64")
    mean_lr: Tensor = column("float64")
    l1: Tensor = column("float64")
    l2: Tensor = column("float64")
    linf: Tensor = column("float64")
    target_prob: Tensor = column("float64")
    final_class: Tensor = column("int64")
    status: list[str] = column("str")
    refined_l1: Tensor = column("float64")
    refined_l2: Tensor = column("float64")
    refined_linf: Tensor = column("float64")
    refine_forwards: Tensor = column("int64")
    certified_at: Tensor = column(OPTIONAL_INT)
    certify_checks: Tensor = column("int64")
    lr_trace: Tensor = field()
    loss_trace: Tensor = field()
    borderline: Tensor | None = None
    refined: Tensor | None = None

    def __len__(self) -> int:
        return len(self.row_id)

    def take(self, index: Tensor) -> AttackResult:
        """The results at positions ``index`` (int64 [k]), in that order."""
        values: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                values[f.name] = None
            elif isinstance(value, list):
                values[f.name] = [value[i] for i in index.tolist()]
            else:
                values[f.name] = value[index]
        return AttackResult(**values)

    @staticmethod
    def concat(chunks: Sequence[AttackResult]) -> AttackResult:
        """One result from chunks (e.g. everything :func:`~lib.attack.api.iter_attack_rows`
        yielded)."""
        if not chunks:
            raise ParameterError("AttackResult.concat needs at least one chunk")
        values: dict[str, Any] = {}
        for f in fields(AttackResult):
            parts = [getattr(c, f.name) for c in chunks]
            if any(p is None for p in parts):
                values[f.name] = None
            elif isinstance(parts[0], list):
                values[f.name] = [s for p in parts for s in p]
            else:
                values[f.name] = torch.cat(parts)
        return AttackResult(**values)

    def sorted(self) -> AttackResult:
        """The results ordered by ``row_id``."""
        return self.take(torch.argsort(self.row_id, stable=True))

    def to_frame(self) -> pd.DataFrame:
        """The per-attack values as a DataFrame: one row per attack, the columns of
        :func:`result_columns` (floats as float64; no traces or images)."""
        values = {}
        for name, dtype in result_columns().items():
            value = getattr(self, name)
            if isinstance(value, Tensor):
                value = (value.double() if value.is_floating_point() else value).numpy()
            if dtype == OPTIONAL_INT:
                value = pd.Series(value).where(value >= 0).astype(OPTIONAL_INT)
            values[name] = value
        return pd.DataFrame(values)


def result_columns() -> dict[str, str]:
    """``{column: dtype}`` of the per-attack values of :class:`AttackResult`, in field order."""
    return {f.name: f.metadata["column"] for f in fields(AttackResult) if "column" in f.metadata}
