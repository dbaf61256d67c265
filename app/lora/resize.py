"""Resizing a LoRA to a lower rank (kohya's `resize_lora.py`, which kohya users run before sharing: a rank-128 file
of 150 MB often keeps what matters at rank 32): each layer's update `scale * up @ down` is factored again by SVD
and cut to the new rank, which is the closest update of that rank there is (Eckart-Young). Optionally per layer
("dynamic"): the smallest rank that keeps a share of the update's Frobenius norm, up to the given rank.

Only kohya-named LoRA/LoCon layers (`lora_down`/`lora_up`, linear and convolution) are resized; a file with LyCORIS
layers (LoHa, LoKr, Tucker cores) or DoRA magnitudes is refused with the reason. Embeddings bundled in the file and
its other tensors are kept as they are."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from app.errors import UserError
from app.fileio import atomic_write
from app.lora.files import LoraFile, LoraFormatError, parse_lora, read_lora_tensors
from app.lora.writer import tensor_data_hash

DOWN, UP = ".lora_down.weight", ".lora_up.weight"
MAX_RANK = 1024
# LoRA layers under other tools' names: resize writes kohya's names only
REFUSED_NAMES = {"lora_A": "PEFT/diffusers-named LoRA", "lora.down": "diffusers-named LoRA"}


@dataclass(frozen=True)
class ResizeReport:
    layers: int
    resized: int  # layers whose rank went down (the others were at or below the new rank already)
    old_ranks: tuple[int, int]  # smallest and largest rank in the file
    new_ranks: tuple[int, int]
    kept_min: float  # the smallest share of a layer's update norm (Frobenius) kept
    kept_mean: float
    old_bytes: int
    new_bytes: int

    def sentence(self) -> str:
        def span(r: tuple[int, int]) -> str:
            return str(r[0]) if r[0] == r[1] else f"{r[0]}-{r[1]}"

        return (
            f"{self.layers} layers, {self.resized} resized: rank {span(self.old_ranks)} -> {span(self.new_ranks)}; "
            f"each layer keeps at least {self.kept_min:.1%} of its update's norm ({self.kept_mean:.1%} on average); "
            f"{self.old_bytes / 2**20:.1f} MB -> {self.new_bytes / 2**20:.1f} MB."
        )


def _refusal(lora: LoraFile, keys: list[str]) -> str | None:
    """Why the file's layers cannot be resized: other kinds (LoHa, DoRA, ...: not a product of two halves to
    re-factor) or other names."""
    kinds = sorted({layer.kind for layer in lora.layers.values()} - {"LoRA"})
    held = kinds + [kind for part, kind in REFUSED_NAMES.items() if any(part in key for key in keys)]
    if held:
        return f"it holds {', '.join(held)} layers; only kohya-named LoRA layers (lora_down/lora_up) can be resized"
    return None


def chosen_rank(singular: torch.Tensor, rank: int, keep: float) -> int:
    """`rank`, or with `keep` > 0 the smallest rank whose values hold that share of the Frobenius norm (at most
    `rank`); at least 1."""
    if keep <= 0:
        return max(1, min(rank, singular.numel()))
    energy = torch.cumsum(singular.double() ** 2, 0)
    total = float(energy[-1])
    if total == 0:
        return 1
    needed = int(torch.searchsorted(energy, torch.tensor(keep**2 * total, dtype=torch.float64)).item()) + 1
    return max(1, min(rank, needed, singular.numel()))


def low_rank_svd(up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The thin SVD (U, S, Vh; float64) of `up @ down` ([out, r] @ [r, in]) without forming the product: it has rank
    <= r, so two thin QRs and an r x r SVD give it: up = Qu Ru, down^T = Qd Rd, up @ down = Qu (Ru Rd^T) Qd^T. The
    same factors as an SVD of the whole out x in matrix (kohya's way), at a fraction of the time and memory
    (measured: benchmarks/lora_resize.py, benchmarks/lora_merge.py)."""
    q_up, r_up = torch.linalg.qr(up.double())
    q_down, r_down = torch.linalg.qr(down.double().T)
    u_small, s, vh_small = torch.linalg.svd(r_up @ r_down.T)
    return q_up @ u_small, s, vh_small @ q_down.T


def resize_layer(
    down: torch.Tensor, up: torch.Tensor, alpha: float, rank: int, keep: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """(new down, new up, new alpha, kept norm share) for one layer. The update scale * up @ down is factored by
    SVD, its singular values split evenly between the halves (similar magnitudes, kind to fp16), alpha = new rank
    so the file's scale is 1; a convolution is flattened to [out, in * kh * kw] and back."""
    old_rank = down.shape[0]
    u, s, vh = low_rank_svd(up.reshape(up.shape[0], -1).double() * (alpha / old_rank), down.reshape(old_rank, -1))
    k = chosen_rank(s, rank, keep)
    total = float((s**2).sum())
    kept = math.sqrt(float((s[:k] ** 2).sum()) / total) if total > 0 else 1.0
    root = s[:k].sqrt()
    new_up = (u[:, :k] * root).to(up.dtype)
    new_down = (root[:, None] * vh[:k]).to(down.dtype)
    if down.ndim == 4:
        new_down = new_down.reshape(k, *down.shape[1:])
        new_up = new_up.reshape(up.shape[0], k, 1, 1)
    return new_down.contiguous(), new_up.contiguous(), float(k), kept


def resize_lora(src: Path, dst: Path, rank: int, keep: float = 0.0, output_name: str = "") -> ResizeReport:
    """Write `src` resized to at most `rank` (with `keep` in (0, 1]: per layer, the smallest rank keeping that share
    of its norm) to `dst`, atomically. Layers already at or below the rank are copied unchanged."""
    if not 1 <= int(rank) <= MAX_RANK:
        raise UserError(f"The new rank must be between 1 and {MAX_RANK}, got {rank}.", "rank")
    if not 0 <= float(keep) <= 1:  # NaN fails this too
        raise UserError(f"The share of the norm to keep must be 0 (off) or up to 1, got {keep}.", "keep")
    try:
        tensors, metadata = read_lora_tensors(src)
        parsed = parse_lora(tensors, metadata)  # a file we could not apply is not one to resize
    except LoraFormatError as e:
        raise UserError(f"{src.name} cannot be resized: {e}.") from None
    reason = _refusal(parsed, list(tensors))
    if reason:
        raise UserError(f"{src.name} cannot be resized: {reason}.")
    prefixes = sorted(key[: -len(DOWN)] for key in tensors if key.endswith(DOWN))
    if not prefixes:
        raise UserError(f"{src.name} cannot be resized: it holds no LoRA layers (only bundled embeddings?).")
    out = dict(tensors)
    old_ranks, new_ranks, kept = [], [], []
    resized = 0
    with torch.no_grad():
        for prefix in prefixes:
            down, up = tensors[prefix + DOWN], tensors[prefix + UP]
            alpha_tensor = tensors.get(prefix + ".alpha")
            alpha = float(alpha_tensor) if alpha_tensor is not None else float(down.shape[0])
            old_ranks.append(down.shape[0])
            if down.shape[0] <= rank and keep <= 0:
                new_ranks.append(down.shape[0])
                kept.append(1.0)
                continue
            new_down, new_up, new_alpha, share = resize_layer(down, up, alpha, int(rank), float(keep))
            out[prefix + DOWN], out[prefix + UP] = new_down, new_up
            alpha_dtype = alpha_tensor.dtype if alpha_tensor is not None else torch.float32
            out[prefix + ".alpha"] = torch.tensor(new_alpha, dtype=alpha_dtype)
            resized += int(new_down.shape[0] < down.shape[0])
            new_ranks.append(new_down.shape[0])
            kept.append(share)
    dynamic = keep > 0
    comment = f"dimension is resized from {max(old_ranks)} to {'dynamic ' if dynamic else ''}{max(new_ranks)}"
    metadata = {
        **metadata,
        "ss_network_dim": "Dynamic" if dynamic else str(max(new_ranks)),
        "ss_network_alpha": "Dynamic" if dynamic else str(max(new_ranks)),
        "ss_training_comment": f"{comment}; {metadata['ss_training_comment']}"
        if metadata.get("ss_training_comment")
        else comment,
    }
    if output_name:
        metadata["ss_output_name"] = output_name
    # A pickle may hold tensors that share memory, which safetensors refuses to write: give each its own.
    shared = src.suffix.lower() != ".safetensors"
    out = {k: v.clone().contiguous() if shared else v.contiguous() for k, v in out.items()}
    metadata["sshs_model_hash"] = tensor_data_hash(out)
    atomic_write(dst, lambda tmp: save_file(out, str(tmp), metadata=metadata))
    return ResizeReport(
        layers=len(prefixes),
        resized=resized,
        old_ranks=(min(old_ranks), max(old_ranks)),
        new_ranks=(min(new_ranks), max(new_ranks)),
        kept_min=min(kept),
        kept_mean=sum(kept) / len(kept),
        old_bytes=src.stat().st_size,
        new_bytes=dst.stat().st_size,
    )
