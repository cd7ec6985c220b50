"""The book's altair charts draw with no network: vega comes from the book's own _static/."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from lib.run import book, layout
from tests.chromium import console_errors, render_offline

pytestmark = pytest.mark.browser

CHART_CELL = """\
import altair as alt
import pandas as pd
alt.Chart(pd.DataFrame({"epoch": [1, 2, 3], "accuracy": [0.5, 0.7, 0.8]})).mark_line().encode(
    x="epoch:O", y="accuracy:Q"
)
"""


@pytest.fixture(scope="module")
def chart_book(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-page book configured exactly like ours, whose page holds an executed chart."""
    root = tmp_path_factory.mktemp("chartbook")
    shutil.copyfile(layout.REPO / "_config.yml", root / "_config.yml")
    (root / "book").mkdir()
    shutil.copyfile(layout.REPO / "book" / "references.bib", root / "book" / "references.bib")
    (root / "_toc.yml").write_text("format: jb-book\nroot: page\n")
    notebook = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_markdown_cell("# A chart"),
        nbformat.v4.new_code_cell(CHART_CELL),
    ])
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                       "language": "python"}
    NotebookClient(notebook, kernel_name="python3", timeout=120).execute()
    nbformat.write(notebook, root / "page.ipynb")
    shutil.copytree(layout.REPO / "_static", root / "_static",
                    ignore=shutil.ignore_patterns("vega-*.js"))
    book.write_vega_scripts(root / "_static")
    jupyter_book = Path(sys.executable).parent / "jupyter-book"
    subprocess.run([str(jupyter_book), "build", str(root), "-W", "-n", "--keep-going"],
                   check=True, capture_output=True, text=True)
    return root / "_build" / "html" / "page.html"


def test_chart_output_would_fetch_vega_from_a_cdn_without_our_scripts(chart_book: Path) -> None:
    # Guards the premise of the test below: the page itself names a CDN, so a drawn chart
    # proves that the vega scripts came from _static/.
    html = chart_book.read_text()
    assert "cdn.jsdelivr.net" in html
    assert "_static/vega-bundle.js" in html and "_static/vega-versions.js" in html


def test_chart_draws_offline(chart_book: Path) -> None:
    dom, log = render_offline(chart_book)
    assert 'class="marks"' in dom, "vega did not draw the chart"
    # altair's loader writes its failures into the chart's div (the script source holds the
    # same words as a template, followed by "${")
    assert re.search(r"(Error loading script|Javascript Error): [^$]", dom) is None
    assert console_errors(log) == []


def test_chart_fails_without_the_bundled_scripts(chart_book: Path, tmp_path: Path) -> None:
    # The same page with our two script tags removed cannot draw: the test above is not
    # passing by accident (e.g. through a cache or a reachable network).
    html = chart_book.read_text()
    stripped = html.replace('src="_static/vega-bundle.js', 'src="_static/missing.js')
    stripped = stripped.replace('src="_static/vega-versions.js', 'src="_static/missing2.js')
    copy = chart_book.with_name("page-without-vega.html")
    copy.write_text(stripped)
    dom, _ = render_offline(copy)
    assert 'class="marks"' not in dom
