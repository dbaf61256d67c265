"""The ModelManager: owns the loaded pipeline, its device and precision, and the lock every model user holds."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

from app.errors import NotFoundError, UserError
from app.models.checkpoints import CheckpointInfo, fill_cached_hashes, find_checkpoint, scan_checkpoints
from app.models.default_model import ensure_default_model
from app.models.hashes import HashCache
from app.models.out_of_memory import guarded, release_memory, smaller_advice
from app.models.single_file import check_checkpoint, load_single_file
from app.models.tokenizer import load_clip_tokenizer
from app.models.vae import load_vae, scan_vae_files
from app.prompts.chunking import EmbeddingFinder
from app.prompts.encoder import PromptEncoder
from app.prompts.xl_encoder import XLPromptEncoder
from app.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    """A checkpoint in memory: the diffusers components plus our prompt encoder."""

    info: CheckpointInfo
    pipe: StableDiffusionPipeline  # or StableDiffusionXLPipeline
    device: torch.device
    dtype: torch.dtype
    vae_dtype: torch.dtype
    encoder: PromptEncoder  # or XLPromptEncoder
    own_vae: torch.nn.Module | None = None  # the checkpoint's VAE while another is selected

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.pipe.vae.config.block_out_channels) - 1)

    @property
    def native_size(self) -> int:
        """The image size the model was trained at (512 for SD1, 64 for the tiny default)."""
        return int(self.pipe.unet.config.sample_size) * self.vae_scale_factor

    @property
    def is_xl(self) -> bool:
        return getattr(self.pipe, "text_encoder_2", None) is not None

    @property
    def text_width(self) -> int:
        """The width of one conditioning vector (SDXL: both encoders side by side, 768 + 1280)."""
        width = int(self.pipe.text_encoder.config.hidden_size)
        if self.is_xl:
            width += int(self.pipe.text_encoder_2.config.hidden_size)
        return width


PIPELINES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")


def choose_device(settings: Settings) -> torch.device:
    if "all" in settings.use_cpu or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device(f"cuda:{settings.device_id}" if settings.device_id else "cuda")


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 in hardware (AVX512-BF16 or AMX: Xeons since Cooper Lake, AMD Zen 4).

    Elsewhere bf16 is emulated and slower than fp32, so `--bf16` is refused there rather than honoured. (oneDNN's
    own "bf16 supported" answer is yes on any AVX-512 CPU, emulation included, so it is not asked.)"""
    cpu = torch.cpu
    try:
        return bool(cpu._is_avx512_bf16_supported() or cpu._is_amx_tile_supported())
    except AttributeError:  # private probes: a torch without them says nothing, so assume no
        return False


def choose_dtypes(
    settings: Settings, device: torch.device, cpu_bf16: bool | None = None
) -> tuple[torch.dtype, torch.dtype]:
    """(model dtype, VAE dtype). fp32 on the CPU unless `--bf16` asks for bfloat16 on a CPU that has it in hardware
    (1.5-1.8x faster there, measured in docs/benchmarks.md); fp16 on the CPU is slow and unsupported in places.

    `cpu_bf16`: whether the CPU has native bf16; None asks the CPU (tests pass it to try both answers)."""
    full = settings.no_half or settings.precision == "full"
    if device.type == "cpu":
        native = cpu_has_native_bf16() if cpu_bf16 is None else cpu_bf16
        if not settings.bf16 or full:
            if native and not full:
                log.info("This CPU computes bfloat16 in hardware: --bf16 runs the model 1.5-1.8x faster")
            return torch.float32, torch.float32
        if not native:
            # Said at start: emulated bf16 would make every step slower than the fp32 it is meant to beat.
            raise UserError(
                "--bf16 on the CPU needs a CPU with bfloat16 in hardware (AVX512-BF16 or AMX: Intel Xeon Cooper "
                "Lake, Sapphire Rapids or newer; AMD Zen 4 or newer); this one has none, so bf16 would be slower "
                "than fp32 here. Start without --bf16."
            )
        return torch.bfloat16, (torch.float32 if settings.no_half_vae else torch.bfloat16)
    if full:
        return torch.float32, torch.float32
    half = torch.bfloat16 if settings.bf16 else torch.float16
    if half == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        # Said at start: a run would otherwise fail in the middle of its first step.
        gpu = torch.cuda.get_device_name(device) if torch.cuda.is_available() else "this machine"
        raise UserError(
            f"--bf16 needs a GPU with bfloat16 support (NVIDIA Ampere or newer); {gpu} has none. Start without "
            "--bf16 (fp16, with loss scaling when training) or with --no-half."
        )
    return half, (torch.float32 if settings.no_half_vae else half)


def offload_mode(settings: Settings, device: torch.device) -> str | None:
    """--lowvram -> "sequential", --medvram -> "model" CPU offload; both only mean something on CUDA."""
    if device.type != "cuda":
        if settings.lowvram or settings.medvram:
            log.info("--lowvram/--medvram have no effect on %s: everything already runs from system memory", device)
        return None
    if settings.lowvram:
        return "sequential"
    return "model" if settings.medvram else None


class ModelManager:
    """Discovers checkpoints, loads one at a time, and serializes model use through `lock`.

    Anything that runs the model (generation, training, swapping checkpoints) holds `lock`.
    """

    def __init__(self, settings: Settings, hash_cache: HashCache | None = None):
        self.settings = settings
        self.hash_cache = hash_cache or HashCache(settings.hash_cache_file)
        self.lock = threading.RLock()
        self.device = choose_device(settings)
        self.dtype, self.vae_dtype = choose_dtypes(settings, self.device)
        self.embedding_finder: EmbeddingFinder | None = None
        self._load_listeners: list[Callable[[LoadedModel], None]] = []
        self._loaded: LoadedModel | None = None
        self._checkpoints: list[CheckpointInfo] = []
        self.refresh()

    # -- discovery -------------------------------------------------------------------------------------------------
    def refresh(self) -> list[CheckpointInfo]:
        """Rescan the checkpoint folder; builds the default model when there is no checkpoint at all."""
        found = scan_checkpoints([self.settings.ckpt_dir], self.settings.ckpt)
        if not found:
            ensure_default_model(self.settings.ckpt_dir)
            found = scan_checkpoints([self.settings.ckpt_dir], self.settings.ckpt)
        fill_cached_hashes(found, self.hash_cache)
        if self._loaded is not None:  # keep the loaded object so its hash stays known
            found = [self._loaded.info if c.path == self._loaded.info.path else c for c in found]
        self._checkpoints = found
        return list(found)

    @property
    def checkpoints(self) -> list[CheckpointInfo]:
        return list(self._checkpoints)

    def find(self, query: str) -> CheckpointInfo:
        return find_checkpoint(self._checkpoints, query)

    def new_checkpoint_path(self, stem: str) -> Path:
        """`<stem>.safetensors` in the checkpoint folder for a tool's new file, refused where a file or another
        checkpoint already has the name: a tool never writes over one."""
        dst = self.settings.ckpt_dir / f"{stem}.safetensors"
        if dst.exists() or any(c.model_name == stem for c in self.refresh()):
            raise UserError(f"A checkpoint named '{stem}' already exists; pick another name.")
        return dst

    def sha256(self, info: CheckpointInfo) -> str | None:
        """The checkpoint's sha256 (A1111's hash), computed once per file version; None with --no-hashing."""
        if info.sha256 is None and not self.settings.no_hashing:
            info.sha256 = self.hash_cache.sha256(str(info.path.resolve()), info.hashed_files())
        return info.sha256

    def initial_checkpoint(self, preferred: str | None) -> CheckpointInfo:
        """--ckpt first, then the saved option, then the first checkpoint by name."""
        if self.settings.ckpt is not None:
            return self.find(str(self.settings.ckpt))
        if preferred:
            try:
                return self.find(preferred)
            except UserError:
                log.warning("Saved checkpoint %r is gone; using %s", preferred, self._checkpoints[0].title)
        return self._checkpoints[0]

    # -- loading ---------------------------------------------------------------------------------------------------
    def on_load(self, listener: Callable[[LoadedModel], None]) -> None:
        """Call `listener(model)` after every load (e.g. embeddings re-filter for the new model's width)."""
        self._load_listeners.append(listener)
        if self._loaded is not None:
            listener(self._loaded)

    @property
    def loaded(self) -> LoadedModel | None:
        return self._loaded

    def get(self) -> LoadedModel:
        """The loaded model, loading the first checkpoint if none is loaded yet.

        Reading the loaded model takes no lock, so the UI stays responsive while a job holds the model.
        """
        loaded = self._loaded
        if loaded is not None:
            return loaded
        with self.lock:
            if self._loaded is None:
                self.load(self._checkpoints[0])
            return self._loaded

    def load(self, info: CheckpointInfo) -> LoadedModel:
        """Load `info`, freeing the current model first so two never sit in memory together."""
        with self.lock:
            if self._loaded is not None and self._loaded.info.path == info.path:
                return self._loaded
            preflight(info)  # a file that cannot load is refused while the current model stays loaded
            previous = self._loaded.info if self._loaded is not None else None
            self.unload()
            try:
                self.sha256(info)
                pipe = guarded(
                    self.device,
                    lambda: self._place(read_pipeline(info, self.dtype)),
                    f"loading {info.title} on {self.device}",
                    lambda: (
                        "This model needs more memory than is free; "
                        f"{smaller_advice(self.device, offload_mode(self.settings, self.device))}."
                    ),
                )
            except Exception as failed:
                if previous is not None:
                    log.warning("Loading %s failed; reloading %s", info.title, previous.title)
                    try:
                        self.load(previous)
                    except Exception as again:
                        log.error(
                            "Reloading %s failed too (%s); the next job loads a model again", previous.title, again
                        )
                raise failed
            if getattr(pipe, "text_encoder_2", None) is not None:
                encoder = XLPromptEncoder(
                    pipe.tokenizer, pipe.text_encoder, pipe.tokenizer_2, pipe.text_encoder_2, self.embedding_finder
                )
            else:
                encoder = PromptEncoder(pipe.tokenizer, pipe.text_encoder, self.embedding_finder)
            self._loaded = LoadedModel(info, pipe, self.device, self.dtype, self.vae_dtype, encoder)
            log.info("Loaded %s on %s (%s)", info.title, self.device, self.dtype)
            for listener in self._load_listeners:
                listener(self._loaded)
            return self._loaded

    # -- VAE ---------------------------------------------------------------------------------------------------------
    def vae_files(self) -> dict[str, Path]:
        return scan_vae_files(self.settings.models_dir / "VAE")

    def apply_vae(self, choice: str | None) -> str:
        """Use the VAE named `choice` ("Automatic"/"None"/None: the model's own); returns what is in use."""
        with self.lock:
            model = self.get()
            own = getattr(model, "own_vae", None) or model.pipe.vae
            model.own_vae = own
            if not choice or choice in ("Automatic", "None"):
                model.pipe.vae = own
                return "Automatic"
            path = self.vae_files().get(choice)
            if path is None:
                names = ", ".join(["Automatic", "None", *self.vae_files()])
                raise NotFoundError(
                    f"VAE '{choice}' not found in {self.settings.models_dir / 'VAE'}. Available: {names}."
                )
            model.pipe.vae = load_vae(path, own, self.vae_dtype, self.device)
            return choice

    @contextmanager
    def placed_for_training(self, model: LoadedModel) -> Iterator[None]:
        """A training run needs the UNet and text encoders resident (backward runs through them); under --medvram
        the offload hooks would move them between forward and backward. So for the run the hooks come off and the
        UNet and text encoders sit on the GPU (the run keeps the VAE in CPU memory itself); afterwards --medvram's
        offloading is back. Under --lowvram training is refused before this point."""
        pipe = model.pipe
        if not model_offloaded(pipe):
            yield
            return
        pipe.remove_all_hooks()
        try:
            # inside the try: running out of memory while moving them still puts the offload back
            for module in (pipe.unet, pipe.text_encoder, getattr(pipe, "text_encoder_2", None)):
                if module is not None:
                    module.to(self.device)
            yield
        finally:
            pipe.enable_model_cpu_offload(device=self.device)

    def unload(self) -> None:
        with self.lock:
            self._loaded = None
            release_memory(self.device)

    def _place(self, pipe: StableDiffusionPipeline) -> StableDiffusionPipeline:
        pipe.vae.to(dtype=self.vae_dtype)
        offload = offload_mode(self.settings, self.device)
        if offload == "sequential":  # --lowvram: weights stream to the GPU layer by layer
            pipe.enable_sequential_cpu_offload(device=self.device)
        elif offload == "model":  # --medvram: one component on the GPU at a time
            pipe.enable_model_cpu_offload(device=self.device)
        else:
            pipe.to(self.device)
        for module in (pipe.unet, pipe.vae, pipe.text_encoder, getattr(pipe, "text_encoder_2", None)):
            if module is not None:
                module.requires_grad_(False)
                module.eval()
        pipe.set_progress_bar_config(disable=True)
        return pipe


def preflight(info: CheckpointInfo) -> None:
    """Refuse a checkpoint that cannot load (gone, damaged, another kind of pipeline) before anything is freed."""
    if not info.path.exists():
        raise UserError(f"Checkpoint {info.path} no longer exists; refresh the list.")
    if info.kind == "single_file":
        check_checkpoint(info.path)
        return
    index = json.loads((info.path / "model_index.json").read_text(encoding="utf-8"))
    if index.get("_class_name") not in PIPELINES:
        raise UserError(
            f"'{info.name}' is a {index.get('_class_name')} model; only Stable Diffusion 1.x/2.x and SDXL "
            "text-to-image pipelines can be loaded."
        )


def read_pipeline(info: CheckpointInfo, dtype: torch.dtype) -> StableDiffusionPipeline:
    """The checkpoint's pipeline in `dtype`, on the CPU and not placed (the manager places its one model; a LoRA
    extraction reads a second one's weights)."""
    if info.kind != "diffusers":
        return load_single_file(info.path, dtype)
    index = json.loads((info.path / "model_index.json").read_text(encoding="utf-8"))
    if index.get("_class_name") == "StableDiffusionXLPipeline":
        return StableDiffusionXLPipeline.from_pretrained(
            info.path,
            local_files_only=True,
            dtype=dtype,
            tokenizer=load_clip_tokenizer(_tokenizer_folder(info.path)),
            tokenizer_2=load_clip_tokenizer(_tokenizer_folder(info.path, "tokenizer_2")),
        )
    return StableDiffusionPipeline.from_pretrained(
        info.path,
        local_files_only=True,
        dtype=dtype,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
        tokenizer=load_clip_tokenizer(_tokenizer_folder(info.path)),
    )


def model_offloaded(pipe) -> bool:
    """Whether --medvram's model offload hooks are on the pipeline (the UNet's hook moves it on every call)."""
    from accelerate.hooks import CpuOffload

    return isinstance(getattr(pipe.unet, "_hf_hook", None), CpuOffload)


def _tokenizer_folder(model_path: Path, name: str = "tokenizer") -> Path | None:
    folder = model_path / name
    return folder if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file() else None
