"""Extracting a LoRA from a fine-tuned model (kohya's `extract_lora_from_models.py`, SuperMerger's "make LoRA"): the
change from a base model to a fine-tuned one (a DreamBooth or full fine-tune, a merge), layer by layer, cut to a
low rank by SVD and written as a kohya LoRA, so a 2-7 GB checkpoint becomes a 20-200 MB file that applies to the
base model and to other models of its family.

The layers are those kohya's `networks.lora` covers, so the file has the layout every reader expects: in the UNet
every linear layer and 1x1 convolution of the transformer blocks (attention, feed-forward, proj_in/proj_out), with
a conv rank also the ResNet blocks and down/upsamplers (their 3x3 convolutions at the conv rank, the rest at the
rank); in each text encoder the attention and MLP projections. As in kohya, the text encoders are left out when no
weight of theirs changed by more than `min_diff` (most fine-tunes train the UNet only: their text-encoder
"difference" is rounding), the largest values of each layer's factors are clamped at the `clamp_quantile`
quantile, and alpha = rank (the file's scale is 1). Unlike kohya, a layer that did not change at all is left out
rather than written as zeros, and `sv_fro` picks each layer's rank as the least that keeps that share of its
change's Frobenius norm (kohya's resize has this; its extraction has not)."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from app.errors import UserError
from app.fileio import size_text
from app.lora.names import TEXT_ENCODER, TEXT_ENCODER_2, UNET
from app.lora.resize import MAX_RANK, chosen_rank, low_rank_svd
from app.lora.writer import SAVE_DTYPES, save_network

# kohya's `networks.lora` target modules (class names; the layers are their linear and convolution children)
UNET_BLOCKS = ("Transformer2DModel",)
UNET_CONV_BLOCKS = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
TEXT_BLOCKS = ("CLIPAttention", "CLIPSdpaAttention", "CLIPMLP")


@dataclass(frozen=True)
class ExtractOptions:
    """kohya's options: `rank` (`--dim`), `conv_dim` (0: no ResNet convolutions), `clamp_quantile`, `min_diff`,
    `save_precision`; and `sv_fro` (0: every layer at `rank`; in (0, 1]: the least rank keeping that share)."""

    rank: int = 32
    conv_dim: int = 0
    sv_fro: float = 0.0
    clamp_quantile: float = 0.99
    min_diff: float = 0.01
    save_precision: str = "fp16"

    def check(self) -> None:
        """Refuse values that cannot give a file, naming the field."""
        if not 1 <= int(self.rank) <= MAX_RANK:
            raise UserError(f"The rank must be between 1 and {MAX_RANK}, got {self.rank}.", "rank")
        if not 0 <= int(self.conv_dim) <= MAX_RANK:
            raise UserError(f"The conv rank must be 0 (off) or up to {MAX_RANK}, got {self.conv_dim}.", "conv_dim")
        if not 0 <= float(self.sv_fro) <= 1:  # NaN fails these too
            raise UserError(f"The share of the norm to keep must be 0 (off) or up to 1, got {self.sv_fro}.", "sv_fro")
        if not 0 < float(self.clamp_quantile) <= 1:
            raise UserError(
                f"The clamp quantile must be above 0 and at most 1 (1: no clamping), got {self.clamp_quantile}.",
                "clamp_quantile",
            )
        if not 0 <= float(self.min_diff) <= 1:
            raise UserError(f"The minimum difference must be between 0 and 1, got {self.min_diff}.", "min_diff")
        if self.save_precision not in SAVE_DTYPES:
            raise UserError(
                f"Unknown save precision '{self.save_precision}'; use one of {', '.join(SAVE_DTYPES)}.",
                "save_precision",
            )


@dataclass(frozen=True)
class ExtractReport:
    layers: int  # written
    unchanged: int  # layers whose weights were the same in both models (left out)
    text_encoder: bool  # whether the text encoders' layers are in the file
    text_encoder_diff: float  # the largest change of a text-encoder weight
    min_diff: float  # the threshold it was held against
    ranks: tuple[int, int]
    kept_min: float  # the smallest share of a layer's change (Frobenius norm) its rank keeps
    kept_mean: float
    size_bytes: int

    def sentence(self) -> str:
        ranks = str(self.ranks[0]) if self.ranks[0] == self.ranks[1] else f"{self.ranks[0]}-{self.ranks[1]}"
        if self.text_encoder:
            te = f"the text encoder changed (by up to {self.text_encoder_diff:.3g}) and is included"
        elif self.text_encoder_diff == 0:
            te = "the text encoder is unchanged: UNet only"
        else:
            te = (
                f"the text encoder changed by at most {self.text_encoder_diff:.3g}, not more than the minimum "
                f"change ({self.min_diff:g}): UNet only"
            )
        unchanged = f", {self.unchanged} unchanged layers left out" if self.unchanged else ""
        return (
            f"{self.layers} layers at rank {ranks}{unchanged}; {te}; each layer keeps at least {self.kept_min:.1%} "
            f"of its change's norm ({self.kept_mean:.1%} on average); {size_text(self.size_bytes)}."
        )


def kohya_layers(component: str, root: torch.nn.Module, conv: bool) -> dict[str, torch.nn.Module]:
    """{module path: layer} of the layers kohya's `networks.lora` makes for `component` (with `conv`, its
    `conv_dim` layers too), in the model's order."""
    blocks = UNET_BLOCKS + (UNET_CONV_BLOCKS if conv else ()) if component == UNET else TEXT_BLOCKS
    found: dict[str, torch.nn.Module] = {}
    for path, block in root.named_modules():
        if type(block).__name__ not in blocks:
            continue
        for child_path, child in block.named_modules():
            is_conv = isinstance(child, torch.nn.Conv2d)
            if isinstance(child, torch.nn.Linear) or (is_conv and (conv or child.kernel_size == (1, 1))):
                found.setdefault(f"{path}.{child_path}" if child_path else path, child)
    return found


def quantile(values: torch.Tensor, q: float) -> float:
    """`torch.quantile(values, q)` (linear interpolation) without its limit of 16 M elements."""
    flat = values.flatten().float()
    position = q * (flat.numel() - 1)
    below, above = math.floor(position), math.ceil(position)
    low = float(flat.kthvalue(below + 1).values)
    high = low if above == below else float(flat.kthvalue(above + 1).values)
    return low + (high - low) * (position - below)


@dataclass
class LowRank:
    """A layer's change given as a product, `up @ down` ([out, r] @ [r, in * kernel]), of the weight's `shape`:
    the sum of plain LoRAs' updates, whose SVD comes from the halves (`low_rank_svd`) instead of the whole matrix."""

    up: torch.Tensor
    down: torch.Tensor
    shape: tuple[int, ...]

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def dense(self) -> torch.Tensor:
        return (self.up @ self.down).reshape(self.shape)


def _svd(diff: torch.Tensor | LowRank) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """The thin SVD of the change as a matrix, or None where it is zero (a product: zero up to the rounding of its
    halves, as when <lora:a:1> <lora:a:-1> cancel)."""
    if isinstance(diff, LowRank):
        u, s, vh = low_rank_svd(diff.up, diff.down)
        if float(s[0]) <= 1e-6 * float(diff.up.double().norm() * diff.down.double().norm()):
            return None
        return u.float(), s.float(), vh.float()
    if not bool(diff.any()):
        return None
    # thin: kohya's full SVD also computes an in x in Vh
    return torch.linalg.svd(diff.reshape(diff.shape[0], -1).float(), full_matrices=False)


def extract_layer(
    diff: torch.Tensor | LowRank, rank: int, sv_fro: float = 0.0, clamp_quantile: float = 0.99
) -> tuple[torch.Tensor, torch.Tensor, float] | None:
    """(down, up, kept norm share) of the rank-k approximation of one layer's change (a convolution flattened to
    [out, in * kh * kw]), k = `rank` or by `sv_fro`; None where the change is zero. As kohya: up = U S and down =
    Vh, both clamped at the `clamp_quantile` quantile of their values (1: not clamped); then each rank's halves are
    rescaled to equal norms, which leaves their product as it is and keeps both halves' values moderate in fp16."""
    factors = _svd(diff)
    if factors is None:
        return None
    u, s, vh = factors
    k = chosen_rank(s, rank, sv_fro)
    total = float((s.double() ** 2).sum())
    kept = math.sqrt(float((s[:k].double() ** 2).sum()) / total) if total > 0 else 1.0
    up, down = u[:, :k] * s[:k], vh[:k]
    if clamp_quantile < 1:
        high = quantile(torch.cat([up.flatten(), down.flatten()]), clamp_quantile)
        up, down = up.clamp(-high, high), down.clamp(-high, high)
    up_norms, down_norms = up.norm(dim=0), down.norm(dim=1)
    usable = (up_norms > 0) & (down_norms > 0)
    balance = torch.where(usable, (down_norms / up_norms.where(usable, 1)).sqrt(), 1)
    up, down = up * balance, down / balance[:, None]
    if diff.ndim == 4:
        down = down.reshape(k, *diff.shape[1:])
        up = up.reshape(diff.shape[0], k, 1, 1)
    return down.contiguous(), up.contiguous(), kept


def _weight(module: torch.nn.Module, device: torch.device) -> torch.Tensor:
    return module.weight.detach().to(device, torch.float32)


def layer_pairs(
    base: dict[str, torch.nn.Module], tuned: dict[str, torch.nn.Module], conv: bool
) -> list[tuple[str, str, torch.nn.Module, torch.nn.Module]]:
    """(component, path, base layer, tuned layer) of every layer to extract; refuses two models whose layers
    differ (another family, another size)."""
    if set(base) != set(tuned):
        raise UserError("The two models are of different kinds (one is SDXL, the other not): no LoRA between them.")
    pairs = []
    for component in base:
        mine, theirs = kohya_layers(component, base[component], conv), kohya_layers(component, tuned[component], conv)
        for path, layer in mine.items():
            other = theirs.get(path)
            if other is None or other.weight.shape != layer.weight.shape:
                raise UserError(
                    f"The two models are laid out differently (their {component} layer {path} differs): they are of "
                    "different families (e.g. SD 1.x and SD 2.x) and no LoRA connects them."
                )
            pairs.append((component, path, layer, other))
    return pairs


# (component, module path, the layer's change as fp32 on the given device, whole or as a product): computed when
# needed, one at a time
Change = tuple[str, str, Callable[[torch.device], torch.Tensor | LowRank]]


def _dense(diff: torch.Tensor | LowRank) -> torch.Tensor:
    return diff.dense() if isinstance(diff, LowRank) else diff


def extract_lora(
    base: dict[str, torch.nn.Module],
    tuned: dict[str, torch.nn.Module],
    dst: Path,
    options: ExtractOptions,
    metadata: dict[str, str],
    progress: Callable[[int, int], None] | None = None,
    device: torch.device | str = "cpu",
) -> ExtractReport:
    """Write the LoRA of `tuned` - `base` (each {component: module}, as `names.model_components` gives) to `dst`,
    atomically; `progress(done, total)` is called after each layer (it may raise to stop: nothing is written). The
    SVDs run on `device` (kohya's `--device`; a GPU's takes seconds where a CPU's takes a minute), one layer's change
    there at a time."""
    options.check()
    changes: list[Change] = [
        (component, path, lambda dev, b=b, t=t: _weight(t, dev) - _weight(b, dev))
        for component, path, b, t in layer_pairs(base, tuned, options.conv_dim > 0)
    ]
    return write_changes(changes, dst, options, metadata, TEXT_ENCODER_2 in base, progress, device)


def write_changes(
    changes: list[Change],
    dst: Path,
    options: ExtractOptions,
    metadata: dict[str, str],
    xl: bool,
    progress: Callable[[int, int], None] | None = None,
    device: torch.device | str = "cpu",
    nothing: str = "The two models have the same weights in every layer a LoRA covers: there is no change to extract.",
) -> ExtractReport:
    """Write the layers' `changes` as a kohya LoRA at `options`' rank (text encoders only where one of their
    changes exceeds `min_diff`; unchanged layers left out) to `dst`, atomically; `nothing`: the refusal where no
    layer changed."""
    device = torch.device(device)
    options.check()
    with torch.no_grad():
        te_changes = [c for c in changes if c[0] in (TEXT_ENCODER, TEXT_ENCODER_2)]
        te_diff = max((float(_dense(change(device)).abs().max()) for _, _, change in te_changes), default=0.0)
        with_text = te_diff > options.min_diff
        if not with_text:
            changes = [c for c in changes if c[0] == UNET]
        layers, kept, unchanged = [], [], 0
        for done, (component, path, change) in enumerate(changes, 1):
            diff = change(device)
            is_3x3 = diff.ndim == 4 and tuple(diff.shape[2:]) != (1, 1)
            rank = options.conv_dim if is_3x3 else options.rank
            extracted = extract_layer(diff, rank, options.sv_fro, options.clamp_quantile)
            if extracted is None:
                unchanged += 1
            else:
                down, up, share = extracted
                down, up = down.cpu(), up.cpu()  # a GPU holds one layer's work at a time
                layers.append((component, path, {"lora_down.weight": down, "lora_up.weight": up}, down.shape[0]))
                kept.append(share)
            if progress is not None:
                progress(done, len(changes))
    if not layers:
        raise UserError(nothing)
    ranks = [alpha for *_, alpha in layers]
    dynamic = options.sv_fro > 0
    args = {"conv_dim": str(options.conv_dim), "conv_alpha": str(float(options.conv_dim))} if options.conv_dim else {}
    metadata = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": "Dynamic" if dynamic else str(options.rank),
        "ss_network_alpha": "Dynamic" if dynamic else str(float(options.rank)),
        "ss_network_args": json.dumps(args),
        "ss_network_train_unet_only": str(not with_text),
        **metadata,
    }
    save_network(dst, layers, metadata, xl=xl, dtype=SAVE_DTYPES[options.save_precision])
    return ExtractReport(
        layers=len(layers),
        unchanged=unchanged,
        text_encoder=with_text,
        text_encoder_diff=te_diff,
        min_diff=options.min_diff,
        ranks=(min(ranks), max(ranks)),
        kept_min=min(kept),
        kept_mean=sum(kept) / len(kept),
        size_bytes=dst.stat().st_size,
    )
