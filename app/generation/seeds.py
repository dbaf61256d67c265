"""Seeds and initial noise: drawn on the CPU so a seed gives the same image on every device.

Variation seeds (A1111): the noise of `seed` is blended with the noise of `subseed` by spherical interpolation at
`strength` (0 = the seed's noise, 1 = the subseed's). "Seed resize from" draws the noise for another size and
places it centred in the target, so an image keeps its composition when the size changes.
"""

from __future__ import annotations

import random

import torch

MAX_SEED = 4294967294


def resolve_seed(seed: int | None) -> int:
    """-1 (or None) picks a random seed in [0, 4294967294), as A1111 does."""
    if seed is None or int(seed) == -1:
        return random.randrange(MAX_SEED)
    return int(seed)


def cpu_generators(seeds: list[int]) -> list[torch.Generator]:
    return [torch.Generator("cpu").manual_seed(s) for s in seeds]


def slerp(t: float, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation between two noise tensors (as flat vectors); t=0 gives a, t=1 gives b."""
    if t <= 0:
        return a
    if t >= 1:
        return b
    fa, fb = a.flatten().double(), b.flatten().double()
    cos = torch.dot(fa / fa.norm(), fb / fb.norm()).clamp(-1, 1)
    if cos > 0.9995:  # nearly parallel: linear is exact enough and avoids dividing by ~0
        return (a * (1 - t) + b * t).to(a.dtype)
    omega = torch.acos(cos)
    mixed = (torch.sin((1 - t) * omega) * fa + torch.sin(t * omega) * fb) / torch.sin(omega)
    return mixed.reshape(a.shape).to(a.dtype)


def _place_centered(noise: torch.Tensor, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """Fresh noise of `shape` with `noise` (another size) pasted in its centre, cropped where it is larger."""
    out = torch.randn(shape, generator=generator)
    dy, dx = (shape[1] - noise.shape[1]) // 2, (shape[2] - noise.shape[2]) // 2
    h, w = min(shape[1], noise.shape[1]), min(shape[2], noise.shape[2])
    ty, tx, sy, sx = max(dy, 0), max(dx, 0), max(-dy, 0), max(-dx, 0)
    out[:, ty : ty + h, tx : tx + w] = noise[:, sy : sy + h, sx : sx + w]
    return out


def initial_noise(
    generators: list[torch.Generator],
    shape: tuple[int, ...],
    subseeds: list[int] | None = None,
    strength: float = 0.0,
    resize_from: tuple[int, int] | None = None,
) -> torch.Tensor:
    """One noise tensor per image. `generators` are the images' seeds and keep drawing afterwards (ancestral
    samplers); `resize_from` is the latent (height, width) the noise was first drawn at."""
    noise_shape = (shape[0], *resize_from) if resize_from else shape
    out = []
    for i, generator in enumerate(generators):
        noise = torch.randn(noise_shape, generator=generator)
        if subseeds is not None and strength > 0:
            sub = torch.randn(noise_shape, generator=torch.Generator("cpu").manual_seed(subseeds[i]))
            noise = slerp(strength, noise, sub)
        if noise_shape != shape:
            noise = _place_centered(noise, shape, generator)
        out.append(noise)
    return torch.stack(out)
