"""Shared fixtures: one tiny run of every stage, reused by the notebook and book tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from lib import pipeline


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
