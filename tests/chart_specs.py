"""Read the Vega-Lite specifications of charts, and draw them as SVG, for the chart tests.

A chart in an executed notebook or a built page is altair's HTML: a script that calls
vega-embed with the specification as a JSON literal. :func:`specs_in_html` finds them;
:func:`drawn` draws one with vl-convert (the same Vega the book loads), which gives the
drawing's width and every text it draws.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator

import altair as alt

_CALL = re.compile(r"\}\)\(\{")


def specs_in_html(html: str) -> list[dict]:
    """Every Vega-Lite specification that altair's chart scripts in ``html`` hand to
    vega-embed, in page order."""
    decoder = json.JSONDecoder()
    specs = []
    for match in _CALL.finditer(html):
        spec, _ = decoder.raw_decode(html, match.end() - 1)
        if "$schema" in spec and "vega-lite" in spec["$schema"]:
            specs.append(spec)
    return specs


def drawn(spec: dict) -> tuple[int, list[str]]:
    """The width in pixels of ``spec`` drawn as SVG, and every text the drawing holds."""
    import vl_convert

    version = "_".join(alt.SCHEMA_VERSION.lstrip("v").split(".")[:2])
    svg = vl_convert.vegalite_to_svg(spec, vl_version=f"v{version}")
    width = int(float(re.search(r'<svg[^>]* width="([\d.]+)"', svg)[1]))
    texts = [re.sub(r"<[^>]+>", "", t) for t in re.findall(r"<text[^>]*>(.*?)</text>", svg,
                                                           flags=re.DOTALL)]
    return width, texts


def encodings(spec: dict) -> Iterator[tuple[str, dict]]:
    """(channel, encoding) of every encoding of ``spec``, however deep it nests them."""
    if isinstance(spec, dict):
        for channel, encoding in (spec.get("encoding") or {}).items():
            if isinstance(encoding, dict):
                yield channel, encoding
        for key, value in spec.items():
            if key in ("layer", "hconcat", "vconcat", "concat") and isinstance(value, list):
                for part in value:
                    yield from encodings(part)
            elif key == "spec":
                yield from encodings(value)


def colours_of(spec: dict, field: str) -> dict[str, str]:
    """``{category: colour}`` of every colour encoding of ``field`` in ``spec``.

    Raises:
        AssertionError: an encoding of ``field`` has no explicit domain and range (a scheme
            would colour by position, not by name), or two encodings disagree.
    """
    found: dict[str, str] = {}
    for channel, encoding in encodings(spec):
        if channel != "color" or encoding.get("field") != field:
            continue
        scale = encoding.get("scale") or {}
        assert "domain" in scale and "range" in scale, f"{field} coloured without a palette"
        for name, colour in zip(scale["domain"], scale["range"], strict=True):
            assert found.setdefault(name, colour) == colour, (name, found[name], colour)
    return found
