"""Intervals, paired differences and verdict rules (lib/analysis/statistics.py) with known
answers."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from lib.analysis import statistics as st
from lib.errors import ParameterError


def test_wilson_interval_matches_the_hand_computed_value() -> None:
    # 8 of 10 at 95 %: z = 1.959964, centre = (0.8 + z^2/20) / (1 + z^2/10),
    # half = z / (1 + z^2/10) * sqrt(0.8 * 0.2 / 10 + z^2 / 400)
    z = 1.959963984540054
    centre = (0.8 + z * z / 20) / (1 + z * z / 10)
    half = z / (1 + z * z / 10) * math.sqrt(0.016 + z * z / 400)
    interval = st.wilson_interval(8, 10)
    assert interval.estimate == 0.8 and interval.n == 10
    assert interval.low == pytest.approx(centre - half, abs=1e-12)
    assert interval.high == pytest.approx(centre + half, abs=1e-12)
    assert interval.low == pytest.approx(0.4902, abs=1e-4)  # the textbook value
    assert interval.high == pytest.approx(0.9433, abs=1e-4)


def test_wilson_interval_edges() -> None:
    full = st.wilson_interval(20, 20)
    assert full.high == 1.0 and full.low == pytest.approx(0.8389, abs=1e-4)
    assert st.wilson_interval(0, 20).low == 0.0
    assert st.wilson_interval(0, 0).n == 0 and math.isnan(st.wilson_interval(0, 0).estimate)
    with pytest.raises(ParameterError, match="successes <= trials"):
        st.wilson_interval(5, 3)


def test_rate_difference_interval_newcombe() -> None:
    # Newcombe (1998), example: 56/70 vs 48/80 -> 0.2, interval [0.0524, 0.3339]
    interval = st.rate_difference_interval((56, 70), (48, 80))
    assert interval.estimate == pytest.approx(0.2)
    assert interval.low == pytest.approx(0.0524, abs=1e-4)
    assert interval.high == pytest.approx(0.3339, abs=1e-4)


def test_paired_rate_difference_interval() -> None:
    # every unit right both times: no correlation term (phi = 0), so the bounds are the two
    # Wilson half-widths of 10 of 10: +-(1 - 0.7225)
    same = st.paired_rate_difference_interval(both=10, first_only=0, second_only=0, neither=0)
    assert same.estimate == 0.0 and same.n == 10
    assert same.low == pytest.approx(-(1 - st.wilson_interval(10, 10).low))
    assert same.high == pytest.approx(1 - st.wilson_interval(10, 10).low)
    # uncorrelated pairs (a d = b c, so phi = 0): the same bounds as two independent samples
    # with these margins, which the Newcombe example above checks
    uncorrelated = st.paired_rate_difference_interval(both=4, first_only=2, second_only=2,
                                                      neither=1)
    independent = st.rate_difference_interval((6, 9), (6, 9))
    assert uncorrelated.low == pytest.approx(independent.low)
    assert uncorrelated.high == pytest.approx(independent.high)
    # positively correlated pairs (most units score the same twice): narrower than unpaired
    paired = st.paired_rate_difference_interval(both=80, first_only=8, second_only=2, neither=10)
    unpaired = st.rate_difference_interval((88, 100), (82, 100))
    assert paired.estimate == pytest.approx(0.06) == unpaired.estimate
    assert unpaired.low < paired.low < 0.06 < paired.high < unpaired.high


def test_bootstrap_interval_is_reproducible_and_covers_the_mean() -> None:
    values = np.random.default_rng(1).normal(10.0, 1.0, 200)
    first = st.bootstrap_interval(values)
    assert first == st.bootstrap_interval(values)  # fixed seed: bit-identical
    assert first.low < values.mean() < first.high and first.n == 200
    # the mean's standard error is about 1/sqrt(200) = 0.07: the 95 % interval is about +-0.14
    assert 0.2 < first.high - first.low < 0.36
    median = st.bootstrap_interval(values, statistic="median")
    assert median.estimate == pytest.approx(np.median(values))
    assert median.low <= median.estimate <= median.high


def test_bootstrap_interval_degenerate_cases() -> None:
    assert st.bootstrap_interval([3.0, 3.0, 3.0]) == st.Interval(3.0, 3.0, 3.0, 3)
    assert st.bootstrap_interval([2.0, np.nan]) == st.Interval(2.0, 2.0, 2.0, 1)
    assert st.bootstrap_interval([]).n == 0


def pairs(first: list[float], second: list[float]) -> pd.DataFrame:
    """One row per (epoch, image, target) and schedule a/b."""
    rows = [(1, f"img{k}", 0, name, value) for name, values in (("a", first), ("b", second))
            for k, value in enumerate(values)]
    return pd.DataFrame(rows, columns=["epoch", "image_id", "target", "schedule", "l1"])


def test_paired_difference_whose_interval_excludes_zero() -> None:
    rng = np.random.default_rng(0)
    base = rng.uniform(1, 10, 40)  # large spread between rows, tiny within a pair
    table = pairs(list(base + 0.5 + rng.normal(0, 0.05, 40)), list(base))
    differences = st.paired_differences(table, first="a", second="b", value="l1")
    assert len(differences) == 40
    result = st.paired_comparison(differences["difference"])
    assert result["low"] > 0.4 and result["high"] < 0.6 and result["pairs"] == 40
    assert result["p_signed_rank"] < 1e-6
    # unpaired, the spread between rows would swamp the 0.5: the pairing is what decides
    unpaired = st.bootstrap_interval(base + 0.5).low - st.bootstrap_interval(base).high
    assert unpaired < 0


def test_paired_difference_whose_interval_contains_zero() -> None:
    table = pairs([1.0, 2.0, 3.0, 4.0, 5.0, 6.0], [1.5, 1.5, 3.5, 3.5, 5.5, 5.5])
    differences = st.paired_differences(table, first="a", second="b", value="l1")
    assert differences["difference"].tolist() == [-0.5, 0.5, -0.5, 0.5, -0.5, 0.5]
    result = st.paired_comparison(differences["difference"])
    assert result["mean_difference"] == 0.0
    assert result["low"] < 0 < result["high"]
    assert result["p_signed_rank"] == pytest.approx(1.0)


def test_paired_differences_use_only_the_shared_rows() -> None:
    table = pairs([1.0, np.nan, 3.0], [2.0, 2.0, np.nan])  # a failed on img1, b on img2
    differences = st.paired_differences(table, first="a", second="b", value="l1")
    assert differences["image_id"].tolist() == ["img0"]
    assert differences["difference"].tolist() == [-1.0]
    with pytest.raises(ParameterError, match="lacks column"):
        st.paired_differences(table, first="a", second="b", value="l2")


@pytest.mark.parametrize(
    ("interval", "above", "below", "within"),
    [
        (st.Interval(0.5, 0.2, 0.8, 10), "agrees", "disagrees", "disagrees"),
        (st.Interval(-0.5, -0.8, -0.2, 10), "disagrees", "agrees", "disagrees"),
        (st.Interval(0.0, -0.05, 0.05, 10), "inconclusive", "inconclusive", "agrees"),
        (st.Interval(0.1, -0.2, 0.4, 10), "inconclusive", "inconclusive", "inconclusive"),
        (st.NAN_INTERVAL, "inconclusive", "inconclusive", "inconclusive"),
    ],
    ids=["positive", "negative", "near-zero", "wide", "empty"],
)
def test_verdicts_against_zero(interval, above, below, within) -> None:
    assert st.verdict_above(interval, 0.0) == above
    assert st.verdict_below(interval, 0.0) == below
    assert st.verdict_within(interval, 0.1) == within


def test_verdict_at_least_reaches_all_three() -> None:
    assert st.verdict_at_least(st.wilson_interval(200, 200), 0.95) == "agrees"  # low 0.981
    assert st.verdict_at_least(st.wilson_interval(150, 200), 0.95) == "disagrees"  # high 0.80
    assert st.verdict_at_least(st.wilson_interval(10, 10), 0.95) == "inconclusive"  # low 0.72


def test_verdict_smallest_reads_every_interval() -> None:
    own = st.Interval(1.0, 0.9, 1.1, 10)
    assert st.verdict_smallest(own, {"a": st.Interval(2.0, 1.5, 2.5, 10),
                                     "b": st.Interval(1.3, 1.2, 1.4, 10)}) == ("agrees", [])
    assert st.verdict_smallest(own, {"a": st.Interval(0.5, 0.4, 0.6, 10),
                                     "b": st.Interval(1.0, 0.95, 1.2, 10),
                                     "c": st.Interval(0.7, 0.6, 0.8, 10)}) == (
        "disagrees", ["a", "c"])
    assert st.verdict_smallest(own, {"a": st.Interval(1.05, 1.0, 1.2, 10)}) == (
        "inconclusive", [])
    assert st.verdict_smallest(own, {"a": st.NAN_INTERVAL}) == ("inconclusive", [])
    assert st.verdict_smallest(own, {}) == ("agrees", [])


def test_all_of() -> None:
    assert st.all_of(["agrees", "agrees"]) == ("agrees", 0)
    assert st.all_of(["agrees", "inconclusive", "disagrees"]) == ("disagrees", 2)
    assert st.all_of(["agrees", "inconclusive"]) == ("inconclusive", 1)
    assert st.all_of([]) == ("inconclusive", -1)


def test_bootstrap_statistic_resamples_pairs_together() -> None:
    first = np.arange(1.0, 21.0)
    second = first + 1.0  # paired: the difference is 1 in every resample
    interval = st.bootstrap_statistic((first, second), lambda a, b: float(np.mean(b - a)))
    assert (interval.estimate, interval.low, interval.high, interval.n) == (1.0, 1.0, 1.0, 20)
    spread = st.bootstrap_statistic((first,), lambda a: float(np.mean(a)))
    assert spread.low < 10.5 < spread.high
    assert spread == st.bootstrap_statistic((first,), lambda a: float(np.mean(a)))
    assert st.bootstrap_statistic((np.array([]),), np.mean).n == 0
