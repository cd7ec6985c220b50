"""Altair chart builders and image grids shared by the notebooks.

Every chart takes a tidy DataFrame (one row per observation, columns named as in the run
folder's tables) and returns an ``alt.Chart``; the notebooks only choose and arrange them.
Charts get their data inline, so callers pass aggregated tables, not raw per-attack rows.
"""

from __future__ import annotations

import altair as alt
import numpy as np
import pandas as pd
import torch
from PIL import Image
from torchvision.utils import make_grid

from lib import TOOLS

#: One colour per tool, fixed across every chart of the book.
TOOL_SCALE = alt.Scale(domain=list(TOOLS), scheme="tableau10")


def class_counts_chart(counts: pd.DataFrame) -> alt.Chart:
    """Grouped bars of frames per tool and split.

    Args:
        counts: columns ``split`` ("train"/"test"), ``tool`` (a name of :data:`lib.TOOLS`),
            ``frames`` (int >= 0).
    """
    return (
        alt.Chart(counts)
        .mark_bar()
        .encode(
            x=alt.X("tool:N", sort=list(TOOLS), title=None),
            xOffset=alt.XOffset("split:N", sort=["train", "test"]),
            y=alt.Y("frames:Q", title="single-tool frames"),
            color=alt.Color("split:N", sort=["train", "test"], title="split"),
            tooltip=["split", "tool", "frames"],
        )
        .properties(width=420, height=220)
    )


def tool_share_chart(shares: pd.DataFrame) -> alt.Chart:
    """Stacked bars: the share of annotated frames with 0, 1 and 2+ tools per split.

    Args:
        shares: columns ``split``, ``tools_present`` ("0", "1", "2+"), ``frames`` (int),
            ``share`` (in [0, 1]).
    """
    return (
        alt.Chart(shares)
        .mark_bar()
        .encode(
            y=alt.Y("split:N", sort=["train", "test"], title=None),
            x=alt.X("share:Q", stack="normalize", axis=alt.Axis(format="%"),
                    title="share of annotated frames"),
            color=alt.Color("tools_present:N", sort=["0", "1", "2+"], title="tools in frame"),
            order=alt.Order("tools_present:N"),
            tooltip=["split", "tools_present", "frames", alt.Tooltip("share:Q", format=".1%")],
        )
        .properties(width=420, height=80)
    )


def image_grid(images: torch.Tensor, *, columns: int, scale: int = 2) -> Image.Image:
    """Tile images into one picture for the book.

    Args:
        images: [N, 3, H, W], uint8 in [0, 255] or float in [0, 1].
        columns: images per row.
        scale: integer upscaling (nearest neighbour), so small frames stay visible.

    Returns:
        An RGB PIL image (notebooks display it as PNG).
    """
    if images.dtype == torch.uint8:
        images = images.float() / 255
    grid = make_grid(images.clamp(0, 1), nrow=columns, padding=2, pad_value=1.0)
    array = (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    picture = Image.fromarray(array)
    if scale != 1:
        picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
    return picture
