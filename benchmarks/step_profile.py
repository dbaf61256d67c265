"""What one training step costs, counted rather than timed: where a step is bound by kernel launches (an SD1.5
model at 512 px on a fast GPU), the number of ops, kernel launches and host syncs per step says why one side is
slower. Ours (the training loop itself, `app.training.loop.train`) against the baseline of `baselines.py`, an
embedding at batch 1, each side in its own process, under PyTorch's profiler.

Per step: wall time; aten ops dispatched; on CUDA also kernels launched, the kernels' summed GPU time (the GPU's
busy time: far below the wall time means launch-bound), and the host syncs (`cudaStreamSynchronize`,
`cudaDeviceSynchronize`, `cudaMemcpy`), each of which makes the CPU wait for the GPU. Ours is counted as the
difference between a run of 1 + `--steps` steps and a run of 1 step, so the latent cache and the saves at the end
cancel out; the baseline's steps are profiled directly after one warm-up step.

    python benchmarks/step_profile.py --ckpt SD15.safetensors [--size 512] [--steps 3] [--no-checkpointing]
    python benchmarks/step_profile.py --tiny --cpu      # a tiny SD1 file at 64 px: checks the script
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch
from baselines import run_child
from random_checkpoint import make_in_subprocess

SYNCS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaMemcpy")


def counts(prof) -> Counter:
    """Ops, kernels, GPU time (us) and syncs in one profile."""
    c: Counter = Counter()
    for e in prof.key_averages():
        if e.key.startswith("aten::"):
            c["aten_ops"] += e.count
        if e.key in SYNCS:
            c["syncs"] += e.count
        if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC"):
            c["launches"] += e.count
        if e.device_type == torch.autograd.DeviceType.CUDA:
            c["gpu_us"] += getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0))
    return c


def child(args) -> dict:
    from baselines import baseline_step, make_images

    from app.logs import quiet_libraries
    from app.services import build_services
    from app.settings import Settings
    from app.training.config import TrainConfig
    from app.training.dataset import load_dataset
    from app.training.loop import train
    from app.training.targets import EmbeddingTarget
    from app.training.templates import read_template

    quiet_libraries()
    tmp = Path(tempfile.mkdtemp())
    make_images(tmp / "data", args.size)
    settings = Settings(
        data_dir=tmp, ckpt_dir=args.ckpt.parent, ckpt=args.ckpt, use_cpu=["all"] if args.cpu else [], no_hashing=True
    )
    services = build_services(settings)
    model = services.models.get()
    templates = read_template(settings.templates_dir, "subject.txt", True)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if model.device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)

    def sync() -> None:
        if model.device.type == "cuda":
            torch.cuda.synchronize(model.device)

    def profiled(fn):
        """The counts of `fn()` and its value."""
        sync()
        with torch.profiler.profile(activities=activities) as prof:
            value = fn()
            sync()
        return counts(prof), value

    if args.side == "ours":
        images, _ = load_dataset(str(tmp / "data"), args.size, args.size, templates, 3)

        def run(steps: int):
            services.embeddings.create("zqprof", 1, "star", overwrite=True)
            (services.settings.embeddings_dir / "zqprof.optim").unlink(missing_ok=True)
            services.embeddings.db.refresh()
            cfg = TrainConfig(
                name="zqprof",
                data_root=str(tmp / "data"),
                training_width=args.size,
                training_height=args.size,
                steps=steps,
                learn_rate="0.005",
                save_every=0,
                create_image_every=0,
                template_filename="subject.txt",
                gradient_checkpointing=not args.no_checkpointing,
            )
            target = EmbeddingTarget(services.embeddings.db.get("zqprof"), model, services.embeddings.db)
            result = train(target, model, cfg, images, templates, tmp / "log", 1)
            if result.error:
                raise SystemExit(result.error)
            return result

        run(2)  # warm-up: kernels chosen, allocator grown
        one, _ = profiled(lambda: run(1))
        more, result = profiled(lambda: run(1 + args.steps))
        per_step = {k: (more[k] - one[k]) / args.steps for k in set(more) | set(one)}
        wall = sum(result.step_seconds[1:]) / args.steps  # the loop's own step timing (saves excluded)
    else:
        files = sorted((tmp / "data").glob("*.png"))
        step = baseline_step("embedding", model, files, templates, args.size, 1)
        step(0)
        step(1)  # warm-up
        start = time.perf_counter()
        total, _ = profiled(lambda: [step(2 + i) for i in range(args.steps)])
        per_step = {k: v / args.steps for k, v in total.items()}
        wall = (time.perf_counter() - start) / args.steps
    return {"wall_s": wall, **per_step, "device": str(model.device), "dtype": str(model.dtype).replace("torch.", "")}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ckpt", type=Path, default=None, help="an SD 1.x single file (default: a random one)")
    parser.add_argument("--size", type=int, default=None, help="px (default 512; 64 with --tiny)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--cpu", action="store_true")
    parser.add_argument("--tiny", action="store_true", help="a tiny SD1 file: checks the script")
    parser.add_argument("--no-checkpointing", action="store_true", help="ours without activation checkpointing")
    parser.add_argument("--markdown", type=Path, default=None)
    parser.add_argument("--side", choices=["ours", "baseline"], default=None)
    args = parser.parse_args()
    args.size = args.size or (64 if args.tiny else 512)
    if args.side:
        print(json.dumps(child(args)))
        return
    use_cuda = torch.cuda.is_available() and not args.cpu
    with tempfile.TemporaryDirectory() as tmp:
        config = "tiny-sd1" if args.tiny else "sd1"
        ckpt = args.ckpt or make_in_subprocess(config, Path(tmp), "cuda" if use_cuda else "cpu")
        runs = {}
        for side in ("baseline", "ours"):
            command = [sys.executable, __file__, "--side", side, "--ckpt", str(ckpt), "--size", str(args.size)]
            command += ["--steps", str(args.steps)]
            command += ["--cpu"] * args.cpu + ["--no-checkpointing"] * args.no_checkpointing
            runs[side] = run_child(command, side)
    table = markdown(runs, args)
    print(table)
    if args.markdown:
        args.markdown.write_text(table, encoding="utf-8")


def markdown(runs: dict, args) -> str:
    base, ours = runs["baseline"], runs["ours"]
    rows = [
        ("wall time per step", "wall_s", "{:.3f} s"),
        ("aten ops dispatched", "aten_ops", "{:.0f}"),
        ("kernel launches", "launches", "{:.0f}"),
        ("GPU busy (kernel time)", "gpu_us", "{:.0f} us"),
        ("host syncs (the CPU waits for the GPU)", "syncs", "{:.0f}"),
    ]
    name = "tiny SD1 file" if args.tiny else "SD1 single file"
    checkpointing = "off" if args.no_checkpointing else "on"
    lines = [
        f"Per embedding step, {name}, {args.size} px, batch 1, {ours['device']} {ours['dtype']}, ours with "
        f"checkpointing {checkpointing}; means over {args.steps} steps",
        "",
        "| per step | baseline | ours | ours/baseline |",
        "|---|---|---|---|",
    ]
    for label, key, fmt in rows:
        b, o = base.get(key, 0.0), ours.get(key, 0.0)
        if key != "wall_s" and b == 0 and o == 0:
            continue  # nothing of the kind on this device (kernels and syncs on the CPU)
        ratio = f"{o / b:.2f}" if b else "-"
        lines.append(f"| {label} | {fmt.format(b)} | {fmt.format(o)} | {ratio} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
