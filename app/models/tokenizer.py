"""CLIP's BPE tokenizer from the vocabulary files shipped in this package (no hub)."""

from __future__ import annotations

import json
from pathlib import Path

from transformers import CLIPTokenizer

SHIPPED_DIR = Path(__file__).resolve().parent / "tokenizer"
MAX_LENGTH = 77
# "a photo of a cat" with start/end tokens, as CLIP's reference tokenizer gives it.
_CHECK_TEXT = "a photo of a cat"
_CHECK_IDS = [49406, 320, 1125, 539, 320, 2368, 49407]


class TokenizerError(RuntimeError):
    pass


def load_clip_tokenizer(folder: Path | None = None, pad_token: str | None = None) -> CLIPTokenizer:
    """Build a CLIPTokenizer from `vocab.json` + `merges.txt` in `folder` (default: the shipped copy).

    SD1's CLIP pads with the end token; SD2's OpenCLIP pads with "!" (id 0): `pad_token`, or the folder's
    tokenizer_config.json, says which. transformers silently ignores some file arguments, so we check that the
    vocabulary really loaded.
    """
    folder = Path(folder) if folder else SHIPPED_DIR
    vocab, merges = folder / "vocab.json", folder / "merges.txt"
    if not (vocab.is_file() and merges.is_file()):
        raise TokenizerError(f"Tokenizer folder {folder} needs vocab.json and merges.txt.")
    pad_token = pad_token or _configured_pad_token(folder) or "<|endoftext|>"
    tokenizer = CLIPTokenizer(vocab=str(vocab), merges=str(merges), pad_token=pad_token)
    tokenizer.model_max_length = MAX_LENGTH
    if len(tokenizer) < 49408 or tokenizer(_CHECK_TEXT)["input_ids"] != _CHECK_IDS:
        raise TokenizerError(
            f"The CLIP tokenizer in {folder} did not load correctly (vocabulary size {len(tokenizer)}); "
            "regenerate it with scripts/make_clip_tokenizer.py."
        )
    return tokenizer


def _configured_pad_token(folder: Path) -> str | None:
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        try:
            value = json.loads((folder / name).read_text(encoding="utf-8")).get("pad_token")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str) and value:
            return value
    return None
