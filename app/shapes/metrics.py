"""Simple, explainable measures of whether an image shows a concept of the shapes world.

Both held-out concepts are colours that no base scene contains, so the share of pixels near that colour is a
direct, shape-independent measure of "does the image show it": a rendered orange circle covers 5-25% of the image
with orange, an image without orange scores 0. The tolerance (50 in RGB distance) is well below the distance from
orange to its nearest base colours (yellow ~82, red ~113), so base colours never count, and well above the
anti-aliasing blur at shape edges, so a model's slightly-off orange still does.
"""

from __future__ import annotations

import numpy as np
from PIL import Image


def color_share(image: Image.Image, rgb: tuple[int, int, int], tolerance: float = 50.0) -> float:
    """The fraction of pixels within `tolerance` (Euclidean, 0-255 RGB) of `rgb`."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    distance = np.linalg.norm(pixels - np.asarray(rgb, dtype=np.float32), axis=-1)
    return float((distance <= tolerance).mean())


def dark_share(image: Image.Image, threshold: int = 60) -> float:
    """The fraction of near-black pixels (every channel below `threshold`); the base palette has none, the darkest
    base colour (blue, 40/80/220) has a channel far above it, so only black outlines count."""
    pixels = np.asarray(image.convert("RGB"))
    return float((pixels.max(axis=-1) < threshold).mean())


def mean_of(values) -> float:
    values = list(values)
    return float(sum(values) / len(values)) if values else 0.0
