"""Command-line flags (A1111's names) and the paths derived from them, as one Settings object passed down."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Settings:
    data_dir: Path = ROOT
    models_dir: Path | None = None
    ckpt_dir: Path | None = None
    ckpt: Path | None = None
    embeddings_dir: Path | None = None
    hypernetwork_dir: Path | None = None
    lora_dir: Path | None = None
    templates_dir: Path | None = None
    no_half: bool = False
    no_half_vae: bool = False
    precision: str = "autocast"
    bf16: bool = False
    lowvram: bool = False
    medvram: bool = False
    medvram_sdxl: bool = False
    listen: bool = False
    server_name: str | None = None
    port: int | None = None
    api: bool = False
    nowebui: bool = False
    api_auth: str | None = None
    gradio_auth: str | None = None
    device_id: str | None = None
    use_cpu: list[str] = field(default_factory=list)
    no_hashing: bool = False
    opt_split_attention: bool = False
    queue_limit: int = 64
    confine_paths: bool = False
    allow_path: list[Path] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir)
        self.models_dir = Path(self.models_dir) if self.models_dir else self.data_dir / "models"
        self.ckpt_dir = Path(self.ckpt_dir) if self.ckpt_dir else self.models_dir / "Stable-diffusion"
        self.embeddings_dir = Path(self.embeddings_dir) if self.embeddings_dir else self.data_dir / "embeddings"
        self.hypernetwork_dir = (
            Path(self.hypernetwork_dir) if self.hypernetwork_dir else self.models_dir / "hypernetworks"
        )
        self.lora_dir = Path(self.lora_dir) if self.lora_dir else self.models_dir / "Lora"
        # A1111 keeps templates beside the program, not in the data dir.
        self.templates_dir = Path(self.templates_dir) if self.templates_dir else ROOT / "textual_inversion_templates"
        self.allow_path = [Path(p) for p in self.allow_path]
        if self.precision not in ("autocast", "full", "half"):
            raise ValueError(f"--precision must be autocast, full or half, not {self.precision!r}")

    # Paths the app writes to.
    @property
    def outputs_dir(self) -> Path:
        return self.data_dir / "outputs"

    @property
    def log_dir(self) -> Path:
        return self.data_dir / "log"

    @property
    def config_file(self) -> Path:
        return self.data_dir / "config.json"

    @property
    def hash_cache_file(self) -> Path:
        return self.data_dir / "cache.json"

    @property
    def host(self) -> str:
        if self.server_name:
            return self.server_name
        return "0.0.0.0" if self.listen else "127.0.0.1"

    @property
    def effective_port(self) -> int:
        if self.port:
            return self.port
        return 7861 if self.nowebui else 7860

    @property
    def serve_api(self) -> bool:
        return self.api or self.nowebui


def parse_credentials(text: str | None) -> list[tuple[str, str]]:
    """`user:pass[,user2:pass2]` -> [(user, pass), ...]; a password may contain ':'."""
    if not text:
        return []
    pairs = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        user, sep, password = item.partition(":")
        if not sep or not user:
            raise ValueError(f"Credentials {item!r} are invalid: expected user:password")
        pairs.append((user, password))
    return pairs


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Stable Diffusion personalization web UI")
    p.add_argument("--data-dir", type=Path, default=ROOT, help="base folder for models, embeddings, outputs, log")
    p.add_argument("--models-dir", type=Path, default=None, help="folder holding Stable-diffusion/, hypernetworks/")
    p.add_argument("--ckpt-dir", type=Path, default=None, help="folder with Stable Diffusion checkpoints")
    p.add_argument("--ckpt", type=Path, default=None, help="checkpoint to load at start")
    p.add_argument("--embeddings-dir", type=Path, default=None, help="Textual Inversion embeddings folder")
    p.add_argument("--hypernetwork-dir", type=Path, default=None, help="hypernetworks folder")
    p.add_argument("--lora-dir", type=Path, default=None, help="LoRA folder (default models/Lora)")
    p.add_argument("--textual-inversion-templates-dir", dest="templates_dir", type=Path, default=None)
    p.add_argument("--no-half", action="store_true", help="keep model weights in fp32")
    p.add_argument("--no-half-vae", action="store_true", help="keep the VAE in fp32")
    p.add_argument("--precision", choices=["autocast", "full", "half"], default="autocast")
    p.add_argument(
        "--bf16",
        action="store_true",
        help=(
            "half precision as bfloat16: instead of float16 on CUDA (Ampere or newer; fp32's range, no loss "
            "scaling), instead of float32 on a CPU with bfloat16 in hardware (AVX512-BF16/AMX; 1.5-1.8x faster)"
        ),
    )
    p.add_argument("--lowvram", action="store_true")
    p.add_argument("--medvram", action="store_true")
    p.add_argument("--medvram-sdxl", action="store_true")
    p.add_argument("--listen", action="store_true", help="serve on 0.0.0.0 instead of 127.0.0.1")
    p.add_argument("--server-name", default=None)
    p.add_argument("--port", type=int, default=None, help="port (default 7860, or 7861 with --nowebui)")
    p.add_argument("--api", action="store_true", help="serve the A1111-compatible API beside the UI")
    p.add_argument("--nowebui", action="store_true", help="serve only the API")
    p.add_argument("--api-auth", default=None, help="user:pass[,user2:pass2] for the API (HTTP Basic)")
    p.add_argument("--gradio-auth", default=None, help="user:pass[,user2:pass2] for the UI")
    p.add_argument("--device-id", default=None, help="CUDA device index")
    p.add_argument("--use-cpu", nargs="+", default=[], help="'all' runs everything on the CPU")
    p.add_argument("--no-hashing", action="store_true", help="do not hash checkpoints")
    p.add_argument(
        "--opt-split-attention",
        action="store_true",
        help="compute attention a head at a time (less memory, a little slower)",
    )
    p.add_argument(
        "--queue-limit",
        type=_non_negative_int,
        default=64,
        help="jobs that may wait behind the running one; more are refused with HTTP 503 and Retry-After",
    )
    p.add_argument(
        "--confine-paths",
        action="store_true",
        help="folders named in requests must be inside the data folder (automatic with --listen or a non-local "
        "--server-name; use it when a proxy or tunnel makes a local server public)",
    )
    p.add_argument(
        "--allow-path",
        action="append",
        type=Path,
        default=[],
        metavar="FOLDER",
        help="a folder outside the data folder that requests may name (training data, log, preprocessing) when "
        "paths are confined; repeat for several",
    )
    return p


def settings_from_args(argv: list[str] | None = None) -> Settings:
    args = build_parser().parse_args(argv)
    return Settings(**vars(args))
