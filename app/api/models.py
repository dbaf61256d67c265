"""Pydantic models for A1111's `/sdapi/v1` payloads. Unknown fields are accepted (A1111 clients send many)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from app.embeddings.service import MAX_VECTORS
from app.generation.txt2img import MAX_BATCH_COUNT, MAX_BATCH_SIZE, MAX_SEED, MAX_SIZE, MAX_STEPS, MIN_SIZE
from app.hypernetworks.service import MAX_WIDTH
from app.training.service import MAX_LORA_ALPHA, MAX_LORA_RANK, MAX_WEIGHT_NORM
from app.training.validation import MAX_VALIDATION_SEED


def bounded(
    default: Any,
    minimum: float | None = None,
    maximum: float | None = None,
    multiple_of: int | None = None,
    exclusive_maximum: float | None = None,
    exclusive_minimum: float | None = None,
) -> Any:
    """A field whose range is declared in the OpenAPI schema, for clients and fuzzers, but checked by the services:
    a value outside it gets our 400 naming the field and the range (the same message the UI shows) rather than
    pydantic's 422 list, and A1111 clients that send the odd out-of-range value on a field we ignore keep working."""
    extra = {
        key: value
        for key, value in (
            ("minimum", minimum),
            ("maximum", maximum),
            ("multipleOf", multiple_of),
            ("exclusiveMaximum", exclusive_maximum),
            ("exclusiveMinimum", exclusive_minimum),
        )
        if value is not None
    }
    return Field(default, json_schema_extra=extra)


def name_field() -> Any:
    """A name the services turn into a file name; empty (or nothing usable) gets a 400 that says which characters."""
    return Field(json_schema_extra={"minLength": 1})


def size(default: int, minimum: int = MIN_SIZE) -> Any:
    return bounded(default, minimum, MAX_SIZE, 8)


def seed_field(default: int = -1) -> Any:
    return bounded(default, -1, MAX_SEED)


class Txt2ImgRequest(BaseModel):
    """A1111's StableDiffusionProcessingTxt2Img API model, with its defaults."""

    model_config = ConfigDict(extra="allow")

    prompt: str = ""
    negative_prompt: str = ""
    styles: list[str] | None = None
    seed: int = seed_field()
    subseed: int = seed_field()
    subseed_strength: float = bounded(0, 0, 1)
    seed_resize_from_h: int = bounded(-1, -1, MAX_SIZE)
    seed_resize_from_w: int = bounded(-1, -1, MAX_SIZE)
    sampler_name: str | None = None
    sampler_index: str | None = "Euler"
    scheduler: str | None = None
    batch_size: int = bounded(1, 1, MAX_BATCH_SIZE)
    n_iter: int = bounded(1, 1, MAX_BATCH_COUNT)
    steps: int = bounded(50, 1, MAX_STEPS)
    cfg_scale: float = bounded(7.0, 0, 100)
    width: int = size(512)
    height: int = size(512)
    restore_faces: bool | None = None
    tiling: bool | None = None
    do_not_save_samples: bool = False
    do_not_save_grid: bool = False
    eta: float | None = None
    denoising_strength: float | None = bounded(None, 0, 1)
    s_min_uncond: float | None = None
    s_churn: float | None = None
    s_tmax: float | None = None
    s_tmin: float | None = None
    s_noise: float | None = None
    override_settings: dict[str, Any] | None = None
    override_settings_restore_afterwards: bool = True
    refiner_checkpoint: str | None = None
    refiner_switch_at: float | None = None
    disable_extra_networks: bool = False
    firstpass_image: str | None = None
    comments: dict[str, Any] | None = None
    enable_hr: bool = False
    firstphase_width: int = 0
    firstphase_height: int = 0
    hr_scale: float = bounded(2.0, 1, MAX_SIZE / MIN_SIZE)
    hr_upscaler: str | None = None
    hr_second_pass_steps: int = bounded(0, 0, MAX_STEPS)
    hr_resize_x: int = size(0, 0)
    hr_resize_y: int = size(0, 0)
    hr_checkpoint_name: str | None = None
    hr_sampler_name: str | None = None
    hr_scheduler: str | None = None
    hr_prompt: str = ""
    hr_negative_prompt: str = ""
    force_task_id: str | None = None
    script_name: str | None = None
    script_args: list[Any] = Field(default_factory=list)
    send_images: bool = True
    save_images: bool = False
    alwayson_scripts: dict[str, Any] = Field(default_factory=dict)
    infotext: str | None = None


class CreateEmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str = name_field()
    num_vectors_per_token: int = bounded(1, 1, MAX_VECTORS)
    overwrite_old: bool = False
    init_text: str = "*"


class TrainRequest(BaseModel):
    """A1111's train payload (A1111 requires every field; we default the missing ones)."""

    model_config = ConfigDict(extra="allow")

    id_task: str | None = None
    learn_rate: str | float = "0.005"
    # ours (kohya's names): the shape of the rate over the run, applied to the A1111 schedule above
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts"] = "constant"
    lr_warmup_steps: int = bounded(0, 0, 10_000_000)
    lr_scheduler_num_cycles: int = bounded(1, 1, 1000)
    # ours (kohya's names): AdamW (A1111's), Prodigy (learning rate 1), Lion, Adafactor; "key=value" arguments
    optimizer_type: str = "AdamW"
    optimizer_args: str = ""
    batch_size: int = bounded(1, 1)
    gradient_step: int = bounded(1, 1)
    data_root: str = ""
    # ours (kohya's names): regularization images (prior preservation; LoRAs and hypernetworks), their loss weight
    reg_data_dir: str = ""
    prior_loss_weight: float = bounded(1.0, maximum=100, exclusive_minimum=0)
    log_directory: str = "log"
    training_width: int = size(512)
    training_height: int = size(512)
    varsize: bool = False
    enable_bucket: bool = False  # ours (kohya's name): aspect-ratio buckets instead of one square size
    min_snr_gamma: float = bounded(0.0, 0, 100)  # ours (kohya's name): Min-SNR loss weighting, 0 = off
    noise_offset: float = bounded(0.0, 0, 1)  # ours (kohya's name): per-channel noise offset, 0 = off
    # ours (kohya's names): multi-resolution noise levels (0 = off) and their discount; input perturbation
    multires_noise_iterations: int = bounded(0, 0, 20)
    multires_noise_discount: float = bounded(0.3, maximum=1, exclusive_minimum=0)
    ip_noise_gamma: float = bounded(0.0, 0, 1)
    # ours (kohya's names): the loss, the Huber threshold's schedule, c and scale, debiased estimation weights, the
    # timesteps trained [min_timestep, max_timestep)
    loss_type: Literal["l2", "l1", "huber", "smooth_l1"] = "l2"
    huber_schedule: Literal["snr", "exponential", "constant"] = "snr"
    huber_c: float = bounded(0.1, maximum=1, exclusive_minimum=0)
    huber_scale: float = bounded(1.0, maximum=10, exclusive_minimum=0)
    debiased_estimation_loss: bool = False
    min_timestep: int = bounded(0, 0, 999)
    max_timestep: int = bounded(1000, 1, 1000)
    # ours (kohya's names): the share of training images held out for a validation loss (0 = off), the seed that
    # picks them and their noise (null: the run's), how often (every N steps; 0 = at each epoch's end)
    validation_split: float = bounded(0.0, 0, exclusive_maximum=1)
    validation_seed: int | None = bounded(None, 0, MAX_VALIDATION_SEED)
    validate_every_n_steps: int = bounded(0, 0)
    # Required, as in A1111's API: a request that left it out would start a 100000-step run (A1111's UI default)
    # that holds the model and the queue for days.
    steps: int = bounded(..., 1)
    clip_grad_mode: str = "disabled"
    clip_grad_value: str | float = "0.1"
    shuffle_tags: bool = False
    tag_drop_out: float = bounded(0.0, 0, exclusive_maximum=1)
    keep_tokens: int = bounded(0, 0, 1000)  # ours (kohya's name): the first N tags are never shuffled or dropped
    caption_dropout_rate: float = bounded(0.0, 0, exclusive_maximum=1)  # ours (kohya's): empty-prompt share
    latent_sampling_method: str = "once"
    use_weight: bool = False
    # ours: "on" is about half the memory for ~1.3x the time per step; "auto" is off until a step runs out of memory
    # (on a GPU); true/false mean on/off
    gradient_checkpointing: bool | Literal["auto", "on", "off"] = "auto"
    create_image_every: int = bounded(500, 0)
    template_filename: str = "style_filewords.txt"
    preview_from_txt2img: bool = False
    preview_prompt: str = ""
    preview_negative_prompt: str = ""
    preview_steps: int = bounded(20, 1, MAX_STEPS)
    preview_sampler_name: str | None = "Euler a"
    preview_sampler_index: int | None = None
    preview_cfg_scale: float = bounded(7.0, 0, 100)
    preview_seed: int = seed_field()
    preview_width: int = size(512)
    preview_height: int = size(512)
    # ours (kohya's sample prompts): one preview per line at each preview step, kohya's `--n/--w/--h/--d/--l/--s/--ss`
    # options after the prompt; "" = the one preview of A1111
    sample_prompts: str = ""


class TrainEmbeddingRequest(TrainRequest):
    embedding_name: str = name_field()
    save_embedding_every: int = bounded(500, 0)
    save_image_with_stored_embedding: bool = True


class PreprocessRequest(BaseModel):
    """A1111's (pre-1.6) preprocess payload; the caption models it offered are not available offline."""

    model_config = ConfigDict(extra="allow")

    id_task: str | None = None
    process_src: str
    process_dst: str
    process_width: int = size(512)
    process_height: int = size(512)
    preprocess_txt_action: str = "ignore"  # ignore | copy (we also accept prepend/append as copy)
    process_keep_original_size: bool = False
    process_flip: bool = False
    process_split: bool = False
    process_caption: bool = False
    process_caption_deepbooru: bool = False
    process_split_threshold: float = bounded(0.5, 0, 10)
    process_overlap_ratio: float = bounded(0.2, 0, exclusive_maximum=0.9)
    process_focal_crop: bool = False
    process_multicrop: bool = False


class CreateHypernetworkRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str = name_field()
    enable_sizes: list[int] = Field(
        default_factory=lambda: [768, 320, 640, 1280],
        json_schema_extra={"items": {"type": "integer", "minimum": 1, "maximum": MAX_WIDTH}},
    )
    overwrite_old: bool = False
    layer_structure: str | list[float] | None = None
    activation_func: str | None = None
    weight_init: str | None = None
    add_layer_norm: bool = False
    use_dropout: bool = False
    dropout_structure: str | list[float] | None = None
    last_layer_dropout: bool = False


class TrainHypernetworkRequest(TrainRequest):
    hypernetwork_name: str = name_field()
    learn_rate: str | float = "0.00001"
    template_filename: str = "hypernetwork.txt"
    save_hypernetwork_every: int = bounded(500, 0)


class TrainLoraRequest(TrainRequest):
    """`train/hypernetwork`'s fields plus the LoRA's own; creates the LoRA or continues it (resume)."""

    lora_name: str = name_field()
    learn_rate: str | float = "0.0001"
    template_filename: str = "hypernetwork.txt"
    save_lora_every: int = bounded(500, 0)
    rank: int = bounded(8, 1, MAX_LORA_RANK)
    alpha: float = bounded(8.0, maximum=MAX_LORA_ALPHA, exclusive_minimum=0)
    train_text_encoder: bool = False
    # "loha" / "lokr": a LyCORIS LoHa / LoKr instead of a LoRA (kohya's network_module=lycoris.kohya, algo=...)
    network_type: Literal["lora", "loha", "lokr"] = "lora"
    # kohya's LoCon (network_args conv_dim/conv_alpha): also the UNet's ResNet 3x3 convolutions; 0 = off
    conv_dim: int = bounded(0, 0, MAX_LORA_RANK)
    conv_alpha: float = bounded(1.0, maximum=MAX_LORA_ALPHA, exclusive_minimum=0)
    # kohya's max-norm regularization: each layer's update kept at most this norm after every step; 0 = off
    scale_weight_norms: float = bounded(0.0, 0, MAX_WEIGHT_NORM)
    # kohya's dropouts while the LoRA trains: elements of the down projection's output (LoRA only), whole ranks,
    # whole layers per forward; 0 = off
    network_dropout: float = bounded(0.0, 0, exclusive_maximum=1)
    rank_dropout: float = bounded(0.0, 0, exclusive_maximum=1)
    module_dropout: float = bounded(0.0, 0, exclusive_maximum=1)
    # LyCORIS's LoKr `factor` for a new LoKr: -1 = the most square split of each layer's sides
    lokr_factor: int = bounded(-1, -1, MAX_LORA_RANK)
    # LyCORIS's `dora_wd`: a new network weight-decomposed (DoRA), a trained magnitude per input column of each layer
    dora_wd: bool = False
    text_encoder_lr: str | float = ""  # kohya's: the text encoder layers' rate (A1111 schedule syntax); "" = learn_rate
    # the file's precision: "" = fp16 for a new LoRA (as LoRAs are shared), the file's own for a continued one
    save_precision: Literal["", "fp16", "bf16", "fp32"] = ""
    # pivotal tuning: a new embedding, the word `[name]` becomes in the templates, trained beside the layers and
    # saved in the file (A1111's bundle_emb); "" = none. A continued LoRA trains the one its file bundles.
    bundle_embedding: str = ""
    bundle_vectors: int = bounded(1, 1, MAX_VECTORS)
    bundle_init_text: str = "*"
    embedding_lr: str | float = ""  # the bundled embedding's rate (A1111 schedule syntax); "" = learn_rate


class PNGInfoRequest(BaseModel):
    image: str


class ExtractLoraRequest(BaseModel):
    """kohya's `extract_lora_from_models.py` options: the change from `model_org` (empty: the loaded model) to
    `model_tuned` (checkpoint titles or names, as `sd_model_checkpoint` takes them) as the LoRA `lora_name`."""

    model_config = ConfigDict(extra="forbid")

    model_tuned: str = name_field()
    model_org: str = ""
    lora_name: str = name_field()
    rank: int = bounded(32, 1, MAX_LORA_RANK)  # kohya's `dim`
    conv_dim: int = bounded(0, 0, MAX_LORA_RANK)  # the ResNet 3x3 convolutions' rank; 0 = left out
    sv_fro: float = bounded(0.0, 0, 1)  # 0 = every layer at `rank`; else the least rank keeping this norm share
    clamp_quantile: float = bounded(0.99, maximum=1, exclusive_minimum=0)  # 1 = no clamping
    min_diff: float = bounded(0.01, 0, 1)  # text encoders that changed by at most this are left out
    save_precision: Literal["fp16", "bf16", "fp32"] = "fp16"


class ExtractLoraResponse(BaseModel):
    info: str
    path: str
    layers: int
    text_encoder: bool
    size_mb: float


class MergeLoraRequest(BaseModel):
    """kohya's `merge_lora.py`: the loaded model with `loras` (`<lora:name:0.8>` tags, as in a prompt) applied,
    saved as the checkpoint `name`."""

    model_config = ConfigDict(extra="forbid")

    loras: str = name_field()
    name: str = name_field()
    save_precision: Literal["fp16", "bf16", "fp32"] = "fp16"
    # "checkpoint": a new checkpoint (kohya's merge_lora.py); "lora": one new LoRA (kohya's svd_merge_lora.py) at
    # `rank` (`conv_dim` for 3x3 convolutions, 0 = the rank; `sv_fro`, `clamp_quantile` as for extract/lora)
    into: Literal["checkpoint", "lora"] = "checkpoint"
    rank: int = bounded(32, 1, MAX_LORA_RANK)
    conv_dim: int = bounded(0, 0, MAX_LORA_RANK)
    sv_fro: float = bounded(0.0, 0, 1)
    clamp_quantile: float = bounded(0.99, maximum=1, exclusive_minimum=0)


class MergeLoraResponse(BaseModel):
    info: str
    path: str
    title: str  # a new checkpoint's title, for `sd_model_checkpoint`; "" for a LoRA
    changed: int  # tensors of the checkpoint changed, or layers of the LoRA written


class MergeCheckpointRequest(BaseModel):
    """A1111's Checkpoint Merger (its `run_modelmerger` arguments): `primary_model_name` (A) with
    `secondary_model_name` (B) and, for "Add difference", `tertiary_model_name` (C), by title or name."""

    model_config = ConfigDict(extra="forbid")

    primary_model_name: str = name_field()
    secondary_model_name: str = ""
    tertiary_model_name: str = ""
    interp_method: Literal["No interpolation", "Weighted sum", "Add difference"] = "Weighted sum"
    multiplier: float = bounded(0.3, 0, 1)  # M: (1 - M) A + M B, or A + M (B - C)
    save_precision: Literal["fp16", "bf16", "fp32"] = "fp16"
    custom_name: str = ""  # empty: A1111's name, e.g. "0.7(a) + 0.3(b)"
    checkpoint_format: Literal["safetensors"] = "safetensors"  # never a pickle
    bake_in_vae: str = "None"  # a file in models/VAE
    discard_weights: str = ""  # a regular expression; matching weights are left out
    save_metadata: bool = True
    add_merge_recipe: bool = True
    copy_metadata_fields: bool = True
    metadata_json: str = ""


class MergeCheckpointResponse(BaseModel):
    info: str
    path: str
    title: str  # for `sd_model_checkpoint`
    merged: int  # tensors combined from the models
    kept: int  # tensors taken from A as they are
    discarded: int


class Txt2ImgResponse(BaseModel):
    images: list[str] | None
    parameters: dict[str, Any]
    info: str


class ProgressState(BaseModel):
    skipped: bool = False
    interrupted: bool = False
    stopping_generation: bool = False
    job: str = ""
    job_count: int = 0
    job_timestamp: str = "0"
    job_no: int = 0
    sampling_step: int = 0
    sampling_steps: int = 0


class ProgressResponse(BaseModel):
    progress: float
    eta_relative: float
    state: ProgressState
    current_image: str | None = None
    textinfo: str | None = None


class ErrorResponse(BaseModel):
    """Every 4xx answer of ours: `detail` says what was wrong and what to do (for a number, the allowed range);
    `field` names the request field at fault where there is one; `error` names the kind; the create/train routes
    add A1111's `info` ("create embedding error: ...") that its clients read."""

    detail: str
    error: str | None = None
    info: str | None = None
    field: str | None = None  # the request field at fault, where one is


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "Bad input: the message names the field and what it accepts"},
    404: {"model": ErrorResponse, "description": "A named model, embedding, hypernetwork, VAE or file is not there"},
    409: {"model": ErrorResponse, "description": "Busy: a training run holds the model"},
    503: {
        "model": ErrorResponse,
        "description": "The job queue is full (--queue-limit) or the server is stopping; see the Retry-After header",
    },
    507: {
        "model": ErrorResponse,
        "description": "Out of memory: the request needs more memory than the device has free; the message says what "
        "ran out and what to make smaller",
    },
}
