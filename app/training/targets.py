"""What a training run trains. The loop asks a target for its parameters, the conditioning of a batch of
prompts, a context to run the UNet in, and how to save itself; it knows nothing else about it."""

from __future__ import annotations

from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Protocol

import torch
from PIL import Image

from app.embeddings.database import Embedding, EmbeddingDatabase
from app.embeddings.writer import (
    a1111_dict,
    safetensors_metadata,
    save_png,
    save_pt,
    save_safetensors,
    save_sdxl,
    sdxl_dict,
)
from app.errors import UserError
from app.fileio import atomic_write
from app.generation.infotext import pnginfo_for
from app.hypernetworks.attention import HypernetworkStack, attention_widths
from app.hypernetworks.files import read_hypernetwork_file, save_hypernetwork
from app.models.manager import LoadedModel
from app.prompts.encoder import PromptEncoder
from app.prompts.xl_encoder import XLPromptEncoder
from app.training.checkpoint import tensors_hash


class TrainingTarget(Protocol):
    kind: str  # "embedding" or "hypernetwork": names files, log folders and messages
    name: str
    path: Path  # the trained file, updated at every save
    initial_step: int
    weight_decay: float
    random_forward: bool  # the forward draws random numbers (dropout): checkpointing must replay the RNG state
    copy_suffix: str  # of the copies saved in the log folder every N steps
    prompt_name: str  # what `[name]` in the templates becomes: the name, or a LoRA's bundled embedding's
    # how many of `parameters()`, at the end of the list, belong to the text encoders (a LoRA's): they may have
    # their own learning rate (kohya's text_encoder_lr)
    text_encoder_parameters: int
    # how many, at the very end, are the vectors of an embedding trained beside a LoRA (pivotal tuning): their own
    # learning rate too
    embedding_parameters: int

    def parameters(self) -> list[torch.nn.Parameter]: ...

    def conditioning(self, texts: list[str], clip_skip: int) -> Conditioning:
        """(hidden states, pooled): pooled is SDXL's second-encoder projection, None for SD 1.x/2.x."""
        ...

    def unet_context(self, training: bool = True) -> AbstractContextManager:
        """Around a forward (and its backward) of the UNet with the trained network in it; `training`: a training
        step (dropout on), not a validation forward."""
        ...

    def preview_encoder(self) -> PromptEncoder: ...

    def preview_networks(self) -> list: ...

    def digest(self) -> str: ...

    def resume_state(self) -> dict:
        """What `.optim` must also keep for an exact resume (a LoRA saved in fp16: its fp32 weights)."""
        ...

    def restore(self, stored: dict) -> None:
        """Take back what `resume_state` kept, from a `.optim` that matched `digest()`."""
        ...

    def save(self, step: int, model: LoadedModel, copy_to: Path | None = None) -> None: ...

    def after_update(self) -> str:
        """Run after each optimizer update (a LoRA's max-norm regularization, kohya's `scale_weight_norms`); a note
        for the progress text, or ""."""
        ...

    def save_preview(
        self, path: Path, image: Image.Image, step: int, infotext: str, with_data: bool, model: LoadedModel
    ) -> None: ...

    @property
    def optim_path(self) -> Path: ...


Conditioning = tuple[torch.Tensor, torch.Tensor | None]


def encode(encoder, texts: list[str], clip_skip: int, with_grad: bool) -> Conditioning:
    """A batch of training prompts through the model's encoder (SD or SDXL), with or without gradients."""
    with torch.set_grad_enabled(with_grad and torch.is_grad_enabled()):
        cond, pooled = encoder.encode_with_pooled(texts, clip_skip)
    return cond, pooled


TRAINABLE_EMBEDDING_SUFFIXES = (".pt", ".safetensors")


def check_trainable(embedding: Embedding) -> None:
    """Training writes the embedding back in its own format: .pt or .safetensors only."""
    if embedding.path.suffix.lower() not in TRAINABLE_EMBEDDING_SUFFIXES:
        raise UserError(
            f"Embedding '{embedding.name}' comes from {embedding.path.name}; training saves .pt or .safetensors "
            "files. Create a new embedding (Create embedding) or convert this one first."
        )


class TrainedVectors:
    """Embedding vectors being trained, and a prompt encoder that finds them by their name (other embeddings from
    the database). On SDXL the vectors are both encoders' parts side by side (`clip_l`, then `clip_g`), trained
    together; each encoder sees its own slice."""

    def __init__(
        self,
        name: str,
        vectors: torch.Tensor,
        path: Path,
        model: LoadedModel,
        db: EmbeddingDatabase,
        bundled_in: str | None = None,
    ):
        """`path`: the file it is saved in; `bundled_in`: the LoRA that file is, for an embedding bundled in one."""
        self.name = name
        self.vectors = torch.nn.Parameter(vectors.detach().clone().float().to(model.device))
        self._trained = Embedding(name, self.vectors, path, bundled_in=bundled_in)
        self._ids = tuple(model.pipe.tokenizer(name, add_special_tokens=False)["input_ids"])
        self._db = db
        pipe = model.pipe
        if model.is_xl:
            self.split: int | None = int(pipe.text_encoder.config.hidden_size)
            self.encoder: PromptEncoder = XLPromptEncoder(
                pipe.tokenizer, pipe.text_encoder, pipe.tokenizer_2, pipe.text_encoder_2, self._find
            )
        else:
            self.split = None
            self.encoder = PromptEncoder(pipe.tokenizer, pipe.text_encoder, self._find)

    def _find(self, tokens, position):
        """The trained vectors for our own name (not a file's copy in the database), others from the database."""
        if tuple(tokens[position : position + len(self._ids)]) == self._ids:
            return self._trained, len(self._ids)
        return self._db.find_embedding(tokens, position)


class EmbeddingTarget:
    """Trains an embedding's vectors (TrainedVectors); everything else stays frozen."""

    kind = "embedding"
    weight_decay = 0.0
    random_forward = False
    text_encoder_parameters = 0  # the vectors are the encoder's input; the learning rate is the main one
    embedding_parameters = 0  # (the rate of an embedding trained beside a LoRA; here the vectors are the target)

    def __init__(self, embedding: Embedding, model: LoadedModel, db: EmbeddingDatabase):
        check_trainable(embedding)
        if embedding.shape != model.text_width:
            raise UserError(
                f"Embedding '{embedding.name}' has vectors {embedding.shape} wide but the loaded model needs "
                f"{model.text_width}; it was made for another model family."
            )
        self.name = self.prompt_name = embedding.name
        self.path = embedding.path
        self.initial_step = int(embedding.step or 0)
        trained = TrainedVectors(self.name, embedding.vectors, self.path, model, db)
        self.vectors, self._encoder, self._split = trained.vectors, trained.encoder, trained.split
        # Log copies: SDXL embeddings as .safetensors (the clip_l/clip_g layout), others as A1111's .pt.
        self.copy_suffix = ".safetensors" if self._split else ".pt"

    def parameters(self) -> list[torch.nn.Parameter]:
        return [self.vectors]

    def conditioning(self, texts: list[str], clip_skip: int) -> Conditioning:
        return encode(self._encoder, texts, clip_skip, with_grad=True)

    def unet_context(self, training: bool = True) -> AbstractContextManager:
        return nullcontext()

    def preview_encoder(self) -> PromptEncoder:
        return self._encoder

    def preview_networks(self) -> list:
        return []

    def digest(self) -> str:
        return tensors_hash([self.vectors])

    def resume_state(self) -> dict:
        return {}  # the file holds the exact fp32 values

    def restore(self, stored: dict) -> None:
        pass

    def after_update(self) -> str:
        return ""

    @property
    def optim_path(self) -> Path:
        return self.path.with_suffix(".optim")

    def _data(self, step: int, model: LoadedModel, name: str | None = None) -> dict:
        vectors = self.vectors.detach()
        if self._split:
            return sdxl_dict(
                name or self.name, vectors, self._split, step, model.info.short_hash, model.info.model_name
            )
        return a1111_dict(name or self.name, vectors, step, model.info.short_hash, model.info.model_name)

    def _write(self, path: Path, data: dict) -> None:
        if path.suffix.lower() != ".safetensors":
            save_pt(path, data)
            return
        if self._split:
            save_sdxl(path, data)
        else:
            save_safetensors(path, self.vectors, safetensors_metadata(data))

    def save(self, step: int, model: LoadedModel, copy_to: Path | None = None) -> None:
        self._write(self.path, self._data(step, model))
        if copy_to is not None:
            self._write(copy_to, self._data(step, model, f"{self.name}-{step}"))

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


class HypernetworkTarget:
    """Trains a hypernetwork's modules for the widths the loaded model has; UNet and text encoder stay frozen."""

    kind = "hypernetwork"
    weight_decay = 0.01  # A1111's AdamW weight decay for hypernetworks
    copy_suffix = ".pt"
    text_encoder_parameters = 0
    embedding_parameters = 0

    def __init__(self, path: Path, model: LoadedModel, stack: HypernetworkStack):
        self.path = path
        self.hn = read_hypernetwork_file(path).to(model.device)
        self.name = self.prompt_name = self.hn.name = path.stem
        self.initial_step = int(self.hn.step or 0)
        self.widths = attention_widths(model.pipe.unet) & set(self.hn.widths)
        if not self.widths:
            raise UserError(
                f"Hypernetwork '{self.name}' has modules for widths {self.hn.widths}, none of which the "
                f"loaded model uses ({sorted(attention_widths(model.pipe.unet))}); nothing would train."
            )
        self._params = self.hn.parameters_for(self.widths)
        self.random_forward = any(
            isinstance(layer, torch.nn.Dropout) and layer.p > 0 for m in self.hn.modules() for layer in m.modules()
        )
        for p in self._params:
            p.requires_grad_(True)
        self._stack = stack
        self._encoder = model.encoder

    def parameters(self) -> list[torch.nn.Parameter]:
        return self._params

    def conditioning(self, texts: list[str], clip_skip: int) -> Conditioning:
        return encode(self._encoder, texts, clip_skip, with_grad=False)

    @contextmanager
    def unet_context(self, training: bool = True):
        self.hn.train(training)
        with self._stack.using([(self.hn, 1.0)]):
            yield

    def preview_encoder(self) -> PromptEncoder:
        return self._encoder

    def preview_networks(self) -> list:
        self.hn.train(False)
        return [(self.hn, 1.0)]

    def digest(self) -> str:
        return tensors_hash(self._params)

    def resume_state(self) -> dict:
        return {}  # the file holds the exact fp32 values

    def restore(self, stored: dict) -> None:
        pass

    def after_update(self) -> str:
        return ""

    @property
    def optim_path(self) -> Path:
        return self.path.with_suffix(".optim")

    def save(self, step: int, model: LoadedModel, copy_to: Path | None = None) -> None:
        self.hn.step = step
        self.hn.sd_checkpoint, self.hn.sd_checkpoint_name = model.info.short_hash, model.info.model_name
        save_hypernetwork(self.hn, self.path)
        if copy_to is not None:
            self.hn.name = f"{self.name}-{step}"
            try:
                save_hypernetwork(self.hn, copy_to)
            finally:
                self.hn.name = self.name

    def save_preview(
        self, path: Path, image: Image.Image, step: int, infotext: str, with_data: bool, model: LoadedModel
    ) -> None:
        save_image(path, image, infotext)
