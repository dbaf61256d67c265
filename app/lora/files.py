"""Reading LoRA files: kohya/A1111 `.safetensors` (and `.pt`/`.ckpt` through weights-only loading), diffusers/PEFT
files and LyCORIS's LoHa, LoKr and Tucker LoCon, into one list of per-layer weight updates; files of kinds we do not
apply get a reason, not a crash.

Each layer kind turns its tensors into the update of one weight, as LyCORIS and A1111 define it:
- LoRA/LoCon: `up @ down`, times alpha/rank;
- LoCon with Tucker decomposition (`lora_mid`): the core `mid` contracted with `up` and `down`, times alpha/rank;
- LoHa: the Hadamard (element-wise) product of two low-rank products `(w1_a @ w1_b) * (w2_a @ w2_b)` (each may be a
  Tucker core `t` with its two factors), times alpha/rank (rank: the rows of `w1_b`);
- LoKr: the Kronecker product `w1 ⊗ w2`, each half a full matrix or a low-rank product (`w2` may be a Tucker core),
  times alpha/rank where a half is low-rank, else 1.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
from safetensors import SafetensorError, safe_open

from app.embeddings.formats import EmbeddingData, EmbeddingFileError, embedding_from_dict
from app.lora.names import Target
from app.safe_load import TorchFileError, load_tensors_only

SUFFIXES = (".safetensors", ".pt", ".ckpt")


class LoraFormatError(ValueError):
    """A file that cannot be used as a LoRA; the message says why, in words."""


# Markers of kinds of "network" files that share the folder and the tag but are not applied here.
_OTHER_KINDS = [
    ("on_input", "an (IA)³"),
    ("oft_", "an OFT/BOFT"),
    (".a1.weight", "a GLoRA"),
    (".diff", "a LyCORIS full-difference"),
    (".w_norm", "a LyCORIS norm"),
]
# LyCORIS's tensor names (`<layer>.<name>`), in the order of the layer classes' fields; PEFT's LoHa and LoKr layers
# use the same names (lora_target.py)
LOHA_TENSORS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
LOKR_TENSORS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
# kohya's and LyCORIS's per-layer tensor names beside lora_down/lora_up (`<layer>.<part>`)
_PARTS = ("dora_scale", "lora_mid.weight", *LOHA_TENSORS, *LOKR_TENSORS)
_PART = re.compile(r"^(.*)\.(" + "|".join(re.escape(part) for part in _PARTS) + r")$")
_DOWN_UP = [
    (re.compile(r"^(.*)\.lora_down\.weight$"), re.compile(r"^(.*)\.lora_up\.weight$")),  # kohya
    (re.compile(r"^(.*)\.lora_A(?:\.[\w-]+)?\.weight$"), re.compile(r"^(.*)\.lora_B(?:\.[\w-]+)?\.weight$")),  # PEFT
    (re.compile(r"^(.*)\.lora\.down\.weight$"), re.compile(r"^(.*)\.lora\.up\.weight$")),  # older diffusers
]
# diffusers' attention-processor LoRAs (2023): `<attn>.processor.to_q_lora.down.weight` is the layer `<attn>.to_q`
_PROCESSOR = re.compile(r"^(.*)\.processor\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")
_PREFIXES = ("base_model.model.",)
BUNDLE_PREFIX = "bundle_emb."  # embeddings bundled in a LoRA file (A1111): `bundle_emb.<name>.<tensor>`


def _scale(alpha: float | None, rank: int | None) -> float:
    """alpha / rank; without an alpha (PEFT, old diffusers) or a rank (a LoKr of two full matrices), 1."""
    return 1.0 if alpha is None or rank is None else alpha / rank


def _rows(t: torch.Tensor) -> torch.Tensor:
    """[out, everything else]: a weight or update as a matrix (einsum and kron results may not be contiguous)."""
    return t.reshape(t.shape[0], -1)


def _low_rank(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """`a @ b` ([out, r] @ [r, in...], flattened to [out, in * kernel]); with a Tucker core `t` [r, r, kh, kw] the
    factors are [r, out] and [r, in] and the result is [out, in, kh, kw]: sum over i, j of t[i, j] a[i, o] b[j, n]."""
    a, b = _rows(a.to(device, torch.float32)), _rows(b.to(device, torch.float32))
    if t is None:
        return a @ b
    return torch.einsum("ijhw,jn,io->onhw", t.to(device, torch.float32), b, a)


def _low_rank_shape(name: str, a: torch.Tensor, b: torch.Tensor, t: torch.Tensor | None) -> tuple[int, ...]:
    """The shape `_low_rank` gives, or a LoraFormatError when the factors do not chain."""
    if t is None:
        if a.ndim != 2 or b.ndim not in (2, 4) or a.shape[1] != b.shape[0] or a.shape[1] == 0:
            raise LoraFormatError(
                f"layer '{name}' has factors {tuple(a.shape)} and {tuple(b.shape)}, which do not multiply "
                "([out, rank] and [rank, in])"
            )
        return (a.shape[0], *b.shape[1:])
    if a.ndim != 2 or b.ndim != 2 or t.ndim != 4 or tuple(t.shape[:2]) != (a.shape[0], b.shape[0]):
        raise LoraFormatError(
            f"layer '{name}' has a Tucker core {tuple(t.shape)} that does not fit its factors {tuple(a.shape)} and "
            f"{tuple(b.shape)} ([rank, rank, kh, kw], [rank, out], [rank, in])"
        )
    return (a.shape[1], b.shape[1], *t.shape[2:])


@dataclass
class LoraLayer:
    """One low-rank update: `delta W = (alpha / rank) * up @ down` (reshaped for convolutions). The kind training
    writes and continues."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float | None = None
    kind: ClassVar[str] = "LoRA"

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return _scale(self.alpha, self.rank)

    @property
    def update_shape(self) -> tuple[int, ...]:
        """The shape of the update: [out, in] or [out, in, kh, kw]."""
        return (self.up.shape[0], *self.down.shape[1:])

    def named_tensors(self) -> dict[str, torch.Tensor]:
        """The layer's tensors under the names the file gives them."""
        return {"lora_down.weight": self.down, "lora_up.weight": self.up}

    def delta(self, device: torch.device, weight: torch.Tensor | None = None) -> torch.Tensor:
        """The scaled update in fp32 on `device`, [out, in * kernel] (the caller reshapes it to the weight; `weight`,
        the layer's own, only matters to DoRA)."""
        return self.scale * _low_rank(self.up, self.down, None, device)


@dataclass
class TuckerLoraLayer:
    """LyCORIS's LoCon with a Tucker core for a convolution (`lora_mid`): down [r, in, 1, 1], mid [r, r, kh, kw],
    up [out, r, 1, 1]."""

    down: torch.Tensor
    up: torch.Tensor
    mid: torch.Tensor
    alpha: float | None = None
    kind: ClassVar[str] = "LoCon (Tucker)"

    @property
    def scale(self) -> float:
        return _scale(self.alpha, self.down.shape[0])

    @property
    def update_shape(self) -> tuple[int, ...]:
        return (self.up.shape[0], self.down.shape[1], *self.mid.shape[2:])

    def named_tensors(self) -> dict[str, torch.Tensor]:
        return {"lora_down.weight": self.down, "lora_up.weight": self.up, "lora_mid.weight": self.mid}

    def delta(self, device: torch.device, weight: torch.Tensor | None = None) -> torch.Tensor:
        up, down = _rows(self.up).T, _rows(self.down)  # [r, out] and [r, in]: the core's factor order
        return self.scale * _rows(_low_rank(up, down, self.mid, device))


@dataclass
class LohaLayer:
    """LyCORIS's LoHa: `(w1_a @ w1_b) * (w2_a @ w2_b)` element-wise, each half optionally with a Tucker core."""

    w1_a: torch.Tensor
    w1_b: torch.Tensor
    w2_a: torch.Tensor
    w2_b: torch.Tensor
    t1: torch.Tensor | None = None
    t2: torch.Tensor | None = None
    alpha: float | None = None
    kind: ClassVar[str] = "LoHa"

    @property
    def scale(self) -> float:
        return _scale(self.alpha, self.w1_b.shape[0])

    @property
    def update_shape(self) -> tuple[int, ...]:
        return _low_rank_shape("", self.w1_a, self.w1_b, self.t1)

    def named_tensors(self) -> dict[str, torch.Tensor]:
        values = (self.w1_a, self.w1_b, self.w2_a, self.w2_b, self.t1, self.t2)
        return {n: t for n, t in zip(LOHA_TENSORS, values, strict=True) if t is not None}

    def delta(self, device: torch.device, weight: torch.Tensor | None = None) -> torch.Tensor:
        first = _rows(_low_rank(self.w1_a, self.w1_b, self.t1, device))
        second = _rows(_low_rank(self.w2_a, self.w2_b, self.t2, device))
        return self.scale * first * second


@dataclass
class LokrLayer:
    """LyCORIS's LoKr: `w1 ⊗ w2` (Kronecker), each half a full matrix or a low-rank product (`w2` also with a
    Tucker core for a convolution)."""

    w1: torch.Tensor | None
    w1_a: torch.Tensor | None
    w1_b: torch.Tensor | None
    w2: torch.Tensor | None
    w2_a: torch.Tensor | None
    w2_b: torch.Tensor | None
    t2: torch.Tensor | None = None
    alpha: float | None = None
    kind: ClassVar[str] = "LoKr"

    @property
    def scale(self) -> float:
        # the rank of the low-rank half (w2's when both are), as A1111 and LyCORIS read it; two full halves: 1
        rank = self.w2_b.shape[0] if self.w2_b is not None else self.w1_b.shape[0] if self.w1_b is not None else None
        return _scale(self.alpha, rank)

    def half_shapes(self, name: str = "") -> tuple[tuple[int, ...], tuple[int, ...]]:
        first = tuple(self.w1.shape) if self.w1 is not None else _low_rank_shape(name, self.w1_a, self.w1_b, None)
        second = tuple(self.w2.shape) if self.w2 is not None else _low_rank_shape(name, self.w2_a, self.w2_b, self.t2)
        return first, second

    @property
    def update_shape(self) -> tuple[int, ...]:
        (o1, i1), second = self.half_shapes()
        return (o1 * second[0], i1 * second[1], *second[2:])

    def named_tensors(self) -> dict[str, torch.Tensor]:
        values = (self.w1, self.w1_a, self.w1_b, self.w2, self.w2_a, self.w2_b, self.t2)
        return {n: t for n, t in zip(LOKR_TENSORS, values, strict=True) if t is not None}

    def delta(self, device: torch.device, weight: torch.Tensor | None = None) -> torch.Tensor:
        if self.w1 is not None:
            first = self.w1.to(device, torch.float32)
        else:
            first = _low_rank(self.w1_a, self.w1_b, None, device)
        if self.w2 is not None:
            second = self.w2.to(device, torch.float32)
        else:
            second = _low_rank(self.w2_a, self.w2_b, self.t2, device)
            if self.t2 is None and self.w2_b.ndim == 4:
                second = second.reshape(second.shape[0], *self.w2_b.shape[1:])
        if second.ndim == 4:
            first = first[:, :, None, None]
        return self.scale * _rows(torch.kron(first.contiguous(), second.contiguous()))


@dataclass
class DoraLayer:
    """A weight-decomposed update (DoRA; LyCORIS's `dora_wd`, "DoHa"/"DoKr" on a LoHa/LoKr): the inner layer's
    update is added to the weight, then each row of the sum (`dora_scale` [out, 1, ...], LyCORIS's and PEFT's
    default) or each column (`dora_scale` [1, in, ...], the DoRA paper's and A1111's) is rescaled to the magnitude
    stored for it. The update is that result minus the weight, so a multiplier m gives W + m * (decomposed - W), as
    A1111 and ComfyUI apply it."""

    inner: LoraLayer | TuckerLoraLayer | LohaLayer | LokrLayer
    dora_scale: torch.Tensor

    @property
    def kind(self) -> str:
        return f"{self.inner.kind} + DoRA"

    @property
    def alpha(self) -> float | None:
        return self.inner.alpha

    @property
    def per_output(self) -> bool:
        """Rows (the first axis holds the magnitudes) or columns; a 1-D scale is per output, as PEFT stores it."""
        return self.dora_scale.ndim <= 1 or self.dora_scale.shape[0] != 1

    @property
    def update_shape(self) -> tuple[int, ...]:
        return self.inner.update_shape

    def named_tensors(self) -> dict[str, torch.Tensor]:
        return {**self.inner.named_tensors(), "dora_scale": self.dora_scale}

    def delta(self, device: torch.device, weight: torch.Tensor | None = None) -> torch.Tensor:
        if weight is None:
            raise ValueError("a DoRA update depends on the weight it changes")
        w = weight.to(device, torch.float32)
        merged = w + self.inner.delta(device).reshape(w.shape)
        ones = [1] * (w.dim() - 1)
        if self.per_output:
            norm = _rows(merged).norm(dim=1).reshape(w.shape[0], *ones)
        else:
            norm = _rows(merged.transpose(0, 1)).norm(dim=1).reshape(w.shape[1], *ones).transpose(0, 1)
        magnitude = self.dora_scale.to(device, torch.float32).reshape(norm.shape)
        return _rows(merged * (magnitude / norm.clamp_min(torch.finfo(torch.float32).tiny)) - w)


NetworkLayer = LoraLayer | TuckerLoraLayer | LohaLayer | LokrLayer | DoraLayer


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
    """Group a state dict into layers (LoRA, LoCon, LoHa, LoKr); refuse other network kinds and malformed tensors
    with the reason."""
    metadata = metadata or {}
    if not tensors:
        raise LoraFormatError("the file holds no tensors")
    kind = _kind_of_other(list(tensors))
    if kind:
        raise LoraFormatError(f"this is {kind} file; LoRA, LoCon, LoHa and LoKr files are applied here")
    parts: dict[str, dict[str, torch.Tensor]] = {}
    bundles: dict[str, dict] = {}
    unknown: list[str] = []
    for raw_key, tensor in tensors.items():
        key = raw_key
        for prefix in _PREFIXES:
            key = key.removeprefix(prefix)
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
            ".hada_*/.lokr_*"
        )
    layers = {
        name: _make_layer(name, {k: v for k, v in found.items() if k != "alpha"}, found.get("alpha"))
        for name, found in sorted(parts.items())
        if set(found) != {"alpha"}  # an alpha without its layer changes nothing
    }
    if not layers and not bundles:
        raise LoraFormatError("the file holds no LoRA layers (no lora_down/lora_up or lora_A/lora_B tensors)")
    return LoraFile(layers, metadata, bundles)


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
        first = _low_rank_shape(name, loha.w1_a, loha.w1_b, loha.t1)
        second = _low_rank_shape(name, loha.w2_a, loha.w2_b, loha.t2)
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
    raise LoraFormatError(f"layer '{name}' mixes tensors of different kinds ({', '.join(sorted(names))})")


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


def kernel(weight_shape: tuple[int, ...]) -> tuple[int, ...]:
    """A weight's kernel size; a Linear layer's and a 1x1 convolution's count as the same."""
    k = tuple(weight_shape[2:])
    return () if k in ((), (1, 1)) else k


def _dims(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, (shape[0], shape[1], *kernel(shape))))


def check_fits(layer: NetworkLayer, target: Target) -> str | None:
    """Why `layer` cannot change `target`, or None when its update has the weight's shape."""
    want, have = tuple(target.shape), tuple(layer.update_shape)
    if len(have) == 2 and kernel(want):  # a LoHa or LoKr may give a convolution's update as [out, in * kh * kw]
        fits = have == (want[0], math.prod(want[1:]))
    else:
        fits = (have[0], have[1], kernel(have)) == (want[0], want[1], kernel(want))
    if not fits:
        return f"layer {target.component}.{target.path} is {_dims(want)}, the file's update for it is {_dims(have)}"
    if isinstance(layer, DoraLayer) and layer.dora_scale.numel() != want[0 if layer.per_output else 1]:
        return (
            f"layer {target.component}.{target.path} is {_dims(want)}, the file's DoRA magnitudes for it are "
            f"{tuple(layer.dora_scale.shape)}"
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
