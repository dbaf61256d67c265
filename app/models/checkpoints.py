"""Finding checkpoints on disk and naming them the way A1111 does (`name.safetensors [shorthash]`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from safetensors import SafetensorError, safe_open

from app.errors import NotFoundError
from app.models.hashes import HashCache, old_hash, short_hash

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
# Files whose bytes make up a diffusers folder's hash (weights and configs, in a fixed order).
_FOLDER_HASH_GLOBS = ("*.json", "*/*.json", "*/*.safetensors", "*/*.bin")


@dataclass
class CheckpointInfo:
    path: Path
    name: str  # path relative to the checkpoint folder, as A1111 shows it
    kind: str  # "diffusers" (a folder with model_index.json) or "single_file"
    sha256: str | None = None

    @property
    def model_name(self) -> str:
        """The name without extension (A1111's `model_name`; infotext `Model:`)."""
        return self.name[: -len(Path(self.name).suffix)] if self.kind == "single_file" else self.name

    @property
    def short_hash(self) -> str | None:
        return short_hash(self.sha256) if self.sha256 else None

    @property
    def title(self) -> str:
        return f"{self.name} [{self.short_hash}]" if self.sha256 else self.name

    def hashed_files(self) -> list[Path]:
        if self.kind == "single_file":
            return [self.path]
        files = {p for pattern in _FOLDER_HASH_GLOBS for p in self.path.glob(pattern) if p.is_file()}
        return sorted(files, key=lambda p: p.relative_to(self.path).as_posix())

    def stores_half(self) -> bool:
        """Whether the UNet's weights are stored in fp16 (most shared checkpoints): read in fp16, they are exact.
        Read from the safetensors header; a `.ckpt` or an unreadable header counts as not."""
        if self.kind == "single_file":
            path, prefix = self.path, "model.diffusion_model."
        else:
            path, prefix = self.path / "unet" / "diffusion_pytorch_model.safetensors", ""
        if path.suffix.lower() != ".safetensors":
            return False
        try:
            with safe_open(str(path), "pt") as f:
                key = next((k for k in f.keys() if k.startswith(prefix) and k.endswith(".weight")), None)  # noqa: SIM118
                return key is not None and f.get_slice(key).get_dtype() == "F16"
        except (SafetensorError, OSError, ValueError):
            return False

    def matches(self, query: str) -> bool:
        """A1111 accepts a title, a name, a model name or a hash wherever a checkpoint is named."""
        query = query.strip()
        candidates = {self.title, self.name, self.model_name, str(self.path)}
        if self.sha256:
            candidates |= {self.sha256, self.short_hash}
        if query in candidates:
            return True
        # Pre-2023 infotexts name models by A1111's old 8-hex hash (cheap: 64 KiB of the file).
        return self.kind == "single_file" and len(query) == 8 and self.path.is_file() and old_hash(self.path) == query


def scan_checkpoints(folders: list[Path], extra: Path | None = None) -> list[CheckpointInfo]:
    """Diffusers folders and single-file checkpoints under `folders` (recursively), sorted by name."""
    found: dict[Path, CheckpointInfo] = {}
    for folder in folders:
        if not folder.is_dir():
            continue
        for index in folder.rglob("model_index.json"):
            root = index.parent
            if any(part.startswith(".") for part in root.relative_to(folder).parts):
                continue  # a model still being written
            found[root.resolve()] = CheckpointInfo(root, root.relative_to(folder).as_posix(), "diffusers")
        for file in folder.rglob("*"):
            if file.suffix.lower() in SINGLE_FILE_SUFFIXES and file.is_file() and not file.name.startswith("."):
                if any(p.resolve() in found for p in file.parents):
                    continue  # a weight file inside a diffusers folder
                found[file.resolve()] = CheckpointInfo(file, file.relative_to(folder).as_posix(), "single_file")
    if extra is not None and extra.exists() and extra.resolve() not in found:
        kind = "diffusers" if extra.is_dir() else "single_file"
        found[extra.resolve()] = CheckpointInfo(extra, extra.name, kind)
    return sorted(found.values(), key=lambda c: c.name.lower())


def find_checkpoint(checkpoints: list[CheckpointInfo], query: str) -> CheckpointInfo:
    for info in checkpoints:
        if info.matches(query):
            return info
    names = ", ".join(c.title for c in checkpoints) or "none"
    raise NotFoundError(f"Checkpoint '{query}' not found. Available: {names}.")


def fill_cached_hashes(checkpoints: list[CheckpointInfo], cache: HashCache) -> None:
    """Set `sha256` where the cache already knows it (cheap; never hashes)."""
    for info in checkpoints:
        if info.sha256 is None:
            files = info.hashed_files()
            if files:
                info.sha256 = cache.cached(str(info.path.resolve()), files)
