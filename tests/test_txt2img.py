"""The txt2img service on the real tiny model: determinism, samplers, batches, files, interrupt, bad input."""

import re
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

from app.errors import UserError
from app.generation.infotext import parse_infotext
from app.generation.samplers import build_scheduler, sampler_names
from app.generation.txt2img import Txt2ImgParams


def params(**kw) -> Txt2ImgParams:
    base = dict(
        prompt="a red circle",
        negative_prompt="blurry",
        width=64,
        height=64,
        steps=8,
        seed=7,
        sampler_name="Euler",
        save_images=False,
    )
    base.update(kw)
    return Txt2ImgParams(**base)


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def test_loop_matches_the_diffusers_pipeline(services):
    """Our sampling loop gives the image diffusers' own pipeline gives for the same conditioning and noise."""
    model = services.models.get()
    ours = services.txt2img.generate(params(steps=10, cfg_scale=7.0)).images[0]

    scheduler = build_scheduler("Euler", "Automatic", dict(model.pipe.scheduler.config))
    pipe = StableDiffusionPipeline(**{**model.pipe.components, "scheduler": scheduler})
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        cond = model.encoder.encode(["a red circle"])
        uncond = model.encoder.encode(["blurry"])
    noise = torch.randn((1, 4, 8, 8), generator=torch.Generator("cpu").manual_seed(7))
    reference = pipe(
        prompt_embeds=cond,
        negative_prompt_embeds=uncond,
        latents=noise,
        num_inference_steps=10,
        guidance_scale=7.0,
        height=64,
        width=64,
    ).images[0]
    assert np.abs(pixels(ours) - pixels(reference)).max() <= 1


def test_same_seed_same_image_and_other_seed_differs(services):
    a = services.txt2img.generate(params()).images[0]
    b = services.txt2img.generate(params()).images[0]
    c = services.txt2img.generate(params(seed=8)).images[0]
    assert np.array_equal(pixels(a), pixels(b))
    assert not np.array_equal(pixels(a), pixels(c))


def test_batch_image_i_equals_single_run_with_seed_plus_i(services):
    batch = services.txt2img.generate(params(sampler_name="Euler a", batch_size=2, n_iter=2, seed=100))
    assert batch.seeds == [100, 101, 102, 103]
    for image, seed in zip(batch.images, batch.seeds, strict=True):
        single = services.txt2img.generate(params(sampler_name="Euler a", seed=seed)).images[0]
        assert np.abs(pixels(image) - pixels(single)).max() <= 1


def test_random_seed_is_reported(services):
    result = services.txt2img.generate(params(seed=-1))
    assert 0 <= result.seeds[0] < 4294967294
    assert f"Seed: {result.seeds[0]}," in result.infotexts[0]


@pytest.mark.parametrize("name", sampler_names())
def test_every_sampler_gives_a_valid_image(services, name):
    result = services.txt2img.generate(params(sampler_name=name, steps=6))
    array = pixels(result.images[0])
    assert array.shape == (64, 64, 3)
    assert array.std() > 1  # not a flat image
    assert f"Sampler: {name}," in result.infotexts[0]


def test_old_sampler_name_with_schedule_suffix(services):
    result = services.txt2img.generate(params(sampler_name="DPM++ 2M Karras"))
    assert "Sampler: DPM++ 2M, Schedule type: Karras," in result.infotexts[0]


def test_images_are_saved_with_a1111_names_and_infotext(services):
    result = services.txt2img.generate(params(save_images=True, prompt="a (red:1.2) circle, <hypernet:x:1>"))
    path = Path(result.paths[0])
    assert path.parent.name == __import__("datetime").date.today().isoformat()
    assert re.fullmatch(r"\d{5}-7-a \(red 1\.2\) circle,\.png", path.name), path.name
    with Image.open(path) as saved:
        info = parse_infotext(saved.info["parameters"])
    assert info["Prompt"] == "a (red:1.2) circle, <hypernet:x:1>"
    assert info["Negative prompt"] == "blurry"
    assert info["Seed"] == "7" and info["Steps"] == "8" and info["Size-1"] == "64"
    assert info["Model"] == "shapes-64"
    assert info["Model hash"] == services.models.get().info.short_hash
    assert info["RNG"] == "CPU"
    second = services.txt2img.generate(params(save_images=True))
    assert int(Path(second.paths[0]).name[:5]) == int(path.name[:5]) + 1


def test_prompt_editing_changes_conditioning_mid_way(services):
    edited = pixels(services.txt2img.generate(params(prompt="[red circle:blue square:0.5]")).images[0])
    first = pixels(services.txt2img.generate(params(prompt="red circle")).images[0])
    second = pixels(services.txt2img.generate(params(prompt="blue square")).images[0])
    assert not np.array_equal(edited, first)
    assert not np.array_equal(edited, second)


def test_clip_skip_changes_image_and_is_recorded(services):
    one = services.txt2img.generate(params(clip_skip=1))
    two = services.txt2img.generate(params(clip_skip=2))
    assert not np.array_equal(pixels(one.images[0]), pixels(two.images[0]))
    assert "Clip skip: 2" in two.infotexts[0]
    assert "Clip skip" not in one.infotexts[0]


def test_long_prompt_of_5000_characters_works(services):
    prompt = ", ".join(["red circle on a blue background"] * 160)[:5000]
    result = services.txt2img.generate(params(prompt=prompt, steps=2))
    assert len(result.images) == 1


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(width=100), "Width must be a multiple of 8"),
        (dict(height=8), "Height must be between"),
        (dict(steps=0), "Sampling steps must be between"),
        (dict(sampler_name="Nonexistent"), "Sampler 'Nonexistent' is not available"),
        (dict(scheduler="wobbly"), "Schedule type 'wobbly' is not available"),
        (dict(batch_size=-1), "Batch size must be between"),
        (dict(n_iter=0), "Batch count must be between"),
        (dict(prompt="cat " * 6000), "Prompt is too long"),
    ],
)
def test_bad_input_is_refused_with_a_message(services, change, message):
    with pytest.raises(UserError, match=message):
        services.txt2img.submit(params(**change))


def test_interrupt_stops_within_a_step_and_returns_what_finished(services):
    job = services.txt2img.submit(params(steps=150, n_iter=5))
    reached = threading.Event()
    while not job.finished and job.progress.sampling_step < 2:
        reached.wait(0.005)
    services.jobs.interrupt(job)
    result = job.wait(30)
    assert result.interrupted
    assert len(result.images) == 1  # the partly denoised image of the first batch, nothing after it
    assert job.progress.sampling_step < 150
