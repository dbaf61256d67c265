"""The conditioning encoder: weighted, chunked prompts through CLIP, with CLIP skip and embedding substitution.

A1111 semantics: every 77-token chunk goes through the text encoder on its own; each token's output is scaled by
its emphasis weight and the whole is rescaled to keep the original mean; chunks are concatenated along the token
axis. CLIP skip n > 1 takes the hidden state n layers from the end and applies the final layer norm (we do this
ourselves: diffusers' `clip_skip` argument is broken with current transformers).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch

from app.models.devices import execution_device
from app.prompts.chunking import (
    DEFAULT_COMMA_BACKTRACK,
    EmbeddingFinder,
    PromptChunk,
    TokenIds,
    chunk_prompt,
    empty_chunk,
)


def final_layer_norm(text_encoder: torch.nn.Module) -> torch.nn.Module:
    """The text encoder's last LayerNorm (transformers 5 flattened `text_model` into the model itself)."""
    return getattr(text_encoder, "text_model", text_encoder).final_layer_norm


class PromptEncoder:
    """Encodes prompts for one CLIP text encoder (SD1's CLIP ViT-L, SD2's OpenCLIP, or one of SDXL's pair)."""

    def __init__(
        self,
        tokenizer,
        text_encoder: torch.nn.Module,
        find_embedding: EmbeddingFinder | None = None,
        comma_backtrack: int = DEFAULT_COMMA_BACKTRACK,
        penultimate: bool = False,
    ):
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.find_embedding = find_embedding
        self.comma_backtrack = comma_backtrack
        # SDXL conditions on the penultimate hidden state without the final layer norm; Clip skip counts from there.
        self.penultimate = penultimate
        vocab = tokenizer.get_vocab()
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.ids = TokenIds(start=tokenizer.bos_token_id, end=tokenizer.eos_token_id, pad=pad, comma=vocab.get(",</w>"))

    def _tokenize(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer(texts, add_special_tokens=False, truncation=False)["input_ids"]

    def chunks(self, text: str) -> tuple[list[PromptChunk], int]:
        """The chunks of one prompt and its token count (the UI's "n/75" counter uses the count)."""
        return chunk_prompt(text, self._tokenize, self.ids, self.find_embedding, self.comma_backtrack)

    def token_count(self, text: str) -> int:
        return self.chunks(text)[1]

    def encode(self, texts: Sequence[str], clip_skip: int = 1) -> torch.Tensor:
        """Conditioning for a batch of prompts: Tensor[batch, 77 * chunks, width]."""
        return self.encode_with_pooled(texts, clip_skip)[0]

    def encode_with_pooled(self, texts: Sequence[str], clip_skip: int = 1) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(conditioning, pooled): pooled is the projected embedding of each prompt's first chunk when the text
        encoder has a projection (SDXL's second encoder), else None."""
        per_prompt = [self.chunks(text)[0] for text in texts]
        n_chunks = max(len(c) for c in per_prompt)
        outputs, pooled = [], None
        for i in range(n_chunks):
            column = [c[i] if i < len(c) else empty_chunk(self.ids) for c in per_prompt]
            z, out = self._encode_chunks(column, clip_skip)
            outputs.append(z)
            if i == 0:
                pooled = getattr(out, "text_embeds", None)
        return torch.cat(outputs, dim=1), pooled

    def _encode_chunks(self, chunks: list[PromptChunk], clip_skip: int):
        device = execution_device(self.text_encoder)  # not .device: under --lowvram the weights sit on `meta`
        tokens = torch.tensor([c.tokens for c in chunks], dtype=torch.long, device=device)
        with self._substituted_embeddings([c.fixes for c in chunks]):
            z, out = self._hidden_states(tokens, clip_skip)
        if all(m == 1.0 for c in chunks for m in c.multipliers):
            # The rescale below is the identity then; skipping it also keeps its 1/mean out of the gradient
            # (a mean near zero would blow gradients up in training).
            return z, out
        weights = torch.tensor([c.multipliers for c in chunks], dtype=z.dtype, device=device)
        original_mean = z.mean()
        z = z * weights.unsqueeze(-1)
        return z * (original_mean / z.mean()), out

    def _hidden_states(self, tokens: torch.Tensor, clip_skip: int):
        if self.penultimate:
            out = self.text_encoder(input_ids=tokens, output_hidden_states=True)
            return out.hidden_states[max(-len(out.hidden_states), -(clip_skip + 1))], out
        if clip_skip <= 1:
            out = self.text_encoder(input_ids=tokens)
            return out.last_hidden_state, out
        out = self.text_encoder(input_ids=tokens, output_hidden_states=True)
        layer = max(-len(out.hidden_states) + 1, -clip_skip)
        return final_layer_norm(self.text_encoder)(out.hidden_states[layer]), out

    @contextmanager
    def _substituted_embeddings(self, fixes_per_row: list[list]) -> Iterator[None]:
        """While encoding, overwrite token-embedding rows at each fix's offset with the embedding's vectors.

        A forward hook on the token-embedding layer, so gradients reach only the embedding vectors in training.
        """
        if not any(fixes_per_row):
            yield
            return

        def replace(module, args, output):
            output = output.clone()  # one copy, then rows written in place (autograd tracks the writes)
            for row, fixes in enumerate(fixes_per_row):
                for fix in fixes:
                    n = min(fix.embedding.vectors.shape[0], output.shape[1] - fix.offset)
                    vectors = fix.embedding.vectors[:n].to(device=output.device, dtype=output.dtype)
                    output[row, fix.offset : fix.offset + n] = vectors
            return output

        layer = self.text_encoder.get_input_embeddings()
        handle = layer.register_forward_hook(replace)
        try:
            yield
        finally:
            handle.remove()
