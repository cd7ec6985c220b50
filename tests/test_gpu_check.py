"""The GPU check's CPU mode: the same code the GPU runs, at tiny sizes, so the script cannot rot.

Run in a subprocess, as a user runs it; the modules it imported are listed afterwards, so a
video, notebook or book package pulled in by accident fails here (the check must run on a bare
GPU machine with torch and torchvision).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOT_NEEDED = ("av", "altair", "papermill", "jupytext", "nbformat", "myst_nb", "jupyter_book",
              "sklearn")  # PIL comes with torchvision, tqdm with lib.attack

RUNNER = """
import json, runpy, sys
sys.argv = ["gpu_check.py", "--device", "cpu", "--precisions", "float32,tf32,bfloat16"]
runpy.run_path("benchmarks/gpu_check.py", run_name="__main__")
print("MODULES " + json.dumps(sorted({name.split(".")[0] for name in sys.modules})))
"""


@pytest.mark.slow
def test_cpu_mode_runs_and_agrees_with_itself():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, "-c", RUNNER], cwd=ROOT, env=env, check=True,
                          capture_output=True, text=True, timeout=900)
    lines = done.stdout.strip().splitlines()
    modules = set(json.loads(lines[-1].removeprefix("MODULES ")))
    assert not modules & set(NOT_NEEDED), sorted(modules & set(NOT_NEEDED))
    figures = dict(item.split("=") for item in lines[-2].split())
    # CPU against CPU runs identical arithmetic: every row agrees exactly
    assert float(figures["agree_share"]) == 1.0
    assert float(figures["agree_max_l1"]) == 0.0
    expected = {f"{kind}_{p}_b4" for kind in ("engine", "limit")
                for p in ("float32", "tf32", "bfloat16")}
    assert expected <= set(figures)
    assert all(float(figures[key]) > 0 for key in expected | {"train_float32", "train_bfloat16"})
    assert "agreement, CPU vs cpu, float32: 35 rows" in done.stdout
