"""The publishing workflow, checked offline: GitHub's workflow schema (vendored in
check-jsonschema), the README's two commands, and the official Pages actions."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
WORKFLOW = ROOT / ".github" / "workflows" / "book.yml"


def validate(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.github-workflows",
         str(path)], capture_output=True, text=True, timeout=300)


def readme_commands() -> dict[str, str]:
    """``{"book": "make book", "test": "make test"}`` from the README's two-command block."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = text.split("## Two commands", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    commands = [line.split("#", 1)[0].strip() for line in block.strip().splitlines()]
    return {re.sub(r"^make ", "", command): command for command in commands}


def steps(job: str) -> list[dict]:
    return yaml.safe_load(WORKFLOW.read_text(encoding="utf-8"))["jobs"][job]["steps"]


def test_workflow_matches_the_github_schema(tmp_path):
    done = validate(WORKFLOW)
    assert done.returncode == 0, done.stdout + done.stderr
    broken = tmp_path / "broken.yml"  # control: the check can fail
    broken.write_text(WORKFLOW.read_text().replace("runs-on:", "runs_on:", 1))
    assert validate(broken).returncode != 0


def test_workflow_runs_the_readme_commands_tests_first():
    commands = readme_commands()
    assert commands == {"book": "make book", "test": "make test"}
    runs = [step.get("run") for step in steps("build")]
    assert commands["test"] in runs and commands["book"] in runs
    assert runs.index(commands["test"]) < runs.index(commands["book"])


def test_workflow_caches_and_publishes_with_the_official_actions():
    build = steps("build")
    uses = [step.get("uses", "").split("@")[0] for step in build]
    cached = [step["with"]["path"] for step in build if step.get("uses", "").startswith(
        "actions/cache@")]
    assert ".venv" in cached[0] and "data/cache" in cached[1]
    assert uses[-2:] == ["actions/configure-pages", "actions/upload-pages-artifact"]
    assert build[-1]["with"]["path"] == "_build/html"
    deploy = steps("deploy")
    assert [step["uses"].split("@")[0] for step in deploy] == ["actions/deploy-pages"]
    on = yaml.safe_load(WORKFLOW.read_text())[True]  # YAML 1.1 reads the key `on` as True
    assert on["push"]["branches"] == ["main"]
