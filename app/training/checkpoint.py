"""Optimizer checkpoints (`<name>.optim` beside the trained file): resume exactly, or not at all.

The file holds the AdamW state, the step, the run's seed, the fp16 loss scaler's state (when there is one) and a
hash of the trained tensors at that step. A file whose hash does not match the tensors it sits beside (an older
run, a file copied from elsewhere) is ignored with a warning, never applied.

A checkpoint is three renames: the new state as `<name>.optim.next`, then the trained file, then `.next` over
`.optim`. Whatever moment a kill hits, one of the two optimizer files belongs to the trained file on disk, and
`load_optim` takes that one, so a resumed run continues exactly.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
from pathlib import Path
from typing import Any

import torch

from app.fileio import atomic_write

log = logging.getLogger(__name__)


def tensors_hash(tensors: list[torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for t in tensors:
        digest.update(t.detach().cpu().float().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def pending_path(path: Path) -> Path:
    """Where the next optimizer state waits until the trained file it belongs to is written."""
    return path.with_name(path.name + ".next")


def commit_optim(path: Path) -> None:
    """Make the pending state the current one (after its trained file is on disk)."""
    os.replace(pending_path(path), path)


def save_optim(
    path: Path,
    optimizer: torch.optim.Optimizer,
    step: int,
    seed: int,
    tensors_digest: str,
    kind: str,
    scaler_state: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> None:
    """`scaler_state`: the fp16 loss scale and its growth counter, so a resumed fp16 run continues exactly; `extra`:
    the target's own (`resume_state`)."""
    data = {
        "hash": tensors_digest,
        "optimizer_state_dict": optimizer.state_dict(),
        "step": step,
        "seed": seed,
        "kind": kind,
    }
    if scaler_state is not None:
        data["scaler_state_dict"] = scaler_state
    data.update(extra or {})
    atomic_write(path, lambda tmp: torch.save(data, tmp))


def load_optim(path: Path, expected_hash: str, kind: str) -> dict[str, Any] | None:
    """The stored state that belongs to these tensors (`.optim`, or a `.optim.next` whose trained file was written
    just before a kill), else None with a warning saying why."""
    found = [(p, _read_optim(p, kind)) for p in (path, pending_path(path)) if p.is_file()]
    for candidate, data in found:
        if data is not None and data.get("hash") == expected_hash:
            if candidate != path:
                log.info("Using %s: the run stopped after writing the weights it belongs to", candidate.name)
            return data
    for candidate, data in found:
        if data is not None:
            log.warning(
                "Ignoring %s: it belongs to other weights (hash %s, expected %s); starting a fresh optimizer",
                candidate,
                data.get("hash"),
                expected_hash,
            )
    return None


def _read_optim(path: Path, kind: str) -> dict[str, Any] | None:
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as e:
        log.warning("Ignoring unreadable optimizer state %s: %s", path, str(e).splitlines()[0][:200])
        return None
    if not isinstance(data, dict) or data.get("kind", kind) != kind or "optimizer_state_dict" not in data:
        log.warning("Ignoring %s: it is not a %s optimizer state", path, kind)
        return None
    return data


def fit_param_groups(state: dict[str, Any], sizes: list[int]) -> dict[str, Any]:
    """An optimizer state saved with one parameter group, split into groups of `sizes` (in order), for a run that
    gives part of its parameters their own learning rate (a LoRA's text encoder): the per-parameter state is keyed
    by position, so it carries over unchanged. Any other state is returned as it is."""
    groups = state.get("param_groups", [])
    if len(groups) != 1 or len(sizes) < 2 or sum(sizes) != len(groups[0]["params"]):
        return state
    ids, split, start = groups[0]["params"], [], 0
    for n in sizes:
        split.append({**groups[0], "params": ids[start : start + n]})
        start += n
    return {**state, "param_groups": split}
