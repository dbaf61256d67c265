"""Merging LoRAs into a checkpoint (kohya's `merge_lora.py`, SuperMerger's "merge to checkpoint"): the loaded model
with `<lora:...>` tags applied, exactly as a generation applies them (multipliers, `te=`/`unet=`, block weights,
every kind of layer), written as a new single-file checkpoint in the original (LDM) layout A1111, ComfyUI and kohya
load. A model with a LoRA baked in needs no tag, loads anywhere and samples at the base model's speed."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors.torch import save_file

from app.fileio import atomic_write, size_text
from app.models import ldm_export


@dataclass(frozen=True)
class MergeReport:
    tags: list[str]
    changed: int  # tensors of the checkpoint that differ from the loaded model's
    size_bytes: int

    def sentence(self) -> str:
        return f"merged {' '.join(self.tags)}: {self.changed} tensors changed; {size_text(self.size_bytes)}"


def checkpoint_tensors(pipe, vae: torch.nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Copies of the pipeline's weights in `dtype` (with `vae`, the checkpoint's own where another is selected) in
    the LDM layout of its family (SD 1.x, SD 2.x with its OpenCLIP text encoder, SDXL with both)."""
    encoder_2 = getattr(pipe, "text_encoder_2", None)
    parts = SimpleNamespace(unet=pipe.unet, vae=vae, text_encoder=pipe.text_encoder, text_encoder_2=encoder_2)
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
