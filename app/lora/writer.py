"""Writing LoRA files in kohya's format, which A1111, ComfyUI, kohya's scripts and diffusers' `load_lora_weights`
all read: `lora_unet_<path>` / `lora_te_text_model_<path>` names (diffusers-style paths, as kohya's SD 1.x/2.x
scripts write them), `.lora_down.weight`, `.lora_up.weight`, `.alpha`, and `ss_` metadata."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from app.fileio import atomic_write
from app.lora.names import TEXT_ENCODER, UNET


def kohya_name(component: str, path: str) -> str:
    """The kohya name of an SD 1.x/2.x layer (SDXL's `lora_te1_`/`lora_te2_` are not written here yet)."""
    if component == UNET:
        return "lora_unet_" + path.replace(".", "_")
    if component == TEXT_ENCODER:
        return "lora_te_text_model_" + path.removeprefix("text_model.").replace(".", "_")
    raise ValueError(f"no kohya name for component {component}")


def save_kohya_lora(
    path: Path,
    layers: list[tuple[str, str, torch.Tensor, torch.Tensor, float]],
    metadata: dict[str, str],
) -> None:
    """Write (component, module path, down, up, alpha) layers to `path` atomically, in fp32 (so a resumed run
    continues from exactly the trained values)."""
    tensors: dict[str, torch.Tensor] = {}
    for component, module_path, down, up, alpha in layers:
        name = kohya_name(component, module_path)
        tensors[name + ".lora_down.weight"] = down.detach().float().cpu().contiguous()
        tensors[name + ".lora_up.weight"] = up.detach().float().cpu().contiguous()
        tensors[name + ".alpha"] = torch.tensor(float(alpha))
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
