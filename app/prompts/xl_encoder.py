"""SDXL's conditioning: two text encoders (CLIP ViT-L and OpenCLIP bigG) over the same chunks, their penultimate
hidden states side by side (768 + 1280 = 2048 wide), and the second encoder's pooled projection.

Embeddings for SDXL hold `clip_l` and `clip_g` vectors; the database keeps them side by side, and each encoder
gets its own slice.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from app.prompts.chunking import EmbeddingFinder, PromptChunk
from app.prompts.encoder import PromptEncoder


@dataclass
class EmbeddingPart:
    """One encoder's share of an SDXL embedding (what the chunk fixes carry to that encoder)."""

    source: Any
    vectors: torch.Tensor

    @property
    def name(self) -> str:
        return self.source.name

    @property
    def shorthash(self) -> str:
        return self.source.shorthash


def _part_finder(find: EmbeddingFinder | None, start: int, stop: int) -> EmbeddingFinder | None:
    if find is None:
        return None

    def finder(tokens, position):
        found = find(tokens, position)
        if found is None:
            return None
        embedding, length = found
        return EmbeddingPart(embedding, embedding.vectors[:, start:stop]), length

    return finder


class XLPromptEncoder:
    def __init__(self, tokenizer, text_encoder, tokenizer_2, text_encoder_2, find_embedding: EmbeddingFinder | None):
        width_l = int(text_encoder.config.hidden_size)
        width_g = int(text_encoder_2.config.hidden_size)
        self.first = PromptEncoder(tokenizer, text_encoder, _part_finder(find_embedding, 0, width_l), penultimate=True)
        self.second = PromptEncoder(
            tokenizer_2, text_encoder_2, _part_finder(find_embedding, width_l, width_l + width_g), penultimate=True
        )
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer

    def chunks(self, text: str) -> tuple[list[PromptChunk], int]:
        return self.first.chunks(text)

    def token_count(self, text: str) -> int:
        return self.first.token_count(text)

    def encode(self, texts: Sequence[str], clip_skip: int = 1) -> torch.Tensor:
        return self.encode_with_pooled(texts, clip_skip)[0]

    def encode_with_pooled(self, texts: Sequence[str], clip_skip: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        z_l, _ = self.first.encode_with_pooled(texts, clip_skip)
        z_g, pooled = self.second.encode_with_pooled(texts, clip_skip)
        return torch.cat([z_l, z_g.to(z_l.dtype)], dim=-1), pooled
