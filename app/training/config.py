"""The settings of one training run, with A1111's field names and defaults (UI and API share them)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

LATENT_SAMPLING = ("once", "deterministic", "random")
CLIP_GRAD_MODES = ("disabled", "value", "norm")
# Parameter groups that may have a learning-rate schedule of their own (empty: the main one), with their labels
OWN_RATES = (("text_encoder_lr", "Text encoder learning rate"), ("embedding_lr", "Embedding learning rate"))


@dataclass
class TrainConfig:
    name: str = ""  # the embedding or hypernetwork being trained
    learn_rate: str = "0.005"
    text_encoder_lr: str = ""  # ours (kohya's name), LoRAs: the text encoder layers' rate; "" = learn_rate
    # ours, LoRAs with a bundled embedding (pivotal tuning): the embedding's rate; "" = learn_rate
    embedding_lr: str = ""
    lr_scheduler: str = "constant"  # ours (kohya's names): shapes the rate over the run, lr_schedule.rate_factor
    lr_warmup_steps: int = 0
    lr_scheduler_num_cycles: int = 1  # cosine_with_restarts
    optimizer_type: str = "AdamW"  # ours (kohya's names): AdamW, Prodigy, Lion, Adafactor (optimizers.py)
    optimizer_args: str = ""  # kohya's "key=value" pairs, e.g. "d_coef=2 safeguard_warmup=True"
    batch_size: int = 1
    gradient_step: int = 1
    data_root: str = ""
    # ours (kohya's names): regularization images (prior preservation), LoRAs and hypernetworks; "" = none
    reg_data_dir: str = ""
    prior_loss_weight: float = 1.0  # the loss weight of a regularization sample (a training sample's is 1)
    log_directory: str = "log"
    template_filename: str = "style_filewords.txt"
    training_width: int = 512
    training_height: int = 512
    varsize: bool = False
    enable_bucket: bool = False  # ours (kohya's name): aspect-ratio buckets, see buckets.py
    min_snr_gamma: float = 0.0  # ours (kohya's name): Min-SNR loss weighting, 0 = off (5 is the usual value)
    noise_offset: float = 0.0  # ours (kohya's name): per-channel noise offset, 0 = off (0.05-0.1 usual)
    # ours (kohya's names): multi-resolution (pyramid) noise, 0 levels = off (6-10 usual), each level weighted
    # discount^i; input perturbation of the noise the UNet sees (Ning et al. 2023), 0 = off (0.1 usual)
    multires_noise_iterations: int = 0
    multires_noise_discount: float = 0.3
    ip_noise_gamma: float = 0.0
    # ours (kohya's names, losses.py): the loss (l2, l1, huber, smooth_l1) and the Huber threshold's schedule, c and
    # scale; debiased estimation weights; the timesteps drawn, [min_timestep, max_timestep)
    loss_type: str = "l2"
    huber_schedule: str = "snr"
    huber_c: float = 0.1
    huber_scale: float = 1.0
    debiased_estimation_loss: bool = False
    min_timestep: int = 0
    max_timestep: int = 1000
    # ours (kohya's names, validation.py): the share of training images held out for a validation loss (0 = off),
    # the seed that picks them and their noise (None: the run's), every N steps (0: at each epoch's end)
    validation_split: float = 0.0
    validation_seed: int | None = None
    validate_every_n_steps: int = 0
    # LoRAs: "fp16", "bf16" or "fp32" for the file; "" = fp16 for a new LoRA, the file's own for a continued one
    save_precision: str = ""
    steps: int = 100000
    clip_grad_mode: str = "disabled"
    clip_grad_value: str = "0.1"
    shuffle_tags: bool = False
    tag_drop_out: float = 0.0
    keep_tokens: int = 0  # ours (kohya's name): the first N tags stay first, never shuffled or dropped
    caption_dropout_rate: float = 0.0  # ours (kohya's name): the share of samples trained with an empty prompt
    latent_sampling_method: str = "once"
    use_weight: bool = False
    # auto / on / off (True/False: on/off). On recomputes activations: ~half the memory, ~1.3x the time; auto is
    # off until a step runs out of memory, where that is an error the run sees (precision.Checkpointing)
    gradient_checkpointing: bool | str = "auto"
    create_image_every: int = 500
    save_every: int = 500  # save_embedding_every / save_hypernetwork_every
    save_image_with_stored_embedding: bool = True
    preview_from_txt2img: bool = False
    preview_prompt: str = ""
    preview_negative_prompt: str = ""
    preview_steps: int = 20
    preview_sampler_name: str = "Euler a"
    preview_cfg_scale: float = 7.0
    preview_seed: int = -1
    preview_width: int = 512
    preview_height: int = 512
    # kohya's sample prompts: one preview per line at each preview step (sample_prompts.py); "" = the one preview
    sample_prompts: str = ""
    seed: int | None = None  # data order, noise and timesteps; None = keep the run's stored seed (or 0)
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class LoraNetwork:
    """What a new LoRA is made of, in kohya's terms (a continued file keeps its own kind, layers, ranks and alphas;
    the regularization applies to any run). The service checks every value."""

    rank: int = 8  # network_dim
    alpha: float = 8.0
    train_text_encoder: bool = False  # the text encoder's attention projections too (the UNet's always)
    conv_dim: int = 0  # LoCon: the UNet's 3x3 ResNet convolutions too, at this rank; 0 = off
    conv_alpha: float = 1.0
    network_type: str = "lora"  # "lora", or LyCORIS's "loha" / "lokr"
    lokr_factor: int = -1  # LyCORIS's LoKr `factor`; -1: the most square split
    dora_wd: bool = False  # LyCORIS's DoRA: a trained magnitude per input column of each layer
    # kohya's regularization of the network: max-norm (0 = off), and its three dropouts (0 = off)
    scale_weight_norms: float = 0.0
    network_dropout: float = 0.0
    rank_dropout: float = 0.0
    module_dropout: float = 0.0


@dataclass(frozen=True)
class PivotalEmbedding:
    """Pivotal tuning: a new embedding trained beside a LoRA's layers and saved in its file ("" = none); a continued
    file trains the one it bundles."""

    name: str = ""
    vectors: int = 1
    init_text: str = "*"
