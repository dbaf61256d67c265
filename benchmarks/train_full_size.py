"""Training at real scale: an SD1.5-size single file (random weights, written by our own exporter in the original
LDM layout: nothing downloaded), 512 px, batch 1 and 4, embedding, hypernetwork and LoRA (or LoHa, LoKr:
`--targets`; `pivotal`: a LoRA trained with a bundled embedding, `lora-maxnorm`: with scale_weight_norms, `dora`:
a DoRA LoRA (LyCORIS's dora_wd), their baseline the LoRA one). Our engine (through
`TrainingService`, as the UI and API run it) against the diffusers-example-style
baseline of `baselines.py` at the same settings, each run in its own process so its memory is its own.

Printed per run: seconds per step (median of the timed steps, after one warm-up step) and peak memory. CPU: peak RSS
above the idle RSS of the loaded model. CUDA: `torch.cuda.max_memory_allocated` (weights included). Then the
ratios ours/baseline. The model runs as the app runs it: fp32 on the CPU, fp16 on CUDA (`--bf16`, `--no-half`).

    .venv/bin/python benchmarks/train_full_size.py [--steps 3] [--batches 1,4]
        [--targets embedding,hypernetwork,lora,loha,lokr,pivotal,lora-maxnorm,dora]
        [--size 512] [--cpu] [--tiny] [--medvram] [--bf16] [--no-half] [--markdown OUT.md] [--arch sd2|sdxl]

`--arch sd2`: an SD 2.1-768-size file (OpenCLIP-H text encoder, 1024-wide context, v-prediction as the 768 px
models are) at 768 px, against the same baseline, which trains SD 2.x the examples' way (the velocity target).

`--arch sdxl`: an SDXL-size file (3.5 B parameters, both text encoders) at 1024 px, ours only: the baseline is
written for SD 1.x (diffusers' SDXL TI example is a separate script); the figures are the absolute ones the goal is
stated in (CUDA fp16: an SDXL embedding at 1024 px batch 1 in at most 12 GB peak allocated).
`--tiny` runs the same on a tiny file of that architecture at 64 px: a check of this script, not a measurement.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch
from baselines import run_child
from random_checkpoint import make_in_subprocess

# Targets trained as LoRAs (LyCORIS LoHa/LoKr; "pivotal": a LoRA with a bundled embedding); their baseline: the LoRA
# one. The pivotal target costs what the trigger word's embedding adds: the text encoder's backward pass each step.
# "lora-maxnorm": the LoRA with kohya's scale_weight_norms=1, what computing every layer's update norm after each
# step costs. "dora": the LoRA weight-decomposed, what each layer's column norms of W + update cost every forward.
LORA_TYPES = ("lora", "loha", "lokr", "pivotal", "lora-maxnorm", "dora")


def child(args) -> dict:
    """One run (one side, one target, one batch size) in this process."""
    from baselines import (
        PeakMemory,
        baseline_step,
        cap_data_memory,
        hand_freed_memory_back,
        make_images,
        timed_steps,
    )

    from app.logs import quiet_libraries
    from app.services import build_services
    from app.settings import Settings
    from app.training.config import LoraNetwork, PivotalEmbedding, TrainConfig
    from app.training.templates import read_template

    quiet_libraries()
    tmp = Path(tempfile.mkdtemp())
    make_images(tmp / "data", args.size)
    settings = Settings(
        data_dir=tmp,
        ckpt_dir=args.ckpt.parent,
        ckpt=args.ckpt,
        use_cpu=["all"] if args.cpu else [],
        medvram=args.medvram,
        bf16=args.bf16,
        no_half=args.no_half,
        no_hashing=True,
    )
    services = build_services(settings)
    model = services.models.get()
    template = "subject.txt" if args.target == "embedding" else "hypernetwork.txt"
    if args.target == "embedding":
        services.embeddings.create("zqbench", 1, "star")
    elif args.target in LORA_TYPES:
        pass  # created by the first save of our run; the baseline makes its own adapter (a LoRA)
    else:
        from app.hypernetworks.attention import attention_widths

        # Every width the UNet has (SD1.5: 320, 640, 768, 1280), A1111's default 1, 2, 1 structure.
        services.hypernetworks.create("zqbench", sorted(attention_widths(model.pipe.unet)), "1, 2, 1")
    memory = PeakMemory(model.device)
    memory.start()
    if args.cpu_headroom_gb and model.device.type == "cpu":
        if args.child == "ours":
            cap_data_memory(args.cpu_headroom_gb)  # so that `auto` checkpointing starts off, as on a GPU
        else:
            hand_freed_memory_back()  # the same allocator setting as ours, uncapped
    if args.child == "ours":
        cfg = TrainConfig(
            name="zqbench",
            data_root=str(tmp / "data"),
            training_width=args.size,
            training_height=args.size,
            batch_size=args.batch,
            steps=1 + args.steps,
            learn_rate="0.005" if args.target == "embedding" else "0.0001" if args.target in LORA_TYPES else "0.00001",
            save_every=0,
            create_image_every=0,
            template_filename=template,
            gradient_checkpointing=args.checkpointing,
        )
        if args.target in LORA_TYPES:  # the example's rank 4, scale 1; LoHa/LoKr of the same rank
            if args.target == "pivotal":  # the word goes in through subject.txt's [name]
                bundle = PivotalEmbedding(name="zqbenchword", vectors=1, init_text="star")
                cfg.template_filename = "subject.txt"
                result = services.training.train_lora(cfg, LoraNetwork(rank=4, alpha=4.0), bundle).wait()
            elif args.target == "lora-maxnorm":
                result = services.training.train_lora(
                    cfg, LoraNetwork(rank=4, alpha=4.0, scale_weight_norms=1.0)
                ).wait()
            elif args.target == "dora":
                result = services.training.train_lora(cfg, LoraNetwork(rank=4, alpha=4.0, dora_wd=True)).wait()
            else:
                result = services.training.train_lora(
                    cfg, LoraNetwork(rank=4, alpha=4.0, network_type=args.target)
                ).wait()
        else:
            run = (
                services.training.train_embedding
                if args.target == "embedding"
                else services.training.train_hypernetwork
            )
            result = run(cfg).wait()
        if result.error:
            raise SystemExit(result.error)
        times = result.step_seconds[1:]
        checkpointing = result.checkpointing
    else:
        files = sorted((tmp / "data").glob("*.png"))
        templates = read_template(settings.templates_dir, template, args.target == "embedding")
        hypernetwork = None
        if args.target == "hypernetwork":
            from app.hypernetworks.files import read_hypernetwork_file

            hypernetwork = read_hypernetwork_file(settings.hypernetwork_dir / "zqbench.pt").to(model.device)
        step = baseline_step(
            "lora" if args.target in LORA_TYPES else args.target,
            model,
            files,
            templates,
            args.size,
            args.batch,
            hypernetwork,
            services.training.stack,
            args.baseline_checkpointing,
        )
        times = timed_steps(step, 1, args.steps, model.device)
        checkpointing = "on" if args.baseline_checkpointing else "off"
    peak = memory.peak_mb()
    return {
        "s_per_step": statistics.median(times),
        "peak_mb": peak,
        "idle_mb": memory.idle_mb,
        "device": str(model.device),
        "dtype": str(model.dtype).replace("torch.", ""),
        "checkpointing": checkpointing,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=3, help="timed steps per run (after one warm-up step)")
    parser.add_argument("--batches", default="1,4")
    parser.add_argument("--targets", default="embedding,hypernetwork")
    parser.add_argument(
        "--size", type=int, default=None, help="training size in px (512, SD2 768, SDXL 1024; 64 with --tiny)"
    )
    parser.add_argument(
        "--arch", choices=["sd1", "sd2", "sdxl"], default="sd1", help="the generated file's architecture"
    )
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even where CUDA is available")
    parser.add_argument("--tiny", action="store_true", help="a tiny SD1 file: checks the script, measures nothing")
    parser.add_argument("--medvram", action="store_true")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--no-half", action="store_true")
    parser.add_argument(
        "--checkpointing",
        choices=["auto", "on", "off"],
        default="auto",
        help="ours: gradient checkpointing as the train form sets it (auto, the default: on on a CPU without a memory "
        "limit; on a GPU off until a step runs out of memory)",
    )
    parser.add_argument("--no-checkpointing", action="store_true", help="the same as --checkpointing off")
    parser.add_argument(
        "--cpu-headroom-gb",
        type=float,
        default=0.0,
        help="CPU, ours: cap the data memory this far above the loaded model's (RLIMIT_DATA) before training, so "
        "that running out is an error the run sees, as on a GPU (and checkpointing auto starts off); the baseline "
        "gets the same allocator setting, uncapped",
    )
    parser.add_argument(
        "--baseline-checkpointing",
        action="store_true",
        help="the baseline with the examples' --gradient_checkpointing (UNet, and the text encoder of an embedding)",
    )
    parser.add_argument("--ckpt", type=Path, default=None, help="use this single file instead of generating one")
    parser.add_argument("--markdown", type=Path, default=None, help="also write the table here")
    parser.add_argument("--ours-only", action="store_true", help="skip the baseline (a check that ours runs)")
    parser.add_argument("--child", choices=["ours", "baseline"], default=None)
    parser.add_argument("--target", default=None)
    parser.add_argument("--batch", type=int, default=1)
    args = parser.parse_args()
    if args.no_checkpointing:
        args.checkpointing = "off"
    args.size = args.size or (64 if args.tiny else {"sd1": 512, "sd2": 768, "sdxl": 1024}[args.arch])
    if args.arch == "sdxl":
        args.ours_only = True  # the baseline trains SD 1.x only
    if args.child:
        print(json.dumps(child(args)))
        return

    use_cuda = torch.cuda.is_available() and not args.cpu
    with tempfile.TemporaryDirectory() as tmp:
        config = ("tiny-" if args.tiny else "") + args.arch
        ckpt = args.ckpt or make_in_subprocess(config, Path(tmp), "cuda" if use_cuda else "cpu")
        flags = ("cpu", "medvram", "bf16", "no_half", "baseline_checkpointing")
        flags = [f for f in flags if getattr(args, f)]
        rows = []
        for target in args.targets.split(","):
            for batch in (int(b) for b in args.batches.split(",")):
                runs = {}
                for side in ("ours",) if args.ours_only else ("baseline", "ours"):
                    command = [sys.executable, __file__, "--child", side, "--target", target, "--batch", str(batch)]
                    command += ["--steps", str(args.steps), "--size", str(args.size), "--ckpt", str(ckpt)]
                    command += [f"--{f.replace('_', '-')}" for f in flags] + ["--checkpointing", args.checkpointing]
                    command += ["--cpu-headroom-gb", str(args.cpu_headroom_gb)]
                    runs[side] = run_child(command, f"{side} {target} batch {batch}")
                rows.append((target, batch, runs.get("baseline"), runs["ours"]))
                print_row(*rows[-1], flush=True)
    table = markdown(rows, args)
    print(table)
    if args.markdown:
        args.markdown.write_text(table, encoding="utf-8")


def memory_mb(run: dict) -> float:
    """What the goals are stated in: on CUDA the peak allocated; on the CPU the peak RSS above idle."""
    return run["peak_mb"] if run["device"].startswith("cuda") else run["peak_mb"] - run["idle_mb"]


def print_row(target: str, batch: int, base: dict | None, ours: dict, flush: bool = False) -> None:
    if base is None:
        idle = "" if ours["device"].startswith("cuda") else f" (loaded model idle: {ours['idle_mb']:.0f} MB)"
        line = (
            f"{target} batch {batch}: ours {ours['s_per_step']:.3f} s/step {memory_mb(ours):.0f} MB{idle}, "
            f"checkpointing {ours['checkpointing']}"
        )
        print(line, flush=flush)
        return
    print(
        f"{target} batch {batch}: baseline {base['s_per_step']:.3f} s/step {memory_mb(base):.0f} MB; ours "
        f"{ours['s_per_step']:.3f} s/step {memory_mb(ours):.0f} MB (checkpointing {ours['checkpointing']}); "
        f"speed x{base['s_per_step'] / ours['s_per_step']:.2f}, memory x{memory_mb(ours) / memory_mb(base):.2f}",
        flush=flush,
    )


def markdown(rows, args) -> str:
    first = rows[0][3]
    on_cuda = first["device"].startswith("cuda")
    memory = "peak allocated" if on_cuda else "peak RSS above idle"
    if args.tiny:
        name = f"tiny {args.arch.upper()} file"
    else:
        name = {"sd1": "SD1.5-size", "sd2": "SD2.1-768-size (v-prediction)", "sdxl": "SDXL-size"}[args.arch]
        name += " single file (random weights)"
    lines = [
        f"{name}, {args.size} px, {first['device']} {first['dtype']}, median of {args.steps} steps after 1 warm-up"
        + (" (--medvram)" if args.medvram else "")
        + f" (ours: checkpointing {args.checkpointing})"
        + (f" (ours: data memory capped {args.cpu_headroom_gb:g} GB above idle)" if args.cpu_headroom_gb else "")
        + (" (the baseline with --gradient_checkpointing)" if args.baseline_checkpointing else ""),
        "",
        f"| target | batch | baseline s/step | ours s/step | speed ours/baseline | baseline {memory} | ours {memory} "
        "| memory ours/baseline | ours: checkpointing |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for target, batch, base, ours in rows:
        if base is None:
            lines.append(
                f"| {target} | {batch} | - | {ours['s_per_step']:.3f} | - | - | {memory_mb(ours):.0f} MB | - "
                f"| {ours['checkpointing']} |"
            )
            continue
        lines.append(
            f"| {target} | {batch} | {base['s_per_step']:.3f} | {ours['s_per_step']:.3f} | "
            f"{base['s_per_step'] / ours['s_per_step']:.2f}x | {memory_mb(base):.0f} MB | {memory_mb(ours):.0f} MB | "
            f"{memory_mb(ours) / memory_mb(base):.2f} | {ours['checkpointing']} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
