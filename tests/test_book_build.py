"""The whole book builds from a run (warnings are errors) and its figures draw offline."""

from __future__ import annotations

from pathlib import Path

import pytest

from lib.run import layout
from tests.chromium import console_errors, render_offline

pytestmark = [pytest.mark.slow, pytest.mark.browser]

PAPER_FIGURES = ("fig-accuracy-f1", "fig-success-rate", "fig-l1-distance", "fig-iterations-lr")


def test_every_chapter_is_built(built_book: Path) -> None:
    pages = [built_book / "book" / "executed" / f"{s}.html" for s in layout.STAGES]
    pages += [built_book / "book" / f"{p}.html" for p in ("index", "method", "reproduce", "api")]
    assert [p.name for p in pages if not p.exists()] == []


def test_results_page_holds_the_four_paper_figures_by_name(built_book: Path) -> None:
    html = (built_book / "book" / "executed" / "04_analysis.html").read_text()
    for name in PAPER_FIGURES:
        assert f'id="{name}"' in html, name


def test_results_figures_draw_offline(built_book: Path) -> None:
    page = built_book / "book" / "executed" / "04_analysis.html"
    charts = page.read_text().count('<div id="altair-viz-')
    dom, log = render_offline(page)
    assert charts >= len(PAPER_FIGURES)
    assert dom.count('class="marks"') == charts
    assert console_errors(log) == []


def test_result_tables_are_downloadable(built_book: Path) -> None:
    downloads = list((built_book / "_downloads").rglob("*.csv"))
    assert downloads, "no CSV offered for download"
