"""Mixed precision and memory for a training run: autocast, loss scaling, activation checkpointing.

The frozen model runs in its own dtype (fp16/bf16 on CUDA, fp32 on the CPU); the trained tensors stay fp32 and the
loss is computed in fp32. With fp16 a GradScaler multiplies the loss before backward so that small gradients do not
flush to zero in the fp16 activations on their way to the trained tensors (measured in tests/test_training_precision:
without it, most of a tiny model's embedding gradient underflows). bf16 has fp32's range and needs no scaling.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch

log = logging.getLogger(__name__)

HALF_DTYPES = (torch.float16, torch.bfloat16)
# fp16 overflow skips a step and halves the scale; this many in a row means it will not recover (each halving
# already divides the scale by 2, so 30 in a row is a 1e9x smaller scale than where it started).
MAX_SKIPPED_IN_A_ROW = 30


class MixedPrecision:
    """Autocast and (for fp16) loss scaling for one run, chosen from the dtype the frozen model runs in."""

    def __init__(self, device: torch.device, model_dtype: torch.dtype, init_scale: float = 2.0**16):
        self.device_type = device.type
        self.model_dtype = model_dtype  # read per step: diffusers' `unet.dtype` walks every parameter each time
        self.dtype = model_dtype if model_dtype in HALF_DTYPES else None
        self.scaler = (
            torch.amp.GradScaler(self.device_type, init_scale=init_scale) if model_dtype == torch.float16 else None
        )

    def autocast(self):
        """The context the text encoder and UNet run in: autocast to the model's half dtype, or nothing."""
        if self.dtype is None:
            return nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def unscale(self, optimizer: torch.optim.Optimizer) -> None:
        """Bring the gradients back to their true size (before clipping and the finite check)."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler is not None:
            self.scaler.step(optimizer)
        else:
            optimizer.step()

    def update(self) -> None:
        """After a step, or after a step skipped for overflowing gradients: adjust the scale."""
        if self.scaler is not None:
            self.scaler.update()

    @property
    def scale(self) -> float | None:
        return float(self.scaler.get_scale()) if self.scaler is not None else None

    def state_dict(self) -> dict[str, Any] | None:
        return self.scaler.state_dict() if self.scaler is not None else None

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Restore a saved scale (a resumed fp16 run continues exactly); a run in another dtype ignores it."""
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)


@contextmanager
def activation_checkpointing(unet: torch.nn.Module, enabled: bool, random_forward: bool = False) -> Iterator[None]:
    """Recompute the UNet's activations in backward instead of keeping them; restores its state after the run.

    Only the UNet: a text encoder's activations for 77-token prompts are small (about 60 MB for SD 1.x at batch 1
    in fp32), while recomputing its layers added 8-23 % to a step where launches dominate (measured on the tiny
    model, docs/benchmarks.md), so an embedding's encoders keep theirs.

    `random_forward`: the forward draws random numbers (a hypernetwork's dropout), so each checkpoint saves and
    replays the RNG state. Without it that bookkeeping is skipped: the frozen model runs in eval mode (no dropout).
    """
    if not enabled:
        yield
        return
    options = {"use_reentrant": False, "preserve_rng_state": random_forward}

    def checkpointed(module, *args):
        return torch.utils.checkpoint.checkpoint(module.__call__, *args, **options)

    unet.enable_gradient_checkpointing(checkpointed)
    try:
        yield
    finally:
        unet.disable_gradient_checkpointing()


@contextmanager
def parked(module: torch.nn.Module, device: torch.device, park: bool) -> Iterator[None]:
    """Keep `module` off the accelerator except inside this block (the VAE: latent cache and previews only)."""
    if not park:
        yield
        return
    module.to(device)
    try:
        yield
    finally:
        module.to("cpu")
        if device.type == "cuda":
            torch.cuda.empty_cache()


@contextmanager
def training_memory(
    vae: torch.nn.Module,
    device: torch.device,
    unet: torch.nn.Module,
    checkpointing: bool,
    random_forward: bool = False,
) -> Iterator[Any]:
    """The memory plan of a run: the VAE off the accelerator (back only inside `vae_needed()`: latent cache,
    previews), activation checkpointing on when asked. Yields `vae_needed`; everything is put back afterwards."""
    park = device.type != "cpu"  # on the CPU there is nowhere else to put it
    home = next(vae.parameters()).device
    if park:
        vae.to("cpu")

    def vae_needed():
        return parked(vae, device, park)

    # Every step has the same shapes: let cuDNN pick its fastest convolution kernels once, for the run only.
    benchmark = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = device.type == "cuda" or benchmark
    try:
        with activation_checkpointing(unet, checkpointing, random_forward):
            yield vae_needed
    finally:
        torch.backends.cudnn.benchmark = benchmark
        vae.to(home)
