"""The txt2img service: validates a request, runs it on the job thread under the model lock, saves the images."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from app import __version__
from app.embeddings.database import EmbeddingDatabase
from app.errors import BusyError, QueueFullError, UserError
from app.generation.denoise import ScheduledConditioning, decode, sample
from app.generation.hires import (
    LATENT_MODES,
    check_upscaler,
    encode_images,
    target_size,
    upscale_images,
    upscale_latents,
)
from app.generation.infotext import build_infotext
from app.generation.outputs import ImageSaver
from app.generation.preview import approx_preview
from app.generation.samplers import build_scheduler, effective_schedule, find_sampler, find_schedule
from app.generation.seeds import cpu_generators, initial_noise, resolve_seed
from app.generation.styles import StyleDatabase
from app.generation.tiling import circular_padding
from app.hypernetworks.attention import HypernetworkStack
from app.jobs import Interrupted, Job, JobRunner
from app.models.manager import LoadedModel, ModelManager, offload_mode
from app.models.out_of_memory import guarded, smaller_advice
from app.networks.activation import NetworkKind, activate_all
from app.options import Options
from app.prompts.chunking import CHUNK_LENGTH
from app.prompts.encoder import PromptEncoder
from app.prompts.extra_networks import extract_extra_networks


@dataclass
class HiresPlan:
    """The second pass of hires fix, resolved from the request."""

    size: tuple[int, int]
    upscaler: str
    steps: int
    strength: float
    sampler: str
    cond: ScheduledConditioning
    uncond: ScheduledConditioning

    def infotext(self, p: Txt2ImgParams) -> dict[str, Any]:
        fields: dict[str, Any] = {"Denoising strength": self.strength}
        if p.hr_resize_x > 0 or p.hr_resize_y > 0:
            fields["Hires resize"] = f"{self.size[0]}x{self.size[1]}"
        else:
            fields["Hires upscale"] = p.hr_scale
        if p.hr_second_pass_steps:
            fields["Hires steps"] = p.hr_second_pass_steps
        fields["Hires upscaler"] = self.upscaler
        if p.hr_sampler_name:
            fields["Hires sampler"] = p.hr_sampler_name
        if p.hr_prompt:
            fields["Hires prompt"] = p.hr_prompt
        if p.hr_negative_prompt:
            fields["Hires negative prompt"] = p.hr_negative_prompt
        return fields


def xl_time_ids(model: LoadedModel, width: int, height: int) -> torch.Tensor | None:
    """SDXL's size conditioning: original size, crop offset (none), target size; None for other models."""
    if not model.is_xl:
        return None
    return torch.tensor([height, width, 0, 0, height, width], dtype=torch.float32)


MAX_PROMPT_CHUNKS = 64  # 4800 tokens: far beyond any real prompt, short of tying the job thread up for minutes
MIN_SIZE, MAX_SIZE = 64, 2048
MAX_STEPS = 150
MAX_BATCH_SIZE = 8
MAX_BATCH_COUNT = 100
MAX_SEED = 2**63 - 1  # seed + image index must fit torch's 64-bit generator seed


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
    # Variation seeds
    subseed: int = -1
    subseed_strength: float = 0.0
    seed_resize_from_w: int = -1
    seed_resize_from_h: int = -1
    tiling: bool = False
    styles: list[str] = field(default_factory=list)
    restore_faces: bool = False
    # Hires fix
    enable_hr: bool = False
    hr_scale: float = 2.0
    hr_upscaler: str | None = "Latent"
    hr_second_pass_steps: int = 0
    hr_resize_x: int = 0
    hr_resize_y: int = 0
    denoising_strength: float | None = None
    hr_prompt: str = ""
    hr_negative_prompt: str = ""
    hr_sampler_name: str | None = None


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
    subseeds: list[int] = field(default_factory=list)
    prompt: str = ""  # after styles
    negative_prompt: str = ""
    size: tuple[int, int] = (0, 0)  # of the images returned (the hires size with hires fix)

    def info(self) -> dict[str, Any]:
        """The `info` object of A1111's txt2img response."""
        p = self.params
        return {
            "prompt": self.prompt,
            "all_prompts": [self.prompt] * len(self.images),
            "negative_prompt": self.negative_prompt,
            "all_negative_prompts": [self.negative_prompt] * len(self.images),
            "seed": self.seeds[0] if self.seeds else p.seed,
            "all_seeds": self.seeds,
            "subseed": self.subseeds[0] if self.subseeds else -1,
            "all_subseeds": self.subseeds,
            "subseed_strength": p.subseed_strength,
            "width": self.size[0] or p.width,
            "height": self.size[1] or p.height,
            "sampler_name": self.sampler_name,
            "scheduler": self.schedule,
            "cfg_scale": p.cfg_scale,
            "steps": p.steps,
            "batch_size": p.batch_size,
            "restore_faces": p.restore_faces,
            "face_restoration_model": None,
            "sd_model_name": self.model_name,
            "sd_model_hash": self.model_hash,
            "sd_vae_name": None,
            "sd_vae_hash": None,
            "seed_resize_from_w": p.seed_resize_from_w,
            "seed_resize_from_h": p.seed_resize_from_h,
            "denoising_strength": p.denoising_strength if p.enable_hr else None,
            "extra_generation_params": {},
            "index_of_first_image": 0,
            "infotexts": self.infotexts,
            "styles": p.styles,
            "job_timestamp": self.job_timestamp,
            "clip_skip": self.clip_skip,
            "is_using_inpainting_conditioning": False,
            "version": __version__,
            "interrupted": self.interrupted,
            "notes": self.notes,
        }

    def info_json(self) -> str:
        return json.dumps(self.info(), ensure_ascii=False)


def check_text(label: str, text: str | None, field: str | None = None) -> None:
    """Text must be encodable: a lone UTF-16 surrogate (JSON can carry "\\ud800") breaks the tokenizer."""
    try:
        (text or "").encode("utf-8")
    except UnicodeEncodeError as e:
        raise UserError(
            f"{label} contains a character that is not valid Unicode (a lone surrogate, {text[e.start]!r}, at "
            f"position {e.start}); remove it.",
            field,
        ) from None


def _check_range(name: str, value: float, low: float, high: float, field: str | None = None) -> None:
    if not low <= value <= high:
        raise UserError(f"{name} must be between {low} and {high}, got {value}.", field)


class Txt2ImgService:
    def __init__(
        self,
        models: ModelManager,
        options: Options,
        jobs: JobRunner,
        saver: ImageSaver,
        embeddings: EmbeddingDatabase | None = None,
        network_kinds: list[NetworkKind] | None = None,
        stack: HypernetworkStack | None = None,
        styles: StyleDatabase | None = None,
    ):
        self.models = models
        self.options = options
        self.jobs = jobs
        self.saver = saver
        self.embeddings = embeddings
        self.network_kinds = list(network_kinds or [])  # hypernetworks, LoRAs: what `<kind:...>` tags apply
        self.stack = stack or HypernetworkStack()
        self.styles = styles

    # -- validation ------------------------------------------------------------------------------------------------
    def validate(self, p: Txt2ImgParams) -> None:
        """Refuse bad input before it reaches the queue, with a message that says what to change."""
        for name, value, key in (("Width", p.width, "width"), ("Height", p.height, "height")):
            _check_range(name, value, MIN_SIZE, MAX_SIZE, key)
            if value % 8:
                raise UserError(f"{name} must be a multiple of 8, got {value} (try {value - value % 8}).", key)
        _check_range("Sampling steps", p.steps, 1, MAX_STEPS, "steps")
        _check_range("CFG scale", p.cfg_scale, 0, 100, "cfg_scale")
        _check_range("Batch size", p.batch_size, 1, MAX_BATCH_SIZE, "batch_size")
        _check_range("Batch count", p.n_iter, 1, MAX_BATCH_COUNT, "n_iter")
        if p.clip_skip is not None:
            _check_range("Clip skip", p.clip_skip, 1, 12, "CLIP_stop_at_last_layers")
        find_sampler(p.sampler_name)
        find_schedule(p.scheduler)
        _check_range("Variation strength", p.subseed_strength, 0, 1, "subseed_strength")
        for name, seed, key in (("Seed", p.seed, "seed"), ("Variation seed", p.subseed, "subseed")):
            if seed is not None and seed != -1 and not 0 <= seed <= MAX_SEED:
                raise UserError(f"{name} must be -1 (random) or between 0 and {MAX_SEED}, got {seed}.", key)
        for name, value, key in (
            ("Resize seed from width", p.seed_resize_from_w, "seed_resize_from_w"),
            ("Resize seed from height", p.seed_resize_from_h, "seed_resize_from_h"),
        ):
            if value is not None and value not in (-1, 0) and not MIN_SIZE <= value <= MAX_SIZE:
                raise UserError(f"{name} must be -1 (off) or between {MIN_SIZE} and {MAX_SIZE}, got {value}.", key)
        if p.enable_hr:
            check_upscaler(p.hr_upscaler)
            if p.hr_sampler_name:
                find_sampler(p.hr_sampler_name)
            _check_range("Hires steps", p.hr_second_pass_steps, 0, MAX_STEPS, "hr_second_pass_steps")
            strength = p.denoising_strength if p.denoising_strength is not None else 0.7
            _check_range("Denoising strength", strength, 0, 1, "denoising_strength")
            for name, value, key in (("Resize width to", p.hr_resize_x, "hr_resize_x"),
                                       ("Resize height to", p.hr_resize_y, "hr_resize_y")):  # fmt: skip
                _check_range(name, value, 0, MAX_SIZE, key)
            if not (p.hr_resize_x or p.hr_resize_y):  # a resize target replaces the factor
                _check_range("Upscale by", p.hr_scale, 1, MAX_SIZE / MIN_SIZE, "hr_scale")
            w, h = target_size(p.width, p.height, p.hr_scale, p.hr_resize_x, p.hr_resize_y)
            if not (MIN_SIZE <= w <= MAX_SIZE and MIN_SIZE <= h <= MAX_SIZE):
                raise UserError(
                    f"Hires fix would make {w}x{h} images; the size must stay between {MIN_SIZE} and "
                    f"{MAX_SIZE}. Lower the upscale factor or the resize target.",
                    "hr_scale" if not (p.hr_resize_x or p.hr_resize_y) else "hr_resize_x",
                )
        if self.embeddings is not None:
            self.embeddings.refresh_if_changed()
        for label, text, key in (
            ("Prompt", p.prompt, "prompt"),
            ("Negative prompt", p.negative_prompt, "negative_prompt"),
            ("Hires prompt", p.hr_prompt, "hr_prompt"),
            ("Hires negative prompt", p.hr_negative_prompt, "hr_negative_prompt"),
        ):
            check_text(label, text, key)
        encoder = self.models.get().encoder
        for label, text, key in (
            ("Prompt", extract_extra_networks(p.prompt)[0], "prompt"),
            ("Negative prompt", p.negative_prompt, "negative_prompt"),
        ):
            tokens = encoder.token_count(text)
            if tokens > MAX_PROMPT_CHUNKS * CHUNK_LENGTH:
                raise UserError(
                    f"{label} is too long: {tokens} tokens; the limit is {MAX_PROMPT_CHUNKS * CHUNK_LENGTH} "
                    f"({MAX_PROMPT_CHUNKS} chunks of {CHUNK_LENGTH}).",
                    key,
                )

    # -- running ---------------------------------------------------------------------------------------------------
    def submit(self, p: Txt2ImgParams) -> Job:
        """Validate, then queue; the job's result is a Txt2ImgResult."""
        self.validate(p)
        return self.jobs.submit("txt2img", lambda job: self.run(p, job), description=p.prompt[:80])

    def generate(self, p: Txt2ImgParams, abandoned: Callable[[], bool] | None = None) -> Txt2ImgResult:
        """Queue and wait; `abandoned()` true (the client went away) interrupts the job (JobRunner.wait_for)."""
        job = self.submit(p)
        result = self.jobs.wait_for(job, abandoned) if abandoned is not None else job.wait()
        if result is None:  # interrupted while it waited: nothing ran
            if self.jobs.closed:
                raise QueueFullError("The server is stopping: the generation was dropped before it started.", 30)
            raise BusyError("The generation was interrupted before it started; nothing was generated.")
        return result

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
        (training previews use the embedding being trained), `networks` adds hypernetworks (the one training).
        Extra networks from the prompt's tags are applied for this call only: the model is restored on return.
        Running out of memory ends it with an OutOfMemoryError that says what to make smaller."""

        def work() -> Txt2ImgResult:
            with ExitStack() as applied:
                return self._run(model, p, job, encoder, list(networks or []), applied)

        count = p.batch_size * p.n_iter
        size = f"{p.width}×{p.height}"
        if p.enable_hr:
            hr_width, hr_height = target_size(p.width, p.height, p.hr_scale, p.hr_resize_x, p.hr_resize_y)
            size += f", hires fix to {hr_width}×{hr_height}"
        return guarded(
            model.device,
            work,
            f"generating {count} image{'s' if count > 1 else ''} of {size}",
            lambda: (
                "Try a smaller batch size or image size, or "
                f"{smaller_advice(model.device, offload_mode(self.models.settings, model.device))}."
            ),
        )

    def _run(
        self,
        model: LoadedModel,
        p: Txt2ImgParams,
        job: Job | None,
        encoder: PromptEncoder | None,
        networks: list,
        applied: ExitStack,
    ) -> Txt2ImgResult:
        if self.embeddings is not None:
            self.embeddings.refresh_if_changed()  # files dropped in since the request was queued
        notes = list(p.notes)
        prompt, negative = p.prompt, p.negative_prompt
        if p.styles:
            if self.styles is None:
                notes.append("styles: no styles file is available; generated without them")
            else:
                prompt, negative, missing = self.styles.apply(prompt, negative, p.styles)
                notes += [f"style '{name}' not found in styles.csv; ignored" for name in missing]
        if p.restore_faces:
            notes.append(
                "restore_faces: face restoration is not installed (no model can be downloaded here); "
                "generated without it"
            )
        sampler, implied_schedule = find_sampler(p.sampler_name)
        schedule = effective_schedule(sampler, implied_schedule or p.scheduler)
        clip_skip = int(p.clip_skip or self.options["CLIP_stop_at_last_layers"] or 1)
        base_seed = resolve_seed(p.seed)
        base_subseed = resolve_seed(p.subseed) if p.subseed_strength > 0 else -1
        f = model.vae_scale_factor
        shape = (model.pipe.unet.config.in_channels, p.height // f, p.width // f)
        resize_from = None
        if p.seed_resize_from_w > 0 and p.seed_resize_from_h > 0:
            resize_from = (p.seed_resize_from_h // f, p.seed_resize_from_w // f)
        encoder = encoder or model.encoder
        prompt_text, tags = extract_extra_networks(prompt)
        applied.enter_context(self.stack.using(networks))
        tag_notes, network_fields, before_step = activate_all(self.network_kinds, model, tags, applied)
        notes += tag_notes
        cond = ScheduledConditioning(encoder, prompt_text, p.steps, clip_skip)
        uncond = ScheduledConditioning(encoder, negative, p.steps, clip_skip)
        conditionings = [cond, uncond]
        hires = None
        if p.enable_hr:
            hr_steps = p.hr_second_pass_steps or p.steps
            hr_prompt = extract_extra_networks(p.hr_prompt)[0] if p.hr_prompt else prompt_text
            hires = HiresPlan(
                size=target_size(p.width, p.height, p.hr_scale, p.hr_resize_x, p.hr_resize_y),
                upscaler=check_upscaler(p.hr_upscaler),
                steps=hr_steps,
                strength=p.denoising_strength if p.denoising_strength is not None else 0.7,
                sampler=p.hr_sampler_name or sampler.name,
                cond=ScheduledConditioning(encoder, hr_prompt, hr_steps, clip_skip),
                uncond=ScheduledConditioning(encoder, p.hr_negative_prompt or negative, hr_steps, clip_skip),
            )
            conditionings += [hires.cond, hires.uncond]
        used = {e.name: e for c in conditionings for e in c.embeddings_used()}
        extra = {"TI hashes": ", ".join(f"{name}: {e.shorthash}" for name, e in used.items()) or None}
        extra.update(network_fields)
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
            notes=notes,
            prompt=prompt,
            negative_prompt=negative,
            size=hires.size if hires else (p.width, p.height),
        )
        if job is not None:
            job.progress.job_count = p.n_iter
        for iteration in range(p.n_iter):
            first = iteration * p.batch_size
            seeds = [base_seed + first + j for j in range(p.batch_size)]
            subseeds = [base_subseed + first + j for j in range(p.batch_size)] if p.subseed_strength > 0 else None
            generators = cpu_generators(seeds)
            noise = initial_noise(generators, shape, subseeds, p.subseed_strength, resize_from)
            scheduler = build_scheduler(sampler.name, schedule, dict(model.pipe.scheduler.config), seeds[0])
            scheduler.set_timesteps(p.steps, device=model.device)
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

            with circular_padding(model.pipe.unet, model.pipe.vae, enabled=p.tiling):
                try:
                    latents = sample(
                        model.pipe.unet,
                        scheduler,
                        latents,
                        cond,
                        uncond,
                        p.cfg_scale,
                        p.steps,
                        generators,
                        on_step,
                        time_ids=xl_time_ids(model, p.width, p.height),
                        before_step=before_step,  # each image's first pass from its first step
                    )
                    if hires is not None:
                        latents = self._hires_pass(model, p, hires, latents, generators, schedule, seeds[0], on_step)
                except Interrupted:
                    latents = current["latents"]
                    result.interrupted = True
                images = decode(model.pipe.vae, latents)
            for index, (image_tensor, seed) in enumerate(zip(images, seeds, strict=True)):
                image = Image.fromarray((image_tensor.permute(1, 2, 0).numpy() * 255).round().astype("uint8"))
                fields = dict(extra)
                if subseeds:
                    fields.update({"Variation seed": subseeds[index], "Variation seed strength": p.subseed_strength})
                if resize_from:
                    fields["Seed resize from"] = f"{p.seed_resize_from_w}x{p.seed_resize_from_h}"
                if hires is not None:
                    fields.update(hires.infotext(p))
                if p.tiling:
                    fields["Tiling"] = True
                infotext = self._infotext(p, prompt, negative, model, seed, sampler.name, schedule, clip_skip, fields)
                result.images.append(image)
                result.seeds.append(seed)
                if subseeds:
                    result.subseeds.append(subseeds[index])
                result.infotexts.append(infotext)
                if p.save_images and self.options["samples_save"]:
                    result.paths.append(str(self.saver.save(image, seed, prompt, infotext)))
            if result.interrupted:
                break
        return result

    def _hires_pass(
        self,
        model: LoadedModel,
        p: Txt2ImgParams,
        plan: HiresPlan,
        latents: torch.Tensor,
        generators: list[torch.Generator],
        schedule: str,
        seed: int,
        on_step,
    ) -> torch.Tensor:
        """Upscale the first pass and denoise it again at the hires size (A1111's second, img2img-like pass)."""
        f = model.vae_scale_factor
        if plan.upscaler in LATENT_MODES:
            x0 = upscale_latents(latents, plan.upscaler, plan.size, f)
        else:
            images = upscale_images(decode(model.pipe.vae, latents), plan.upscaler, plan.size)
            x0 = encode_images(model.pipe.vae, images, generators).to(latents.device)
        scheduler = build_scheduler(plan.sampler, schedule, dict(model.pipe.scheduler.config), seed)
        scheduler.set_timesteps(plan.steps, device=model.device)
        run = min(plan.steps, max(1, int(plan.steps * plan.strength)))
        start = (plan.steps - run) * getattr(scheduler, "order", 1)
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(start)
        t0 = scheduler.timesteps[start : start + 1].repeat(x0.shape[0])
        noise = torch.stack([torch.randn(x0.shape[1:], generator=g) for g in generators]).to(x0.device)
        noisy = scheduler.add_noise(x0, noise, t0)
        return sample(
            model.pipe.unet,
            scheduler,
            noisy,
            plan.cond,
            plan.uncond,
            p.cfg_scale,
            run,
            generators,
            on_step,
            start_index=start,
            time_ids=xl_time_ids(model, *plan.size),
        )

    def _infotext(
        self,
        p: Txt2ImgParams,
        prompt: str,
        negative: str,
        model: LoadedModel,
        seed: int,
        sampler: str,
        schedule: str,
        clip_skip: int,
        extra: dict[str, Any],
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
            "Variation seed": extra.pop("Variation seed", None),
            "Variation seed strength": extra.pop("Variation seed strength", None),
            "Seed resize from": extra.pop("Seed resize from", None),
            "Denoising strength": extra.pop("Denoising strength", None),
            "Clip skip": clip_skip if clip_skip > 1 else None,
            "Tiling": extra.pop("Tiling", None),
            "RNG": "CPU",
            **extra,
            "Version": f"sdp-{__version__}",
        }
        return build_infotext(prompt, negative, params)
