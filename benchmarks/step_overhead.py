"""Python work a training step or a UNet call pays on top of its kernels, the old way against ours.

Where a GPU waits for Python (an SD1.5 model at 512 px on a large GPU, docs/benchmarks.md) every millisecond of
Python per step is a millisecond of step time. Three costs, each timed old way vs. new way in the same process:

- the UNet's dtype, read once per training step: diffusers' `unet.dtype` (walks every parameter) vs. the dtype
  the run stored when it started (`MixedPrecision.model_dtype`);
- the processor signature diffusers' `Attention.forward` reads on every call (to warn about unused kwargs), times
  the UNet's attention layers: diffusers' `AttnProcessor2_0` (baseline) vs. our processor with a stored signature;
- seeding the forward's RNG once per micro-batch: `torch.manual_seed` vs. `seed_forward` (CPU and the device);
- the finite checks of a rank-4 LoRA's 256 tensors (SD 1.x attention projections), gradients and then weights,
  each step: one `bool()` per tensor vs. `all_finite` (one for all). These tensors go to CUDA when there is one:
  there each `bool()` is also a round trip to the GPU, which a CPU timing cannot show.

    .venv/bin/python benchmarks/step_overhead.py [--tiny] [--repeats 200]

Without `--tiny`: SD1.5's UNet shapes with random weights (no file, no download). With it: shapes-64.
"""

from __future__ import annotations

import argparse
import inspect
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def per_call_ms(fn: Callable[[], object], repeats: int) -> float:
    """Median over 5 rounds of the mean time of `repeats` calls, in ms."""
    fn()
    rounds = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        rounds.append((time.perf_counter() - start) / repeats)
    return statistics.median(rounds) * 1000


def lora_shaped_tensors(unet: torch.nn.Module, rank: int = 4) -> list[torch.Tensor]:
    """A rank-`rank` LoRA's down and up matrices for every attention projection of `unet` (q, k, v, out)."""
    tensors = []
    for name, module in unet.named_modules():
        if isinstance(module, torch.nn.Linear) and name.endswith((".to_q", ".to_k", ".to_v", ".to_out.0")):
            tensors += [torch.randn(rank, module.in_features), torch.randn(module.out_features, rank)]
    return tensors


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tiny", action="store_true", help="the shipped shapes-64 model")
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from checkpointing import build
    from diffusers.models.attention_processor import AttnProcessor2_0

    from app.hypernetworks.attention import HypernetworkAttnProcessor, HypernetworkStack
    from app.training.loop import all_finite, seed_forward
    from app.training.precision import MixedPrecision

    unet, _ = build(args.tiny)
    device = torch.device("cpu")
    layers = len(unet.attn_processors)
    amp = MixedPrecision(device, unet.dtype)
    ours, stock = HypernetworkAttnProcessor(HypernetworkStack()), AttnProcessor2_0()

    lora = [t.to("cuda" if torch.cuda.is_available() else "cpu") for t in lora_shaped_tensors(unet)]

    def one_by_one() -> bool:
        return all(torch.isfinite(t).all() for t in lora) and all(torch.isfinite(t).all() for t in lora)

    rows = [
        (
            "UNet dtype, once a step",
            per_call_ms(lambda: unet.dtype, args.repeats),
            per_call_ms(lambda: amp.model_dtype, args.repeats),
        ),
        (
            f"processor signature x {layers} layers, each UNet call",
            per_call_ms(lambda: inspect.signature(stock.__call__), args.repeats) * layers,
            per_call_ms(lambda: inspect.signature(ours.__call__), args.repeats) * layers,
        ),
        (
            "seeding the forward, each micro-batch",
            per_call_ms(lambda: torch.manual_seed(1234), args.repeats),
            per_call_ms(lambda: seed_forward(1234, device), args.repeats),
        ),
        (
            f"finite checks, {len(lora)} LoRA tensors ({lora[0].device.type}), a step",
            per_call_ms(one_by_one, args.repeats),
            per_call_ms(lambda: all_finite(lora) and all_finite(lora), args.repeats),
        ),
    ]
    what = "shapes-64" if args.tiny else "SD1.5 UNet shapes"
    print(f"{what}; time per occurrence, baseline (the old way) vs. ours")
    for name, old, new in rows:
        print(f"{name:50s} baseline {old:6.3f} ms  ours {new:6.3f} ms  saved {old - new:6.3f} ms")
    # A checkpointed embedding step: one dtype read, two UNet forwards (the second in backward), one seed.
    old_step = rows[0][1] + 2 * rows[1][1] + rows[2][1]
    new_step = rows[0][2] + 2 * rows[1][2] + rows[2][2]
    print(
        f"{'per checkpointed embedding step, batch 1':50s} baseline {old_step:6.3f} ms  ours {new_step:6.3f} ms  "
        f"ratio {old_step / new_step:.1f}x"
    )


if __name__ == "__main__":
    main()
