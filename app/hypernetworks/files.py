"""Reading and writing hypernetwork files: A1111 `.pt` (safely) and `.safetensors` with the same content.

`.safetensors` layout (ours; A1111 has none): tensors under `<width>.<0=k|1=v>.<state-dict key>`, e.g.
`768.0.linear.0.weight`, and every other field JSON-encoded in the metadata under its A1111 key.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from app.errors import UserError
from app.fileio import atomic_write
from app.hypernetworks.hypernetwork import Hypernetwork, HypernetworkFormatError
from app.safe_load import TorchFileError, load_tensors_only

SUFFIXES = (".pt", ".safetensors")


def read_hypernetwork_file(path: Path) -> Hypernetwork:
    """Load `path`; raises HypernetworkFormatError with a reason a person understands."""
    if path.stat().st_size == 0:
        raise HypernetworkFormatError("the file is empty (0 bytes)")
    data = _read_safetensors(path) if path.suffix.lower() == ".safetensors" else _read_pt(path)
    try:
        return Hypernetwork.from_dict(data, path.stem)
    except HypernetworkFormatError:
        raise
    except (UserError, ValueError, TypeError, KeyError, IndexError, AttributeError, RuntimeError) as e:
        # A damaged field (a structure that is not numbers, a tensor of the wrong shape) is a damaged file.
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise HypernetworkFormatError(f"its contents are not a valid hypernetwork ({first})") from None


def _read_pt(path: Path) -> dict:
    try:
        return load_tensors_only(path)
    except TorchFileError as e:
        raise HypernetworkFormatError(str(e)) from None


def _read_safetensors(path: Path) -> dict:
    try:
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 - safe_open has no iterator
    except (SafetensorError, OSError, ValueError) as e:
        raise HypernetworkFormatError(f"not a readable safetensors file ({e})") from None
    data: dict[Any, Any] = {}
    for key, value in metadata.items():
        try:
            data[key] = json.loads(value)
        except ValueError:
            data[key] = value
    pairs: dict[int, tuple[dict, dict]] = {}
    for key, tensor in tensors.items():
        width, which, rest = ([*key.split(".", 2), "", ""])[:3]
        if not width.isdigit() or which not in ("0", "1") or not rest:
            raise HypernetworkFormatError(f"unexpected tensor name '{key}' (expected <width>.<0|1>.<param>)")
        pairs.setdefault(int(width), ({}, {}))[int(which)][rest] = tensor
    data.update(pairs)
    return data


def save_hypernetwork(hn: Hypernetwork, path: Path) -> None:
    """Write `hn` to `path` (.pt in A1111's layout, or .safetensors), atomically."""
    data = hn.to_dict()
    if path.suffix.lower() == ".safetensors":
        tensors = {
            f"{width}.{i}.{key}": value.detach().cpu().contiguous()
            for width in hn.layers
            for i, state in enumerate(data[width])
            for key, value in state.items()
        }
        metadata = {k: json.dumps(v) for k, v in data.items() if isinstance(k, str)}
        atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    else:
        cpu = {
            k: (tuple({n: t.detach().cpu() for n, t in s.items()} for s in v) if isinstance(k, int) else v)
            for k, v in data.items()
        }
        atomic_write(path, lambda tmp: torch.save(cpu, tmp))
