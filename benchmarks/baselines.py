"""Training baselines written the way diffusers' example scripts are: what our engine is measured against.

Embedding (like diffusers' `textual_inversion.py`): a placeholder token added to a copy of the tokenizer and of the
text encoder (the copy in fp32: its token-embedding matrix is the trained parameter, every row but the
placeholder's restored after each step), the VAE encoding the batch at every step (no latent cache), no activation
checkpointing (the example's default; `checkpointing=True` runs it as `--gradient_checkpointing` does: the UNet's
and the text encoder's), the UNet in the model's dtype under autocast, and a GradScaler when that dtype is fp16
(accelerate's `mixed_precision="fp16"`).

Hypernetwork: the same loop shape (VAE every step, no checkpointing, autocast and scaler), the prompt through the
pipeline's own tokenizer and text encoder without gradients, the hypernetwork applied through our attention
processor and only its parameters trained (AdamW, weight decay 0.01 as A1111).

Also the shared helpers of the training benchmarks: a synthetic dataset, peak-memory measurement, and running one
measured side in a process of its own.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw


def run_child(command: list[str], what: str) -> dict:
    """Run one measured side (`command`, a script's child mode) and read the JSON its last stdout line holds; on
    failure, show its stderr and stop, naming `what` failed."""
    out = subprocess.run(command, capture_output=True, text=True)
    if out.returncode != 0:
        print(out.stderr[-3000:], file=sys.stderr)
        why = " (killed: out of memory?)" if out.returncode == -9 else ""
        raise SystemExit(f"{what} failed: exit {out.returncode}{why}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def make_images(folder: Path, size: int, n: int = 8) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        im = Image.new("RGB", (size, size), (30 * i, 120, 200))
        ImageDraw.Draw(im).regular_polygon((size // 2, size // 2, size // 3), 5, fill=(250, 220, 0))
        im.save(folder / f"{i:02d}-a yellow star.png")


def data_size_gb() -> float:
    """This process's data size (VmData), in GB: what RLIMIT_DATA limits."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmData:"):
            return int(line.split()[1]) / 2**20
    raise RuntimeError("no VmData in /proc/self/status")


def hand_freed_memory_back() -> None:
    """Tell glibc to give freed blocks of 64 KB and more back to the system at once (as MALLOC_MMAP_THRESHOLD_ does),
    so that the data size is what is in use. It changes the allocator's speed too: compare runs that both set it."""
    import ctypes

    ctypes.CDLL("libc.so.6").mallopt(-3, 65536)  # M_MMAP_THRESHOLD


def cap_data_memory(headroom_gb: float) -> int:
    """Limit this process's data memory to `headroom_gb` above what it holds now (RLIMIT_DATA), so that an allocation
    past it fails as on a full GPU (after `hand_freed_memory_back`). Returns the limit in bytes."""
    import resource

    hand_freed_memory_back()
    limit = int((data_size_gb() + headroom_gb) * 2**30)
    resource.setrlimit(resource.RLIMIT_DATA, (limit, resource.getrlimit(resource.RLIMIT_DATA)[1]))
    return limit


class PeakMemory:
    """Peak memory of this process from `start()` on. CUDA: `max_memory_allocated` (total, weights included).
    CPU: peak RSS, read from VmHWM after resetting it (/proc/self/clear_refs), or sampled every 5 ms where the
    kernel refuses the reset; `idle` is the RSS (or allocation) at `start()`."""

    def __init__(self, device: torch.device):
        self.device = device
        self.idle_mb = 0.0
        self._sampled = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @staticmethod
    def _status_mb(field: str) -> float:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
        return 0.0

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.idle_mb = torch.cuda.memory_allocated(self.device) / 2**20
            return
        self.idle_mb = self._status_mb("VmRSS")
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._sampled = max(self._sampled, self._status_mb("VmRSS"))
            self._stop.wait(0.005)

    def peak_mb(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            return self._sampled
        return self._status_mb("VmHWM")


def _pixels(files: list[Path], size: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    arrays = [np.asarray(Image.open(p).convert("RGB").resize((size, size)), dtype=np.float32) for p in files]
    return torch.stack([torch.from_numpy(a / 127.5 - 1).permute(2, 0, 1) for a in arrays]).to(device, dtype)


def _amp(model) -> tuple[Callable, torch.amp.GradScaler | None]:
    half = model.dtype in (torch.float16, torch.bfloat16)
    scaler = torch.amp.GradScaler(model.device.type) if model.dtype == torch.float16 else None

    def autocast():
        return torch.autocast(model.device.type, dtype=model.dtype, enabled=half)

    return autocast, scaler


def baseline_step(
    kind: str,
    model,
    files: list[Path],
    templates: list[str],
    size: int,
    batch: int,
    hypernetwork=None,
    stack=None,
    checkpointing: bool = False,
) -> Callable[[int], float]:
    """A `step(i) -> loss` closure that trains an embedding (`kind="embedding"`), a LoRA (`"lora"`) or `hypernetwork`
    the diffusers examples' way; `checkpointing`: with the examples' `--gradient_checkpointing`."""
    from diffusers import DDPMScheduler
    from diffusers.models.attention_processor import AttnProcessor2_0

    from app.training.losses import denoising_target

    device, vae, unet = model.device, model.pipe.vae, model.pipe.unet
    noise_schedule = DDPMScheduler.from_config(model.pipe.scheduler.config)
    generator = torch.Generator().manual_seed(0)
    autocast, scaler = _amp(model)

    if kind == "embedding":
        unet.set_attn_processor(AttnProcessor2_0())  # diffusers' default SDPA processor, as the example runs
        tokenizer = copy.deepcopy(model.pipe.tokenizer)  # the model's own: SD 2.x pads with "!", SD 1.x with EOS
        tokenizer.add_tokens(["<zqbench>"])
        placeholder = tokenizer.convert_tokens_to_ids("<zqbench>")
        text_encoder = copy.deepcopy(model.pipe.text_encoder).float()
        text_encoder.resize_token_embeddings(len(tokenizer))
        table = text_encoder.get_input_embeddings()
        with torch.no_grad():
            table.weight[placeholder] = table.weight[tokenizer.convert_tokens_to_ids("star</w>")]
        text_encoder.requires_grad_(False)
        table.weight.requires_grad_(True)
        original = table.weight.detach().clone()
        keep = torch.ones(len(tokenizer), dtype=torch.bool, device=device)
        keep[placeholder] = False
        params, weight_decay, name = [table.weight], 0.0, "<zqbench>"
    elif kind == "lora":
        # diffusers' train_text_to_image_lora.py: a PEFT adapter (rank 4, Gaussian init) on the UNet's attention
        # projections, its parameters cast to fp32, AdamW at 1e-4 with weight decay 1e-2, the text encoder frozen.
        from peft import LoraConfig

        tokenizer, text_encoder = model.pipe.tokenizer, model.pipe.text_encoder
        unet.set_attn_processor(AttnProcessor2_0())
        unet.requires_grad_(False)
        unet.add_adapter(
            LoraConfig(
                r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=["to_k", "to_q", "to_v", "to_out.0"]
            )
        )
        params = [p for p in unet.parameters() if p.requires_grad]
        for p in params:
            p.data = p.data.float()
        weight_decay, name = 1e-2, "zqbench"
    else:
        from app.hypernetworks.attention import attention_widths, install

        tokenizer, text_encoder = model.pipe.tokenizer, model.pipe.text_encoder
        install(unet, stack, fold=False)  # every module runs as the MLP it is, the straightforward way
        params = hypernetwork.parameters_for(attention_widths(unet) & set(hypernetwork.widths))
        for p in params:
            p.requires_grad_(True)
        hypernetwork.train(True)
        weight_decay, name = 0.01, "zqbench"
    if checkpointing:
        # As the examples' --gradient_checkpointing: the UNet's blocks, and the trained text encoder's layers
        # (transformers checkpoints only layers in training mode; CLIP has no dropout, so train() changes nothing else).
        unet.enable_gradient_checkpointing()
        if kind == "embedding":
            text_encoder.activation_checkpointing_enable({"use_reentrant": False})
            text_encoder.train()
    rate = {"embedding": 0.005, "lora": 1e-4}.get(kind, 1e-5)
    optimizer = torch.optim.AdamW(params, lr=rate, weight_decay=weight_decay)

    def step(i: int) -> float:
        picks = [files[(i * batch + k) % len(files)] for k in range(batch)]
        with torch.no_grad():
            latents = vae.encode(_pixels(picks, size, device, vae.dtype)).latent_dist.sample()
        latents = latents.float() * vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=generator).to(device)
        t = torch.randint(0, noise_schedule.config.num_train_timesteps, (batch,), generator=generator).to(device)
        noisy = noise_schedule.add_noise(latents, noise, t)
        # As the examples: an SD 2.x 768 model predicts the velocity, the others the noise.
        wanted = denoising_target(noise_schedule, latents, noise, t)
        prompts = [templates[(i + k) % len(templates)].replace("[name]", name) for k in range(batch)]
        ids = tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        context = stack.using([(hypernetwork, 1.0)]) if kind == "hypernetwork" else torch.enable_grad()
        with context:
            with autocast():
                if kind == "embedding":
                    hidden = text_encoder(ids.to(device))[0]
                else:
                    with torch.no_grad():
                        hidden = text_encoder(ids.to(device))[0]
                pred = unet(noisy.to(unet.dtype), t, encoder_hidden_states=hidden.to(unet.dtype)).sample
            loss = F.mse_loss(pred.float(), wanted.float())
            (scaler.scale(loss) if scaler else loss).backward()
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if kind == "embedding":
            with torch.no_grad():
                table.weight[keep] = original[keep]
        return float(loss.detach())

    return step


def timed_steps(step: Callable[[int], float], warmup: int, steps: int, device: torch.device) -> list[float]:
    """Seconds of each of `steps` steps after `warmup` untimed ones."""
    for i in range(warmup):
        step(i)
    times = []
    for i in range(steps):
        start = time.perf_counter()
        step(warmup + i)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return times
