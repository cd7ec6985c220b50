"""The gallery of borderline images: originals, what each schedule made of them, and the
perturbations amplified, drawn as one picture that fits the book's text column.

The attack stage keeps a few attacks' images (``attack/gallery.npz``); the outcome of each
(success, L1) comes from ``attack/results.csv``. A failed attack's image is its last iterate,
which did not reach the target: its tile is framed in red and labelled "failed".
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from PIL import Image, ImageDraw, ImageFont

from lib import TOOLS

#: The picture's width in pixels: it is shown unscaled in the book's text column, so its
#: labels keep the size of the body text.
GALLERY_WIDTH = 700
#: Label size in pixels (the book's body text is 16 px).
FONT_SIZE = 15
_FAILED = (200, 30, 30)
_GAP = 6


@dataclass(frozen=True)
class GalleryExample:
    """One attacked (image, target) pair of the gallery, every schedule's image of it.

    Attributes:
        source, target: tool labels (0-6).
        original: [3, S, S] float in [0, 1].
        borderline: schedule -> [3, S, S] float in [0, 1].
        success: schedule -> whether that attack reached the target.
        l1_255: schedule -> the attack's L1 distance (x 1/255).
    """

    source: int
    target: int
    original: torch.Tensor
    borderline: dict[str, torch.Tensor]
    success: dict[str, bool]
    l1_255: dict[str, float]

    @property
    def peak(self) -> float:
        """The largest change of one pixel value over the schedules' images, in [0, 1]."""
        changes = [float((b - self.original).abs().max()) for b in self.borderline.values()]
        return max(changes + [0.0])


def gallery_examples(gallery: dict[str, np.ndarray], results: pd.DataFrame) -> list[GalleryExample]:
    """The gallery's attacks grouped by (image, target), with their outcomes.

    Args:
        gallery: ``attack/gallery.npz``: ``epoch``, ``row_id``, ``image_id``, ``schedule``,
            ``source``, ``target`` [G]; ``original`` uint8 [G, 3, S, S]; ``borderline`` float
            [G, 3, S, S] in [0, 1].
        results: ``attack/results.csv`` rows of the model the gallery shows (``epoch``,
            ``row_id``, ``success``, ``l1_255``; the first model's).
    """
    outcome = results.set_index(["epoch", "row_id"])[["success", "l1_255"]]
    keys = list(zip(gallery["epoch"].tolist(), gallery["row_id"].tolist(), strict=True))
    found = outcome.reindex(keys)
    examples: dict[tuple[str, int], dict] = {}
    for k, (image_id, target) in enumerate(zip(gallery["image_id"].tolist(),
                                              gallery["target"].tolist(), strict=True)):
        example = examples.setdefault((image_id, target), {
            "source": int(gallery["source"][k]), "target": int(target),
            "original": torch.as_tensor(gallery["original"][k]).float() / 255,
            "borderline": {}, "success": {}, "l1_255": {}})
        schedule = str(gallery["schedule"][k])
        example["borderline"][schedule] = torch.as_tensor(gallery["borderline"][k]).float()
        example["success"][schedule] = bool(found["success"].iloc[k])
        example["l1_255"][schedule] = float(found["l1_255"].iloc[k])
    return [GalleryExample(**example) for example in examples.values()]


def gallery_summary(examples: list[GalleryExample]) -> dict[str, float | int]:
    """What the caption states about the images shown.

    Returns:
        ``attacks``, ``failed`` (counts), ``largest_change_255`` (the largest change of one
        pixel value in any successful borderline image shown, x 1/255; 0 without one),
        ``mean_l1_255`` (mean L1 of the successful ones shown, NaN without one).
    """
    changes, distances, attacks, failed = [], [], 0, 0
    for example in examples:
        for schedule, image in example.borderline.items():
            attacks += 1
            if not example.success[schedule]:
                failed += 1
                continue
            changes.append(float((image - example.original).abs().max()) * 255)
            distances.append(example.l1_255[schedule])
    return {"attacks": attacks, "failed": failed,
            "largest_change_255": max(changes + [0.0]),
            "mean_l1_255": float(np.mean(distances)) if distances else float("nan")}


def _tile(image: torch.Tensor, size: int) -> Image.Image:
    """A [3, S, S] image in [0, 1] as a ``size`` x ``size`` picture (nearest neighbour when
    enlarged, so single pixels stay visible)."""
    array = (image.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    picture = Image.fromarray(array)
    method = Image.NEAREST if size >= picture.width else Image.LANCZOS
    return picture.resize((size, size), method)


def _outcome_label(example: GalleryExample, schedule: str) -> tuple[str, tuple[int, int, int]]:
    if schedule not in example.borderline:
        return "not kept", (120, 120, 120)
    if not example.success[schedule]:
        return "failed", _FAILED
    return f"L1 {example.l1_255[schedule]:.2f}", (0, 0, 0)


def _draw_example(canvas: Image.Image, draw: ImageDraw.ImageDraw, example: GalleryExample, *,
                  top: int, tile: int, names: list[str], font) -> int:
    """Draw one example from ``top``; return where the next one starts."""
    line = FONT_SIZE + 6
    amplification = 1 / (2 * example.peak) if example.peak > 0 else 1.0
    draw.text((0, top), f"{TOOLS[example.source]} attacked toward {TOOLS[example.target]}; "
              f"perturbations below amplified x{amplification:.2g}", fill="black", font=font)
    top += line
    step = tile + _GAP
    canvas.paste(_tile(example.original, tile), (0, top))
    blank = torch.full_like(example.original, 0.5)
    for column, name in enumerate(names, start=1):
        image = example.borderline.get(name)
        left = column * step
        canvas.paste(_tile(image if image is not None else torch.ones_like(blank), tile),
                     (left, top))
        delta = (image - example.original) * amplification if image is not None else None
        canvas.paste(_tile(0.5 + delta if delta is not None else blank, tile),
                     (left, top + tile + line))
        text, colour = _outcome_label(example, name)
        if colour == _FAILED:
            draw.rectangle((left, top, left + tile - 1, top + tile - 1), outline=_FAILED,
                           width=3)
        draw.text((left, top + tile + 2), text, fill=colour, font=font)
    draw.text((0, top + tile + 2), "original", fill="black", font=font)
    return top + 2 * tile + line + 2 * _GAP


def gallery_picture(gallery: dict[str, np.ndarray], results: pd.DataFrame, *,
                    schedules: list[str] | None = None,
                    width: int = GALLERY_WIDTH) -> Image.Image:
    """Borderline images, one block per attacked (image, target) pair.

    A block's first row holds the original and each schedule's borderline image, labelled
    with its L1 distance (x 1/255), or framed in red and labelled "failed" where the attack
    did not reach the target within its budget; its second row holds each perturbation,
    amplified so that mid-grey is no change and the largest change of the block spans half
    the grey range (the factor is written above the block). Column heads name the schedules.

    Args:
        gallery: ``attack/gallery.npz`` (see :func:`gallery_examples`).
        results: ``attack/results.csv`` (the outcome of every attack shown).
        schedules: column order; default the order of first appearance.
        width: the picture's width in pixels.

    Returns:
        An RGB PIL image ``width`` pixels wide.
    """
    examples = gallery_examples(gallery, results)
    names = schedules or list(dict.fromkeys(gallery["schedule"].tolist()))
    font = ImageFont.load_default(size=FONT_SIZE)
    tile = (width - _GAP * len(names)) // (1 + len(names))
    line = FONT_SIZE + 6
    block = 3 * line + 2 * tile + 2 * _GAP
    canvas = Image.new("RGB", (width, line + block * len(examples)), "white")
    draw = ImageDraw.Draw(canvas)
    for column, name in enumerate(names, start=1):
        draw.text((column * (tile + _GAP), 0), name, fill="black", font=font)
    top = line
    for example in examples:
        top = _draw_example(canvas, draw, example, top=top, tile=tile, names=names, font=font)
    return canvas
