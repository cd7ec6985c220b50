"""Conclusions in words (lib/analysis/conclusions.py) and the page "What this build found"
(lib/run/findings.py), from hand-made tables: every verdict gives its own sentence, and every
number in a sentence is the table's."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from lib.analysis import conclusions as cc
from lib.analysis.margins import BEST_KNOWN, BEST_OF_SCHEDULES, POOLED
from lib.run import findings, layout, tables


def change_row(*, model: str = "0", norm: str = "linf", mode: str = "targeted",
               method: str = BEST_OF_SCHEDULES, factor: tuple[float, float, float],
               direction: str, n_images: int = 19) -> dict:
    estimate, low, high = (math.log(v) for v in factor)
    single = model != POOLED
    return {"model": model, "mode": mode, "norm": norm, "method": method,
            "first_epoch": 1.0 if single else np.nan, "last_epoch": 5.0 if single else np.nan,
            "median_first": 5.0 / 255, "median_last": 3.25 / 255, "estimate": estimate,
            "low": low, "high": high, "n_images": n_images, "n_models": 1,
            "n_attacks": 40 * n_images, "factor": factor[0], "factor_low": factor[1],
            "factor_high": factor[2], "grew": 5, "shrank": 14, "unresolved": 0,
            "direction": direction}


@pytest.mark.parametrize(("factor", "direction", "words"), [
    ((1.8, 1.3, 2.4), "grows", "the Linf margin grows."),
    ((0.6, 0.45, 0.8), "shrinks", "the Linf margin shrinks."),
    ((0.7, 0.46, 1.0), "inconclusive", "the interval does not decide (inconclusive)"),
], ids=["grows", "shrinks", "inconclusive"])
def test_the_margin_sentence_follows_the_verdict(factor, direction, words) -> None:
    change = pd.DataFrame([change_row(factor=factor, direction=direction),
                           change_row(norm="l2", factor=(0.8, 0.6, 1.2),
                                      direction="inconclusive"),
                           change_row(mode="untargeted", factor=(0.9, 0.8, 0.95),
                                      direction="shrinks", n_images=28)])
    text = cc.margin_paragraph(change)
    assert words in text
    assert "From epoch 1 to epoch 5" in text
    assert "of the 19 images attacked at both ends went from 5/255 to 3.25/255" in text
    assert f"multiplied by {factor[0]:.3g} [{factor[1]:.3g}, {factor[2]:.3g}]" in text
    assert "95 % interval; 1 model, 760 attacks" in text
    assert "L2 0.8 [0.6, 1.2] (inconclusive)" in text
    assert "untargeted borderline distance the Linf factor is 0.9 [0.8, 0.95] (shrinks, 28 " \
           "images)" in text


def test_without_the_margins_stage_the_page_says_so() -> None:
    assert "did not run" in cc.margin_paragraph(None)
    assert "not made" in cc.fair_paragraph(None)
    assert "not computed" in cc.failure_paragraph(None, None)
    assert "did not run" in cc.minimality_paragraph(None, {})


def matched_rows(verdicts: list[str], claim: str, decisive: int) -> pd.DataFrame:
    rows = []
    for k, (other, level) in enumerate([("constant", 0.5), ("constant", 0.75),
                                        ("iteration", 0.5), ("iteration", 0.75)]):
        rows.append({"model": "0", "first": "loss-adaptive", "second": other, "level": level,
                     "norm": "linf", "first_distance": 0.03, "second_distance": 0.05,
                     "estimate": -0.02 + 0.01 * k, "low": -0.03, "high": -0.01 + 0.02 * k,
                     "n_images": 7, "n_models": 1, "n_attacks": 84, "verdict": verdicts[k],
                     "claim_verdict": claim, "decisive": k == decisive})
    return pd.DataFrame(rows)


@pytest.mark.parametrize(("verdicts", "claim", "decisive", "expected"), [
    (["agrees"] * 4, "agrees", 0, "Linf: **agrees** (deciding comparison: loss-adaptive minus "
     "constant at 50 % success = -5.1/255 [-7.65/255, -2.55/255])"),
    (["agrees", "disagrees", "agrees", "agrees"], "disagrees", 1,
     "Linf: **disagrees** (deciding comparison: loss-adaptive minus constant at 75 %"),
    (["agrees", "agrees", "inconclusive", "agrees"], "inconclusive", 2,
     "Linf: **inconclusive** (deciding comparison: loss-adaptive minus iteration at 50 %"),
], ids=["agrees", "disagrees", "inconclusive"])
def test_the_fair_sentence_names_the_deciding_comparison(verdicts, claim, decisive,
                                                         expected) -> None:
    text = cc.fair_paragraph(matched_rows(verdicts, claim, decisive))
    assert expected in text
    assert "than constant and iteration" in text and "(50 % and 75 %" in text
    assert "7 images, 1 model, 4 paired comparisons" in text


def test_several_models_are_counted_and_pooled() -> None:
    rows = [change_row(model=m, factor=f, direction=d) for m, f, d in (
        ("0", (0.6, 0.4, 0.8), "shrinks"), ("1", (0.7, 0.5, 0.9), "shrinks"),
        ("2", (0.9, 0.6, 1.3), "inconclusive"))]
    rows.append(change_row(model=POOLED, factor=(0.7, 0.5, 0.95), direction="shrinks",
                           n_images=57))
    change = pd.DataFrame(rows)
    text = cc.models_paragraph(change)
    assert ("3 trained models: the Linf margin grows in 0, shrinks in 2 and is inconclusive "
            "in 1 of them.") in text
    assert "Pooled (models, then images resampled" in text and text.endswith("shrinks.")
    # the pooled row is the one stated
    assert "57 images" in cc.margin_paragraph(change)
    assert "From each model's first to its last" in cc.margin_paragraph(change)
    one = cc.models_paragraph(pd.DataFrame([rows[0]]))
    assert one.startswith("One trained model")


def test_claims_failures_minimality_and_limitations() -> None:
    claims = pd.DataFrame({"claim": ["a", "b", "c"],
                           "verdict": ["agrees", "disagrees", "inconclusive"]})
    text = cc.claims_paragraph(claims, source="the results chapter")
    assert text == ("Of 3 claims checked in the results chapter: 1 agree, 1 disagree, 1 "
                    "inconclusive. Disagreeing: b.")
    table = claims.assign(quantity="q", estimate=0.5, low=0.25, high=0.75, n=9,
                          counted="pairs")
    assert cc.claim_sentence(table, ["b"]) == (
        'Read as the paper reads it, over successful attacks only, "b" gets the verdict '
        "**disagrees**: q = 0.5 [0.25, 0.75] (9 pairs).")
    assert cc.claim_sentence(table, ["z"]) == "" and cc.claim_sentence(None, ["b"]) == ""
    pooled = claims.assign(quantity="q", estimate=0.5, low=0.25, high=0.75, images=40,
                           models=3, attacks=600, counted="pairs", models_agreeing=2)
    assert cc.claim_sentence(pooled, ["b"]).endswith(
        "q = 0.5 [0.25, 0.75] (40 images, 3 models, 600 pairs); 2 of 3 models agree on their "
        "own.")
    sweep = pd.DataFrame({"claim": ["b", "b", "a"], "lr0": [0.016, 0.004, 0.004],
                          "lr0_255": [4.08, 1.02, 1.02],
                          "verdict": ["agrees", "inconclusive", "disagrees"]})
    assert cc.sweep_claim_sentence(sweep, ["b"]) == (
        'Checked the same way at every lr0 of the sweep, "b" reads: lr0 1/255: inconclusive; '
        "lr0 4.1/255: agrees.")
    outcomes = pd.DataFrame({"epoch": 1, "schedule": "constant",
                             "outcome": ["third class", "stuck", "saturated"],
                             "failures": [6, 0, 2]})
    rescued = pd.DataFrame({"outcome": ["third class", "stuck", "saturated"],
                            "rerun": [4, 0, 2], "solved": [3, 0, 0], "share": [0.75, np.nan, 0]})
    text = cc.failure_paragraph(outcomes, rescued)
    assert "Of 8 failed attacks, by outcome: third class 6 (75 %), saturated 2 (25 %)." in text
    assert "3 of 6 sampled failures succeed (third class 3 of 4, saturated 0 of 2)" in text
    gradients = pd.DataFrame({"zero_share": [1.0, 1.0, 0.4]})
    text = cc.failure_paragraph(outcomes, rescued, gradients)
    assert ("Of 3 saturated failures whose loss froze, run again, 2 end on an image where the "
            "input gradient is exactly 0 in every value") in text
    ratios = pd.DataFrame({"epoch": 5, "norm": ["linf", "linf", "l1", "l1"],
                           "schedule": ["a", "b", "a", "b"], "pairs": 30,
                           "median_ratio": [1.12, 1.14, 17.0, 27.0]})
    text = cc.minimality_paragraph(ratios, {"linf": {"outcome": "agrees"}})
    assert "Linf 1.12 to 1.14 times the best known (loss-adaptive closest: agrees)" in text
    assert "L1 17 to 27 times the best known (loss-adaptive closest: inconclusive)" in text
    assert text.endswith("They come closest to minimal in Linf (the geometry of a sign step).")
    text = cc.minimality_paragraph(ratios.assign(median_ratio=[3.0, 4.0, 1.5, 2.0]), {})
    assert text.endswith("They come closest to minimal in L1.")
    text = cc.limitations_paragraph(data_kind="synthetic", image_size=64, models=1, per_class=4,
                                    epochs=[1, 3, 4, 5], max_iter=100, lr0=0.008,
                                    sweep_images=7, pairs=60)
    assert "synthetic dataset" in text and "AlexNet at 64 px, 1 trained model;" in text
    assert "4 images per tool at each of the checkpoints 1, 3, 4, 5, 100 updates" in text
    assert "initial step 2/255" in text and "7 images, the minimality comparison 60 pairs" in text


def test_the_findings_page_is_written_from_the_run_folder(tmp_path) -> None:
    run = tmp_path / "run"
    tables.write_record(run, "manifest", {"stages": {
        "01_data": {"parameters": {"dataset_kind": "synthetic", "image_size": 64},
                    "finished": True},
        "07_margins": {"parameters": {}, "finished": True}}})
    tables.write_record(run, "job", {"settings": {"n_per_class": 4, "max_iter": 100,
                                                  "lr0": 0.008}})
    change = pd.DataFrame([change_row(factor=(0.7, 0.46, 1.0), direction="inconclusive"),
                           change_row(mode="any", method=BEST_KNOWN, factor=(0.6, 0.4, 0.9),
                                      direction="shrinks")])
    tables.write_table(run, "margin_change", change)
    tables.write_table(run, "matched_success",
                       matched_rows(["agrees"] * 4, "agrees", 0))
    claims = pd.DataFrame({"claim": ["x", "y"], "verdict": ["agrees", "agrees"], "n": [1, 2]})
    tables.write_analysis_table(run, "paper_claims", claims)
    extra = layout.stage_dir(run, "06_borderline" if "06_borderline" in layout.STAGES
                             else layout.MARGINS_STAGE) / "borderline_claims.csv"
    extra.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"claim": ["training on borderline images widens the margin"],
                  "verdict": ["inconclusive"]}).to_csv(extra, index=False)
    page = findings.findings_markdown(run)
    assert page.startswith("# What this build found\n")
    assert "the Linf margin changes by an amount the interval does not decide" in page
    assert "best-known distance (every attack of the run, reference attacks included) the Linf" \
           " factor is 0.6 [0.4, 0.9] (shrinks" in page
    assert "Linf: **agrees**" in page
    assert "Of 2 claims checked in the results chapter" in page
    assert ("Of 1 claim checked in {doc}`06_borderline` (`borderline/borderline_claims.csv`): "
            "0 agree") in page
    assert "The minimality stage did not run per norm" in page
    assert "One trained model" in page and "synthetic dataset" in page
    assert "Stages run: 01_data, 07_margins." in page
    path = findings.write_findings(run, tmp_path / "book" / findings.PAGE)
    assert path.read_text() == page
