"""Training as the UI and the API ask for it: validate everything first, then run on the job thread."""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from app.embeddings.database import EmbeddingDatabase
from app.embeddings.service import MAX_VECTORS, model_initial_vectors
from app.errors import UserError
from app.folders import FolderPolicy
from app.generation.txt2img import MAX_SIZE, MIN_SIZE, Txt2ImgParams, Txt2ImgService
from app.hypernetworks.attention import HypernetworkStack
from app.hypernetworks.hypernetwork import HypernetworkFormatError
from app.hypernetworks.service import HypernetworkService
from app.jobs import Job, JobRunner
from app.lora.files import LoraFile, LoraFormatError, bind, bundled_embeddings
from app.lora.layers import DoraLayer
from app.lora.service import LoraService, model_label
from app.lora.writer import SAVE_DTYPES, model_version
from app.models.manager import LoadedModel, ModelManager
from app.models.out_of_memory import allocation_can_fail, guarded, smaller_advice
from app.naming import clean_name
from app.options import Options
from app.settings import Settings
from app.training.config import (
    CLIP_GRAD_MODES,
    LATENT_SAMPLING,
    OWN_RATES,
    LoraNetwork,
    PivotalEmbedding,
    TrainConfig,
)
from app.training.dataset import TrainingImage, epoch_items, load_dataset
from app.training.loop import TrainResult, checkpointing_note, train
from app.training.lora_target import NETWORK_TYPES, LoraTarget, NetworkDropout, network_type_of
from app.training.losses import HUBER_SCHEDULES, LOSS_TYPES
from app.training.lr_schedule import LearnRateSchedule, rate_factor
from app.training.optimizers import check_optimizer, describe, optimizer_name
from app.training.precision import checkpointing_mode
from app.training.sample_prompts import parse_sample_prompts
from app.training.targets import (
    EmbeddingTarget,
    HypernetworkTarget,
    TrainedVectors,
    TrainingTarget,
    check_trainable,
)
from app.training.templates import list_templates, read_template
from app.training.validation import MAX_VALIDATION_SEED, hold_out

log = logging.getLogger(__name__)

LOWVRAM_REASON = "Training models with lowvram not possible"
MAX_LORA_RANK = 1024
MAX_LORA_ALPHA = 100_000.0
MAX_WEIGHT_NORM = 1000.0  # scale_weight_norms: kohya suggests 1; a larger bound only catches typos


@dataclass
class PreparedRun:
    cfg: TrainConfig
    images: list[TrainingImage]
    problems: list[str]
    templates: list[str]
    log_dir: Path


class TrainingService:
    def __init__(
        self,
        settings: Settings,
        models: ModelManager,
        options: Options,
        jobs: JobRunner,
        embeddings: EmbeddingDatabase,
        txt2img: Txt2ImgService,
        hypernetworks: HypernetworkService | None = None,
        stack: HypernetworkStack | None = None,
        loras: LoraService | None = None,
        folders: FolderPolicy | None = None,
    ):
        self.settings = settings
        self.models = models
        self.options = options
        self.jobs = jobs
        self.embeddings = embeddings
        self.txt2img = txt2img
        self.hypernetworks = hypernetworks
        self.stack = stack or HypernetworkStack()
        self.loras = loras
        self.folders = folders or FolderPolicy.from_settings(settings)

    def templates(self) -> list[str]:
        return list_templates(self.settings.templates_dir)

    def running(self) -> Job | None:
        job = self.jobs.last
        return job if job is not None and job.kind.startswith("train") else None

    # -- validation ------------------------------------------------------------------------------------------------
    def prepare(self, cfg: TrainConfig, require_name: bool) -> PreparedRun:
        """Check every input and load the dataset; any problem is a UserError before anything starts."""
        if self.settings.lowvram:
            raise UserError(f"{LOWVRAM_REASON}: start without --lowvram to train (--medvram works).")
        for label, value, field in (
            ("Width", cfg.training_width, "training_width"),
            ("Height", cfg.training_height, "training_height"),
        ):
            if not MIN_SIZE <= int(value) <= MAX_SIZE or int(value) % 8:
                raise UserError(
                    f"{label} must be a multiple of 8 between {MIN_SIZE} and {MAX_SIZE}, got {value}.", field
                )
        for label, value, field in (
            ("Batch size", cfg.batch_size, "batch_size"),
            ("Gradient accumulation steps", cfg.gradient_step, "gradient_step"),
        ):
            if int(value) < 1:
                raise UserError(f"{label} must be at least 1, got {value}.", field)
        if cfg.varsize and cfg.enable_bucket:
            raise UserError(
                "Choose one of 'Do not resize images' and 'Bucket images by aspect ratio': one keeps each image's "
                "own size, the other resizes it to the bucket nearest its shape.",
                "enable_bucket",
            )
        if cfg.varsize and int(cfg.batch_size) > 1:
            raise UserError(
                "'Do not resize images' needs batch size 1: images of different sizes cannot share a batch. "
                "'Bucket images by aspect ratio' trains wide and tall images at larger batch sizes.",
                "batch_size",
            )
        if int(cfg.steps) < 1:
            raise UserError(f"Max steps must be at least 1, got {cfg.steps}.", "steps")
        if cfg.latent_sampling_method not in LATENT_SAMPLING:
            raise UserError(
                f"Latent sampling method must be one of {', '.join(LATENT_SAMPLING)}.", "latent_sampling_method"
            )
        checkpointing_mode(cfg.gradient_checkpointing)
        if cfg.clip_grad_mode not in CLIP_GRAD_MODES:
            raise UserError(f"Gradient clipping must be one of {', '.join(CLIP_GRAD_MODES)}.", "clip_grad_mode")
        for label, value, field in (
            ("Drop out tags", cfg.tag_drop_out, "tag_drop_out"),
            ("Caption dropout", cfg.caption_dropout_rate, "caption_dropout_rate"),
            ("Validation split", cfg.validation_split, "validation_split"),
        ):
            if not 0 <= float(value) < 1:
                raise UserError(f"{label} must be between 0 and 1 (exclusive), got {value}.", field)
        for label, value, field, top in (
            ("Min-SNR gamma", cfg.min_snr_gamma, "min_snr_gamma", 100.0),
            ("Noise offset", cfg.noise_offset, "noise_offset", 1.0),
            ("Input perturbation noise (ip_noise_gamma)", cfg.ip_noise_gamma, "ip_noise_gamma", 1.0),
        ):
            if not 0 <= float(value) <= top:  # NaN fails this too
                raise UserError(f"{label} must be between 0 (off) and {top:g}, got {value}.", field)
        if not 0 <= int(cfg.multires_noise_iterations) <= 20:
            raise UserError(
                f"Multires noise iterations must be between 0 (off) and 20 (6-10 usual), got "
                f"{cfg.multires_noise_iterations}.",
                "multires_noise_iterations",
            )
        if not 0 < float(cfg.multires_noise_discount) <= 1:  # NaN fails this too
            raise UserError(
                "Multires noise discount must be above 0 and at most 1 (0.3 usual), got "
                f"{cfg.multires_noise_discount}.",
                "multires_noise_discount",
            )
        _check_loss(cfg)
        if not 0 < float(cfg.prior_loss_weight) <= 100:  # NaN fails this too
            raise UserError(
                f"Prior loss weight must be above 0 and at most 100 (1 is usual), got {cfg.prior_loss_weight}.",
                "prior_loss_weight",
            )
        for name, value, field in (
            ("save every", cfg.save_every, "save_every"),
            ("image every", cfg.create_image_every, "create_image_every"),
        ):
            if int(value) < 0:
                raise UserError(f"The {name} step count must be 0 (off) or more, got {value}.", field)
        LearnRateSchedule(cfg.learn_rate, cfg.steps)
        rate_factor(cfg.lr_scheduler, 0, 1)  # a name it does not know is refused here
        cfg.optimizer_type = optimizer_name(cfg.optimizer_type)
        check_optimizer(cfg.optimizer_type, cfg.optimizer_args)  # a bad argument is refused now, not at step 1
        for key, label in OWN_RATES:
            if str(getattr(cfg, key)).strip():
                LearnRateSchedule(getattr(cfg, key), cfg.steps, label)
        for label, value, field, low, top in (
            ("Keep tokens", cfg.keep_tokens, "keep_tokens", 0, 1000),
            ("Warmup steps", cfg.lr_warmup_steps, "lr_warmup_steps", 0, 10_000_000),
            ("Cycles", cfg.lr_scheduler_num_cycles, "lr_scheduler_num_cycles", 1, 1000),
            ("Validate every N steps", cfg.validate_every_n_steps, "validate_every_n_steps", 0, 10_000_000),
        ):
            if not low <= int(value) <= top:
                raise UserError(f"{label} must be between {low} and {top}, got {value}.", field)
        if cfg.validation_seed is not None and not 0 <= int(cfg.validation_seed) <= MAX_VALIDATION_SEED:
            raise UserError(
                f"Validation seed must be between 0 and {MAX_VALIDATION_SEED} (or empty: the run's seed), got "
                f"{cfg.validation_seed}.",
                "validation_seed",
            )
        if cfg.clip_grad_mode != "disabled":
            LearnRateSchedule(cfg.clip_grad_value, cfg.steps, "Gradient clipping value")
        if cfg.preview_from_txt2img:
            # Checked now, not at the first preview: a 100000 px preview must not start (or end) a run.
            try:
                self.txt2img.validate(preview_params(cfg, ""))
            except UserError as e:
                raise UserError(f"Preview settings (txt2img values): {e}", e.field and f"preview_{e.field}") from None
        for number, sample in enumerate(parse_sample_prompts(cfg.sample_prompts), 1):
            try:  # each line's size, steps and scale as txt2img takes them, before anything starts
                self.txt2img.validate(sample.params(preview_params(cfg, sample.prompt)))
            except UserError as e:
                raise UserError(f"Sample prompt {number}: {e}", "sample_prompts") from None
        templates = read_template(self.settings.templates_dir, cfg.template_filename, require_name)
        seed = cfg.seed if cfg.seed is not None else 0
        if cfg.data_root:
            self.folders.check(cfg.data_root, "Dataset directory")
        base = Path(cfg.log_directory or "log")
        base = self.folders.check(base if base.is_absolute() else self.settings.data_dir / base, "Log directory")
        width, height = int(cfg.training_width), int(cfg.training_height)
        images, problems = guarded(
            torch.device("cpu"),  # the images are decoded and resized in system memory
            lambda: load_dataset(
                cfg.data_root, width, height, templates, seed, bool(cfg.varsize), bool(cfg.enable_bucket)
            ),
            f"loading the training images at {width}×{height}",
            "Nothing was changed. Try a smaller training size, or fewer or smaller images.",
        )
        if cfg.validation_split:
            if sum(not im.is_reg for im in images) < 2:
                raise UserError(
                    "A validation loss needs at least 2 training images: one or more are held out, the rest train. "
                    "Add images, or set the validation split to 0.",
                    "validation_split",
                )
            held_seed = int(cfg.validation_seed) if cfg.validation_seed is not None else seed
            images = hold_out(images, float(cfg.validation_split), held_seed)
        if str(cfg.reg_data_dir or "").strip():
            reg_root = self.folders.check(cfg.reg_data_dir, "Regularization image directory")
            if cfg.data_root and reg_root == Path(cfg.data_root).resolve():
                raise UserError(
                    "The regularization image directory is the dataset directory. Regularization images are other "
                    "images of the same class (e.g. other dogs for your dog), each captioned with the class alone.",
                    "reg_data_dir",
                )
            reg_images, reg_problems = guarded(
                torch.device("cpu"),
                lambda: load_dataset(
                    cfg.reg_data_dir, width, height, [], seed, bool(cfg.varsize), bool(cfg.enable_bucket), True
                ),
                f"loading the regularization images at {width}×{height}",
                "Nothing was changed. Try a smaller training size, or fewer or smaller regularization images.",
            )
            images = images + reg_images
            problems = problems + [f"regularization image {p}" for p in reg_problems]
        log_dir = base / dt.date.today().isoformat() / cfg.name
        return PreparedRun(cfg, images, problems, templates, log_dir)

    # -- embeddings ------------------------------------------------------------------------------------------------
    def train_embedding(self, cfg: TrainConfig) -> Job:
        """Validate, then queue the run; the job's result is a TrainResult."""
        self.embeddings.refresh_if_changed()
        embedding = self.embeddings.get(cfg.name)
        if embedding is None:
            skipped = self.embeddings.skipped.get(cfg.name)
            why = f" It was skipped: {skipped.reason}." if skipped else " Create it first (Create embedding)."
            raise UserError(f"Embedding '{cfg.name}' is not loaded.{why}")
        check_trainable(embedding)
        if str(cfg.reg_data_dir or "").strip():
            raise UserError(
                "Regularization images cannot change an embedding: their prompts are their class captions, which "
                "do not contain the embedding. Leave the regularization folder empty (it is for LoRAs and "
                "hypernetworks).",
                "reg_data_dir",
            )
        run = self.prepare(cfg, require_name=True)
        if (embedding.step or 0) >= LearnRateSchedule(cfg.learn_rate, cfg.steps).end_step:
            raise UserError(
                f"Embedding '{cfg.name}' is already at step {embedding.step}; raise max steps above "
                "that to train further."
            )

        def run_job(job: Job) -> TrainResult:
            with self.models.lock:
                model = self.models.get()
                target = EmbeddingTarget(embedding, model, self.embeddings)
                try:
                    with self.models.placed_for_training(model):
                        return self._run(target, model, run, job)
                finally:
                    self.embeddings.refresh()

        return self._submit("train embedding", run_job, cfg.name)

    # -- hypernetworks -----------------------------------------------------------------------------------------------
    def train_hypernetwork(self, cfg: TrainConfig) -> Job:
        """Validate, then queue the run; the job's result is a TrainResult."""
        entry = self.hypernetworks.db.files().get(cfg.name) if self.hypernetworks else None
        if entry is None:
            raise UserError(
                f"Hypernetwork '{cfg.name}' not found in {self.settings.hypernetwork_dir}. Create it "
                "first (Create hypernetwork)."
            )
        try:
            step = self.hypernetworks.db.load_path(entry.path).step
        except HypernetworkFormatError as e:
            raise UserError(str(e)) from None
        run = self.prepare(cfg, require_name=False)
        if (step or 0) >= LearnRateSchedule(cfg.learn_rate, cfg.steps).end_step:
            raise UserError(
                f"Hypernetwork '{cfg.name}' is already at step {step}; raise max steps above that to train further."
            )

        def run_job(job: Job) -> TrainResult:
            with self.models.lock:
                model = self.models.get()
                target = HypernetworkTarget(entry.path, model, self.stack)
                try:
                    with self.models.placed_for_training(model):
                        return self._run(target, model, run, job)
                finally:
                    self.hypernetworks.db.forget(entry.path)

        return self._submit("train hypernetwork", run_job, cfg.name)

    # -- LoRAs -----------------------------------------------------------------------------------------------------
    def train_lora(
        self, cfg: TrainConfig, network: LoraNetwork = LoraNetwork(), pivotal: PivotalEmbedding = PivotalEmbedding()
    ) -> Job:
        """Create `models/Lora/<name>.safetensors` on the first save, made as `network` says, or continue it (its own
        kind, layers, ranks, alphas, LoKr factor and DoRA; `network`'s regularization applies either way). With
        `pivotal.name`, a new embedding of that name (`pivotal.vectors` vectors from `pivotal.init_text`) trains
        beside the layers and is saved in the file (pivotal tuning); the templates' `[name]` is that word."""
        if self.loras is None:
            raise UserError("LoRA training is not available here.")
        name = clean_name(cfg.name or "")
        if not name:
            raise UserError(f"LoRA name '{cfg.name}' has no usable characters: use letters, digits, '.', '_', '-'.")
        cfg.name = name
        try:
            rank_value, alpha_value = int(network.rank), float(network.alpha)
        except (TypeError, ValueError):
            raise UserError(
                f"Rank must be a whole number and alpha a number; got {network.rank!r} and {network.alpha!r}."
            ) from None
        if not 1 <= rank_value <= MAX_LORA_RANK:
            raise UserError(f"Rank must be between 1 and {MAX_LORA_RANK} (4-32 is usual), got {network.rank}.", "rank")
        if not (math.isfinite(alpha_value) and 0 < alpha_value <= MAX_LORA_ALPHA):
            raise UserError(
                f"Alpha must be above 0 and at most {MAX_LORA_ALPHA} (often rank or rank/2), got {network.alpha}.",
                "alpha",
            )
        try:
            conv_dim_value, conv_alpha_value = int(network.conv_dim or 0), float(network.conv_alpha)
        except (TypeError, ValueError):
            raise UserError(
                "Conv dim must be a whole number and conv alpha a number; got "
                f"{network.conv_dim!r} and {network.conv_alpha!r}."
            ) from None
        if not 0 <= conv_dim_value <= MAX_LORA_RANK:
            raise UserError(
                f"Conv dim must be between 0 (off) and {MAX_LORA_RANK} (4-16 is usual), got {network.conv_dim}.",
                "conv_dim",
            )
        if not (math.isfinite(conv_alpha_value) and 0 < conv_alpha_value <= MAX_LORA_ALPHA):
            raise UserError(
                f"Conv alpha must be above 0 and at most {MAX_LORA_ALPHA} (1 is kohya's default), got "
                f"{network.conv_alpha}.",
                "conv_alpha",
            )
        max_norm, dropout = _regularization(
            network.scale_weight_norms, network.network_dropout, network.rank_dropout, network.module_dropout
        )
        existing_entry = self.loras.db.files().get(name)
        existing = None
        if existing_entry is not None:
            if existing_entry.path.suffix.lower() != ".safetensors":
                raise UserError(
                    f"LoRA '{name}' is {existing_entry.path.name}; training continues .safetensors files only. "
                    "Choose another name."
                )
            try:
                existing = self.loras.db.load_weights(existing_entry.path)
                model = self.models.get()
                bind(existing, self.loras.table(model), model_label(model))
            except LoraFormatError as e:
                raise UserError(f"LoRA '{name}' cannot be continued: {e}") from None
            layers = list(existing.layers.values())
            decomposed = [layer for layer in layers if isinstance(layer, DoraLayer)]
            inner = [layer.inner if isinstance(layer, DoraLayer) else layer for layer in layers]
            kinds = {layer.kind for layer in inner}
            tucker = any(
                getattr(layer, "t1", None) is not None or getattr(layer, "t2", None) is not None for layer in inner
            )
            if len(kinds) != 1 or not kinds <= set(NETWORK_TYPES) or tucker:
                held = ", ".join(sorted(kinds)) + (" (with Tucker cores)" if tucker else "")
                raise UserError(
                    f"LoRA '{name}' holds {held} layers; training continues files of one kind, LoRA, LoHa or LoKr, "
                    "without Tucker cores. Choose another name to train a new one."
                )
            if decomposed and (len(decomposed) != len(layers) or any(d.per_output for d in decomposed)):
                raise UserError(
                    f"LoRA '{name}' has DoRA magnitudes per output row"
                    + (" on some layers only" if len(decomposed) != len(layers) else "")
                    + " (LyCORIS's default); training continues DoRA files with a magnitude per input column on "
                    "every layer (the layout A1111 applies), as it makes them. Choose another name to train a new one."
                )
        bundle = self._bundle_plan(name, existing, pivotal.name, pivotal.vectors)
        if network.network_type not in NETWORK_TYPES.values():
            raise UserError(
                f"Network type must be one of {', '.join(NETWORK_TYPES.values())}, got {network.network_type!r}.",
                "network_type",
            )
        trained_kind = network_type_of(existing) if existing is not None else network.network_type
        # DoRA: a new file as asked, a continued one as it is
        dora = (
            bool(network.dora_wd)
            if existing is None
            else any(isinstance(x, DoraLayer) for x in existing.layers.values())
        )
        existing_args = _json_object(existing.metadata.get("ss_network_args", "")) if existing is not None else {}
        factor = _lokr_factor(network.lokr_factor, network.network_type if existing is None else "lokr")
        if existing is not None and trained_kind == "lokr":  # the layout the file was made with
            factor = _lokr_factor(existing_args.get("factor", -1), "lokr")
        if dropout.network and trained_kind != "lora":
            raise UserError(
                f"Network dropout is kohya's LoRA dropout; a {'LoHa' if trained_kind == 'loha' else 'LoKr'} takes "
                "rank dropout and module dropout instead.",
                "network_dropout",
            )
        if cfg.save_precision and cfg.save_precision not in SAVE_DTYPES:
            raise UserError(
                f"Save precision must be one of {', '.join(SAVE_DTYPES)} (or empty), got {cfg.save_precision!r}.",
                "save_precision",
            )
        if cfg.save_precision:
            save_dtype = SAVE_DTYPES[cfg.save_precision]
        elif existing is not None and existing.layers:  # continue in the file's own precision (its .optim fits it)
            first_layer = next(iter(existing.layers.values()))
            save_dtype = next(iter(first_layer.named_tensors().values())).dtype
            save_dtype = save_dtype if save_dtype in SAVE_DTYPES.values() else torch.float32
        else:
            save_dtype = torch.float16  # what LoRAs are shared in (kohya's GUI default): half the size of fp32
        te_rate = str(cfg.text_encoder_lr).strip()
        # a continued file trains the text encoder layers it has, whatever the request says
        trains_te = (
            network.train_text_encoder
            if existing is None
            else any(not n.startswith(("lora_unet", "unet.")) for n in existing.layers)
        )
        if (
            optimizer_name(cfg.optimizer_type) == "Prodigy"
            and trains_te
            and te_rate not in ("", "0", str(cfg.learn_rate).strip())
        ):
            raise UserError(
                "Prodigy finds one step size for all the layers it trains, so the text encoder cannot have a "
                "learning rate of its own: leave it empty (or 0 to keep those layers as they are).",
                "text_encoder_lr",
            )
        if (
            optimizer_name(cfg.optimizer_type) == "Prodigy"
            and bundle is not None
            and str(cfg.embedding_lr).strip() not in ("", "0", str(cfg.learn_rate).strip())
        ):
            raise UserError(
                "Prodigy finds one step size for everything it trains, so the bundled embedding cannot have a "
                "learning rate of its own: leave it empty.",
                "embedding_lr",
            )
        path = existing_entry.path if existing_entry else self.settings.lora_dir / f"{name}.safetensors"
        step = int(existing.metadata.get("ss_steps", "0") or 0) if existing else 0
        run = self.prepare(cfg, require_name=False)
        if bundle is not None:
            self._check_word_in_prompts(bundle[0], run)
        if step >= LearnRateSchedule(cfg.learn_rate, cfg.steps).end_step:
            raise UserError(f"LoRA '{name}' is already at step {step}; raise max steps above that to train further.")

        def run_job(job: Job) -> TrainResult:
            with self.models.lock:
                model = self.models.get()
                metadata = lora_metadata(model, cfg, run, rank_value, alpha_value, network.train_text_encoder)
                metadata["ss_scale_weight_norms"] = str(max_norm or None)  # kohya writes "None" when off
                if trained_kind != "lora" or dora:  # what kohya writes for LyCORIS networks
                    metadata["ss_network_module"] = "lycoris.kohya"
                metadata["ss_network_dropout"] = str(dropout.network or None)
                if existing is None:  # kohya's record of its network_args
                    args = {"algo": trained_kind} if trained_kind != "lora" else {}
                    if dora:  # LyCORIS's record; its LoRA is "locon" (with or without convolutions)
                        args = {"algo": args.get("algo", "locon"), "dora_wd": "True", "wd_on_output": "False"}
                    if factor != -1:
                        args["factor"] = str(factor)  # LyCORIS's record, which a continued run reads back
                    if conv_dim_value:
                        args.update(conv_dim=str(conv_dim_value), conv_alpha=str(conv_alpha_value))
                else:  # the file's own, with this run's dropouts
                    args = dict(existing_args)
                    args.pop("rank_dropout", None)
                    args.pop("module_dropout", None)
                args.update(
                    {k: str(v) for k, v in (("rank_dropout", dropout.rank), ("module_dropout", dropout.module)) if v}
                )
                if args:
                    metadata["ss_network_args"] = json.dumps(args)
                seed = cfg.seed if cfg.seed is not None else 0
                trained = None
                if bundle is not None:
                    bundle_name, vectors = bundle
                    if vectors is None:  # a new one, from the init text through each encoder's token table
                        vectors = model_initial_vectors(model, pivotal.init_text, int(pivotal.vectors))
                    trained = TrainedVectors(bundle_name, vectors, path, model, self.embeddings, name)
                target = LoraTarget(
                    path,
                    model,
                    rank_value,
                    alpha_value,
                    network.train_text_encoder,
                    seed,
                    metadata,
                    existing,
                    save_dtype,
                    conv_dim_value,
                    conv_alpha_value,
                    network.network_type,
                    trained,
                    max_norm=max_norm,
                    dropout=dropout,
                    lokr_factor=factor,
                    dora_wd=dora,
                )
                try:
                    with self.models.placed_for_training(model):
                        return self._run(target, model, run, job)
                finally:
                    target.close()
                    self.loras.db.forget(path)

        return self._submit("train lora", run_job, name)

    def _bundle_plan(
        self, name: str, existing: LoraFile | None, wanted: str, count: object
    ) -> tuple[str, torch.Tensor | None] | None:
        """The embedding a LoRA run trains beside its layers: (its name, its vectors, None for a new one), or None.
        A continued file trains the one it bundles, whatever the request says; a new name is checked here."""
        wanted = str(wanted or "").strip()
        try:
            vectors = int(count)  # type: ignore[call-overload]
        except (TypeError, ValueError, OverflowError):
            vectors = 0
        if not 1 <= vectors <= MAX_VECTORS:
            raise UserError(
                f"Vectors of the bundled embedding must be between 1 and {MAX_VECTORS}, got {count!r}.",
                "bundle_vectors",
            )
        model = self.models.get()
        if existing is not None:
            if not existing.layers:
                raise UserError(
                    f"LoRA '{name}' holds bundled embeddings only, no layers to train. Choose another name to train "
                    "a new LoRA."
                )
            held = bundled_embeddings(existing)
            if len(held) > 1 or (wanted and wanted not in held):
                has = f"bundles {', '.join(repr(n) for n in held)}" if held else "bundles no embedding"
                raise UserError(
                    f"LoRA '{name}' {has}; a continued LoRA trains what its file holds (one bundled embedding at "
                    "most). Leave the bundled embedding empty to continue it, or choose another name for a new LoRA.",
                    "bundle_embedding",
                )
            if not held:
                return None
            bundle_name, data = next(iter(held.items()))
            if isinstance(data, str):
                raise UserError(f"LoRA '{name}': its bundled embedding '{bundle_name}' cannot be used: {data}")
            if data.width != model.text_width:
                raise UserError(
                    f"LoRA '{name}': its bundled embedding '{bundle_name}' has vectors {data.width} wide but the "
                    f"loaded model needs {model.text_width}."
                )
            return bundle_name, data.side_by_side()
        if not wanted:
            return None
        if clean_name(wanted) != wanted or "." in wanted:
            raise UserError(
                f"Bundled embedding name '{wanted}' may hold letters, digits, '_' and '-' only (it is the word you "
                "write in prompts, and the file's key).",
                "bundle_embedding",
            )
        if not model.pipe.tokenizer(wanted, add_special_tokens=False)["input_ids"]:
            raise UserError(
                f"Bundled embedding name '{wanted}' has nothing the tokenizer can match.", "bundle_embedding"
            )
        self.embeddings.refresh_if_changed()
        other = self.embeddings.get(wanted) or self.embeddings.skipped.get(wanted)
        if other is not None:
            raise UserError(
                f"'{wanted}' is already the name of {other.path.name} in the embeddings folder, which would be used "
                "instead of the bundled embedding in every prompt. Choose another word (or rename that file).",
                "bundle_embedding",
            )
        return wanted, None

    @staticmethod
    def _check_word_in_prompts(word: str, run: PreparedRun) -> None:
        """A bundled embedding learns only from prompts that hold it: through the template's `[name]`, or in the
        captions themselves (a kohya dataset's trigger word)."""
        if any("[name]" in line for line in run.templates):
            return
        alone = re.compile(rf"(?<![\w-]){re.escape(word)}(?![\w-])")  # the word, not part of a longer one
        if any(alone.search(im.filewords) for im in run.images if not im.is_reg):
            return
        raise UserError(
            f"Neither the prompt template '{run.cfg.template_filename}' (it has no [name]) nor any caption holds "
            f"'{word}', so the bundled embedding would never be in a training prompt. Pick a template with [name] "
            "(e.g. subject_filewords.txt) or write the word in the captions.",
            "template_filename",
        )

    def _submit(self, kind: str, run_job: Callable[[Job], TrainResult], name: str) -> Job:
        """Queue `run_job`. Memory running out inside the loop ends the run with the steps done saved (loop.py);
        here it is caught where it happens before the first step (placing the model, the latent cache)."""
        device = self.models.device

        def guarded_job(job: Job) -> TrainResult:
            return guarded(
                device,
                lambda: run_job(job),
                f"preparing to train '{name}'",
                lambda: (
                    "Nothing was changed. Try a smaller training size or batch size, or "
                    f"{smaller_advice(device, training=True)}."
                ),
            )

        return self.jobs.submit(kind, guarded_job, description=name)

    def _run(self, target: TrainingTarget, model: LoadedModel, run: PreparedRun, job: Job) -> TrainResult:
        cfg = run.cfg
        clip_skip = int(self.options["CLIP_stop_at_last_layers"] or 1)
        job.progress.job_count = 1
        if run.problems:
            job.progress.extra["skipped_images"] = run.problems

        samples = parse_sample_prompts(cfg.sample_prompts)

        def preview(prompt: str, step: int) -> list[tuple[Image.Image, str]]:
            """The step's preview, or one per sample prompt (kohya's), each (image, infotext)."""
            base = preview_params(cfg, prompt)
            images = []
            for params in [sample.params(base) for sample in samples] or [base]:
                result = self.txt2img.run_on_model(
                    model, params, None, target.preview_encoder(), target.preview_networks()
                )
                images.append((result.images[0], result.infotexts[0]))
            return images

        # `auto` checkpointing may start off only where running out of memory is an error the run sees, and not
        # under --medvram, whose user has said memory is tight
        can_recover = allocation_can_fail(model.device) and not self.settings.medvram
        return train(target, model, cfg, run.images, run.templates, run.log_dir, clip_skip, job, preview, can_recover)


def preview_params(cfg: TrainConfig, prompt: str) -> Txt2ImgParams:
    """The txt2img settings of a preview: the run's own (`preview_from_txt2img`) or the template prompt at the
    training size with A1111's fixed 20 steps of Euler a."""
    if cfg.preview_from_txt2img:
        return Txt2ImgParams(
            prompt=cfg.preview_prompt,
            negative_prompt=cfg.preview_negative_prompt,
            steps=int(cfg.preview_steps),
            sampler_name=cfg.preview_sampler_name,
            cfg_scale=float(cfg.preview_cfg_scale),
            seed=int(cfg.preview_seed),
            width=int(cfg.preview_width),
            height=int(cfg.preview_height),
            save_images=False,
        )
    return Txt2ImgParams(
        prompt=prompt,
        negative_prompt="",
        steps=20,
        sampler_name="Euler a",
        cfg_scale=7.0,
        seed=cfg.seed if cfg.seed is not None else 0,
        width=int(cfg.training_width),
        height=int(cfg.training_height),
        save_images=False,
    )


def lora_metadata(model: LoadedModel, cfg: TrainConfig, run: PreparedRun, rank: int, alpha: float, te: bool) -> dict:
    """kohya's `ss_` fields that A1111, ComfyUI and kohya's tools show and use (no timestamps: a resumed run writes
    the same file as an uninterrupted one)."""
    version, v2 = model_version(model.pipe)
    train = [im for im in run.images if not im.is_reg and not im.is_validation]
    reg = [im for im in run.images if im.is_reg]
    return {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(alpha),
        "ss_network_train_unet_only": str(not te),
        "ss_base_model_version": version,
        "ss_v2": str(v2),
        "ss_sd_model_name": model.info.model_name,
        "ss_sd_model_hash": model.info.short_hash or "",
        "ss_new_sd_model_hash": model.info.sha256 or "",
        "ss_resolution": f"({int(cfg.training_width)}, {int(cfg.training_height)})",
        "ss_learning_rate": str(cfg.learn_rate),
        "ss_unet_lr": str(cfg.learn_rate),
        **({"ss_text_encoder_lr": str(cfg.text_encoder_lr or cfg.learn_rate)} if te else {}),
        "ss_batch_size_per_device": str(int(cfg.batch_size)),
        "ss_gradient_accumulation_steps": str(int(cfg.gradient_step)),
        "ss_num_train_images": str(sum(im.repeats for im in train)),  # as kohya counts: with repeats
        "ss_dataset_dirs": dataset_dirs(train),
        "ss_tag_frequency": tag_frequency(train),
        "ss_num_reg_images": str(sum(im.repeats for im in reg)),
        **({"ss_reg_dataset_dirs": dataset_dirs(reg)} if reg else {}),
        "ss_prior_loss_weight": str(float(cfg.prior_loss_weight)),
        "ss_enable_bucket": str(bool(cfg.enable_bucket)),
        "ss_min_snr_gamma": str(cfg.min_snr_gamma or None),  # kohya writes "None" when off
        "ss_noise_offset": str(cfg.noise_offset or None),
        "ss_multires_noise_iterations": str(int(cfg.multires_noise_iterations) or None),
        "ss_multires_noise_discount": str(float(cfg.multires_noise_discount)),
        "ss_ip_noise_gamma": str(cfg.ip_noise_gamma or None),
        "ss_debiased_estimation": str(bool(cfg.debiased_estimation_loss)),
        "ss_validation_split": str(float(cfg.validation_split)),
        "ss_validation_seed": str(cfg.validation_seed),  # kohya writes "None" when unset (the run's seed)
        "ss_validate_every_n_steps": str(int(cfg.validate_every_n_steps) or None),  # None: at each epoch's end
        "ss_loss_type": str(cfg.loss_type),
        "ss_huber_schedule": str(cfg.huber_schedule),
        "ss_huber_c": str(float(cfg.huber_c)),
        "ss_huber_scale": str(float(cfg.huber_scale)),
        "ss_keep_tokens": str(int(cfg.keep_tokens)),
        "ss_caption_dropout_rate": str(float(cfg.caption_dropout_rate)),
        "ss_optimizer": describe(cfg.optimizer_type, cfg.optimizer_args),
        "ss_lr_scheduler": str(cfg.lr_scheduler),
        "ss_lr_warmup_steps": str(int(cfg.lr_warmup_steps)),
        "ss_shuffle_caption": str(bool(cfg.shuffle_tags)),
        **({"ss_bucket_info": bucket_info(run.images)} if cfg.enable_bucket else {}),
        "ss_training_comment": "trained with sd-personalize-webui",
    }


def _check_loss(cfg: TrainConfig) -> None:
    """kohya's loss options (losses.py): a loss type and Huber schedule it knows, a threshold c in (0, 1] (the
    exponential schedule takes its log), a scale in (0, 10], and a timestep range of at least one timestep."""
    if cfg.loss_type not in LOSS_TYPES:
        raise UserError(f"Loss type must be one of {', '.join(LOSS_TYPES)}, got {cfg.loss_type!r}.", "loss_type")
    if cfg.huber_schedule not in HUBER_SCHEDULES:
        raise UserError(
            f"Huber schedule must be one of {', '.join(HUBER_SCHEDULES)}, got {cfg.huber_schedule!r}.",
            "huber_schedule",
        )
    for label, value, field, top in (
        ("Huber c", cfg.huber_c, "huber_c", 1.0),
        ("Huber scale", cfg.huber_scale, "huber_scale", 10.0),
    ):
        if not 0 < float(value) <= top:  # NaN fails this too
            raise UserError(f"{label} must be above 0 and at most {top:g} (0.1 and 1 are usual), got {value}.", field)
    first, end = int(cfg.min_timestep), int(cfg.max_timestep)
    if not 0 <= first < end <= 1000:
        raise UserError(
            f"The timesteps trained must satisfy 0 <= min timestep < max timestep <= 1000 (the max is not "
            f"trained), got {first} and {end}.",
            "max_timestep" if not 0 < end <= 1000 else "min_timestep",
        )


def _regularization(
    scale_weight_norms: object, network_dropout: object, rank_dropout: object, module_dropout: object
) -> tuple[float, NetworkDropout]:
    """kohya's max-norm limit and dropouts, checked: a number each, the limit 0 (off) up to MAX_WEIGHT_NORM, each
    dropout 0 (off) up to, not including, 1."""
    values = {}
    for field, label, value in (
        ("scale_weight_norms", "Scale weight norms", scale_weight_norms),
        ("network_dropout", "Network dropout", network_dropout),
        ("rank_dropout", "Rank dropout", rank_dropout),
        ("module_dropout", "Module dropout", module_dropout),
    ):
        try:
            number = float(value or 0)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise UserError(f"{label} must be a number; got {value!r}.", field) from None
        top = MAX_WEIGHT_NORM if field == "scale_weight_norms" else 1.0
        if not (math.isfinite(number) and 0 <= number <= top) or (top == 1.0 and number == 1.0):
            usual = f"at most {MAX_WEIGHT_NORM:g} (1 is usual)" if top != 1.0 else "below 1 (0.1 is usual)"
            raise UserError(f"{label} must be 0 (off) or above, {usual}, got {value}.", field)
        values[field] = number
    dropout = NetworkDropout(values["network_dropout"], values["rank_dropout"], values["module_dropout"])
    return values["scale_weight_norms"], dropout


def _lokr_factor(value: object, network_type: str) -> int:
    """LyCORIS's LoKr `factor`: -1 (the most square split of each layer's sides) or a whole number of at least 1
    (the smaller half's side where it divides the layer's, else the most square split); only for a LoKr."""
    try:
        factor = int(str(value).strip())
    except ValueError:
        raise UserError(
            f"LoKr factor must be a whole number (-1 for automatic), got {value!r}.", "lokr_factor"
        ) from None
    if factor == 0 or factor < -1 or factor > MAX_LORA_RANK:
        raise UserError(
            f"LoKr factor must be -1 (automatic) or between 1 and {MAX_LORA_RANK} (4-16 is usual), got {value}.",
            "lokr_factor",
        )
    if factor != -1 and network_type != "lokr":
        raise UserError("LoKr factor applies to a LoKr; leave it at -1 for a LoRA or LoHa.", "lokr_factor")
    return factor


def _json_object(text: str) -> dict:
    """A JSON object from a file's metadata, or {} for anything else (kohya's fields are written by many tools)."""
    try:
        value = json.loads(text)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def dataset_dirs(images: list[TrainingImage]) -> str:
    """kohya's `ss_dataset_dirs`: each folder's repeats and image count."""
    dirs: dict[str, dict[str, int]] = {}
    for im in images:
        entry = dirs.setdefault(im.path.parent.name, {"n_repeats": im.repeats, "img_count": 0})
        entry["img_count"] += 1
    return json.dumps(dirs)


def tag_frequency(images: list[TrainingImage]) -> str:
    """kohya's `ss_tag_frequency`: per dataset folder, how many images' captions hold each comma-separated tag (A1111
    shows these as the LoRA's training tags in its metadata editor)."""
    counts: dict[str, dict[str, int]] = {}
    for im in images:
        folder = counts.setdefault(im.path.parent.name, {})
        for tag in (t.strip() for t in im.filewords.split(",")):
            if tag:
                folder[tag] = folder.get(tag, 0) + 1
    return json.dumps(counts)


def bucket_info(images: list[TrainingImage]) -> str:
    """kohya's `ss_bucket_info`: each bucket's resolution and how many samples it holds per epoch (repeats and the
    regularization samples counted, as kohya counts them)."""
    counts: dict[tuple[int, int], int] = {}
    for i in epoch_items(images):
        counts[images[i].image.size] = counts.get(images[i].image.size, 0) + 1
    buckets = {str(i): {"resolution": list(size), "count": n} for i, (size, n) in enumerate(sorted(counts.items()))}
    return json.dumps({"buckets": buckets})


def result_message(result: TrainResult, kind: str) -> str:
    """What the UI shows when a run ends."""
    if result.error:
        return result.error
    how = "interrupted" if result.interrupted else "finished"
    noun = "LoRA" if kind == "lora" else kind.capitalize()
    note = f" {checkpointing_note(result.checkpointing_from)}" if result.checkpointing_from else ""
    return (
        f"Training {how} at step {result.step}. {noun} saved to {result.path}; log, previews and "
        f"copies in {result.log_dir}.{note}"
    )
