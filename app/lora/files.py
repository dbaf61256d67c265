"""Reading LoRA files: kohya/A1111 `.safetensors` (and `.pt`/`.ckpt` through weights-only loading), diffusers/PEFT
files and every LyCORIS kind A1111 applies (LoCon, LoHa, LoKr, (IA)³, OFT, GLoRA, full difference, norm; DoRA on
the low-rank ones), into one list of per-layer updates (what each kind's update is: layers.py), bound to the
loaded model's layers; files and layers we cannot apply get a reason, not a crash.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from app.embeddings.formats import EmbeddingData, EmbeddingFileError, embedding_from_dict
from app.lora.layers import (
    DECOMPOSABLE,
    LOHA_TENSORS,
    LOKR_TENSORS,
    DoraLayer,
    FullLayer,
    GloraLayer,
    Ia3Layer,
    LohaLayer,
    LokrLayer,
    LoraFormatError,
    LoraLayer,
    NetworkLayer,
    NormLayer,
    OftLayer,
    TuckerLoraLayer,
    kernel,
    low_rank_shape,
)
from app.lora.names import Target
from app.safe_load import TorchFileError, load_tensors_only

__all__ = [  # what other modules import from here; the layer kinds live in layers.py
    "LOHA_TENSORS",
    "LOKR_TENSORS",
    "BoundLayer",
    "DoraLayer",
    "LohaLayer",
    "LokrLayer",
    "LoraFile",
    "LoraFormatError",
    "LoraLayer",
    "NetworkLayer",
    "bind",
    "check_fits",
    "kernel",
    "parse_lora",
    "read_lora_file",
    "read_lora_header",
    "read_lora_tensors",
]

SUFFIXES = (".safetensors", ".pt", ".ckpt")


# kohya's and LyCORIS's per-layer tensor names beside lora_down/lora_up (`<layer>.<part>`)
_OTHER_PARTS = (  # (IA)³'s `weight` is found by its `on_input` beside it (parse_lora)
    "on_input",
    "oft_blocks",
    "oft_diag",
    "rescale",
    "a1.weight",
    "a2.weight",
    "b1.weight",
    "b2.weight",
    "bm.weight",
    "diff",
    "diff_b",
    "w_norm",
    "b_norm",
)
_PARTS = ("dora_scale", "lora_mid.weight", *LOHA_TENSORS, *LOKR_TENSORS, *_OTHER_PARTS)
_PART = re.compile(r"^(.*)\.(" + "|".join(re.escape(part) for part in _PARTS) + r")$")
_DOWN_UP = [
    (re.compile(r"^(.*)\.lora_down\.weight$"), re.compile(r"^(.*)\.lora_up\.weight$")),  # kohya
    (re.compile(r"^(.*)\.lora_A(?:\.[\w-]+)?\.weight$"), re.compile(r"^(.*)\.lora_B(?:\.[\w-]+)?\.weight$")),  # PEFT
    (re.compile(r"^(.*)\.lora\.down\.weight$"), re.compile(r"^(.*)\.lora\.up\.weight$")),  # older diffusers
]
# diffusers' attention-processor LoRAs (2023): `<attn>.processor.to_q_lora.down.weight` is the layer `<attn>.to_q`
_PROCESSOR = re.compile(r"^(.*)\.processor\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")
_PREFIXES = ("base_model.model.",)
# kohya's OFT names its UNet layers `oft_unet_<path>`, otherwise as its LoRAs (A1111 reads them as `lora_unet_`)
_RENAMED = {"oft_unet_": "lora_unet_"}
BUNDLE_PREFIX = "bundle_emb."  # embeddings bundled in a LoRA file (A1111): `bundle_emb.<name>.<tensor>`


@dataclass
class LoraFile:
    layers: dict[str, NetworkLayer]  # layer name as written in the file (minus the weight suffix) -> update
    metadata: dict[str, str] = field(default_factory=dict)
    # embeddings bundled in the file (A1111's `bundle_emb.<name>.*`, as OneTrainer and pivotal-tuning tools write
    # them), each as the dict an embedding file would hold: usable in the prompt while the LoRA is applied
    bundles: dict[str, dict] = field(default_factory=dict)


def bundled_embeddings(lora: LoraFile) -> dict[str, EmbeddingData | str]:
    """Each bundled embedding of a file read with its weights, or the reason it cannot be used."""
    found: dict[str, EmbeddingData | str] = {}
    for name, data in lora.bundles.items():
        try:
            found[name] = embedding_from_dict(data, name)
        except EmbeddingFileError as e:
            found[name] = str(e)
    return found


@dataclass(frozen=True)
class BoundLayer:
    """A layer of the file matched to the model layer it changes."""

    target: Target
    layer: NetworkLayer


def read_lora_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The file's tensors by name and its metadata, read safely (no code runs from a pickle), unparsed."""
    if path.stat().st_size == 0:
        raise LoraFormatError("the file is empty (0 bytes)")
    if path.suffix.lower() == ".safetensors":
        return _read_safetensors(path)
    return _read_pickle(path), {}


def read_lora_file(path: Path) -> LoraFile:
    """Parse `path`; raises LoraFormatError with a reason a person understands."""
    return parse_lora(*read_lora_tensors(path))


_READ_IN_HEADERS = (".alpha", ".on_input")  # single numbers that say how a layer applies: read even for a listing
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
    checks that need no values (kind, names, halves, shapes, dtype; alphas and (IA)³'s `on_input` are read, they
    are single numbers).
    NaN values are found when the file is used (`read_lora_file`). `.pt` files have no header: they are loaded,
    and only their shapes are kept."""
    if path.stat().st_size == 0:
        raise LoraFormatError("the file is empty (0 bytes)")
    if path.suffix.lower() != ".safetensors":
        tensors = {
            k: v if k.endswith(_READ_IN_HEADERS) else torch.empty(v.shape, dtype=v.dtype, device="meta")
            for k, v in _read_pickle(path).items()
        }
        return parse_lora(tensors, {})
    try:
        with safe_open(str(path), "pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {}
            for key in f.keys():  # noqa: SIM118 - safe_open has no iterator
                if key.endswith(_READ_IN_HEADERS):
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


def parse_lora(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> LoraFile:
    """Group a state dict into layers of the kinds in layers.py; refuse malformed tensors with the reason."""
    metadata = metadata or {}
    if not tensors:
        raise LoraFormatError("the file holds no tensors")
    keys = {raw_key: _renamed(raw_key) for raw_key in tensors}  # each key as our names have it, once
    ia3_layers = {key.removesuffix(".on_input") for key in keys.values() if key.endswith(".on_input")}
    parts: dict[str, dict[str, torch.Tensor]] = {}
    bundles: dict[str, dict] = {}
    unknown: list[str] = []
    for raw_key, tensor in tensors.items():
        key = keys[raw_key]
        if key.startswith(BUNDLE_PREFIX):
            _add_bundled(bundles, key.removeprefix(BUNDLE_PREFIX), tensor)
            continue
        processor = _PROCESSOR.match(key)
        if processor:
            layer = f"{processor.group(1)}.{processor.group(2)}" + (".0" if processor.group(2) == "to_out" else "")
            parts.setdefault(layer, {})[processor.group(3)] = tensor
            continue
        if key.endswith(".alpha"):
            parts.setdefault(key.removesuffix(".alpha"), {})["alpha"] = tensor
            continue
        if key.endswith(".weight") and key.removesuffix(".weight") in ia3_layers:
            parts.setdefault(key.removesuffix(".weight"), {})["weight"] = tensor
            continue
        if m := _PART.match(key):
            parts.setdefault(m.group(1), {})[m.group(2).removesuffix(".weight")] = tensor
            continue
        for down_re, up_re in _DOWN_UP:
            if m := down_re.match(key):
                parts.setdefault(m.group(1), {})["down"] = tensor
                break
            if m := up_re.match(key):
                parts.setdefault(m.group(1), {})["up"] = tensor
                break
        else:
            unknown.append(raw_key)
    if unknown:
        raise LoraFormatError(
            f"{len(unknown)} tensor(s) are not LoRA weights (e.g. '{unknown[0]}'); expected names ending in "
            ".lora_down.weight/.lora_up.weight/.alpha (kohya), .lora_A.weight/.lora_B.weight (PEFT) or LyCORIS's "
            "(.hada_*, .lokr_*, .oft_blocks, .a1.weight, .diff, .w_norm, ...)"
        )
    layers = {
        name: _make_layer(name, {k: v for k, v in found.items() if k != "alpha"}, found.get("alpha"))
        for name, found in sorted(parts.items())
        if set(found) != {"alpha"}  # an alpha without its layer changes nothing
    }
    if not layers and not bundles:
        raise LoraFormatError("the file holds no LoRA layers (no lora_down/lora_up or lora_A/lora_B tensors)")
    return LoraFile(layers, metadata, bundles)


def _renamed(key: str) -> str:
    for prefix in _PREFIXES:
        key = key.removeprefix(prefix)
    for old, new in _RENAMED.items():
        if key.startswith(old):
            return new + key.removeprefix(old)
    return key


def _add_bundled(bundles: dict[str, dict], rest: str, tensor: torch.Tensor) -> None:
    """`<name>.string_to_param.<token>` (SD 1.x/2.x, A1111's .pt layout), `<name>.clip_l` / `<name>.clip_g` (SDXL)
    or `<name>.emb_params`: put into the dict an embedding file of that layout holds, as A1111 reads them."""
    name, _, tensor_name = rest.partition(".")
    data = bundles.setdefault(name, {})
    group, _, token = tensor_name.partition(".")
    if group == "string_to_param" and token:
        data["string_to_param"] = {token: tensor}
    else:
        data[tensor_name] = tensor


def _make_layer(name: str, found: dict[str, torch.Tensor], alpha: torch.Tensor | None) -> NetworkLayer:
    """The layer of kind the tensor names say, its shapes, dtypes and (when read) values checked; with a
    `dora_scale`, that layer weight-decomposed."""
    if "dora_scale" not in found:
        return _make_plain_layer(name, found, alpha)
    found = dict(found)
    scale = found.pop("dora_scale")
    inner = _make_plain_layer(name, found, alpha)
    if not isinstance(inner, DECOMPOSABLE):
        raise LoraFormatError(f"layer '{name}' is {inner.kind} with a DoRA magnitude, which no tool writes")
    layer = DoraLayer(inner, scale)
    shape = inner.update_shape
    # per column: the update may be a convolution's flattened to [out, in * kh * kw] (bind checks `in` itself)
    want = shape[0] if layer.per_output else shape[1]
    fits = scale.numel() == want if layer.per_output or len(shape) == 4 else want % max(1, scale.numel()) == 0
    if not fits or scale.ndim == 0 or (scale.ndim > 1 and math.prod(scale.shape) != max(scale.shape)):
        axis = "out" if layer.per_output else "in"
        raise LoraFormatError(
            f"layer '{name}' has a DoRA magnitude of shape {tuple(scale.shape)}; its update {tuple(shape)} needs "
            f"{want} values ([{axis}, 1, ...])"
        )
    return _checked(name, layer)


def _make_plain_layer(name: str, found: dict[str, torch.Tensor], alpha: torch.Tensor | None) -> NetworkLayer:
    names = set(found)
    alpha_value = _alpha_value(name, alpha)
    if names <= {"down", "up", "lora_mid"}:
        if "down" not in names or "up" not in names:
            raise LoraFormatError(f"layer '{name}' has only one of its two halves (down and up); the file is damaged")
        layer = _check_layer(name, found["down"], found["up"], alpha_value)
        if "lora_mid" not in names:
            return layer
        mid = found["lora_mid"]
        if mid.ndim != 4 or tuple(mid.shape[:2]) != (layer.rank, layer.rank) or kernel(tuple(layer.down.shape)):
            raise LoraFormatError(
                f"layer '{name}' has a Tucker core {tuple(mid.shape)} that does not fit its down "
                f"{tuple(layer.down.shape)} and up {tuple(layer.up.shape)} ([rank, rank, kh, kw], 1x1 halves)"
            )
        return _checked(name, TuckerLoraLayer(layer.down, layer.up, mid, alpha_value))
    if all(n.startswith("hada_") for n in names):
        missing = [n for n in LOHA_TENSORS[:4] if n not in names]  # the Tucker cores are optional
        if missing:
            raise LoraFormatError(f"layer '{name}' is a LoHa without {', '.join(missing)}; the file is damaged")
        loha = LohaLayer(*(found.get(n) for n in LOHA_TENSORS), alpha_value)
        first = low_rank_shape(name, loha.w1_a, loha.w1_b, loha.t1)
        second = low_rank_shape(name, loha.w2_a, loha.w2_b, loha.t2)
        if first[0] != second[0] or math.prod(first) != math.prod(second):
            raise LoraFormatError(f"layer '{name}': the two halves of this LoHa are {first} and {second}, not alike")
        return _checked(name, loha)
    if all(n.startswith("lokr_") for n in names):
        has_1 = "lokr_w1" in names or {"lokr_w1_a", "lokr_w1_b"} <= names
        has_2 = "lokr_w2" in names or {"lokr_w2_a", "lokr_w2_b"} <= names
        if not (has_1 and has_2):
            raise LoraFormatError(
                f"layer '{name}' is a LoKr without both of its halves (w1 and w2); the file is damaged"
            )
        lokr = LokrLayer(
            found.get("lokr_w1"),
            None if "lokr_w1" in names else found["lokr_w1_a"],
            None if "lokr_w1" in names else found["lokr_w1_b"],
            found.get("lokr_w2"),
            None if "lokr_w2" in names else found["lokr_w2_a"],
            None if "lokr_w2" in names else found["lokr_w2_b"],
            None if "lokr_w2" in names else found.get("lokr_t2"),
            alpha_value,
        )
        first, second = lokr.half_shapes(name)
        if len(first) != 2 or len(second) not in (2, 4):
            raise LoraFormatError(f"layer '{name}': a LoKr's halves are {first} and {second}; expected 2-D (w2 4-D)")
        return _checked(name, lokr)
    for required, allowed, make in _OTHER_KINDS:
        if names <= allowed:
            missing = sorted(required - names)
            if missing:
                raise LoraFormatError(f"layer '{name}' lacks {', '.join(missing)}; the file is damaged")
            return _checked(name, make(name, found, alpha_value))
    raise LoraFormatError(f"layer '{name}' mixes tensors of different kinds ({', '.join(sorted(names))})")


def _ia3(name: str, found: dict[str, torch.Tensor], alpha: float | None) -> Ia3Layer:
    on_input = found["on_input"]
    if on_input.numel() != 1:
        raise LoraFormatError(f"layer '{name}': an (IA)³ `on_input` must be one number, not {tuple(on_input.shape)}")
    weight = found["weight"]
    if weight.numel() != max(weight.shape, default=1):
        raise LoraFormatError(f"layer '{name}': (IA)³ scales must be one row of values, not {tuple(weight.shape)}")
    return Ia3Layer(weight, bool(on_input.reshape(-1)[0] != 0), alpha)


def _oft(name: str, found: dict[str, torch.Tensor], alpha: float | None) -> OftLayer:
    if "oft_blocks" in found and "oft_diag" in found:
        raise LoraFormatError(f"layer '{name}' holds both oft_blocks and oft_diag; the file is damaged")
    blocks = found.get("oft_blocks", found.get("oft_diag"))
    if blocks is None:
        raise LoraFormatError(f"layer '{name}' has an OFT rescale without its oft_blocks; the file is damaged")
    if blocks.ndim == 4:
        raise LoraFormatError(
            f"layer '{name}' is a BOFT (butterfly OFT) layer, which is not applied here (nor in A1111)"
        )
    if blocks.ndim != 3 or blocks.shape[1] != blocks.shape[2]:
        raise LoraFormatError(f"layer '{name}': OFT blocks must be [blocks, size, size], not {tuple(blocks.shape)}")
    rescale = found.get("rescale")
    out = blocks.shape[0] * blocks.shape[1]
    if rescale is not None and (rescale.numel() != out or rescale.shape[0] != out):
        raise LoraFormatError(
            f"layer '{name}': an OFT rescale of shape {tuple(rescale.shape)} does not fit its {out} output rows"
        )
    return OftLayer(blocks, "oft_blocks" in found, rescale, alpha)


def _glora(name: str, found: dict[str, torch.Tensor], alpha: float | None) -> GloraLayer:
    """LyCORIS 2+ (a1 [in, r], a2 [r, in], b1 [out, r], b2 [r, in, ...]) or LyCORIS 1 (the names of each pair
    swapped), whichever the shapes chain as; where both do (a square weight), the one whose rank is the smaller."""
    mid = found.get("bm")

    def chains(a_in, a_out, b_up, b_down) -> bool:
        if any(t.ndim not in (2, 4) or (t.ndim == 4 and kernel(tuple(t.shape))) for t in (a_in, a_out, b_up)):
            return False
        if b_down.ndim not in (2, 4) or (mid is not None and kernel(tuple(b_down.shape))):
            return False
        (i, r), (r2, i2), (_, rb), rb2 = a_in.shape[:2], a_out.shape[:2], b_up.shape[:2], b_down.shape[0]
        core = mid is None or (mid.ndim == 4 and tuple(mid.shape[:2]) == (rb, rb2))
        return r == r2 and i == i2 == b_down.shape[1] and rb == rb2 and core

    a1, a2, b1, b2 = found["a1"], found["a2"], found["b1"], found["b2"]
    new, old = chains(a1, a2, b1, b2), chains(a2, a1, b2, b1) and mid is None
    if new and (not old or a1.shape[1] <= a1.shape[0]):
        return GloraLayer(a1, a2, b1, b2, mid, alpha)
    if old:
        return GloraLayer(a2, a1, b2, b1, None, alpha, old_names=True)
    shapes = ", ".join(f"{n} {tuple(t.shape)}" for n, t in sorted(found.items()))
    raise LoraFormatError(
        f"layer '{name}' has GLoRA factors that do not chain ({shapes}): expected a1 [in, rank], a2 [rank, in], "
        "b1 [out, rank], b2 [rank, in, ...]"
    )


def _full(name: str, found: dict[str, torch.Tensor], alpha: float | None) -> FullLayer:
    diff, bias = found["diff"], found.get("diff_b")
    if diff.ndim not in (1, 2, 4) or (bias is not None and (bias.ndim != 1 or bias.shape[0] != diff.shape[0])):
        shown = f" and diff_b {tuple(bias.shape)}" if bias is not None else ""
        raise LoraFormatError(
            f"layer '{name}' has a full difference {tuple(diff.shape)}{shown}, not a layer's weight and bias"
        )
    return FullLayer(diff, bias, alpha)


def _norm(name: str, found: dict[str, torch.Tensor], alpha: float | None) -> NormLayer:
    weight, bias = found["w_norm"], found.get("b_norm")
    if weight.ndim != 1 or (bias is not None and tuple(bias.shape) != tuple(weight.shape)):
        shown = f" and b_norm {tuple(bias.shape)}" if bias is not None else ""
        raise LoraFormatError(
            f"layer '{name}' has w_norm {tuple(weight.shape)}{shown}; a norm layer's are one row of values each"
        )
    return NormLayer(weight, bias, alpha)


# LyCORIS's other kinds: the tensor names that make one (all needed), the names it may hold, and its reader
_OTHER_KINDS = [
    ({"weight", "on_input"}, {"weight", "on_input"}, _ia3),
    (set(), {"oft_blocks", "oft_diag", "rescale"}, _oft),  # oft_blocks or oft_diag: _oft checks
    ({"a1", "a2", "b1", "b2"}, {"a1", "a2", "b1", "b2", "bm"}, _glora),
    ({"diff"}, {"diff", "diff_b"}, _full),
    ({"w_norm"}, {"w_norm", "b_norm"}, _norm),
]


def _alpha_value(name: str, alpha: torch.Tensor | None) -> float | None:
    if alpha is None:
        return None
    alpha = alpha.detach()
    if alpha.numel() != 1 or not math.isfinite(float(alpha.reshape(-1)[0])):
        raise LoraFormatError(f"layer '{name}' has an alpha that is not one finite number")
    return float(alpha.reshape(-1)[0])


def _checked(name: str, layer: NetworkLayer) -> NetworkLayer:
    """`layer`, once its tensors are floating point and (when read: a header read has shapes only) finite."""
    tensors = list(layer.named_tensors().values())
    if any(t.numel() == 0 for t in tensors):
        raise LoraFormatError(f"layer '{name}' holds an empty tensor (a dimension of 0); the file is damaged")
    if not all(t.is_floating_point() for t in tensors):
        raise LoraFormatError(f"layer '{name}' does not hold floating-point weights")
    if tensors[0].device.type != "meta" and not all(bool(torch.isfinite(t).all()) for t in tensors):
        raise LoraFormatError(f"layer '{name}' contains NaN or infinite values; the file is broken")
    return layer


def _check_layer(name: str, down: torch.Tensor, up: torch.Tensor, alpha: float | None) -> LoraLayer:
    if down.ndim not in (2, 4) or up.ndim not in (2, 4) or down.shape[0] != up.shape[1] or down.shape[0] == 0:
        raise LoraFormatError(
            f"layer '{name}' has down {tuple(down.shape)} and up {tuple(up.shape)}, which are not the two halves of "
            "one low-rank update (down is [rank, in], up is [out, rank])"
        )
    if up.ndim == 4 and tuple(up.shape[2:]) != (1, 1):
        raise LoraFormatError(f"layer '{name}': an up weight with a {tuple(up.shape[2:])} kernel is not supported")
    return _checked(name, LoraLayer(down, up, alpha))


def _dims(shape: tuple[int | None, ...]) -> str:
    """A shape as people write it (a 1x1 kernel left out); `*` for an axis taken from the weight."""
    shown = shape if len(shape) < 2 else (shape[0], shape[1], *kernel(shape))
    return "x".join("*" if d is None else str(d) for d in shown)


def check_fits(layer: NetworkLayer, target: Target) -> str | None:
    """Why `layer` cannot change `target`, or None when its update has the weight's shape (and a bias change the
    bias's)."""
    want, have = tuple(target.shape), tuple(layer.update_shape)
    where = f"layer {target.component}.{target.path}"
    if len(want) < 2 or len(have) < 2:  # a norm layer's weight, or a full difference of one
        fits = have == want
    elif None in have:  # an update made from the weight itself ((IA)³, OFT): only the axes it names are fixed
        fits = all(h is None or h == w for h, w in zip(have, want, strict=False))
    elif len(have) == 2 and kernel(want):  # a LoHa or LoKr may give a convolution's update as [out, in * kh * kw]
        fits = have == (want[0], math.prod(want[1:]))
    else:
        fits = (have[0], have[1], kernel(have)) == (want[0], want[1], kernel(want))
    if not fits:
        return f"{where} is {_dims(want)}, the file's update for it is {_dims(have)}"
    if isinstance(layer, DoraLayer) and layer.dora_scale.numel() != want[0 if layer.per_output else 1]:
        return f"{where} is {_dims(want)}, the file's DoRA magnitudes for it are {tuple(layer.dora_scale.shape)}"
    bias = layer.bias_shape
    own = getattr(target.module, "bias", None)
    if bias is not None and (own is None or tuple(own.shape) != bias):
        has = "no bias" if own is None else f"a bias of {_dims(tuple(own.shape))}"
        return f"{where} has {has}, the file's change of its bias is {_dims(bias)}"
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
