"""Generation at real scale on the GPU: txt2img speed against diffusers' own pipeline on the same weights, peak memory
under --medvram and --lowvram, and SDXL at 1024 px. Each part runs in its own process.

- speed: an SD1.5-size single file at 512 px, 20 steps, Euler a, CFG 7. Ours: `Txt2ImgService.run` (prompt parsing,
  chunked encoding, our denoising loop, decode, PNG-ready images). Baseline: `StableDiffusionPipeline.__call__` built
  from the very same components (same fp16 weights) and the same scheduler. Alternating runs, medians; it/s =
  steps / seconds of a whole generation (text encoding and decode included on both sides).
- offload: the same file with `--medvram` (diffusers model CPU offload) and `--lowvram` (sequential offload):
  peak allocated GPU memory of one generation (reset after loading), and its time.
- sdxl: an SDXL-size single file at 1024 px, 20 steps: ours against `StableDiffusionXLPipeline` on the same weights.

    python benchmarks/gpu_generation.py --sd1 SD15.safetensors --sdxl SDXL.safetensors [--markdown OUT.md]
    python benchmarks/gpu_generation.py --tiny      # CPU check of the script with tiny files at 64 px
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from random_checkpoint import make_checkpoint

PROMPT, NEGATIVE = "a photo of a red fox in the snow, detailed, sharp focus", "blurry, low quality"


def _services(path: Path, cpu: bool, **flags):
    from app.logs import quiet_libraries
    from app.services import build_services
    from app.settings import Settings

    quiet_libraries()
    settings = Settings(
        data_dir=Path(tempfile.mkdtemp()),
        ckpt_dir=path.parent,
        ckpt=path,
        use_cpu=["all"] if cpu else [],
        no_hashing=True,
        **flags,
    )
    return build_services(settings)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)


def _peak_mb(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else 0.0


def speed(args) -> dict:
    """Ours vs the diffusers pipeline on the same components (SD1.5 or SDXL)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from app.generation.samplers import build_scheduler
    from app.generation.txt2img import Txt2ImgParams

    services = _services(args.path, args.cpu)
    model = services.models.get()
    device, size, steps = model.device, args.size, args.steps
    scheduler = build_scheduler("Euler a", "Automatic", dict(model.pipe.scheduler.config))
    cls = StableDiffusionXLPipeline if model.is_xl else StableDiffusionPipeline
    pipe = cls(**{**model.pipe.components, "scheduler": scheduler})
    pipe.set_progress_bar_config(disable=True)
    params = Txt2ImgParams(
        prompt=PROMPT,
        negative_prompt=NEGATIVE,
        sampler_name="Euler a",
        steps=steps,
        width=size,
        height=size,
        seed=1,
        cfg_scale=7.0,
        save_images=False,
    )

    def ours() -> None:
        services.txt2img.run(params)

    def bare() -> None:
        pipe(
            PROMPT,
            negative_prompt=NEGATIVE,
            num_inference_steps=steps,
            guidance_scale=7.0,
            height=size,
            width=size,
            generator=torch.Generator("cpu").manual_seed(1),
            output_type="pil",
        )

    ours()
    bare()  # warm-up (kernels, allocator)
    times: dict[str, list[float]] = {"ours": [], "bare": []}
    peaks = {}
    for _ in range(args.repeats):
        for name, fn in (("ours", ours), ("bare", bare)):
            _peak_reset(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - start)
            peaks[name] = max(peaks.get(name, 0.0), _peak_mb(device))
    o, b = statistics.median(times["ours"]), statistics.median(times["bare"])
    return {
        "ours_its": steps / o,
        "bare_its": steps / b,
        "ours_s": o,
        "bare_s": b,
        "ours_peak_mb": peaks["ours"],
        "bare_peak_mb": peaks["bare"],
        "device": str(device),
        "dtype": str(model.dtype).replace("torch.", ""),
    }


def offload(args) -> dict:
    """One generation under --medvram or --lowvram: peak allocated after loading, and its time."""
    from app.generation.txt2img import Txt2ImgParams

    services = _services(args.path, args.cpu, medvram=args.part == "medvram", lowvram=args.part == "lowvram")
    model = services.models.get()
    if args.part == "lowvram":
        args.steps = min(args.steps, 8)  # every layer's weights stream in at every step: slow by design
    params = Txt2ImgParams(
        prompt=PROMPT,
        negative_prompt=NEGATIVE,
        sampler_name="Euler a",
        steps=args.steps,
        width=args.size,
        height=args.size,
        seed=1,
        save_images=False,
    )
    services.txt2img.run(params)  # warm-up: the hooks' first moves
    _peak_reset(model.device)
    start = time.perf_counter()
    services.txt2img.run(params)
    _sync(model.device)
    elapsed = time.perf_counter() - start
    return {
        "peak_mb": _peak_mb(model.device),
        "s": elapsed,
        "its": args.steps / elapsed,
        "steps": args.steps,
        "device": str(model.device),
    }


PARTS = {"speed": speed, "medvram": offload, "lowvram": offload, "sdxl": speed}


def run_part(part: str, path: Path, args) -> dict:
    command = [sys.executable, __file__, "--part", part, "--path", str(path), "--steps", str(args.steps)]
    command += ["--size", str(args.xl_size if part == "sdxl" else args.size), "--repeats", str(args.repeats)]
    command += ["--cpu"] if args.cpu else []
    out = subprocess.run(command, capture_output=True, text=True)
    if out.returncode != 0:  # reported in the table; the other parts still run
        print(out.stderr[-3000:], file=sys.stderr)
        return {"error": out.stderr.strip().splitlines()[-1][:200] if out.stderr.strip() else "failed"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sd1", type=Path)
    parser.add_argument("--sdxl", type=Path)
    parser.add_argument("--tiny", action="store_true", help="tiny files at 64 px on the CPU: checks the script only")
    parser.add_argument("--cpu", action="store_true")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--size", type=int, default=None)
    parser.add_argument("--xl-size", type=int, default=None)
    parser.add_argument("--markdown", type=Path)
    parser.add_argument("--part", choices=list(PARTS))
    parser.add_argument("--path", type=Path)
    args = parser.parse_args()
    args.cpu = args.cpu or args.tiny
    args.size = args.size or (64 if args.tiny else 512)
    args.xl_size = args.xl_size or (64 if args.tiny else 1024)
    if args.part:
        print(json.dumps(PARTS[args.part](args)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        if args.tiny:
            args.sd1 = make_checkpoint(Path(tmp) / "tiny-sd1.safetensors", "tiny-sd1")
            args.sdxl = make_checkpoint(Path(tmp) / "tiny-sdxl.safetensors", "tiny-sdxl")
        results = {part: run_part(part, args.sd1 if part != "sdxl" else args.sdxl, args) for part in PARTS}
    table = markdown(results, args)
    print(table)
    if args.markdown:
        args.markdown.write_text(table, encoding="utf-8")


def markdown(r: dict, args) -> str:
    def v(part: str, key: str, fmt: str = ".2f") -> str:
        return "failed" if "error" in r[part] else format(r[part][key], fmt)

    def ratio(part: str) -> str:
        return "failed" if "error" in r[part] else f"{r[part]['ours_its'] / r[part]['bare_its']:.3f}"

    scale = "SD1.5-size and SDXL-size single files, random weights"
    if args.tiny:
        scale = "tiny files, CPU (script check only)"
    device = r["speed"].get("device", "?") + " " + r["speed"].get("dtype", "")
    lines = [
        f"{scale}; {device}; Euler a, CFG 7, {args.steps} steps, median of {args.repeats}",
        "",
        "| generation | diffusers pipeline | ours | ratio ours/diffusers | peak allocated (ours / diffusers) |",
        "|---|---|---|---|---|",
        f"| SD1.5 {args.size} px | {v('speed', 'bare_its')} it/s | {v('speed', 'ours_its')} it/s | {ratio('speed')} | "
        f"{v('speed', 'ours_peak_mb', '.0f')} / {v('speed', 'bare_peak_mb', '.0f')} MB |",
        f"| SDXL {args.xl_size} px | {v('sdxl', 'bare_its')} it/s | {v('sdxl', 'ours_its')} it/s | {ratio('sdxl')} | "
        f"{v('sdxl', 'ours_peak_mb', '.0f')} / {v('sdxl', 'bare_peak_mb', '.0f')} MB |",
        "",
        "| SD1.5 generation, one image | peak allocated | time | it/s |",
        "|---|---|---|---|",
        f"| default (all on the GPU) | {v('speed', 'ours_peak_mb', '.0f')} MB | {v('speed', 'ours_s')} s | "
        f"{v('speed', 'ours_its')} |",
        f"| --medvram | {v('medvram', 'peak_mb', '.0f')} MB | {v('medvram', 's')} s | {v('medvram', 'its')} |",
        f"| --lowvram ({r['lowvram'].get('steps', '?')} steps) | {v('lowvram', 'peak_mb', '.0f')} MB | "
        f"{v('lowvram', 's')} s | {v('lowvram', 'its')} |",
        "",
    ]
    lines += [f"- {part} failed: {r[part]['error']}" for part in r if "error" in r[part]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
