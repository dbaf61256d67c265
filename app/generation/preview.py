"""Cheap live previews: latents to RGB through a fixed linear map, no VAE pass (A1111's "Approx cheap")."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

# How each of SD1's 4 latent channels contributes to R, G, B (a least-squares fit published with SD1 tooling).
_SD1_LATENT_RGB = torch.tensor(
    [
        [0.298, 0.207, 0.208],
        [0.187, 0.286, 0.173],
        [-0.158, 0.189, 0.264],
        [-0.184, -0.271, -0.473],
    ]
)


def approx_preview(latent: torch.Tensor, scale: int = 8) -> Image.Image:
    """A rough RGB image of one latent [4, h, w], upscaled by `scale` so it is visible."""
    rgb = torch.einsum("chw,cr->hwr", latent.detach().float().cpu(), _SD1_LATENT_RGB)
    array = ((rgb + 1) * 127.5).clamp(0, 255).to(torch.uint8).numpy()
    image = Image.fromarray(np.ascontiguousarray(array))
    return image.resize((image.width * scale, image.height * scale), Image.NEAREST)
