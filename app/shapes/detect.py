"""A fixed detector for the shapes world: what does a 64x64 picture show, and does it match its caption?

It measures how well a model follows prompts (`benchmarks/default_model_quality.py`, the default-model test).
Every step is a plain rule that is easy to check by eye, and the detector is validated on real renders (where it
must be right almost always), so a low score means the model drew something else, not that the detector failed:

- background: the palette colour nearest to the median of the border pixels (objects cover little of the border);
- objects: pixels farther than `OBJECT_DISTANCE` from that background colour and nearer the objects' median colour
  than the background's (anti-aliased edges count when more than half covered), split into connected
  components, specks below `MIN_AREA` pixels dropped;
- colour: the palette colour nearest to the median colour of all object pixels;
- shape, per object, from how much of its bounding box it fills: a triangle about half of it, a circle pi/4, a
  square all of it; the cut points lie halfway between the ranges measured on renders;
- position: the object centres as fractions of the image side.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage

from app.shapes.scenes import COLORS, POSITIONS, Scene

OBJECT_DISTANCE = 45.0  # RGB distance from the background; the closest palette pair (gray/purple) is ~81 apart
MIN_AREA = 24  # pixels; the smallest rendered object (a small triangle) covers ~110
# Fill-ratio cut points, halfway between the ranges measured on 2,000 renders at 64x64 (pixel edges and
# anti-aliasing spread the ideal 0.5 / 0.785 / 1.0): triangles 0.48-0.59, circles 0.70-0.83, squares 0.89-1.0.
TRIANGLE_BELOW = 0.645
CIRCLE_BELOW = 0.86
POSITION_TOLERANCE = 0.12  # of the image side; rendered jitter is at most 0.04 per axis

ATTRIBUTES = ("background", "color", "count", "shape", "position")


@dataclass(frozen=True)
class Detection:
    background: str
    color: str | None  # None when no object was found
    shapes: tuple[str, ...]  # one per object, largest first
    centers: tuple[tuple[float, float], ...]  # (x, y) fractions, same order

    @property
    def count(self) -> int:
        return len(self.shapes)


def _nearest(rgb: np.ndarray, palette: dict[str, tuple[int, int, int]], exclude: str | None = None) -> str:
    names = [n for n in palette if n != exclude]
    distances = [float(np.linalg.norm(rgb - np.asarray(palette[n], dtype=np.float32))) for n in names]
    return names[int(np.argmin(distances))]


def _shape_of(mask: np.ndarray) -> str:
    rows, cols = np.nonzero(mask)
    box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
    fill = mask.sum() / box
    if fill < TRIANGLE_BELOW:
        return "triangle"
    return "circle" if fill < CIRCLE_BELOW else "square"


def detect(image: Image.Image, palette: dict[str, tuple[int, int, int]] = COLORS) -> Detection:
    """What the picture shows, in the shapes world's terms."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    h, w, _ = pixels.shape
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    background_rgb = np.median(border, axis=0)
    background = _nearest(background_rgb, palette)
    to_background = np.linalg.norm(pixels - background_rgb, axis=-1)
    mask = to_background > OBJECT_DISTANCE
    if mask.any():
        # Edge pixels are blends; count a pixel as object when it is nearer the objects' colour than the
        # background's (more than half covered), so outlines are where a renderer would put them.
        object_rgb = np.median(pixels[mask], axis=0)
        mask &= np.linalg.norm(pixels - object_rgb, axis=-1) < to_background
    labels, n = ndimage.label(mask)
    objects = []
    for index in range(1, n + 1):
        component = labels == index
        area = int(component.sum())
        if area >= MIN_AREA:
            cy, cx = ndimage.center_of_mass(component)
            objects.append((area, component, (float(cx + 0.5) / w, float(cy + 0.5) / h)))
    objects.sort(key=lambda o: -o[0])
    if not objects:
        return Detection(background, None, (), ())
    inside = np.zeros_like(mask)
    for _, component, _ in objects:
        inside |= component
    color = _nearest(np.median(pixels[inside], axis=0), palette, exclude=background)
    return Detection(
        background,
        color,
        tuple(_shape_of(component) for _, component, _ in objects),
        tuple(center for _, _, center in objects),
    )


def _position_ok(scene: Scene, centers: tuple[tuple[float, float], ...]) -> bool:
    if len(centers) != scene.count:
        return False
    if scene.count == 1:
        x, y = POSITIONS[scene.position]
        return abs(centers[0][0] - x) <= POSITION_TOLERANCE and abs(centers[0][1] - y) <= POSITION_TOLERANCE
    (x0, y0), (x1, y1) = centers
    apart_x, apart_y = abs(x0 - x1), abs(y0 - y1)
    return apart_x > apart_y if scene.position == "side by side" else apart_y > apart_x


def score(scene: Scene, detection: Detection) -> dict[str, bool]:
    """Which of the caption's attributes the picture shows: background, colour, count, shape (every object) and
    position (the named place for one object; side by side / stacked for two)."""
    return {
        "background": detection.background == scene.background,
        "color": detection.color == scene.color,
        "count": detection.count == scene.count,
        "shape": detection.count > 0 and all(s == scene.shape for s in detection.shapes),
        "position": _position_ok(scene, detection.centers),
    }


def accuracy(scenes: list[Scene], images: list[Image.Image]) -> dict[str, float]:
    """Per attribute, the fraction of images that show it; "all" = images right on every attribute."""
    results = [score(s, detect(i)) for s, i in zip(scenes, images, strict=True)]
    out = {a: sum(r[a] for r in results) / len(results) for a in ATTRIBUTES}
    out["all"] = sum(all(r.values()) for r in results) / len(results)
    return out
