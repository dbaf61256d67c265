"""Full-size single-file checkpoints with random weights, written by our own exporter (nothing downloaded).

The components are built on the meta device from a shipped config folder (sd1, sd2, sdxl, tiny-*), exported to the
original LDM key layout by `app/models/ldm_export.py`, and filled with N(0, 0.02) values in fp16. Drawing the numbers on
a GPU (`--device cuda`) takes seconds even for SDXL's 3.5 B parameters.

    python benchmarks/random_checkpoint.py sdxl /tmp/sdxl.safetensors [--device cuda]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

EXPORTERS = {"sd1": "export_sd1", "sd2": "export_sd2", "sdxl": "export_sdxl"}


def make_checkpoint(path: Path, config: str, device: str = "cpu", seed: int = 0) -> Path:
    from safetensors.torch import save_file

    import app.models.ldm_export as ldm_export
    from app.models.single_file import CONFIG_DIR

    export = getattr(ldm_export, EXPORTERS[config.removeprefix("tiny-")])
    shapes = {k: v.shape for k, v in export(ldm_export.meta_pipeline(CONFIG_DIR / config)).items()}
    generator = torch.Generator(device).manual_seed(seed)
    tensors = {
        k: (torch.randn(s, generator=generator, device=device, dtype=torch.float16) * 0.02).cpu()
        for k, s in shapes.items()
    }
    save_file(tensors, str(path))
    return path


def make_in_subprocess(config: str, folder: Path, device: str = "cpu", seed: int = 0) -> Path:
    """`make_checkpoint` into `folder` in a process of its own: drawing the numbers leaves gigabytes in the
    caller's allocator otherwise (5 GB of RSS after an SDXL-size file), memory the measured runs would then lack."""
    path = folder / f"{config}-random{f'-{seed}' if seed else ''}.safetensors"
    command = [sys.executable, __file__, config, str(path), "--device", device, "--seed", str(seed)]
    subprocess.run(command, check=True)
    return path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("config", choices=["sd1", "sd2", "sdxl", "tiny-sd1", "tiny-sd2", "tiny-sdxl"])
    parser.add_argument("path", type=Path)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    make_checkpoint(args.path, args.config, args.device, args.seed)
    print(f"{args.path}: {args.path.stat().st_size / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
