"""Procedural scenes of coloured shapes, with captions written from their parameters.

This is the world the default model was trained on and the one the training-efficacy tests and benchmark draw
from. A scene is a small dataclass; `render` draws it with Pillow (4x supersampled, then downscaled, so edges are
anti-aliased like a photo's) and `caption` says it in words ("two small red circles on a blue background").

Two things are deliberately kept out of the base model's captioned training set so that personalization can be
tested on something new: the colour orange (`HELD_OUT_COLOR`, the Textual Inversion concept) and black outlines
(`Scene.outline`, the hypernetwork style).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

# Colours the base model learns by name. Black is absent on purpose: it is the outline style's colour, so a black
# pixel in a generated image can only come from the style.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "white": (245, 245, 245),
    "gray": (128, 128, 128),
    "purple": (140, 60, 170),
}
HELD_OUT_COLOR = "orange"
HELD_OUT_RGB = (255, 140, 0)
OUTLINE_RGB = (0, 0, 0)
OUTLINE_WIDTH = 0.06  # of the image side: about 4 pixels at 64x64, thick enough to survive the 8x-down VAE
# Every colour a picture may contain: the VAE, a generic codec, learns all of them (black as a fill too).
ALL_COLORS = {**COLORS, HELD_OUT_COLOR: HELD_OUT_RGB, "black": OUTLINE_RGB}

SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 0.14, "large": 0.28}  # radius as a fraction of the image side
POSITIONS = {
    "in the center": (0.5, 0.5),
    "on the left": (0.27, 0.5),
    "on the right": (0.73, 0.5),
    "at the top": (0.5, 0.27),
    "at the bottom": (0.5, 0.73),
}
COUNT_WORDS = {1: "a", 2: "two"}
SUPERSAMPLE = 4
FRAMES = ("a photo of", "a picture of", "a rendering of", "an image of", "a painting of", "a cropped photo of")


@dataclass(frozen=True)
class Scene:
    """One picture: `count` equal shapes of one colour on a plain background."""

    shape: str
    color: str
    background: str
    size: str
    count: int
    position: str  # for one shape; two shapes sit side by side (left/right) or stacked (top/bottom)
    jitter: tuple[float, float] = (0.0, 0.0)
    outline: bool = False


def sample_scene(
    rng: random.Random,
    colors: tuple[str, ...] = tuple(COLORS),
    outline: bool = False,
    backgrounds: tuple[str, ...] = tuple(COLORS),
) -> Scene:
    """A random scene over `colors` on one of `backgrounds` (object and background always differ)."""
    color = rng.choice(colors)
    background = rng.choice([c for c in backgrounds if c != color])
    count = rng.choice((1, 1, 2))
    if count == 1:
        position = rng.choice(tuple(POSITIONS))
        size = rng.choice(tuple(SIZES))
    else:
        position = rng.choice(("side by side", "stacked"))
        size = "small"
    jitter = (rng.uniform(-0.04, 0.04), rng.uniform(-0.04, 0.04))
    return Scene(rng.choice(SHAPES), color, background, size, count, position, jitter, outline)


def caption(scene: Scene, rng: random.Random | None = None, color_word: str | None = None, article: bool = True) -> str:
    """Words for the scene. With `rng`, size and position words are sometimes left out, as people leave them out
    of prompts, so the model learns to fill them in, and a template-style frame is sometimes put in front.
    `color_word` replaces the colour's name ("" leaves it out); `article=False` drops the leading "a"."""
    keep_size = rng is None or rng.random() < 0.6
    keep_position = rng is None or rng.random() < 0.6
    color = scene.color if color_word is None else color_word
    words = [
        COUNT_WORDS[scene.count] if article or scene.count > 1 else "",
        scene.size if keep_size and scene.count == 1 else "",
        color,
        scene.shape + ("s" if scene.count > 1 else ""),
        scene.position if keep_position else "",
        f"on a {scene.background} background",
    ]
    text = " ".join(w for w in words if w)
    if rng is not None and rng.random() < 0.3:
        # The framing words of A1111's prompt templates ("a photo of [filewords]"), so training prompts built from
        # those templates are in the model's language.
        text = f"{rng.choice(FRAMES)} {text}"
    return text


def _centers(scene: Scene) -> list[tuple[float, float]]:
    jx, jy = scene.jitter
    if scene.count == 1:
        x, y = POSITIONS[scene.position]
        return [(x + jx, y + jy)]
    if scene.position == "side by side":
        return [(0.28 + jx, 0.5 + jy), (0.72 + jx, 0.5 + jy)]
    return [(0.5 + jx, 0.28 + jy), (0.5 + jx, 0.72 + jy)]


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    if shape == "square":
        h = r * 0.86
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    return None


def render(scene: Scene, size: int = 64) -> Image.Image:
    """Draw the scene as an RGB image `size` pixels square."""
    big = size * SUPERSAMPLE
    image = Image.new("RGB", (big, big), ALL_COLORS[scene.background])
    draw = ImageDraw.Draw(image)
    radius = SIZES[scene.size] * big
    outline = OUTLINE_RGB if scene.outline else None
    width = max(1, round(big * OUTLINE_WIDTH)) if scene.outline else 0
    for fx, fy in _centers(scene):
        cx, cy = fx * big, fy * big
        points = _polygon(scene.shape, cx, cy, radius)
        fill = ALL_COLORS[scene.color]
        if points is None:
            draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=fill, outline=outline, width=width)
        else:
            draw.polygon(points, fill=fill, outline=outline, width=width)
    return image.resize((size, size), Image.Resampling.LANCZOS)
