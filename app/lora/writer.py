"""Writing LoRA files in kohya's format (and LyCORIS's LoHa/LoKr under kohya's names), which A1111, ComfyUI,
kohya's scripts and (LoRAs) diffusers' `load_lora_weights` all read: `lora_unet_<path>` / `lora_te_text_model_<path>`
names (diffusers-style paths, as kohya's SD 1.x/2.x scripts write them; SDXL's encoders as `lora_te1_`/`lora_te2_`),
`.lora_down.weight`, `.lora_up.weight` (LyCORIS: `.hada_*`, `.lokr_*`), `.alpha`, and `ss_` metadata."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from safetensors.torch import save, save_file

from app.fileio import atomic_write
from app.lora.files import BUNDLE_PREFIX
from app.lora.names import TEXT_ENCODER, TEXT_ENCODER_2, UNET
from app.models.ldm_export import family


def kohya_name(component: str, path: str, xl: bool = False) -> str:
    """The kohya name of a layer; on SDXL the two text encoders are `lora_te1_` and `lora_te2_`."""
    if component == UNET:
        return "lora_unet_" + path.replace(".", "_")
    te_prefix = {TEXT_ENCODER: "lora_te1_" if xl else "lora_te_", TEXT_ENCODER_2: "lora_te2_"}.get(component)
    if te_prefix is None or (component == TEXT_ENCODER_2 and not xl):
        raise ValueError(f"no kohya name for component {component}")
    return te_prefix + "text_model_" + path.removeprefix("text_model.").replace(".", "_")


# a file's precision by its name (kohya's `save_precision`): LoRAs trained, extracted and merged, merged checkpoints
SAVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def model_version(pipe) -> tuple[str, bool]:
    """kohya's `ss_base_model_version` for the pipeline's model, and its `ss_v2`."""
    kind = family(pipe)
    return {"sdxl": "sdxl_base_v1-0", "sd2": "sd_v2", "sd1": "sd_v1"}[kind], kind == "sd2"


def save_network(
    path: Path,
    layers: list[tuple[str, str, dict[str, torch.Tensor], float]],
    metadata: dict[str, str],
    xl: bool = False,
    dtype: torch.dtype = torch.float32,
    extra: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write (component, module path, {tensor name: tensor}, alpha) layers to `path` atomically, as
    `<kohya name>.<tensor name>` (`lora_down.weight`/`lora_up.weight` for a LoRA, LyCORIS's `hada_*`/`lokr_*`) and
    `<kohya name>.alpha`, the weights in `dtype` (fp16 is what LoRAs are shared in: half the size; training keeps
    its fp32 values in `.optim` to resume exactly). `extra` tensors (bundled embeddings) are written as they are."""
    tensors: dict[str, torch.Tensor] = {k: v.detach().cpu().contiguous() for k, v in (extra or {}).items()}
    for component, module_path, parts, alpha in layers:
        name = kohya_name(component, module_path, xl)
        for part, value in parts.items():
            tensors[f"{name}.{part}"] = value.detach().to(dtype).cpu().contiguous()
        tensors[name + ".alpha"] = torch.tensor(float(alpha))
    metadata = {**metadata, "sshs_model_hash": tensor_data_hash(tensors)}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def bundle_tensors(name: str, vectors: torch.Tensor, split: int | None) -> dict[str, torch.Tensor]:
    """An embedding bundled in a LoRA file as A1111 reads it (and OneTrainer writes it): SD 1.x/2.x as the
    `string_to_param` of A1111's .pt layout, SDXL as `clip_l` and `clip_g` (`split`: clip_l's width), in fp32."""
    vectors = vectors.detach().float()
    if split is None:
        return {f"{BUNDLE_PREFIX}{name}.string_to_param.*": vectors}
    return {f"{BUNDLE_PREFIX}{name}.clip_l": vectors[:, :split], f"{BUNDLE_PREFIX}{name}.clip_g": vectors[:, split:]}


def tensor_data_hash(tensors: dict[str, torch.Tensor]) -> str:
    """kohya's `sshs_model_hash`: the sha256 of the file's tensor data (after the header, so the metadata that holds
    it does not change it), the "addnet" hash A1111 shows for a LoRA; written so that A1111 and we need not read
    the whole file to hash it."""
    raw = save(tensors)  # the same data section as the file, without metadata
    return hashlib.sha256(raw[8 + int.from_bytes(raw[:8], "little") :]).hexdigest()
