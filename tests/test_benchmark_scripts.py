"""The GPU check's scripts run end to end on the CPU (`--tiny`): random-weight files from our exporter, generation
against diffusers' pipeline, --medvram/--lowvram, SDXL, the training table against the baseline. This keeps the
script a GPU session runs ready, even where no GPU is available; the figures themselves mean nothing here."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from app.models.manager import cpu_has_native_bf16
from tests.conftest import make_data_dir

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_check_runs_on_tiny_files_and_reports_every_part(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    done = subprocess.run(
        ["bash", "benchmarks/gpu_check.sh", "--tiny"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = (tmp_path / "gpu_check.md").read_text()
    assert "failed" not in report
    for heading in (
        "## Generation",
        "## LoRA",
        "## Training",
        "## Training with checkpointing on",
        "## Training under --medvram",
        "## Training on SDXL",
        "## Per step: ops, launches, syncs",
        "## Out of memory",
        "## LoRA extraction",
    ):
        assert heading in report
    for row in ("| SD1.5 64 px |", "| SDXL 64 px |", "| --medvram |", "| --lowvram (4 steps) |"):
        assert row in report
    assert "| `<lora:a:0.8>` |" in report
    training = report.split("## Training")[1]
    for target in ("embedding", "hypernetwork"):
        for batch in (1, 4):
            line = next(x for x in training.splitlines() if x.startswith(f"| {target} | {batch} |"))
            numbers = [float(n) for n in re.findall(r"\d+\.\d+", line)]
            assert len(numbers) >= 3 and all(n > 0 for n in numbers[:2])  # both sides measured a step time
    kinds = report.split("## LoHa, LoKr, DoRA and pivotal tuning")[1]
    for target in ("loha", "lokr", "pivotal", "dora"):
        assert re.search(rf"\| {target} \| 1 \| - \| \d+\.\d+ \|", kinds), kinds
    sdxl = report.split("## Training on SDXL")[1]
    assert "tiny SDXL file" in sdxl
    for target in ("embedding", "hypernetwork"):
        assert re.search(rf"\| {target} \| 1 \| - \| \d+\.\d+ \|", sdxl), sdxl
    sd2 = report.split("## Training on SD 2.x")[1]
    assert "tiny SD2 file" in sd2
    assert re.search(r"\| embedding \| 1 \| \d+\.\d+ \| \d+\.\d+ \|", sd2), sd2  # the baseline trains SD 2.x too
    profile = report.split("## Per step: ops, launches, syncs")[1]
    assert re.search(r"\| aten ops dispatched \| (\d+) \| (\d+) \| \d+\.\d+ \|", profile), profile
    oom = report.split("## Out of memory")[1]
    for row in (
        "| txt2img 2048 px, batch 8 (again) | out of memory |",
        "| txt2img 64 px, batch 1 (again) | ok |",
        "| embedding 384 px, batch 8, no checkpointing | out of memory |",
        "| embedding 384 px, batch 8, checkpointing auto | ok | ",  # ran out without it, then on
        "| embedding 64 px, batch 1, checkpointing | ok |",
    ):
        assert row in oom, oom
    assert "checkpointing turned on at step 1" in oom
    # the default (auto) is on on a CPU without a memory limit; the section with it on says so too
    assert "(ours: checkpointing auto)" in training and training.count("| on |") == 4
    forced = report.split("## Training with checkpointing on")[1]
    assert re.search(r"\| embedding \| 1 \| - \| \d+\.\d+ \|.*\| on \|", forced), forced


def run_benchmark(script: str, *args: str) -> str:
    """Run `benchmarks/<script>` with this Python; its stdout, once it has exited cleanly."""
    done = subprocess.run(
        [sys.executable, f"benchmarks/{script}", *args], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_checkpointing_benchmark_measures_every_mode_against_no_checkpointing():
    out = run_benchmark("checkpointing.py", "--tiny", "--steps", "3")
    rows = {line.split()[0]: line for line in out.splitlines() if "ms/step" in line}
    assert set(rows) == {"none", "unet", "unet+te"}
    assert "(1.00x)" in rows["none"]
    for line in rows.values():
        ms, peak = (float(n) for n in re.findall(r"([\d.]+) (?:ms/step|MB)", line))
        assert ms > 0 and peak > 0


def test_lora_extract_benchmark_runs_both_ways_on_a_tiny_fine_tune():
    out = run_benchmark("lora_extract.py", "--arch", "tiny-sdxl", "--rank", "4")
    assert re.search(r"TINY-SDXL-size base and fine-tune, .* (\d+) layers changed", out), out
    for label in ("kohya's way", "ours"):
        assert re.search(rf"\| {label}.* \| [\d.]+ \| [\d.]+ \| [\d.]+x faster \| \d+ MB \| [\d.]+ MB \|", out), out
    gap = float(re.search(r"updates \(fp16 files\): ([\d.e+-]+)", out).group(1))
    assert gap < 1e-2, out  # the same extraction: only rounding apart


def test_lora_merge_benchmark_saves_and_merges_a_tiny_checkpoint():
    out = run_benchmark("lora_merge.py", "--arch", "tiny-sd1")
    for label in ("save the loaded model", "merge `<lora:x:1>` and save", "`<lora:x:0.5> <lora:y:0.5>` as one"):
        assert re.search(rf"\| {re.escape(label)}.* \| [\d.]+ \| [\d.]+x \| \d+ MB \| [\d.]+ MB \|", out), out
    assert re.search(r"merge: merged <lora:x:1>: [1-9]\d* tensors changed", out), out
    assert re.search(r"one: [1-9]\d* layers at rank 32", out), out
    assert re.search(r"two LoRAs as one: [\d.]+x faster from the halves than from the whole matrices", out), out
    halves, whole = (re.search(rf"{side}: (.*)", out).group(1) for side in ("one", "one-whole"))
    assert halves == whole  # the same layers, ranks and kept shares either way


def test_checkpoint_merge_benchmark_runs_a1111s_way_and_ours_on_tiny_checkpoints():
    out = run_benchmark("checkpoint_merge.py", "--arch", "tiny-sd1", "--method", "ad")
    assert "TINY-SD1-size checkpoints, 3 fp16 files" in out and "Add difference" in out, out
    for label in ("A1111's merger", "ours"):
        assert re.search(rf"\| {re.escape(label)}.* \| [\d.]+ \| \d+ MB \| [\d.]+ MB \|", out), out
    gap = float(re.search(r"shared tensors differ by at most ([\d.e+-]+)", out).group(1))
    assert gap < 1e-3, out  # the same merge: fp16 against fp32 arithmetic only


def test_step_overhead_benchmark_compares_each_python_cost_with_the_old_way():
    out = run_benchmark("step_overhead.py", "--tiny", "--repeats", "3")
    lines = [line for line in out.splitlines() if "baseline" in line and "ours" in line]
    assert len(lines) == 6, out  # the heading, four costs, the per-step total
    assert "8 layers" in out  # shapes-64's attention layers, counted from the model
    assert "64 LoRA tensors (cpu)" in out  # 8 layers x 4 projections x (down, up)


def test_baseline_with_gradient_checkpointing_recomputes_the_unet_and_the_text_encoder(tmp_path, model_store):
    """`--baseline-checkpointing` runs the example the way its `--gradient_checkpointing` does: every UNet block
    and every layer of the trained text encoder runs its forward a second time in backward."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from baselines import baseline_step, make_images

    from app.services import build_services
    from app.settings import Settings

    services = build_services(Settings(data_dir=make_data_dir(tmp_path / "data", model_store)))
    model = services.models.get()
    make_images(tmp_path / "images", 64, n=2)
    files = sorted((tmp_path / "images").glob("*.png"))
    step = baseline_step("embedding", model, files, ["a photo of [name]"], 64, 1, checkpointing=True)
    resnet = model.pipe.unet.up_blocks[-1].resnets[0]  # after a cross-attention: it needs a gradient
    calls = {"resnet": 0, "clip attention": 0}

    def count(module, args):
        if module is resnet:
            calls["resnet"] += 1
        elif type(module).__name__ == "CLIPAttention":
            calls["clip attention"] += 1

    # A global hook: the baseline trains its own copy of the text encoder, out of reach otherwise. Pre-hooks on
    # submodules: transformers' checkpointing recomputes a layer's forward, not its __call__, so hooks on the layer
    # itself would not see the recompute.
    handle = torch.nn.modules.module.register_module_forward_pre_hook(count)
    try:
        step(0)
    finally:
        handle.remove()
        sys.path.remove(str(ROOT / "benchmarks"))
    assert calls["resnet"] == 2  # forward, and again in backward
    assert calls["clip attention"] == 2 * model.pipe.text_encoder.config.num_hidden_layers


def test_hypernetwork_fold_benchmark_times_the_mlps_and_the_fold_in_generation_and_training():
    out = run_benchmark("hypernetwork_fold.py", "--tiny", "--repeats", "1")
    generation = [line for line in out.splitlines() if line.startswith("generation")]
    training = [line for line in out.splitlines() if line.startswith("training")]
    assert [line.split(",")[2].split()[0] for line in generation] == ["no", "MLPs", "folded"], out
    assert [line.split(",")[2].split()[0] for line in training] == ["MLPs", "folded"], out
    assert "(1.00x the MLPs)" in generation[1] and "(1.00x the speed)" in training[0]
    assert all(float(re.search(r"([\d.]+) m?s ", line).group(1)) > 0 for line in generation + training)


@pytest.mark.skipif(not cpu_has_native_bf16(), reason="this CPU has no bfloat16 in hardware: --bf16 is refused")
def test_cpu_bf16_benchmark_runs_both_precisions_and_reports_the_ratios():
    out = run_benchmark("cpu_bf16.py", "--tiny", "--gen-steps", "2", "--train-steps", "1")
    assert re.search(r"^fp32 \(float32\): txt2img [\d.]+ s/it", out, re.M), out
    assert re.search(r"^bf16 \(bfloat16\): txt2img [\d.]+ s/it", out, re.M), out  # the child really ran bf16
    for row in ("txt2img s/it", "embedding training s/step"):
        assert re.search(rf"\| {row} \| [\d.]+ \| [\d.]+ \| [\d.]+x \|", out), out
    assert "Mean |difference| of the two images" in out
