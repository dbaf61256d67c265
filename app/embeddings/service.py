"""Embedding operations the UI and the API call: list, refresh, create."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from app.embeddings.database import EmbeddingDatabase
from app.embeddings.writer import a1111_dict, save_pt, save_sdxl, sdxl_dict
from app.errors import UserError
from app.models.devices import execution_device
from app.models.manager import ModelManager
from app.naming import check_new_file, clean_name

MAX_VECTORS = 75


def initial_vectors(tokenizer, token_embedding: torch.nn.Embedding, init_text: str, count: int) -> torch.Tensor:
    """The init text's token embeddings spread over `count` rows, as A1111: row i = token[i * ntok // count]."""
    width = token_embedding.embedding_dim
    vectors = torch.zeros(count, width, dtype=torch.float32)
    ids = tokenizer(init_text or "", add_special_tokens=False)["input_ids"] if init_text else []
    if ids:
        with torch.no_grad():  # through the layer, not its weight: under --lowvram the weight sits on `meta`
            embedded = token_embedding(torch.tensor(ids, device=execution_device(token_embedding))).float().cpu()
        for i in range(count):
            vectors[i] = embedded[i * len(ids) // count]
    return vectors


def model_initial_vectors(model, init_text: str, count: int) -> torch.Tensor:
    """`initial_vectors` for the loaded model: on SDXL each encoder's part through its own tokenizer and token
    table, side by side (clip_l, then clip_g)."""
    pipe = model.pipe
    vectors = initial_vectors(pipe.tokenizer, pipe.text_encoder.get_input_embeddings(), init_text, count)
    if model.is_xl:
        vectors_g = initial_vectors(pipe.tokenizer_2, pipe.text_encoder_2.get_input_embeddings(), init_text, count)
        vectors = torch.cat([vectors, vectors_g], dim=1)
    return vectors


class EmbeddingService:
    def __init__(self, db: EmbeddingDatabase, models: ModelManager):
        self.db = db
        self.models = models

    def refresh(self) -> None:
        self.db.refresh()

    def names(self) -> list[str]:
        self.db.refresh_if_changed()
        return sorted(self.db.loaded, key=str.lower)

    def listing(self) -> dict[str, Any]:
        """`GET /sdapi/v1/embeddings`: A1111's shape, plus `path` and, for skipped files, `reason`."""
        self.db.refresh_if_changed()

        def entry(e) -> dict[str, Any]:
            return {
                "step": e.step,
                "sd_checkpoint": e.sd_checkpoint,
                "sd_checkpoint_name": e.sd_checkpoint_name,
                "shape": e.shape,
                "vectors": e.count if hasattr(e, "count") else e.vectors,
                "path": str(e.path),
            }

        loaded = {name: entry(e) for name, e in sorted(self.db.loaded.items())}
        skipped = {
            name: {
                "step": s.step,
                "sd_checkpoint": s.sd_checkpoint,
                "sd_checkpoint_name": s.sd_checkpoint_name,
                "shape": s.shape,
                "vectors": s.vectors,
                "path": str(s.path),
                "reason": s.reason,
            }
            for name, s in sorted(self.db.skipped.items())
        }
        return {"loaded": loaded, "skipped": skipped}

    def create(self, name: str, num_vectors: int = 1, init_text: str = "*", overwrite: bool = False) -> Path:
        """Write `embeddings/<name>.pt` (A1111 layout, step 0) initialised from `init_text`; on an SDXL model,
        `embeddings/<name>.safetensors` with `clip_l` and `clip_g`, each part initialised through its own encoder's
        tokenizer and token table (the layout A1111, ComfyUI and InvokeAI load)."""
        cleaned = clean_name(name)
        if not cleaned:
            raise UserError(
                f"Embedding name '{name}' has no usable characters: use letters, digits, '.', '_', '-'.", "name"
            )
        try:
            count = int(num_vectors)
        except (TypeError, ValueError):
            raise UserError(
                f"Number of vectors per token must be a whole number, got {num_vectors!r}.", "num_vectors_per_token"
            ) from None
        if not 1 <= count <= MAX_VECTORS:
            raise UserError(
                f"Number of vectors per token must be between 1 and {MAX_VECTORS}, got {count}.",
                "num_vectors_per_token",
            )
        model = self.models.get()
        pipe = model.pipe
        path = self.db.folder / f"{cleaned}{'.safetensors' if model.is_xl else '.pt'}"
        self.db.refresh_if_changed()
        other = self.db.get(cleaned) or self.db.skipped.get(cleaned)
        check_new_file("embedding", cleaned, path, other.path if other else None, overwrite, "Overwrite Old Embedding")
        vectors = model_initial_vectors(model, init_text, count)
        if model.is_xl:
            save_sdxl(path, sdxl_dict(cleaned, vectors, int(pipe.text_encoder.config.hidden_size), 0, None, None))
        else:
            save_pt(path, a1111_dict(cleaned, vectors, 0, None, None))
        self.db.refresh_if_changed()
        return path
