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


# A script added to a copy of a page: once every chart has drawn (or after 20 s of the page's
# virtual time), it writes what a reader would see cut or scrolled into the DOM as JSON.
LAYOUT_SCRIPT = """
<script>
(function () {
  function box(element) {
    var r = element.getBoundingClientRect();
    return {left: r.left, right: r.right, width: r.width};
  }
  function name(element) {
    var figure = element.closest("figure");
    if (figure && figure.id) { return figure.id; }
    var labelled = element.closest("[id]");
    return labelled ? labelled.id : element.tagName.toLowerCase();
  }
  function measure() {
    var article = document.querySelector("article.bd-article") || document.body;
    var result = {
      window: window.innerWidth,
      page: document.documentElement.scrollWidth,
      article: box(article),
      charts: [], scrolled: [], pictures: []
    };
    article.querySelectorAll("img").forEach(function (picture) {
      result.pictures.push({name: name(picture), natural: picture.naturalWidth,
                            shown: picture.getBoundingClientRect().width});
    });
    document.querySelectorAll("div[id^='altair-viz-']").forEach(function (chart) {
      var drawn = chart.querySelector("canvas, svg.marks");
      var holder = chart.closest(".cell_output") || chart.parentElement;
      result.charts.push({
        name: name(chart),
        drawn: drawn ? box(drawn) : null,
        holder: box(holder),
        holderClient: holder.clientWidth
      });
    });
    article.querySelectorAll("table, .math, img, svg, canvas").forEach(function (element) {
      var scroller = element.parentElement;
      while (scroller && scroller !== article) {
        var style = getComputedStyle(scroller);
        if (scroller.scrollWidth > scroller.clientWidth + 1 &&
            (style.overflowX === "auto" || style.overflowX === "scroll" ||
             style.overflowX === "hidden")) {
          result.scrolled.push({name: name(element), tag: element.tagName.toLowerCase(),
                                scrollWidth: scroller.scrollWidth,
                                clientWidth: scroller.clientWidth});
          break;
        }
        scroller = scroller.parentElement;
      }
    });
    var out = document.createElement("script");
    out.type = "application/json";
    out.id = "borderline-layout";
    out.textContent = JSON.stringify(result);
    document.body.appendChild(out);
  }
  var waited = 0;
  function poll() {
    var charts = document.querySelectorAll("div[id^='altair-viz-']").length;
    var drawn = document.querySelectorAll(
      "div[id^='altair-viz-'] canvas, div[id^='altair-viz-'] svg.marks").length;
    if ((drawn >= charts && waited >= 500) || waited >= 20000) { measure(); return; }
    waited += 250;
    setTimeout(poll, 250);
  }
  window.addEventListener("load", function () { setTimeout(poll, 250); });
})();
</script>
"""


def page_layout(page: Path, *, width: int, height: int = 1000) -> dict:
    """What ``page`` looks like in a window ``width`` px wide, once its charts have drawn.

    Returns the window's and the page's width (a page wider than its window scrolls
    sideways), the article's box, for every chart the box of what it drew and of the output
    that holds it, every picture's own and shown width, and every table, formula or picture
    whose box scrolls or cuts it.
    """
    import json
    import re

    html = page.read_text(encoding="utf-8")
    probe = page.with_name(f".layout-{page.name}")  # beside the page: its links still resolve
    probe.write_text(html.replace("</body>", LAYOUT_SCRIPT + "</body>", 1), encoding="utf-8")
    try:
        with tempfile.TemporaryDirectory() as profile:
            completed = subprocess.run(
                [chromium_binary(), *FLAGS, f"--user-data-dir={profile}", "--hide-scrollbars",
                 f"--window-size={width},{height}", "--dump-dom", probe.resolve().as_uri()],
                capture_output=True, text=True, timeout=180,
            )
    finally:
        probe.unlink()
    found = re.search(r'<script type="application/json" id="borderline-layout">(.*?)</script>',
                      completed.stdout, flags=re.DOTALL)
    if found is None:
        raise RuntimeError(f"{page.name}: the layout script wrote nothing; "
                           f"chromium said: {completed.stderr[-2000:]}")
    return json.loads(found[1])
