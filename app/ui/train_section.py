"""The Train section shared by the Textual Inversion and Hypernetworks tabs (A1111's fields and defaults)."""

from __future__ import annotations

import html
from dataclasses import dataclass
from typing import Any

import gradio as gr

from app.errors import UserError
from app.services import Services
from app.training.config import LoraNetwork, PivotalEmbedding, TrainConfig
from app.training.losses import HUBER_SCHEDULES
from app.training.lr_schedule import LR_SCHEDULERS
from app.training.optimizers import DEFAULT_OPTIMIZER, OPTIMIZERS
from app.ui.messages import error_html
from app.ui.training_panel import TrainingPanel


@dataclass(frozen=True)
class TrainKind:
    kind: str  # "embedding" | "hypernetwork"
    prefix: str  # elem_id prefix
    learn_rate: str
    template: str
    button: str
    panel: str  # elem_id prefix of the live panel


EMBEDDING = TrainKind("embedding", "train", "0.005", "style_filewords.txt", "Train Embedding", "ti_train")
HYPERNETWORK = TrainKind("hypernetwork", "train_hn", "0.00001", "hypernetwork.txt", "Train Hypernetwork", "hn_train")
LORA = TrainKind("lora", "train_lora", "0.0001", "hypernetwork.txt", "Train LoRA", "lora_train")
# what an emptied number box means: the option off, or (prior loss weight) its default
EMPTIED_NUMBERS = {
    "min_snr_gamma": 0.0,
    "noise_offset": 0.0,
    "multires_noise_iterations": 0.0,
    "multires_noise_discount": 0.3,
    "ip_noise_gamma": 0.0,
    "caption_dropout_rate": 0.0,
    "prior_loss_weight": 1.0,
    "huber_c": 0.1,
    "huber_scale": 1.0,
    "validation_split": 0.0,
}
# not TrainConfig fields: passed to train_lora
LORA_FIELDS = (
    "network_type",
    "rank",
    "alpha",
    "conv_dim",
    "conv_alpha",
    "train_text_encoder",
    "bundle_embedding",
    "bundle_vectors",
    "bundle_init_text",
    "scale_weight_norms",
    "network_dropout",
    "rank_dropout",
    "module_dropout",
    "lokr_factor",
    "dora_wd",
)


class TrainSection:
    def __init__(self, services: Services, spec: TrainKind, txt2img: dict[str, gr.components.Component]):
        self.services, self.spec = services, spec
        with gr.Row():
            with gr.Column():
                self.fields = self._fields()
            with gr.Column():
                self.panel = TrainingPanel(services, spec.kind, spec.panel)
        f = self.fields
        self.order = [k for k in f if k not in ("name_refresh", "template_refresh", "train", "interrupt")]
        preview_inputs = [
            txt2img[k]
            for k in ("prompt", "negative_prompt", "steps", "sampler", "cfg_scale", "seed", "width", "height")
        ]
        f["train"].click(self.on_train, inputs=[f[k] for k in self.order] + preview_inputs, outputs=self.panel.message)
        f["interrupt"].click(lambda: services.jobs.interrupt(services.training.running()), queue=False)
        f["name_refresh"].click(lambda: gr.update(choices=self.names()), outputs=f["name"])
        f["template_refresh"].click(
            lambda: gr.update(choices=services.training.templates()), outputs=f["template_filename"]
        )

    def names(self) -> list[str]:
        if self.spec.kind == "embedding":
            return self.services.embeddings.names()
        if self.spec.kind == "lora":
            return self.services.loras.names()
        return self.services.hypernetworks.names()

    def _fields(self) -> dict[str, gr.components.Component]:
        spec, services = self.spec, self.services
        p = spec.prefix
        templates = services.training.templates()
        label = {"embedding": "Embedding", "hypernetwork": "Hypernetwork", "lora": "LoRA"}[spec.kind]
        f: dict[str, gr.components.Component] = {}
        with gr.Row(equal_height=True):
            f["name"] = gr.Dropdown(
                self.names(),
                label=label + (" (a new name creates it; an existing one continues it)" if spec.kind == "lora" else ""),
                elem_id=f"{p}_{spec.kind}",
                scale=4,
                allow_custom_value=spec.kind == "lora",
            )
            f["name_refresh"] = gr.Button("🔄", elem_id=f"{p}_{spec.kind}_refresh", scale=0, min_width=48)
        if spec.kind == "lora":
            with gr.Row(equal_height=True):
                f["network_type"] = gr.Radio(
                    [("LoRA", "lora"), ("LyCORIS LoHa", "loha"), ("LyCORIS LoKr", "lokr")],
                    value="lora",
                    label="Network type (a new file; an existing one continues as what it is)",
                    elem_id=f"{p}_network_type",
                    scale=3,
                )
                f["dora_wd"] = gr.Checkbox(
                    False, label="DoRA (weight-decomposed)", elem_id=f"{p}_dora_wd", scale=1, min_width=120
                )
            with gr.Row():
                f["rank"] = gr.Number(value=8, precision=0, label="Rank (network dim)", elem_id=f"{p}_rank")
                f["alpha"] = gr.Number(value=8, label="Alpha", elem_id=f"{p}_alpha")
                f["lokr_factor"] = gr.Number(
                    value=-1, precision=0, label="LoKr factor (-1: automatic)", elem_id=f"{p}_lokr_factor"
                )
            with gr.Row():
                f["conv_dim"] = gr.Number(
                    value=0,
                    precision=0,
                    label="Conv dim (LoCon: the ResNet convolutions too; 0 = off)",
                    elem_id=f"{p}_conv_dim",
                )
                f["conv_alpha"] = gr.Number(value=1, label="Conv alpha", elem_id=f"{p}_conv_alpha")
            f["train_text_encoder"] = gr.Checkbox(
                False, label="Also train the text encoder", elem_id=f"{p}_train_text_encoder"
            )
            f["text_encoder_lr"] = gr.Textbox(
                value="",
                label="Text encoder learning rate (when it is trained; empty: the learning rate below)",
                elem_id=f"{p}_text_encoder_lr",
            )
            with gr.Accordion("Bundled embedding (pivotal tuning)", open=False, elem_id=f"{p}_bundle"):
                gr.Markdown(
                    "A new word for your subject, trained together with the LoRA and saved inside its file, where "
                    "A1111 finds it too. The templates' `[name]` becomes this word; write it in prompts with "
                    "`<lora:...>`. A continued LoRA trains the one its file holds."
                )
                with gr.Row():
                    f["bundle_embedding"] = gr.Textbox(
                        value="", label="Embedding name (empty: none)", elem_id=f"{p}_bundle_embedding"
                    )
                    f["bundle_vectors"] = gr.Number(
                        value=1, precision=0, label="Vectors per token", elem_id=f"{p}_bundle_vectors"
                    )
                with gr.Row():
                    f["bundle_init_text"] = gr.Textbox(
                        value="*", label="Initialization text", elem_id=f"{p}_bundle_init_text"
                    )
                    f["embedding_lr"] = gr.Textbox(
                        value="",
                        label="Embedding learning rate (empty: the learning rate below)",
                        elem_id=f"{p}_embedding_lr",
                    )
            f["save_precision"] = gr.Dropdown(
                [("Auto: fp16, or a continued LoRA's own", ""), ("fp16", "fp16"), ("bf16", "bf16"), ("fp32", "fp32")],
                value="",
                label="Save precision (of the file; training itself keeps fp32)",
                elem_id=f"{p}_save_precision",
            )
        f["learn_rate"] = gr.Textbox(
            label=f"{label} Learning rate", value=spec.learn_rate, elem_id=f"{p}_{spec.kind}_lr"
        )
        with gr.Row():
            f["clip_grad_mode"] = gr.Dropdown(
                ["disabled", "value", "norm"],
                value="disabled",
                label="Gradient Clipping",
                elem_id=f"{p}_clip_grad_mode",
            )
            f["clip_grad_value"] = gr.Textbox(value="0.1", label="Clipping value", elem_id=f"{p}_clip_grad_value")
        with gr.Row():
            f["batch_size"] = gr.Number(value=1, precision=0, label="Batch size", elem_id=f"{p}_batch_size")
            f["gradient_step"] = gr.Number(
                value=1, precision=0, label="Gradient accumulation steps", elem_id=f"{p}_gradient_step"
            )
        f["data_root"] = gr.Textbox(
            label="Dataset directory",
            placeholder="Path to directory with input images",
            elem_id=f"{p}_dataset_directory",
        )
        if spec.kind != "embedding":  # regularization prompts never hold an embedding: they cannot change one
            with gr.Row():
                f["reg_data_dir"] = gr.Textbox(
                    label="Regularization image directory (optional: other images of the class, captioned with the "
                    "class alone, e.g. 1_dog/)",
                    placeholder="Empty: no regularization images",
                    elem_id=f"{p}_reg_data_dir",
                    scale=3,
                )
                f["prior_loss_weight"] = gr.Number(
                    value=1.0, label="Prior loss weight", elem_id=f"{p}_prior_loss_weight", scale=1
                )
        f["log_directory"] = gr.Textbox(label="Log directory", value="log", elem_id=f"{p}_log_directory")
        with gr.Row(equal_height=True):
            f["template_filename"] = gr.Dropdown(
                templates,
                value=spec.template if spec.template in templates else None,
                label="Prompt template",
                elem_id=f"{p}_template_file",
                scale=4,
            )
            f["template_refresh"] = gr.Button("🔄", elem_id=f"{p}_template_refresh", scale=0, min_width=48)
        size = services.models.get().native_size
        f["training_width"] = gr.Slider(64, 2048, value=size, step=8, label="Width", elem_id=f"{p}_width")
        f["training_height"] = gr.Slider(64, 2048, value=size, step=8, label="Height", elem_id=f"{p}_height")
        f["varsize"] = gr.Checkbox(False, label="Do not resize images", elem_id=f"{p}_varsize")
        f["enable_bucket"] = gr.Checkbox(
            False,
            label="Bucket images by aspect ratio (wide and tall images keep their shape, at any batch size)",
            elem_id=f"{p}_enable_bucket",
        )
        f["steps"] = gr.Number(value=100000, precision=0, label="Max steps", elem_id=f"{p}_steps")
        with gr.Row():
            f["create_image_every"] = gr.Number(
                value=500,
                precision=0,
                label="Save an image to log directory every N steps, 0 to disable",
                elem_id=f"{p}_create_image_every",
            )
            f["save_every"] = gr.Number(
                value=500,
                precision=0,
                label=f"Save a copy of {'LoRA' if spec.kind == 'lora' else spec.kind} to log directory every N steps, "
                "0 to disable",
                elem_id=f"{p}_save_{spec.kind}_every",
            )
        if spec.kind == "embedding":
            f["save_image_with_stored_embedding"] = gr.Checkbox(
                True, label="Save images with embedding in PNG chunks", elem_id=f"{p}_save_image_with_stored_embedding"
            )
        f["use_weight"] = gr.Checkbox(False, label="Use PNG alpha channel as loss weight", elem_id=f"{p}_use_weight")
        f["gradient_checkpointing"] = gr.Radio(
            [("Auto", "auto"), ("On", "on"), ("Off", "off")],
            value="auto",
            label="Gradient checkpointing (on: about half the memory, a third slower; auto: off on a GPU until a step "
            "runs out of memory, then on)",
            elem_id=f"{p}_gradient_checkpointing",
        )
        f["preview_from_txt2img"] = gr.Checkbox(
            False,
            label="Read parameters (prompt, etc...) from txt2img tab when making previews",
            elem_id=f"{p}_preview_from_txt2img",
        )
        f["shuffle_tags"] = gr.Checkbox(
            False, label="Shuffle tags by ',' when creating prompts.", elem_id=f"{p}_shuffle_tags"
        )
        f["tag_drop_out"] = gr.Slider(
            0, 0.99, value=0, step=0.01, label="Drop out tags when creating prompts.", elem_id=f"{p}_tag_drop_out"
        )
        f["latent_sampling_method"] = gr.Radio(
            ["once", "deterministic", "random"],
            value="once",
            label="Choose latent sampling method",
            elem_id=f"{p}_latent_sampling_method",
        )
        # kohya's options (ours): closed by default, so the form reads as A1111's; each is off until set
        with gr.Accordion(
            "Advanced: LR scheduler, optimizer, caption and loss options (kohya's)"
            + (", max-norm and dropouts" if spec.kind == "lora" else ""),
            open=False,
            elem_id=f"{p}_advanced",
        ):
            with gr.Row():
                f["lr_scheduler"] = gr.Dropdown(
                    list(LR_SCHEDULERS),
                    value="constant",
                    label="LR scheduler (shapes the learning rate over the run)",
                    elem_id=f"{p}_lr_scheduler",
                )
                f["lr_warmup_steps"] = gr.Number(value=0, precision=0, label="Warmup steps", elem_id=f"{p}_lr_warmup")
                f["lr_scheduler_num_cycles"] = gr.Number(
                    value=1, precision=0, label="Cycles (cosine with restarts)", elem_id=f"{p}_lr_cycles"
                )
            with gr.Row():
                f["optimizer_type"] = gr.Dropdown(
                    list(OPTIMIZERS),
                    value=DEFAULT_OPTIMIZER,
                    label="Optimizer (Prodigy: learning rate 1; Lion: 3-10x lower than AdamW's)",
                    elem_id=f"{p}_optimizer_type",
                    scale=1,
                )
                f["optimizer_args"] = gr.Textbox(
                    value="",
                    label="Optimizer arguments (key=value, e.g. d_coef=2 safeguard_warmup=True)",
                    elem_id=f"{p}_optimizer_args",
                    scale=2,
                )
            f["keep_tokens"] = gr.Number(
                value=0,
                precision=0,
                label="Keep the first N tags in place (never shuffled or dropped by the tag options above; e.g. a "
                "trigger word)",
                elem_id=f"{p}_keep_tokens",
            )
            f["caption_dropout_rate"] = gr.Slider(
                0,
                0.99,
                value=0,
                step=0.01,
                label="Caption dropout: the share of samples trained with an empty prompt",
                elem_id=f"{p}_caption_dropout_rate",
            )
            with gr.Row():
                f["min_snr_gamma"] = gr.Number(
                    value=0,
                    label="Min-SNR gamma (0 = off; 5 is usual): easy low-noise steps count less",
                    elem_id=f"{p}_min_snr_gamma",
                )
                f["noise_offset"] = gr.Number(
                    value=0,
                    label="Noise offset (0 = off; 0.05-0.1 lets it learn darker and brighter images)",
                    elem_id=f"{p}_noise_offset",
                )
            with gr.Row():
                f["multires_noise_iterations"] = gr.Number(
                    value=0,
                    precision=0,
                    label="Multires noise iterations (0 = off; 6-10 usual): noise at coarser scales too",
                    elem_id=f"{p}_multires_noise_iterations",
                )
                f["multires_noise_discount"] = gr.Number(
                    value=0.3, label="Multires noise discount (0.3 usual)", elem_id=f"{p}_multires_noise_discount"
                )
                f["ip_noise_gamma"] = gr.Number(
                    value=0,
                    label="Input perturbation noise, ip_noise_gamma (0 = off; 0.1 usual)",
                    elem_id=f"{p}_ip_noise_gamma",
                )
            with gr.Row():
                f["loss_type"] = gr.Dropdown(
                    [("L2 (MSE)", "l2"), ("L1", "l1"), ("Huber", "huber"), ("Smooth L1", "smooth_l1")],
                    value="l2",
                    label="Loss (Huber, smooth L1: outliers in the data pull less)",
                    elem_id=f"{p}_loss_type",
                )
                f["huber_schedule"] = gr.Dropdown(
                    list(HUBER_SCHEDULES), value="snr", label="Huber schedule", elem_id=f"{p}_huber_schedule"
                )
            with gr.Row():
                f["huber_c"] = gr.Number(value=0.1, label="Huber c (0.1 usual)", elem_id=f"{p}_huber_c")
                f["huber_scale"] = gr.Number(value=1, label="Huber scale", elem_id=f"{p}_huber_scale")
            f["debiased_estimation_loss"] = gr.Checkbox(
                False,
                label="Debiased estimation loss (nearly clean timesteps count far less)",
                elem_id=f"{p}_debiased_estimation_loss",
            )
            f["sample_prompts"] = gr.Textbox(
                "",
                lines=2,
                label="Sample prompts (kohya's): one preview per line at each preview step, e.g. 'a photo of sks dog "
                "--n blurry --w 512 --h 768 --d 42 --l 7 --s 28 --ss euler_a'; empty: the usual one preview",
                elem_id=f"{p}_sample_prompts",
            )
            with gr.Row():
                f["validation_split"] = gr.Number(
                    value=0,
                    label="Validation split: the share of images held out for a validation loss (0 = off; 0.1-0.2)",
                    elem_id=f"{p}_validation_split",
                )
                f["validate_every_n_steps"] = gr.Number(
                    value=0, precision=0, label="Validate every N steps (0: each epoch)", elem_id=f"{p}_validate_every"
                )
                f["validation_seed"] = gr.Number(
                    value=None, precision=0, label="Validation seed (empty: the run's)", elem_id=f"{p}_validation_seed"
                )
            with gr.Row():
                f["min_timestep"] = gr.Number(
                    value=0, precision=0, label="Min timestep (0-999)", elem_id=f"{p}_min_timestep"
                )
                f["max_timestep"] = gr.Number(
                    value=1000, precision=0, label="Max timestep (1-1000, not trained)", elem_id=f"{p}_max_timestep"
                )
            if spec.kind == "lora":  # kohya's regularization of the network itself
                with gr.Row():
                    f["scale_weight_norms"] = gr.Number(
                        value=0,
                        label="Scale weight norms (max-norm: each layer's change kept at most this; 0 = off, 1 usual)",
                        elem_id=f"{p}_scale_weight_norms",
                    )
                    f["network_dropout"] = gr.Number(
                        value=0, label="Network dropout (LoRA only; 0.1 usual)", elem_id=f"{p}_network_dropout"
                    )
                    f["rank_dropout"] = gr.Number(value=0, label="Rank dropout", elem_id=f"{p}_rank_dropout")
                    f["module_dropout"] = gr.Number(value=0, label="Module dropout", elem_id=f"{p}_module_dropout")
        with gr.Row():
            f["interrupt"] = gr.Button("Interrupt", elem_id=f"{p}_interrupt_training")
            f["train"] = gr.Button(spec.button, variant="primary", elem_id=f"{p}_train_{spec.kind}")
        return f

    def config(self, values: tuple[Any, ...]) -> TrainConfig:
        given = dict(zip(self.order, values[: len(self.order)], strict=True))
        prompt, negative, steps, sampler, cfg_scale, seed, width, height = values[len(self.order) :]
        numbers = (
            "batch_size",
            "gradient_step",
            "training_width",
            "training_height",
            "steps",
            "create_image_every",
            "save_every",
            "keep_tokens",
            "lr_warmup_steps",
            "lr_scheduler_num_cycles",
            "min_timestep",
            "max_timestep",
            "validate_every_n_steps",
        )
        for key in numbers:
            if key in given and given[key] is None:  # an emptied number box: say which, not int(None)'s TypeError
                raise UserError(f"'{self.fields[key].label}' is empty: enter a whole number.", key)
        fields = {k: (int(v) if k in numbers else v) for k, v in given.items() if k not in LORA_FIELDS}
        if fields.get("validation_seed") is not None:  # empty: the run's seed
            fields["validation_seed"] = int(fields["validation_seed"])
        for key in ("name", "template_filename", "optimizer_args", "reg_data_dir", "embedding_lr", "sample_prompts"):
            if key in fields:
                fields[key] = fields[key] or ""
        fields["tag_drop_out"] = float(fields["tag_drop_out"])
        for key, default in EMPTIED_NUMBERS.items():  # an emptied box means off, or the default
            if key in fields:
                fields[key] = default if fields[key] is None else float(fields[key])
        return TrainConfig(
            **fields,
            preview_prompt=prompt or "",
            preview_negative_prompt=negative or "",
            preview_steps=int(steps),
            preview_sampler_name=sampler,
            preview_cfg_scale=float(cfg_scale),
            preview_seed=int(seed if seed is not None else -1),
            preview_width=int(width),
            preview_height=int(height),
        )

    def on_train(self, *values) -> str:
        try:
            cfg = self.config(values)
            if self.spec.kind == "embedding":
                self.services.training.train_embedding(cfg)
            elif self.spec.kind == "lora":
                given = dict(zip(self.order, values[: len(self.order)], strict=True))
                rank, alpha = given["rank"], given["alpha"]
                if rank is None or alpha is None:
                    raise UserError("Enter a rank (e.g. 8) and an alpha (e.g. 8).")
                conv_dim, conv_alpha = given["conv_dim"] or 0, given["conv_alpha"]  # an emptied conv dim: off
                network = LoraNetwork(
                    rank=int(rank),
                    alpha=float(alpha),
                    train_text_encoder=bool(given["train_text_encoder"]),
                    conv_dim=int(conv_dim),
                    conv_alpha=1.0 if conv_alpha is None else float(conv_alpha),
                    network_type=given["network_type"] or "lora",
                    lokr_factor=-1 if given["lokr_factor"] is None else int(given["lokr_factor"]),
                    dora_wd=bool(given["dora_wd"]),
                    scale_weight_norms=given["scale_weight_norms"] or 0.0,  # emptied: off
                    network_dropout=given["network_dropout"] or 0.0,
                    rank_dropout=given["rank_dropout"] or 0.0,
                    module_dropout=given["module_dropout"] or 0.0,
                )
                pivotal = PivotalEmbedding(
                    name=given["bundle_embedding"] or "",
                    vectors=1 if given["bundle_vectors"] is None else int(given["bundle_vectors"]),
                    init_text=given["bundle_init_text"] or "",
                )
                self.services.training.train_lora(cfg, network, pivotal)
            else:
                self.services.training.train_hypernetwork(cfg)
        except (UserError, ValueError, TypeError) as e:
            return error_html(e, "train_error")
        return f"<p id='train_started'>Training {self.spec.kind} '{html.escape(cfg.name)}' started.</p>"
