"""A1111 sampler and schedule-type names, mapped to diffusers schedulers built from the checkpoint's own config."""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    DPMSolverSDEScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    KDPM2AncestralDiscreteScheduler,
    KDPM2DiscreteScheduler,
    LCMScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)

from app.errors import UserError


@dataclass(frozen=True)
class Sampler:
    name: str
    scheduler_class: type
    aliases: tuple[str, ...] = ()
    config: dict[str, Any] = field(default_factory=dict)
    automatic_schedule: str = "uniform"  # what schedule "Automatic" means for this sampler


SAMPLERS: tuple[Sampler, ...] = (
    Sampler("DPM++ 2M", DPMSolverMultistepScheduler, ("k_dpmpp_2m",), {}, "karras"),
    Sampler("DPM++ SDE", DPMSolverSDEScheduler, ("k_dpmpp_sde",), {}, "karras"),
    Sampler(
        "DPM++ 2M SDE",
        DPMSolverMultistepScheduler,
        ("k_dpmpp_2m_sde",),
        {"algorithm_type": "sde-dpmsolver++"},
        "exponential",
    ),
    Sampler(
        "DPM++ 3M SDE",
        DPMSolverMultistepScheduler,
        ("k_dpmpp_3m_sde",),
        {"algorithm_type": "sde-dpmsolver++", "solver_order": 3},
        "exponential",
    ),
    Sampler("Euler a", EulerAncestralDiscreteScheduler, ("k_euler_a", "k_euler_ancestral")),
    Sampler("Euler", EulerDiscreteScheduler, ("k_euler",)),
    Sampler("LMS", LMSDiscreteScheduler, ("k_lms",)),
    Sampler("Heun", HeunDiscreteScheduler, ("k_heun",)),
    Sampler("DPM2", KDPM2DiscreteScheduler, ("k_dpm_2",), {}, "karras"),
    Sampler("DPM2 a", KDPM2AncestralDiscreteScheduler, ("k_dpm_2_a",), {}, "karras"),
    Sampler("DDIM", DDIMScheduler, ("ddim",)),
    Sampler("PLMS", PNDMScheduler, ("plms",), {"skip_prk_steps": True}),
    Sampler("UniPC", UniPCMultistepScheduler, ("unipc",)),
    Sampler("LCM", LCMScheduler, ("lcm",)),
)

# Schedule types (A1111's "Schedule type" field): label, API name, the config flag that selects it.
SCHEDULES: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("Automatic", "automatic", {}),
    ("Uniform", "uniform", {}),
    ("Karras", "karras", {"use_karras_sigmas": True}),
    ("Exponential", "exponential", {"use_exponential_sigmas": True}),
    ("Beta", "beta", {"use_beta_sigmas": True}),
    ("SGM Uniform", "sgm_uniform", {"timestep_spacing": "trailing"}),
)

_SCHEDULE_SUFFIXES = {"Karras": "Karras", "Exponential": "Exponential"}


def sampler_names() -> list[str]:
    return [s.name for s in SAMPLERS]


def schedule_labels() -> list[str]:
    return [label for label, _, _ in SCHEDULES]


def find_sampler(name: str | None) -> tuple[Sampler, str | None]:
    """Resolve a sampler name or alias; old names such as `DPM++ 2M Karras` also give their schedule type."""
    wanted = (name or "").strip()
    for sampler in SAMPLERS:
        if wanted.lower() == sampler.name.lower() or wanted.lower() in sampler.aliases:
            return sampler, None
    for suffix, label in _SCHEDULE_SUFFIXES.items():
        if wanted.endswith(" " + suffix):
            sampler, _ = find_sampler(wanted[: -len(suffix) - 1])
            return sampler, label
    raise UserError(f"Sampler '{name}' is not available. Choose one of: {', '.join(sampler_names())}.")


def find_schedule(name: str | None) -> str:
    """A schedule-type label from a label or API name (case-insensitive); empty means Automatic."""
    wanted = (name or "automatic").strip().lower()
    for label, api_name, _ in SCHEDULES:
        if wanted in (label.lower(), api_name):
            return label
    raise UserError(f"Schedule type '{name}' is not available. Choose one of: {', '.join(schedule_labels())}.")


def effective_schedule(sampler: Sampler, schedule: str | None) -> str:
    """The schedule-type label that really applies: "Automatic" becomes the sampler's own choice."""
    label = find_schedule(schedule)
    return find_schedule(sampler.automatic_schedule) if label == "Automatic" else label


def build_scheduler(sampler_name: str, schedule: str | None, base_config: dict[str, Any], seed: int | None = None):
    """A fresh scheduler for one generation, from the checkpoint's own scheduler config.

    `seed` seeds samplers that draw their own noise (DPM++ SDE's Brownian tree) so seeds stay reproducible.
    """
    sampler, implied = find_sampler(sampler_name)
    label = effective_schedule(sampler, implied or schedule)
    flags = next(f for lbl, _, f in SCHEDULES if lbl == label)
    accepted = inspect.signature(sampler.scheduler_class.__init__).parameters
    config = {k: v for k, v in base_config.items() if not k.startswith("_")}
    config.update(sampler.config)
    # A schedule a sampler cannot take is ignored, as A1111 does for DDIM/PLMS.
    config.update({k: v for k, v in flags.items() if k in accepted})
    if seed is not None and "noise_sampler_seed" in accepted:
        config["noise_sampler_seed"] = seed
    return sampler.scheduler_class.from_config(config)
