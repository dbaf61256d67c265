"""Builds the app's services once, from Settings, and hands them to the UI and the API."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.embeddings.database import EmbeddingDatabase
from app.embeddings.service import EmbeddingService
from app.errors import BusyError, UserError
from app.folders import FolderPolicy
from app.generation.outputs import ImageSaver
from app.generation.styles import StyleDatabase
from app.generation.txt2img import Txt2ImgService
from app.hypernetworks.attention import HypernetworkStack
from app.hypernetworks.attention import install as install_hypernetwork_attention
from app.hypernetworks.database import HypernetworkDatabase
from app.hypernetworks.service import HypernetworkService
from app.jobs import Job, JobRunner
from app.lora.block_weights import PRESETS_FILE
from app.lora.extract import ExtractOptions, ExtractReport
from app.lora.merge import MergeReport
from app.lora.service import LoraDatabase, LoraService
from app.lora.tools import LoraTools
from app.models.checkpoints import CheckpointInfo
from app.models.manager import ModelManager
from app.models.merger import CheckpointMerger, MergerOptions, MergerReport
from app.options import Options
from app.settings import Settings
from app.training.service import TrainingService

log = logging.getLogger(__name__)

# Options that name a folder (relative to the data folder, or absolute): confined like request paths.
PATH_OPTIONS = frozenset({"outdir_samples", "outdir_txt2img_samples"})


def extraction_result(result: tuple[Path, Any] | None) -> tuple[Path, Any]:
    if result is None:
        raise UserError("Interrupted; nothing was written.")
    return result


@dataclass
class Services:
    settings: Settings
    options: Options
    models: ModelManager
    jobs: JobRunner
    txt2img: Txt2ImgService
    embeddings: EmbeddingService
    training: TrainingService
    hypernetworks: HypernetworkService
    styles: StyleDatabase
    loras: LoraService
    lora_tools: LoraTools
    checkpoint_merger: CheckpointMerger
    folders: FolderPolicy

    def select_checkpoint(self, query: str) -> CheckpointInfo:
        """Switch the model (queued behind running jobs, so it never swaps mid-generation); saves the choice."""
        info = self.models.find(query)
        self._refuse_during_training("switch checkpoints")
        job = self.jobs.submit("load checkpoint", lambda job: self.models.load(info), description=info.title)
        loaded = job.wait()
        self.options.update({"sd_model_checkpoint": loaded.info.title, "sd_checkpoint_hash": loaded.info.sha256})
        return loaded.info

    def _tool_job(
        self, kind: str, name: str, verb: str, work: Callable[[Callable[[int, int], None]], Any], unit: str = "layer"
    ) -> Job:
        """Queue `work(progress)` as a job: it runs after the jobs ahead of it, reports each layer (`unit`) it has
        done ("<verb> layer n/N") and stops at Interrupt between layers with nothing written (its result is then
        None, which `extraction_result` turns into a message)."""
        self._refuse_during_training(kind)

        def run(job: Job) -> Any:
            def progress(done: int, total: int) -> None:
                job.progress.sampling_step, job.progress.sampling_steps = done, total
                job.progress.text = f"{verb} {unit} {done}/{total}"
                job.check_interrupt()

            return work(progress)

        return self.jobs.submit(kind, run, description=name)

    def start_extract_lora(self, tuned: str, base: str, name: str, options: ExtractOptions) -> Job:
        """Queue a LoRA extraction (LoRA tab → Extract, `/sdapi/v1/extract/lora`); options are refused at once."""
        options.check()
        return self._tool_job(
            "extract a LoRA",
            name,
            "Extracting",
            lambda progress: self.lora_tools.extract(tuned, base, name, options, progress),
        )

    def start_merge_to_lora(self, loras: str, name: str, options: ExtractOptions) -> Job:
        """Queue merging LoRAs into one (LoRA tab → Merge, `/sdapi/v1/merge/lora` with `into: "lora"`)."""
        options.check()
        return self._tool_job(
            "merge LoRAs",
            name,
            "Merging",
            lambda progress: self.lora_tools.merge_to_lora(loras, name, options, progress),
        )

    def extract_lora(
        self, tuned: str, base: str, name: str, options: ExtractOptions, abandoned: Callable[[], bool] | None = None
    ) -> tuple[Path, ExtractReport]:
        """`start_extract_lora` and wait for it; interrupted also when `abandoned()` (the client went away)."""
        job = self.start_extract_lora(tuned, base, name, options)
        return extraction_result(self.jobs.wait_for(job, abandoned or (lambda: False)))

    def merge_to_lora(
        self, loras: str, name: str, options: ExtractOptions, abandoned: Callable[[], bool] | None = None
    ) -> tuple[Path, ExtractReport]:
        """`start_merge_to_lora` and wait for it."""
        job = self.start_merge_to_lora(loras, name, options)
        return extraction_result(self.jobs.wait_for(job, abandoned or (lambda: False)))

    def start_merge_checkpoints(self, options: MergerOptions) -> Job:
        """Queue a Checkpoint Merger run (its tab, `/sdapi/v1/merge/checkpoint`); options are refused at once."""
        options.check()
        return self._tool_job(
            "merge checkpoints",
            options.custom_name or options.primary,
            "Merging",
            lambda progress: self.checkpoint_merger.merge(options, progress),
            unit="tensor",
        )

    def merge_checkpoints(
        self, options: MergerOptions, abandoned: Callable[[], bool] | None = None
    ) -> tuple[Path, MergerReport]:
        """`start_merge_checkpoints` and wait for it."""
        job = self.start_merge_checkpoints(options)
        return extraction_result(self.jobs.wait_for(job, abandoned or (lambda: False)))

    def merge_lora(self, loras: str, name: str, save_precision: str = "fp16") -> tuple[Path, MergeReport]:
        """Merge LoRAs into a new checkpoint (LoRA tab → Merge, `/sdapi/v1/merge/lora`) as a job, so it never
        runs while a generation has LoRAs merged of its own."""
        self._refuse_during_training("merge LoRAs into a checkpoint")
        job = self.jobs.submit("merge LoRA", lambda job: self.lora_tools.merge(loras, name, save_precision), name)
        return job.wait()

    def _refuse_during_training(self, what: str) -> None:
        job = self.training.running()
        if job is not None and not job.finished:
            raise BusyError(
                f"A training run ({job.description}) is using the model; {what} after it ends, or interrupt it first."
            )

    def select_vae(self, choice: str | None) -> str:
        """Switch the VAE (queued like a checkpoint swap); saves the choice."""
        self._refuse_during_training("change the VAE")
        job = self.jobs.submit("load VAE", lambda job: self.models.apply_vae(choice), description=str(choice))
        used = job.wait()
        self.options.update({"sd_vae": used})
        return used

    def generate_with_overrides(self, params, overrides: dict, restore: bool = True, abandoned=None):
        """txt2img with A1111's `override_settings` (checkpoint, VAE, Clip skip), restored afterwards if asked."""
        before = {"sd_model_checkpoint": self.options["sd_model_checkpoint"], "sd_vae": self.options["sd_vae"]}
        checkpoint, vae = overrides.get("sd_model_checkpoint"), overrides.get("sd_vae")
        if checkpoint:
            self.models.find(str(checkpoint))
        if checkpoint:
            self.select_checkpoint(str(checkpoint))
        if vae is not None:
            self.select_vae(str(vae))
        try:
            return self.txt2img.generate(params, abandoned)
        finally:
            if restore and checkpoint and before["sd_model_checkpoint"] != self.options["sd_model_checkpoint"]:
                self.select_checkpoint(str(before["sd_model_checkpoint"]))
            if restore and vae is not None and before["sd_vae"] != self.options["sd_vae"]:
                self.select_vae(before["sd_vae"])

    def set_options(self, values: dict) -> None:
        """Apply option changes; checkpoint and Clip skip are checked before anything is kept."""
        values = dict(values)
        if "CLIP_stop_at_last_layers" in values:
            try:
                clip_skip = int(values["CLIP_stop_at_last_layers"])
            except (TypeError, ValueError):
                raise UserError("CLIP_stop_at_last_layers must be an integer from 1 to 12.") from None
            if not 1 <= clip_skip <= 12:
                raise UserError("CLIP_stop_at_last_layers must be an integer from 1 to 12.")
            values["CLIP_stop_at_last_layers"] = clip_skip
        if "extra_networks_default_multiplier" in values:
            weight = values["extra_networks_default_multiplier"]
            if isinstance(weight, bool) or not isinstance(weight, int | float) or not -10 <= weight <= 10:
                raise UserError("extra_networks_default_multiplier must be a number from -10 to 10 (1 is usual).")
            values["extra_networks_default_multiplier"] = float(weight)
        checkpoint = values.pop("sd_model_checkpoint", None)
        vae = values.pop("sd_vae", None)
        for key in PATH_OPTIONS.intersection(values):
            if values[key]:
                self.folders.check(self.settings.data_dir / str(values[key]), f"Option {key}")
        if checkpoint:
            self.models.find(str(checkpoint))  # refuse an unknown name before changing anything
        if vae and vae not in ("Automatic", "None") and vae not in self.models.vae_files():
            self.models.apply_vae(vae)  # raises the not-found message
        if values:
            self.options.update(values)
        if checkpoint:
            self.select_checkpoint(str(checkpoint))
        if vae is not None:
            self.select_vae(str(vae))


def build_services(settings: Settings) -> Services:
    options = Options(settings.config_file)
    models = ModelManager(settings)
    embedding_db = EmbeddingDatabase(settings.embeddings_dir)
    models.embedding_finder = embedding_db.find_embedding
    models.on_load(lambda model: embedding_db.set_model(model.pipe.tokenizer, model.text_width))
    stack = HypernetworkStack()
    slice_size = 1 if settings.opt_split_attention else None
    models.on_load(lambda model: install_hypernetwork_attention(model.pipe.unet, stack, slice_size))
    hypernetworks = HypernetworkService(HypernetworkDatabase(settings.hypernetwork_dir), models, stack)
    loras = LoraService(
        LoraDatabase(settings.lora_dir), models, embedding_db, presets_path=settings.data_dir / PRESETS_FILE
    )
    jobs = JobRunner(max_waiting=settings.queue_limit)
    outdir = settings.data_dir / str(options["outdir_txt2img_samples"] or "outputs/txt2img-images")
    styles = StyleDatabase(settings.data_dir / "styles.csv")
    txt2img = Txt2ImgService(
        models, options, jobs, ImageSaver(outdir), embedding_db, [hypernetworks, loras], stack, styles
    )
    folders = FolderPolicy.from_settings(settings)
    training = TrainingService(
        settings, models, options, jobs, embedding_db, txt2img, hypernetworks, stack, loras, folders
    )
    embeddings = EmbeddingService(embedding_db, models)
    lora_tools = LoraTools(loras, models)
    services = Services(
        settings,
        options,
        models,
        jobs,
        txt2img,
        embeddings,
        training,
        hypernetworks,
        styles,
        loras,
        lora_tools,
        CheckpointMerger(models),
        folders,
    )
    info = models.initial_checkpoint(options["sd_model_checkpoint"])
    models.load(info)
    models.on_load(lambda model: _reapply_vae(models, options))
    options.update({"sd_model_checkpoint": info.title, "sd_checkpoint_hash": info.sha256})
    return services


def _reapply_vae(models: ModelManager, options: Options) -> None:
    """A newly loaded checkpoint keeps the VAE the user chose, or falls back to its own with a warning."""
    choice = options["sd_vae"]
    if choice and choice not in ("Automatic", "None"):
        try:
            models.apply_vae(choice)
        except UserError as e:
            log.warning("Using the checkpoint's own VAE: %s", e)
            options.update({"sd_vae": "Automatic"})
