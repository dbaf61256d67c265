"""Every name a LoRA file may use for a layer of the loaded model, mapped to that layer.

LoRA files name layers in several ways, all derived from module paths:

- kohya/A1111: `lora_unet_<path>` and `lora_te_text_model_<path>` (`lora_te1_`/`lora_te2_` for SDXL's two text
  encoders) with `.` written as `_`; the UNet path in diffusers' layout (`down_blocks_0_attentions_0_...`) or in the
  original LDM layout (`input_blocks_1_1_...`, what SDXL LoRAs use);
- diffusers/PEFT: `unet.<path>`, `text_encoder.<path>`, `text_encoder_2.<path>` with dots, the text encoder path with
  or without transformers' `text_model.` level.

Because `_` also occurs inside module names (`to_q`, `transformer_blocks`), a kohya name cannot be split back into a
path; instead the table is built forwards, from every Linear/Conv2d (and GroupNorm/LayerNorm) module of the model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

UNET, TEXT_ENCODER, TEXT_ENCODER_2 = "unet", "text_encoder", "text_encoder_2"
# the layers a LoRA changes; the norms only LyCORIS's norm and full-difference layers do (A1111 patches them too)
LAYER_TYPES = (torch.nn.Linear, torch.nn.Conv2d, torch.nn.GroupNorm, torch.nn.LayerNorm)

_RESNET_LDM = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "time_emb_proj": "emb_layers.1",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_TOP_LDM = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}


@dataclass(frozen=True)
class Target:
    """One layer a LoRA can change: which component it is in, its path there, and its weight's shape."""

    component: str
    path: str
    module: torch.nn.Module

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.module.weight.shape)


def ldm_unet_path(path: str, unet_config) -> str | None:
    """The original (LDM) name of a diffusers UNet module path, or None for modules LDM has no name for."""
    if path in _TOP_LDM:
        return _TOP_LDM[path]
    n = unet_config.layers_per_block
    if not isinstance(n, int):
        return None  # per-block counts: no SD/SDXL checkpoint has them
    parts = path.split(".")

    def resnet(rest: list[str]) -> str | None:
        mapped = _RESNET_LDM.get(rest[0])
        return None if mapped is None else ".".join([mapped, *rest[1:]])

    if parts[0] == "down_blocks":
        i, kind = int(parts[1]), parts[2]
        if kind == "downsamplers":
            return f"input_blocks.{(i + 1) * (n + 1)}.0.op"
        slot = 1 + i * (n + 1) + int(parts[3])
        if kind == "resnets":
            inner = resnet(parts[4:])
            return None if inner is None else f"input_blocks.{slot}.0.{inner}"
        return f"input_blocks.{slot}.1." + ".".join(parts[4:])
    if parts[0] == "mid_block":
        kind, j = parts[1], int(parts[2])
        if kind == "resnets":
            inner = resnet(parts[3:])
            return None if inner is None else f"middle_block.{0 if j == 0 else 2}.{inner}"
        return "middle_block.1." + ".".join(parts[3:])
    if parts[0] == "up_blocks":
        i, kind = int(parts[1]), parts[2]
        if kind == "upsamplers":
            has_attention = unet_config.up_block_types[i].startswith("CrossAttn")
            return f"output_blocks.{i * (n + 1) + n}.{2 if has_attention else 1}.conv"
        slot = i * (n + 1) + int(parts[3])
        if kind == "resnets":
            inner = resnet(parts[4:])
            return None if inner is None else f"output_blocks.{slot}.0.{inner}"
        return f"output_blocks.{slot}.1." + ".".join(parts[4:])
    return None


def _underscored(path: str) -> str:
    return path.replace(".", "_")


def layer_table(components: dict[str, torch.nn.Module]) -> dict[str, Target]:
    """Every accepted layer name -> Target, for the model's components (`unet`, `text_encoder`, and for SDXL
    `text_encoder_2`)."""
    table: dict[str, Target] = {}
    xl = TEXT_ENCODER_2 in components
    kohya_te = {TEXT_ENCODER: "lora_te1_" if xl else "lora_te_", TEXT_ENCODER_2: "lora_te2_"}
    for component, root in components.items():
        for path, module in root.named_modules():
            if not isinstance(module, LAYER_TYPES) or not path or getattr(module, "weight", None) is None:
                continue  # a norm without its own weight (elementwise_affine=False) has nothing to change
            target = Target(component, path, module)
            names = [f"{component}.{path}"]
            if component == UNET:
                names.append("lora_unet_" + _underscored(path))
                ldm = ldm_unet_path(path, root.config)
                if ldm is not None:
                    names.append("lora_unet_" + _underscored(ldm))
            else:
                inner = path.removeprefix("text_model.")  # transformers 5 has no text_model level; files do
                names += [f"{component}.text_model.{inner}", kohya_te[component] + "text_model_" + _underscored(inner)]
            for name in names:
                table.setdefault(name, target)
    return table


def model_components(pipe) -> dict[str, torch.nn.Module]:
    """The parts of a pipeline a LoRA can touch."""
    parts = {UNET: pipe.unet, TEXT_ENCODER: pipe.text_encoder}
    if getattr(pipe, "text_encoder_2", None) is not None:
        parts[TEXT_ENCODER_2] = pipe.text_encoder_2
    return parts
