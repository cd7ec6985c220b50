"""Outcome classes of failed attacks (lib/analysis/failures.py) on hand-made traces."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from lib.analysis import failures as fl
from lib.errors import ParameterError

STEPS = 100
LR0 = 2 / 255
CONSTANT = np.full(STEPS, LR0)
EXPONENTIAL = LR0 * np.exp(-0.5 * np.arange(STEPS))
WOBBLE = 0.001 * np.sin(np.arange(STEPS))

#: name -> (loss trace, lr trace, final class) of an attack from source 0 toward target 1
TRACES = {
    "third class": (np.linspace(9, 4, STEPS), CONSTANT, 2),
    "stuck": (np.linspace(9, 4, STEPS), EXPONENTIAL, 0),
    "oscillating": (np.where(np.arange(STEPS) % 2 == 0, 3.0, 1.0), CONSTANT, 0),
    "saturated": (25.0 + WOBBLE, CONSTANT, 0),
    "progressing": (np.linspace(10, 5, STEPS), CONSTANT, 0),
    "other": (0.8 + WOBBLE, CONSTANT, 0),
}


def classify(names: list[str], **options) -> pd.DataFrame:
    loss = np.stack([TRACES[n][0] for n in names])
    lr = np.stack([TRACES[n][1] for n in names])
    final = np.array([TRACES[n][2] for n in names])
    return fl.classify_failures(loss, lr, final, np.zeros(len(names), int),
                                np.ones(len(names), int), **options)


def test_every_hand_made_trace_gets_its_class() -> None:
    names = list(TRACES)
    table = classify(names)
    assert table["outcome"].tolist() == names
    assert set(names) == set(fl.OUTCOMES)


def test_a_loss_that_does_not_change_at_all_is_frozen() -> None:
    frozen = np.r_[np.linspace(9, 5.6432, 10), np.full(90, 5.6432)]
    table = fl.classify_failures(np.stack([frozen, TRACES["saturated"][0]]),
                                 np.stack([CONSTANT, CONSTANT]), np.array([0, 0]),
                                 np.array([0, 0]), np.array([1, 1]))
    assert table["outcome"].tolist() == ["saturated", "saturated"]
    assert table["frozen"].tolist() == [True, False]


def test_flags_overlap_and_the_order_decides() -> None:
    oscillating_loss, _, _ = TRACES["oscillating"]
    table = fl.classify_failures(oscillating_loss[None, :], EXPONENTIAL[None, :],
                                 np.array([3]), np.array([0]), np.array([1]))
    row = table.iloc[0]
    assert row["third_class"] and row["stuck"] and row["oscillating"]
    assert row["outcome"] == "third class"


def test_stuck_is_the_total_of_the_last_steps() -> None:
    table = classify(["stuck", "progressing"])
    expected = EXPONENTIAL[-10:].sum() * 255
    assert table.loc[0, "last_steps_255"] == pytest.approx(expected)
    assert table.loc[1, "last_steps_255"] == pytest.approx(20.0)
    # ten last steps of 0.04/255 total 0.4/255, under half a grey level: stuck, whatever came
    # before
    tiny = np.r_[np.full(90, LR0), np.full(10, 0.04 / 255)]
    assert fl.classify_failures(TRACES["progressing"][0][None, :], tiny[None, :], np.array([0]),
                                np.array([0]), np.array([1])).loc[0, "stuck"]


def test_a_short_trace_uses_what_was_recorded() -> None:
    loss = np.full((1, STEPS), np.nan)
    lr = np.full((1, STEPS), np.nan)
    loss[0, :6] = [3, 1, 3, 1, 3, 1]
    lr[0, :6] = LR0
    row = fl.classify_failures(loss, lr, np.array([0]), np.array([0]), np.array([1])).iloc[0]
    assert row["outcome"] == "oscillating" and row["flips"] == 1.0
    assert row["last_steps_255"] == pytest.approx(12.0)


def test_untargeted_progress_is_an_increase() -> None:
    rising = np.linspace(1, 6, STEPS)[None, :]
    row = fl.classify_failures(rising, CONSTANT[None, :], np.array([0]), np.array([0]),
                               np.array([-1]), mode="untargeted").iloc[0]
    assert row["outcome"] == "progressing" and row["net_progress"] > 0
    high = (25.0 + WOBBLE)[None, :]
    row = fl.classify_failures(high, CONSTANT[None, :], np.array([0]), np.array([0]),
                               np.array([-1]), mode="untargeted").iloc[0]
    assert not row["saturated"] and not row["third_class"] and row["outcome"] == "other"


def test_bad_arguments_say_what_to_pass() -> None:
    with pytest.raises(ParameterError, match="window"):
        classify(["stuck"], window=2)
    with pytest.raises(ParameterError, match="mode"):
        classify(["stuck"], mode="sideways")


def run_tables() -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    names = ["stuck", "oscillating", "saturated", "oscillating"]
    results = pd.DataFrame({
        "epoch": [1, 1, 1, 1, 5, 5], "row_id": [0, 1, 2, 3, 0, 1],
        "schedule": ["step", "constant", "constant", "constant", "constant", "constant"],
        "mode": "targeted", "image_id": ["a", "a", "b", "c", "a", "b"], "source": 0,
        "target": 1, "success": [False, False, False, False, True, False],
        "final_class": [0, 0, 0, 0, 1, 4], "status": "ok"})
    loss = np.stack([TRACES[n][0] for n in names] + [TRACES["progressing"][0]] * 2)
    lr = np.stack([TRACES[n][1] for n in names] + [CONSTANT] * 2)
    # traces are stored in another order than the results
    order = np.array([5, 4, 3, 2, 1, 0])
    traces = {"epoch": results["epoch"].to_numpy()[order],
              "row_id": results["row_id"].to_numpy()[order], "loss": loss[order],
              "lr": lr[order]}
    return results, traces


def test_failed_attacks_join_their_traces() -> None:
    results, traces = run_tables()
    failed = fl.failed_attacks(results, traces)
    assert len(failed) == 5  # the successful row is left out
    keys = zip(failed["epoch"], failed["row_id"], strict=True)
    got = dict(zip(keys, failed["outcome"], strict=True))
    assert got == {(1, 0): "stuck", (1, 1): "oscillating", (1, 2): "saturated",
                   (1, 3): "oscillating", (5, 1): "third class"}
    with pytest.raises(ParameterError, match="no trace row"):
        fl.failed_attacks(results, {k: v[:3] for k, v in traces.items()})



def test_failed_attacks_of_two_models_with_the_same_row_ids() -> None:
    results, traces = run_tables()
    both = pd.concat([results.assign(model=0), results.assign(model=7)], ignore_index=True)
    arrays = {k: np.concatenate([v, v]) for k, v in traces.items()}
    arrays["model"] = np.repeat([0, 7], len(traces["row_id"]))
    failed = fl.failed_attacks(both, arrays, keys=("model", "epoch", "row_id"))
    assert len(failed) == 10 and list(failed.columns[:3]) == ["model", "epoch", "row_id"]
    assert (failed.groupby("model")["outcome"].apply(list).tolist()[0]
            == failed.groupby("model")["outcome"].apply(list).tolist()[1])


def test_outcome_shares_count_every_class() -> None:
    results, traces = run_tables()
    shares = fl.outcome_shares(fl.failed_attacks(results, traces))
    assert len(shares) == 3 * len(fl.OUTCOMES)  # (1, constant), (1, step), (5, constant)
    constant = shares[(shares["epoch"] == 1) & (shares["schedule"] == "constant")]
    counts = dict(zip(constant["outcome"], constant["failures"], strict=True))
    assert counts["oscillating"] == 2 and counts["saturated"] == 1 and counts["stuck"] == 0
    assert constant["estimate"].sum() == pytest.approx(1.0)
    assert constant["n_attacks"].tolist() == [3] * len(fl.OUTCOMES)
    oscillating = constant[constant["outcome"] == "oscillating"].iloc[0]
    assert oscillating["estimate"] == pytest.approx(2 / 3) and oscillating["n_images"] == 3
