"""Merging a LoRA into a full-size checkpoint: an SD1.5-size (or SDXL-size) base with random weights from our exporter
and two rank-32 kohya LoRAs on kohya's default layers (all built here: nothing downloaded), loaded as the app loads
them (fp32 on the CPU). Each side in its own process, after the model is loaded: the named baseline writes the
loaded model as an fp16 single file without any LoRA (what any merge must at least do), ours merges `<lora:x:1>`
into it through the LoRA tab's path (`LoraTools.merge`) and writes the same kind of file; and the two LoRAs are
merged into one rank-32 LoRA (`LoraTools.merge_to_lora`, kohya's svd_merge_lora), from the LoRAs' halves (ours)
and, as its named baseline, from each layer's whole summed matrix (kohya's way). Prints seconds, peak RSS above the
loaded model and the ratios.

    .venv/bin/python benchmarks/lora_merge.py [--arch sd1|sdxl]   (tiny-sd1: the tests')
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


def child(args) -> dict:
    from baselines import PeakMemory

    from app.lora.merge import checkpoint_tensors, write_checkpoint
    from app.services import build_services
    from app.settings import Settings

    services = build_services(Settings(data_dir=Path(args.data)))
    model = services.models.get()
    memory = PeakMemory(torch.device("cpu"))
    memory.start()  # the loaded model is the idle level: what the merge itself adds
    started = time.perf_counter()
    if args.child == "save":
        out = Path(args.data) / "models" / "Stable-diffusion" / "saved.safetensors"
        write_checkpoint(out, checkpoint_tensors(model.pipe, model.pipe.vae, torch.float16), {})
        report = "the loaded model, no LoRA"
    elif args.child == "merge":
        out, merged = services.merge_lora("<lora:x:1>", "merged")
        report = merged.sentence()
    else:  # two LoRAs as one (kohya's svd_merge_lora)
        import app.lora.tools as tools
        from app.lora.extract import ExtractOptions

        if args.child == "one-whole":  # the named baseline: every layer's SVD of the whole summed matrix (kohya's)
            tools.low_rank_terms = lambda parts: {}

        out, one = services.merge_to_lora("<lora:x:0.5> <lora:y:0.5>", args.child, ExtractOptions(rank=32))
        report = one.sentence()
    seconds = time.perf_counter() - started
    return {
        "seconds": seconds,
        "peak_mb": memory.peak_mb() - memory.idle_mb,
        "bytes": out.stat().st_size,
        "report": report,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--arch", choices=["sd1", "sdxl", "tiny-sd1"], default="sd1")
    parser.add_argument("--child", default=None)
    parser.add_argument("--data", default="")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    from baselines import run_child
    from lora_resize import make_lora
    from random_checkpoint import make_in_subprocess

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "models" / "Stable-diffusion"
        ckpt.mkdir(parents=True)
        base = make_in_subprocess(args.arch, ckpt)
        (Path(tmp) / "models" / "Lora").mkdir()
        make_lora(Path(tmp) / "models" / "Lora" / "x.safetensors", args.arch, 32)
        make_lora(Path(tmp) / "models" / "Lora" / "y.safetensors", args.arch, 32, seed=1)
        print(
            f"{args.arch.upper()}-size checkpoint, fp16 file of {base.stat().st_size / 2**30:.2f} GiB; "
            "two rank-32 LoRAs"
        )
        rows = {}
        for side in ("save", "merge", "one-whole", "one"):
            command = [sys.executable, __file__, "--child", side, "--data", tmp, "--arch", args.arch]
            rows[side] = run_child(command, f"the {side} side")
        saved = rows["save"]
        print("| run | seconds | vs. saving alone | peak RSS above the loaded model | file |")
        print("|---|---|---|---|---|")
        labels = (
            ("save", "save the loaded model (no LoRA)"),
            ("merge", "merge `<lora:x:1>` and save"),
            ("one-whole", "`<lora:x:0.5> <lora:y:0.5>` as one rank-32 LoRA, SVD of each whole matrix (kohya's)"),
            ("one", "the same, SVD from the LoRAs' halves (ours)"),
        )
        for side, label in labels:
            r = rows[side]
            print(
                f"| {label} | {r['seconds']:.1f} | {r['seconds'] / saved['seconds']:.2f}x | {r['peak_mb']:.0f} MB | "
                f"{r['bytes'] / 2**20:.1f} MB |"
            )
        print(f"merge: {rows['merge']['report']}")
        print(f"one: {rows['one']['report']}")
        print(f"one-whole: {rows['one-whole']['report']}")
        whole, ours = rows["one-whole"], rows["one"]
        print(
            f"two LoRAs as one: {whole['seconds'] / ours['seconds']:.1f}x faster from the halves than from the whole "
            f"matrices ({ours['seconds']:.1f} s vs {whole['seconds']:.1f} s); peak RSS {ours['peak_mb']:.0f} vs "
            f"{whole['peak_mb']:.0f} MB above the loaded model"
        )


if __name__ == "__main__":
    main()
