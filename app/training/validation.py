"""Validation loss (kohya's `validation_split`): a share of the training images is held out and never trained on;
every N steps (or at each epoch's end) the loss on them is measured the same way every time, so its curve shows
when the trained file starts to fit its images instead of their subject (the training loss keeps falling then, the
validation loss stops falling or rises).

Every measurement uses the same noise, prompts and timesteps (from the validation seed), as kohya does: four
timesteps spread over the trained range (kohya's), each held-out image at each of them. Nothing here draws from the
training run's random numbers, so a run with validation trains exactly as one without it.
"""

from __future__ import annotations

import random
from dataclasses import replace

import torch

from app.training.config import TrainConfig
from app.training.dataset import TrainingImage, prompt_for
from app.training.latents import LatentCache
from app.training.losses import denoising_loss, denoising_target, run_thresholds, timestep_weights
from app.training.precision import MixedPrecision
from app.training.targets import TrainingTarget

VALIDATION_FIELDS = ("step", "epoch", "validation_loss")  # `validation_loss.csv`
MAX_VALIDATION_SEED = 2**32 - 1
VALIDATION_TIMESTEPS = 4  # kohya's: evenly spread over [min_timestep, max_timestep], the ends left out


def hold_out(images: list[TrainingImage], share: float, seed: int) -> list[TrainingImage]:
    """The images with `share` of the training images (not regularization images) marked `is_validation`, chosen
    by `seed`: at least one when `share` > 0, and never all of them. The same (images, share, seed) always holds
    out the same images, so a resumed run validates on the same ones."""
    if not share:
        return images
    train = [i for i, im in enumerate(images) if not im.is_reg]
    count = min(len(train) - 1, max(1, round(len(train) * share)))
    order = torch.randperm(len(train), generator=torch.Generator("cpu").manual_seed(seed)).tolist()
    held = {train[k] for k in order[:count]}
    return [replace(im, is_validation=True) if i in held else im for i, im in enumerate(images)]


def validation_timesteps(first: int, end: int) -> list[int]:
    """kohya's validation timesteps: VALIDATION_TIMESTEPS evenly spaced between `first` and `end`, both left out
    (200, 400, 600, 800 for the whole range)."""
    points = torch.linspace(first, end, VALIDATION_TIMESTEPS + 2)[1:-1]
    return sorted({min(end - 1, max(first, int(p))) for p in points})


def is_validation_step(step: int, every: int, steps_per_epoch: int) -> bool:
    """Whether the run validates after `step`: every `every` steps, or at the end of each epoch when 0."""
    return step % (every or steps_per_epoch) == 0


def validation_loss(
    target: TrainingTarget,
    unet: torch.nn.Module,
    amp: MixedPrecision,
    noise_schedule,
    cfg: TrainConfig,
    images: list[TrainingImage],
    latents: LatentCache,
    weights: list[torch.Tensor],
    templates: list[str],
    clip_skip: int,
    seed: int,
    device: torch.device,
) -> float:
    """The mean loss over the held-out images at the validation timesteps, computed as a training step computes
    it (the run's loss type and per-sample weights, its alpha weight), without gradients, the trained network in
    evaluation mode (no dropout), the noise without the run's offsets (a plain measure of the fit). Each image's
    prompt is its caption through the templates without tag shuffling or dropping, as the validation seed picks it."""
    timesteps = validation_timesteps(int(cfg.min_timestep), int(cfg.max_timestep))
    per_batch = max(1, int(cfg.batch_size))  # the run's batch size: memory it is known to fit in
    total, count = 0.0, 0
    with torch.no_grad(), target.unet_context(training=False):
        for index, image in enumerate(images):
            if not image.is_validation:
                continue
            g = torch.Generator("cpu").manual_seed((seed * 1_000_003 + index) * 1_009 + 7)
            prompt = prompt_for(image, target.prompt_name, templates, random.Random(g.initial_seed()), False, 0.0)
            x0 = latents.get(index, g)
            noise = torch.randn(x0.shape, generator=g)
            for start in range(0, len(timesteps), per_batch):
                t = torch.tensor(timesteps[start : start + per_batch])
                k = len(t)
                x0s, noises = x0.expand(k, *x0.shape).clone(), noise.expand(k, *noise.shape).clone()
                noisy = noise_schedule.add_noise(x0s, noises, t).to(device)
                wanted = denoising_target(noise_schedule, x0s, noises, t).to(device)
                weight = weights[index].expand(k, *weights[index].shape).to(device) if weights else None
                loss = denoising_loss(
                    target,
                    unet,
                    amp,
                    [prompt] * k,
                    noisy,
                    t.to(device),
                    wanted,
                    clip_skip,
                    weight,
                    torch.tensor([image.time_ids()] * k),
                    timestep_weights(noise_schedule, t, cfg),
                    cfg.loss_type,
                    run_thresholds(noise_schedule, t, cfg),
                )
                total += float(loss) * k
                count += k
    return total / max(1, count)
