"""The margins chapter's charts (lib/analysis/margin_figures.py) built from their tables."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from lib.analysis import failures, figures, margin_figures, margins, pareto
from tests.chart_specs import colours_of, drawn
from tests.test_figures import inline_rows, layer_marks
from tests.test_pareto import LR0S, sweep_rows


def test_robust_accuracy_chart_is_a_step_line_per_attack_with_its_band() -> None:
    table = pd.DataFrame({"model": 0, "epoch": [1, 1, 5, 5], "image_id": ["a", "b", "a", "b"],
                          "source": 0, "mode": "targeted", "method": margins.BEST_OF_SCHEDULES,
                          "norm": "linf", "margin": [0.01, 0.02, 0.005, math.inf],
                          "closest_target": 1, "attacks": 6, "successes": 6})
    accuracy = pd.DataFrame({"model": 0, "epoch": [1, 5], "source": 0, "test_images": 10,
                             "correct": [9, 8]})
    curves = margins.robust_accuracy(table, accuracy, epsilons=[0, 0.01, 0.03], resamples=200)
    spec = margin_figures.robust_accuracy_chart(curves, norm="linf").to_dict()
    assert spec["facet"]["field"] == "checkpoint"
    marks = dict(layer_marks(spec))
    assert marks["area"]["y"] == "low" and marks["line"]["y"] == "estimate"
    rows = next(iter(spec["datasets"].values()))
    assert [r["eps"] for r in rows[:3]] == [0, 0.01 * 255, 0.03 * 255]


def test_margin_change_chart_has_a_panel_per_norm() -> None:
    pairs = pd.DataFrame({"model": 0, "image_id": ["a", "b", "c"], "first_epoch": 1,
                          "last_epoch": 5, "first": [0.01, 0.02, math.inf],
                          "last": [0.02, 0.01, 0.03], "log_ratio": [0.7, -0.7, -np.inf],
                          "attacks": 12})
    table = pd.concat([pairs.assign(norm="linf"), pairs.assign(norm="l2")])
    spec = margin_figures.margin_change_chart(table).to_dict()
    assert len(spec["hconcat"]) == 2  # two norms side by side
    assert inline_rows(spec) == 2 * (2 + 2)  # two finite images and the diagonal's two ends


def test_pareto_outcome_and_loss_charts() -> None:
    rng = np.random.default_rng(0)
    sweep = pd.DataFrame([row for k, lr0 in enumerate(LR0S)
                          for row in sweep_rows("fast", lr0, 0.9, 0.01 * (k + 1), rng)])
    front = pareto.pareto_front(pareto.sweep_points(sweep, resamples=200))
    spec = margin_figures.pareto_chart(front, norm="linf").to_dict()
    assert inline_rows(spec) == len(front)
    shares = pd.DataFrame({"epoch": 1, "schedule": "constant", "outcome": failures.OUTCOMES,
                           "failures": [3, 0, 0, 1, 0, 0], "estimate": 0.5, "low": 0.2,
                           "high": 0.8, "n_images": 2, "n_models": 1, "n_attacks": 4})
    spec = margin_figures.outcome_chart(shares).to_dict()
    assert inline_rows(spec) == 2  # classes without a failure are not drawn
    comparison = pd.DataFrame({"epoch": [1, 5], "schedule": "constant", "quantity": "x",
                               "norm": "linf", "estimate": [0.5, np.nan], "low": 0.2,
                               "high": 0.8, "n_images": [3, 0], "n_models": 1,
                               "n_attacks": [4, 0]})
    assert inline_rows(margin_figures.loss_chart(comparison).to_dict()) == 1


def _sample_charts() -> dict:
    """Every chart of the margins chapter, drawn from small tables with all five schedules."""
    rng = np.random.default_rng(1)
    schedules = list(figures.SCHEDULE_COLOURS)
    rows = [dict(model=0, epoch=e, image_id=f"i{k}", source=k % 7, mode="targeted",
                 method=m, norm=n, margin=float(rng.uniform(0.005, 0.05)), closest_target=1,
                 attacks=6, successes=6)
            for e in (1, 3, 4, 5) for k in range(6) for m in [*schedules, margins.BEST_OF_SCHEDULES]
            for n in ("linf", "l2")]
    table = pd.DataFrame(rows)
    accuracy = pd.DataFrame([(0, e, s, 10, 9) for e in (1, 3, 4, 5) for s in range(7)],
                            columns=["model", "epoch", "source", "test_images", "correct"])
    curves = pd.concat([margins.robust_accuracy(table, accuracy, epsilons=[0, 0.01, 0.05],
                                                method=m, resamples=200) for m in
                        [*schedules, margins.BEST_OF_SCHEDULES]], ignore_index=True)
    pairs = pd.concat([margins.paired_log_ratios(table, norm=n).assign(norm=n)
                       for n in ("linf", "l2")], ignore_index=True)
    sweep = pd.DataFrame([row for name in schedules for k, lr0 in enumerate(LR0S)
                          for row in sweep_rows(name, lr0, 0.5 + 0.1 * k, 0.01 * (k + 1), rng)])
    front = pareto.pareto_front(pareto.sweep_points(sweep, resamples=200))
    shares = pd.DataFrame([dict(epoch=e, schedule=s, outcome=o, failures=2, estimate=0.2,
                                low=0.1, high=0.4, n_images=3, n_models=1, n_attacks=10)
                           for e in (1, 5) for s in schedules for o in failures.OUTCOMES])
    comparison = pd.DataFrame([dict(epoch=e, schedule=s, quantity="x", norm="linf",
                                    estimate=0.3, low=0.1, high=0.6, n_images=3, n_models=1,
                                    n_attacks=8) for e in (1, 5) for s in schedules])
    return {"robust-accuracy": margin_figures.robust_accuracy_chart(curves, norm="linf"),
            "margin-change": margin_figures.margin_change_chart(pairs),
            "pareto": margin_figures.pareto_chart(front, norm="linf"),
            "outcomes": margin_figures.outcome_chart(shares),
            "losses": margin_figures.loss_chart(comparison)}


def test_every_chart_fits_the_page_draws_words_and_keeps_the_schedule_colours() -> None:
    too_wide, named = {}, {}
    for name, chart in _sample_charts().items():
        spec = chart.to_dict()
        width, texts = drawn(spec)
        if width > figures.PAGE_WIDTH:
            too_wide[name] = width
        if [t for t in texts if "_" in t]:
            named[name] = [t for t in texts if "_" in t]
        for schedule, colour in colours_of(spec, "schedule").items():
            assert colour == figures.SCHEDULE_COLOURS[schedule], (name, schedule)
    assert too_wide == {} and named == {}
