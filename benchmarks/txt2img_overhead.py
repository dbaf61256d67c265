"""Our txt2img service vs. the bare diffusers pipeline call, same tiny model, sampler, steps and size.

Baseline: `StableDiffusionPipeline.__call__` with the same scheduler, prompt embeddings from diffusers' own
encode path, 20 steps at 64x64, CFG 7. Ours: `Txt2ImgService.run` (prompt parsing, chunked encoding, our loop,
decode, PNG conversion; no file saving). Runs alternate so drift hits both; the median of each is compared.

    .venv/bin/python benchmarks/txt2img_overhead.py [--repeats 30] [--steps 20]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline

from app.generation.samplers import build_scheduler
from app.generation.txt2img import Txt2ImgParams
from app.logs import quiet_libraries
from app.services import build_services
from app.settings import Settings


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--sampler", default="Euler a")
    args = parser.parse_args()
    quiet_libraries()
    torch.set_num_threads(torch.get_num_threads())
    with tempfile.TemporaryDirectory() as tmp:
        services = build_services(Settings(data_dir=Path(tmp)))
        model = services.models.get()
        scheduler = build_scheduler(args.sampler, "Automatic", dict(model.pipe.scheduler.config))
        pipe = StableDiffusionPipeline(**{**model.pipe.components, "scheduler": scheduler})
        pipe.set_progress_bar_config(disable=True)
        prompt, negative = "a red circle on a blue background", "blurry"
        params = Txt2ImgParams(
            prompt=prompt,
            negative_prompt=negative,
            sampler_name=args.sampler,
            steps=args.steps,
            width=64,
            height=64,
            seed=1,
            save_images=False,
        )

        def ours() -> None:
            services.txt2img.run(params)

        def bare() -> None:
            pipe(
                prompt,
                negative_prompt=negative,
                num_inference_steps=args.steps,
                guidance_scale=7.0,
                height=64,
                width=64,
                generator=torch.Generator("cpu").manual_seed(1),
            )

        for fn in (ours, bare, ours, bare):  # warm-up
            fn()
        times: dict[str, list[float]] = {"ours": [], "bare": []}
        for _ in range(args.repeats):
            for name, fn in (("ours", ours), ("bare", bare)):
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
        o, b = statistics.median(times["ours"]), statistics.median(times["bare"])
        print(
            f"device: {model.device}, threads: {torch.get_num_threads()}, sampler: {args.sampler}, "
            f"steps: {args.steps}, 64x64, repeats: {args.repeats}"
        )
        print(f"bare diffusers pipeline (baseline): median {b * 1000:.1f} ms")
        print(f"our txt2img service:                median {o * 1000:.1f} ms")
        print(f"ratio ours/baseline: {o / b:.3f}  (overhead {100 * (o / b - 1):+.1f}%)")


if __name__ == "__main__":
    main()
