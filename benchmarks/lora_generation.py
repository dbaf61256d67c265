"""Generation with a LoRA against generation without one, on the same loaded model, in the same process.

An SD1.5-size single file with random weights (our exporter, nothing downloaded) at 512 px, or the tiny layout at
64 px with `--tiny`. Two kohya-format LoRAs of rank 32 (`--rank`) on every Linear/1x1 layer of the UNet's
transformer blocks (kohya's default targets) and every projection of the text encoder, random values; `--kind loha`,
`lokr`, `ia3`, `oft` or `glora` writes LyCORIS files of that kind over the same layers instead.

Printed: seconds per whole generation (prompt encoding, sampling, decode) without a LoRA (the baseline), with
`<lora:a:0.8>`, and alternating `<lora:a>`/`<lora:b>` (switching); the ratio to the baseline; the time to put the
layers in and take them out (`lora_applied` enter + exit); one UNet forward (a sampling step) with the LoRA
merged against the same forward without, alternating (what scales with the step count); the time to read a file
the first time.

    python benchmarks/lora_generation.py [--ckpt SD15.safetensors] [--steps 20] [--repeats 3] [--markdown OUT.md]
    python benchmarks/lora_generation.py --tiny      # the tiny layout at 64 px on the CPU (checks the script)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from random_checkpoint import make_checkpoint

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PROMPT, NEGATIVE = "a photo of a red fox in the snow, detailed, sharp focus", "blurry, low quality"


def factors(n: int) -> tuple[int, int]:
    """n as a * b with a <= b and a as large as possible (LyCORIS's LoKr factorization, unlimited factor)."""
    a = max(d for d in range(1, int(n**0.5) + 1) if n % d == 0)
    return a, n // a


def write_lora(pipe, path: Path, rank: int, seed: int, kind: str = "lora") -> int:
    """A kohya-format LoRA (or a LyCORIS file of another `kind`) over the transformer blocks and the text encoder;
    returns the parameters it touches."""
    from safetensors.torch import save_file

    from app.lora.names import ldm_unet_path

    g = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    touched = 0

    def add(name: str, module: torch.nn.Module) -> None:
        nonlocal touched
        w = module.weight
        r = min(rank, w.shape[0], w.shape[1])

        def random(*shape: int, scale: float = 0.02) -> torch.Tensor:
            return (torch.randn(shape, generator=g) * scale).half()

        if kind == "loha":  # (w1_a @ w1_b) * (w2_a @ w2_b)
            for half in ("w1", "w2"):
                tensors[f"{name}.hada_{half}_a"] = random(w.shape[0], r, scale=0.15)
                tensors[f"{name}.hada_{half}_b"] = random(r, w[0].numel(), scale=0.15)
        elif kind == "lokr":  # w1 (full) ⊗ (w2_a @ w2_b)
            (o1, o2), (i1, i2) = factors(w.shape[0]), factors(w.shape[1])
            tensors[f"{name}.lokr_w1"] = random(o1, i1, scale=0.15)
            tensors[f"{name}.lokr_w2_a"] = random(o2, min(r, o2, i2), scale=0.15)
            tensors[f"{name}.lokr_w2_b"] = random(min(r, o2, i2), i2 * w[0, 0].numel(), scale=0.15)
        elif kind == "ia3":  # W * w per output row
            tensors[f"{name}.weight"] = random(w.shape[0], scale=0.1)
            tensors[f"{name}.on_input"] = torch.tensor(0)
        elif kind == "oft":  # blocks of rows turned by Cayley rotations (blocks of at most `rank` rows)
            size = max(d for d in range(1, r + 1) if w.shape[0] % d == 0)
            tensors[f"{name}.oft_blocks"] = random(w.shape[0] // size, size, size, scale=0.01)
        elif kind == "glora":  # W @ a1 @ a2 + b1 @ b2
            tensors[f"{name}.a1.weight"] = random(w.shape[1], r, scale=0.05)
            tensors[f"{name}.a2.weight"] = random(r, w.shape[1], scale=0.05)
            tensors[f"{name}.b1.weight"] = random(w.shape[0], r, scale=0.15)
            tensors[f"{name}.b2.weight"] = random(r, w[0].numel(), scale=0.15)
        else:
            tensors[name + ".lora_down.weight"] = random(r, *w.shape[1:])
            tensors[name + ".lora_up.weight"] = random(*((w.shape[0], r, 1, 1) if w.ndim == 4 else (w.shape[0], r)))
        if kind != "ia3":  # OFT: a norm constraint of alpha * out, which these small blocks stay under
            tensors[name + ".alpha"] = torch.tensor(float(r) / 2)
        touched += w.numel()

    for path_, module in pipe.unet.named_modules():
        in_transformer = ".attentions." in f".{path_}"
        if (
            in_transformer
            and isinstance(module, (torch.nn.Linear, torch.nn.Conv2d))
            and module.weight.shape[2:]
            in (
                (),
                (1, 1),
            )
        ):
            add("lora_unet_" + ldm_unet_path(path_, pipe.unet.config).replace(".", "_"), module)
    for path_, module in pipe.text_encoder.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in path_:
            inner = path_.removeprefix("text_model.")
            add("lora_te_text_model_" + inner.replace(".", "_"), module)
    save_file(tensors, str(path), metadata={"ss_network_dim": str(rank)})
    return touched


def measure(args) -> dict:
    from app.generation.txt2img import Txt2ImgParams
    from app.logs import quiet_libraries
    from app.lora.apply import Application, lora_applied
    from app.lora.files import bind, read_lora_file
    from app.lora.names import layer_table, model_components
    from app.services import build_services
    from app.settings import Settings

    quiet_libraries()
    tmp = Path(tempfile.mkdtemp())
    config = "tiny-sd1" if args.tiny else "sd1"
    checkpoint = args.ckpt or make_checkpoint(tmp / f"{config}.safetensors", config)
    settings = Settings(
        data_dir=tmp, ckpt_dir=checkpoint.parent, ckpt=checkpoint, use_cpu=["all"] if args.cpu else [], no_hashing=True
    )
    services = build_services(settings)
    model = services.models.get()
    settings.lora_dir.mkdir(parents=True, exist_ok=True)
    touched = write_lora(model.pipe, settings.lora_dir / "a.safetensors", args.rank, 1, args.kind)
    write_lora(model.pipe, settings.lora_dir / "b.safetensors", args.rank, 2, args.kind)
    total = sum(p.numel() for p in model.pipe.unet.parameters()) + sum(
        p.numel() for p in model.pipe.text_encoder.parameters()
    )

    def sync() -> None:
        if model.device.type == "cuda":
            torch.cuda.synchronize(model.device)

    def generate(prompt: str) -> float:
        params = Txt2ImgParams(
            prompt=prompt,
            negative_prompt=NEGATIVE,
            sampler_name="Euler a",
            steps=args.steps,
            width=args.size,
            height=args.size,
            seed=1,
            save_images=False,
        )
        start = time.perf_counter()
        result = services.txt2img.run(params)
        sync()
        assert not result.notes, result.notes
        return time.perf_counter() - start

    start = time.perf_counter()
    lora = read_lora_file(settings.lora_dir / "a.safetensors")
    first_read = time.perf_counter() - start
    bound = bind(lora, layer_table(model_components(model.pipe)), "SD 1.x")
    generate(PROMPT)  # warm-up
    generate(f"{PROMPT} <lora:a:0.8>")
    times: dict[str, list[float]] = {"none": [], "one": [], "switching": []}
    for i in range(args.repeats):
        times["none"].append(generate(PROMPT))
        times["one"].append(generate(f"{PROMPT} <lora:a:0.8>"))
        times["switching"].append(generate(f"{PROMPT} <lora:{'ab'[i % 2]}:0.8>"))
    # Per sampling step: one UNet forward (CFG batch of 2) with the LoRA merged against the same forward without,
    # alternating. This is the part that scales with the step count; merging is paid once per generation.
    unet, latent = model.pipe.unet, args.size // 8
    sample = torch.randn(2, unet.config.in_channels, latent, latent, device=model.device, dtype=model.dtype)
    context = torch.randn(2, 77, unet.config.cross_attention_dim, device=model.device, dtype=model.dtype)
    timestep = torch.tensor([500, 500], device=model.device)

    def forward() -> float:
        sync()
        start = time.perf_counter()
        with torch.no_grad():
            unet(sample, timestep, encoder_hidden_states=context)
        sync()
        return time.perf_counter() - start

    forward()
    step_times: dict[str, list[float]] = {"none": [], "one": []}
    for _ in range(max(3, args.repeats)):
        step_times["none"].append(forward())
        with lora_applied([Application(bound, 0.8, 0.8)]):
            step_times["one"].append(forward())
    apply_times = []
    for _ in range(max(3, args.repeats)):
        start = time.perf_counter()
        with lora_applied([Application(bound, 0.8, 0.8)]):
            sync()
        sync()
        apply_times.append(time.perf_counter() - start)
    none, one, switching = (statistics.median(times[k]) for k in ("none", "one", "switching"))
    return {
        "model": config,
        "device": str(model.device),
        "dtype": str(model.dtype).replace("torch.", ""),
        "size": args.size,
        "steps": args.steps,
        "rank": args.rank,
        "kind": args.kind,
        "layers": len(bound),
        "touched_params_m": touched / 1e6,
        "share_of_unet_and_te": touched / total,
        "none_s": none,
        "one_s": one,
        "switching_s": switching,
        "one_ratio": one / none,
        "switching_ratio": switching / none,
        "step_none_s": statistics.median(step_times["none"]),
        "step_one_s": statistics.median(step_times["one"]),
        "step_ratio": statistics.median(step_times["one"]) / statistics.median(step_times["none"]),
        "apply_and_remove_s": statistics.median(apply_times),
        "first_read_s": first_read,
    }


def markdown(r: dict) -> str:
    return "\n".join(
        [
            f"| {r['model']} {r['size']} px, {r['steps']} steps, {r['device']} {r['dtype']}, {r['kind']} "
            f"rank {r['rank']} ({r['layers']} layers) | s/generation | vs no LoRA |",
            "|---|---|---|",
            f"| no LoRA (baseline) | {r['none_s']:.3f} | 1.000 |",
            f"| `<lora:a:0.8>` | {r['one_s']:.3f} | {r['one_ratio']:.3f} |",
            f"| alternating `<lora:a>` / `<lora:b>` | {r['switching_s']:.3f} | {r['switching_ratio']:.3f} |",
            f"| UNet forward (one sampling step, CFG batch 2) | {r['step_none_s']:.3f} -> {r['step_one_s']:.3f} "
            f"| {r['step_ratio']:.3f} |",
            f"| put layers in + take them out | {r['apply_and_remove_s']:.3f} | |",
            f"| first read of the file | {r['first_read_s']:.3f} | |",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--ckpt", type=Path, help="an SD1.5-size single file to use instead of writing one")
    parser.add_argument("--cpu", action="store_true")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument(
        "--kind",
        choices=["lora", "loha", "lokr", "ia3", "oft", "glora"],
        default="lora",
        help="the files' network kind",
    )
    parser.add_argument("--size", type=int, default=None)
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args()
    args.cpu = args.cpu or args.tiny
    args.size = args.size or (64 if args.tiny else 512)
    result = measure(args)
    print(markdown(result))
    if args.markdown:
        args.markdown.write_text(markdown(result) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
