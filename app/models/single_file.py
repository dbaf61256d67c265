"""Single-file checkpoints (A1111's `.safetensors`/`.ckpt` in the original LDM key layout), loaded offline.

SD 1.x, SD 2.x and SDXL (with shipped tiny variants for tests). The architecture is read from the state dict's
keys and shapes; the components are built from the configs
shipped in `app/models/configs/` and filled with the converted weights. Nothing is fetched: diffusers' key
converters are used for the UNet and the VAE, and the CLIP text encoder's keys are mapped here (its layout in
transformers 5 has no `text_model.` level, which diffusers' own single-file loader does not expect).
"""

from __future__ import annotations

import json
import pickle
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
)
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from app.errors import UserError
from app.generation.samplers import SAMPLERS
from app.models.tokenizer import load_clip_tokenizer

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
UNET = "model.diffusion_model."
CLIP = "cond_stage_model.transformer."
OPEN_CLIP = "cond_stage_model.model."
XL_L = "conditioner.embedders.0.transformer."
XL_G = "conditioner.embedders.1.model."
IN_CONV_KEY = UNET + "input_blocks.0.0.weight"


@dataclass(frozen=True)
class Architecture:
    name: str  # the config folder under app/models/configs
    label: str


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a single-file checkpoint; `.ckpt` only through weights_only loading."""
    try:
        if path.suffix.lower() == ".safetensors":
            return load_file(str(path))
        data = torch.load(path, map_location="cpu", weights_only=True)
    except SafetensorError as e:
        raise UserError(
            f"Checkpoint {path.name} is not a readable safetensors file ({e}); it may be truncated "
            "or still downloading."
        ) from None
    except pickle.UnpicklingError as e:
        detail = (
            "it holds Python objects other than tensors, which could run code"
            if "GLOBAL" in str(e)
            else ("it is not a readable torch file")
        )
        raise UserError(f"Checkpoint {path.name} was refused: {detail}. Use a .safetensors version.") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise UserError(
            f"Checkpoint {path.name} could not be read ({str(e).splitlines()[0][:160]}); it may be truncated."
        ) from None
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict):
        raise UserError(f"Checkpoint {path.name} does not hold a state dict.")
    return {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}


class _Header(dict):
    """Key -> shape of a checkpoint, read without loading its tensors (safetensors) or from loaded tensors."""


def read_header(path: Path) -> _Header:
    if path.suffix.lower() == ".safetensors":
        try:
            with safe_open(str(path), "pt") as f:
                return _Header({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})  # noqa: SIM118
        except (SafetensorError, OSError, ValueError) as e:
            raise UserError(
                f"Checkpoint {path.name} is not a readable safetensors file ({e}); it may be truncated "
                "or still downloading."
            ) from None
    return _Header({k: tuple(v.shape) for k, v in read_state_dict(path).items()})


def check_checkpoint(path: Path) -> Architecture:
    """Refuse a file that cannot load, before anything is unloaded to make room for it."""
    return detect(read_header(path), path.name)


def family_of(keys) -> tuple[str, str] | None:
    """(family, label) of a checkpoint by its text encoders' keys: SDXL, SD 2.x (OpenCLIP) or SD 1.x (CLIP)."""
    if any(k.startswith(XL_G) for k in keys):
        return "sdxl", "Stable Diffusion XL"
    if any(k.startswith(OPEN_CLIP) for k in keys):
        return "sd2", "Stable Diffusion 2.x"
    if any(k.startswith(CLIP) for k in keys):
        return "sd1", "Stable Diffusion 1.x"
    return None


def detect(state: dict, name: str) -> Architecture:
    """Which shipped config fits (`state` maps keys to tensors or shapes); otherwise a UserError that says what
    the file seems to be."""
    state = _Header({k: tuple(v.shape) if isinstance(v, torch.Tensor) else v for k, v in state.items()})
    keys = state.keys()
    if any("lora_down" in k or k.startswith("lora_") for k in keys):
        raise UserError(
            f"'{name}' looks like a LoRA, not a checkpoint; LoRAs are not supported, and this folder "
            "is for full Stable Diffusion models."
        )
    if not any(k.startswith(UNET) for k in keys):
        if any(k.startswith(("encoder.down", "decoder.up", "first_stage_model.")) for k in keys):
            raise UserError(f"'{name}' looks like a VAE; put it in models/VAE and pick it as the SD VAE.")
        raise UserError(f"'{name}' has no Stable Diffusion UNet weights ({UNET}...); it is not a checkpoint.")
    if IN_CONV_KEY in state and state[IN_CONV_KEY][1] != 4:
        raise UserError(
            f"'{name}' is an inpainting or other special model ({state[IN_CONV_KEY][1]} input "
            "channels); only text-to-image checkpoints can be loaded."
        )
    found = family_of(keys)
    if found is None:
        raise UserError(
            f"'{name}' has no text encoder weights that this app knows; expected an SD 1.x or 2.x checkpoint."
        )
    family, label = found
    context_keys = sorted(k for k in keys if k.startswith(UNET) and k.endswith("attn2.to_k.weight"))
    if not context_keys:
        raise UserError(f"'{name}' has an unknown UNet layout; expected an SD 1.x, 2.x or XL checkpoint.")
    context = int(state[context_keys[0]][-1])
    for folder in sorted(p for p in CONFIG_DIR.iterdir() if p.is_dir() and p.name.endswith(family)):
        unet = json.loads((folder / "unet" / "config.json").read_text())
        if unet["cross_attention_dim"] == context and _fits(state, unet):
            return Architecture(folder.name, label if folder.name == family else f"{label} ({folder.name})")
    raise UserError(f"'{name}' is {label}-like with {context}-wide text conditioning, which no shipped config matches.")


def _fits(state: dict, unet_config: dict) -> bool:
    conv_in = state.get(IN_CONV_KEY)
    return conv_in is not None and int(conv_in[0]) == int(unet_config["block_out_channels"][0])


def _text_encoder_state(state: dict[str, torch.Tensor], model: CLIPTextModel, prefix: str) -> dict[str, torch.Tensor]:
    """The text encoder's weights (found under `prefix`) with the model's own key names (with or without a
    `text_model.` level)."""
    if prefix in (OPEN_CLIP, XL_G):
        source = convert_open_clip_checkpoint(model, state, prefix)
    else:
        source = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    wanted = set(model.state_dict())
    out = {}
    for key, value in source.items():
        if key not in wanted and key.startswith("text_model."):
            key = key[len("text_model.") :]
        if key in wanted:
            out[key] = value
    return out


def prediction_type(path: Path, default: str) -> str:
    """SD 2.x comes in epsilon and v-prediction variants that weights alone do not tell apart. A1111 reads a
    `<checkpoint>.yaml` beside the file; its `parameterization: "v"` means v-prediction. Without one, the shipped
    config's default applies (v-prediction for full-size SD 2.x, as the 768 px models that most people use)."""
    sidecar = path.with_suffix(".yaml")
    if sidecar.is_file():
        text = sidecar.read_text(encoding="utf-8", errors="replace")
        found = re.search(r"parameterization:\s*[\"']?(\w+)", text)
        if found:
            return "v_prediction" if found.group(1).lower() == "v" else "epsilon"
    return default


def _no_init_weights():
    try:  # transformers >= 5
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4
        from transformers.modeling_utils import no_init_weights
    return no_init_weights()


def load_single_file(path: Path, dtype: torch.dtype) -> StableDiffusionPipeline:
    """Build the pipeline of a single-file checkpoint from a shipped config and its converted weights."""
    state = read_state_dict(path)
    arch = detect(state, path.name)
    folder = CONFIG_DIR / arch.name
    # UNet and VAE are built without allocating (meta device) and take the file's tensors as they are: no random
    # initialisation of a billion weights, no second copy in memory.
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(json.loads((folder / "unet" / "config.json").read_text()))
        vae = AutoencoderKL.from_config(json.loads((folder / "vae" / "config.json").read_text()))
    encoders = [
        (
            "text_encoder",
            CLIPTextModel,
            XL_L if arch.name.endswith("sdxl") else (OPEN_CLIP if arch.name.endswith("sd2") else CLIP),
        )
    ]
    if arch.name.endswith("sdxl"):
        encoders.append(("text_encoder_2", CLIPTextModelWithProjection, XL_G))
    text_encoders = {}
    for component, cls, prefix in encoders:
        with _no_init_weights():  # every weight is overwritten from the file right after
            model = cls(CLIPTextConfig(**json.loads((folder / component / "config.json").read_text())))
        weights = _text_encoder_state(state, model, prefix)
        missing = (
            set(model.state_dict()) - set(weights) - {"embeddings.position_ids", "text_model.embeddings.position_ids"}
        )
        if missing:
            raise UserError(f"'{path.name}' lacks {component} weights ({sorted(missing)[:3]}...).")
        model.load_state_dict(weights, strict=False)
        text_encoders[component] = model
    scheduler_config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    scheduler_config["prediction_type"] = prediction_type(path, scheduler_config.get("prediction_type", "epsilon"))
    scheduler_class = next(
        s.scheduler_class for s in SAMPLERS if s.scheduler_class.__name__ == scheduler_config["_class_name"]
    )
    try:
        unet.load_state_dict(convert_ldm_unet_checkpoint(state, dict(unet.config)), strict=True, assign=True)
        vae.load_state_dict(convert_ldm_vae_checkpoint(state, dict(vae.config)), strict=True, assign=True)
    except (RuntimeError, KeyError) as e:
        raise UserError(
            f"'{path.name}' looked like {arch.label} but its weights do not fit that architecture "
            f"({str(e).splitlines()[0][:200]})."
        ) from None
    still_empty = [n for m in (unet, vae) for n, t in [*m.named_parameters(), *m.named_buffers()] if t.is_meta]
    if still_empty:
        raise UserError(f"'{path.name}' lacks weights for {still_empty[:3]}...")
    scheduler = scheduler_class.from_config(scheduler_config)
    first = text_encoders["text_encoder"]
    if "text_encoder_2" in text_encoders:
        pipe = StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=first,
            text_encoder_2=text_encoders["text_encoder_2"],
            tokenizer=load_clip_tokenizer(),
            tokenizer_2=load_clip_tokenizer(pad_token="!"),
            unet=unet,
            scheduler=scheduler,
        )
    else:
        pad = "!" if first.config.pad_token_id == 0 else None  # OpenCLIP pads with "!" (id 0)
        pipe = StableDiffusionPipeline(
            vae=vae,
            text_encoder=first,
            tokenizer=load_clip_tokenizer(pad_token=pad),
            unet=unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    pipe.to(dtype=dtype)
    return pipe
