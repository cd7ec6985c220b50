"""The columns and dtypes of the margins and borderline-training stages' tables, by table name:
``(columns in file order with their dtypes, what the table holds)``. :mod:`lib.run.tables`
declares them with their stage and is their one reader and writer."""

from __future__ import annotations

#: The columns of every interval row (:data:`lib.analysis.resampling.INTERVAL_COLUMNS`).
INTERVAL_DTYPES = {"estimate": "float64", "low": "float64", "high": "float64",
                   "n_images": "int64", "n_models": "int64", "n_attacks": "int64"}
#: The margins stage's tables but its own attacks: the outputs of :mod:`lib.analysis.margins`,
#: :mod:`lib.analysis.pareto`, :mod:`lib.analysis.failures` and
#: :mod:`lib.analysis.loss_comparison`, whose docstrings give the columns' meanings. ``model``
#: is "0" for a run with one model, "pooled" for a row over several.
MARGIN_COLUMNS: dict[str, tuple[dict[str, str], str]] = {
    "image_margins": ({
        "model": "str", "epoch": "int64", "image_id": "str", "source": "int64", "mode": "str",
        "method": "str", "norm": "str", "margin": "float64", "closest_target": "int64",
        "attacks": "int64", "successes": "int64"}, "per-image margins"),
    "robust_accuracy": ({
        "model": "str", "epoch": "int64", "method": "str", "mode": "str", "norm": "str",
        "epsilon": "float64", **INTERVAL_DTYPES}, "robust-accuracy curves"),
    "robust_accuracy_area": ({
        "model": "str", "epoch": "int64", "method": "str", "mode": "str", "norm": "str",
        "eps_max": "float64", **INTERVAL_DTYPES}, "robust-accuracy areas"),
    "margin_change": ({
        "model": "str", "mode": "str", "norm": "str", "method": "str", "first_epoch": "float64",
        "last_epoch": "float64", "median_first": "float64", "median_last": "float64",
        **INTERVAL_DTYPES, "factor": "float64", "factor_low": "float64",
        "factor_high": "float64", "grew": "int64", "shrank": "int64", "unresolved": "int64",
        "direction": "str"}, "margin changes over training"),
    "sweep_points": ({
        "model": "str", "schedule": "str", "lr0": "float64", "lr0_255": "float64",
        "norm": "str", "quantity": "str", **INTERVAL_DTYPES}, "lr0 sweep points"),
    "pareto_front": ({
        "model": "str", "norm": "str", "schedule": "str", "lr0": "float64",
        "lr0_255": "float64", "success_rate": "float64", "distance": "float64",
        "pareto_optimal": "bool"}, "Pareto fronts of the lr0 sweep"),
    "matched_success": ({
        "model": "str", "first": "str", "second": "str", "level": "float64", "norm": "str",
        "first_distance": "float64", "second_distance": "float64", **INTERVAL_DTYPES,
        "verdict": "str", "claim_verdict": "str", "decisive": "bool"},
        "distances at matched success"),
    "failure_outcomes": ({
        "epoch": "int64", "schedule": "str", "outcome": "str", "failures": "int64",
        **INTERVAL_DTYPES}, "outcome classes of failed attacks"),
    "frozen_failures": ({
        "model": "int64", "epoch": "int64", "schedule": "str", "source": "int64",
        "failures": "int64", "frozen": "int64"}, "failed attacks whose loss froze"),
    "frozen_gradients": ({
        "epoch": "int64", "row_id": "int64", "schedule": "str", "image_id": "str",
        "source": "int64", "target": "int64", "success": "bool", "gradient_linf": "float64",
        "zero_share": "float64"}, "input gradients where a failed attack's loss froze"),
    "loss_comparison": ({
        "epoch": "int64", "schedule": "str", "quantity": "str", "norm": "str",
        **INTERVAL_DTYPES}, "the two losses compared"),
    "rescued_by_outcome": ({
        "outcome": "str", "rerun": "int64", "solved": "int64", "share": "float64"},
        "failures the logit margin solves, per outcome class"),
}
#: The borderline-training stage's tables (:mod:`lib.run.borderline_stage`).
BORDERLINE_COLUMNS: dict[str, tuple[dict[str, str], str]] = {
    "fmn_margins": ({"model": "str", "image_id": "str", "label": "int64", "norm": "str",
                     "correct": "bool", "success": "bool", "margin": "float64"},
                    "minimum-norm margins of the training arms"),
    "fixed_epsilon": ({"model": "str", "image_id": "str", "label": "int64", "norm": "str",
                       "epsilon": "float64", "correct": "bool", "robust": "bool",
                       "distance": "float64"}, "fixed-epsilon robustness of the arms"),
    "gradients": ({"model": "str", "image_id": "str", "correct": "bool",
                   "logit_gap": "float64", "grad_l1": "float64", "grad_l2": "float64",
                   "first_order_linf": "float64", "first_order_l2": "float64"},
                  "input gradients of the arms"),
    "transfer": ({"model": "str", "image_id": "str", "norm": "str", "correct": "bool",
                  "success": "bool", "scale": "float64", "distance": "float64"},
                 "transfer distances of the arms"),
    "held_out": ({"model": "str", "epoch": "int64", "images": "int64", "correct": "int64",
                  "robust": "int64"}, "held-out robust accuracy per epoch"),
    "attack_modes": ({"model": "str", "attack": "str", "forwards": "int64",
                      "train_forwards": "int64", "restored": "bool"},
                     "the modes the evaluation attacks ran in"),
    "comparisons": ({"model": "str", "against": "str", "norm": "str",
                     "median_model": "float64", "median_against": "float64",
                     "estimate": "float64", "low": "float64", "high": "float64",
                     "n_images": "int64", "factor": "float64", "factor_low": "float64",
                     "factor_high": "float64", "grew": "int64", "shrank": "int64",
                     "unresolved": "int64", "direction": "str"},
                    "paired margin changes of the arms"),
    "claims": ({"claim": "str", "quantity": "str", "estimate": "float64",
                "low": "float64", "high": "float64", "n": "int64", "counted": "str",
                "verdict": "str", "detail": "str"}, "the borderline-training claims"),
    "arm_timings": ({"model": "str", "phase": "str", "epochs": "int64",
                     "seconds": "float64"}, "the training arms' wall times"),
}
