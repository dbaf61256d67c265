"""VAE latents of the training images, computed once per run: where training speed comes from.

"once": one sample per image drawn at the start (seeded), reused every epoch. "deterministic": the
distribution's mean. "random": the mean and std are kept and a new sample is drawn for every use.
The cache lives in CPU memory (a 512 px latent is 64 KB); the loop moves each batch to the device.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def image_tensor(image: Image.Image) -> torch.Tensor:
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1)


class LatentCache:
    def __init__(self, vae: torch.nn.Module, images: list[Image.Image], method: str, seed: int, device: torch.device):
        self.method = method
        self.scale = float(vae.config.scaling_factor)
        self.shift = float(getattr(vae.config, "shift_factor", None) or 0.0)
        dtype = next(vae.parameters()).dtype
        self.means: list[torch.Tensor] = []
        self.stds: list[torch.Tensor] = []
        with torch.no_grad():
            for index, image in enumerate(images):
                pixels = image_tensor(image).unsqueeze(0).to(device=device, dtype=dtype)
                dist = vae.encode(pixels).latent_dist
                mean, std = dist.mean.float()[0].cpu(), dist.std.float()[0].cpu()
                if method == "once":
                    g = torch.Generator("cpu").manual_seed(seed * 7919 + index)
                    mean = mean + std * torch.randn(mean.shape, generator=g)
                    std = torch.zeros_like(std)
                elif method == "deterministic":
                    std = torch.zeros_like(std)
                self.means.append(mean)
                self.stds.append(std)

    def loss_weight(self, alpha: Image.Image | None, index: int) -> torch.Tensor:
        """A1111's `use_weight`: the alpha channel at latent size, on every latent channel, shifted to a minimum of
        0 and scaled to a mean of 1 (opaque pixels count, transparent ones do not); ones without alpha."""
        shape = self.means[index].shape
        if alpha is None:
            return torch.ones(shape, device=self.means[index].device)
        small = np.asarray(alpha.resize((shape[2], shape[1]), Image.Resampling.BILINEAR), dtype=np.float32)
        weight = torch.from_numpy(small).expand(shape).clone()
        weight -= weight.min()
        mean = weight.mean()
        weight = weight / mean if mean > 0 else torch.ones(shape)
        return weight.to(self.means[index].device)

    def get(self, index: int, generator: torch.Generator) -> torch.Tensor:
        """The scaled latent of image `index`; `generator` is only used for "random" sampling."""
        latent = self.means[index]
        if self.method == "random":
            latent = latent + self.stds[index] * torch.randn(latent.shape, generator=generator)
        return (latent - self.shift) * self.scale
