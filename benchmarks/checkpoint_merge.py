"""The Checkpoint Merger at full size: two (weighted sum) or three (add difference) SD1.5-size (or SDXL-size)
checkpoints with random weights from our exporter (fp16 files, nothing downloaded), merged into an fp16 file. Each
side in its own process. Named baseline: A1111's `run_modelmerger` as it works (written here from its algorithm):
B (and C) read whole, B - C formed in place, A read whole, each merged key replaced in A's dict, halved, and the
whole dict saved with `safetensors.torch.save_file`. Ours: `CheckpointMerger` (the tab's and the API's path), which
reads one tensor at a time and writes the file as it goes. Hashing is off on both sides (A1111 hashes the inputs
too, once per file, cached). The page cache is dropped before each side where allowed (root), so both read from
the disk. Prints seconds, peak RSS above the start, the ratios, and how far apart the two files are (A1111
computes in fp16, ours in fp32).

    .venv/bin/python benchmarks/checkpoint_merge.py [--arch sd1|sdxl|tiny-sd1] [--method ws|ad]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
for folder in (ROOT, ROOT / "benchmarks"):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

METHODS = {"ws": "Weighted sum", "ad": "Add difference"}
MULTIPLIER = 0.3


def a1111_side(files: list[Path], method: str, out: Path) -> None:
    """A1111's merge: whole state dicts in memory, merged key by key in place, saved whole."""
    from safetensors.torch import load_file, save_file

    theta_1 = load_file(str(files[1]))
    if method == "Add difference":
        theta_2 = load_file(str(files[2]))
        for key in theta_1:
            if "model" in key:
                theta_1[key] = theta_1[key] - theta_2[key] if key in theta_2 else torch.zeros_like(theta_1[key])
        del theta_2
    theta_0 = load_file(str(files[0]))
    for key in theta_0:
        if "model" in key and key in theta_1:
            a, b = theta_0[key], theta_1[key]
            merged = (1 - MULTIPLIER) * a + MULTIPLIER * b if method == "Weighted sum" else a + MULTIPLIER * b
            theta_0[key] = merged.half() if merged.dtype == torch.float32 else merged
    del theta_1
    save_file(theta_0, str(out), metadata={"format": "pt"})


def child(args) -> dict:
    from baselines import PeakMemory

    files = [Path(f) for f in args.files]
    memory = PeakMemory(torch.device("cpu"))
    if args.child == "a1111":
        memory.start()
        started = time.perf_counter()
        a1111_side(files, METHODS[args.method], Path(args.out))
    else:
        from app.models.manager import ModelManager
        from app.models.merger import CheckpointMerger, MergerOptions
        from app.settings import Settings

        merger = CheckpointMerger(ModelManager(Settings(data_dir=Path(args.data), no_hashing=True)))
        names = [f.name for f in files]
        options = MergerOptions(
            *names, interp_method=METHODS[args.method], multiplier=MULTIPLIER, custom_name=Path(args.out).stem
        )
        memory.start()  # after the imports and the folder scan: what the merge itself adds
        started = time.perf_counter()
        merger.merge(options)
    return {"seconds": time.perf_counter() - started, "peak_mb": memory.peak_mb() - memory.idle_mb}


def max_difference(first: Path, second: Path) -> tuple[float, int]:
    """The largest difference between the two files' tensors (read one at a time) and how many keys they share."""
    from safetensors import safe_open

    worst, shared = 0.0, 0
    with safe_open(str(first), "pt") as f, safe_open(str(second), "pt") as g:
        keys = set(f.keys()) & set(g.keys())
        for key in keys:
            a, b = f.get_tensor(key), g.get_tensor(key)
            if a.dtype.is_floating_point:
                worst = max(worst, float((a.float() - b.float()).abs().max()) if a.numel() else 0.0)
            shared += 1
    return worst, shared


def drop_page_cache() -> bool:
    """Flush written files and drop the page cache, so each side reads its inputs from the disk (otherwise the
    first side finds the freshly made files cached and the second, after the first's memory pushed them out, does
    not); False where that is not allowed."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("1")
    except OSError:
        return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--arch", choices=["sd1", "sdxl", "tiny-sd1"], default="sd1")
    parser.add_argument("--method", choices=list(METHODS), default="ws")
    parser.add_argument("--child", default=None)
    parser.add_argument("--data", default="")
    parser.add_argument("--out", default="")
    parser.add_argument("--files", nargs="*", default=[])
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    from baselines import run_child
    from random_checkpoint import make_in_subprocess

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "models" / "Stable-diffusion"
        ckpt.mkdir(parents=True)
        count = 3 if args.method == "ad" else 2
        files = [make_in_subprocess(args.arch, ckpt, seed=seed) for seed in range(count)]
        size = files[0].stat().st_size / 2**30
        print(f"{args.arch.upper()}-size checkpoints, {count} fp16 files of {size:.2f} GiB; {METHODS[args.method]}")
        rows = {}
        cold = True
        for side in ("a1111", "ours"):
            cold = drop_page_cache() and cold
            out = Path(tmp) / "out" / f"merged-{side}.safetensors"
            out.parent.mkdir(exist_ok=True)
            if side == "ours":
                out = ckpt / f"merged-{side}.safetensors"
            command = [sys.executable, __file__, "--child", side, "--data", tmp, "--out", str(out), "--method",
                       args.method, "--files", *map(str, files)]  # fmt: skip
            try:
                rows[side] = {**run_child(command, f"the {side} side"), "path": out}
            except SystemExit as failed:  # A1111's way may not fit in memory at SDXL size: say so, measure ours
                if side != "a1111":
                    raise
                print(f"A1111's side did not finish: {failed}")
        base, ours = rows.get("a1111"), rows["ours"]
        print("| run | seconds | peak RSS above start | file |")
        print("|---|---|---|---|")
        for side, label in (("a1111", "A1111's merger (whole state dicts)"), ("ours", "ours (one tensor at a time)")):
            r = rows.get(side)
            if r is None:
                print(f"| {label} | did not finish (out of memory) | | |")
                continue
            print(
                f"| {label} | {r['seconds']:.1f} | {r['peak_mb']:.0f} MB | {r['path'].stat().st_size / 2**20:.1f} MB |"
            )
        print(
            "both sides read the inputs from the disk (page cache dropped before each)"
            if cold
            else "page cache not dropped (needs root): the first side may have read files still cached"
        )
        if base is None:
            return
        worst, shared = max_difference(base["path"], ours["path"])
        print(
            f"ours vs A1111: {base['seconds'] / ours['seconds']:.2f}x the speed, "
            f"{ours['peak_mb'] / max(base['peak_mb'], 1):.2f}x the peak memory "
            f"({ours['peak_mb']:.0f} vs {base['peak_mb']:.0f} MB); the files' {shared} shared tensors differ by at "
            f"most {worst:.2e} (fp16 arithmetic vs fp32)"
        )


if __name__ == "__main__":
    main()
