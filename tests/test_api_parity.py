"""A1111 API parity on a real server: the request cases of A1111's own API tests restated here, listing routes,
hires fix, tiling, variation seeds, styles, VAEs, options, and queueing."""

from __future__ import annotations

import base64
import io
import json
import shutil
import threading
import time

import numpy as np
import pytest
import requests
import torch
import webuiapi
from PIL import Image

SMALL = dict(width=64, height=64, steps=4, seed=7)


def post(server, route, **payload):
    return requests.post(f"{server.url}/sdapi/v1/{route}", json=payload, timeout=300)


def image_of(body, index=0) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(body["images"][index]))).convert("RGB"), dtype=np.int16)


def info_of(body) -> dict:
    return json.loads(body["info"])


# A1111's API test payloads (test/test_txt2img.py there), restated: each must answer 200 with images.
A1111_CASES = {
    "simple": {},
    "negative prompt": {"negative_prompt": "example negative prompt"},
    "complex prompt": {"prompt": "((emphasis)), (emphasis1:1.1), [to:1], [from::2], [from:to:0.3], [alt|alt1]"},
    "tiling": {"tiling": True},
    "restore faces": {"restore_faces": True},
    "hires fix": {"enable_hr": True, "denoising_strength": 0.7},
    "batch processing": {"n_iter": 2, "batch_size": 2},
    "styles": {"styles": ["not-a-style"]},
    "variation": {"subseed": 3, "subseed_strength": 0.5},
    "seed resize": {"seed_resize_from_w": 96, "seed_resize_from_h": 96},
}


@pytest.mark.parametrize("case", list(A1111_CASES))
def test_a1111_api_test_cases(server, case):
    payload = {
        "prompt": "example prompt",
        "negative_prompt": "",
        "styles": [],
        "seed": -1,
        "subseed": -1,
        "subseed_strength": 0,
        "seed_resize_from_h": -1,
        "seed_resize_from_w": -1,
        "sampler_index": "Euler a",
        "batch_size": 1,
        "n_iter": 1,
        "steps": 3,
        "cfg_scale": 7,
        "width": 64,
        "height": 64,
        "restore_faces": False,
        "tiling": False,
        "do_not_save_samples": False,
        "do_not_save_grid": False,
        "eta": 0,
        "s_churn": 0,
        "s_tmax": 0,
        "s_tmin": 0,
        "s_noise": 1,
        "override_settings": {},
        "override_settings_restore_afterwards": True,
        "script_args": [],
        "sampler_name": "Euler a",
        "send_images": True,
        "save_images": False,
        "alwayson_scripts": {},
    }
    payload.update(A1111_CASES[case])
    response = post(server, "txt2img", **payload)
    assert response.status_code == 200, response.text
    body = response.json()
    assert len(body["images"]) == payload["n_iter"] * payload["batch_size"]
    if case == "restore faces":
        assert any("face restoration is not installed" in n for n in info_of(body)["notes"])


def test_every_listed_sampler_works_over_http(server):
    names = [s["name"] for s in requests.get(f"{server.url}/sdapi/v1/samplers", timeout=30).json()]
    for name in names:
        assert post(server, "txt2img", prompt="x", sampler_name=name, **SMALL).status_code == 200, name


def test_listing_routes_and_webuiapi_helpers(server):
    api = webuiapi.WebUIApi(host="127.0.0.1", port=server.port, steps=3)
    upscalers = [u["name"] for u in api.get_upscalers()]
    assert upscalers == ["None", "Lanczos", "Nearest"]
    assert "Latent (bicubic antialiased)" in [m["name"] for m in api.get_latent_upscale_modes()]
    assert api.get_face_restorers() == [] and api.get_realesrgan_models() == []
    assert isinstance(api.get_prompt_styles(), list) and isinstance(api.get_sd_vae(), list)
    memory = api.get_memory()
    assert memory["ram"]["total"] > memory["ram"]["used"] > 0
    assert api.get_cmd_flags()["api"] is True
    assert requests.post(f"{server.url}/sdapi/v1/skip", timeout=10).status_code == 200
    api.util_wait_for_ready(check_interval=0.2)


def test_hires_fix_upscales_and_differs_from_a_plain_resize(server):
    base = post(server, "txt2img", prompt="a red circle", sampler_name="Euler", **SMALL).json()
    for upscaler in ("Latent", "Lanczos"):
        hires = post(
            server,
            "txt2img",
            prompt="a red circle",
            sampler_name="Euler",
            enable_hr=True,
            hr_scale=2,
            hr_upscaler=upscaler,
            hr_second_pass_steps=4,
            denoising_strength=0.6,
            **SMALL,
        ).json()
        big = image_of(hires)
        assert big.shape == (128, 128, 3)
        plain = np.asarray(
            Image.fromarray(image_of(base).astype(np.uint8)).resize((128, 128), Image.LANCZOS), dtype=np.int16
        )
        assert np.abs(big - plain).mean() > 2  # the second pass really re-denoised
        text = info_of(hires)["infotexts"][0]
        assert "Denoising strength: 0.6" in text and "Hires upscale: 2" in text
        assert f"Hires upscaler: {upscaler}" in text and "Hires steps: 4" in text
    resized = post(server, "txt2img", prompt="x", enable_hr=True, hr_resize_x=96, hr_resize_y=80, **SMALL).json()
    assert image_of(resized).shape == (80, 96, 3)
    bad = post(server, "txt2img", prompt="x", enable_hr=True, hr_upscaler="ESRGAN_4x", **SMALL)
    assert bad.status_code == 400 and "Hires upscaler 'ESRGAN_4x' is not available" in bad.json()["detail"]


def seam(image: np.ndarray) -> float:
    """How much the left and right edges differ, relative to neighbouring columns inside the image."""
    edge = np.abs(image[:, 0] - image[:, -1]).mean()
    inner = np.abs(image[:, 1:] - image[:, :-1]).mean()
    return edge / inner


def test_tiling_makes_edges_wrap(server):
    tiled = image_of(post(server, "txt2img", prompt="a pattern", sampler_name="Euler", tiling=True, **SMALL).json())
    plain = image_of(post(server, "txt2img", prompt="a pattern", sampler_name="Euler", **SMALL).json())
    assert seam(tiled) < 0.7 * seam(plain)
    assert "Tiling: True" in info_of(post(server, "txt2img", prompt="x", tiling=True, **SMALL).json())["infotexts"][0]


def test_variation_strength_0_is_the_seed_and_1_is_the_subseed(server):
    common = dict(prompt="a red circle", sampler_name="Euler", width=64, height=64, steps=4)
    seed_image = image_of(post(server, "txt2img", seed=10, **common).json())
    subseed_image = image_of(post(server, "txt2img", seed=20, **common).json())
    zero = post(server, "txt2img", seed=10, subseed=20, subseed_strength=0.0, **common).json()
    one = post(server, "txt2img", seed=10, subseed=20, subseed_strength=1.0, **common).json()
    half = post(server, "txt2img", seed=10, subseed=20, subseed_strength=0.5, **common).json()
    assert np.array_equal(image_of(zero), seed_image)
    assert np.array_equal(image_of(one), subseed_image)
    assert not np.array_equal(image_of(half), seed_image) and not np.array_equal(image_of(half), subseed_image)
    text = info_of(half)["infotexts"][0]
    assert "Variation seed: 20, Variation seed strength: 0.5" in text
    assert info_of(half)["all_subseeds"] == [20]


def test_prompt_styles(server):
    (server.data_dir / "styles.csv").write_text(
        'name,prompt,negative_prompt\nwrap,"masterpiece, {prompt}, detailed",blurry\nplain,oil painting,\n',
        encoding="utf-8",
    )
    api = webuiapi.WebUIApi(host="127.0.0.1", port=server.port)
    assert {s["name"] for s in api.get_prompt_styles()} == {"wrap", "plain"}
    body = post(server, "txt2img", prompt="a cat", negative_prompt="ugly", styles=["wrap", "plain"], **SMALL).json()
    info = info_of(body)
    assert info["prompt"] == "masterpiece, a cat, detailed, oil painting"
    assert info["negative_prompt"] == "ugly, blurry"
    assert info["infotexts"][0].startswith("masterpiece, a cat, detailed, oil painting\nNegative prompt: ugly, blurry")


def test_sd_vae_selectable_through_options(server):
    from diffusers import AutoencoderKL

    vae_dir = server.data_dir / "models" / "VAE" / "tinted"
    original = AutoencoderKL.from_pretrained(
        server.data_dir / "models" / "Stable-diffusion" / "shapes-64", subfolder="vae"
    )
    with torch.no_grad():
        original.decoder.conv_out.bias += 0.3  # a visibly different decoder
    original.save_pretrained(vae_dir)
    names = [v["model_name"] for v in requests.get(f"{server.url}/sdapi/v1/sd-vae", timeout=30).json()]
    assert "tinted" in names
    before = image_of(post(server, "txt2img", prompt="x", sampler_name="Euler", **SMALL).json())
    assert post(server, "options", sd_vae="tinted").status_code == 200
    assert requests.get(f"{server.url}/sdapi/v1/options", timeout=30).json()["sd_vae"] == "tinted"
    tinted = image_of(post(server, "txt2img", prompt="x", sampler_name="Euler", **SMALL).json())
    assert not np.array_equal(before, tinted)
    assert post(server, "options", sd_vae="Automatic").status_code == 200
    assert np.array_equal(before, image_of(post(server, "txt2img", prompt="x", sampler_name="Euler", **SMALL).json()))
    override = post(
        server, "txt2img", prompt="x", sampler_name="Euler", override_settings={"sd_vae": "tinted"}, **SMALL
    ).json()
    assert np.array_equal(tinted, image_of(override))
    assert requests.get(f"{server.url}/sdapi/v1/options", timeout=30).json()["sd_vae"] == "Automatic"  # restored
    missing = post(server, "options", sd_vae="nope.safetensors")
    assert missing.status_code == 404 and "VAE 'nope.safetensors' not found" in missing.json()["detail"]
    shutil.rmtree(vae_dir)


def test_options_round_trip_every_key(server):
    options = requests.get(f"{server.url}/sdapi/v1/options", timeout=30).json()
    for key in (
        "send_seed",
        "CLIP_stop_at_last_layers",
        "sd_model_checkpoint",
        "sd_vae",
        "samples_save",
        "outdir_txt2img_samples",
    ):
        assert key in options
    changed = {"send_seed": False, "samples_save": False, "my_extension_option": {"a": [1, 2]}}
    assert post(server, "options", **changed).status_code == 200
    after = requests.get(f"{server.url}/sdapi/v1/options", timeout=30).json()
    assert {k: after[k] for k in changed} == changed
    post(server, "options", send_seed=True, samples_save=True)


def test_interrupt_stops_only_the_running_request(server):
    results = {}

    def run(name, **payload):
        results[name] = post(server, "txt2img", **payload).json()

    long = threading.Thread(
        target=run, args=("long",), kwargs=dict(prompt="a", width=64, height=64, steps=150, n_iter=40)
    )
    long.start()
    deadline = time.time() + 30
    while time.time() < deadline:
        state = requests.get(f"{server.url}/sdapi/v1/progress", timeout=10).json()["state"]
        if state["sampling_step"] > 0:
            break
        time.sleep(0.05)
    short = threading.Thread(target=run, args=("short",), kwargs=dict(prompt="b", **SMALL))
    short.start()
    time.sleep(0.3)
    assert requests.get(f"{server.url}/sdapi/v1/progress", timeout=10).json()["state"]["job_count"] >= 2
    requests.post(f"{server.url}/sdapi/v1/interrupt", timeout=10)
    long.join(60)
    short.join(60)
    assert info_of(results["long"])["interrupted"] is True
    assert info_of(results["short"])["interrupted"] is False
    assert len(results["short"]["images"]) == 1
