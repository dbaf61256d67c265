"""Hires fix: upscale the first pass (in latent space or as an image) and denoise it again at the new size."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from app.errors import UserError
from app.models.devices import execution_device

# A1111's latent upscale modes: name -> (interpolation mode, antialias)
LATENT_MODES: dict[str, tuple[str, bool]] = {
    "Latent": ("bilinear", False),
    "Latent (antialiased)": ("bilinear", True),
    "Latent (bicubic)": ("bicubic", False),
    "Latent (bicubic antialiased)": ("bicubic", True),
    "Latent (nearest)": ("nearest", False),
    "Latent (nearest-exact)": ("nearest-exact", False),
}
IMAGE_UPSCALERS: dict[str, Image.Resampling] = {
    "None": Image.Resampling.LANCZOS,  # A1111's "None" upscaler leaves resizing to a plain Lanczos resize
    "Lanczos": Image.Resampling.LANCZOS,
    "Nearest": Image.Resampling.NEAREST,
}


def upscaler_names() -> list[str]:
    return [*IMAGE_UPSCALERS, *LATENT_MODES]


def check_upscaler(name: str | None) -> str:
    name = name or "Latent"
    if name not in LATENT_MODES and name not in IMAGE_UPSCALERS:
        raise UserError(f"Hires upscaler '{name}' is not available. Choose one of: {', '.join(upscaler_names())}.")
    return name


def target_size(width: int, height: int, scale: float, resize_x: int, resize_y: int) -> tuple[int, int]:
    """The hires size, as A1111 computes it, rounded down to a multiple of 8."""
    if resize_x > 0 and resize_y > 0:
        w, h = resize_x, resize_y
    elif resize_x > 0:
        w, h = resize_x, resize_x * height / width
    elif resize_y > 0:
        w, h = resize_y * width / height, resize_y
    else:
        w, h = width * scale, height * scale
    return int(w) // 8 * 8, int(h) // 8 * 8


def upscale_latents(latents: torch.Tensor, name: str, size: tuple[int, int], factor: int) -> torch.Tensor:
    mode, antialias = LATENT_MODES[name]
    kwargs = {"antialias": antialias} if mode in ("bilinear", "bicubic") else {}
    return F.interpolate(latents, size=(size[1] // factor, size[0] // factor), mode=mode, **kwargs)


def upscale_images(images: torch.Tensor, name: str, size: tuple[int, int]) -> torch.Tensor:
    """[B, 3, H, W] in [0, 1] -> resized with PIL, same range."""
    out = []
    for image in images:
        pil = Image.fromarray((image.permute(1, 2, 0).numpy() * 255).round().astype("uint8"))
        pil = pil.resize(size, IMAGE_UPSCALERS[name])
        out.append(torch.from_numpy(np.asarray(pil, dtype=np.float32) / 255.0).permute(2, 0, 1))
    return torch.stack(out)


@torch.no_grad()
def encode_images(vae: torch.nn.Module, images: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
    """[B, 3, H, W] in [0, 1] -> scaled latents, sampled with each image's generator."""
    dtype = next(vae.parameters()).dtype
    dist = vae.encode((images * 2 - 1).to(device=execution_device(vae), dtype=dtype)).latent_dist
    noise = torch.stack([torch.randn(dist.mean.shape[1:], generator=g) for g in generators]).to(dist.mean.device)
    latents = dist.mean.float() + dist.std.float() * noise
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (latents - shift) * vae.config.scaling_factor
