"""Textual Inversion training speed: our engine vs. a baseline written like diffusers' textual_inversion.py.

Baseline (diffusers example style): a placeholder token added to a copy of the tokenizer and text encoder, the
whole token-embedding matrix trainable with every row but the placeholder's copied back after each step, and the
VAE encoding each image at every step (no latent cache). Ours: `TrainingService.train_embedding` (latents cached
once, only the embedding's vectors are parameters). Same model, images, batch size, resolution and prompts.
Each side runs in its own process so peak memory (max RSS on CPU, max allocated on CUDA) is its own.

    .venv/bin/python benchmarks/train_ti.py [--steps 60] [--batch 1] [--size 64]
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def make_images(folder: Path, size: int, n: int = 8) -> None:
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        im = Image.new("RGB", (size, size), (30 * i, 120, 200))
        ImageDraw.Draw(im).regular_polygon((size // 2, size // 2, size // 3), 5, fill=(250, 220, 0))
        im.save(folder / f"{i:02d}-a yellow star.png")


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_ours(args, tmp: Path) -> dict:
    from app.logs import quiet_libraries
    from app.services import build_services
    from app.settings import Settings
    from app.training.config import TrainConfig

    quiet_libraries()
    make_images(tmp / "data", args.size)
    services = build_services(Settings(data_dir=tmp))
    services.embeddings.create("zqbench", 1, "star")
    base = dict(
        name="zqbench",
        data_root=str(tmp / "data"),
        training_width=args.size,
        training_height=args.size,
        batch_size=args.batch,
        save_every=0,
        create_image_every=0,
        template_filename="subject.txt",
    )
    services.training.train_embedding(TrainConfig(steps=5, **base)).wait()  # warm-up
    start = time.perf_counter()
    result = services.training.train_embedding(TrainConfig(steps=5 + args.steps, **base)).wait()
    elapsed = time.perf_counter() - start
    assert result.error is None and result.step == 5 + args.steps
    return {"steps_per_s": args.steps / elapsed, "peak_mb": peak_memory_mb(services.models.device)}


def run_baseline(args, tmp: Path) -> dict:
    import numpy as np
    import torch.nn.functional as F
    from diffusers import DDPMScheduler
    from PIL import Image

    from app.logs import quiet_libraries
    from app.models.tokenizer import load_clip_tokenizer
    from app.services import build_services
    from app.settings import Settings
    from app.training.templates import read_template

    quiet_libraries()
    make_images(tmp / "data", args.size)
    services = build_services(Settings(data_dir=tmp))
    model = services.models.get()
    device = model.device
    tokenizer = load_clip_tokenizer()
    tokenizer.add_tokens(["<zqbench>"])
    placeholder = tokenizer.convert_tokens_to_ids("<zqbench>")
    text_encoder = copy.deepcopy(model.pipe.text_encoder)
    text_encoder.resize_token_embeddings(len(tokenizer))
    embeddings = text_encoder.get_input_embeddings()
    with torch.no_grad():
        embeddings.weight[placeholder] = embeddings.weight[tokenizer.convert_tokens_to_ids("star</w>")]
    text_encoder.requires_grad_(False)
    embeddings.weight.requires_grad_(True)
    original = embeddings.weight.detach().clone()
    optimizer = torch.optim.AdamW([embeddings.weight], lr=0.005, weight_decay=0.0)
    vae, unet = model.pipe.vae, model.pipe.unet
    noise_schedule = DDPMScheduler.from_config(model.pipe.scheduler.config)
    files = sorted((tmp / "data").glob("*.png"))
    templates = read_template(services.settings.templates_dir, "subject.txt")
    keep = torch.ones(len(tokenizer), dtype=torch.bool)
    keep[placeholder] = False
    generator = torch.Generator().manual_seed(0)

    def step(i: int) -> None:
        picks = [files[(i * args.batch + k) % len(files)] for k in range(args.batch)]
        pixels = torch.stack(
            [
                torch.from_numpy(
                    np.asarray(Image.open(p).convert("RGB").resize((args.size, args.size)), dtype=np.float32) / 127.5
                    - 1
                ).permute(2, 0, 1)
                for p in picks
            ]
        ).to(device)
        latents = vae.encode(pixels.to(vae.dtype)).latent_dist.sample() * vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=generator).to(device)
        t = torch.randint(0, 1000, (args.batch,), generator=generator).to(device)
        noisy = noise_schedule.add_noise(latents.float(), noise, t)
        prompts = [templates[(i + k) % len(templates)].replace("[name]", "<zqbench>") for k in range(args.batch)]
        ids = tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        hidden = text_encoder(ids.to(device))[0]
        pred = unet(noisy.to(unet.dtype), t, encoder_hidden_states=hidden.to(unet.dtype)).sample
        F.mse_loss(pred.float(), noise.float()).backward()
        optimizer.step()
        optimizer.zero_grad()
        with torch.no_grad():
            embeddings.weight[keep] = original[keep]

    for i in range(5):
        step(i)
    start = time.perf_counter()
    for i in range(args.steps):
        step(5 + i)
    elapsed = time.perf_counter() - start
    return {"steps_per_s": args.steps / elapsed, "peak_mb": peak_memory_mb(device)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--mode", choices=["ours", "baseline"], default=None)
    args = parser.parse_args()
    if args.mode:
        with tempfile.TemporaryDirectory() as tmp:
            runner = run_ours if args.mode == "ours" else run_baseline
            print(json.dumps(runner(args, Path(tmp))))
        return
    results = {}
    for mode in ("baseline", "ours"):
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--mode",
                mode,
                "--steps",
                str(args.steps),
                "--batch",
                str(args.batch),
                "--size",
                str(args.size),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    b, o = results["baseline"], results["ours"]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"device: {device}, size {args.size}px, batch {args.batch}, {args.steps} timed steps after 5 warm-up")
    print(f"baseline (diffusers-example style): {b['steps_per_s']:.2f} steps/s, peak {b['peak_mb']:.0f} MB")
    print(f"ours:                               {o['steps_per_s']:.2f} steps/s, peak {o['peak_mb']:.0f} MB")
    print(
        f"speed ratio ours/baseline: {o['steps_per_s'] / b['steps_per_s']:.2f}x; "
        f"peak memory ratio: {o['peak_mb'] / b['peak_mb']:.2f}"
    )


if __name__ == "__main__":
    main()
