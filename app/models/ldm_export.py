"""Writing a diffusers pipeline as an original (LDM) single-file checkpoint, the layout A1111, ComfyUI and kohya load:
SD 1.x (CLIP ViT-L in the transformers layout), SD 2.x (OpenCLIP), SDXL (both). Used to save a checkpoint with LoRAs
merged in, by the tests for single-file fixtures and by the benchmarks for full-size files with random weights.

Written from the LDM layout itself (input_blocks / middle_block / output_blocks, encoder.down.N.block.M, ...),
independently of the app's loader (`single_file.py`, which converts with diffusers' own mapping), so a bug in
either one shows up as a round trip that does not match (the single-file tests), instead of hiding behind a shared
mapping.
"""

from __future__ import annotations

import torch

RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _rename_resnet(rest: str) -> str:
    head, _, tail = rest.partition(".")
    return f"{RESNET[head]}.{tail}"


def family(pipe) -> str:
    """ "sdxl" (two text encoders), "sd2" (an OpenCLIP text encoder: GELU, where OpenAI's CLIP of SD 1.x has
    quick-GELU; by the activation, not the width, so the tiny SD 2.x-style models count) or "sd1"."""
    if getattr(pipe, "text_encoder_2", None) is not None:
        return "sdxl"
    return "sd2" if pipe.text_encoder.config.hidden_act == "gelu" else "sd1"


def export(pipe, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The pipeline in the LDM layout of its `family`."""
    return {"sdxl": export_sdxl, "sd2": export_sd2, "sd1": export_sd1}[family(pipe)](pipe, dtype)


def _copies(state: dict[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Own copies of the tensors (the model may change after), the floating ones in `dtype` when given: copied
    straight into it, so a model in fp32 saved in fp16 never needs a second fp32 copy of itself."""
    return {
        k: v.detach()
        .to(dtype=dtype if dtype is not None and v.is_floating_point() else v.dtype, copy=True)
        .contiguous()
        for k, v in state.items()
    }


def unet_to_ldm(state: dict[str, torch.Tensor], layers_per_block: int) -> dict[str, torch.Tensor]:
    n = layers_per_block + 1  # LDM input/output block slots per resolution
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        if key.startswith("conv_in."):
            new = "input_blocks.0.0." + parts[-1]
        elif key.startswith("time_embedding."):
            new = {"linear_1": "time_embed.0", "linear_2": "time_embed.2"}[parts[1]] + "." + parts[-1]
        elif key.startswith("add_embedding."):
            new = {"linear_1": "label_emb.0.0", "linear_2": "label_emb.0.2"}[parts[1]] + "." + parts[-1]
        elif key.startswith("conv_norm_out."):
            new = "out.0." + parts[-1]
        elif key.startswith("conv_out."):
            new = "out.2." + parts[-1]
        elif key.startswith("down_blocks."):
            i, kind = int(parts[1]), parts[2]
            rest = ".".join(parts[4:])
            if kind == "downsamplers":
                new = f"input_blocks.{(i + 1) * n}.0.op.{parts[-1]}"
            else:
                j = int(parts[3])
                slot = 1 + i * n + j
                new = (
                    f"input_blocks.{slot}.0.{_rename_resnet(rest)}"
                    if kind == "resnets"
                    else (f"input_blocks.{slot}.1.{rest}")
                )
        elif key.startswith("mid_block."):
            kind, j, rest = parts[1], int(parts[2]), ".".join(parts[3:])
            new = (
                f"middle_block.{0 if j == 0 else 2}.{_rename_resnet(rest)}"
                if kind == "resnets"
                else f"middle_block.1.{rest}"
            )
        elif key.startswith("up_blocks."):
            i, kind = int(parts[1]), parts[2]
            rest = ".".join(parts[4:])
            if kind == "upsamplers":
                has_attention = any(k.startswith(f"up_blocks.{i}.attentions.") for k in state)
                new = f"output_blocks.{i * n + n - 1}.{2 if has_attention else 1}.conv.{parts[-1]}"
            else:
                j = int(parts[3])
                slot = i * n + j
                new = (
                    f"output_blocks.{slot}.0.{_rename_resnet(rest)}"
                    if kind == "resnets"
                    else (f"output_blocks.{slot}.1.{rest}")
                )
        else:
            raise KeyError(key)
        out["model.diffusion_model." + new] = value
    return out


def vae_to_ldm(state: dict[str, torch.Tensor], n_blocks: int) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        side = parts[0]
        if side in ("quant_conv", "post_quant_conv") or parts[1] in ("conv_in", "conv_out"):
            new = key
        elif parts[1] == "conv_norm_out":
            new = f"{side}.norm_out.{parts[-1]}"
        elif parts[1] in ("down_blocks", "up_blocks"):
            i = int(parts[2])
            level = i if side == "encoder" else n_blocks - 1 - i
            group = "down" if side == "encoder" else "up"
            if parts[3] == "resnets":
                name = parts[5].replace("conv_shortcut", "nin_shortcut")
                new = f"{side}.{group}.{level}.block.{parts[4]}.{name}.{parts[-1]}"
            else:  # downsamplers / upsamplers
                new = f"{side}.{group}.{level}.{'downsample' if side == 'encoder' else 'upsample'}.conv.{parts[-1]}"
        elif parts[1] == "mid_block":
            if parts[2] == "resnets":
                new = (
                    f"{side}.mid.block_{int(parts[3]) + 1}.{parts[4].replace('conv_shortcut', 'nin_shortcut')}."
                    f"{parts[-1]}"
                )
            else:
                inner = ".".join(parts[4:-1])
                new = f"{side}.mid.attn_1.{VAE_ATTN[inner]}.{parts[-1]}"
                if value.ndim == 2:  # LDM stores the attention projections as 1x1 convolutions
                    value = value[:, :, None, None]
        else:
            raise KeyError(key)
        out["first_stage_model." + new] = value
    return out


def text_encoder_to_ldm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The transformers 4 layout A1111 checkpoints carry: cond_stage_model.transformer.text_model.<key>."""
    return {f"cond_stage_model.transformer.text_model.{k.removeprefix('text_model.')}": v for k, v in state.items()}


def _unet_and_vae(pipe) -> dict[str, torch.Tensor]:
    """The part every family shares: the UNet and the VAE in the LDM layout."""
    state = unet_to_ldm(pipe.unet.state_dict(), pipe.unet.config.layers_per_block)
    state.update(vae_to_ldm(pipe.vae.state_dict(), len(pipe.vae.config.block_out_channels)))
    return state


def export_sd1(pipe, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    state = _unet_and_vae(pipe)
    state.update(text_encoder_to_ldm(pipe.text_encoder.state_dict()))
    return _copies(state, dtype)


def text_encoder_to_open_clip(state: dict[str, torch.Tensor], p: str = "cond_stage_model.model.") -> dict:
    """The OpenCLIP layout (SD 2.x, SDXL's second encoder): resblocks with fused q/k/v (`in_proj_*`), `ln_1/ln_2`,
    `mlp.c_fc/c_proj`, and `text_projection` stored as [width, projection]."""
    projection = state.get("text_projection.weight")
    state = {k.removeprefix("text_model."): v for k, v in state.items()}
    out = {
        p + "token_embedding.weight": state["embeddings.token_embedding.weight"],
        p + "positional_embedding": state["embeddings.position_embedding.weight"],
        p + "ln_final.weight": state["final_layer_norm.weight"],
        p + "ln_final.bias": state["final_layer_norm.bias"],
    }
    width = out[p + "token_embedding.weight"].shape[1]
    out[p + "text_projection"] = projection.T if projection is not None else torch.eye(width)
    layers = sorted({int(k.split(".")[2]) for k in state if k.startswith("encoder.layers.")})
    for i in layers:
        src, dst = f"encoder.layers.{i}.", f"{p}transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[dst + f"attn.in_proj_{kind}"] = torch.cat(
                [state[src + f"self_attn.{x}_proj.{kind}"] for x in ("q", "k", "v")]
            )
            out[dst + f"attn.out_proj.{kind}"] = state[src + f"self_attn.out_proj.{kind}"]
            out[dst + f"ln_1.{kind}"] = state[src + f"layer_norm1.{kind}"]
            out[dst + f"ln_2.{kind}"] = state[src + f"layer_norm2.{kind}"]
            out[dst + f"mlp.c_fc.{kind}"] = state[src + f"mlp.fc1.{kind}"]
            out[dst + f"mlp.c_proj.{kind}"] = state[src + f"mlp.fc2.{kind}"]
    return out


def export_sd2(pipe, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    state = _unet_and_vae(pipe)
    state.update(text_encoder_to_open_clip(pipe.text_encoder.state_dict()))
    return _copies(state, dtype)


def export_sdxl(pipe, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    state = _unet_and_vae(pipe)
    state.update(
        {
            f"conditioner.embedders.0.transformer.text_model.{k.removeprefix('text_model.')}": v
            for k, v in pipe.text_encoder.state_dict().items()
        }
    )
    state.update(text_encoder_to_open_clip(pipe.text_encoder_2.state_dict(), "conditioner.embedders.1.model."))
    return _copies(state, dtype)


def meta_pipeline(folder):
    """The components of a shipped config folder, built on the meta device: full-size shapes, no memory."""
    import json
    from types import SimpleNamespace

    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    def config(name):
        return json.loads((folder / name / "config.json").read_text())

    with torch.device("meta"):
        parts = SimpleNamespace(
            unet=UNet2DConditionModel.from_config(config("unet")),
            vae=AutoencoderKL.from_config(config("vae")),
            text_encoder=CLIPTextModel(CLIPTextConfig(**config("text_encoder"))),
        )
        if (folder / "text_encoder_2").is_dir():
            parts.text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**config("text_encoder_2")))
    return parts
