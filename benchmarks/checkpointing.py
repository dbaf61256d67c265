"""What activation checkpointing costs per training step, and what checkpointing the text encoder adds.

One embedding-style step (the prompt through the text encoder with a trainable token row, the UNet, MSE, backward
to that row; every weight frozen) in three modes, each in its own process so its peak memory is its own:
`none` (the baseline), `unet` (what training does: `app.training.precision.activation_checkpointing`) and
`unet+te` (the UNet and the text encoder's layers both checkpointed, as training did before). Prints the median
seconds per step, the peak RSS above the idle process (CPU) or peak allocated (CUDA) and the ratios to `none`.
The frozen model runs as training runs it: fp32 on the CPU, fp16 on CUDA.

    .venv/bin/python benchmarks/checkpointing.py [--tiny] [--size 512] [--steps 3]

`--tiny`: the shipped shapes-64 model at 64 px, where Python and kernel-launch overhead dominate a step as they do
on a large GPU at 512 px. Without it: SD1.5's UNet and text encoder shapes with random weights (no file, no
download) at `--size` px.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
MODES = ("none", "unet", "unet+te")


def build(tiny: bool):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    if tiny:
        folder = ROOT / "models" / "Stable-diffusion" / "shapes-64"
        unet = UNet2DConditionModel.from_pretrained(folder / "unet")
        encoder = CLIPTextModel.from_pretrained(folder / "text_encoder")
    else:
        torch.manual_seed(0)
        unet = UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8)  # SD1.5's shapes
        # CLIP ViT-L/14's text tower: SD1.5's encoder
        encoder = CLIPTextModel(
            CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12)
        )
    return unet.float().eval().requires_grad_(False), encoder.float().eval().requires_grad_(False)


def child(args) -> dict:
    sys.path.insert(0, str(ROOT))
    from baselines import PeakMemory, timed_steps

    from app.training.precision import activation_checkpointing

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if device.type == "cuda" else torch.float32  # as training runs the frozen model
    unet, encoder = (m.to(device, dtype) for m in build(args.tiny))
    latent = (64 if args.tiny else args.size) // 8
    x = torch.randn(1, unet.config.in_channels, latent, latent, device=device, dtype=dtype)
    t = torch.tensor([500], device=device)
    ids = torch.randint(0, encoder.config.vocab_size - 2, (1, 77), device=device)
    row = torch.randn(encoder.config.hidden_size, device=device, requires_grad=True)  # the trained vector

    def put_row(module, inputs, output):
        output = output.clone()
        output[:, 5] = row.to(output.dtype)
        return output

    encoder.get_input_embeddings().register_forward_hook(put_row)
    if args.mode == "unet+te":
        encoder.activation_checkpointing_enable({"use_reentrant": False, "preserve_rng_state": False})
        encoder.train()  # transformers checkpoints only modules in training mode (CLIP has no dropout)

    def step(_: int) -> None:
        context = encoder(input_ids=ids).last_hidden_state
        loss = torch.nn.functional.mse_loss(unet(x, t, context).sample.float(), x.float())
        loss.backward()
        row.grad = None

    memory = PeakMemory(device)
    memory.start()
    with activation_checkpointing(unet, args.mode != "none"):
        times = timed_steps(step, 1, args.steps, device)
    # As train_full_size.py states its goals: CUDA peak allocated, CPU peak RSS above idle.
    peak = memory.peak_mb() if device.type == "cuda" else memory.peak_mb() - memory.idle_mb
    return {"s_per_step": statistics.median(times), "peak_mb": peak}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tiny", action="store_true", help="the shipped shapes-64 model at 64 px")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    parser.add_argument("--mode", choices=MODES, default=None)
    args = parser.parse_args()
    if args.tiny and args.steps == 3:
        args.steps = 60
    if args.mode:
        print(json.dumps(child(args)))
        return
    results = {}
    for mode in MODES:
        cmd = [sys.executable, __file__, "--mode", mode, "--size", str(args.size), "--steps", str(args.steps)]
        out = subprocess.run(cmd + (["--tiny"] if args.tiny else []), capture_output=True, text=True, check=True)
        results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    what = "shapes-64 at 64 px" if args.tiny else f"SD1.5 shapes at {args.size} px"
    print(f"{what}, batch 1, {args.steps} timed steps; baseline: no checkpointing")
    base = results["none"]
    for mode, r in results.items():
        print(
            f"{mode:8s} {r['s_per_step'] * 1000:9.1f} ms/step ({r['s_per_step'] / base['s_per_step']:.2f}x)  "
            f"peak {r['peak_mb']:7.0f} MB ({r['peak_mb'] / base['peak_mb']:.2f}x)"
        )


if __name__ == "__main__":
    main()
