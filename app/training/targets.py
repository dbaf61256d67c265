"""What a training run trains. The loop asks a target for its parameters, the conditioning of a batch of
prompts, a context to run the UNet in, and how to save itself; it knows nothing else about it."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Protocol

import torch
from PIL import Image

from app.embeddings.database import Embedding, EmbeddingDatabase
from app.embeddings.writer import a1111_dict, save_png, save_pt, save_safetensors
from app.errors import UserError
from app.fileio import atomic_write
from app.generation.infotext import pnginfo_for
from app.models.manager import LoadedModel
from app.prompts.encoder import PromptEncoder
from app.training.checkpoint import tensors_hash


class TrainingTarget(Protocol):
    kind: str  # "embedding" or "hypernetwork": names files, log folders and messages
    name: str
    path: Path  # the trained file, updated at every save
    initial_step: int
    weight_decay: float
    requires_name_in_template: bool

    def parameters(self) -> list[torch.nn.Parameter]: ...

    def conditioning(self, texts: list[str], clip_skip: int) -> torch.Tensor: ...

    def unet_context(self) -> AbstractContextManager: ...

    def preview_encoder(self) -> PromptEncoder: ...

    def digest(self) -> str: ...

    def save(self, step: int, model: LoadedModel, copy_to: Path | None = None) -> None: ...

    def save_preview(
        self, path: Path, image: Image.Image, step: int, infotext: str, with_data: bool, model: LoadedModel
    ) -> None: ...

    @property
    def optim_path(self) -> Path: ...


TRAINABLE_EMBEDDING_SUFFIXES = (".pt", ".safetensors")


class EmbeddingTarget:
    """Trains an embedding's vectors; everything else stays frozen."""

    kind = "embedding"
    weight_decay = 0.0
    requires_name_in_template = True

    def __init__(self, embedding: Embedding, model: LoadedModel, db: EmbeddingDatabase):
        if embedding.path.suffix.lower() not in TRAINABLE_EMBEDDING_SUFFIXES:
            raise UserError(
                f"Embedding '{embedding.name}' comes from {embedding.path.name}; training saves .pt or .safetensors "
                "files. Create a new embedding (Create embedding) or convert this one first."
            )
        self.name = embedding.name
        self.path = embedding.path
        self.initial_step = int(embedding.step or 0)
        self.vectors = torch.nn.Parameter(embedding.vectors.detach().clone().float().to(model.device))
        self._trained = Embedding(self.name, self.vectors, self.path)
        self._ids = tuple(model.pipe.tokenizer(self.name, add_special_tokens=False)["input_ids"])
        self._db = db
        self._encoder = PromptEncoder(model.pipe.tokenizer, model.pipe.text_encoder, self._find)

    def _find(self, tokens, position):
        """The trained vectors for our own name (not the file's copy in the database), others from the database."""
        if tuple(tokens[position : position + len(self._ids)]) == self._ids:
            return self._trained, len(self._ids)
        return self._db.find_embedding(tokens, position)

    def parameters(self) -> list[torch.nn.Parameter]:
        return [self.vectors]

    def conditioning(self, texts: list[str], clip_skip: int) -> torch.Tensor:
        return self._encoder.encode(texts, clip_skip)

    def unet_context(self) -> AbstractContextManager:
        return nullcontext()

    def preview_encoder(self) -> PromptEncoder:
        return self._encoder

    def digest(self) -> str:
        return tensors_hash([self.vectors])

    @property
    def optim_path(self) -> Path:
        return self.path.with_suffix(".optim")

    def _data(self, step: int, model: LoadedModel, name: str | None = None) -> dict:
        return a1111_dict(name or self.name, self.vectors.detach(), step, model.info.short_hash, model.info.model_name)

    def save(self, step: int, model: LoadedModel, copy_to: Path | None = None) -> None:
        data = self._data(step, model)
        if self.path.suffix.lower() == ".safetensors":
            meta = {
                k: str(v)
                for k, v in data.items()
                if k in ("name", "step", "sd_checkpoint", "sd_checkpoint_name") and v is not None
            }
            save_safetensors(self.path, self.vectors, meta)
        else:
            save_pt(self.path, data)
        if copy_to is not None:
            save_pt(copy_to, self._data(step, model, f"{self.name}-{step}"))

    def save_preview(
        self, path: Path, image: Image.Image, step: int, infotext: str, with_data: bool, model: LoadedModel
    ) -> None:
        """A preview PNG with infotext; with `with_data`, the embedding itself rides in its text chunk (A1111)."""
        if with_data:
            save_png(path, image, self._data(step, model, f"{self.name}-{step}"), infotext)
        else:
            save_image(path, image, infotext)


def save_image(path: Path, image: Image.Image, infotext: str) -> None:
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=pnginfo_for(infotext)))
