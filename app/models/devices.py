"""Where a module computes, which is not always where its weights are.

Under --lowvram (accelerate's sequential offload) every weight sits on the `meta` device between calls and hooks
bring it to the GPU for each layer's forward; `module.device` then says `meta`, and a tensor made there cannot be
moved anywhere. Inputs belong on the hooks' execution device instead.
"""

from __future__ import annotations

import torch


def execution_device(module: torch.nn.Module) -> torch.device:
    """The device `module`'s forward computes on: an offload hook's execution device if there is one."""
    for sub in module.modules():
        hook = getattr(sub, "_hf_hook", None)
        device = getattr(hook, "execution_device", None)
        if device is not None:
            return torch.device(device)
    parameter = next(module.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")
