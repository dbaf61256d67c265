"""Reading every common embedding file format into one shape, safely.

`.pt`/`.bin` are pickles: they load with `torch.load(weights_only=True)` only, so a file that needs anything but
tensors, dicts, lists, numbers and strings is refused, never executed. The one class allowed beyond that is
`torch.nn.ParameterDict`, which old textual_inversion/A1111 files use for `string_to_param` (rebuilding it runs
no code from the file).
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from app.safe_load import TorchFileError, load_tensors_only

PICKLE_SUFFIXES = (".pt", ".bin")
IMAGE_SUFFIXES = (".png", ".webp", ".avif", ".jxl")
SUFFIXES = (*PICKLE_SUFFIXES, ".safetensors", *IMAGE_SUFFIXES)
PNG_CHUNK = "sd-ti-embedding"


class EmbeddingFileError(Exception):
    """A file that cannot be used as an embedding; the message is the reason shown to the user."""


@dataclass
class EmbeddingData:
    """What a file holds: `vectors` [n, dim] for SD1/SD2, or `parts` {"clip_l", "clip_g"} for SDXL."""

    name: str
    vectors: torch.Tensor | None = None
    parts: dict[str, torch.Tensor] = field(default_factory=dict)
    step: int | None = None
    sd_checkpoint: str | None = None
    sd_checkpoint_name: str | None = None

    @property
    def width(self) -> int:
        if self.vectors is not None:
            return int(self.vectors.shape[1])
        return sum(int(t.shape[1]) for t in self.parts.values())

    @property
    def count(self) -> int:
        if self.vectors is not None:
            return int(self.vectors.shape[0])
        return int(self.parts["clip_g"].shape[0])

    def side_by_side(self) -> torch.Tensor:
        """The vectors; SDXL's two parts side by side (clip_l, then clip_g), as the two encoders' conditioning is."""
        if self.vectors is not None:
            return self.vectors
        return torch.cat([self.parts["clip_l"], self.parts["clip_g"]], dim=1)


def read_embedding_file(path: Path) -> EmbeddingData:
    """Parse `path`; raises EmbeddingFileError with a reason a person understands."""
    suffix = path.suffix.lower()
    if path.stat().st_size == 0:
        raise EmbeddingFileError("the file is empty (0 bytes)")
    if suffix in PICKLE_SUFFIXES:
        data = _load_pickle(path)
        default_name = path.stem
    elif suffix == ".safetensors":
        try:
            data: dict[str, Any] = load_file(str(path))
            with safe_open(str(path), "pt") as f:
                metadata = f.metadata() or {}
            for key in ("step", "sd_checkpoint", "sd_checkpoint_name"):  # what our trainer writes there
                if key in metadata and key not in data:
                    data[key] = metadata[key]
        except (SafetensorError, OSError, ValueError) as e:
            raise EmbeddingFileError(f"not a readable safetensors file ({e})") from None
        default_name = path.stem
    elif suffix in IMAGE_SUFFIXES:
        data = _load_image(path)
        default_name = str(data.get("name") or path.stem)
        return _interpret(data, default_name)
    else:
        raise EmbeddingFileError(f"'{suffix}' files are not embeddings")
    return _interpret(data, default_name, name_from_file=True)


def _load_pickle(path: Path) -> Any:
    try:
        return load_tensors_only(path, [torch.nn.ParameterDict])
    except TorchFileError as e:
        raise EmbeddingFileError(str(e)) from None


def _load_image(path: Path) -> dict:
    try:
        with Image.open(path) as image:
            text = image.info.get(PNG_CHUNK)
    except (UnidentifiedImageError, OSError) as e:
        raise EmbeddingFileError(f"not a readable image ({e})") from None
    if not text:
        raise EmbeddingFileError(f"the image has no '{PNG_CHUNK}' text chunk, so it holds no embedding")
    try:
        return json.loads(base64.b64decode(text), object_hook=_decode_tensors)
    except (ValueError, TypeError) as e:
        raise EmbeddingFileError(f"the '{PNG_CHUNK}' chunk is not valid embedding data ({e})") from None


def _decode_tensors(obj: dict) -> Any:
    if "TORCHTENSOR" in obj:
        return torch.tensor(obj["TORCHTENSOR"], dtype=torch.float32)
    return obj


def encode_tensors(obj: Any) -> Any:
    """JSON-ready copy of `obj` with tensors as {"TORCHTENSOR": lists} (A1111's PNG chunk encoding)."""
    if isinstance(obj, torch.Tensor):
        return {"TORCHTENSOR": obj.detach().cpu().float().tolist()}
    if isinstance(obj, dict):
        return {k: encode_tensors(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [encode_tensors(v) for v in obj]
    return obj


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def _as_matrix(tensor: Any, what: str) -> torch.Tensor:
    if isinstance(tensor, torch.nn.Parameter):
        tensor = tensor.data
    if not isinstance(tensor, torch.Tensor):
        raise EmbeddingFileError(f"{what} is not a tensor")
    if tensor.ndim == 1:
        tensor = tensor.unsqueeze(0)
    if tensor.ndim != 2:
        raise EmbeddingFileError(f"{what} has shape {list(tensor.shape)}; expected [vectors, width] or [width]")
    if tensor.shape[0] == 0 or tensor.shape[1] == 0:
        raise EmbeddingFileError(f"{what} is empty (shape {list(tensor.shape)})")
    tensor = tensor.detach().to(torch.float32).clone()
    if not torch.isfinite(tensor).all():
        raise EmbeddingFileError(f"{what} contains NaN or infinite values")
    return tensor


def _interpret(data: Any, default_name: str, name_from_file: bool = False) -> EmbeddingData:
    if not isinstance(data, dict):
        raise EmbeddingFileError(f"expected a dict of tensors, found {type(data).__name__}")
    name = default_name if name_from_file else str(data.get("name") or default_name)
    meta = dict(
        step=_int_or_none(data.get("step")),
        sd_checkpoint=_str_or_none(data.get("sd_checkpoint")),
        sd_checkpoint_name=_str_or_none(data.get("sd_checkpoint_name")),
    )
    if "string_to_param" in data:  # A1111 / textual_inversion .pt
        params = data["string_to_param"]
        items = list(params.items()) if hasattr(params, "items") else []
        if len(items) != 1:
            raise EmbeddingFileError(f"'string_to_param' must hold exactly one tensor, found {len(items)}")
        return EmbeddingData(name, _as_matrix(items[0][1], "'string_to_param'"), **meta)
    if "emb_params" in data:  # A1111 / kohya .safetensors
        return EmbeddingData(name, _as_matrix(data["emb_params"], "'emb_params'"), **meta)
    if "clip_l" in data or "clip_g" in data:  # SDXL
        if not ("clip_l" in data and "clip_g" in data):
            raise EmbeddingFileError("an SDXL embedding needs both 'clip_l' and 'clip_g'")
        parts = {k: _as_matrix(data[k], f"'{k}'") for k in ("clip_l", "clip_g")}
        if parts["clip_l"].shape[0] != parts["clip_g"].shape[0]:
            raise EmbeddingFileError("'clip_l' and 'clip_g' have different vector counts")
        return EmbeddingData(name, None, parts, **meta)
    tensors = [(k, v) for k, v in data.items() if isinstance(v, torch.Tensor)]
    if len(tensors) == 1:  # diffusers learned_embeds, or any single-tensor dict
        return EmbeddingData(name, _as_matrix(tensors[0][1], f"'{tensors[0][0]}'"), **meta)
    raise EmbeddingFileError(
        f"not an embedding: expected 'string_to_param', 'emb_params', 'clip_l'+'clip_g' or a single tensor, "
        f"found keys {sorted(map(str, data))[:8]}"
    )


def embedding_from_dict(data: Any, name: str) -> EmbeddingData:
    """An embedding from an already-loaded dict in any of the layouts above (e.g. one bundled in a LoRA file), named
    `name`; raises EmbeddingFileError with the reason."""
    return _interpret(data, name, name_from_file=True)


def _int_or_none(value: Any) -> int | None:
    try:
        return int(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def _str_or_none(value: Any) -> str | None:
    return str(value) if value is not None else None
