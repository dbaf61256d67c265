"""Reading `.pt`/`.ckpt` files that users drop in: `torch.load(weights_only=True)` only, and every way such a file
can fail turned into one sentence. Shared by the embedding, hypernetwork and LoRA readers."""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import torch


class TorchFileError(ValueError):
    """The file cannot be loaded; the message says why (refused as unsafe, or damaged)."""


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:160]


def load_tensors_only(path: Path, allowed: list | None = None) -> Any:
    """The file's content through PyTorch's weights-only unpickler (plus `allowed` classes); raises TorchFileError.

    A damaged file can make the unpickler fail in many ways (IndexError from an empty stack, UnicodeDecodeError,
    struct errors, ...): anything it raises means "not readable", since weights-only loading runs no code."""
    try:
        with torch.serialization.safe_globals(allowed or []):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        text = str(e)
        found = re.search(r"GLOBAL ([\w.]+)", text)
        if found or "Unsupported global" in text:
            what = f" ({found.group(1)})" if found else ""
            raise TorchFileError(
                f"refused: the file holds Python objects other than tensors{what}, which could run code when "
                "loaded; only plain tensor files are accepted"
            ) from None
        detail = re.search(r"WeightsUnpickler error: \s*(.+)", text)
        reason = detail.group(1).strip() if detail else _first_line(e)
        raise TorchFileError(f"not a readable torch file, perhaps truncated or corrupt ({reason})") from None
    except MemoryError:
        raise TorchFileError("not a readable torch file: it claims more memory than there is (corrupt)") from None
    except Exception as e:
        raise TorchFileError(f"not a readable torch file, perhaps truncated ({_first_line(e)})") from None
