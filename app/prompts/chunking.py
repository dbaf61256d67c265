"""Turn weighted prompt text into CLIP-sized chunks of token ids, A1111's way.

Each chunk holds 75 prompt tokens between a start and an end token (77 in all). A prompt longer than 75 tokens
continues in a new chunk; when a chunk fills up less than `comma_backtrack` tokens after a comma, the tokens after
that comma move to the next chunk so a phrase is not cut in half. `BREAK` (outside brackets) ends a chunk early.
Embeddings found in the token stream (see `EmbeddingFinder`) are kept whole within one chunk.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from app.prompts.attention import BREAK_WEIGHT, parse_prompt_attention

CHUNK_LENGTH = 75
DEFAULT_COMMA_BACKTRACK = 20


@dataclass
class EmbeddingFix:
    """An embedding's vectors to put at `offset` (position in the 77-token chunk, start token = 0)."""

    offset: int
    embedding: Any  # anything with `.vectors` (Tensor[n, dim]) and `.name`


@dataclass
class PromptChunk:
    tokens: list[int] = field(default_factory=list)
    multipliers: list[float] = field(default_factory=list)
    fixes: list[EmbeddingFix] = field(default_factory=list)


#: (token ids, position) -> (embedding, how many prompt tokens its name spans) or None.
EmbeddingFinder = Callable[[Sequence[int], int], "tuple[Any, int] | None"]


@dataclass(frozen=True)
class TokenIds:
    """The special ids a chunk needs; SD2's OpenCLIP pads with 0 where SD1's CLIP pads with the end token."""

    start: int
    end: int
    pad: int
    comma: int | None


def chunk_prompt(
    text: str,
    tokenize: Callable[[list[str]], list[list[int]]],
    ids: TokenIds,
    find_embedding: EmbeddingFinder | None = None,
    comma_backtrack: int = DEFAULT_COMMA_BACKTRACK,
) -> tuple[list[PromptChunk], int]:
    """Split `text` into 77-token chunks. Returns the chunks and the count of prompt tokens used."""
    parsed = parse_prompt_attention(text)
    token_lists = tokenize([fragment for fragment, _ in parsed])

    chunks: list[PromptChunk] = []
    chunk = PromptChunk()
    token_count = 0
    last_comma = -1

    def close_chunk(is_last: bool = False) -> None:
        nonlocal chunk, token_count, last_comma
        token_count += len(chunk.tokens) if is_last else CHUNK_LENGTH
        missing = CHUNK_LENGTH - len(chunk.tokens)
        chunk.tokens = _with_specials(chunk.tokens + [ids.end] * missing, ids)
        chunk.multipliers = [1.0, *chunk.multipliers, *[1.0] * missing, 1.0]
        for fix in chunk.fixes:
            fix.offset += 1  # account for the start token
        chunks.append(chunk)
        chunk = PromptChunk()
        last_comma = -1

    for tokens, (fragment, weight) in zip(token_lists, parsed, strict=False):
        if fragment == "BREAK" and weight == BREAK_WEIGHT:
            close_chunk()
            continue
        position = 0
        while position < len(tokens):
            token = tokens[position]
            if token == ids.comma:
                last_comma = len(chunk.tokens)
            elif (
                comma_backtrack != 0
                and len(chunk.tokens) == CHUNK_LENGTH
                and last_comma != -1
                and len(chunk.tokens) - last_comma <= comma_backtrack
            ):
                cut = last_comma + 1
                moved_tokens, moved_mults = chunk.tokens[cut:], chunk.multipliers[cut:]
                moved_fixes = [f for f in chunk.fixes if f.offset >= cut]
                chunk.tokens, chunk.multipliers = chunk.tokens[:cut], chunk.multipliers[:cut]
                chunk.fixes = [f for f in chunk.fixes if f.offset < cut]
                close_chunk()
                chunk.tokens, chunk.multipliers = moved_tokens, moved_mults
                chunk.fixes = [EmbeddingFix(f.offset - cut, f.embedding) for f in moved_fixes]

            if len(chunk.tokens) == CHUNK_LENGTH:
                close_chunk()

            found = find_embedding(tokens, position) if find_embedding else None
            if found is None:
                chunk.tokens.append(token)
                chunk.multipliers.append(weight)
                position += 1
                continue

            embedding, name_length = found
            n_vectors = int(embedding.vectors.shape[0])
            if len(chunk.tokens) + n_vectors > CHUNK_LENGTH:
                close_chunk()
            chunk.fixes.append(EmbeddingFix(len(chunk.tokens), embedding))
            chunk.tokens += [0] * n_vectors
            chunk.multipliers += [weight] * n_vectors
            position += name_length

    if chunk.tokens or not chunks:
        close_chunk(is_last=True)
    return chunks, token_count


def empty_chunk(ids: TokenIds) -> PromptChunk:
    """The chunk of an empty prompt, used to even out batches whose prompts have different chunk counts."""
    return PromptChunk(_with_specials([ids.end] * CHUNK_LENGTH, ids), [1.0] * (CHUNK_LENGTH + 2))


def _with_specials(tokens: list[int], ids: TokenIds) -> list[int]:
    """Wrap 75 tokens in start/end; where the model pads with another id, everything after the first end is pad."""
    tokens = [ids.start, *tokens, ids.end]
    if ids.pad != ids.end:
        first_end = tokens.index(ids.end)
        tokens[first_end + 1 :] = [ids.pad] * (len(tokens) - first_end - 1)
    return tokens
