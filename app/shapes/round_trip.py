"""Scenes through a VAE and back: what the UNet could at best draw through that VAE."""

from __future__ import annotations

import torch
from PIL import Image

from app.shapes.scenes import Scene, render
from app.training.latents import image_tensor


@torch.no_grad()
def vae_round_trip(vae, scenes: list[Scene], batch: int = 64) -> list[Image.Image]:
    """Render each scene, encode it (posterior mean) and decode it again, in the VAE's own dtype."""
    out: list[Image.Image] = []
    param = next(vae.parameters())
    for i in range(0, len(scenes), batch):
        x = torch.stack([image_tensor(render(s)) for s in scenes[i : i + batch]]).to(param.device, param.dtype)
        y = vae.decode(vae.encode(x).latent_dist.mean).sample.float().clamp(-1, 1)
        arr = ((y + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        out.extend(Image.fromarray(a) for a in arr)
    return out
