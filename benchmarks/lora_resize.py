"""Resizing a full-size LoRA: an SD1.5-size (or SDXL-size) rank-128 kohya LoRA on the layers kohya's default trains
(every Linear and 1x1 projection of the UNet's transformer blocks, every Linear of the text encoders' layers),
fp16, random halves with a decaying spectrum as trained LoRAs have (built here: nothing downloaded). Timed and
measured, each in its own process: copying the file (reading every tensor and writing them again, what any resize
must do at least), the named baseline, resizing to rank 32 kohya's way (resize_lora.py: the SVD of each layer's
whole out x in update), then ours to rank 32 and dynamically (the least rank keeping 90 % of each layer's norm, at
most 128). Prints seconds, peak RSS above the process's start (after its imports), sizes and the ratios.

    .venv/bin/python benchmarks/lora_resize.py [--arch sd1|sdxl] [--rank 128]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
for folder in (ROOT, ROOT / "benchmarks"):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))


def kohya_layers(arch: str) -> dict[str, tuple[int, ...]]:
    """kohya name -> the layer's weight shape, for kohya's default LoRA targets of a full-size model."""
    import app.models.ldm_export as ldm_export
    from app.lora import extract
    from app.lora.names import model_components
    from app.lora.writer import kohya_name
    from app.models.single_file import CONFIG_DIR

    parts = ldm_export.meta_pipeline(CONFIG_DIR / arch)
    xl = getattr(parts, "text_encoder_2", None) is not None
    return {
        kohya_name(component, path, xl): tuple(module.weight.shape)
        for component, root in model_components(parts).items()
        for path, module in extract.kohya_layers(component, root, conv=False).items()
    }


def make_lora(path: Path, arch: str, rank: int, seed: int = 0) -> None:
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    decay = 0.93 ** torch.arange(rank, dtype=torch.float32)  # most of a trained update lives in a few directions
    tensors = {}
    for name, shape in kohya_layers(arch).items():
        out_features, in_features = shape[0], shape[1]
        down = torch.randn(rank, in_features, generator=g) * 0.02 * decay[:, None]
        up = torch.randn(out_features, rank, generator=g) * 0.02
        if len(shape) == 4:
            down, up = down[:, :, None, None], up[:, :, None, None]
        tensors[name + ".lora_down.weight"] = down.half()
        tensors[name + ".lora_up.weight"] = up.half()
        tensors[name + ".alpha"] = torch.tensor(float(rank))
    meta = {"ss_network_dim": str(rank), "ss_network_alpha": str(rank)}
    save_file(tensors, str(path), metadata=meta)


def full_svd_layer(down, up, alpha, rank, keep=0.0):
    """kohya's resize_lora way, for comparison: the SVD of the whole out x in update matrix, in fp32 as kohya's
    script loads the file (its `merge_dtype`)."""
    from app.lora.resize import chosen_rank

    update = (up.reshape(up.shape[0], -1).float() @ down.reshape(down.shape[0], -1).float()) * alpha / down.shape[0]
    u, s, vh = torch.linalg.svd(update, full_matrices=False)
    k = chosen_rank(s, rank, keep)
    kept = float((s[:k] ** 2).sum() / (s**2).sum()) ** 0.5
    root = s[:k].sqrt()
    new_up, new_down = (u[:, :k] * root).to(up.dtype), (root[:, None] * vh[:k]).to(down.dtype)
    if down.ndim == 4:
        new_down, new_up = new_down.reshape(k, *down.shape[1:]), new_up.reshape(up.shape[0], k, 1, 1)
    return new_down.contiguous(), new_up.contiguous(), float(k), kept


def child(args) -> dict:
    from baselines import PeakMemory
    from safetensors import safe_open
    from safetensors.torch import save_file

    from app.fileio import atomic_write
    from app.lora.resize import resize_lora

    src, dst = Path(args.src), Path(args.dst)
    memory = PeakMemory(torch.device("cpu"))
    memory.start()  # after the imports: what the work itself adds
    started = time.perf_counter()
    if args.child == "copy":
        with safe_open(str(src), "pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
            meta = f.metadata()
        atomic_write(dst, lambda tmp: save_file(tensors, str(tmp), metadata=meta))
        report = None
    else:
        if args.child == "fullsvd":
            import app.lora.resize as resize_module

            resize_module.resize_layer = full_svd_layer  # the same resize, each layer's SVD taken kohya's way
        keep = 0.9 if args.child == "dynamic" else 0.0
        rank = args.rank if args.child == "dynamic" else 32  # fullsvd: the rank-32 resize, kohya's way
        report = resize_lora(src, dst, rank, keep).sentence()
    seconds = time.perf_counter() - started
    peak = memory.peak_mb() - memory.idle_mb
    return {"seconds": seconds, "peak_mb": peak, "bytes": dst.stat().st_size, "report": report}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--arch", choices=["sd1", "sdxl"], default="sd1")
    parser.add_argument("--rank", type=int, default=128)
    parser.add_argument("--child", default=None)
    parser.add_argument("--src", default="")
    parser.add_argument("--dst", default="")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    from baselines import run_child

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "big.safetensors"
        make_lora(src, args.arch, args.rank)
        print(f"{args.arch.upper()}-size rank-{args.rank} LoRA, fp16: {src.stat().st_size / 2**20:.1f} MB")
        rows = {}
        for side in ("copy", "fullsvd", "rank32", "dynamic"):
            command = [sys.executable, __file__, "--child", side, "--src", str(src), "--dst", f"{tmp}/{side}.st"]
            command += ["--rank", str(args.rank), "--arch", args.arch]
            rows[side] = run_child(command, f"the {side} side")
        base = rows["copy"]
        kohya = rows["fullsvd"]
        print("| run | seconds | vs. copy | vs. kohya's way | peak RSS above start | file |")
        print("|---|---|---|---|---|---|")
        labels = (
            ("copy", "copy (lower bound)"),
            ("fullsvd", "resize to 32, kohya's way (SVD of each whole update)"),
            ("rank32", "resize to 32, ours (thin QRs + rank x rank SVD)"),
            ("dynamic", "dynamic, 90 %, ours"),
        )
        for side, label in labels:
            r = rows[side]
            print(
                f"| {label} | {r['seconds']:.2f} | {r['seconds'] / base['seconds']:.1f}x | "
                f"{kohya['seconds'] / r['seconds']:.1f}x faster | {r['peak_mb']:.0f} MB | {r['bytes'] / 2**20:.1f} MB |"
            )
        for side in ("rank32", "dynamic"):
            print(f"{side}: {rows[side]['report']}")


if __name__ == "__main__":
    main()
