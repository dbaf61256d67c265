"""The sampling loop: classifier-free guidance over a diffusers scheduler, with per-step prompt schedules.

We run the loop ourselves rather than calling the pipeline so that prompt editing can change the conditioning
between steps, interrupt and live preview happen between steps, and cond/uncond of different lengths work
(A1111 runs them as separate UNet passes then).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch

from app.prompts.encoder import PromptEncoder
from app.prompts.schedules import prompt_schedule, text_at_step


class ScheduledConditioning:
    """A prompt's conditioning at each sampling step; each distinct text is encoded once."""

    def __init__(self, encoder: PromptEncoder, prompt: str, steps: int, clip_skip: int):
        self.encoder = encoder
        self.schedule = prompt_schedule(prompt, steps)
        self.clip_skip = clip_skip
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def texts(self) -> list[str]:
        return [entry.text for entry in self.schedule]

    def embeddings_used(self) -> list:
        """Every embedding any step's text uses, in order of first use."""
        seen: dict[str, object] = {}
        for text in self.texts():
            for chunk in self.encoder.chunks(text)[0]:
                for fix in chunk.fixes:
                    seen.setdefault(fix.embedding.name, fix.embedding)
        return list(seen.values())

    def at(self, step_index: int) -> torch.Tensor:
        return self._encoded(step_index)[0]

    def pooled_at(self, step_index: int) -> torch.Tensor | None:
        """SDXL's pooled text embedding for the step (None for models without one)."""
        return self._encoded(step_index)[1]

    def _encoded(self, step_index: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        text = text_at_step(self.schedule, step_index)
        if text not in self._cache:
            self._cache[text] = self.encoder.encode_with_pooled([text], self.clip_skip)
        return self._cache[text]


StepCallback = Callable[[int, int, torch.Tensor], None]


def _accepts(fn, name: str) -> bool:
    return name in inspect.signature(fn).parameters


@torch.no_grad()
def sample(
    unet: torch.nn.Module,
    scheduler,
    latents: torch.Tensor,
    cond: ScheduledConditioning,
    uncond: ScheduledConditioning,
    cfg_scale: float,
    steps: int,
    generators: list[torch.Generator] | None = None,
    on_step: StepCallback | None = None,
    start_index: int = 0,
    time_ids: torch.Tensor | None = None,
    before_step: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Denoise `latents` (fp32; scaled by the init sigma, or noised to the start timestep); returns the result.

    `steps` is how many steps run (the prompt schedule spans them). `start_index` skips the first timesteps, as
    img2img and the hires pass do. `time_ids` (SDXL: original size, crop, target size) switches on SDXL's extra
    conditioning with the pooled text embeddings. `on_step(step, total, latents)` runs after every scheduler step
    and may raise to stop (interrupt). `before_step(step_index)` runs before each model call (a LoRA that applies
    in a step range switches there).
    """
    batch = latents.shape[0]
    dtype = next(unet.parameters()).dtype
    step_kwargs = {"generator": generators} if generators and _accepts(scheduler.step, "generator") else {}
    timesteps = scheduler.timesteps[start_index:]
    if start_index and hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(start_index)
    # Second-order samplers (Heun, DPM2) take about two model calls per step: map calls back onto steps.
    per_step = len(timesteps) / steps

    contexts: dict[tuple[int, int], tuple] = {}

    def extra(pooled: torch.Tensor | None, n: int) -> dict:
        if time_ids is None:
            return {}
        return {
            "added_cond_kwargs": {
                "text_embeds": pooled.to(dtype).expand(n, -1),
                "time_ids": time_ids.to(device=latents.device, dtype=dtype).expand(n, -1),
            }
        }

    def context_for(step_index: int) -> tuple:
        """(cond, uncond, both, their extra kwargs) for a step, built once per distinct pair so the same tensors
        recur across steps (attention processors may then reuse work done on them)."""
        c_raw, u_raw = cond.at(step_index), uncond.at(step_index)
        key = (id(c_raw), id(u_raw))
        if key not in contexts:
            c = c_raw.to(dtype).expand(batch, -1, -1)
            u = u_raw.to(dtype).expand(batch, -1, -1)
            pc, pu = cond.pooled_at(step_index), uncond.pooled_at(step_index)
            both = torch.cat([u, c]) if c.shape[1] == u.shape[1] else None
            both_extra = (
                extra(torch.cat([pu.expand(batch, -1), pc.expand(batch, -1)]), 2 * batch)
                if (time_ids is not None)
                else {}
            )
            contexts[key] = (c, u, both, extra(pc, batch), extra(pu, batch), both_extra)
        return contexts[key]

    for i, t in enumerate(timesteps):
        step_index = min(steps - 1, int(i / per_step))
        if before_step is not None:
            before_step(step_index)
        model_in = scheduler.scale_model_input(latents, t).to(dtype)
        c, u, both_context, c_extra, u_extra, both_extra = context_for(step_index)
        if cfg_scale == 1.0:
            noise = unet(model_in, t, encoder_hidden_states=c, **c_extra).sample.float()
        else:
            if both_context is not None:
                both = unet(torch.cat([model_in, model_in]), t, encoder_hidden_states=both_context, **both_extra).sample
                noise_u, noise_c = both.float().chunk(2)
            else:
                noise_u = unet(model_in, t, encoder_hidden_states=u, **u_extra).sample.float()
                noise_c = unet(model_in, t, encoder_hidden_states=c, **c_extra).sample.float()
            noise = noise_u + cfg_scale * (noise_c - noise_u)
        latents = scheduler.step(noise, t, latents, **step_kwargs).prev_sample
        if on_step is not None:
            on_step(min(steps, round((i + 1) / per_step)), steps, latents)
    return latents


@torch.no_grad()
def decode(vae: torch.nn.Module, latents: torch.Tensor) -> torch.Tensor:
    """Latents -> images in [0, 1], [batch, 3, H, W] float32 on CPU."""
    vae_dtype = next(vae.parameters()).dtype
    scaled = latents / vae.config.scaling_factor
    if getattr(vae.config, "shift_factor", None):
        scaled = scaled + vae.config.shift_factor
    images = vae.decode(scaled.to(vae_dtype)).sample
    return (images.float() / 2 + 0.5).clamp(0, 1).cpu()
