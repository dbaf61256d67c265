"""txt2img with one hypernetwork at multiplier 1 vs. the same generation without it (baseline), same seed, steps,
size and sampler, alternating runs in one process; prints the overhead ratio.

The hypernetwork has modules for every attention width the model uses (layer structure 1, 2, 1, relu), so it runs
in every self- and cross-attention layer: the worst case.

    .venv/bin/python benchmarks/hypernetwork.py [--repeats 30] [--steps 20]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from app.generation.txt2img import Txt2ImgParams
from app.hypernetworks.attention import attention_widths
from app.logs import quiet_libraries
from app.services import build_services
from app.settings import Settings


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    quiet_libraries()
    with tempfile.TemporaryDirectory() as tmp:
        services = build_services(Settings(data_dir=Path(tmp)))
        model = services.models.get()
        widths = sorted(attention_widths(model.pipe.unet))
        services.hypernetworks.create("bench", widths, "1, 2, 1", "relu", "XavierNormal")

        def params(prompt: str) -> Txt2ImgParams:
            return Txt2ImgParams(
                prompt=prompt,
                negative_prompt="blurry",
                sampler_name="Euler a",
                steps=args.steps,
                width=64,
                height=64,
                seed=1,
                save_images=False,
            )

        plain, with_hn = params("a red circle"), params("a red circle <hypernet:bench:1>")
        for p in (plain, with_hn, plain, with_hn):
            services.txt2img.run(p)
        times: dict[str, list[float]] = {"plain": [], "hn": []}
        for _ in range(args.repeats):
            for name, p in (("plain", plain), ("hn", with_hn)):
                start = time.perf_counter()
                services.txt2img.run(p)
                times[name].append(time.perf_counter() - start)
        b, h = statistics.median(times["plain"]), statistics.median(times["hn"])
        print(
            f"device: {model.device}, threads: {torch.get_num_threads()}, widths {widths}, {args.steps} steps, "
            f"64x64, {args.repeats} alternating runs"
        )
        print(f"without hypernetwork (baseline): median {b * 1000:.1f} ms")
        print(f"with <hypernet:bench:1>:          median {h * 1000:.1f} ms")
        print(f"ratio: {h / b:.3f}  (overhead {100 * (h / b - 1):+.1f}%)")


if __name__ == "__main__":
    main()
