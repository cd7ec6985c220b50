"""The embedded default dataset: synthetic laparoscopic videos in the exact Cholec80 layout.

:func:`generate` writes ``videos/videoNN.mp4`` (25 fps, H.264) and
``tool_annotations/videoNN-tool.txt`` (the real header, one row every 25 frames), and nothing
else: the annotation files are the ground truth, read back by the same reader as real Cholec80.

Each video is planned first (cheap, :func:`plan_annotations`): two "hands" (slots) alternate
between idle and busy episodes of a few seconds, each episode holding one tool that enters from
the border through a port, moves smoothly and leaves. The annotation of second ``k`` (frame
``25 k``) lists the tools whose episode covers ``k``; entry and exit happen strictly between
annotated frames, so the flags at annotated frames are exact. Then each frame is rendered
(tissue texture drifting under a fixed light, the tools, the circular endoscope vignette) and
encoded. Everything is derived from ``(seed, video id)``: the same seed gives byte-identical
annotation files and identical decoded frames.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from types import MappingProxyType
from typing import NamedTuple

import av
import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFilter

from lib import TOOLS
from lib.cholec80 import (
    ANNOTATION_COLUMNS,
    ANNOTATION_DIR,
    ANNOTATION_INTERVAL,
    ANNOTATION_NAME_PATTERN,
    FPS,
    VIDEO_DIR,
    VIDEO_NAME_PATTERN,
    annotation_file_name,
    format_tool_annotations,
    video_file_name,
)
from lib.errors import DatasetError, ParameterError
from lib.io import atomic_path, write_text
from lib.progress import progress_bar

#: The default profile: 16 videos of 3 min (8 train, ids 1-8; 8 test, ids 41-48), 192 x 108:
#: about 800 single-tool frames per split; 72,000 frames to render, encode and decode.
DEFAULTS = MappingProxyType(
    {
        "n_videos": 16,  # half train (ids 1..), half test (ids 41..): METHOD's default split
        "seconds_per_video": 180,  # one annotation row per second
        "width": 192,  # 16:9 like Cholec80's 854 x 480, small enough to render fast
        "height": 108,
        "seed": 0,
    }
)

#: How often each tool (label order) comes up per 81 consecutive episodes of a video: tools
#: are dealt from a shuffled deck of these cards, refilled when empty, which keeps the class
#: shares close to these in every video. Cholec80's single-tool frames are 85% Hook + Grasper
#: and 2% Scissors; we keep that order but flatten it so that every class has enough examples
#: to learn from in a small dataset.
TOOL_DECK: tuple[int, ...] = (18, 9, 22, 4, 9, 10, 9)

#: Long-run share of seconds each slot (hand) is busy. Independent slots give about 13% of
#: seconds with no tool, 55% with one and 32% with two (Cholec80: 13% / 43% / 44%); we keep
#: more single-tool seconds, the frames the study uses, per second of video rendered.
SLOT_BUSY: tuple[float, float] = (0.78, 0.41)
EPISODE_SECONDS: tuple[int, int] = (2, 8)  # shortest and longest episode, seconds
TOOL_UNIT = 0.22  # tool drawing unit (about a shaft's width) as a share of the vignette radius
TOOL_REACH = 3.4  # how far (in units) any tool part reaches ahead of the tip base

CRF = 20  # x264 quality; lower is better and larger
_START_ID = (1, 41)  # first video id of the train half and of the test half


def video_ids(n_videos: int) -> list[int]:
    """Ids of the synthetic videos: the first ceil(n/2) from 1, the others from 41.

    So METHOD's default split (videos 1-40 train, 41-80 test) splits them in halves.
    """
    if not 2 <= n_videos <= 80:
        raise ParameterError(
            f"n_videos={n_videos}: expected 2 to 80 (at least one train and one test video)."
        )
    n_train = (n_videos + 1) // 2
    return [_START_ID[0] + i for i in range(n_train)] + [
        _START_ID[1] + i for i in range(n_videos - n_train)
    ]


# --------------------------------------------------------------------------------------------
# The plan: which tool is where, when


@dataclass(frozen=True)
class _Episode:
    """One tool's visit: annotated present at seconds ``first..last`` (inclusive)."""

    label: int
    first: int
    last: int
    slot: int
    port: float  # direction (radians) of the trocar the tool comes through
    scale: float  # size relative to the default
    variant: float  # per-episode shape detail in [0, 1)
    path: np.ndarray  # float [last - first + 3, 3]: (x, y, opening) at seconds first-1..last+1


def _plan_rng(seed: int, video_id: int) -> np.random.Generator:
    return np.random.default_rng([seed, video_id, 0])


class _ToolDeck:
    """Deals tool labels from a shuffled deck (:data:`TOOL_DECK`), skipping excluded tools."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng
        self.cards: list[int] = []

    def deal(self, excluded: set[int]) -> int:
        if not any(card not in excluded for card in self.cards):
            refill = np.repeat(np.arange(len(TOOLS)), TOOL_DECK)
            self.cards += self.rng.permutation(refill).tolist()
        position = next(i for i, card in enumerate(self.cards) if card not in excluded)
        return self.cards.pop(position)


def _plan_slot(
    rng: np.random.Generator, deck: _ToolDeck, seconds: int, slot: int, taken: list[_Episode]
) -> list[tuple[int, int, int]]:
    """(label, first, last) of one slot's episodes; tools of the other slot are avoided."""
    low, high = EPISODE_SECONDS
    mean_busy = (low + high) / 2
    mean_idle = mean_busy * (1 - SLOT_BUSY[slot]) / SLOT_BUSY[slot]
    episodes = []
    second = int(rng.integers(0, 3))
    while second < seconds:
        last = min(second + int(rng.integers(low, high + 1)) - 1, seconds - 1)
        busy = {e.label for e in taken if e.first <= last and e.last >= second}
        episodes.append((deck.deal(busy), second, last))
        # idle gap (0 allowed: one tool leaves while the next enters)
        second = last + 1 + int(rng.poisson(mean_idle))
    return episodes


def _plan_path(
    rng: np.random.Generator, first: int, last: int, port: float, scale: float
) -> np.ndarray:
    """Tip positions in units of the vignette radius around its centre, and jaw opening.

    Row 0 (second first-1) and the last row (second last+1) are outside the field of view, on
    the port's side, so the tool enters and leaves between annotated frames.
    """
    n = last - first + 1
    direction = np.array([math.cos(port), math.sin(port)])
    path = np.empty((n + 2, 3))
    position = 0.3 * direction + rng.normal(0.0, 0.15, 2)
    for i in range(n):
        # a random walk kept where the whole tip is in view (a 16:9 frame cuts the circle)
        position = np.clip(position + rng.normal(0.0, 0.12, 2), [-0.6, -0.3], [0.6, 0.3])
        path[i + 1, :2] = position
        path[i + 1, 2] = rng.uniform(0.0, 1.0)
    outside = (1.05 + TOOL_REACH * TOOL_UNIT * scale) * direction  # whole tip out of view
    path[0, :2] = outside
    path[-1, :2] = outside
    path[0, 2] = path[1, 2]
    path[-1, 2] = path[-2, 2]
    return path


def _plan_episodes(seconds: int, seed: int, video_id: int) -> list[_Episode]:
    rng = _plan_rng(seed, video_id)
    deck = _ToolDeck(rng)
    episodes: list[_Episode] = []
    for slot in (0, 1):
        side = 0.0 if slot == 0 else math.pi  # slot 0 enters from the right, slot 1 from the left
        for label, first, last in _plan_slot(rng, deck, seconds, slot, episodes):
            port = side + rng.uniform(-1.2, 1.2)
            scale = rng.uniform(0.85, 1.2)
            episodes.append(
                _Episode(
                    label=label,
                    first=first,
                    last=last,
                    slot=slot,
                    port=port,
                    scale=scale,
                    variant=rng.uniform(),
                    path=_plan_path(rng, first, last, port, scale),
                )
            )
    return episodes


def _annotation_table(episodes: Sequence[_Episode], seconds: int) -> pd.DataFrame:
    flags = np.zeros((seconds, len(TOOLS)), dtype=np.int64)
    for episode in episodes:
        flags[episode.first : episode.last + 1, episode.label] = 1
    frames = np.arange(seconds, dtype=np.int64) * ANNOTATION_INTERVAL
    return pd.DataFrame(np.column_stack([frames, flags]), columns=list(ANNOTATION_COLUMNS))


def plan_annotations(video_id: int, *, seconds: int, seed: int) -> pd.DataFrame:
    """The annotation table :func:`generate` writes for one video (without rendering it).

    Returns:
        DataFrame ``Frame, Grasper, ..., SpecimenBag`` (int64), one row per second,
        ``Frame = 0, 25, 50, ...``.
    """
    return _annotation_table(_plan_episodes(seconds, seed, video_id), seconds)


# --------------------------------------------------------------------------------------------
# Rendering


class _Pose(NamedTuple):
    """Tool frame in pixels: base of the tip at (x, y), unit axis (ux, uy) pointing forward."""

    x: float
    y: float
    ux: float
    uy: float
    s: float  # pixels per local unit

    def points(self, local: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
        """Local (u forward, v sideways) coordinates in units of ``s`` -> pixel coordinates."""
        return [
            (
                self.x + self.s * (u * self.ux - v * self.uy),
                self.y + self.s * (u * self.uy + v * self.ux),
            )
            for u, v in local
        ]

    def moved(self, du: float, dv: float = 0.0) -> _Pose:
        x, y = self.points([(du, dv)])[0]
        return self._replace(x=x, y=y)

    def turned(self, angle: float) -> _Pose:
        c, s = math.cos(angle), math.sin(angle)
        return self._replace(ux=c * self.ux - s * self.uy, uy=s * self.ux + c * self.uy)


def _rect(u0: float, u1: float, v0: float, v1: float) -> list[tuple[float, float]]:
    return [(u0, v0), (u1, v0), (u1, v1), (u0, v1)]


def _lancet(length: float, width: float) -> list[tuple[float, float]]:
    """A jaw or blade outline: straight base, tapering to a rounded point."""
    return [
        (0, -width),
        (0.8 * length, -0.75 * width),
        (length, 0),
        (0.8 * length, 0.75 * width),
        (0, width),
    ]


Colour = tuple[int, ...]


class _Pens:
    """Drawing on one frame: opaque shapes directly, translucent ones (RGBA fill) blended.

    PIL blends only in "RGBA" drawing mode, which is three times slower, so it is used only for
    fills with an alpha value.
    """

    def __init__(self, image: Image.Image) -> None:
        self.image = image
        self.solid = ImageDraw.Draw(image)
        self._glass: ImageDraw.ImageDraw | None = None

    def polygon(self, xy: Sequence[tuple[float, float]], fill: Colour) -> None:
        if len(fill) == 4:
            if self._glass is None:
                self._glass = ImageDraw.Draw(self.image, "RGBA")
            self._glass.polygon(xy, fill=fill)
        else:
            self.solid.polygon(xy, fill=fill)

    def ellipse(self, box: tuple[float, float, float, float], fill: Colour) -> None:
        self.solid.ellipse(box, fill=fill)

    def line(self, xy: Sequence[tuple[float, float]], fill: Colour, width: int) -> None:
        self.solid.line(xy, fill=fill, width=width)


_STEEL: Colour = (178, 180, 186)
_STEEL_DARK: Colour = (92, 94, 100)
_STEEL_LIGHT: Colour = (236, 236, 240)


def _shaft(
    draw: _Pens,
    pose: _Pose,
    half_width: float,
    colour: Colour,
    *,
    shade: Colour = _STEEL_DARK,
    shine: Colour = _STEEL_LIGHT,
) -> None:
    """A cylinder from far behind the frame to the tip base, with a dark side and a highlight."""
    draw.polygon(pose.points(_rect(-60, 0, -half_width, half_width)), fill=colour)
    draw.polygon(pose.points(_rect(-60, 0, -half_width, -0.45 * half_width)), fill=shade)
    draw.polygon(pose.points(_rect(-60, 0, 0.2 * half_width, 0.5 * half_width)), fill=shine)


def _draw_grasper(draw: _Pens, pose: _Pose, opening: float, variant: float) -> None:
    _shaft(draw, pose, 0.32, (128, 130, 136))
    draw.polygon(pose.points(_rect(0, 0.45, -0.34, 0.34)), fill=(70, 72, 78))
    for side in (-1, 1):
        jaw = pose.moved(0.45, 0.1 * side).turned(side * (0.06 + 0.4 * opening))
        draw.polygon(jaw.points(_lancet(1.7, 0.17)), fill=_STEEL)
        draw.polygon(jaw.points(_rect(0.35, 1.2, -0.06, 0.06)), fill=(60, 30, 32))  # window


def _draw_bipolar(draw: _Pens, pose: _Pose, opening: float, variant: float) -> None:
    _shaft(draw, pose, 0.28, (128, 130, 136))
    blue = (30, 70, 190)
    draw.polygon(pose.points(_rect(-1.8, 0.25, -0.34, 0.34)), fill=blue)
    draw.polygon(pose.points(_rect(-1.8, 0.25, 0.08, 0.2)), fill=(120, 160, 240))
    for side in (-1, 1):
        prong = pose.moved(0.25, 0.1 * side).turned(side * (0.03 + 0.14 * opening))
        draw.polygon(prong.points(_lancet(2.1, 0.08)), fill=(210, 210, 214))
        draw.polygon(prong.points(_rect(1.7, 2.0, -0.05, 0.05)), fill=(250, 250, 250))


def _draw_hook(draw: _Pens, pose: _Pose, opening: float, variant: float) -> None:
    _shaft(draw, pose, 0.3, (34, 34, 38), shade=(16, 16, 18), shine=(96, 96, 104))
    draw.polygon(pose.points([(0, -0.3), (0.6, -0.12), (0.6, 0.12), (0, 0.3)]), fill=(24, 24, 28))
    metal = (214, 204, 188)
    draw.polygon(pose.points(_rect(0.6, 1.95, -0.07, 0.07)), fill=metal)
    side = 1 if variant < 0.5 else -1
    reach = side * (0.3 + 0.45 * opening)  # the hook rolls: its bend looks longer or shorter
    draw.polygon(pose.points(_rect(1.8, 1.95, 0, reach)), fill=metal)


def _blade(curve: float, length: float = 1.8, width: float = 0.15) -> list[tuple[float, float]]:
    steps = np.linspace(0.0, length, 7)
    centre = curve * steps**2
    half = width * (1.0 - 0.8 * steps / length)
    upper = [(u, c + h) for u, c, h in zip(steps, centre, half, strict=True)]
    lower = [(u, c - h) for u, c, h in zip(steps, centre, half, strict=True)]
    return upper + lower[::-1]


def _draw_scissors(draw: _Pens, pose: _Pose, opening: float, variant: float) -> None:
    _shaft(draw, pose, 0.3, (128, 130, 136))
    bend = 0.22 if variant < 0.5 else -0.22
    for side, colour in ((-1, (196, 160, 70)), (1, (226, 196, 110))):
        blade = pose.moved(0.15).turned(side * (0.04 + 0.25 * opening))
        draw.polygon(blade.points(_blade(bend)), fill=colour)
    draw.ellipse(_circle(pose.moved(0.2), 0.14), fill=(50, 40, 30))


def _circle(pose: _Pose, radius: float) -> tuple[float, float, float, float]:
    r = radius * pose.s
    return (pose.x - r, pose.y - r, pose.x + r, pose.y + r)


def _draw_clipper(draw: _Pens, pose: _Pose, opening: float, variant: float) -> None:
    _shaft(draw, pose, 0.42, (112, 115, 122))
    draw.polygon(pose.points(_rect(-1.2, -0.95, -0.43, 0.43)), fill=(48, 48, 54))
    for side in (-1, 1):
        jaw = pose.moved(0.0, 0.16 * side).turned(side * (0.02 + 0.12 * opening))
        draw.polygon(jaw.points(_rect(0, 1.25, -0.15, 0.15)), fill=(162, 164, 172))
    clip = (150, 50, 170)  # a purple polymer clip between the jaws
    draw.polygon(pose.points(_rect(0.45, 1.2, -0.1, 0.1)), fill=clip)
    draw.polygon(pose.points(_rect(1.12, 1.28, -0.16, 0.16)), fill=clip)


def _draw_irrigator(draw: _Pens, pose: _Pose, opening: float, variant: float) -> None:
    tube = (218, 218, 206)
    _shaft(draw, pose, 0.26, tube, shade=(160, 160, 150), shine=(248, 248, 244))
    draw.polygon(pose.points(_rect(0, 0.9, -0.26, 0.26)), fill=tube)
    for u in (-0.7, 0.15):
        draw.polygon(pose.points(_rect(u, u + 0.12, -0.27, 0.27)), fill=(80, 82, 86))
    draw.ellipse(_circle(pose.moved(0.9), 0.26), fill=tube)
    draw.ellipse(_circle(pose.moved(1.0), 0.1), fill=(40, 40, 44))
    if opening > 0.5:  # suction/irrigation: a translucent jet ahead of the tip
        jet = [(1.1, -0.12), (2.2 + opening, -0.35), (2.2 + opening, 0.35), (1.1, 0.12)]
        draw.polygon(pose.points(jet), fill=(205, 225, 255, 110))


def _draw_specimen_bag(draw: _Pens, pose: _Pose, opening: float, variant: float) -> None:
    _shaft(draw, pose, 0.12, (232, 232, 226), shade=(190, 190, 184), shine=(250, 250, 250))
    angles = np.linspace(0.0, 2 * math.pi, 16, endpoint=False)
    wobble = 1.0 + 0.12 * np.sin(3 * angles + 6.28 * variant)
    width = 0.9 + 0.35 * opening
    outline = [
        (1.3 + 1.3 * w * math.cos(a), width * w * math.sin(a))
        for a, w in zip(angles, wobble, strict=True)
    ]
    draw.polygon(pose.points(outline), fill=(236, 232, 220, 215))
    for v in (-0.35, 0.1, 0.45):
        draw.line(pose.points([(0.4, v * 0.6), (2.2, v)]), fill=(178, 172, 160), width=1)
    draw.line(pose.points([(0.05, -0.6), (0.05, 0.6)]), fill=(70, 70, 74), width=2)  # the rim


_DRAWERS: tuple[Callable[[_Pens, _Pose, float, float], None], ...] = (
    _draw_grasper,
    _draw_bipolar,
    _draw_hook,
    _draw_scissors,
    _draw_clipper,
    _draw_irrigator,
    _draw_specimen_bag,
)


def _smooth_noise(rng: np.random.Generator, height: int, width: int, cells: int) -> np.ndarray:
    """Value noise in [0, 1]: a random grid, bicubically enlarged. float32 [height, width]."""
    grid = rng.random((cells, max(2, cells * width // height))).astype(np.float32)
    image = Image.fromarray(grid, mode="F").resize((width, height), Image.Resampling.BICUBIC)
    return np.clip(np.asarray(image), 0.0, 1.0)


def _tissue_texture(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Moist tissue: pink-red, darker folds, vessels, fat, specular glints. uint8 [h, w, 3]."""
    base = np.array([190.0, 72.0, 70.0]) + rng.normal(0.0, [12.0, 10.0, 8.0])
    shade = 0.55 * _smooth_noise(rng, height, width, 4) + 0.45 * _smooth_noise(
        rng, height, width, 12
    )
    grain = _smooth_noise(rng, height, width, 40)
    texture = base * (0.6 + 0.6 * shade[..., None]) * (0.9 + 0.2 * grain[..., None])
    fat_share = rng.uniform(0.55, 0.85)  # some videos show more fat than others
    fat = 0.8 * np.clip((_smooth_noise(rng, height, width, 5) - fat_share) * 4.0, 0.0, 1.0)
    texture = texture * (1 - fat[..., None]) + np.array([222.0, 178.0, 120.0]) * fat[..., None]
    image = Image.fromarray(np.clip(texture, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(3, 7))):  # vessels: wandering dark-red lines
        points = [tuple(rng.uniform(0, 1, 2) * (width, height))]
        for _ in range(6):
            step = rng.normal(0, 0.08 * width, 2)
            points.append((points[-1][0] + step[0], points[-1][1] + step[1]))
        draw.line(points, fill=(118, 22, 34), width=int(rng.integers(1, 3)))
    image = image.filter(ImageFilter.GaussianBlur(0.8))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(10, 20))):  # glints of light on wet tissue
        x, y = rng.uniform(0, 1, 2) * (width, height)
        rx, ry = rng.uniform(0.6, 2.5, 2) * height / 120
        draw.ellipse((x - rx, y - ry, x + rx, y + ry), fill=(255, 250, 244))
    return np.asarray(image.filter(ImageFilter.GaussianBlur(0.5)), dtype=np.uint8)


def _light(height: int, width: int, gain: float) -> np.ndarray:
    """The endoscope's light: brightest in the centre, falling off outwards. float [h, w, 1]."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    r = np.hypot((x - (width - 1) / 2) / (width / 2), (y - (height - 1) / 2) / (width / 2))
    return (gain * (1.0 - 0.45 * r**2))[..., None]


def _vignette(height: int, width: int, radius: float) -> list[list[tuple[float, float]]]:
    """Two polygons covering what lies outside the endoscope's circle (left and right of it)."""
    cx, cy = (width - 1) / 2, (height - 1) / 2
    rows = np.linspace(-1.0, height, 17)
    half = np.sqrt(np.clip(radius**2 - (rows - cy) ** 2, 0.0, None))
    left = [(-1.0, -1.0), *zip(cx - half, rows, strict=True), (-1.0, float(height))]
    right = [(float(width), -1.0), *zip(cx + half, rows, strict=True), (float(width), height)]
    return [left, right]


def _ease(x: float) -> float:
    return x * x * (3.0 - 2.0 * x)


class _Scene:
    """Everything fixed for one video: texture, light, camera drift, the tool episodes."""

    def __init__(self, video_id: int, *, seconds: int, width: int, height: int, seed: int):
        self.width, self.height = width, height
        self.episodes = _plan_episodes(seconds, seed, video_id)
        rng = np.random.default_rng([seed, video_id, 1])
        self.margin = max(4, width // 8)
        size = (height + 2 * self.margin, width + 2 * self.margin)
        # the light is baked into the tissue, which drifts by at most a margin under it
        lit = _tissue_texture(rng, *size) * _light(*size, rng.uniform(0.85, 1.05))
        self.texture = Image.fromarray(np.clip(lit, 0, 255).astype(np.uint8))
        self.radius = 0.5 * width * rng.uniform(0.86, 0.96)
        self.outside = _vignette(height, width, self.radius)
        self.drift = rng.uniform(0, 2 * math.pi, 2), rng.uniform(9.0, 20.0, 2)  # phase, period
        self.unit = TOOL_UNIT * self.radius  # pixels per tool unit at scale 1
        # episodes on screen during second k (k < t < k + 1): from entering to leaving
        self.active: dict[int, list[_Episode]] = {}
        for episode in self.episodes:
            for second in range(episode.first - 1, episode.last + 1):
                self.active.setdefault(second, []).append(episode)

    def _camera(self, t: float) -> tuple[int, int]:
        (phase_x, phase_y), (period_x, period_y) = self.drift
        x = self.margin * (1 + 0.9 * math.sin(2 * math.pi * t / period_x + phase_x))
        y = self.margin * (1 + 0.9 * math.sin(2 * math.pi * t / period_y + phase_y))
        return int(x), int(y)

    def render(self, index: int) -> Image.Image:
        """Frame ``index`` (0-based) as an RGB image of height x width."""
        t = index / FPS
        second = math.floor(t)
        ox, oy = self._camera(t)
        canvas = self.texture.crop((ox, oy, ox + self.width, oy + self.height))
        draw = _Pens(canvas)
        cx, cy = (self.width - 1) / 2, (self.height - 1) / 2
        for episode in self.active.get(second, ()):
            if t <= episode.first - 1:  # at the annotated frame before it enters: not there
                continue
            k = second - (episode.first - 1)
            step = _ease(t - second)
            x, y, opening = (1 - step) * episode.path[k] + step * episode.path[k + 1]
            tip_x, tip_y = cx + self.radius * x, cy + self.radius * y
            port_x = cx + 2.5 * self.radius * math.cos(episode.port)
            port_y = cy + 2.5 * self.radius * math.sin(episode.port)
            length = math.hypot(tip_x - port_x, tip_y - port_y)
            axis_x, axis_y = (tip_x - port_x) / length, (tip_y - port_y) / length
            pose = _Pose(tip_x, tip_y, axis_x, axis_y, self.unit * episode.scale)
            _DRAWERS[episode.label](draw, pose, float(opening), episode.variant)
        for polygon in self.outside:
            draw.polygon(polygon, fill=(0, 0, 0))
        return canvas


# --------------------------------------------------------------------------------------------
# Writing the dataset


def _video_is_current(path: Path, *, frames: int, width: int, height: int) -> bool:
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            return (stream.frames, stream.width, stream.height) == (frames, width, height)
    except (av.FFmpegError, OSError, IndexError):
        return False


def _write_video(
    root: Path, video_id: int, *, seconds: int, width: int, height: int, seed: int, overwrite: bool
) -> bool:
    """Write one video and its annotation file; returns False when both were already there."""
    scene = _Scene(video_id, seconds=seconds, width=width, height=height, seed=seed)
    text = format_tool_annotations(_annotation_table(scene.episodes, seconds))
    video_path = root / VIDEO_DIR / video_file_name(video_id)
    annotation_path = root / ANNOTATION_DIR / annotation_file_name(video_id)
    n_frames = seconds * FPS
    if (
        not overwrite
        and annotation_path.is_file()
        and annotation_path.read_text(encoding="utf-8") == text
        and _video_is_current(video_path, frames=n_frames, width=width, height=height)
    ):
        return False
    with atomic_path(video_path) as tmp:
        with av.open(str(tmp), mode="w", format="mp4") as container:
            stream = container.add_stream("libx264", rate=FPS)
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            # one encoder thread: x264's output depends on its thread count
            stream.options = {"preset": "ultrafast", "crf": str(CRF), "threads": "1"}
            for index in range(n_frames):
                frame = av.VideoFrame.from_image(scene.render(index))
                container.mux(stream.encode(frame))
            container.mux(stream.encode(None))
    write_text(annotation_path, text)
    return True


def generate(
    root: str | os.PathLike[str],
    *,
    n_videos: int,
    seconds_per_video: int,
    width: int,
    height: int,
    seed: int,
    workers: int = 2,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Write a synthetic dataset in the Cholec80 layout under ``root``.

    Args:
        root: output folder; ``videos/`` and ``tool_annotations/`` are created in it.
        n_videos: number of videos (2-80); ids from :func:`video_ids` (1.. and 41..).
        seconds_per_video: length of each video in seconds (= annotation rows), at least 2.
        width, height: frame size in pixels (even numbers, at least 32 x 32).
        seed: all content derives from ``(seed, video id)``.
        workers: processes rendering videos in parallel (1 = in this process).
        overwrite: re-render videos that are already present and current (a video counts as
            current when its annotation file has the planned bytes and its mp4 the planned
            frame count and size; the renderer's code is not checked).
        progress: show a progress bar (:mod:`lib.progress`).

    Returns:
        ``root`` as a Path. Nothing else is written: the annotation files are the ground truth.

    Raises:
        ParameterError: an argument out of range.
        DatasetError: ``root`` holds Cholec80 files of videos outside this plan (pass
            ``overwrite=True`` to delete them, or choose another folder).
    """
    ids = video_ids(n_videos)
    if seconds_per_video < 2:
        raise ParameterError(f"seconds_per_video={seconds_per_video}: expected at least 2.")
    if width < 32 or height < 32 or width % 2 or height % 2:
        raise ParameterError(
            f"width x height = {width} x {height}: expected even sizes of at least 32 (H.264 "
            "with 4:2:0 colour needs even sizes)."
        )
    root = Path(root)
    _remove_stale(root, set(ids), overwrite=overwrite)
    (root / VIDEO_DIR).mkdir(parents=True, exist_ok=True)
    (root / ANNOTATION_DIR).mkdir(parents=True, exist_ok=True)
    jobs = [
        dict(
            root=root,
            video_id=video_id,
            seconds=seconds_per_video,
            width=width,
            height=height,
            seed=seed,
            overwrite=overwrite,
        )
        for video_id in ids
    ]
    bar = progress_bar(len(jobs), desc="synthetic videos", unit="video", enabled=progress)
    with bar:
        if workers <= 1:
            for job in jobs:
                _write_video(**job)
                bar.update()
        else:
            with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
                for _ in pool.map(_call_write_video, jobs):
                    bar.update()
    return root


def ensure(
    root: str | os.PathLike[str],
    *,
    n_videos: int,
    seconds_per_video: int,
    width: int,
    height: int,
    seed: int,
    workers: int = 2,
    progress: bool = True,
) -> Path:
    """:func:`generate` without ``overwrite``: renders only videos missing or not current."""
    return generate(
        root,
        n_videos=n_videos,
        seconds_per_video=seconds_per_video,
        width=width,
        height=height,
        seed=seed,
        workers=workers,
        overwrite=False,
        progress=progress,
    )


def _call_write_video(job: dict) -> bool:
    return _write_video(**job)


def _remove_stale(root: Path, ids: set[int], *, overwrite: bool) -> None:
    stale = []
    for folder, pattern in (
        (VIDEO_DIR, VIDEO_NAME_PATTERN),
        (ANNOTATION_DIR, ANNOTATION_NAME_PATTERN),
    ):
        if (root / folder).is_dir():
            for path in sorted((root / folder).iterdir()):
                match = pattern.match(path.name)
                if match and int(match.group(1)) not in ids:
                    stale.append(path)
    if stale and not overwrite:
        listed = ", ".join(str(p) for p in stale[:5]) + (" ..." if len(stale) > 5 else "")
        raise DatasetError(
            f"{root}: holds videos or annotation files that this synthetic dataset does not "
            f"have ({listed}). Choose an empty folder, delete them, or pass overwrite=True."
        )
    for path in stale:
        path.unlink()
