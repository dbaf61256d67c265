"""Base64 PNG in and out of the API, keeping the infotext chunk."""

from __future__ import annotations

import base64
import binascii
import io

from PIL import Image, UnidentifiedImageError

from app.errors import UserError
from app.generation.infotext import pnginfo_for


def encode_png(image: Image.Image, infotext: str | None = None) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=pnginfo_for(infotext) if infotext else None)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def decode_image(data: str) -> Image.Image:
    """Accepts plain base64 or a `data:image/...;base64,` URL."""
    if data.startswith("data:"):
        data = data.split(",", 1)[-1]
    try:
        raw = base64.b64decode(data, validate=False)
        image = Image.open(io.BytesIO(raw))
        image.load()
    except (binascii.Error, ValueError, UnidentifiedImageError, OSError) as e:
        raise UserError(f"The image could not be read: {e}. Send a base64-encoded PNG.") from None
    return image
