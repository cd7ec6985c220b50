"""The built book as a reader sees it, in headless Chromium at 1400 and 800 px: no page
scrolls sideways, every chart is drawn whole inside its column, no table or picture is cut or
shrunk, every chart's text is words (no column name) and every schedule has one colour."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from lib.analysis import figures
from lib.analysis.gallery import GALLERY_WIDTH
from lib.run import layout
from tests.chart_specs import colours_of, drawn, specs_in_html
from tests.chromium import page_layout

pytestmark = [pytest.mark.slow, pytest.mark.browser]

CHAPTERS = [*(f"executed/{stage}" for stage in layout.STAGES),
            "index", "method", "reproduce", "api", "references"]
WIDTHS = (1400, 800)


def page(built_book: Path, chapter: str) -> Path:
    return built_book / "book" / f"{chapter}.html"


@pytest.fixture(scope="module")
def layouts(built_book: Path) -> dict[tuple[str, int], dict]:
    return {(chapter, width): page_layout(page(built_book, chapter), width=width)
            for chapter in CHAPTERS for width in WIDTHS}


@pytest.mark.parametrize("width", WIDTHS)
def test_no_page_scrolls_sideways(layouts: dict, width: int) -> None:
    wide = {chapter: found["page"] for (chapter, w), found in layouts.items()
            if w == width and found["page"] > found["window"]}
    assert wide == {}


@pytest.mark.parametrize("width", WIDTHS)
def test_every_chart_is_drawn_whole_inside_its_column(layouts: dict, width: int) -> None:
    charts = [(chapter, chart) for (chapter, w), found in layouts.items() if w == width
              for chart in found["charts"]]
    assert len(charts) >= 15  # the tiny book's charts were all found
    undrawn = [(chapter, c["name"]) for chapter, c in charts if c["drawn"] is None]
    cut = [(chapter, c["name"], round(c["drawn"]["right"] - c["holder"]["left"]),
            c["holderClient"]) for chapter, c in charts if c["drawn"] is not None
           and (c["drawn"]["right"] > c["holder"]["left"] + c["holderClient"] + 1
                or c["drawn"]["left"] < c["holder"]["left"] - 1)]
    assert undrawn == [] and cut == []


@pytest.mark.parametrize("width", WIDTHS)
def test_no_table_formula_or_picture_is_cut(layouts: dict, width: int) -> None:
    scrolled = [(chapter, s["name"], s["tag"], s["scrollWidth"], s["clientWidth"])
                for (chapter, w), found in layouts.items() if w == width
                for s in found["scrolled"]]
    assert scrolled == []


@pytest.mark.parametrize("width", WIDTHS)
def test_the_gallery_is_shown_at_its_own_size(layouts: dict, width: int) -> None:
    # a picture scaled down to the column would shrink its labels below the body text
    (gallery,) = [p for p in layouts[("executed/04_analysis", width)]["pictures"]
                  if p["name"] == "fig-gallery"]
    assert gallery["natural"] == GALLERY_WIDTH and gallery["shown"] == GALLERY_WIDTH


@pytest.fixture(scope="module")
def chart_specs(built_book: Path) -> dict[str, list[dict]]:
    return {chapter: specs_in_html(page(built_book, chapter).read_text())
            for chapter in CHAPTERS}


def test_every_chart_draws_words_not_column_names(chart_specs: dict) -> None:
    assert sum(map(len, chart_specs.values())) >= 15
    named = {}
    for chapter, specs in chart_specs.items():
        for k, spec in enumerate(specs):
            width, texts = drawn(spec)
            assert width <= figures.PAGE_WIDTH, (chapter, k, width)
            underscored = [t for t in texts if "_" in t]
            if underscored:
                named[f"{chapter} chart {k + 1}"] = underscored
    assert named == {}


def test_every_schedule_has_one_colour_across_the_book(chart_specs: dict) -> None:
    seen: dict[str, set[str]] = {}
    charts = 0
    for specs in chart_specs.values():
        for spec in specs:
            found = colours_of(spec, "schedule")
            charts += bool(found)
            for schedule, colour in found.items():
                seen.setdefault(schedule, set()).add(colour)
    assert charts >= 6
    assert {s: c for s, c in seen.items() if len(c) > 1} == {}
    assert {s: c.pop() for s, c in seen.items()} == {
        s: figures.SCHEDULE_COLOURS[s] for s in seen}


def test_each_chapter_shows_its_parameters_once_as_a_table(built_book: Path) -> None:
    for stage in layout.STAGES:
        html = page(built_book, f"executed/{stage}").read_text()
        assert html.count("Parameters of this build") == 1, stage
        # neither the notebook's parameters cell nor papermill's injected cell is shown
        assert "# Parameters" not in html and re.search(r"run_dir\s*=", html) is None, stage


def test_the_book_holds_no_progress_bar(built_book: Path) -> None:
    bars = {chapter: re.findall(r"\d+%\|[^|]*\|", page(built_book, chapter).read_text())
            for chapter in CHAPTERS}
    assert {c: b for c, b in bars.items() if b} == {}
