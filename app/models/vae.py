"""Separate VAE files in `models/VAE` (A1111's `sd_vae` option): diffusers folders, or single files whose
weights are in diffusers' or the original (LDM) layout."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL
from safetensors.torch import load_file

from app.errors import UserError

VAE_SUFFIXES = (".safetensors", ".pt", ".ckpt", ".bin")


def scan_vae_files(folder: Path) -> dict[str, Path]:
    """A1111 lists VAEs by file name; diffusers folders (with config.json) by folder name."""
    found: dict[str, Path] = {}
    if not folder.is_dir():
        return found
    for path in sorted(folder.rglob("*")):
        if (path.is_dir() and (path / "config.json").is_file()) or (
            path.is_file()
            and path.suffix.lower() in VAE_SUFFIXES
            and not any((parent / "config.json").is_file() for parent in path.parents if folder in parent.parents)
        ):
            found[path.relative_to(folder).as_posix()] = path
    return found


def load_vae(path: Path, like: AutoencoderKL, dtype: torch.dtype, device: torch.device) -> AutoencoderKL:
    """Load a VAE shaped like `like` (the model's own); raises UserError with the reason when it cannot."""
    if path.is_dir():
        vae = AutoencoderKL.from_pretrained(path, local_files_only=True)
    else:
        state = _read_state(path)
        vae = AutoencoderKL.from_config(like.config)
        if not any("down_blocks" in k for k in state):  # the original (LDM) key layout: convert it
            from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

            state = convert_ldm_vae_checkpoint(state, dict(like.config))
        try:
            vae.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise UserError(f"VAE {path.name} does not fit the loaded model: {str(e).splitlines()[0][:200]}") from None
    vae.requires_grad_(False)
    vae.eval()
    return vae.to(device=device, dtype=dtype)


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix.lower() == ".safetensors":
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
            state = state.get("state_dict", state) if isinstance(state, dict) else state
    except Exception as e:  # any unreadable or refused file: one message
        raise UserError(f"VAE {path.name} could not be read safely: {str(e).splitlines()[0][:200]}") from None
    if not isinstance(state, dict):
        raise UserError(f"VAE {path.name} does not hold a state dict.")
    prefix = "first_stage_model."
    return {k[len(prefix) :] if k.startswith(prefix) else k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
