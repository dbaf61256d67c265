"""`--bf16` on a CPU with bfloat16 in hardware (AVX512-BF16 or AMX) against the fp32 the CPU runs by default.

An SD1.5-size single file (random weights from our own exporter; nothing downloaded). Each precision in its own
process, the app's own services as the UI and API run them (`Settings(bf16=True)` is `./webui.sh --bf16`):

- txt2img: `--size` px, `--gen-steps` steps, Euler a, CFG 7, one warm-up generation of 1 step; s/it is the time of
  the whole timed generation (text encoding and decode included) over its steps;
- training: an embedding (1 vector) at `--size` px, batch 1, activation checkpointing on (the default), median s/step
  of `--train-steps` steps after one warm-up step; peak RSS above the loaded model's idle RSS, and that idle RSS
  (the process after loading the model and generating, before training).

Printed: both sides, the speed ratio bf16/fp32 (the baseline is fp32), and the mean |difference| of the two images
(same seed, 0-255) so that a faster but broken bf16 would show (random weights give near-flat images, so at full
size this says little; tests/test_cpu_bf16.py compares real images of the shipped model).

    .venv/bin/python benchmarks/cpu_bf16.py [--size 512] [--gen-steps 8] [--train-steps 2] [--markdown OUT.md]
    .venv/bin/python benchmarks/cpu_bf16.py --tiny     # a tiny SD1 file at 64 px: checks the script only
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from baselines import run_child
from random_checkpoint import make_in_subprocess

PROMPT, NEGATIVE = "a photo of a red fox in the snow, detailed, sharp focus", "blurry, low quality"


def child(args) -> dict:
    """One precision: generation, then embedding training, in this process."""
    from baselines import PeakMemory, make_images
    from PIL import Image

    from app.generation.txt2img import Txt2ImgParams
    from app.logs import quiet_libraries
    from app.services import build_services
    from app.settings import Settings
    from app.training.config import TrainConfig

    quiet_libraries()
    tmp = Path(tempfile.mkdtemp())
    settings = Settings(
        data_dir=tmp, ckpt_dir=args.ckpt.parent, ckpt=args.ckpt, use_cpu=["all"], bf16=args.bf16, no_hashing=True
    )
    services = build_services(settings)
    model = services.models.get()

    def generate(steps: int) -> Image.Image:
        params = Txt2ImgParams(
            prompt=PROMPT,
            negative_prompt=NEGATIVE,
            sampler_name="Euler a",
            steps=steps,
            width=args.size,
            height=args.size,
            seed=1,
            cfg_scale=7.0,
            save_images=False,
        )
        return services.txt2img.generate(params).images[0]

    generate(1)  # warm-up: oneDNN picks its kernels on first use of each shape
    start = time.perf_counter()
    image = generate(args.gen_steps)
    gen_s = time.perf_counter() - start
    image_path = tmp / "image.png"
    image.save(image_path)

    make_images(tmp / "data", args.size)
    services.embeddings.create("zqbench", 1, "star")
    memory = PeakMemory(model.device)
    memory.start()
    cfg = TrainConfig(
        name="zqbench",
        data_root=str(tmp / "data"),
        training_width=args.size,
        training_height=args.size,
        steps=1 + args.train_steps,
        learn_rate="0.005",
        save_every=0,
        create_image_every=0,
        template_filename="subject.txt",
    )
    result = services.training.train_embedding(cfg).wait()
    if result.error:
        raise SystemExit(result.error)
    return {
        "dtype": str(model.dtype).replace("torch.", ""),
        "s_per_it": gen_s / args.gen_steps,
        "s_per_step": statistics.median(result.step_seconds[1:]),
        "train_mb": memory.peak_mb() - memory.idle_mb,
        "idle_mb": memory.idle_mb,
        "image": str(image_path),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=None, help="px (default 512; 64 with --tiny)")
    parser.add_argument("--gen-steps", type=int, default=8)
    parser.add_argument("--train-steps", type=int, default=2, help="timed training steps (after one warm-up step)")
    parser.add_argument("--tiny", action="store_true", help="a tiny SD1 file: checks the script, measures nothing")
    parser.add_argument("--ckpt", type=Path, default=None, help="use this single file instead of generating one")
    parser.add_argument("--markdown", type=Path, default=None)
    parser.add_argument("--child", action="store_true")
    parser.add_argument("--bf16", action="store_true")
    args = parser.parse_args()
    args.size = args.size or (64 if args.tiny else 512)
    if args.child:
        print(json.dumps(child(args)))
        return

    from app.models.manager import cpu_has_native_bf16

    if not cpu_has_native_bf16():
        raise SystemExit("This CPU has no bfloat16 in hardware (AVX512-BF16 or AMX): --bf16 is refused on it.")
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = args.ckpt or make_in_subprocess("tiny-sd1" if args.tiny else "sd1", Path(tmp))
        runs = {}
        for name, flags in (("fp32", []), ("bf16", ["--bf16"])):
            command = [sys.executable, __file__, "--child", "--ckpt", str(ckpt), "--size", str(args.size)]
            command += ["--gen-steps", str(args.gen_steps), "--train-steps", str(args.train_steps), *flags]
            runs[name] = run_child(command, name)
            run = runs[name]
            print(
                f"{name} ({run['dtype']}): txt2img {run['s_per_it']:.3f} s/it; embedding training "
                f"{run['s_per_step']:.3f} s/step, {run['train_mb']:.0f} MB above idle",
                flush=True,
            )
        images = [np.asarray(_open(runs[n]["image"]), dtype=np.float32) for n in ("fp32", "bf16")]
        table = markdown(runs, float(np.abs(images[0] - images[1]).mean()), args)
    print(table)
    if args.markdown:
        args.markdown.write_text(table, encoding="utf-8")


def _open(path: str):
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGB").copy()


def markdown(runs: dict, image_diff: float, args) -> str:
    fp32, bf16 = runs["fp32"], runs["bf16"]
    name = "tiny SD1 file" if args.tiny else "SD1.5-size single file (random weights)"
    lines = [
        f"{name}, {args.size} px, CPU ({torch.get_num_threads()} threads); txt2img {args.gen_steps} steps Euler a "
        f"CFG 7; embedding training batch 1, median of {args.train_steps} steps after 1 warm-up",
        "",
        "| part | fp32 (baseline) | bf16 | speed bf16/fp32 |",
        "|---|---|---|---|",
        f"| txt2img s/it | {fp32['s_per_it']:.3f} | {bf16['s_per_it']:.3f} | "
        f"{fp32['s_per_it'] / bf16['s_per_it']:.2f}x |",
        f"| embedding training s/step | {fp32['s_per_step']:.3f} | {bf16['s_per_step']:.3f} | "
        f"{fp32['s_per_step'] / bf16['s_per_step']:.2f}x |",
        f"| RSS of the loaded model (idle, after one generation) | {fp32['idle_mb']:.0f} MB | "
        f"{bf16['idle_mb']:.0f} MB | memory x{bf16['idle_mb'] / fp32['idle_mb']:.2f} |",
        f"| training peak RSS above idle | {fp32['train_mb']:.0f} MB | {bf16['train_mb']:.0f} MB | "
        f"memory x{bf16['train_mb'] / max(fp32['train_mb'], 1.0):.2f} |",
        "",
        f"Mean |difference| of the two images (same seed, 0-255): {image_diff:.2f}",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
