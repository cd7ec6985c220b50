"""The margins stage (notebooks/07_margins.py, lib/run/margins_stage.py) on the tiny profile's
real stage output: its own attacks, its tables against the attack stage's rows, and the
findings page written from the run folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from lib.analysis import margins
from lib.run import findings, margins_stage, parameters, tables
from lib.run.layout import MARGINS_STAGE
from lib.run.manifest import read_manifest


def test_the_stage_finished_and_kept_its_tables(tiny_run: Path) -> None:
    assert read_manifest(tiny_run)["stages"][MARGINS_STAGE]["finished"]
    for name in tables.MARGIN_TABLES:
        assert tables.table_path(tiny_run, name).is_file(), name


def test_every_selected_image_is_attacked_untargeted(tiny_run: Path) -> None:
    settings = parameters.stage_settings(
        MARGINS_STAGE, parameters.load_profile("tiny")[MARGINS_STAGE])
    results = margins_stage.rerun_model_rows(tables.read_results(tiny_run))
    first = margins_stage.rerun_model(results)
    selection = tables.read_table(tiny_run, "selection")
    untargeted = tables.read_table(tiny_run, "untargeted")
    compared = margins_stage.compared_epochs(results, settings)
    assert compared == sorted({int(results["epoch"].min()), int(results["epoch"].max())})
    chosen = selection[selection["epoch"].isin(compared) & (selection["model"] == first)]
    assert (untargeted["model"] == first).all()
    assert len(untargeted) == len(chosen) * len(settings.untargeted_schedules)
    assert (untargeted["mode"] == "untargeted").all() and (untargeted["target"] == -1).all()
    solved = untargeted[untargeted["success"]]
    assert (solved["final_class"] != solved["source"]).all()


def test_the_reruns_repeat_sampled_rows_with_the_margin_loss(tiny_run: Path) -> None:
    settings = parameters.stage_settings(
        MARGINS_STAGE, parameters.load_profile("tiny")[MARGINS_STAGE])
    results = margins_stage.rerun_model_rows(tables.read_results(tiny_run))
    rerun = tables.read_table(tiny_run, "margin_loss").fillna({"outcome": ""})
    original = results.set_index(["epoch", "row_id"]).loc[
        pd.MultiIndex.from_frame(rerun[["epoch", "row_id"]])]
    for column in ("schedule", "image_id", "source", "target"):
        assert (original[column].to_numpy() == rerun[column].to_numpy()).all(), column
    per_group = original.groupby(["epoch", "schedule", "success"]).size()
    limit = np.where(per_group.index.get_level_values("success"), settings.rerun_successes,
                     settings.rerun_failures)
    assert (per_group.to_numpy() <= limit).all()
    assert ((rerun["outcome"] == "") == rerun["success"]).all()
    solved = rerun[rerun["success"]]
    assert (solved["final_class"] == solved["target"]).all()


def test_the_margin_is_the_smallest_distance_in_the_attack_rows(tiny_run: Path) -> None:
    results = tables.read_results(tiny_run)
    table = tables.read_table(tiny_run, "image_margins")
    keys = ["model", "epoch", "image_id"]
    best = table[(table["method"] == margins.BEST_OF_SCHEDULES) & (table["mode"] == "targeted")
                 & (table["norm"] == "linf")].astype({"model": int}).set_index(keys)["margin"]
    assert results["model"].nunique() == 2, "the tiny chain trains two models"
    solved = results["success"] & (results["status"] == "ok")
    distance = np.where(solved, results["refined_linf"], np.inf)
    expected = results.assign(distance=distance).groupby(keys)["distance"].min()
    assert len(best) == len(expected)
    np.testing.assert_allclose(best.loc[expected.index].to_numpy(), expected.to_numpy())


def test_robust_accuracy_starts_at_the_clean_accuracy_and_falls(tiny_run: Path) -> None:
    curves = tables.read_table(tiny_run, "robust_accuracy")
    predictions = tables.read_predictions(tiny_run)
    clean = (predictions["label"] == predictions["predicted"]).groupby(
        [predictions["model"].astype(str), predictions["epoch"]]).mean()
    assert set(curves["model"]) >= {"pooled"}
    for (model, epoch, method, norm), curve in curves.groupby(["model", "epoch", "method",
                                                              "norm"]):
        curve = curve.sort_values("epsilon")
        assert curve["estimate"].is_monotonic_decreasing, (model, epoch, method, norm)
        if model != "pooled":
            assert curve["estimate"].iloc[0] == pytest.approx(clean.loc[(model, epoch)])


def test_the_findings_page_reads_the_tiny_run(tiny_run: Path) -> None:
    page = findings.findings_markdown(tiny_run)
    change = tables.read_table(tiny_run, "margin_change")
    main = change[(change["norm"] == "linf") & (change["mode"] == "targeted")
                  & (change["method"] == margins.BEST_OF_SCHEDULES)].iloc[0]
    assert f"multiplied by {main['factor']:.3g}" in page
    assert "## Why attacks fail" in page and "## What these numbers cannot say" in page
    assert "synthetic dataset" in page


@pytest.mark.parametrize(("bias", "zero"), [(-100.0, 1.0), (0.5, 0.0)], ids=["dead", "alive"])
def test_the_input_gradient_of_a_network_whose_units_are_all_inactive_is_zero(
        bias: float, zero: float) -> None:
    import torch
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 5), nn.ReLU(), nn.Linear(5, 3))
    with torch.no_grad():
        model[1].bias.fill_(bias)  # -100: every hidden unit inactive on images in [0, 1]
        model[1].weight.abs_()
    images = torch.rand(2, 3, 2, 2)
    gradient = margins_stage.input_gradient(model, images, pd.Series([1, 2]), device="cpu")
    assert gradient.shape == (2, 12)
    assert float((gradient == 0).double().mean()) == zero
