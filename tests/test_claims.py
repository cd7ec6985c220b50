"""The paper's claims (lib/analysis/claims.py, claim_table.py) on hand-made tables: verdicts
that follow the data, pooled over models and per model, claims that hold by construction, the
lr0 sweep of the claims, and the conclusion written from them."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from lib.analysis import statistics
from lib.analysis.claim_table import (
    CLAIM_COLUMNS,
    SWEEP_CLAIM_COLUMNS,
    claims_conclusion,
    claims_over_lr0,
    paper_claims,
    readable_claims,
)
from lib.analysis.claims import AttackSetting, ClaimRules
from lib.errors import ParameterError
from tests.test_metrics import (
    AGREEING,
    ATTACKS,
    many_attacks,
    prediction_table,
    results_table,
)

SETTING = AttackSetting(lr0=2 / 255, max_iter=100)
CLAIMS = [
    "constant reaches 100 % success within max_iter",
    "iteration reaches 100 % success within max_iter",
    "loss-adaptive reaches 100 % success within max_iter",
    "step falls short of 100 % success",
    "exponential falls short of 100 % success",
    "constant gives the largest mean L1 (successful attacks)",
    "step gives a smaller mean L1 than constant and iteration",
    "exponential gives a smaller mean L1 than constant and iteration",
    "loss-adaptive gives a smaller mean L1 than constant and iteration",
    "step and exponential need the most iterations (last epoch)",
    "step needs fewer iterations than exponential (last epoch)",
    "success rate changes little across epochs",
    "clean accuracy changes little across epochs",
]


def verdicts(results: pd.DataFrame, predictions: pd.DataFrame | None = None,
             rules: ClaimRules | None = None) -> dict[str, str]:
    claims = paper_claims(results, predictions, rules=rules or ClaimRules(), setting=SETTING)
    assert tuple(claims.columns) == CLAIM_COLUMNS
    decided = claims[claims["verdict"] != "inconclusive"]
    slack = 1e-9  # a constant difference in floating point: the interval is one point
    assert (decided["low"] <= decided["estimate"] + slack).all()
    assert (decided["estimate"] <= decided["high"] + slack).all()
    return dict(zip(claims["claim"], claims["verdict"], strict=True))


def test_every_claim_agrees_when_the_data_says_so() -> None:
    rules = ClaimRules(stable_within=0.25)  # 100 test images: Newcombe's +-0.06 at best
    results = many_attacks(AGREEING, images=80)
    assert verdicts(results, prediction_table({1: 90, 2: 91}), rules) == dict.fromkeys(
        CLAIMS, "agrees")
    claims = paper_claims(results, rules=rules).set_index("claim")
    row = claims.loc["constant reaches 100 % success within max_iter"]
    # 320 attacks of 80 images (the same images at both epochs): one trial per image
    assert (row["estimate"], row["images"], row["models"], row["attacks"]) == (1.0, 80, 1, 320)
    assert row["low"] == pytest.approx(statistics.wilson_interval(80, 80).low)
    row = claims.loc["constant gives the largest mean L1 (successful attacks)"]
    # the decisive comparison is the closest one: constant minus iteration, 1/255 less 0.01 k%3
    assert "minus iteration" in row["quantity"] and row["attacks"] == 320
    assert row["comparisons"] == 4
    assert row["estimate"] == pytest.approx(1 - 0.01 * np.mean([k % 3 for k in range(160)]))
    row = claims.loc["step needs fewer iterations than exponential (last epoch)"]
    step = np.mean([40 if k % 3 else 100 for k in range(160)])  # exponential: 60 or 100
    assert row["estimate"] == pytest.approx(step - 80)
    assert row["attacks"] == 160  # pairs at the last epoch


def test_every_claim_disagrees_when_the_data_contradicts_it() -> None:
    spec = {
        "constant": lambda k, b: (k % 10 >= 3, 5, b + 3),  # 70 %
        "iteration": lambda k, b: (k % 10 >= 3, 8, b + 5),  # farther than constant
        ("loss-adaptive", 1): lambda k, b: (k % 2 == 0, 100, b + 4),  # 50 % ...
        ("loss-adaptive", 2): lambda k, b: (True, 100, b + 4),  # ... then 100 %: not stable
        "step": lambda k, b: (True, 1, b + 6),  # never falls short, farther than both
        "exponential": lambda k, b: (True, 1, b + 6),
    }
    # 80 images: 100 % of 80 units has a lower bound above 95 % (30 would not)
    got = verdicts(many_attacks(spec, images=80), prediction_table({1: 50, 2: 100}))
    assert got == dict.fromkeys(CLAIMS, "disagrees")


def test_figure_4s_order_reversed_is_a_disagreement_of_its_own() -> None:
    # step needs more iterations than exponential (as the default build once measured) while
    # both still need more than every other schedule
    spec = {**AGREEING, "step": lambda k, b: (k % 3 != 0, 70, b + 0.5),
            "exponential": lambda k, b: (True, 50, b + 0.2)}
    got = verdicts(many_attacks(spec))
    assert got["step and exponential need the most iterations (last epoch)"] == "agrees"
    assert got["step needs fewer iterations than exponential (last epoch)"] == "disagrees"


def test_small_tables_are_inconclusive() -> None:
    got = verdicts(results_table(), prediction_table({1: 90, 2: 91}, images=10))
    for claim in ("constant reaches 100 % success within max_iter",  # 3 images: low 0.44
                  "success rate changes little across epochs",
                  "clean accuracy changes little across epochs"):
        assert got[claim] == "inconclusive"


def test_claims_without_the_schedules_or_epochs_they_need() -> None:
    one_epoch = results_table({k: v for k, v in ATTACKS.items() if k[1] == 1 and k[0] != "step"})
    claims = paper_claims(one_epoch).set_index("claim")
    for claim in ("success rate changes little across epochs",
                  "clean accuracy changes little across epochs",
                  "step falls short of 100 % success",
                  "step and exponential need the most iterations (last epoch)",
                  "step needs fewer iterations than exponential (last epoch)"):
        assert claims.loc[claim, "verdict"] == "inconclusive"
        assert claims.loc[claim, "comparisons"] == 0
    assert claims.loc["step falls short of 100 % success", "quantity"] == "schedule(s) step not run"
    assert claims.loc["success rate changes little across epochs", "quantity"] == (
        "fewer than two epochs attacked (by every model)")


def test_each_model_gets_its_own_verdict_beside_the_pooled_one() -> None:
    worse = {**AGREEING, "constant": lambda k, b: (k % 10 >= 3, 5, b + 3)}  # 70 %
    results = pd.concat([many_attacks(AGREEING, images=80, model=0),
                         many_attacks(worse, images=80, model=1, seed=1)], ignore_index=True)
    claims = paper_claims(results).set_index("claim")
    row = claims.loc["constant reaches 100 % success within max_iter"]
    assert row["model_verdicts"] == "seed 0: agrees; seed 1: disagrees"
    assert row["models_agreeing"] == 1
    assert (row["images"], row["models"], row["attacks"]) == (160, 2, 640)
    # two models: the model draw decides; model 1 drawn twice (its images redrawn) reaches
    # below its 70 %, model 0 drawn twice gives 100 %
    assert row["estimate"] == pytest.approx(0.85)
    assert 0.6 < row["low"] < 0.7 and row["high"] == pytest.approx(1.0)
    assert row["verdict"] == "inconclusive"
    row = claims.loc["loss-adaptive reaches 100 % success within max_iter"]
    assert row["model_verdicts"] == "seed 0: agrees; seed 1: agrees"
    assert row["verdict"] == "agrees" and row["models_agreeing"] == 2
    shown = readable_claims(claims.reset_index()).set_index("claim")
    assert shown.loc["constant reaches 100 % success within max_iter", "n"] == (
        "160 images, 2 models; 640 attacks")
    assert shown.loc["constant reaches 100 % success within max_iter",
                     "verdict pooled (each model)"] == (
        "inconclusive (1 of 2 agree; seed 0: agrees; seed 1: disagrees)")


def test_clean_accuracy_of_several_models_is_paired_per_image() -> None:
    predictions = pd.concat([prediction_table({1: 80, 2: 81}, images=400, model=0),
                             prediction_table({1: 85, 2: 86}, images=400, model=1)])
    row = paper_claims(many_attacks(AGREEING), predictions).set_index("claim").loc[
        "clean accuracy changes little across epochs"]
    assert row["quantity"] == "test accuracy, epoch 2 minus epoch 1, paired"
    assert row["estimate"] == pytest.approx(1 / 400)
    assert (row["images"], row["models"]) == (800, 2)
    assert -0.01 < row["low"] <= row["estimate"] <= row["high"] < 0.02
    assert row["verdict"] == "agrees" and row["model_verdicts"] == (
        "seed 0: agrees; seed 1: agrees")


def test_claims_that_hold_by_construction_say_so() -> None:
    assert [SETTING.bounded(n) for n in
            ("constant", "iteration", "exponential", "step", "loss-adaptive")] == [
        False, False, True, True, False]
    assert SETTING.total_step("step") == pytest.approx(2 * SETTING.lr0)
    assert SETTING.total_step("exponential") == pytest.approx(
        SETTING.lr0 / (1 - np.exp(-0.5)))
    claims = paper_claims(many_attacks(AGREEING), setting=SETTING).set_index("claim")
    built = claims[claims["construction"] != ""].index.tolist()
    assert built == ["step falls short of 100 % success",
                     "exponential falls short of 100 % success"]
    assert "at most 2 lr0 (4/255 per pixel value)" in claims.loc[built[0], "construction"]
    assert "at most 2.54 lr0" in claims.loc[built[1], "construction"]
    assert (claims.loc[claims.index != "clean accuracy changes little across epochs",
                       "setting"] == "lr0 = 2/255, 100 updates").all()
    # a decay that drops slowly enough to keep growing is no longer bounded
    slow = AttackSetting(lr0=2 / 255, max_iter=100, schedule_constants={"step": {"drop": 0.999}})
    assert not slow.bounded("step")


def test_the_claims_over_the_lr0_sweep() -> None:
    sweep = pd.concat([many_attacks(AGREEING, epochs=(2,)).assign(lr0=value)
                       for value in (1 / 255, 4 / 255)], ignore_index=True)
    table = claims_over_lr0(sweep, setting=SETTING)
    assert tuple(table.columns) == SWEEP_CLAIM_COLUMNS
    one_checkpoint = [c for c in CLAIMS if "changes little" not in c]
    assert table["claim"].tolist() == [c for c in one_checkpoint for _ in range(2)]
    assert table["lr0_255"].tolist() == pytest.approx([1.0, 4.0] * len(one_checkpoint))
    step = table[table["claim"] == "step falls short of 100 % success"]
    assert "(2/255 per pixel value)" in step["construction"].iloc[0]
    assert "(8/255 per pixel value)" in step["construction"].iloc[1]
    # 30 images cannot show a rate of at least 95 % (Wilson's bound for 30 of 30 is 0.886);
    # every other claim of the agreeing data agrees at both lr0
    decided = table.groupby("claim")["verdict"].agg(set)
    reach = [c for c in one_checkpoint if "reaches" in c]
    assert (decided[reach] == {"inconclusive"}).all()
    assert (decided.drop(reach) == {"agrees"}).all()


def test_claim_rules_refuse_bad_levels() -> None:
    with pytest.raises(ParameterError, match="full_success must be a share above 0"):
        ClaimRules(full_success=95)
    with pytest.raises(ParameterError, match="stable_within must be a share"):
        ClaimRules(stable_within=-0.1)


def test_the_conclusion_is_written_from_the_verdicts() -> None:
    claims = paper_claims(many_attacks(AGREEING), prediction_table({1: 90, 2: 91}),
                          setting=SETTING)
    text = claims_conclusion(claims)
    count = claims["verdict"].value_counts()
    assert text.startswith(f"Of the paper's 13 claims, our run **agrees** with {count['agrees']},")
    listed = [line for line in text.splitlines() if line.startswith("  - ")]
    assert len(listed) == 13
    inconclusive = claims.loc[claims["verdict"] == "inconclusive", "claim"].tolist()
    block = text.split("- Inconclusive:")[1]
    assert all(claim in block for claim in inconclusive)
    assert f"rest on {claims['comparisons'].sum()} comparisons" in text
    assert "2 claim(s) hold by construction" in text
    shown = readable_claims(claims).set_index("claim")
    assert shown.loc["constant reaches 100 % success within max_iter", "n"] == (
        "30 images; 120 attacks")
    assert shown.loc["step falls short of 100 % success", "checked at"].startswith(
        "lr0 = 2/255, 100 updates by construction")


def test_the_claims_table_shows_every_claim_in_full() -> None:
    claims = paper_claims(many_attacks(AGREEING), prediction_table({1: 90, 2: 91}))
    html = readable_claims(claims).to_html(index=False)
    for row in claims.itertuples():
        assert f"<td>{row.claim}</td>" in html
        assert f"<td>{row.quantity}</td>" in html.replace("&gt;", ">")
