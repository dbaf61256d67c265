"""Loading an SD1.5-sized single-file checkpoint: our path vs. diffusers' `from_single_file` (baseline) with the
same shipped config folder, each in its own process (time and peak RSS are its own).

The checkpoint is generated: SD1.5's exact key/shape layout (built on the meta device from the shipped sd1 config,
written out in the original LDM layout) filled with random fp16 values, about 2 GB in a temp folder.

    .venv/bin/python benchmarks/load_checkpoint.py [--keep PATH]
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
from random_checkpoint import make_checkpoint

ROOT = Path(__file__).resolve().parent.parent
SD1 = ROOT / "app" / "models" / "configs" / "sd1"


def load(mode: str, path: Path) -> dict:
    from app.logs import quiet_libraries

    quiet_libraries()
    start = time.perf_counter()
    if mode == "ours":
        from app.models.single_file import load_single_file

        pipe = load_single_file(path, torch.float32)
    else:
        from diffusers import StableDiffusionPipeline

        from app.models.tokenizer import load_clip_tokenizer

        pipe = StableDiffusionPipeline.from_single_file(
            str(path),
            config=str(SD1),
            local_files_only=True,
            tokenizer=load_clip_tokenizer(),
            safety_checker=None,
            requires_safety_checker=False,
            torch_dtype=torch.float32,
        )
    elapsed = time.perf_counter() - start
    params = sum(p.numel() for m in (pipe.unet, pipe.vae, pipe.text_encoder) for p in m.parameters())
    return {"seconds": elapsed, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "params": params}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=["ours", "baseline"])
    parser.add_argument("--path", type=Path)
    args = parser.parse_args()
    if args.mode:
        print(json.dumps(load(args.mode, args.path)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "sd15-random.safetensors"
        make_checkpoint(path, "sd1")
        size = path.stat().st_size / 2**30
        runs = {}
        for mode in ("baseline", "ours", "baseline", "ours"):  # two rounds; the second has a warm file cache
            out = subprocess.run(
                [sys.executable, __file__, "--mode", mode, "--path", str(path)],
                capture_output=True,
                text=True,
                check=True,
            )
            runs.setdefault(mode, []).append(json.loads(out.stdout.strip().splitlines()[-1]))
    b, o = runs["baseline"][-1], runs["ours"][-1]
    print(f"SD1.5-sized fp16 single file, {size:.2f} GiB, {o['params'] / 1e6:.0f} M parameters, loaded as fp32 on CPU")
    print(f"diffusers from_single_file (baseline): {b['seconds']:.2f} s, peak RSS {b['peak_mb']:.0f} MB")
    print(f"ours:                                  {o['seconds']:.2f} s, peak RSS {o['peak_mb']:.0f} MB")
    print(f"ratio ours/baseline: time {o['seconds'] / b['seconds']:.2f}, peak memory {o['peak_mb'] / b['peak_mb']:.2f}")


if __name__ == "__main__":
    main()
