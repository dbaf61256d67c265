"""The training loop, shared by every target. Read top to bottom: data, optimizer, schedule, steps, saving.

Determinism: the data order, noise and timesteps of step s depend only on (seed, s), and the optimizer state is
saved with every checkpoint, so N steps in one go equal N/2 + interrupt + N/2 bit for bit on the CPU.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from PIL import Image

from app.errors import UserError
from app.fileio import atomic_write_text
from app.jobs import Job
from app.models.manager import LoadedModel
from app.models.out_of_memory import OutOfMemoryError, guarded, is_out_of_memory, smaller_advice
from app.training.buckets import BucketSchedule
from app.training.checkpoint import commit_optim, fit_param_groups, load_optim, pending_path, save_optim
from app.training.config import OWN_RATES, TrainConfig
from app.training.csv_log import CsvLog
from app.training.dataset import TrainingImage, epoch_items, prompt_for
from app.training.latents import LatentCache
from app.training.losses import PREDICTION_TYPES, denoising_loss, denoising_target, run_thresholds, timestep_weights
from app.training.lr_schedule import LearnRateSchedule, rate_factor
from app.training.optimizers import DEFAULT_OPTIMIZER, make_optimizer, optimizer_name
from app.training.precision import MAX_SKIPPED_IN_A_ROW, MixedPrecision, training_memory
from app.training.targets import TrainingTarget
from app.training.validation import VALIDATION_FIELDS, is_validation_step, validation_loss

log = logging.getLogger(__name__)

SAVE_REMEDY = "free some space or fix the folder's permissions"
# (prompt, step) -> [(image, infotext)]: the step's preview, or one per sample prompt
PreviewFn = Callable[[str, int], list[tuple[Image.Image, str]]]


class NonFiniteLoss(UserError):
    pass


class SaveFailed(UserError):
    """A file of the run could not be written: a full disk, a permission, a read-only folder."""


@contextmanager
def writing(what: str, folder: Path) -> Iterator[None]:
    """Turn an OSError while writing `what` into a SaveFailed that names the folder and the cause."""
    try:
        yield
    except OSError as e:
        where = Path(e.filename).parent if isinstance(e.filename, str) and e.filename else folder
        raise SaveFailed(f"could not write the {what} in {where}: {e.strerror or e}") from e


@dataclass
class TrainResult:
    name: str
    path: Path
    step: int
    log_dir: Path
    interrupted: bool = False
    error: str | None = None
    skipped_steps: int = 0  # fp16 steps whose gradients overflowed (no update; the loss scale was halved)
    step_seconds: list[float] = field(default_factory=list)  # wall time of each step, checkpoints/previews excluded
    losses: list[tuple[int, float]] = field(default_factory=list)
    validation_losses: list[tuple[int, float]] = field(default_factory=list)  # (step, loss on held-out images)
    checkpointing_from: int | None = None  # `auto` turned gradient checkpointing on at this step (out of memory)
    checkpointing: str = ""  # how the run ended up: "on", "off", or "on from step N"


def checkpointing_note(step: int) -> str:
    return f"Gradient checkpointing was turned on at step {step}: that step ran out of memory without it."


def step_generator(seed: int, step: int, sample: int) -> torch.Generator:
    """The RNG of one sample of one step: the same (seed, step, sample) always draws the same numbers."""
    return torch.Generator("cpu").manual_seed((seed * 1_000_003 + step) * 1_009 + sample)


def seed_forward(seed: int, device: torch.device) -> None:
    """Seed the global generators a forward pass on `device` draws from. Not `torch.manual_seed`: on a machine
    without CUDA that also queues lazy seeds for CUDA, XPU and MTIA, each recording a stack trace, every step."""
    torch.random.default_generator.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.manual_seed_all(seed)


def all_finite(tensors: Iterable[torch.Tensor]) -> bool:
    """Whether every element of every tensor is finite: one device sync for all of them, not one per tensor (a
    LoRA has 256 tensors on SD 1.x, each `bool()` a GPU round trip). The largest |value| of each tensor comes from
    one fused kernel per dtype (`_foreach_norm`, ord inf; NaN propagates through it), not four ops per tensor as
    `isfinite` is: 1.5-4x less time on the CPU (docs/benchmarks.md), a handful of launches instead of 1000 on CUDA."""
    tensors = [t for t in tensors if t.numel()]  # the inf-norm of an empty tensor is undefined; it holds no NaN
    if not tensors:
        return True
    with torch.no_grad():  # the trained weights require grad; a check needs no graph
        largest = torch._foreach_norm(tensors, float("inf"))
        return bool(torch.stack(largest).isfinite().all())


def sample_indices(items: list[int], seed: int, step: int, per_step: int) -> list[tuple[int, int]]:
    """(image index, epoch) of each sample of `step`: a fresh seeded shuffle of an epoch's `items` (image indices;
    an image with repeats is there that many times) per epoch, read as one stream."""
    picks = []
    for position in range(step * per_step, (step + 1) * per_step):
        epoch, offset = divmod(position, len(items))
        order = torch.randperm(len(items), generator=torch.Generator("cpu").manual_seed(seed * 100_003 + epoch))
        picks.append((items[int(order[offset])], epoch))
    return picks


LOSS_FIELDS = ("step", "epoch", "epoch_step", "loss", "learn_rate")  # A1111's `<kind>_loss.csv`


def pyramid_noise(noise: torch.Tensor, g: torch.Generator, iterations: int, discount: float) -> torch.Tensor:
    """kohya's multi-resolution ("pyramid") noise for one sample's [C, H, W] noise: level i adds white noise drawn
    at 1/r^i of the size (r random in [2, 4)), upsampled bilinearly and weighted discount^i, then the sum is scaled
    back to unit variance. Low frequencies get noise too, which plain noise barely touches, so the model learns to
    change overall brightness and colour. Unlike kohya, which scales by the whole batch's deviation, each sample is
    scaled by its own, so a sample's noise never depends on which others share its batch (resume stays exact)."""
    channels, height, width = noise.shape
    total = noise.clone()
    for i in range(iterations):
        r = float(torch.rand(1, generator=g)) * 2 + 2
        coarse_h, coarse_w = max(1, int(height / r**i)), max(1, int(width / r**i))
        coarse = torch.randn((1, channels, coarse_h, coarse_w), generator=g)
        total += F.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)[0] * discount**i
        if coarse_h == 1 or coarse_w == 1:
            break  # the coarsest level is one value per channel
    return total / total.std()


def train(
    target: TrainingTarget,
    model: LoadedModel,
    cfg: TrainConfig,
    images: list[TrainingImage],
    templates: list[str],
    log_dir: Path,
    clip_skip: int,
    job: Job | None = None,
    preview: PreviewFn | None = None,
    can_recover: bool = False,
) -> TrainResult:
    """Train `target` on `images`; memory plan (VAE parked, checkpointing) held for the whole run. `can_recover`:
    running out of memory is an error this run sees, so `auto` checkpointing may start off (precision.Checkpointing)."""
    with training_memory(
        model.pipe.vae,
        model.device,
        model.pipe.unet,
        cfg.gradient_checkpointing,
        target.random_forward,
        can_recover,
    ) as memory:
        return _train(target, model, cfg, images, templates, log_dir, clip_skip, job, preview, memory)


def _train(target, model, cfg, images, templates, log_dir, clip_skip, job, preview, memory) -> TrainResult:
    # -- schedule, seed, precision, optimizer ------------------------------------------------------------------
    schedule = LearnRateSchedule(cfg.learn_rate, cfg.steps)
    clip_values = (
        LearnRateSchedule(cfg.clip_grad_value, cfg.steps, "Gradient clipping value")
        if (cfg.clip_grad_mode != "disabled")
        else None
    )
    text_encoder_schedule, embedding_schedule = (
        LearnRateSchedule(getattr(cfg, key), cfg.steps, label) if str(getattr(cfg, key)).strip() else schedule
        for key, label in OWN_RATES
    )
    end_step, step = schedule.end_step, target.initial_step
    noise_schedule = DDPMScheduler.from_config(model.pipe.scheduler.config)
    if (prediction := noise_schedule.config.prediction_type) not in PREDICTION_TYPES:
        raise UserError(
            f"This model's scheduler predicts {prediction!r}; training knows {', '.join(PREDICTION_TYPES)}. "
            "Fix prediction_type in its scheduler config (or the .yaml beside a single file)."
        )
    # kohya's min_timestep/max_timestep: timesteps are drawn from [first_t, end_t); the defaults draw the same numbers
    # as before the option existed
    first_t, end_t = int(cfg.min_timestep), int(cfg.max_timestep)
    if end_t > noise_schedule.config.num_train_timesteps:
        raise UserError(
            f"Max timestep {end_t} is beyond this model's {noise_schedule.config.num_train_timesteps} timesteps.",
            "max_timestep",
        )
    if step >= end_step:
        raise UserError(
            f"'{target.name}' is already at step {step}; max steps is {end_step}. Raise max steps to train further."
        )
    device, unet = model.device, model.pipe.unet
    amp = MixedPrecision(device, unet.dtype, float(cfg.extra.get("initial_loss_scale", 2.0**16)))
    params = target.parameters()
    # a LoRA's text encoder layers, then a bundled embedding's vectors (the end of the list) are groups of their own:
    # each may have its own rate
    embedding_start = len(params) - target.embedding_parameters
    text_encoder_start = embedding_start - target.text_encoder_parameters
    pieces = [
        (params[:text_encoder_start], schedule),
        (params[text_encoder_start:embedding_start], text_encoder_schedule),
        (params[embedding_start:], embedding_schedule),
    ]
    groups = [g for g, _ in pieces if g]
    rates = [rate for g, rate in pieces if g]
    optimizer_type = optimizer_name(cfg.optimizer_type)
    optimizer = make_optimizer(
        optimizer_type,
        [{"params": g} for g in groups],
        schedule.rate_at(step),
        target.weight_decay,
        cfg.optimizer_args,
    )
    stored = load_optim(target.optim_path, target.digest(), target.kind)
    seed = cfg.seed if cfg.seed is not None else 0
    if stored is not None:
        stored_type = stored.get("optimizer_type", DEFAULT_OPTIMIZER)  # files from before the choice: AdamW
        if stored_type == optimizer_type:
            optimizer.load_state_dict(fit_param_groups(stored["optimizer_state_dict"], [len(g) for g in groups]))
        else:  # another optimizer's moments mean nothing to this one: it starts afresh, the weights carry on
            log.warning(
                "%s '%s' was trained with %s; continuing with %s, whose state starts afresh",
                target.kind,
                target.name,
                stored_type,
                optimizer_type,
            )
        amp.load_state_dict(stored.get("scaler_state_dict"))
        target.restore(stored)
        seed = int(stored.get("seed", seed)) if cfg.seed is None else seed
        log.info("Resuming %s '%s' at step %d with its optimizer state", target.kind, target.name, step)

    # -- data: latents once (kept in CPU memory), prompts per image --------------------------------------------
    with memory.vae_needed():
        latents = LatentCache(model.pipe.vae, [im.image for im in images], cfg.latent_sampling_method, seed, device)
    weights = [latents.loss_weight(im.alpha, i) for i, im in enumerate(images)] if cfg.use_weight else []
    per_step = cfg.batch_size * cfg.gradient_step
    items = epoch_items(images)  # kohya's repeats, and as many regularization samples as training ones
    steps_per_epoch = max(1, len(items) // per_step)
    # a regularization sample's loss counts prior_loss_weight; without any (or at 1) the loss is the plain mean
    prior_weight = float(cfg.prior_loss_weight)
    weigh_prior = prior_weight != 1.0 and any(im.is_reg for im in images)
    if cfg.enable_bucket:  # batches of one bucket (aspect ratio) each: the images have several sizes
        buckets = BucketSchedule([images[i].image.size for i in items], cfg.batch_size, seed, cfg.gradient_step)
        steps_per_epoch = buckets.steps_per_epoch

        def batches_of(step: int) -> list[list[tuple[int, int]]]:
            return [[(items[j], epoch) for j, epoch in micro] for micro in buckets.micro_batches(step)]

    else:

        def batches_of(step: int) -> list[list[tuple[int, int]]]:
            picks = sample_indices(items, seed, step, per_step)
            return [picks[m * cfg.batch_size : (m + 1) * cfg.batch_size] for m in range(cfg.gradient_step)]

    # -- logging (a folder that cannot be written stops here, before any step, with nothing changed) -----------
    try:
        with writing("log folder", log_dir):
            (log_dir / "images").mkdir(parents=True, exist_ok=True)
            (log_dir / f"{target.kind}s").mkdir(parents=True, exist_ok=True)
            atomic_write_text(
                log_dir / "settings.json",
                json.dumps(
                    {
                        **cfg.as_dict(),
                        "seed": seed,
                        "start_step": step,
                        "model": model.info.title,
                        "images": sum(not im.is_reg and not im.is_validation for im in images),
                        "regularization_images": sum(im.is_reg for im in images),
                        "validation_images": sum(im.is_validation for im in images),
                    },
                    indent=2,
                    default=str,
                ),
            )
            loss_name = f"{'textual_inversion' if target.kind == 'embedding' else target.kind}_loss.csv"
            loss_log = CsvLog(log_dir / loss_name, LOSS_FIELDS, step)
            validation_log = (
                CsvLog(log_dir / "validation_loss.csv", VALIDATION_FIELDS, step)
                if any(im.is_validation for im in images)
                else None
            )
    except SaveFailed as e:
        raise SaveFailed(f"Training did not start: {e}. Nothing was changed; {SAVE_REMEDY}.") from None
    validation_seed = int(cfg.validation_seed) if cfg.validation_seed is not None else seed
    recent: deque[float] = deque(maxlen=max(1, 3 * len(images)))
    result = TrainResult(target.name, target.path, step, log_dir)
    started, start_step = time.time(), step

    saved_step = step  # the step of the trained file on disk

    def checkpoint(at: int, copy: bool) -> None:
        # The optimizer state waits as `.optim.next` until the trained file is written, then replaces `.optim`:
        # at any kill, one of the two belongs to the file on disk (checkpoint.py), so resume stays exact.
        nonlocal saved_step
        copy_to = log_dir / f"{target.kind}s" / f"{target.name}-{at}{target.copy_suffix}" if copy else None
        written = False
        try:
            with writing(f"{target.kind} checkpoint", target.path.parent):
                pending = pending_path(target.optim_path)
                extra = {"optimizer_type": optimizer_type, **target.resume_state()}
                save_optim(pending, optimizer, at, seed, target.digest(), target.kind, amp.state_dict(), extra)
                target.save(at, model, copy_to)  # the trained file, then its log copy
                written = True
                commit_optim(target.optim_path)
        except SaveFailed as e:
            failed_in = Path(str(getattr(e.__cause__, "filename", "") or "")).parent
            if written or (copy_to is not None and failed_in == copy_to.parent):
                saved_step = at  # the trained file itself was written
            raise
        saved_step = at

    write_failed = False

    def save_failed(e: SaveFailed) -> None:
        """End the run because a file could not be written; what is on disk stays as it was."""
        nonlocal write_failed
        write_failed = True
        result.error = (
            f"Training stopped at step {result.step}: {e}. The last good {target.kind} is kept "
            f"({target.path.name}, step {saved_step}); {SAVE_REMEDY} and train again to continue from there."
        )
        log.error(result.error)

    def stop(reason: str, remedy: str = "or --no-half") -> None:
        """End the run with a message; the trained file on disk stays the last good one."""
        result.error = (
            f"Training stopped at step {step + 1}: {reason}. The last good {target.kind} is kept "
            f"({target.path.name}, step {result.step}). Try a lower learning rate, gradient clipping, {remedy}."
        )
        log.error(result.error)

    def out_of_memory(where: str, done: int, first: str = "a smaller batch size or training size") -> None:
        """End the run because `where` ran out of memory; the steps done so far are saved on the way out."""
        afresh = " (its optimizer state starts afresh)" if optimizer_broken else ""
        kept = (
            f"The {target.kind} is saved at step {done}: train again to continue from there{afresh}."
            if done > target.initial_step
            else f"Nothing was changed ({target.path.name} is still at step {done})."
        )
        checkpointing = "" if memory.checkpointing.on else "gradient checkpointing on, "
        result.error = (
            f"Training stopped: out of memory in {where}. {kept} "
            f"Try {first}, {checkpointing}or {smaller_advice(device, training=True)}."
        )
        log.error(result.error)

    # -- the loop ----------------------------------------------------------------------------------------------
    optimizer_broken = False
    skipped_in_row = 0
    update_note = ""  # what the target says after an update (a LoRA's max-norm figures), for the progress text
    while step < end_step:
        step_started = time.perf_counter()
        factor = rate_factor(
            cfg.lr_scheduler, step, end_step, int(cfg.lr_warmup_steps), int(cfg.lr_scheduler_num_cycles)
        )
        for group, group_schedule in zip(optimizer.param_groups, rates, strict=True):
            group["lr"] = group_schedule.rate_at(step) * factor
        rate = optimizer.param_groups[0]["lr"]
        optimizer.zero_grad(set_to_none=True)
        picks = batches_of(step)  # (image index, epoch) of each sample, one list per micro-batch

        def micro_batches(step: int = step, picks: list = picks) -> tuple[float, str]:
            # A function of its own, so that when memory runs out its frame (the activations, the graph behind the
            # loss) is dropped with the error before the memory is released (out_of_memory.guarded).
            step_loss, first_prompt, first = 0.0, "", 0
            for micro_picks in picks:
                # sample k of the step draws from its own generator, k counted across the micro-batches
                gens = [step_generator(seed, step, k) for k in range(first, first + len(micro_picks))]
                first += len(micro_picks)
                chosen = [index for index, _ in micro_picks]
                texts = [
                    prompt_for(
                        images[index],
                        target.prompt_name,
                        templates,
                        random.Random(g.initial_seed()),
                        cfg.shuffle_tags,
                        cfg.tag_drop_out,
                        cfg.keep_tokens,
                        cfg.caption_dropout_rate,
                    )
                    for index, g in zip(chosen, gens, strict=True)
                ]
                first_prompt = first_prompt or texts[0]
                x0 = torch.stack([latents.get(index, g) for index, g in zip(chosen, gens, strict=True)])
                noise = torch.stack([torch.randn(x0.shape[1:], generator=g) for g in gens])
                t = torch.tensor([int(torch.randint(first_t, end_t, (1,), generator=g)) for g in gens])
                if cfg.noise_offset:  # one offset per channel and sample: drawn last, so 0 changes no other number
                    channels = (x0.shape[1], 1, 1)
                    noise = noise + cfg.noise_offset * torch.stack([torch.randn(channels, generator=g) for g in gens])
                if cfg.multires_noise_iterations:  # kohya's order: after the offset, drawn after it
                    levels, discount = int(cfg.multires_noise_iterations), float(cfg.multires_noise_discount)
                    pairs = zip(noise, gens, strict=True)
                    noise = torch.stack([pyramid_noise(n, g, levels, discount) for n, g in pairs])
                noise_in = noise
                if cfg.ip_noise_gamma:  # input perturbation: the UNet sees noise + gamma * more noise, learns `noise`
                    extra = torch.stack([torch.randn(x0.shape[1:], generator=g) for g in gens])
                    noise_in = noise + float(cfg.ip_noise_gamma) * extra
                per_sample = timestep_weights(noise_schedule, t, cfg)  # Min-SNR, debiased estimation
                if weigh_prior:
                    prior = torch.tensor([prior_weight if images[i].is_reg else 1.0 for i in chosen])
                    per_sample = prior if per_sample is None else per_sample * prior
                noisy = noise_schedule.add_noise(x0, noise_in, t).to(device)
                wanted = denoising_target(noise_schedule, x0, noise, t).to(device)
                weight = torch.stack([weights[index] for index in chosen]).to(device) if cfg.use_weight else None
                time_ids = torch.tensor([images[index].time_ids() for index in chosen])
                # Dropout (hypernetworks) draws from the global RNG: seed it per micro-batch so resume is exact.
                with torch.random.fork_rng(devices=[]), target.unet_context():
                    seed_forward(gens[0].initial_seed(), device)
                    loss = denoising_loss(
                        target,
                        unet,
                        amp,
                        texts,
                        noisy,
                        t.to(device),
                        wanted,
                        clip_skip,
                        weight,
                        time_ids,
                        per_sample,
                        cfg.loss_type,
                        run_thresholds(noise_schedule, t, cfg),
                    )
                    amp.backward(loss / cfg.gradient_step)
                step_loss += loss.item() / cfg.gradient_step
            return step_loss, first_prompt

        try:
            step_loss, first_prompt = guarded(device, micro_batches)
        except OutOfMemoryError as e:
            optimizer.zero_grad(set_to_none=True)
            if memory.checkpointing.can_turn_on:  # `auto`: the same step again, with checkpointing
                memory.checkpointing.turn_on(step + 1)
                if job is not None:
                    job.progress.extra["gradient_checkpointing"] = checkpointing_note(step + 1)
                continue
            out_of_memory(f"training step {step + 1} ({e.detail})", step)
            break

        amp.unscale(optimizer)
        grads_finite = all_finite(p.grad for p in params if p.grad is not None)
        if not math.isfinite(step_loss) or (not grads_finite and amp.scaler is None):
            what = "loss" if not math.isfinite(step_loss) else "gradient"
            stop(f"the {what} became {step_loss if what == 'loss' else 'NaN/inf'}")
            break
        if grads_finite:
            skipped_in_row = 0
            try:
                updated = guarded(device, lambda at=step: _update(optimizer, params, amp, cfg, clip_values, at))
            except OutOfMemoryError as e:
                optimizer_broken = True  # its moments may be half-made; the tensors are as before the step
                out_of_memory(f"the optimizer update of step {step + 1} ({e.detail})", step)
                break
            if not updated:
                optimizer_broken = True
                stop(f"the update made the {target.kind} NaN or infinite")
                break
            update_note = target.after_update()
        else:
            # fp16 gradients overflowed at this loss scale: no update, the scaler halves the scale. The step still
            # counts (its data is used up), so a resumed run stays on the same sequence.
            amp.update()
            skipped_in_row += 1
            result.skipped_steps += 1
            if skipped_in_row >= MAX_SKIPPED_IN_A_ROW:
                stop(
                    f"the fp16 gradients overflowed on {skipped_in_row} steps in a row (loss scale now "
                    f"{amp.scale:g}), so nothing was learned",
                    "--bf16 or --no-half",
                )
                break
            log.warning("Step %d skipped: fp16 gradients overflowed; loss scale now %g", step + 1, amp.scale)
        step += 1
        result.step = step

        # -- bookkeeping: loss, progress, checkpoints, previews --------------------------------------------
        result.step_seconds.append(time.perf_counter() - step_started)
        recent.append(step_loss)
        mean_loss = sum(recent) / len(recent)
        result.losses.append((step, step_loss))
        epoch, epoch_step = divmod(step - 1, steps_per_epoch)
        try:
            with writing("loss log", log_dir):
                loss_log.append([step, epoch, epoch_step + 1, f"{step_loss:.7f}", rate])
        except SaveFailed as e:
            save_failed(e)
            break
        if job is not None:
            elapsed = time.time() - started
            p = job.progress
            p.sampling_step, p.sampling_steps = step - start_step, end_step - start_step
            p.text = (
                f"Training {target.kind} '{target.name}' step {step}/{end_step} [Epoch {epoch}: "
                f"{epoch_step + 1}/{steps_per_epoch}] loss: {mean_loss:.7f} "
                f"{elapsed / max(1, step - start_step):.3f} s/it" + (f", {update_note}" if update_note else "")
            )
            p.history.append((step, mean_loss))
        if validation_log is not None and is_validation_step(step, cfg.validate_every_n_steps, steps_per_epoch):
            try:
                measured = guarded(
                    device,
                    lambda: validation_loss(
                        target,
                        unet,
                        amp,
                        noise_schedule,
                        cfg,
                        images,
                        latents,
                        weights,
                        templates,
                        clip_skip,
                        validation_seed,
                        device,
                    ),
                )
                with writing("validation log", log_dir):
                    validation_log.append([step, epoch, f"{measured:.7f}"])
            except OutOfMemoryError as e:
                out_of_memory(f"the validation loss after step {step} ({e.detail})", step)
                break
            except SaveFailed as e:
                save_failed(e)
                break
            result.validation_losses.append((step, measured))
            if job is not None:
                job.progress.extra.setdefault("validation_history", []).append((step, measured))
                job.progress.text += f", validation loss: {measured:.7f}"
        previewed = preview is not None and cfg.create_image_every and step % cfg.create_image_every == 0
        try:
            if cfg.save_every and step % cfg.save_every == 0:
                checkpoint(step, copy=True)
            if previewed:
                with memory.vae_needed():
                    previews = preview(first_prompt, step)
                # A1111's name; more sample prompts: -2, -3, ...
                paths = [
                    log_dir / "images" / f"{target.name}-{step}{f'-{i + 1}' if i else ''}.png"
                    for i in range(len(previews))
                ]
                for (shown, infotext), shown_path in zip(previews, paths, strict=True):
                    with writing("preview image", shown_path.parent):
                        target.save_preview(
                            shown_path, shown, step, infotext, cfg.save_image_with_stored_embedding, model
                        )
                image, path = previews[0][0], paths[0]
        except SaveFailed as e:
            save_failed(e)
            break
        except OutOfMemoryError as e:  # the preview's generation (txt2img.run_on_model) ran out
            out_of_memory(f"the preview image after step {step} ({e.detail})", step, "a smaller preview size")
            break
        if previewed and job is not None:
            job.progress.preview = lambda image=image: image
            job.progress.previews = lambda shown=previews: [(img, text.split("\n", 1)[0]) for img, text in shown]
            job.progress.preview_id += 1
            job.progress.extra["last_preview_path"] = str(path)
        if job is not None and job.interrupted:
            result.interrupted = True
            break

    ckpt = memory.checkpointing
    result.checkpointing_from = ckpt.turned_on_at
    result.checkpointing = f"on from step {ckpt.turned_on_at}" if ckpt.turned_on_at else "on" if ckpt.on else "off"
    if write_failed:
        return result  # the disk or folder that failed would fail again; what is there is the last good state
    try:
        if optimizer_broken:
            # The moments may be half-updated: keep the good tensors; the old .optim no longer matches them, so a
            # resume starts a fresh optimizer (with a warning) instead of using a broken one.
            if result.step > target.initial_step:
                with writing(target.kind, target.path.parent):
                    target.save(result.step, model)
        elif result.error is None or result.step > target.initial_step:
            checkpoint(result.step, copy=False)
    except SaveFailed as e:
        save_failed(e)
    return result


def _update(optimizer, params, amp: MixedPrecision, cfg: TrainConfig, clip_values, step: int) -> bool:
    """Clip, step, and check the result; on a non-finite result the tensors are put back and False returned."""
    if clip_values is not None:
        limit = clip_values.rate_at(step)
        if cfg.clip_grad_mode == "value":
            torch.nn.utils.clip_grad_value_(params, limit)
        else:
            torch.nn.utils.clip_grad_norm_(params, limit)
    good = [p.detach().clone() for p in params]
    try:
        amp.step(optimizer)
        amp.update()
        if all_finite(params):
            return True
        failure = None
    except RuntimeError as e:  # e.g. an absurd learning rate overflowing the update, or memory running out
        failure = e
    with torch.no_grad():
        for p, g in zip(params, good, strict=True):
            p.copy_(g)
    if failure is not None:
        if is_out_of_memory(failure):
            raise failure  # the caller's guard reports it as that, not as a broken update
        log.error("Optimizer step failed: %s", failure)
    return False
