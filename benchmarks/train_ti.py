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
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from baselines import baseline_step, make_images, timed_steps


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
    from app.logs import quiet_libraries
    from app.services import build_services
    from app.settings import Settings
    from app.training.templates import read_template

    quiet_libraries()
    make_images(tmp / "data", args.size)
    services = build_services(Settings(data_dir=tmp))
    model = services.models.get()
    files = sorted((tmp / "data").glob("*.png"))
    templates = read_template(services.settings.templates_dir, "subject.txt")
    step = baseline_step("embedding", model, files, templates, args.size, args.batch)
    times = timed_steps(step, 5, args.steps, model.device)
    return {"steps_per_s": args.steps / sum(times), "peak_mb": peak_memory_mb(model.device)}


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
