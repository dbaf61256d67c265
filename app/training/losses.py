"""What a training step's loss is made of: the target the UNet learns (by the model's prediction type), the loss of
one micro-batch (`denoising_loss`), kohya's loss types (`loss_type`: L1, Huber, smooth L1, with a Huber threshold
per timestep), and the per-sample weights by timestep (Min-SNR, debiased estimation).

The weights and thresholds are functions of the noise schedule and the sample's timestep only, so a resumed run
computes the same numbers.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:  # the loss needs only their methods; the modules import much more
    from app.training.config import TrainConfig
    from app.training.precision import MixedPrecision
    from app.training.targets import TrainingTarget

LOSS_TYPES = ("l2", "l1", "huber", "smooth_l1")  # kohya's names; l2 is the MSE every trainer uses by default
HUBER_SCHEDULES = ("snr", "exponential", "constant")  # kohya's; snr is its default
HUBER_LOSSES = ("huber", "smooth_l1")  # the ones that use a threshold

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def denoising_target(noise_schedule, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """What the UNet learns to predict for `x0` noised with `noise` at `t`, by the model's `prediction_type`: the
    noise (SD 1.x, SDXL, SD 2.x 512 px), the velocity sqrt(a)*noise - sqrt(1-a)*x0 (SD 2.x 768 px "v" models), or
    the clean latent. Training a v model on the noise would teach it the wrong thing and still lower a loss."""
    prediction = noise_schedule.config.prediction_type
    if prediction == "epsilon":
        return noise
    if prediction == "v_prediction":
        return noise_schedule.get_velocity(x0, noise, t)
    if prediction == "sample":
        return x0
    raise ValueError(f"unknown prediction_type {prediction!r}")


def _snr(noise_schedule, t: torch.Tensor) -> torch.Tensor:
    """SNR(t) = alpha_bar / (1 - alpha_bar), in float64 (at t = 0 it is in the thousands)."""
    alpha_bar = noise_schedule.alphas_cumprod.to(torch.float64)[t.cpu()]
    return alpha_bar / (1 - alpha_bar)


def min_snr_weights(noise_schedule, t: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR loss weights (Hang et al. 2023, kohya's `min_snr_gamma`), one per sample: the loss at timestep t
    counts min(SNR(t), gamma) / SNR(t) for noise prediction, min(SNR(t), gamma) / (SNR(t) + 1) for velocity
    (whose loss is (SNR + 1) / SNR times the noise loss). Low-noise timesteps, whose easy losses otherwise pull the
    hardest, count less; the rest as before."""
    snr = _snr(noise_schedule, t)
    clipped = snr.clamp(max=gamma)
    prediction = noise_schedule.config.prediction_type
    if prediction == "v_prediction":
        return (clipped / (snr + 1)).float()
    if prediction == "epsilon":
        return (clipped / snr).float()
    return clipped.float()  # "sample": the loss on x0 is the noise loss divided by SNR


def debiased_weights(noise_schedule, t: torch.Tensor) -> torch.Tensor:
    """kohya's `debiased_estimation_loss` (Yu et al. 2023, "Debias the training of diffusion models"), one weight
    per sample: 1/sqrt(SNR(t)) for noise prediction, 1/(SNR(t) + 1) for velocity as kohya weighs it, SNR capped at
    1000 (it is unbounded at t = 0). Nearly clean timesteps, over-weighted by the plain loss, count far less.
    For a model that predicts the clean latent (whose loss is the noise loss / SNR) the same share: sqrt(SNR)."""
    snr = _snr(noise_schedule, t).clamp(max=1000)
    prediction = noise_schedule.config.prediction_type
    if prediction == "v_prediction":
        return (1 / (snr + 1)).float()
    if prediction == "epsilon":
        return (1 / snr.sqrt()).float()
    return snr.sqrt().float()


def timestep_weights(noise_schedule, t: torch.Tensor, cfg: TrainConfig) -> torch.Tensor | None:
    """The run's per-sample weights by timestep: Min-SNR times debiased estimation (kohya's order), or None."""
    weights = min_snr_weights(noise_schedule, t, cfg.min_snr_gamma) if cfg.min_snr_gamma else None
    if cfg.debiased_estimation_loss:
        debiased = debiased_weights(noise_schedule, t)
        weights = debiased if weights is None else weights * debiased
    return weights


def run_thresholds(noise_schedule, t: torch.Tensor, cfg: TrainConfig) -> torch.Tensor | None:
    """The run's Huber threshold per sample, for the Huber kinds of loss; None for the others."""
    if cfg.loss_type not in HUBER_LOSSES:
        return None
    return huber_thresholds(noise_schedule, t, cfg.huber_schedule, cfg.huber_c, cfg.huber_scale)


def huber_thresholds(
    noise_schedule, t: torch.Tensor, schedule: str, huber_c: float, huber_scale: float = 1.0
) -> torch.Tensor:
    """The Huber threshold of each sample by its timestep, as kohya's `huber_schedule` sets it:
    - `snr`: (1 - c) / (1 + sigma)^2 + c with sigma = sqrt((1 - alpha_bar) / alpha_bar): about 1 (nearly the MSE)
      for nearly clean samples, down to c for the noisiest, where outliers in the data pull hardest;
    - `exponential`: scale * exp(ln(c) * t / T): scale at t = 0, c * scale at the last timestep;
    - `constant`: c * scale for every sample.
    kohya's `huber_scale` does not enter the snr schedule, and neither does it here."""
    if schedule == "constant":
        return torch.full((t.shape[0],), huber_c * huber_scale, dtype=torch.float32)
    if schedule == "exponential":
        total = noise_schedule.config.num_train_timesteps
        return (torch.exp(math.log(huber_c) * t.cpu().to(torch.float64) / total) * huber_scale).float()
    if schedule == "snr":
        sigma = _snr(noise_schedule, t).rsqrt()  # sqrt((1 - alpha_bar) / alpha_bar)
        return ((1 - huber_c) / (1 + sigma) ** 2 + huber_c).float()
    raise ValueError(f"unknown Huber schedule {schedule!r}")


def elementwise_loss(
    pred: torch.Tensor, wanted: torch.Tensor, loss_type: str, thresholds: torch.Tensor | None = None
) -> torch.Tensor:
    """Each element's loss (in the inputs' dtype; pass fp32), as kohya's `conditional_loss` computes it:
    - `l2`: (pred - wanted)^2; `l1`: |pred - wanted|;
    - `huber` (pseudo-Huber): 2c(sqrt(d^2 + c^2) - c), about d^2 where |d| << c and 2c|d| where |d| >> c;
    - `smooth_l1`: 2(sqrt(d^2 + c^2) - c), about d^2/c for small errors and 2|d| for large ones;
    with c the sample's threshold (`huber_thresholds`), one per sample."""
    if loss_type == "l2":
        return F.mse_loss(pred, wanted, reduction="none")
    if loss_type == "l1":
        return F.l1_loss(pred, wanted, reduction="none")
    if loss_type in HUBER_LOSSES:
        if thresholds is None:
            raise ValueError(f"the {loss_type} loss needs a threshold per sample")
        c = thresholds.to(pred.device, pred.dtype).view(-1, *([1] * (pred.dim() - 1)))
        smooth = torch.sqrt((pred - wanted) ** 2 + c**2) - c
        return 2 * c * smooth if loss_type == "huber" else 2 * smooth
    raise ValueError(f"unknown loss type {loss_type!r}")


def denoising_loss(
    target: TrainingTarget,
    unet: torch.nn.Module,
    amp: MixedPrecision,
    texts: list[str],
    noisy: torch.Tensor,
    t: torch.Tensor,
    wanted: torch.Tensor,
    clip_skip: int,
    weight: torch.Tensor | None = None,
    time_ids: torch.Tensor | None = None,
    sample_weights: torch.Tensor | None = None,
    loss_type: str = "l2",
    thresholds: torch.Tensor | None = None,
) -> torch.Tensor:
    """One micro-batch's loss: the conditioning and the UNet under autocast, the loss in fp32. Call it inside
    `target.unet_context()`, and backward too: checkpointed layers run their forward again during backward.

    SDXL models also get the pooled prompt embedding and each sample's size conditioning (`time_ids`, one row of
    six numbers per sample: original size, crop top-left, target size), as SDXL itself was trained.
    `weight`: per element (the alpha channel); `sample_weights`: per sample (Min-SNR, debiased estimation, prior
    loss weight); `loss_type`: the MSE (`l2`) or another of `losses.LOSS_TYPES`, with a Huber threshold per sample
    (`thresholds`) for the Huber kinds."""
    unet_dtype = amp.model_dtype
    with amp.autocast():
        cond, pooled = target.conditioning(texts, clip_skip)
        added = None
        if pooled is not None:
            if time_ids is None:
                height, width = noisy.shape[-2] * 8, noisy.shape[-1] * 8
                time_ids = torch.tensor([[height, width, 0, 0, height, width]] * noisy.shape[0], dtype=torch.float32)
            added = {"text_embeds": pooled.to(unet_dtype), "time_ids": time_ids.to(noisy.device, unet_dtype)}
        pred = unet(noisy.to(unet_dtype), t, encoder_hidden_states=cond.to(unet_dtype), added_cond_kwargs=added).sample
    if weight is None and sample_weights is None and loss_type == "l2":
        return F.mse_loss(pred.float(), wanted.float())
    errors = elementwise_loss(pred.float(), wanted.float(), loss_type, thresholds)
    if weight is not None:
        errors = errors * weight
    if sample_weights is None:
        return errors.mean()
    return (errors.mean(dim=tuple(range(1, errors.dim()))) * sample_weights.to(errors.device)).mean()
