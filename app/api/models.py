"""Pydantic models for A1111's `/sdapi/v1` payloads. Unknown fields are accepted (A1111 clients send many)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class Txt2ImgRequest(BaseModel):
    """A1111's StableDiffusionProcessingTxt2Img API model, with its defaults."""

    model_config = ConfigDict(extra="allow")

    prompt: str = ""
    negative_prompt: str = ""
    styles: list[str] | None = None
    seed: int = -1
    subseed: int = -1
    subseed_strength: float = 0
    seed_resize_from_h: int = -1
    seed_resize_from_w: int = -1
    sampler_name: str | None = None
    sampler_index: str | None = "Euler"
    scheduler: str | None = None
    batch_size: int = 1
    n_iter: int = 1
    steps: int = 50
    cfg_scale: float = 7.0
    width: int = 512
    height: int = 512
    restore_faces: bool | None = None
    tiling: bool | None = None
    do_not_save_samples: bool = False
    do_not_save_grid: bool = False
    eta: float | None = None
    denoising_strength: float | None = None
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
    hr_scale: float = 2.0
    hr_upscaler: str | None = None
    hr_second_pass_steps: int = 0
    hr_resize_x: int = 0
    hr_resize_y: int = 0
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

    name: str
    num_vectors_per_token: int = 1
    overwrite_old: bool = False
    init_text: str = "*"


class TrainRequest(BaseModel):
    """A1111's train payload (A1111 requires every field; we default the missing ones)."""

    model_config = ConfigDict(extra="allow")

    id_task: str | None = None
    learn_rate: str | float = "0.005"
    batch_size: int = 1
    gradient_step: int = 1
    data_root: str = ""
    log_directory: str = "log"
    training_width: int = 512
    training_height: int = 512
    varsize: bool = False
    steps: int = 100000
    clip_grad_mode: str = "disabled"
    clip_grad_value: str | float = "0.1"
    shuffle_tags: bool = False
    tag_drop_out: float = 0.0
    latent_sampling_method: str = "once"
    use_weight: bool = False
    gradient_checkpointing: bool = True  # ours: less memory for ~20-30 % more time per step
    create_image_every: int = 500
    template_filename: str = "style_filewords.txt"
    preview_from_txt2img: bool = False
    preview_prompt: str = ""
    preview_negative_prompt: str = ""
    preview_steps: int = 20
    preview_sampler_name: str | None = "Euler a"
    preview_sampler_index: int | None = None
    preview_cfg_scale: float = 7.0
    preview_seed: int = -1
    preview_width: int = 512
    preview_height: int = 512


class TrainEmbeddingRequest(TrainRequest):
    embedding_name: str
    save_embedding_every: int = 500
    save_image_with_stored_embedding: bool = True


class PreprocessRequest(BaseModel):
    """A1111's (pre-1.6) preprocess payload; the caption models it offered are not available offline."""

    model_config = ConfigDict(extra="allow")

    id_task: str | None = None
    process_src: str
    process_dst: str
    process_width: int = 512
    process_height: int = 512
    preprocess_txt_action: str = "ignore"  # ignore | copy (we also accept prepend/append as copy)
    process_keep_original_size: bool = False
    process_flip: bool = False
    process_split: bool = False
    process_caption: bool = False
    process_caption_deepbooru: bool = False
    process_split_threshold: float = 0.5
    process_overlap_ratio: float = 0.2
    process_focal_crop: bool = False
    process_multicrop: bool = False


class CreateHypernetworkRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str
    enable_sizes: list[int] = Field(default_factory=lambda: [768, 320, 640, 1280])
    overwrite_old: bool = False
    layer_structure: str | list[float] | None = None
    activation_func: str | None = None
    weight_init: str | None = None
    add_layer_norm: bool = False
    use_dropout: bool = False
    dropout_structure: str | list[float] | None = None
    last_layer_dropout: bool = False


class TrainHypernetworkRequest(TrainRequest):
    hypernetwork_name: str
    learn_rate: str | float = "0.00001"
    template_filename: str = "hypernetwork.txt"
    save_hypernetwork_every: int = 500


class TrainLoraRequest(TrainRequest):
    """`train/hypernetwork`'s fields plus the LoRA's own; creates the LoRA or continues it (resume)."""

    lora_name: str
    learn_rate: str | float = "0.0001"
    template_filename: str = "hypernetwork.txt"
    save_lora_every: int = 500
    rank: int = 8
    alpha: float = 8.0
    train_text_encoder: bool = False


class PNGInfoRequest(BaseModel):
    image: str


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
    """Every 4xx answer of ours: `detail` says what was wrong and what to do. `error` names the kind; the
    create/train routes add A1111's `info` ("create embedding error: ...") that its clients read."""

    detail: str
    error: str | None = None
    info: str | None = None


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "Bad input: the message names the field and what it accepts"},
    404: {"model": ErrorResponse, "description": "A named model, embedding, hypernetwork, VAE or file is not there"},
    409: {"model": ErrorResponse, "description": "Busy: a training run holds the model"},
    503: {
        "model": ErrorResponse,
        "description": "The job queue is full (--queue-limit) or the server is stopping; see the Retry-After header",
    },
}
