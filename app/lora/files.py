"""Reading LoRA files: kohya/A1111 `.safetensors` (and `.pt`/`.ckpt` through weights-only loading) and
diffusers/PEFT files, into one list of low-rank layers; files of kinds we do not apply get a reason, not a crash."""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from app.lora.names import Target
from app.safe_load import TorchFileError, load_tensors_only

SUFFIXES = (".safetensors", ".pt", ".ckpt")


class LoraFormatError(ValueError):
    """A file that cannot be used as a LoRA; the message says why, in words."""


# Markers of kinds of "network" files that share the folder and the tag but are not LoRA/LoCon.
_OTHER_KINDS = [
    ("hada_w1_a", "a LyCORIS LoHa"),
    ("lokr_w", "a LyCORIS LoKr"),
    ("dora_scale", "a DoRA (weight-decomposed LoRA)"),
    ("lora_mid", "a LyCORIS LoCon with Tucker decomposition (lora_mid)"),
    ("on_input", "an (IA)³"),
    ("oft_", "an OFT/BOFT"),
    (".a1.weight", "a GLoRA"),
    (".diff", "a LyCORIS full-difference"),
    (".w_norm", "a LyCORIS norm"),
]
_DOWN_UP = [
    (re.compile(r"^(.*)\.lora_down\.weight$"), re.compile(r"^(.*)\.lora_up\.weight$")),  # kohya
    (re.compile(r"^(.*)\.lora_A(?:\.[\w-]+)?\.weight$"), re.compile(r"^(.*)\.lora_B(?:\.[\w-]+)?\.weight$")),  # PEFT
    (re.compile(r"^(.*)\.lora\.down\.weight$"), re.compile(r"^(.*)\.lora\.up\.weight$")),  # older diffusers
]
# diffusers' attention-processor LoRAs (2023): `<attn>.processor.to_q_lora.down.weight` is the layer `<attn>.to_q`
_PROCESSOR = re.compile(r"^(.*)\.processor\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")
_PREFIXES = ("base_model.model.",)
_IGNORED = ("bundle_emb.",)  # embeddings bundled in a LoRA file (A1111 extension): not applied here


@dataclass
class LoraLayer:
    """One low-rank update: `delta W = (alpha / rank) * up @ down` (reshaped for convolutions)."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float | None = None

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        """alpha / rank; files without an alpha (PEFT, old diffusers) mean scale 1."""
        return 1.0 if self.alpha is None else self.alpha / self.rank


@dataclass
class LoraFile:
    layers: dict[str, LoraLayer]  # layer name as written in the file (minus the weight suffix) -> update
    metadata: dict[str, str] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)  # what the file holds that we do not apply


@dataclass(frozen=True)
class BoundLayer:
    """A layer of the file matched to the model layer it changes."""

    target: Target
    layer: LoraLayer


def read_lora_file(path: Path) -> LoraFile:
    """Parse `path`; raises LoraFormatError with a reason a person understands."""
    if path.stat().st_size == 0:
        raise LoraFormatError("the file is empty (0 bytes)")
    if path.suffix.lower() == ".safetensors":
        tensors, metadata = _read_safetensors(path)
    else:
        tensors, metadata = _read_pickle(path), {}
    return parse_lora(tensors, metadata)


_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


def read_lora_header(path: Path) -> LoraFile:
    """What listing a file needs, without its weights: metadata, layer names and shapes (as `meta` tensors), the
    checks that need no values (kind, names, halves, shapes, dtype; alphas are read, they are single numbers).
    NaN values are found when the file is used (`read_lora_file`). `.pt` files have no header: they are loaded,
    and only their shapes are kept."""
    if path.stat().st_size == 0:
        raise LoraFormatError("the file is empty (0 bytes)")
    if path.suffix.lower() != ".safetensors":
        tensors = {
            k: v if k.endswith(".alpha") else torch.empty(v.shape, dtype=v.dtype, device="meta")
            for k, v in _read_pickle(path).items()
        }
        return parse_lora(tensors, {})
    try:
        with safe_open(str(path), "pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {}
            for key in f.keys():  # noqa: SIM118 - safe_open has no iterator
                if key.endswith(".alpha"):
                    tensors[key] = f.get_tensor(key)
                    continue
                piece = f.get_slice(key)
                dtype = _SAFETENSORS_DTYPES.get(piece.get_dtype(), torch.int64)  # not a float: refused by the check
                tensors[key] = torch.empty(piece.get_shape(), dtype=dtype, device="meta")
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError) as e:
        raise LoraFormatError(
            f"not a readable safetensors file, perhaps truncated or still downloading ({e})"
        ) from None
    return parse_lora(tensors, metadata)


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        with safe_open(str(path), "pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 - safe_open has no iterator
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise LoraFormatError(
            f"not a readable safetensors file, perhaps truncated or still downloading ({e})"
        ) from None
    return tensors, metadata


def _read_pickle(path: Path) -> dict[str, torch.Tensor]:
    try:
        data = load_tensors_only(path)
    except TorchFileError as e:
        raise LoraFormatError(f"{e} (convert it to .safetensors)" if str(e).startswith("refused") else str(e)) from None
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise LoraFormatError("the file does not hold a flat dictionary of tensors, as LoRA files do")
    return {str(k): v for k, v in data.items()}


def _kind_of_other(keys: list[str]) -> str | None:
    for marker, kind in _OTHER_KINDS:
        if any(marker in key for key in keys):
            return kind
    return None


def parse_lora(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> LoraFile:
    """Group a LoRA state dict into layers; refuse other network kinds and malformed tensors with the reason."""
    metadata = metadata or {}
    if not tensors:
        raise LoraFormatError("the file holds no tensors")
    kind = _kind_of_other(list(tensors))
    if kind:
        raise LoraFormatError(f"this is {kind} file; only LoRA/LoCon files (lora_down/lora_up) are applied here")
    downs: dict[str, torch.Tensor] = {}
    ups: dict[str, torch.Tensor] = {}
    alphas: dict[str, torch.Tensor] = {}
    ignored: set[str] = set()
    unknown: list[str] = []
    for raw_key, tensor in tensors.items():
        key = raw_key
        for prefix in _PREFIXES:
            key = key.removeprefix(prefix)
        if key.startswith(_IGNORED):
            ignored.add("bundled embeddings")
            continue
        processor = _PROCESSOR.match(key)
        if processor:
            layer = f"{processor.group(1)}.{processor.group(2)}" + (".0" if processor.group(2) == "to_out" else "")
            (downs if processor.group(3) == "down" else ups)[layer] = tensor
            continue
        if key.endswith(".alpha"):
            alphas[key.removesuffix(".alpha")] = tensor
            continue
        for down_re, up_re in _DOWN_UP:
            if m := down_re.match(key):
                downs[m.group(1)] = tensor
                break
            if m := up_re.match(key):
                ups[m.group(1)] = tensor
                break
        else:
            unknown.append(raw_key)
    if unknown:
        raise LoraFormatError(
            f"{len(unknown)} tensor(s) are not LoRA weights (e.g. '{unknown[0]}'); expected names ending in "
            ".lora_down.weight/.lora_up.weight/.alpha (kohya) or .lora_A.weight/.lora_B.weight (PEFT)"
        )
    if not downs and not ups:
        raise LoraFormatError("the file holds no LoRA layers (no lora_down/lora_up or lora_A/lora_B tensors)")
    layers: dict[str, LoraLayer] = {}
    for name in sorted(set(downs) | set(ups)):
        if name not in downs or name not in ups:
            raise LoraFormatError(f"layer '{name}' has only one of its two halves (down and up); the file is damaged")
        layers[name] = _check_layer(name, downs[name], ups[name], alphas.get(name))
    return LoraFile(layers, metadata, sorted(ignored))


def _check_layer(name: str, down: torch.Tensor, up: torch.Tensor, alpha: torch.Tensor | None) -> LoraLayer:
    if down.ndim not in (2, 4) or up.ndim not in (2, 4) or down.shape[0] != up.shape[1] or down.shape[0] == 0:
        raise LoraFormatError(
            f"layer '{name}' has down {tuple(down.shape)} and up {tuple(up.shape)}, which are not the two halves of "
            "one low-rank update (down is [rank, in], up is [out, rank])"
        )
    if up.ndim == 4 and tuple(up.shape[2:]) != (1, 1):
        raise LoraFormatError(f"layer '{name}': an up weight with a {tuple(up.shape[2:])} kernel is not supported")
    if not (down.is_floating_point() and up.is_floating_point()):
        raise LoraFormatError(f"layer '{name}' does not hold floating-point weights")
    values_read = down.device.type != "meta"  # a header read (listing) has shapes, not values
    if values_read and not (torch.isfinite(down).all() and torch.isfinite(up).all()):
        raise LoraFormatError(f"layer '{name}' contains NaN or infinite values; the file is broken")
    value = None
    if alpha is not None:
        alpha = alpha.detach()
        if alpha.numel() != 1 or not math.isfinite(float(alpha.reshape(-1)[0])):
            raise LoraFormatError(f"layer '{name}' has an alpha that is not one finite number")
        value = float(alpha.reshape(-1)[0])
    return LoraLayer(down, up, value)


def kernel(weight_shape: tuple[int, ...]) -> tuple[int, ...]:
    """A weight's kernel size; a Linear layer's and a 1x1 convolution's count as the same."""
    k = tuple(weight_shape[2:])
    return () if k in ((), (1, 1)) else k


def _dims(out_features: int, in_features: int, k: tuple[int, ...]) -> str:
    return "x".join(map(str, (out_features, in_features, *k)))


def check_fits(layer: LoraLayer, target: Target) -> str | None:
    """Why `layer` cannot change `target`, or None when its shapes fit."""
    want = target.shape
    have = (layer.up.shape[0], layer.down.shape[1], kernel(tuple(layer.down.shape)))
    if have != (want[0], want[1], kernel(want)):
        return (
            f"layer {target.component}.{target.path} is {_dims(want[0], want[1], kernel(want))}, "
            f"the file's update for it is {_dims(*have)}"
        )
    return None


def guess_base(lora: LoraFile) -> str | None:
    """What model the file was made for, from its metadata or its layer names (for messages)."""
    base = lora.metadata.get("ss_base_model_version") or lora.metadata.get("modelspec.architecture")
    if base:
        return base
    names = list(lora.layers)
    if any(n.startswith(("lora_te2_", "text_encoder_2.")) for n in names):
        return "SDXL"
    return None


def bind(lora: LoraFile, table: dict[str, Target], model_label: str) -> list[BoundLayer]:
    """Match every layer of the file to the model; raises LoraFormatError (the reason) when any does not fit,
    so a LoRA for another architecture is never half-applied."""
    missing = [name for name in lora.layers if name not in table]
    if missing:
        base = guess_base(lora)
        made_for = f"; it was made for {base}" if base else "; it was probably made for another kind of model"
        raise LoraFormatError(
            f"{len(missing)} of its {len(lora.layers)} layers do not exist in the loaded model ({model_label}), "
            f"e.g. '{missing[0]}'{made_for}"
        )
    bound = []
    for name, layer in lora.layers.items():
        target = table[name]
        reason = check_fits(layer, target)
        if reason:
            base = guess_base(lora)
            raise LoraFormatError(
                f"it does not fit the loaded model ({model_label}): {reason}"
                + (f"; it was made for {base}" if base else "")
            )
        bound.append(BoundLayer(target, layer))
    return bound


def lora_hash(path: Path, metadata: dict[str, str]) -> str:
    """A1111's LoRA hash: kohya's `sshs_model_hash` if the file carries it, else the sha256 of the tensor data
    after the safetensors header (the "addnet" hash), or of the whole file for other formats."""
    if metadata.get("sshs_model_hash"):
        return metadata["sshs_model_hash"]
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        if path.suffix.lower() == ".safetensors":
            header = int.from_bytes(f.read(8), "little")
            f.seek(8 + header)
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()
