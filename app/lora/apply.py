"""Applying LoRAs for one generation with PEFT's LoRA layers, and taking them out again.

Each file becomes a PEFT adapter injected around the layers it touches (`peft.inject_adapter_in_model`), filled with
the file's down/up weights; the adapter's scale is `multiplier * alpha / rank`, so every layer computes
`W x + m (alpha / rank) up(down(x))`, which is the merged `W + m (alpha/rank) up @ down` without changing `W`. On exit
the wrappers are replaced by the original modules they hold, so the model is exactly as before (same module
objects, same tensors, untouched) and the next generation without LoRAs is bit-identical to one that never had them.
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer

from app.lora.files import BoundLayer
from app.models.devices import execution_device

log = logging.getLogger(__name__)


@dataclass
class Application:
    """One file to apply: its layers bound to the model, and the multipliers for text encoders and UNet."""

    bound: list[BoundLayer]
    te_multiplier: float
    unet_multiplier: float


def _multiplier(app: Application, component: str) -> float:
    return app.unet_multiplier if component == "unet" else app.te_multiplier


@contextmanager
def lora_applied(components: dict[str, torch.nn.Module], applications: list[Application]) -> Iterator[None]:
    """Apply `applications` to `components` (name -> module) for the body of the `with`; always restore."""
    live = [a for a in applications if a.bound and (a.te_multiplier != 0 or a.unet_multiplier != 0)]
    if not live:
        yield
        return
    touched = set()
    try:
        for index, app in enumerate(live):
            adapter = f"lora{index}"
            by_component: dict[str, list[BoundLayer]] = {}
            for b in app.bound:
                if _multiplier(app, b.target.component) != 0:  # a zero part is off: leave its layers alone
                    by_component.setdefault(b.target.component, []).append(b)
            for component, layers in by_component.items():
                touched.add(component)
                _inject(components[component], adapter, layers, _multiplier(app, component))
        for component in touched:
            for module in components[component].modules():
                if isinstance(module, BaseTunerLayer):
                    module.set_adapter(list(module.lora_A.keys()))
                    module.requires_grad_(False)  # set_adapter marks adapters trainable; nothing trains here
        yield
    finally:
        for component in touched:
            restore(components[component])


def _inject(root: torch.nn.Module, adapter: str, layers: list[BoundLayer], multiplier: float) -> None:
    paths = [b.target.path for b in layers]
    config = LoraConfig(
        r=layers[0].layer.rank,
        lora_alpha=layers[0].layer.rank,
        target_modules=paths,
        rank_pattern={re.escape(b.target.path): b.layer.rank for b in layers},
        alpha_pattern={re.escape(b.target.path): b.layer.rank for b in layers},
        init_lora_weights=False,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns about re-injecting into a model it already touched
        inject_adapter_in_model(config, root, adapter_name=adapter, low_cpu_mem_usage=True)
    if hasattr(root, "peft_config"):
        del root.peft_config  # bookkeeping PEFT leaves on the model; we keep our own
    for b in layers:
        wrapper = root.get_submodule(b.target.path)
        base = wrapper.get_base_layer()
        device = execution_device(base)  # under --lowvram the base weight lives on `meta`
        dtype = base.weight.dtype if base.weight.is_floating_point() else torch.float32
        down, up = b.layer.down, b.layer.up
        a, bb = wrapper.lora_A[adapter], wrapper.lora_B[adapter]
        a.weight = torch.nn.Parameter(down.reshape(a.weight.shape).to(device, dtype), requires_grad=False)
        bb.weight = torch.nn.Parameter(up.reshape(bb.weight.shape).to(device, dtype), requires_grad=False)
        # PEFT's scaling is scale * lora_alpha / r with lora_alpha = r above, so this is m * alpha / rank
        wrapper.set_scale(adapter, multiplier * b.layer.scale)


def restore(root: torch.nn.Module) -> None:
    """Put back the original module wherever a PEFT wrapper sits (the wrapper holds it as `base_layer`)."""
    wrapped = [(name, m) for name, m in root.named_modules() if isinstance(m, BaseTunerLayer)]
    for name, module in wrapped:
        parent_name, _, child = name.rpartition(".")
        parent = root.get_submodule(parent_name) if parent_name else root
        setattr(parent, child, module.get_base_layer())
    if hasattr(root, "peft_config"):
        del root.peft_config
