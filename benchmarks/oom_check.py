"""Running out of memory on a small GPU, for real: a 6 GB card made on a bigger one with torch's per-process cap
(`torch.cuda.set_per_process_memory_fraction`: the caching allocator refuses what would go past it, with the same
`torch.OutOfMemoryError` a 6 GB card raises). Checks what tests/test_out_of_memory.py checks on the CPU, on CUDA:
each too-large request ends with our message, the memory comes back (allocated after = allocated before), and the
request after it works.

Cases, in one process on an SD1.5-size file in fp16: txt2img 2048x2048 at batch 8 (too large: the first
feed-forward's inner activations alone are 5 GB), then 512x512 at batch 1, twice each; an embedding trained at
512 px batch 8 without checkpointing (too large: the step), then the same with checkpointing `auto` (the default:
the first step runs out without it, and is done again with it), then at batch 1 with checkpointing on. Prints a
markdown table: case, outcome, seconds, GPU memory allocated after it, the message.

    python benchmarks/oom_check.py --ckpt SD15.safetensors [--card-gb 6] [--markdown OUT.md]
    python benchmarks/oom_check.py --tiny    # CPU check of the script: shapes-64, data memory capped (RLIMIT_DATA)
    python benchmarks/oom_check.py --ckpt SD15.safetensors --cpu-headroom-gb 2.5   # the same at full size, CPU
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from baselines import cap_data_memory, data_size_gb, make_images

ROOT = Path(__file__).resolve().parents[1]
GB = 2**30


def allocated(device: torch.device) -> float:
    """GB the app holds now: the CUDA allocator's count, or the process's data size on the CPU."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / GB
    return data_size_gb()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", type=Path, help="an SD1.5-size single file (benchmarks/random_checkpoint.py sd1)")
    parser.add_argument("--tiny", action="store_true", help="shapes-64 on the CPU, sizes scaled down")
    parser.add_argument("--card-gb", type=float, default=6.0, help="the card to act as (CUDA)")
    parser.add_argument(
        "--cpu-headroom-gb", type=float, default=0.25, help="on the CPU: the cap above the warmed-up process's data"
    )
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from app.generation.txt2img import Txt2ImgParams
    from app.logs import quiet_libraries
    from app.models.out_of_memory import OutOfMemoryError
    from app.services import build_services
    from app.settings import Settings
    from app.training.config import TrainConfig

    quiet_libraries()
    work = Path(tempfile.mkdtemp())
    if args.tiny:
        folder = work / "models" / "Stable-diffusion"
        shutil.copytree(ROOT / "models" / "Stable-diffusion" / "shapes-64", folder / "shapes-64")
        settings = Settings(data_dir=work, use_cpu=["all"], no_hashing=True)
        big, small, train_big, train_small = (2048, 8), (64, 1), (384, 8), (64, 1)
    else:
        if args.ckpt is None:
            parser.error("--ckpt is needed (or --tiny)")
        settings = Settings(data_dir=work, ckpt_dir=args.ckpt.parent, ckpt=args.ckpt, no_hashing=True)
        big, small, train_big, train_small = (2048, 8), (512, 1), (512, 8), (512, 1)
    services = build_services(settings)
    model = services.models.get()
    device = model.device
    images = work / "stars"
    make_images(images, 96, max(train_big[1], 4))
    services.embeddings.create("oomcheck", 1, "star", True)

    def generate(size: int, batch: int) -> tuple[str, str]:
        params = Txt2ImgParams(
            prompt="a star",
            steps=4 if args.tiny else 10,
            width=size,
            height=size,
            batch_size=batch,
            seed=1,
            save_images=False,
        )
        services.txt2img.generate(params)
        return "ok", ""

    def train(size: int, batch: int, checkpointing: str) -> tuple[str, str]:
        """(outcome, note): the note says when `auto` turned checkpointing on."""
        cfg = TrainConfig(
            name="oomcheck",
            data_root=str(images),
            training_width=size,
            training_height=size,
            batch_size=batch,
            steps=(services.embeddings.listing()["loaded"]["oomcheck"]["step"] or 0) + 1,
            learn_rate="0.001",
            create_image_every=0,
            save_every=0,
            template_filename="style_filewords.txt",
            gradient_checkpointing=checkpointing,
        )
        result = services.training.train_embedding(cfg).wait()
        turned_on = result.checkpointing_from
        return result.error or "ok", f"checkpointing turned on at step {turned_on}" if turned_on else ""

    generate(*small)  # warm-up: kernels, allocator pools, threads
    auto_case = f"embedding {train_big[0]} px, batch {train_big[1]}, checkpointing auto"
    cases = [
        (f"txt2img {big[0]} px, batch {big[1]}", lambda: generate(*big)),
        (f"txt2img {small[0]} px, batch {small[1]}", lambda: generate(*small)),
        (f"txt2img {big[0]} px, batch {big[1]} (again)", lambda: generate(*big)),
        (f"txt2img {small[0]} px, batch {small[1]} (again)", lambda: generate(*small)),
        (
            f"embedding {train_big[0]} px, batch {train_big[1]}, no checkpointing",
            lambda: train(*train_big, checkpointing="off"),
        ),
        (auto_case, lambda: train(*train_big, checkpointing="auto")),
        (
            f"embedding {train_small[0]} px, batch {train_small[1]}, checkpointing",
            lambda: train(*train_small, checkpointing="on"),
        ),
    ]
    before = allocated(device)
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.card_gb * GB / total), device)
        cap = f"{args.card_gb:g} GB card (per-process cap on {torch.cuda.get_device_name(device)})"
    else:
        limit = cap_data_memory(args.cpu_headroom_gb)
        cap = f"data memory capped at {limit / GB:.2f} GB (RLIMIT_DATA), CPU"
    rows, notes = [], {}
    for name, run in cases:
        start = time.perf_counter()
        try:
            outcome, notes[name] = run()
        except OutOfMemoryError as e:
            outcome, notes[name] = str(e), ""
        seconds = time.perf_counter() - start
        kind = "ok" if outcome == "ok" else "out of memory" if "out of memory" in outcome.lower() else "error"
        message = notes[name] if outcome == "ok" else outcome.replace("|", "/")
        rows.append(f"| {name} | {kind} | {seconds:.1f} | {allocated(device):.2f} | {message} |")
        print(rows[-1], flush=True)
    lines = [
        f"{model.info.title}, {str(model.dtype).replace('torch.', '')}; {cap}; allocated before the cases: "
        f"{before:.2f} GB.",
        "",
        "| case | outcome | s | allocated after (GB) | message |",
        "|---|---|---|---|---|",
        *rows,
    ]
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        args.markdown.write_text(text + "\n")
    expected = ["out of memory", "ok"] * 2 + ["out of memory", "ok", "ok"]
    got = [row.split(" | ")[1] for row in rows]
    if got != expected:
        sys.exit(f"expected {expected}, got {got}")
    if not notes[auto_case]:
        sys.exit("checkpointing auto: the step that ran out without it should have turned it on")


if __name__ == "__main__":
    main()
