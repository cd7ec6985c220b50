"""Cluster and two-level bootstrap (lib/analysis/resampling.py) on tables with known answers."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from lib.analysis import resampling as rs
from lib.analysis import statistics
from lib.errors import ParameterError


def images_table(values: np.ndarray, *, attacks: int = 1, model: int = 0) -> pd.DataFrame:
    """``attacks`` identical rows for every image value, images named in sorted order."""
    return pd.DataFrame({"model": model,
                         "image_id": np.repeat([f"img{k:03d}" for k in range(len(values))],
                                               attacks),
                         "value": np.repeat(np.asarray(values, float), attacks)})


def ordinary(values: np.ndarray, statistic=np.mean, *, seed: int = rs.SEED) -> statistics.Interval:
    """The reference: the ordinary percentile bootstrap of lib.statistics."""
    return statistics.bootstrap_statistic((np.asarray(values, float),), statistic, seed=seed)


def test_one_attack_per_image_is_the_ordinary_bootstrap_of_a_rate_exactly() -> None:
    hits = (np.random.default_rng(3).random(60) < 0.8).astype(float)
    table = images_table(hits)
    result = rs.bootstrap_rows(table["value"].to_numpy(), rs.clusters_of(table))
    reference = ordinary(hits)
    assert (result.estimate, result.low, result.high) == (
        reference.estimate, reference.low, reference.high)
    assert (result.n_images, result.n_models, result.n_attacks) == (60, 1, 60)


def test_one_attack_per_image_is_the_ordinary_bootstrap_of_a_mean_and_a_median() -> None:
    values = np.random.default_rng(4).gamma(2.0, size=45)
    table = images_table(values)
    clusters = rs.clusters_of(table)
    mean = rs.bootstrap_rows(values, clusters)
    reference = ordinary(values)
    assert mean.low == pytest.approx(reference.low, rel=1e-12)
    assert mean.high == pytest.approx(reference.high, rel=1e-12)
    median = rs.bootstrap_rows(values, clusters, statistic="median")
    reference = ordinary(values, np.median)
    assert (median.estimate, median.low, median.high) == (
        reference.estimate, reference.low, reference.high)


def test_many_identical_attacks_of_an_image_give_the_interval_of_one_unit() -> None:
    per_image = (np.random.default_rng(5).random(30) < 0.7).astype(float)
    table = images_table(per_image, attacks=12)
    result = rs.bootstrap_rows(table["value"].to_numpy(), rs.clusters_of(table))
    reference = ordinary(per_image)  # 30 units, not 360
    assert (result.low, result.high) == (reference.low, reference.high)
    assert (result.n_images, result.n_attacks) == (30, 360)
    naive = rs.bootstrap_rows(table["value"].to_numpy(),
                              rs.clusters_of(table.assign(row=np.arange(360)), cluster="row"))
    assert (result.high - result.low) > 2.5 * (naive.high - naive.low)  # sqrt(12) = 3.5


def test_weighted_median_equals_the_median_of_the_drawn_rows() -> None:
    rng = np.random.default_rng(6)
    table = pd.DataFrame({"image_id": rng.integers(0, 9, 50), "value": rng.random(50)})
    table.loc[[3, 7, 11], "value"] = np.inf
    clusters = rs.clusters_of(table)
    counts = rs.resample_counts(clusters, resamples=300, seed=2)
    replicates = rs.median_replicates(table["value"].to_numpy(), clusters, counts)
    row_counts = counts[:, clusters.row_cluster]
    for r in range(300):
        drawn = np.repeat(table["value"].to_numpy(), row_counts[r])
        assert replicates[r] == np.median(drawn)


def test_median_of_rows_from_some_clusters_only() -> None:
    # the counts are drawn for 6 clusters; the rows cover clusters 1 and 4 only
    rows = rs.Clusters(np.array([1, 4, 4]), np.zeros(6, np.int64))
    counts = np.array([[1, 1, 0, 0, 1, 0], [0, 0, 3, 3, 0, 0], [0, 2, 0, 0, 4, 0]])
    replicates = rs.median_replicates(np.array([5.0, 1.0, 2.0]), rows, counts)
    assert replicates[0] == 2.0 and math.isnan(replicates[1])
    assert replicates[2] == np.median([5.0, 5.0] + [1.0, 2.0] * 4)


def test_two_level_with_models_that_differ_and_images_that_do_not() -> None:
    model_values = np.array([0.2, 0.5, 0.55, 0.9, 0.3])
    table = pd.concat([images_table(np.full(8, v), attacks=3, model=m)
                       for m, v in enumerate(model_values)], ignore_index=True)
    clusters = rs.clusters_of(table, model="model")
    two_level = rs.bootstrap_rows(table["value"].to_numpy(), clusters, two_level=True)
    reference = ordinary(model_values)  # the model draw is the ordinary bootstrap of models
    assert two_level.low == pytest.approx(reference.low, rel=1e-12)
    assert two_level.high == pytest.approx(reference.high, rel=1e-12)
    assert (two_level.n_images, two_level.n_models, two_level.n_attacks) == (40, 5, 120)
    images_only = rs.bootstrap_rows(table["value"].to_numpy(), clusters, two_level=False)
    assert (images_only.high - images_only.low) < 0.6 * (two_level.high - two_level.low)


def test_two_level_with_images_that_differ_and_models_that_do_not() -> None:
    per_image = np.random.default_rng(7).normal(size=40)
    copies = 4
    table = pd.concat([images_table(per_image, attacks=2, model=m) for m in range(copies)],
                      ignore_index=True)
    clusters = rs.clusters_of(table, model="model")
    two_level = rs.bootstrap_rows(table["value"].to_numpy(), clusters, two_level=True)
    one_model = table[table["model"] == 0]
    alone = rs.bootstrap_rows(one_model["value"].to_numpy(), rs.clusters_of(one_model))
    # identical models: the draw is 4 x 40 images from the same 40, a quarter of the variance
    ratio = (two_level.high - two_level.low) / (alone.high - alone.low)
    assert ratio == pytest.approx(1 / math.sqrt(copies), rel=0.15)
    assert two_level.estimate == pytest.approx(per_image.mean(), rel=1e-12)


def test_resample_counts_draw_whole_models() -> None:
    table = pd.concat([images_table(np.zeros(n), model=m) for m, n in enumerate((3, 5, 7))],
                      ignore_index=True)
    clusters = rs.clusters_of(table, model="model")
    counts = rs.resample_counts(clusters, two_level=True, resamples=500, seed=1)
    per_model = np.stack([counts[:, clusters.cluster_model == m].sum(axis=1) for m in range(3)],
                         axis=1)
    copies = per_model / np.array([3, 5, 7])
    assert np.array_equal(copies, np.round(copies))  # every drawn model brings G_m images
    assert (copies.sum(axis=1) == 3).all()  # three model draws per resample
    flat = rs.resample_counts(clusters, two_level=False, resamples=500, seed=1)
    assert (flat.sum(axis=1) == 15).all()


def test_one_model_two_level_is_the_image_bootstrap() -> None:
    table = images_table(np.random.default_rng(8).random(25), attacks=2)
    clusters = rs.clusters_of(table, model="model")
    assert np.array_equal(rs.resample_counts(clusters, two_level=True, resamples=200),
                          rs.resample_counts(clusters, two_level=False, resamples=200))


def test_the_seed_fixes_the_interval() -> None:
    table = images_table(np.random.default_rng(9).random(30), attacks=4)
    values, clusters = table["value"].to_numpy(), rs.clusters_of(table)
    first = rs.bootstrap_rows(values, clusters, seed=11)
    assert rs.bootstrap_rows(values, clusters, seed=11) == first
    assert rs.bootstrap_rows(values, clusters, seed=12) != first


def test_degenerate_tables() -> None:
    empty = rs.bootstrap_rows(np.zeros(0), rs.clusters_of(images_table(np.zeros(0))))
    assert math.isnan(empty.estimate) and empty.n_images == 0 and empty.n_attacks == 0
    one = images_table(np.array([0.25]), attacks=5)
    single = rs.bootstrap_rows(one["value"].to_numpy(), rs.clusters_of(one))
    assert single.estimate == 0.25 and math.isnan(single.low) and math.isnan(single.high)
    assert statistics.verdict_above(single.interval(), 0.0) == statistics.INCONCLUSIVE
    holes = images_table(np.array([1.0, np.nan, 3.0, np.nan]))
    kept = rs.bootstrap_rows(holes["value"].to_numpy(), rs.clusters_of(holes))
    assert (kept.estimate, kept.n_images, kept.n_attacks) == (2.0, 2, 2)
    with pytest.raises(ParameterError, match="finite"):
        rs.bootstrap_rows(np.array([1.0, np.inf]), rs.clusters_of(images_table(np.zeros(2))))


def test_median_with_failures_at_infinity() -> None:
    values = np.array([0.1, 0.2, np.inf, np.inf, np.inf])
    table = images_table(values)
    result = rs.bootstrap_rows(values, rs.clusters_of(table), statistic="median")
    assert result.estimate == np.inf and result.high == np.inf
    # a resample's median is 0.1 when 3 of its 5 draws are 0.1: P = 0.058 > 2.5 %
    assert result.low == 0.1


def test_percentile_bounds_edges() -> None:
    both_inf = np.r_[np.zeros(10), np.full(90, np.inf)]
    low, high = rs.percentile_bounds(both_inf)
    assert high[0] == np.inf and low[0] == 0.0
    mostly_nan = np.r_[np.ones(40), np.full(60, np.nan)]
    low, high = rs.percentile_bounds(mostly_nan)
    assert math.isnan(low[0]) and math.isnan(high[0])
    some_nan = np.r_[np.arange(70.0), np.full(30, np.nan)]
    low, high = rs.percentile_bounds(np.stack([some_nan, np.arange(100.0)], axis=1))
    assert low.tolist() == pytest.approx([np.quantile(np.arange(70.0), 0.025), 2.475])
    assert high.tolist() == pytest.approx([np.quantile(np.arange(70.0), 0.975), 96.525])


def test_a_curve_shares_its_draws_with_single_columns() -> None:
    rng = np.random.default_rng(10)
    table = pd.DataFrame({"image_id": rng.integers(0, 20, 80)})
    margins = rng.gamma(2.0, size=80)
    epsilons = np.array([0.5, 1.0, 2.0, 4.0])
    indicator = (margins[:, None] > epsilons[None, :]).astype(float)
    clusters = rs.clusters_of(table)
    curve = rs.bootstrap_curve(indicator, clusters)
    for k in range(len(epsilons)):
        single = rs.bootstrap_rows(indicator[:, k], clusters)
        assert curve.loc[k, ["estimate", "low", "high"]].tolist() == pytest.approx(
            [single.estimate, single.low, single.high], rel=1e-12)
    assert curve["estimate"].is_monotonic_decreasing
    assert curve["low"].is_monotonic_decreasing


def test_cluster_bootstrap_by_groups_each_group_alone() -> None:
    rng = np.random.default_rng(12)
    table = pd.DataFrame({"schedule": np.repeat(["a", "b"], 60),
                          "image_id": np.tile(np.repeat(np.arange(15), 4), 2),
                          "success": rng.random(120) < 0.85})
    grouped = rs.cluster_bootstrap(table, value="success", by=["schedule"])
    assert list(grouped.columns) == ["schedule", *rs.INTERVAL_COLUMNS]
    alone = rs.cluster_bootstrap(table[table["schedule"] == "b"], value="success")
    assert grouped.iloc[1, 1:].tolist() == alone.iloc[0].tolist()
    assert grouped["n_images"].tolist() == [15, 15] and grouped["n_attacks"].tolist() == [60, 60]


def test_a_rate_at_0_or_100_percent_gets_the_wilson_interval_of_its_units() -> None:
    # 30 images of 6 attacks each, every one successful: no resample can differ, so the
    # interval is Wilson's for 30 of 30 units (not 180 of 180 attacks)
    table = images_table(np.ones(30), attacks=6)
    clusters = rs.clusters_of(table)
    rate = rs.bootstrap_rows(table["value"].to_numpy(), clusters, statistic="rate")
    wilson = statistics.wilson_interval(30, 30)
    assert (rate.estimate, rate.low, rate.high) == (1.0, wilson.low, wilson.high)
    assert (rate.n_images, rate.n_attacks) == (30, 180)
    none = rs.bootstrap_rows(np.zeros(180), clusters, statistic="rate")
    assert (none.low, none.high) == (0.0, statistics.wilson_interval(0, 30).high)
    # strictly between 0 and 1 a rate is the mean, draw for draw
    mixed = images_table((np.arange(30) % 4 > 0).astype(float), attacks=6)
    values, clusters = mixed["value"].to_numpy(), rs.clusters_of(mixed)
    as_rate = rs.bootstrap_rows(values, clusters, statistic="rate")
    as_mean = rs.bootstrap_rows(values, clusters)
    assert (as_rate.low, as_rate.high) == (as_mean.low, as_mean.high)
    with pytest.raises(ParameterError, match="a rate needs 0/1"):
        rs.bootstrap_rows(np.full(180, 0.5), clusters, statistic="rate")


def test_any_statistic_of_one_row_per_image_is_the_ordinary_bootstrap() -> None:
    from lib.analysis import general_bootstrap

    values = np.random.default_rng(13).gamma(2.0, size=40)
    table = images_table(values)
    result = general_bootstrap.bootstrap_function((values,), rs.clusters_of(table), np.median)
    reference = ordinary(values, np.median)
    assert (result.estimate, result.low, result.high) == (
        reference.estimate, reference.low, reference.high)
    # many identical rows per image: the interval of the images
    repeated = images_table(values, attacks=5)
    again = general_bootstrap.bootstrap_function(
        (repeated["value"].to_numpy(),), rs.clusters_of(repeated), np.median)
    assert (again.low, again.high) == (reference.low, reference.high)
    assert (again.n_images, again.n_attacks) == (40, 200)


def test_the_counted_two_level_draw_has_the_distribution_of_the_row_draw() -> None:
    from lib.analysis import general_bootstrap

    rng = np.random.default_rng(14)
    rates = (0.80, 0.86, 0.92)
    table = pd.concat([images_table((rng.random(150) < p).astype(float), model=m)
                       for m, p in enumerate(rates)], ignore_index=True)
    values = table["value"].to_numpy()
    rows = rs.bootstrap_rows(values, rs.clusters_of(table, model="model"), two_level=True)
    counted = general_bootstrap.bootstrap_unit_values(values, table["model"].to_numpy())
    assert counted.estimate == pytest.approx(rows.estimate, rel=1e-12)
    assert (counted.n_images, counted.n_models, counted.n_attacks) == (450, 3, 450)
    assert counted.low == pytest.approx(rows.low, abs=0.01)
    assert counted.high == pytest.approx(rows.high, abs=0.01)
    # one model: the ordinary bootstrap of a rate
    one = table[table["model"] == 0]["value"].to_numpy()
    single = general_bootstrap.bootstrap_unit_values(one, np.zeros(150))
    assert (single.high - single.low) == pytest.approx(
        2 * 1.96 * np.sqrt(one.mean() * (1 - one.mean()) / 150), rel=0.15)
