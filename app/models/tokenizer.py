"""CLIP's BPE tokenizer from the vocabulary files shipped in this package (no hub)."""

from __future__ import annotations

from pathlib import Path

from transformers import CLIPTokenizer

SHIPPED_DIR = Path(__file__).resolve().parent / "tokenizer"
MAX_LENGTH = 77
# "a photo of a cat" with start/end tokens, as CLIP's reference tokenizer gives it.
_CHECK_TEXT = "a photo of a cat"
_CHECK_IDS = [49406, 320, 1125, 539, 320, 2368, 49407]


class TokenizerError(RuntimeError):
    pass


def load_clip_tokenizer(folder: Path | None = None) -> CLIPTokenizer:
    """Build a CLIPTokenizer from `vocab.json` + `merges.txt` in `folder` (default: the shipped copy).

    transformers silently ignores some file arguments, so we check that the vocabulary really loaded.
    """
    folder = Path(folder) if folder else SHIPPED_DIR
    vocab, merges = folder / "vocab.json", folder / "merges.txt"
    if not (vocab.is_file() and merges.is_file()):
        raise TokenizerError(f"Tokenizer folder {folder} needs vocab.json and merges.txt.")
    tokenizer = CLIPTokenizer(vocab=str(vocab), merges=str(merges))
    tokenizer.model_max_length = MAX_LENGTH
    if len(tokenizer) < 49408 or tokenizer(_CHECK_TEXT)["input_ids"] != _CHECK_IDS:
        raise TokenizerError(
            f"The CLIP tokenizer in {folder} did not load correctly (vocabulary size {len(tokenizer)}); "
            "regenerate it with scripts/make_clip_tokenizer.py."
        )
    return tokenizer
