"""The embedded default model: a tiny network with Stable Diffusion v1's architecture.

It exists so every feature runs end to end on a laptop CPU with no download: same classes as SD1
(UNet2DConditionModel, AutoencoderKL, CLIPTextModel, CLIP tokenizer), far fewer channels. The shipped weights
(`models/Stable-diffusion/shapes-64/`, fp16) were trained by `scripts/train_default_model.py` on procedural scenes
of coloured shapes (`app/shapes/`), so "a red circle on a blue background" draws one. `build_default_pipeline`
gives the same architecture with random weights from a seed: the training script's starting point, and the
fallback when the shipped folder is missing.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from app.models.tokenizer import SHIPPED_DIR, load_clip_tokenizer

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "shapes-64"
SHIPPED_MODEL = Path(__file__).resolve().parents[2] / "models" / "Stable-diffusion" / DEFAULT_MODEL_NAME
SHAPES_XL_NAME = "shapes-xl"  # the same scenes on SDXL's architecture (two text encoders, size conditioning)
SHIPPED_XL_MODEL = SHIPPED_MODEL.parent / SHAPES_XL_NAME
SEED = 20261124
TEXT_WIDTH = 64

# SD1.x's own scheduler settings (scaled-linear betas, 1000 steps, epsilon prediction).
SCHEDULER_CONFIG = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    num_train_timesteps=1000,
    skip_prk_steps=True,
    steps_offset=1,
    set_alpha_to_one=False,
    prediction_type="epsilon",
)


def _text_config(width: int, layers: int, act: str, pad_token_id: int, projection_dim: int | None = None):
    return CLIPTextConfig(
        vocab_size=49408,
        hidden_size=width,
        intermediate_size=4 * width,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act=act,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=pad_token_id,
        projection_dim=projection_dim or width,
    )


def _tiny_vae(**extra) -> AutoencoderKL:
    """A 4-level VAE (8x downsampling, as SD's) with very few channels (4 per norm group, as SD's 128/32)."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(32, 32, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
        **extra,
    )


def build_default_pipeline(seed: int = SEED) -> StableDiffusionPipeline:
    """Build the tiny pipeline; the same seed gives the same weights."""
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(_text_config(TEXT_WIDTH, 4, "quick_gelu", 49407))
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_WIDTH,
        attention_head_dim=8,
        # 4-8 channels per group as in SD (320/32): one channel per group would normalise away each channel's
        # level, and with it the colour of a flat background.
        norm_num_groups=8,
    )
    vae = _tiny_vae()
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=load_clip_tokenizer(),
        unet=unet,
        scheduler=PNDMScheduler(**SCHEDULER_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def ensure_default_model(ckpt_dir: Path) -> Path:
    """Create the default model folder under `ckpt_dir` unless it exists, and put the shipped SDXL-layout
    `shapes-xl` beside it when it is shipped; return the default model's path.

    Written to temporary folders first and renamed into place, so an interrupted first start leaves nothing
    half-written behind.
    """
    target = ckpt_dir / DEFAULT_MODEL_NAME
    if not (target / "model_index.json").is_file():
        if (SHIPPED_MODEL / "model_index.json").is_file():
            log.info("Copying the default model into %s", target)
            _install(target, lambda tmp: shutil.copytree(SHIPPED_MODEL, tmp, dirs_exist_ok=True))
        else:
            log.warning(
                "The shipped default model (%s) is missing: building an untrained one of the same architecture "
                "(its images are noise). `python scripts/train_default_model.py` trains it again.",
                SHIPPED_MODEL,
            )
            _install(target, _build_untrained)
    xl_target = ckpt_dir / SHAPES_XL_NAME
    if (SHIPPED_XL_MODEL / "model_index.json").is_file() and not xl_target.exists():
        _install(xl_target, lambda tmp: shutil.copytree(SHIPPED_XL_MODEL, tmp, dirs_exist_ok=True))
    return target


def _build_untrained(folder: Path) -> None:
    build_default_pipeline().save_pretrained(folder, safe_serialization=True)
    # Ship the plain BPE files beside diffusers' tokenizer files: our loader reads these.
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(SHIPPED_DIR / name, folder / "tokenizer" / name)


def _install(target: Path, fill) -> None:
    """`fill` a temporary folder beside `target`, then rename it into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=target.parent))
    try:
        fill(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def build_tiny_sd2_pipeline(seed: int = SEED) -> StableDiffusionPipeline:
    """A tiny model with SD 2.x's layout (linear attention projections, per-level head counts, GELU OpenCLIP-style
    text encoder padding with "!"); used to test SD 2.x loading paths on the CPU."""
    torch.manual_seed(seed)
    width = 96
    text_encoder = CLIPTextModel(_text_config(width, 3, "gelu", 0))
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=width,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        norm_num_groups=32,
    )
    vae = _tiny_vae()
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=load_clip_tokenizer(pad_token="!"),
        unet=unet,
        scheduler=PNDMScheduler(**SCHEDULER_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def build_tiny_sdxl_pipeline(seed: int = SEED):
    """A tiny model with SDXL's layout (two text encoders, the second with a projection and "!" padding; a UNet with
    text+time added conditioning); used to test SDXL paths on the CPU."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(seed)
    width_l, width_g, proj = 32, 64, 32
    text_encoder = CLIPTextModel(_text_config(width_l, 3, "quick_gelu", 49407))
    text_encoder_2 = CLIPTextModelWithProjection(_text_config(width_g, 3, "gelu", 0, proj))
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=width_l + width_g,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + proj,
        transformer_layers_per_block=1,
        norm_num_groups=32,
    )
    vae = _tiny_vae(scaling_factor=0.13025)
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        steps_offset=1,
        timestep_spacing="leading",
    )
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=load_clip_tokenizer(),
        tokenizer_2=load_clip_tokenizer(pad_token="!"),
        unet=unet,
        scheduler=scheduler,
    )


XL_TIME_EMBED = 8  # width of each of the six size-conditioning numbers' embeddings


def build_shapes_xl_pipeline(seed: int = SEED):
    """shapes-xl's architecture: SDXL's classes (two text encoders, the second with a projection and "!" padding;
    a UNet with SDXL's text+time added conditioning and linear attention projections) at shapes-64's widths, so
    it can start from shapes-64's trained weights (`init_xl_from_sd`)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(_text_config(TEXT_WIDTH, 4, "quick_gelu", 49407))
    text_encoder_2 = CLIPTextModelWithProjection(_text_config(TEXT_WIDTH, 4, "gelu", 0, TEXT_WIDTH))
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=2 * TEXT_WIDTH,
        attention_head_dim=8,
        norm_num_groups=8,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=XL_TIME_EMBED,
        projection_class_embeddings_input_dim=6 * XL_TIME_EMBED + TEXT_WIDTH,
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        steps_offset=1,
        timestep_spacing="leading",
        prediction_type="epsilon",
    )
    return StableDiffusionXLPipeline(
        vae=_tiny_vae(),
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=load_clip_tokenizer(),
        tokenizer_2=load_clip_tokenizer(pad_token="!"),
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=False,  # its unconditional side was trained on the encoded empty prompt
    )


@torch.no_grad()
def init_xl_from_sd(xl, sd) -> None:
    """Start shapes-xl from shapes-64: the same VAE, both text encoders from its text encoder (the second gets an
    identity projection), and every UNet weight of the same role. Cross-attention keys and values read the two
    encoders side by side, so they start as shapes-64's halved on each half; the added size/pooled embedding
    starts as a no-op (zero last layer). Training then adapts all of it to SDXL's conditioning."""
    xl.vae.load_state_dict(sd.vae.state_dict())
    xl.vae.register_to_config(scaling_factor=sd.vae.config.scaling_factor)
    xl.text_encoder.load_state_dict(sd.text_encoder.state_dict())
    xl.text_encoder_2.text_model.load_state_dict(sd.text_encoder.state_dict())
    xl.text_encoder_2.text_projection.weight.copy_(torch.eye(TEXT_WIDTH))
    source = sd.unet.state_dict()
    for key, value in xl.unet.state_dict().items():
        old = source.get(key)
        if old is None:
            continue
        if old.shape == value.shape:
            value.copy_(old)
        elif old.numel() == value.numel():  # proj_in/proj_out: 1x1 convolution -> linear
            value.copy_(old.reshape(value.shape))
        elif key.endswith(("attn2.to_k.weight", "attn2.to_v.weight")):
            value.copy_(torch.cat([old, old], dim=1) / 2)
    xl.unet.add_embedding.linear_2.weight.zero_()
    xl.unet.add_embedding.linear_2.bias.zero_()
