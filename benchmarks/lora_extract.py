"""Extracting a LoRA from a full-size fine-tune: an SD1.5-size (or SDXL-size) base checkpoint with random weights from
our exporter, and a "fine-tune" of it: the base plus a change in every layer kohya's LoRA covers (UNet transformer
blocks, text encoder), made of a decaying spectrum as fine-tunes' changes have plus a little noise; both fp16
single files (nothing downloaded). Each side, in its own process, reads the two files as the LoRA tab does and
writes a rank-32 LoRA of every covered layer (`min_diff` 0: the text encoders too): kohya's way
(`extract_lora_from_models.py`: the full SVD of each layer's change, U·S and Vh clamped), the named baseline, then
ours (thin SVD, the same clamp, balanced halves, unchanged layers left out).
Prints the seconds of the extraction (reading the files apart: the same for both), peak RSS above the process's
start, the file sizes, the ratio, and how far apart the two files' updates are.

    .venv/bin/python benchmarks/lora_extract.py [--arch sd1|sdxl] [--rank 32]   (tiny-sd1, tiny-sdxl: the tests')
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
for folder in (ROOT, ROOT / "benchmarks"):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))


COVERED = (".transformer_blocks.", ".proj_in.", ".proj_out.", ".layers.", ".resblocks.")  # kohya's LoRA layers


def make_fine_tune(base: Path, tuned: Path) -> int:
    """`tuned` = `base` + a rank-64 change with a decaying spectrum (+ noise) in each weight matrix of the layers
    kohya's LoRA covers (found by their original-layout names); the number of matrices changed."""
    from safetensors.torch import load_file, save_file

    state = load_file(str(base))
    g = torch.Generator().manual_seed(1)
    changed = 0
    for key, w in state.items():
        vae = key.startswith(("first_stage_model.", "vae."))  # its attention's proj_out is no LoRA layer
        if vae or w.ndim < 2 or not key.endswith("weight") or not any(part in key for part in COVERED):
            continue
        out, rest = w.shape[0], w[0].numel()
        r = min(64, out, rest)
        decay = 0.9 ** torch.arange(r, dtype=torch.float32)
        change = (torch.randn(out, r, generator=g) * decay) @ torch.randn(r, rest, generator=g) * 1e-3
        change += torch.randn(out, rest, generator=g) * 1e-4
        state[key] = (w.float() + change.reshape(w.shape)).to(w.dtype)
        changed += 1
    save_file(state, str(tuned))
    return changed


def kohya_layer(diff: torch.Tensor, rank: int, sv_fro: float = 0.0, clamp_quantile: float = 0.99):
    """kohya's `extract_lora_from_models.py` for one layer: the full SVD of the change (its `torch.linalg.svd`
    default), up = U·S and down = Vh, both clamped at the quantile of their values."""
    from app.lora.extract import quantile

    matrix = diff.reshape(diff.shape[0], -1).float()
    u, s, vh = torch.linalg.svd(matrix)
    k = min(rank, *matrix.shape)
    up, down = u[:, :k] @ torch.diag(s[:k]), vh[:k]
    high = quantile(torch.cat([up.flatten(), down.flatten()]), clamp_quantile)
    up, down = up.clamp(-high, high), down.clamp(-high, high)
    if diff.ndim == 4:
        down, up = down.reshape(k, *diff.shape[1:]), up.reshape(diff.shape[0], k, 1, 1)
    kept = float((s[:k] ** 2).sum() / (s**2).sum()) ** 0.5
    return down.contiguous(), up.contiguous(), kept


def child(args) -> dict:
    from baselines import PeakMemory

    import app.lora.extract as extract
    from app.lora.names import model_components
    from app.models.checkpoints import CheckpointInfo
    from app.models.manager import read_pipeline

    memory = PeakMemory(torch.device("cpu"))
    memory.start()  # after the imports: what the work itself adds
    started = time.perf_counter()
    pipes = [read_pipeline(CheckpointInfo(Path(p), Path(p).name, "single_file"), torch.float16) for p in args.files]
    read = time.perf_counter() - started
    if args.child == "kohya":
        extract.extract_layer = kohya_layer  # the same extraction, each layer's SVD and clamp taken kohya's way
    started = time.perf_counter()
    report = extract.extract_lora(
        model_components(pipes[0]),
        model_components(pipes[1]),
        Path(args.out),
        extract.ExtractOptions(rank=args.rank, min_diff=0.0),
        {},
        device=args.device,
    )
    if args.device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    peak = memory.peak_mb() - memory.idle_mb
    return {
        "read": read,
        "seconds": seconds,
        "peak_mb": peak,
        "bytes": Path(args.out).stat().st_size,
        "report": report.sentence(),
    }


def difference(ours: Path, kohya: Path) -> float:
    """The largest relative Frobenius distance between the two files' updates (up @ down) over their layers."""
    from safetensors.torch import load_file

    a, b = load_file(str(ours)), load_file(str(kohya))
    worst = 0.0
    for key in a:
        if not key.endswith(".lora_down.weight"):
            continue
        name = key[: -len(".lora_down.weight")]
        updates = []
        for t in (a, b):
            down, up = t[name + ".lora_down.weight"].float(), t[name + ".lora_up.weight"].float()
            updates.append(up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1))
        worst = max(worst, float((updates[0] - updates[1]).norm() / updates[1].norm()))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--arch", choices=["sd1", "sdxl", "tiny-sd1", "tiny-sdxl"], default="sd1")
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--device", default="cpu", help="where the SVDs run (cuda: as the app on a GPU)")
    parser.add_argument("--base", default="", help="an existing random-weight file of --arch (else one is made)")
    parser.add_argument("--markdown", default="", help="also write the table and lines to this file")
    parser.add_argument("--ours-only", action="store_true", help="skip kohya's way (the GPU check's time budget)")
    parser.add_argument("--child", default=None)
    parser.add_argument("--files", nargs=2, default=None)
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    if args.child == "make":
        print(make_fine_tune(Path(args.files[0]), Path(args.files[1])))
        return
    if args.child:
        print(json.dumps(child(args)))
        return
    from baselines import run_child
    from random_checkpoint import make_in_subprocess

    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(args.base) if args.base else make_in_subprocess(args.arch, Path(tmp))
        tuned = Path(tmp) / "tuned.safetensors"
        make = [sys.executable, __file__, "--child", "make", "--files", str(base), str(tuned)]
        changed = subprocess.run(make, capture_output=True, text=True, check=True)  # its own process: 2 GB+ freed
        lines.append(
            f"{args.arch.upper()}-size base and fine-tune, fp16 files of {base.stat().st_size / 2**30:.2f} GiB, "
            f"{changed.stdout.strip().splitlines()[-1]} layers changed; rank {args.rank}; SVDs on {args.device}"
        )
        lines.append("")
        rows = {}
        sides = ("ours",) if args.ours_only else ("kohya", "ours")
        for side in sides:
            out = Path(tmp) / f"{side}.safetensors"
            command = [sys.executable, __file__, "--child", side, "--files", str(base), str(tuned), "--out", str(out)]
            command += ["--rank", str(args.rank), "--arch", args.arch, "--device", args.device]
            rows[side] = run_child(command, f"the {side} side")
        kohya = rows.get("kohya")
        lines.append("| run | reading both files, s | extraction, s | vs. kohya's way | peak RSS above start | file |")
        lines.append("|---|---|---|---|---|---|")
        labels = (("kohya", "kohya's way (full SVD of each change)"), ("ours", "ours (thin SVD, balanced halves)"))
        for side, label in labels:
            r = rows.get(side)
            if r is None:
                continue
            ratio = f"{kohya['seconds'] / r['seconds']:.2f}x faster" if kohya else "-"
            lines.append(
                f"| {label} | {r['read']:.1f} | {r['seconds']:.1f} | {ratio} | {r['peak_mb']:.0f} MB | "
                f"{r['bytes'] / 2**20:.1f} MB |"
            )
        lines.append("")
        lines.append(f"ours: {rows['ours']['report']}")
        if kohya:
            gap = difference(Path(tmp) / "ours.safetensors", Path(tmp) / "kohya.safetensors")
            lines.append(f"largest relative distance between the two files' updates (fp16 files): {gap:.2e}")
    print("\n".join(lines))
    if args.markdown:
        Path(args.markdown).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
