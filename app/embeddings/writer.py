"""Writing embeddings in A1111's layouts (`.pt`, `.safetensors` with `emb_params`, PNG chunk), atomically."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import torch
from PIL import Image, PngImagePlugin
from safetensors.torch import save_file

from app.embeddings.formats import PNG_CHUNK, encode_tensors
from app.fileio import atomic_write

# The placeholder token A1111 writes; 265 is the id of '*' in CLIP's vocabulary.
PLACEHOLDER = "*"
PLACEHOLDER_ID = 265


def a1111_dict(
    name: str, vectors: torch.Tensor, step: int | None, sd_checkpoint: str | None, sd_checkpoint_name: str | None
) -> dict:
    return {
        "string_to_token": {PLACEHOLDER: PLACEHOLDER_ID},
        "string_to_param": {PLACEHOLDER: vectors.detach().cpu().float().contiguous()},
        "name": name,
        "step": step,
        "sd_checkpoint": sd_checkpoint,
        "sd_checkpoint_name": sd_checkpoint_name,
    }


SDXL_PARTS = ("clip_l", "clip_g")
META_KEYS = ("name", "step", "sd_checkpoint", "sd_checkpoint_name")  # what .safetensors embeddings keep as metadata


def sdxl_dict(
    name: str,
    vectors: torch.Tensor,
    split: int,
    step: int | None,
    sd_checkpoint: str | None,
    sd_checkpoint_name: str | None,
) -> dict:
    """An SDXL embedding: `vectors` holds clip_l's part (the first `split` columns) and clip_g's side by side."""
    vectors = vectors.detach().cpu().float()
    return {
        "clip_l": vectors[:, :split].contiguous(),
        "clip_g": vectors[:, split:].contiguous(),
        "name": name,
        "step": step,
        "sd_checkpoint": sd_checkpoint,
        "sd_checkpoint_name": sd_checkpoint_name,
    }


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """A .safetensors file of `tensors` (fp32, contiguous) with string metadata, written atomically."""
    data = {k: v.detach().cpu().float().contiguous() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(data, str(tmp), metadata=metadata))


def safetensors_metadata(data: dict) -> dict[str, str]:
    """The fields of an embedding dict that a .safetensors file keeps as string metadata."""
    return {k: str(data[k]) for k in META_KEYS if data.get(k) is not None}


def save_sdxl(path: Path, data: dict) -> None:
    """An `sdxl_dict` as .safetensors: `clip_l` and `clip_g`, the rest as metadata."""
    save_tensors(path, {k: data[k] for k in SDXL_PARTS}, safetensors_metadata(data))


def save_pt(path: Path, data: dict) -> None:
    atomic_write(path, lambda tmp: torch.save(data, tmp))


def save_safetensors(path: Path, vectors: torch.Tensor, metadata: dict[str, str] | None = None) -> None:
    """SD 1.x/2.x embedding in A1111's .safetensors layout (`emb_params`)."""
    save_tensors(path, {"emb_params": vectors}, metadata)


def save_png(path: Path, image: Image.Image, data: dict, infotext: str | None = None) -> None:
    """An image carrying the embedding in its `sd-ti-embedding` text chunk (uncompressed base64 JSON)."""
    info = PngImagePlugin.PngInfo()
    info.add_text(PNG_CHUNK, base64.b64encode(json.dumps(encode_tensors(data)).encode()).decode("ascii"))
    if infotext:
        info.add_text("parameters", infotext)
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=info))
