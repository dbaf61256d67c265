"""The shipped default model draws what the prompt says, and ships as the issue asks (fp16, small, reproducible)."""

from __future__ import annotations

import json

import pytest
from safetensors import safe_open

from app.models.default_model import DEFAULT_MODEL_NAME, SHIPPED_MODEL
from app.shapes.detect import accuracy
from app.shapes.efficacy import generate_images
from app.shapes.metrics import color_share
from app.shapes.scenes import COLORS, caption, sample_scene

# (object colour, shape, background): every base colour appears as object and as background.
PROMPTS = [
    ("red", "circle", "blue"),
    ("yellow", "square", "green"),
    ("white", "triangle", "red"),
    ("blue", "circle", "yellow"),
    ("green", "square", "purple"),
    ("purple", "triangle", "white"),
    ("gray", "circle", "yellow"),
    ("red", "square", "gray"),
]


def test_shipped_weights_are_small_fp16_and_say_how_they_were_made():
    files = sorted(SHIPPED_MODEL.glob("*/*.safetensors"))
    assert {f.parent.name for f in files} == {"unet", "vae", "text_encoder"}
    total = sum(f.stat().st_size for f in files)
    assert total < 40 * 2**20, f"{total / 2**20:.1f} MiB"
    for f in files:
        with safe_open(str(f), "pt") as st:
            dtypes = {str(st.get_tensor(k).dtype) for k in st.keys()}  # noqa: SIM118 (safe_open is not a dict)
        assert dtypes == {"torch.float16"}, f
    recipe = json.loads((SHIPPED_MODEL / "training.json").read_text())
    assert recipe["seed"] and recipe["unet_steps"] > 0


def test_services_serve_the_shipped_model(services):
    assert services.models.get().info.model_name == DEFAULT_MODEL_NAME


@pytest.mark.parametrize("seed", [11])
def test_prompt_colours_show_up_in_the_image(services, seed):
    """Background colour covers most of the image, the object colour a clear part of it, for most prompts."""
    hits, report = 0, []
    prompts = [f"a {color} {shape} on a {background} background" for color, shape, background in PROMPTS]
    images = generate_images(services, prompts, seed)
    for prompt, (color, _, background), image in zip(prompts, PROMPTS, images, strict=True):
        shares = {name: color_share(image, rgb) for name, rgb in COLORS.items()}
        others = max(v for k, v in shares.items() if k not in (color, background))
        # 0.02: the smallest object the model was trained on, a small triangle, covers 2.7 % of the image.
        ok = shares[background] > 0.35 and shares[color] > 0.02 and shares[color] > others
        hits += ok
        report.append(f"{prompt}: bg {shares[background]:.2f} obj {shares[color]:.2f} other {others:.2f}")
    assert hits >= len(PROMPTS) - 1, "\n".join(report)


# Measured on the shipped model with these 32 prompts and seeds (benchmarks/default_model_quality.py --n 32):
# background 0.97, colour 0.97, count 0.97, shape 0.66 (the previous model: shape 0.38-0.50). The floors leave a
# margin for other CPUs and library versions and sit far above chance (colour 1/6, shape 1/3). Positions are not
# checked: the model does not follow them reliably yet (0.24-0.43, near chance; see docs/benchmarks.md).
ADHERENCE_FLOOR = {"background": 0.85, "color": 0.8, "count": 0.8, "shape": 0.55}


def test_prompts_are_followed_as_the_detector_reads_them(services):
    """Full captions of random scenes: background, colour, count, shape and position, read by the fixed detector."""
    import random

    rng = random.Random(3)
    scenes = [sample_scene(rng) for _ in range(32)]
    got = accuracy(scenes, generate_images(services, [caption(s) for s in scenes], seed=3))
    assert all(got[k] >= floor for k, floor in ADHERENCE_FLOOR.items()), got
