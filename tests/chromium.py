"""Open a built page in headless Chromium with the network off; return the DOM and console.

Used by the tests that prove the book's charts draw offline. ``make test`` installs Debian's
``chromium`` when it is missing.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    # No network at all: every host name fails to resolve and any proxy use fails.
    "--host-resolver-rules=MAP * ~NOTFOUND",
    "--proxy-server=http://127.0.0.1:9",
    "--enable-logging=stderr",
    "--v=0",
    "--virtual-time-budget=15000",
]


def chromium_binary() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        raise RuntimeError(
            "chromium is not installed; `make test` installs it (apt-get install chromium)")
    return found


def render_offline(page: Path) -> tuple[str, str]:
    """Load ``page`` (a file path) with scripts running; return (DOM after scripts, console log)."""
    with tempfile.TemporaryDirectory() as profile:
        completed = subprocess.run(
            [chromium_binary(), *FLAGS, f"--user-data-dir={profile}", "--dump-dom",
             page.resolve().as_uri()],
            capture_output=True, text=True, timeout=180,
        )
    return completed.stdout, completed.stderr


def console_errors(log: str) -> list[str]:
    """Console lines that report a failed load or an uncaught script error.

    Every Jupyter Book 1 page redeclares ``THEBE_JS_URL``; that harmless line is ignored.
    """
    bad = ("Failed to load", "Uncaught", "Error loading script", "ERR_")
    return [
        line for line in log.splitlines()
        if "CONSOLE" in line and any(b in line for b in bad) and "THEBE_JS_URL" not in line
    ]
