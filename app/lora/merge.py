"""Merging LoRAs into a checkpoint (kohya's `merge_lora.py`, SuperMerger's "merge to checkpoint"): the loaded model
with `<lora:...>` tags applied, exactly as a generation applies them (multipliers, `te=`/`unet=`, block weights,
every kind of layer), written as a new single-file checkpoint in the original (LDM) layout A1111, ComfyUI and kohya
load. A model with a LoRA baked in needs no tag, loads anywhere and samples at the base model's speed."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from app.fileio import atomic_write
from app.models import ldm_export

SAVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass(frozen=True)
class MergeReport:
    tags: list[str]
    changed: int  # tensors of the checkpoint that differ from the loaded model's
    size_bytes: int

    def sentence(self) -> str:
        gb = self.size_bytes / 2**30
        size = f"{gb:.2f} GB" if gb >= 1 else f"{self.size_bytes / 2**20:.1f} MB"
        return f"merged {' '.join(self.tags)}: {self.changed} tensors changed; {size}"


def checkpoint_tensors(pipe, vae: torch.nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Copies of the pipeline's weights in `dtype` (with `vae`, the checkpoint's own where another is selected) in
    the LDM layout of its family (SD 1.x, SD 2.x with its OpenCLIP text encoder, SDXL with both)."""
    parts = type("Parts", (), {})()
    parts.unet, parts.vae, parts.text_encoder = pipe.unet, vae, pipe.text_encoder
    if getattr(pipe, "text_encoder_2", None) is not None:
        parts.text_encoder_2 = pipe.text_encoder_2
    return ldm_export.export(parts, dtype)


def write_checkpoint(dst: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """`tensors` to `dst`, atomically (moved to the CPU one at a time: a GPU's copies never all sit in RAM twice)."""
    for key, value in tensors.items():
        tensors[key] = value.cpu()
    atomic_write(dst, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def merge_metadata(base_title: str, tags: list[str]) -> dict[str, str]:
    """A record of what was merged, in A1111's checkpoint-merger key (`sd_merge_recipe`), which its UI shows."""
    recipe = {"type": "lora-merge", "base_model": base_title, "loras": tags}
    return {"sd_merge_recipe": json.dumps(recipe), "format": "pt"}
