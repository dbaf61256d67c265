"""Seamless tiling: circular padding on every UNet and VAE convolution while a generation runs."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def circular_padding(*modules: torch.nn.Module, enabled: bool = True) -> Iterator[None]:
    """Switch padded Conv2d layers to circular padding, and restore each one's own mode afterwards."""
    if not enabled:
        yield
        return
    changed = []
    for module in modules:
        for conv in module.modules():
            if isinstance(conv, torch.nn.Conv2d) and any(p > 0 for p in conv.padding if isinstance(p, int)):
                changed.append((conv, conv.padding_mode))
                conv.padding_mode = "circular"
    try:
        yield
    finally:
        for conv, mode in changed:
            conv.padding_mode = mode
