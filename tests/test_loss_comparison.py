"""The same attacks under two losses (lib/analysis/loss_comparison.py) on hand-made tables."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from lib.analysis import loss_comparison as lc


def attack_rows(rows: list[tuple]) -> pd.DataFrame:
    """Result rows (epoch, row_id, schedule, image_id, target, success, linf)."""
    table = pd.DataFrame(rows, columns=["epoch", "row_id", "schedule", "image_id", "target",
                                        "success", "linf"])
    return table.assign(mode="targeted", source=0, status="ok", l1=table["linf"] / 10,
                        l2=table["linf"] * 10, final_class=table["target"])


def original_rows() -> pd.DataFrame:
    rows = []
    for epoch in (1, 5):
        for k in range(12):
            rows.append((epoch, k, "constant" if k < 6 else "step", f"img{k % 4}", 1 + k % 5,
                         k % 3 != 0, 0.01 * (k + 1)))
    return attack_rows(rows)


def test_the_rerun_sample_takes_failures_and_successes_per_group() -> None:
    table = original_rows()
    chosen = lc.rerun_sample(table, epochs=[5], failures=1, successes=2, seed=0)
    assert set(chosen["epoch"]) == {5}
    counts = chosen.groupby(["schedule", "success"]).size()
    assert counts.to_dict() == {("constant", False): 1, ("constant", True): 2,
                                ("step", False): 1, ("step", True): 2}
    again = lc.rerun_sample(table, epochs=[5], failures=1, successes=2, seed=0)
    pd.testing.assert_frame_equal(chosen, again)
    assert chosen["row_id"].is_monotonic_increasing
    everything = lc.rerun_sample(table, epochs=[1, 5], failures=99, successes=0, seed=3)
    assert len(everything) == int((~table["success"]).sum())


def test_the_comparison_by_hand() -> None:
    original = attack_rows([
        (5, 0, "constant", "a", 1, False, 0.5), (5, 1, "constant", "b", 1, False, 0.5),
        (5, 2, "constant", "c", 1, True, 0.02), (5, 3, "constant", "d", 1, True, 0.04)])
    rerun = attack_rows([
        (5, 0, "constant", "a", 1, True, 0.03), (5, 1, "constant", "b", 1, False, 0.6),
        (5, 2, "constant", "c", 1, True, 0.01), (5, 3, "constant", "d", 1, True, 0.04)])
    table = lc.loss_comparison(original, rerun, resamples=200).set_index("quantity")
    assert table.loc[lc.RESCUED, "estimate"] == pytest.approx(0.5)  # a solved, b not
    assert table.loc[lc.RESCUED, "n_attacks"] == 2
    assert table.loc[lc.KEPT, "estimate"] == pytest.approx(1.0)
    # rows both solved: c (0.01 / 0.02) and d (equal): median of log 0.5 and 0
    assert table.loc[lc.LOG_RATIO, "estimate"] == pytest.approx(math.log(0.5) / 2)
    assert (table["norm"] == "linf").all()


def test_rescued_failures_per_outcome_class() -> None:
    failures = pd.DataFrame({"epoch": 5, "row_id": [0, 1, 2, 3],
                             "outcome": ["third class", "third class", "stuck", "saturated"]})
    rerun = pd.DataFrame({"epoch": 5, "row_id": [0, 1, 2], "success": [True, False, False]})
    table = lc.rescued_by_outcome(failures, rerun).set_index("outcome")
    assert table.loc["third class", ["rerun", "solved"]].tolist() == [2, 1]
    assert table.loc["stuck", "share"] == 0.0
    assert table.loc["saturated", "rerun"] == 0 and np.isnan(table.loc["saturated", "share"])
    assert len(table) == 6


def test_the_reruns_can_only_lower_a_margin() -> None:
    original = attack_rows([
        (5, 0, "constant", "a", 1, False, 0.5), (5, 1, "constant", "a", 2, True, 0.04),
        (5, 2, "constant", "b", 1, True, 0.02)])
    rerun = attack_rows([(5, 0, "constant", "a", 1, True, 0.03)])
    table = lc.margins_with_rerun(original, rerun)
    linf = table[table["norm"] == "linf"].set_index("image_id")
    assert list(linf.index) == ["a"], "only the images of the rerun"
    assert linf.loc["a", "cross_entropy"] == pytest.approx(0.04)
    assert linf.loc["a", "both_losses"] == pytest.approx(0.03)
    assert (table["both_losses"] <= table["cross_entropy"]).all()


def test_no_rerun_gives_empty_tables() -> None:
    original = original_rows()
    empty = original.iloc[:0]
    assert lc.margins_with_rerun(original, empty).empty
    assert lc.loss_comparison(original, empty, resamples=200).empty
    assert (lc.rescued_by_outcome(pd.DataFrame({"epoch": [], "row_id": [], "outcome": []}),
                                  empty)["rerun"] == 0).all()
