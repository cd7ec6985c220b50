"""Why attacks fail: an outcome class for every failed attack, from its traces and final class.

A failed attack used its whole step budget without reaching its target. What it did in its last
``window`` updates (loss L and step size lr, as recorded by the attack engine: ``L_i`` is the
loss at the iterate before update i) and where it ended say why:

``third class``
    The final image is classified as neither the source nor the target: the attack left the
    source's region but crossed into another class on the way (targeted mode only).
``stuck``
    The step budget had vanished: the last ``window`` steps together move a pixel value by less
    than ``stuck_total`` (default half a grey level, 0.5/255). A sign step moves every value by
    at most lr, so nothing the attack still did would survive 8-bit storage; decaying schedules
    (step, exponential) end here by construction when their bounded total step is spent.
``oscillating``
    The loss swings without net progress: over the window its net decrease is at most
    ``progress_share`` of its total variation (the sum of the absolute changes between
    consecutive steps), and the direction of change flips on at least half of the consecutive
    pairs of changes. A step too large for the distance left to the boundary jumps back and
    forth across a ridge of the loss.
``saturated``
    The loss sits on a high plateau: over the window its range is at most ``flat_share`` of its
    mean and it never drops below ``plateau_loss`` (default ln 7: the target is less likely than
    under a uniform guess over the seven tools). Steps are taken (not stuck) but the target's
    cross-entropy does not move. For cross-entropy the gradient with respect to the logits,
    softmax minus one-hot, does not itself vanish; the trace shows that the signed steps no
    longer change the target's logit, not why. The flag ``frozen`` marks the extreme case, a
    loss that does not change at all over the window: the model's output no longer depends on
    the step, as when the gradient with respect to the input is exactly zero (every unit of a
    layer inactive), where the sign step is zero and the image stops moving.
``progressing``
    The loss was still falling when the budget ran out: the net decrease exceeds
    ``progress_share`` of the total variation and the range exceeds ``flat_share`` of the mean
    (more iterations would likely have succeeded).
``other``
    None of the above (e.g. a flat loss below ``plateau_loss``: stalled close to the boundary).

The classes are checked in this order and the first that holds is the outcome; the flags of
every class are returned too, so overlaps can be counted. In untargeted mode the engine ascends
the source's cross-entropy: progress is an increase, and "third class" and "saturated" do not
apply (a failed untargeted attack ends in its source class).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

from lib import NUM_CLASSES
from lib.analysis import resampling
from lib.errors import ParameterError

#: The outcome classes, in the order they are checked (the first that holds wins).
OUTCOMES = ("third class", "stuck", "oscillating", "saturated", "progressing", "other")
#: The last updates looked at.
WINDOW = 10
#: Total step below which the attack is stuck: half a grey level in [0, 1] units.
STUCK_TOTAL = 0.5 / 255
#: Net progress at most this share of the total variation: no net progress.
PROGRESS_SHARE = 0.5
#: A loss whose range over the window is at most this share of its mean is flat.
FLAT_SHARE = 0.05
#: A plateau at or above this cross-entropy is high: the target below a uniform guess.
PLATEAU_LOSS = math.log(NUM_CLASSES)


def last_applied(trace: np.ndarray, window: int) -> tuple[np.ndarray, np.ndarray]:
    """The last ``window`` recorded values of every row of ``trace`` [n, T] (NaN after the
    stop), right-aligned: values [n, window] and a mask [n, window] of the recorded ones."""
    data = np.asarray(trace, dtype=float)
    applied = np.isfinite(data).sum(axis=1)
    positions = applied[:, None] - window + np.arange(window)[None, :]
    valid = positions >= 0
    values = np.take_along_axis(data, np.clip(positions, 0, data.shape[1] - 1), axis=1)
    return np.where(valid, values, np.nan), valid


def loss_shape(loss: np.ndarray, *, window: int = WINDOW, increasing: bool = False,
               progress_share: float = PROGRESS_SHARE,
               flat_share: float = FLAT_SHARE) -> pd.DataFrame:
    """Descriptors of the last ``window`` losses of every row.

    Args:
        loss: float [n, T], NaN after the stop.
        increasing: progress is an increase of the loss (untargeted mode).

    Returns:
        ``net_progress`` (decrease, or increase when ``increasing``), ``total_variation``,
        ``flips`` (share of consecutive pairs of changes whose sign differs, in [0, 1]),
        ``level`` (mean), ``low`` (min), ``flat``, ``frozen`` (the loss did not change at
        all), ``oscillating``, ``progressing`` (bool); n rows.
    """
    values, _ = last_applied(loss, window)
    changes = np.diff(values, axis=1)
    sign = np.sign(changes)
    pairs = np.isfinite(changes[:, 1:]) & np.isfinite(changes[:, :-1])
    flipped = pairs & (sign[:, 1:] * sign[:, :-1] < 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        flips = flipped.sum(axis=1) / pairs.sum(axis=1)
    first = np.take_along_axis(values, np.isnan(values).argmin(axis=1)[:, None], axis=1)[:, 0]
    net = first - values[:, -1]
    net = -net if increasing else net
    variation = np.nansum(np.abs(changes), axis=1)
    level = np.nanmean(values, axis=1)
    spread = np.nanmax(values, axis=1) - np.nanmin(values, axis=1)
    flat = spread <= flat_share * np.abs(level)
    no_progress = net <= progress_share * variation
    return pd.DataFrame({
        "net_progress": net, "total_variation": variation, "flips": np.nan_to_num(flips),
        "level": level, "low": np.nanmin(values, axis=1), "flat": flat, "frozen": spread == 0,
        "oscillating": ~flat & no_progress & (np.nan_to_num(flips) >= 0.5),
        "progressing": ~flat & ~no_progress})


def classify_failures(loss: np.ndarray, lr: np.ndarray, final_class: np.ndarray,
                      source: np.ndarray, target: np.ndarray, *, mode: str = "targeted",
                      window: int = WINDOW, stuck_total: float = STUCK_TOTAL,
                      progress_share: float = PROGRESS_SHARE, flat_share: float = FLAT_SHARE,
                      plateau_loss: float = PLATEAU_LOSS) -> pd.DataFrame:
    """The outcome class of failed attacks (see the module docstring for the definitions).

    Args:
        loss, lr: float [n, T]: the loss and step-size traces (NaN after the stop).
        final_class, source, target: int [n]: the class at the final image, the source and
            the target (-1 in untargeted mode).
        mode: ``"targeted"`` or ``"untargeted"``.
        window: the last updates looked at (>= 3; fewer recorded updates: all of them).
        stuck_total: [0, 1] pixel units. progress_share, flat_share: in [0, 1].
        plateau_loss: cross-entropy level of a high plateau.

    Returns:
        n rows: ``outcome`` (one of :data:`OUTCOMES`), the flags ``third_class, stuck,
        oscillating, saturated, progressing``, and ``last_steps_255`` (the window's total step
        x 255), ``frozen``, ``net_progress, total_variation, flips, level`` of the loss.
    """
    if mode not in ("targeted", "untargeted"):
        raise ParameterError(f"mode must be 'targeted' or 'untargeted', got {mode!r}")
    if window < 3:
        raise ParameterError(f"window must be >= 3 (two changes to see a flip), got {window}")
    loss, lr = np.asarray(loss, float), np.asarray(lr, float)
    if loss.shape != lr.shape or loss.ndim != 2:
        raise ParameterError(f"loss and lr must be [n, T] of one shape, got {loss.shape} and "
                             f"{lr.shape}")
    targeted = mode == "targeted"
    shape = loss_shape(loss, window=window, increasing=not targeted,
                       progress_share=progress_share, flat_share=flat_share)
    steps, _ = last_applied(lr, window)
    last_steps = np.nansum(steps, axis=1)
    final_class = np.asarray(final_class)
    third = targeted & (final_class >= 0) & (final_class != np.asarray(source)) & (
        final_class != np.asarray(target))
    flags = pd.DataFrame({
        "third_class": third, "stuck": last_steps < stuck_total,
        "oscillating": shape["oscillating"].to_numpy(),
        "saturated": targeted & (shape["flat"] & (shape["low"] >= plateau_loss)).to_numpy(),
        "progressing": shape["progressing"].to_numpy()})
    outcome = np.full(len(flags), "other", dtype=object)
    for name in reversed(OUTCOMES[:-1]):  # the first class that holds wins
        outcome = np.where(flags[name.replace(" ", "_")].to_numpy(), name, outcome)
    return pd.concat([pd.DataFrame({"outcome": outcome}), flags,
                      pd.DataFrame({"last_steps_255": last_steps * 255}),
                      shape[["frozen", "net_progress", "total_variation", "flips", "level"]]],
                     axis=1)


def failed_attacks(results: pd.DataFrame, traces: dict[str, np.ndarray], *,
                   keys: Sequence[str] = ("epoch", "row_id"), **thresholds: float) -> pd.DataFrame:
    """Every failed attack of ``results`` with its outcome class.

    Args:
        results: attack rows (``attack/results.csv``): ``keys``, schedule, mode, image_id,
            source, target, success, final_class.
        traces: ``attack/traces.npz``: the ``keys`` arrays [R] and ``lr``, ``loss`` [R, T].
        keys: the columns that tie a result row to its trace row.
        thresholds: ``window``, ``stuck_total``, ... of :func:`classify_failures`.

    Attacks whose status is not "ok" (their model output stopped being finite) are left out:
    they did not fail for any of these reasons.

    Returns:
        The failed rows' ``keys, schedule, image_id, source, target, final_class`` (and
        ``model`` where present) with the columns of :func:`classify_failures`.
    """
    failed = results[~results["success"].astype(bool)]
    if "status" in failed.columns:
        failed = failed[failed["status"] == "ok"]
    keep = [c for c in dict.fromkeys(("model", *keys, "schedule", "image_id", "source",
                                      "target", "final_class")) if c in failed.columns]
    index = pd.MultiIndex.from_arrays([np.asarray(traces[k]) for k in keys])
    position = pd.Series(np.arange(len(index)), index=index)
    wanted = pd.MultiIndex.from_frame(failed[list(keys)])
    found = position.reindex(wanted)
    if found.isna().any():
        raise ParameterError(f"{int(found.isna().sum())} failed attacks have no trace row "
                             f"(keys {list(keys)}); pass the traces of the same attack run")
    rows = found.to_numpy(np.int64)
    modes = failed["mode"] if "mode" in failed.columns else pd.Series("targeted", failed.index)
    parts = []
    for mode in modes.unique():
        mine = (modes == mode).to_numpy()
        part = failed[mine]
        classes = classify_failures(
            traces["loss"][rows[mine]], traces["lr"][rows[mine]], part["final_class"].to_numpy(),
            part["source"].to_numpy(), part["target"].to_numpy(), mode=mode, **thresholds)
        parts.append(pd.concat([part[keep].reset_index(drop=True), classes], axis=1))
    if not parts:
        return pd.DataFrame(columns=[*keep, "outcome"])
    return pd.concat(parts, ignore_index=True)


def outcome_shares(failures: pd.DataFrame, *, by: Sequence[str] = ("epoch", "schedule"),
                   confidence: float = resampling.CONFIDENCE,
                   resamples: int = resampling.RESAMPLES,
                   seed: int = resampling.SEED) -> pd.DataFrame:
    """Per group and outcome: how many failed attacks, and their share of the group's
    failures with an image-bootstrap interval.

    Returns:
        ``by..., outcome, failures, estimate, low, high, n_images, n_models, n_attacks``
        (``n_attacks`` = the group's failed attacks; every outcome of :data:`OUTCOMES`
        appears, with 0 where none).
    """
    model = "model" if "model" in failures.columns else None
    parts = []
    for outcome in OUTCOMES:
        flagged = failures.assign(hit=(failures["outcome"] == outcome).astype(float))
        shares = resampling.cluster_bootstrap(flagged, value="hit", by=by, model=model,
                                              confidence=confidence, resamples=resamples,
                                              seed=seed)
        counts = flagged.groupby(list(by), sort=True)["hit"].sum().astype(np.int64)
        parts.append(shares.assign(outcome=outcome, failures=counts.to_numpy()))
    columns = [*by, "outcome", "failures", *resampling.INTERVAL_COLUMNS]
    table = pd.concat(parts, ignore_index=True)[columns]
    return table.sort_values([*by], kind="stable").reset_index(drop=True)
