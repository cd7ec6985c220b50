"""Tables as the book shows them (lib/analysis/readable.py)."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from lib.analysis import aggregates, paired, readable
from tests.test_metrics import AGREEING, many_attacks


@pytest.mark.parametrize(("p", "text"), [
    (0.0, "< 0.0001"), (3e-7, "< 0.0001"), (0.0001, "0.0001"), (0.03125, "0.031"),
    (0.5, "0.5"), (1.0, "1"), (math.nan, "-")])
def test_p_values_never_print_as_zero(p: float, text: str) -> None:
    assert readable.p_value_text(p) == text


def test_the_paired_table_puts_words_in_its_header_and_a_floor_under_its_p_values() -> None:
    differences = paired.paired_schedule_differences(many_attacks(AGREEING, images=60))
    assert (differences["p_signed_rank"] < readable.P_FLOOR).any()  # the case being shown
    shown = readable.paired_table(differences, unit="L1, x 1/255")
    assert list(shown.columns) == ["model", "epoch", "schedule (minus constant)",
                                   "images / pairs", "mean difference (L1, x 1/255)",
                                   "95 % interval", "signed-rank p"]
    first = differences.iloc[0]
    assert shown["images / pairs"].iloc[0] == f"{first['images']} / {first['pairs']}"
    assert "< 0.0001" in set(shown["signed-rank p"])
    assert shown["95 % interval"].iloc[0] == f"[{first['low']:.3g},\u00a0{first['high']:.3g}]"
    assert not any("_" in column for column in shown.columns)
    mixed = readable.paired_table(differences.assign(reference=["constant", "step"]
                                                     * (len(differences) // 2)
                                                     + ["constant"] * (len(differences) % 2)),
                                  unit="L1, x 1/255")
    assert list(mixed.columns)[2:4] == ["schedule", "minus"]


def test_the_ranking_table_shows_every_order_in_full() -> None:
    order = " < ".join(["loss-adaptive", "exponential", "iteration", "step", "constant"])
    changes = pd.DataFrame({"model": [0], "epoch": [5], "order_path": [order],
                            "order_refined": [order], "changed": [False]})
    html = readable.html(readable.ranking_table(changes)).data
    assert html.count(order.replace("<", "&lt;")) == 2  # a DataFrame's display would cut it
    assert "<td>no</td>" in html


def test_html_drops_the_index_and_separates_thousands() -> None:
    html = readable.html(pd.DataFrame({"epoch": [1], "frames": [31477]})).data
    assert "31,477" in html and "<th></th>" not in html and ">0</th>" not in html


def test_interval_pivot_puts_models_and_epochs_down_and_schedules_across() -> None:
    rates = aggregates.success_rates(pd.concat([many_attacks(AGREEING, images=4),
                                                many_attacks(AGREEING, images=4, model=1)]))
    shown = readable.interval_pivot(rates, value="success_rate", order=["step", "constant"],
                                    count="attacks", percent=True)
    assert list(shown.columns) == ["model", "epoch", "step", "constant"]
    assert shown[["model", "epoch"]].values.tolist() == [[0, 1], [0, 2], [1, 1], [1, 2]]
    assert shown.loc[0, "constant"].startswith("100.0\u00a0% [")
    assert shown.loc[0, "constant"].endswith("(4 images, 8 attacks)")
    plain = readable.interval_pivot(rates.drop(columns=["model", "images"]).head(5),
                                    value="success_rate", order=["constant"], count="attacks")
    assert list(plain.columns) == ["epoch", "constant"]
    assert plain.loc[0, "constant"].endswith("(n=8)")
