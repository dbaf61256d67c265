"""The txt2img service: validates a request, runs it on the job thread under the model lock, saves the images."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from app import __version__
from app.embeddings.database import EmbeddingDatabase
from app.errors import UserError
from app.generation.denoise import ScheduledConditioning, decode, sample
from app.generation.infotext import build_infotext
from app.generation.outputs import ImageSaver
from app.generation.preview import approx_preview
from app.generation.samplers import build_scheduler, effective_schedule, find_sampler, find_schedule
from app.generation.seeds import cpu_generators, resolve_seed
from app.hypernetworks.attention import HypernetworkStack, attention_widths
from app.hypernetworks.service import HypernetworkService
from app.jobs import Interrupted, Job, JobRunner
from app.models.manager import LoadedModel, ModelManager
from app.options import Options
from app.prompts.chunking import CHUNK_LENGTH
from app.prompts.encoder import PromptEncoder
from app.prompts.extra_networks import extract_extra_networks

MAX_PROMPT_CHUNKS = 64  # 4800 tokens: far beyond any real prompt, short of tying the job thread up for minutes
MIN_SIZE, MAX_SIZE = 64, 2048
MAX_STEPS = 150
MAX_BATCH_SIZE = 8
MAX_BATCH_COUNT = 100


@dataclass
class Txt2ImgParams:
    prompt: str = ""
    negative_prompt: str = ""
    sampler_name: str = "DPM++ 2M"
    scheduler: str = "Automatic"
    steps: int = 20
    cfg_scale: float = 7.0
    width: int = 512
    height: int = 512
    seed: int = -1
    batch_size: int = 1
    n_iter: int = 1
    clip_skip: int | None = None  # None: the CLIP_stop_at_last_layers option
    save_images: bool = True
    notes: list[str] = field(default_factory=list)  # things the request asked for that we did not do


@dataclass
class Txt2ImgResult:
    images: list[Image.Image]
    seeds: list[int]
    infotexts: list[str]
    paths: list[str]
    params: Txt2ImgParams
    model_name: str
    model_hash: str | None
    clip_skip: int
    sampler_name: str
    schedule: str
    interrupted: bool = False
    job_timestamp: str = ""
    notes: list[str] = field(default_factory=list)  # what the request asked for that was not done, and why

    def info(self) -> dict[str, Any]:
        """The `info` object of A1111's txt2img response."""
        p = self.params
        return {
            "prompt": p.prompt,
            "all_prompts": [p.prompt] * len(self.images),
            "negative_prompt": p.negative_prompt,
            "all_negative_prompts": [p.negative_prompt] * len(self.images),
            "seed": self.seeds[0] if self.seeds else p.seed,
            "all_seeds": self.seeds,
            "subseed": -1,
            "all_subseeds": [-1] * len(self.seeds),
            "subseed_strength": 0,
            "width": p.width,
            "height": p.height,
            "sampler_name": self.sampler_name,
            "scheduler": self.schedule,
            "cfg_scale": p.cfg_scale,
            "steps": p.steps,
            "batch_size": p.batch_size,
            "restore_faces": False,
            "face_restoration_model": None,
            "sd_model_name": self.model_name,
            "sd_model_hash": self.model_hash,
            "sd_vae_name": None,
            "sd_vae_hash": None,
            "seed_resize_from_w": -1,
            "seed_resize_from_h": -1,
            "denoising_strength": None,
            "extra_generation_params": {},
            "index_of_first_image": 0,
            "infotexts": self.infotexts,
            "styles": [],
            "job_timestamp": self.job_timestamp,
            "clip_skip": self.clip_skip,
            "is_using_inpainting_conditioning": False,
            "version": __version__,
            "interrupted": self.interrupted,
            "notes": self.notes,
        }

    def info_json(self) -> str:
        return json.dumps(self.info(), ensure_ascii=False)


def _check_range(name: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:
        raise UserError(f"{name} must be between {low} and {high}, got {value}.")


class Txt2ImgService:
    def __init__(
        self,
        models: ModelManager,
        options: Options,
        jobs: JobRunner,
        saver: ImageSaver,
        embeddings: EmbeddingDatabase | None = None,
        hypernetworks: HypernetworkService | None = None,
        stack: HypernetworkStack | None = None,
    ):
        self.models = models
        self.options = options
        self.jobs = jobs
        self.saver = saver
        self.embeddings = embeddings
        self.hypernetworks = hypernetworks
        self.stack = stack or HypernetworkStack()

    # -- validation ------------------------------------------------------------------------------------------------
    def validate(self, p: Txt2ImgParams) -> None:
        """Refuse bad input before it reaches the queue, with a message that says what to change."""
        for name, value in (("Width", p.width), ("Height", p.height)):
            _check_range(name, value, MIN_SIZE, MAX_SIZE)
            if value % 8:
                raise UserError(f"{name} must be a multiple of 8, got {value} (try {value - value % 8}).")
        _check_range("Sampling steps", p.steps, 1, MAX_STEPS)
        _check_range("CFG scale", p.cfg_scale, 0, 100)
        _check_range("Batch size", p.batch_size, 1, MAX_BATCH_SIZE)
        _check_range("Batch count", p.n_iter, 1, MAX_BATCH_COUNT)
        if p.clip_skip is not None:
            _check_range("Clip skip", p.clip_skip, 1, 12)
        find_sampler(p.sampler_name)
        find_schedule(p.scheduler)
        if self.embeddings is not None:
            self.embeddings.refresh_if_changed()
        encoder = self.models.get().encoder
        for label, text in (("Prompt", extract_extra_networks(p.prompt)[0]), ("Negative prompt", p.negative_prompt)):
            tokens = encoder.token_count(text)
            if tokens > MAX_PROMPT_CHUNKS * CHUNK_LENGTH:
                raise UserError(
                    f"{label} is too long: {tokens} tokens; the limit is {MAX_PROMPT_CHUNKS * CHUNK_LENGTH} "
                    f"({MAX_PROMPT_CHUNKS} chunks of {CHUNK_LENGTH})."
                )

    # -- running ---------------------------------------------------------------------------------------------------
    def submit(self, p: Txt2ImgParams) -> Job:
        """Validate, then queue; the job's result is a Txt2ImgResult."""
        self.validate(p)
        return self.jobs.submit("txt2img", lambda job: self.run(p, job), description=p.prompt[:80])

    def generate(self, p: Txt2ImgParams) -> Txt2ImgResult:
        return self.submit(p).wait()

    def run(self, p: Txt2ImgParams, job: Job | None = None) -> Txt2ImgResult:
        with self.models.lock:
            model = self.models.get()
            return self.run_on_model(model, p, job)

    def run_on_model(
        self,
        model: LoadedModel,
        p: Txt2ImgParams,
        job: Job | None = None,
        encoder: PromptEncoder | None = None,
        networks: list | None = None,
    ) -> Txt2ImgResult:
        """Generate with `model` (the caller holds the model lock); `encoder` overrides the model's prompt encoder
        (training previews use the embedding being trained)."""
        if self.embeddings is not None:
            self.embeddings.refresh_if_changed()  # files dropped in since the request was queued
        sampler, implied_schedule = find_sampler(p.sampler_name)
        schedule = effective_schedule(sampler, implied_schedule or p.scheduler)
        clip_skip = int(p.clip_skip or self.options["CLIP_stop_at_last_layers"] or 1)
        base_seed = resolve_seed(p.seed)
        f = model.vae_scale_factor
        shape = (model.pipe.unet.config.in_channels, p.height // f, p.width // f)
        encoder = encoder or model.encoder
        prompt_text, tags = extract_extra_networks(p.prompt)
        networks, notes = list(networks or []), []
        if tags and self.hypernetworks is not None:
            resolved, notes = self.hypernetworks.resolve(tags, attention_widths(model.pipe.unet))
            networks += resolved
        elif tags:
            notes = [f"{t.text}: extra networks are not available here; removed from the prompt" for t in tags]
        cond = ScheduledConditioning(encoder, prompt_text, p.steps, clip_skip)
        uncond = ScheduledConditioning(encoder, p.negative_prompt, p.steps, clip_skip)
        used = {e.name: e for e in cond.embeddings_used() + uncond.embeddings_used()}
        ti_hashes = ", ".join(f"{name}: {e.shorthash}" for name, e in used.items()) or None
        result = Txt2ImgResult(
            images=[],
            seeds=[],
            infotexts=[],
            paths=[],
            params=p,
            model_name=model.info.model_name,
            model_hash=model.info.short_hash,
            clip_skip=clip_skip,
            sampler_name=sampler.name,
            schedule=schedule,
            job_timestamp=time.strftime("%Y%m%d%H%M%S"),
            notes=[*p.notes, *notes],
        )
        if job is not None:
            job.progress.job_count = p.n_iter
        for iteration in range(p.n_iter):
            seeds = [base_seed + iteration * p.batch_size + j for j in range(p.batch_size)]
            scheduler = build_scheduler(sampler.name, schedule, dict(model.pipe.scheduler.config), seeds[0])
            scheduler.set_timesteps(p.steps, device=model.device)
            generators = cpu_generators(seeds)
            noise = torch.stack([torch.randn(shape, generator=g) for g in generators])
            latents = noise.to(model.device) * scheduler.init_noise_sigma
            current = {"latents": latents}

            def on_step(step: int, total: int, lat: torch.Tensor, iteration=iteration, current=current) -> None:
                current["latents"] = lat
                if job is not None:
                    pr = job.progress
                    pr.job_no, pr.sampling_step, pr.sampling_steps = iteration, step, total
                    pr.text = f"Batch {iteration + 1}/{p.n_iter}, step {step}/{total}"
                    pr.preview = lambda lat=lat: approx_preview(lat[0])
                    pr.preview_id += 1
                    job.check_interrupt()

            try:
                with self.stack.using(networks):
                    latents = sample(
                        model.pipe.unet, scheduler, latents, cond, uncond, p.cfg_scale, p.steps, generators, on_step
                    )
            except Interrupted:
                latents = current["latents"]
                result.interrupted = True
            images = decode(model.pipe.vae, latents)
            for image_tensor, seed in zip(images, seeds, strict=False):
                image = Image.fromarray((image_tensor.permute(1, 2, 0).numpy() * 255).round().astype("uint8"))
                infotext = self._infotext(p, model, seed, sampler.name, schedule, clip_skip, ti_hashes)
                result.images.append(image)
                result.seeds.append(seed)
                result.infotexts.append(infotext)
                if p.save_images and self.options["samples_save"]:
                    result.paths.append(str(self.saver.save(image, seed, p.prompt, infotext)))
            if result.interrupted:
                break
        return result

    def _infotext(
        self,
        p: Txt2ImgParams,
        model: LoadedModel,
        seed: int,
        sampler: str,
        schedule: str,
        clip_skip: int,
        ti_hashes: str | None = None,
    ) -> str:
        params: dict[str, Any] = {
            "Steps": p.steps,
            "Sampler": sampler,
            "Schedule type": schedule,
            "CFG scale": p.cfg_scale,
            "Seed": seed,
            "Size": f"{p.width}x{p.height}",
            "Model hash": model.info.short_hash,
            "Model": model.info.model_name,
            "Clip skip": clip_skip if clip_skip > 1 else None,
            "RNG": "CPU",
            "TI hashes": ti_hashes,
            "Version": f"sdp-{__version__}",
        }
        return build_infotext(p.prompt, p.negative_prompt, params)
