"""Mixed precision and memory for a training run: autocast, loss scaling, activation checkpointing.

The frozen model runs in its own dtype (fp16/bf16 on CUDA, fp32 on the CPU); the trained tensors stay fp32 and the
loss is computed in fp32. With fp16 a GradScaler multiplies the loss before backward so that small gradients do not
flush to zero in the fp16 activations on their way to the trained tensors (measured in tests/test_training_precision:
without it, most of a tiny model's embedding gradient underflows). bf16 has fp32's range and needs no scaling.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from app.errors import UserError

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


CHECKPOINTING_MODES = ("auto", "on", "off")


def checkpointing_mode(value: Any) -> str:
    """The train form's and API's `gradient_checkpointing` as one of CHECKPOINTING_MODES: `True`/`False` (what
    the field took before `auto` existed, and what API clients may send) are `on`/`off`."""
    if isinstance(value, bool):
        return "on" if value else "off"
    mode = str(value).strip().lower()
    if mode not in CHECKPOINTING_MODES:
        raise UserError(
            f"Gradient checkpointing must be one of {', '.join(CHECKPOINTING_MODES)} (or true/false), got {value!r}.",
            "gradient_checkpointing",
        )
    return mode


def checkpointing_options(random_forward: bool) -> dict[str, bool]:
    """`torch.utils.checkpoint` options for the UNet. `random_forward`: the forward draws random numbers (a
    hypernetwork's dropout), so each checkpoint saves and replays the RNG state; otherwise that bookkeeping is
    skipped (the frozen model runs in eval mode: no dropout)."""
    return {"use_reentrant": False, "preserve_rng_state": random_forward}


@contextmanager
def activation_checkpointing(unet: torch.nn.Module, enabled: bool, random_forward: bool = False) -> Iterator[None]:
    """Recompute the UNet's activations in backward instead of keeping them; restores its state afterwards.

    Only the UNet: a text encoder's activations for 77-token prompts are small (about 60 MB for SD 1.x at batch 1
    in fp32), while recomputing its layers added 8-23 % to a step where launches dominate (measured on the tiny
    model, docs/benchmarks.md), so an embedding's encoders keep theirs.
    """
    checkpointing = Checkpointing(unet, "on" if enabled else "off", random_forward, can_recover=False)
    try:
        yield
    finally:
        checkpointing.close()


def _enable(unet: torch.nn.Module, random_forward: bool) -> None:
    options = checkpointing_options(random_forward)

    def checkpointed(module, *args):
        return torch.utils.checkpoint.checkpoint(module.__call__, *args, **options)

    unet.enable_gradient_checkpointing(checkpointed)


class Checkpointing:
    """Activation checkpointing of the UNet for one run: `on`, `off`, or `auto`.

    `auto` trains without it (a third faster per step) where running out of memory is an error the run sees (a GPU;
    in system memory only under an rlimit, see `allocation_can_fail`) and memory is not known to be tight (no
    `--medvram`). A step that runs out turns it on for the rest of the run and is done again: each step's data,
    noise and timesteps depend only on (seed, step), so the step done again is the step that failed. Where running
    out would end the process instead, `auto` is `on` from the start."""

    def __init__(self, unet: torch.nn.Module, mode: str, random_forward: bool, can_recover: bool):
        self.unet, self.random_forward = unet, random_forward
        self.mode = checkpointing_mode(mode)
        self.on = self.mode == "on" or (self.mode == "auto" and not can_recover)
        self.turned_on_at: int | None = None  # the step at which `auto` turned it on
        if self.on:
            _enable(unet, random_forward)

    @property
    def can_turn_on(self) -> bool:
        return self.mode == "auto" and not self.on

    def turn_on(self, step: int) -> None:
        """After `step` ran out of memory without it (only while `can_turn_on`)."""
        _enable(self.unet, self.random_forward)
        self.on, self.turned_on_at = True, step
        log.warning(
            "Step %d ran out of memory without gradient checkpointing: turned it on for the rest of the run "
            "and doing the step again",
            step,
        )

    def close(self) -> None:
        if self.on:
            self.unet.disable_gradient_checkpointing()


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


@dataclass
class MemoryPlan:
    """What a run does to fit: `vae_needed()` brings the parked VAE back for a block; `checkpointing` is live."""

    vae_needed: Callable[[], AbstractContextManager]
    checkpointing: Checkpointing


@contextmanager
def training_memory(
    vae: torch.nn.Module,
    device: torch.device,
    unet: torch.nn.Module,
    checkpointing: str | bool,
    random_forward: bool = False,
    can_recover: bool = False,
) -> Iterator[MemoryPlan]:
    """The memory plan of a run: the VAE off the accelerator (back only inside `vae_needed()`: latent cache,
    previews), activation checkpointing as asked (`Checkpointing`; `can_recover`: running out of memory is an
    error the run can recover from). Everything is put back afterwards."""
    park = device.type != "cpu"  # on the CPU there is nowhere else to put it
    home = next(vae.parameters()).device
    if park:
        vae.to("cpu")

    def vae_needed():
        return parked(vae, device, park)

    # Every step has the same shapes: let cuDNN pick its fastest convolution kernels once, for the run only.
    benchmark = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = device.type == "cuda" or benchmark
    plan = None
    try:
        plan = MemoryPlan(vae_needed, Checkpointing(unet, checkpointing, random_forward, can_recover))
        yield plan
    finally:
        if plan is not None:
            plan.checkpointing.close()
        torch.backends.cudnn.benchmark = benchmark
        vae.to(home)
