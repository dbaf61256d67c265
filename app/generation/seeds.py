"""Seeds and initial noise: drawn on the CPU so a seed gives the same image on every device."""

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


def initial_noise(seeds: list[int], shape: tuple[int, ...]) -> torch.Tensor:
    """One noise tensor per seed, each from its own CPU generator, so image i matches a single run of seed i."""
    return torch.stack([torch.randn(shape, generator=g) for g in cpu_generators(seeds)])
