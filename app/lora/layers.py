"""What each kind of layer in a LoRA/LyCORIS file does to the weight it changes: the update at multiplier 1, in
fp32, as LyCORIS (the writer) and A1111 (the reader users compare with) define it. The multiplier scales the whole
update (W + m * update), as A1111 and ComfyUI apply every kind.

- LoRA/LoCon: `up @ down`, times alpha/rank;
- LoCon with Tucker decomposition (`lora_mid`): the core `mid` contracted with `up` and `down`, times alpha/rank;
- LoHa: the Hadamard (element-wise) product of two low-rank products `(w1_a @ w1_b) * (w2_a @ w2_b)` (each may be a
  Tucker core `t` with its two factors), times alpha/rank (rank: the rows of `w1_b`);
- LoKr: the Kronecker product `w1 ⊗ w2`, each half a full matrix or a low-rank product (`w2` may be a Tucker core),
  times alpha/rank where a half is low-rank, else 1;
- DoRA (`dora_scale` beside any of those): the sum renormalised per row or column;
- (IA)³: the weight scaled per output row (per input column with `on_input`): `W * w`;
- OFT: each block of output rows turned by an orthogonal matrix, `R^T W - W` (kohya's and LyCORIS's `oft_blocks`
  through the Cayley transform with the norm constraint alpha * out; LyCORIS 2's `oft_diag` holds R itself);
- GLoRA: `W @ A_1 @ A_2 + B_1 @ B_2`, times alpha/rank;
- full difference (`diff`, `diff_b`): the change itself, weight and bias;
- norm (`w_norm`, `b_norm`): the change of a GroupNorm's or LayerNorm's weight and bias.

Kinds that depend on the weight they change ((IA)³, OFT, GLoRA, DoRA) get it in `delta`; their `update_shape` gives
None for the axes they take from the weight.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch


class LoraFormatError(ValueError):
    """A file that cannot be used as a LoRA; the message says why, in words."""


# LyCORIS's tensor names (`<layer>.<name>`), in the order of the layer classes' fields; PEFT's LoHa and LoKr layers
# use the same names (lora_target.py)
LOHA_TENSORS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
LOKR_TENSORS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")


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


def low_rank_shape(name: str, a: torch.Tensor, b: torch.Tensor, t: torch.Tensor | None) -> tuple[int, ...]:
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


class _WeightOnly:
    """Most kinds change a layer's weight only; full-difference and norm files also change its bias."""

    @property
    def bias_shape(self) -> tuple[int, ...] | None:
        return None

    def bias_delta(self, device: torch.device) -> torch.Tensor | None:
        return None


@dataclass
class LoraLayer(_WeightOnly):
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
class TuckerLoraLayer(_WeightOnly):
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
class LohaLayer(_WeightOnly):
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
        return low_rank_shape("", self.w1_a, self.w1_b, self.t1)

    def named_tensors(self) -> dict[str, torch.Tensor]:
        values = (self.w1_a, self.w1_b, self.w2_a, self.w2_b, self.t1, self.t2)
        return {n: t for n, t in zip(LOHA_TENSORS, values, strict=True) if t is not None}

    def delta(self, device: torch.device, weight: torch.Tensor | None = None) -> torch.Tensor:
        first = _rows(_low_rank(self.w1_a, self.w1_b, self.t1, device))
        second = _rows(_low_rank(self.w2_a, self.w2_b, self.t2, device))
        return self.scale * first * second


@dataclass
class LokrLayer(_WeightOnly):
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
        first = tuple(self.w1.shape) if self.w1 is not None else low_rank_shape(name, self.w1_a, self.w1_b, None)
        second = tuple(self.w2.shape) if self.w2 is not None else low_rank_shape(name, self.w2_a, self.w2_b, self.t2)
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


def _needs(weight: torch.Tensor | None, kind: str) -> torch.Tensor:
    if weight is None:
        raise ValueError(f"the {kind} update depends on the weight it changes")
    return weight


@dataclass
class DoraLayer(_WeightOnly):
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
        w = _needs(weight, "DoRA").to(device, torch.float32)
        merged = w + self.inner.delta(device).reshape(w.shape)
        ones = [1] * (w.dim() - 1)
        if self.per_output:
            norm = _rows(merged).norm(dim=1).reshape(w.shape[0], *ones)
        else:
            norm = _rows(merged.transpose(0, 1)).norm(dim=1).reshape(w.shape[1], *ones).transpose(0, 1)
        magnitude = self.dora_scale.to(device, torch.float32).reshape(norm.shape)
        return _rows(merged * (magnitude / norm.clamp_min(torch.finfo(torch.float32).tiny)) - w)


@dataclass
class Ia3Layer(_WeightOnly):
    """LyCORIS's (IA)³: one learned scale per output row, or per input column (`on_input`); the update is `W * w`.
    A convolution's scales are stored [1, n, 1, 1]; any layout of n values is read as those n scales."""

    weight: torch.Tensor
    on_input: bool
    alpha: float | None = None  # (IA)³ has no alpha; kept only to be listed like the other kinds
    kind: ClassVar[str] = "(IA)³"

    @property
    def update_shape(self) -> tuple[int | None, ...]:
        n = self.weight.numel()
        return (None, n) if self.on_input else (n, None)

    def named_tensors(self) -> dict[str, torch.Tensor]:
        return {"weight": self.weight}

    def delta(self, device: torch.device, weight: torch.Tensor | None = None) -> torch.Tensor:
        w = _needs(weight, self.kind).to(device, torch.float32)
        scales = self.weight.to(device, torch.float32).reshape(-1)
        ones = [1] * (w.dim() - 2)
        scales = scales.reshape(1, -1, *ones) if self.on_input else scales.reshape(-1, 1, *ones)
        return _rows(w * scales)


@dataclass
class OftLayer(_WeightOnly):
    """Orthogonal fine-tuning: the output rows in `blocks.shape[0]` blocks, each block turned by an orthogonal
    matrix R (W' = R^T W per block). kohya's and LyCORIS's `oft_blocks` hold a matrix whose skew-symmetric part Q,
    its norm limited to alpha * out (when alpha > 0), gives R = (I + Q)(I - Q)^-1 (Cayley); LyCORIS 2's `oft_diag`
    holds R itself, as A1111 reads it. LyCORIS's optional `rescale` [out, 1, ...] scales the turned rows."""

    blocks: torch.Tensor  # [blocks, size, size]
    cayley: bool
    rescale: torch.Tensor | None = None
    alpha: float | None = None  # the norm constraint, per output row
    kind: ClassVar[str] = "OFT"

    @property
    def update_shape(self) -> tuple[int | None, ...]:
        return (self.blocks.shape[0] * self.blocks.shape[1], None)

    def named_tensors(self) -> dict[str, torch.Tensor]:
        found = {"oft_blocks" if self.cayley else "oft_diag": self.blocks}
        return found | ({"rescale": self.rescale} if self.rescale is not None else {})

    def rotation(self, device: torch.device) -> torch.Tensor:
        """R per block, [blocks, size, size], fp32."""
        r = self.blocks.to(device, torch.float32)
        if not self.cayley:
            return r
        q = r - r.transpose(1, 2)
        limit = (self.alpha or 0.0) * self.update_shape[0]
        norm = float(q.norm()) + 1e-8  # LyCORIS's epsilon: a Q exactly at the limit is left as it is
        if limit > 0 and norm > limit:
            q = q * (limit / norm)
        eye = torch.eye(r.shape[1], device=device)
        return (eye + q) @ torch.linalg.inv(eye - q)

    def delta(self, device: torch.device, weight: torch.Tensor | None = None) -> torch.Tensor:
        w = _needs(weight, self.kind).to(device, torch.float32)
        count, size = self.blocks.shape[0], self.blocks.shape[1]
        turned = torch.einsum("knm,kni->kmi", self.rotation(device), w.reshape(count, size, -1)).reshape(w.shape)
        if self.rescale is not None:
            turned = self.rescale.to(device, torch.float32).reshape(-1, *[1] * (w.dim() - 1)) * turned
        return _rows(turned - w)


@dataclass
class GloraLayer(_WeightOnly):
    """LyCORIS's GLoRA: `W @ a_in @ a_out + b_up @ b_down`, times alpha/rank, with a_in [in, r], a_out [r, in],
    b_up [out, r] and b_down [r, in, kh, kw] (or, with a Tucker core `b_mid` [r, r, kh, kw], b_down [r, in]).
    LyCORIS 2+ names them a1, a2, b1, b2 in that order; LyCORIS 1 (what A1111 reads) named them a2, a1, b2, b1.
    A1111 leaves out the alpha/rank factor; LyCORIS and ComfyUI apply it, and so do we."""

    a_in: torch.Tensor
    a_out: torch.Tensor
    b_up: torch.Tensor
    b_down: torch.Tensor
    b_mid: torch.Tensor | None = None
    alpha: float | None = None
    old_names: bool = False  # LyCORIS 1's names, to list the file's own tensors
    kind: ClassVar[str] = "GLoRA"

    @property
    def rank(self) -> int:
        return self.a_out.shape[0]

    @property
    def scale(self) -> float:
        # LyCORIS: an alpha of 0 (or none) means alpha = rank
        return 1.0 if not self.alpha else self.alpha / self.rank

    @property
    def update_shape(self) -> tuple[int, ...]:
        kernel_size = tuple(self.b_mid.shape[2:]) if self.b_mid is not None else tuple(self.b_down.shape[2:])
        return (self.b_up.shape[0], self.b_down.shape[1], *kernel_size)

    def named_tensors(self) -> dict[str, torch.Tensor]:
        names = ("a2", "a1", "b2", "b1") if self.old_names else ("a1", "a2", "b1", "b2")
        found = dict(zip(names, (self.a_in, self.a_out, self.b_up, self.b_down), strict=True))
        return found | ({"bm": self.b_mid} if self.b_mid is not None else {})

    def delta(self, device: torch.device, weight: torch.Tensor | None = None) -> torch.Tensor:
        w = _needs(weight, self.kind).to(device, torch.float32)
        a_in, a_out = _rows(self.a_in).to(device, torch.float32), _rows(self.a_out).to(device, torch.float32)
        adapted = torch.einsum("oi...,ir,rj->oj...", w, a_in, a_out)
        if self.b_mid is None:
            added = _low_rank(self.b_up, self.b_down, None, device)
        else:
            added = _low_rank(_rows(self.b_up).T, _rows(self.b_down), self.b_mid, device)
        return self.scale * (_rows(adapted) + _rows(added))


@dataclass
class _Change:
    """A layer's change written out in full: its weight's (`weight`) and, where given, its bias's (`bias`); the
    file's names for the two are the kind's `names`."""

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    alpha: float | None = None
    kind: ClassVar[str]
    names: ClassVar[tuple[str, str]]

    @property
    def update_shape(self) -> tuple[int, ...]:
        return tuple(self.weight.shape)

    @property
    def bias_shape(self) -> tuple[int, ...] | None:
        return None if self.bias is None else tuple(self.bias.shape)

    def named_tensors(self) -> dict[str, torch.Tensor]:
        weight_name, bias_name = self.names
        return {weight_name: self.weight} | ({bias_name: self.bias} if self.bias is not None else {})

    def delta(self, device: torch.device, weight: torch.Tensor | None = None) -> torch.Tensor:
        change = self.weight.to(device, torch.float32)
        return _rows(change) if change.dim() > 1 else change

    def bias_delta(self, device: torch.device) -> torch.Tensor | None:
        return None if self.bias is None else self.bias.to(device, torch.float32)


class FullLayer(_Change):
    """LyCORIS's full difference: the change of the weight itself (`diff`), and of the bias (`diff_b`)."""

    kind: ClassVar[str] = "full difference"
    names: ClassVar[tuple[str, str]] = ("diff", "diff_b")


class NormLayer(_Change):
    """LyCORIS's norm layers: the change of a GroupNorm's or LayerNorm's weight (`w_norm`) and bias (`b_norm`)."""

    kind: ClassVar[str] = "norm"
    names: ClassVar[tuple[str, str]] = ("w_norm", "b_norm")


NetworkLayer = (
    LoraLayer
    | TuckerLoraLayer
    | LohaLayer
    | LokrLayer
    | DoraLayer
    | Ia3Layer
    | OftLayer
    | GloraLayer
    | FullLayer
    | NormLayer
)
DECOMPOSABLE = (LoraLayer, TuckerLoraLayer, LohaLayer, LokrLayer)  # the kinds a DoRA magnitude may go with


def truncated(layer: NetworkLayer, rank: int) -> NetworkLayer:
    """A LoRA layer (also under DoRA) cut to its first `rank` ranks at its own alpha / full rank, as A1111 applies
    `dyn` (a DyLoRA file orders its ranks by importance); any other layer as it is."""
    if isinstance(layer, DoraLayer):
        return DoraLayer(truncated(layer.inner, rank), layer.dora_scale)
    if not isinstance(layer, LoraLayer) or rank >= layer.rank:
        return layer
    alpha = layer.alpha if layer.alpha is not None else float(layer.rank)  # no alpha: a scale of 1
    return LoraLayer(layer.down[:rank], layer.up[:, :rank], alpha * rank / layer.rank)


def kernel(weight_shape: tuple[int, ...]) -> tuple[int, ...]:
    """A weight's kernel size; a Linear layer's and a 1x1 convolution's count as the same."""
    k = tuple(weight_shape[2:])
    return () if k in ((), (1, 1)) else k
