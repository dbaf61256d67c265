"""A1111's default hypernetwork ("linear", 1-2-1, no layer norm or dropout) folded into the attention projections,
against running its MLPs (the baseline: what every other tool does, and what we did before 2026-12-06).

Self-attention sees every latent position, so a hypernetwork's MLP runs over 4096 positions per layer at 512 px;
folded, each layer's k/v maps become one (width x width) product. Measured with SD1.5's UNet shapes (random weights,
no file, no download) and a hypernetwork for every width the UNet has:
- generation: `--sampling-steps` UNet calls without autograd at batch 1 with the networks active for all of them, as
  in a generation, per call: no hypernetwork / MLPs / folded;
- training: one step as training runs it (activation checkpointing, backward to the hypernetwork), MLPs / folded.
Runs alternate in one process; medians.

    .venv/bin/python benchmarks/hypernetwork_fold.py [--size 512] [--repeats 3] [--sampling-steps 4]
        [--train-size 512] [--tiny]

`--tiny`: the shipped shapes-64 model at 64 px (checks the script; its widths are too small to show much).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.hypernetworks.attention import HypernetworkStack, attention_widths, install  # noqa: E402
from app.hypernetworks.hypernetwork import Hypernetwork  # noqa: E402
from app.training.precision import activation_checkpointing  # noqa: E402


def build_unet(tiny: bool) -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    if tiny:
        unet = UNet2DConditionModel.from_pretrained(ROOT / "models" / "Stable-diffusion" / "shapes-64" / "unet")
    else:
        torch.manual_seed(0)
        unet = UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8)  # SD1.5's shapes
    return unet.float().eval().requires_grad_(False)


def alternating(runs: dict[str, Callable[[], None]], repeats: int) -> dict[str, float]:
    """Median seconds of each run: one warm-up each, then `repeats` rounds that take the runs in turn."""
    for run in runs.values():
        run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=512, help="generation size in px")
    parser.add_argument("--train-size", type=int, default=512, help="training size in px (0: skip training)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sampling-steps", type=int, default=4, help="UNet calls per generation")
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args()
    if args.tiny:
        args.size = args.train_size = 64
    unet = build_unet(args.tiny)
    stack = HypernetworkStack()
    widths = sorted(attention_widths(unet))
    # A1111's defaults (Create hypernetwork: "linear", Normal init, no layer norm, no dropout).
    hn = Hypernetwork.create("bench", widths, [1, 2, 1], "linear", "Normal", False, False, None, seed=0)
    params = hn.parameters_for(set(widths))
    generator = torch.Generator().manual_seed(0)
    context = torch.randn(1, 77, unet.config.cross_attention_dim, generator=generator)
    t = torch.tensor([500])

    def latents(size: int) -> torch.Tensor:
        return torch.randn(1, unet.config.in_channels, size // 8, size // 8, generator=generator)

    x = latents(args.size)

    def generate(fold: bool, networks) -> Callable[[], None]:
        def call():
            install(unet, stack, fold=fold)
            hn.train(False)
            # As a generation: the networks active for all its sampling steps (the folds are made once).
            with torch.no_grad(), stack.using(networks):
                for _ in range(args.sampling_steps):
                    unet(x, t, context)

        return call

    runs = {
        "no hypernetwork": generate(True, []),
        "MLPs (baseline)": generate(False, [(hn, 1.0)]),
        "folded": generate(True, [(hn, 1.0)]),
    }
    gen = alternating(runs, args.repeats)
    what = "shapes-64" if args.tiny else "SD1.5 UNet shapes"
    print(f"{what}, hypernetwork for widths {widths} (1-2-1, linear), CPU fp32, medians of {args.repeats}")
    base = gen["MLPs (baseline)"]
    for name, m in gen.items():
        per_call = m / args.sampling_steps * 1000
        print(f"generation {args.size} px, per UNet call, {name:16s} {per_call:9.1f} ms  ({m / base:.2f}x the MLPs)")

    if not args.train_size:
        return
    y = latents(args.train_size)
    for p in params:
        p.requires_grad_(True)

    def train(fold: bool) -> Callable[[], None]:
        def step():
            install(unet, stack, fold=fold)
            hn.train(True)
            with activation_checkpointing(unet, True), stack.using([(hn, 1.0)]):
                loss = torch.nn.functional.mse_loss(unet(y, t, context).sample, y)
                loss.backward()
            for p in params:
                p.grad = None

        return step

    trained = alternating({"MLPs (baseline)": train(False), "folded": train(True)}, args.repeats)
    base = trained["MLPs (baseline)"]
    for name, m in trained.items():
        print(
            f"training {args.train_size} px, one step (checkpointed), {name:16s} {m:8.3f} s ({base / m:.2f}x the speed)"
        )


if __name__ == "__main__":
    main()
