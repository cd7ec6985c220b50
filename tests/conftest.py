"""Shared fixtures: one tiny run of every stage, reused by the notebook and book tests."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lib.run import book, pipeline
from lib.run.layout import REPO


def tiny_overrides(root: Path) -> dict[str, object]:
    """Parameters that put every file of the tiny profile under ``root``."""
    return {
        "run_dir": str(root / "run"),
        "dataset_root": str(root / "cholec80-tiny"),
        "cache_dir": str(root / "cache"),
    }


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The run folder of the tiny profile, every stage executed through papermill."""
    root = tmp_path_factory.mktemp("tiny")
    return pipeline.run("tiny", overrides=tiny_overrides(root), progress=False)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--built-book", metavar="HTML_DIR", default=None,
        help="check this already built book (its _build/html, e.g. of the default profile) "
             "instead of building the tiny one, e.g. pytest tests/test_book_pages.py "
             "--built-book _build/html")


@pytest.fixture(scope="session")
def built_book(request: pytest.FixtureRequest,
               tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The book built (warnings are errors, nitpicky) from the tiny run, in a temporary
    folder with our book sources; returns its ``_build/html``. With ``--built-book`` the
    book found there instead."""
    given = request.config.getoption("--built-book")
    if given is not None:
        html = Path(given).resolve()
        if not (html / "book" / "index.html").is_file():
            raise pytest.UsageError(
                f"--built-book {given}: no book/index.html there; give the _build/html "
                "folder that 'make book' wrote")
        return html
    tiny_run = request.getfixturevalue("tiny_run")
    root = tmp_path_factory.mktemp("book")
    for name in ("_config.yml", "_toc.yml"):
        shutil.copyfile(REPO / name, root / name)
    shutil.copytree(REPO / "book", root / "book",
                    ignore=shutil.ignore_patterns("executed"))
    shutil.copytree(REPO / "_static", root / "_static",
                    ignore=shutil.ignore_patterns("vega-*.js"))
    book.prepare_book("tiny", run_dir=tiny_run, book_root=root)
    jupyter_book = Path(sys.executable).parent / "jupyter-book"
    completed = subprocess.run(
        [str(jupyter_book), "build", str(root), "-W", "-n", "--keep-going"],
        capture_output=True, text=True,
    )
    assert completed.returncode == 0, completed.stdout[-4000:]
    return root / "_build" / "html"


#: Test files that run whole stages (papermill notebooks, stage commands, book builds).
PIPELINE_FILES = frozenset({"test_kill_resume.py", "test_notebooks.py", "test_book_build.py",
                            "test_book_offline.py", "test_book_pages.py"})
#: Single tests that run a whole command in a subprocess.
PIPELINE_TESTS = frozenset({
    "test_bench_attack.py::test_the_command_prints_its_table_and_last_line",
})
#: Fixtures that run whole stages (the bad-input cases that need the stages of valid_root are
#: marked in tests/test_bad_inputs.py).
PIPELINE_FIXTURES = frozenset({"tiny_run", "valid_root", "built_book"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark ``pipeline`` every test that runs a whole stage or command: those of
    PIPELINE_FILES and PIPELINE_TESTS, those that use a PIPELINE_FIXTURES fixture, and every
    ``slow`` or ``browser`` test (each runs stages, a stage command or a book build).
    ``make check`` leaves them out."""
    for item in items:
        if (item.path.name in PIPELINE_FILES
                or f"{item.path.name}::{item.name}" in PIPELINE_TESTS
                or PIPELINE_FIXTURES & set(getattr(item, "fixturenames", ()))
                or item.get_closest_marker("slow") or item.get_closest_marker("browser")):
            item.add_marker(pytest.mark.pipeline)
