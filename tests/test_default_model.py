"""The shipped default model draws what the prompt says, and ships as the issue asks (fp16, small, reproducible)."""

from __future__ import annotations

import json

import pytest
from safetensors import safe_open

from app.models.default_model import DEFAULT_MODEL_NAME, SHAPES_XL_NAME, SHIPPED_MODEL, SHIPPED_XL_MODEL
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


@pytest.mark.parametrize(
    ("folder", "parts", "limit_mib"),
    [
        (SHIPPED_MODEL, {"unet", "vae", "text_encoder"}, 40),
        (SHIPPED_XL_MODEL, {"unet", "vae", "text_encoder", "text_encoder_2"}, 25),
    ],
)
def test_shipped_weights_are_small_fp16_and_say_how_they_were_made(folder, parts, limit_mib):
    files = sorted(folder.glob("*/*.safetensors"))
    assert {f.parent.name for f in files} == parts
    total = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    assert total < limit_mib * 2**20, f"{total / 2**20:.1f} MiB"
    for f in files:
        with safe_open(str(f), "pt") as st:
            dtypes = {str(st.get_tensor(k).dtype) for k in st.keys()}  # noqa: SIM118 (safe_open is not a dict)
        assert dtypes == {"torch.float16"}, f
    recipe = json.loads((folder / "training.json").read_text())
    assert recipe["seed"] and recipe["unet_steps"] > 0


def test_services_serve_the_shipped_model(services):
    assert services.models.get().info.model_name == DEFAULT_MODEL_NAME


def test_a_fresh_checkpoint_folder_gets_both_shapes_models_and_shapes_64_stays_the_default(tmp_path):
    from app.services import build_services
    from app.settings import Settings

    services = build_services(Settings(data_dir=tmp_path))
    names = [c.model_name for c in services.models.checkpoints]
    assert names == [DEFAULT_MODEL_NAME, SHAPES_XL_NAME]
    assert services.models.get().info.model_name == DEFAULT_MODEL_NAME and not services.models.get().is_xl
    services.select_checkpoint(SHAPES_XL_NAME)
    assert services.models.get().is_xl


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


# shapes-xl, measured the same way (benchmarks/default_model_quality.py, 96 prompts): background 0.99, colour 0.78,
# count 0.95, shape 0.63 (shapes-64 on the same prompts: 0.98, 0.92, 0.94, 0.68); on these 32: 0.97, 0.78, 0.97,
# 0.56. Its colours and shapes are the weaker part; the floors sit well above chance (colour 1/6, shape 1/3).
XL_ADHERENCE_FLOOR = {"background": 0.85, "color": 0.6, "count": 0.8, "shape": 0.45}


def test_shapes_xl_follows_prompts_as_the_detector_reads_them(tmp_path):
    import random

    from app.shapes.efficacy import make_services

    services = make_services(tmp_path, SHIPPED_XL_MODEL)
    assert services.models.get().is_xl
    rng = random.Random(3)
    scenes = [sample_scene(rng) for _ in range(32)]
    got = accuracy(scenes, generate_images(services, [caption(s) for s in scenes], seed=3))
    assert all(got[k] >= floor for k, floor in XL_ADHERENCE_FLOOR.items()), got
