"""The attention processor that applies hypernetworks to the k and v inputs of every UNet attention layer.

k_in = x, v_in = x; for each active hypernetwork with a module for x's width, in prompt order (chained, not summed):
k_in = k_module(k_in, mult), v_in = v_module(v_in, mult). x is the cross-attention context (768/1024 wide) or, in
self-attention, the hidden states (320/640/1280). Attention itself is SDPA (xformers when installed, on CUDA), or
sliced SDPA to save memory.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from app.hypernetworks.hypernetwork import Hypernetwork

try:  # optional: xformers' memory-efficient kernels on CUDA when installed; PyTorch's SDPA otherwise
    import xformers.ops as xformers_ops
except Exception:  # not installed, or built for another torch (it raises more than ImportError then)
    xformers_ops = None


class HypernetworkStack:
    """The hypernetworks active for the current generation or training step (set by the job holding the model)."""

    def __init__(self) -> None:
        self.active: list[tuple[Hypernetwork, float]] = []
        # Cross-attention contexts repeat across layers and steps; without autograd their k/v inputs are kept
        # here (with the context itself, so its memory cannot be reused by another tensor while cached).
        self._cache: dict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        # Folded projection weights (see `folded`), per layer and weight version, also only without autograd.
        self._folds: dict[tuple, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    @contextmanager
    def using(self, networks: list[tuple[Hypernetwork, float]]) -> Iterator[None]:
        previous = self.active
        # Nested uses add up (a training preview's network plus the prompt's tags); 0 disables: exactly the
        # image without it.
        self.active = previous + [(hn, m) for hn, m in networks if m != 0]
        self._cache, self._folds = {}, {}
        try:
            yield
        finally:
            self.active = previous
            self._cache, self._folds = {}, {}

    def apply(self, context: torch.Tensor, cross_attention: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """k and v inputs for `context`. Cross-attention contexts (the prompt) are cached outside autograd."""
        if not cross_attention or torch.is_grad_enabled():
            return self._apply(context)
        key = (context.data_ptr(), tuple(context.shape), context.dtype, context._version)
        hit = self._cache.get(key)
        if hit is None:
            if len(self._cache) >= 16:  # a few distinct prompts per generation at most (prompt editing)
                self._cache.clear()
            hit = self._cache[key] = (context, *self._apply(context))
        return hit[1], hit[2]

    def affine_maps(self, width: int) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """The k and v input maps for `width` of all active networks chained, each as one affine map (A, c) in
        fp32; None when a module on the way is not affine or no active network has this width."""
        maps = None
        for hn, multiplier in self.active:
            pair = hn.layers.get(width)
            if pair is None:
                continue
            step = [module.affine(multiplier) for module in pair]
            if step[0] is None or step[1] is None:
                return None
            # Chained, as `_apply`: the later network maps the earlier one's output.
            maps = step if maps is None else [(a @ a0, a @ c0 + c) for (a, c), (a0, c0) in zip(step, maps, strict=True)]
        return maps

    def folded(self, to_k: torch.nn.Module, to_v: torch.nn.Module, x: torch.Tensor):
        """key and value for the self-attention input `x`, with affine hypernetwork maps folded into the
        projections: to_k(x A.T + c) = x (W A).T + W c + b. For A1111's default ("linear") hypernetworks this drops
        their cost per token: one (width x width) product per layer instead of the MLP over every position, and
        in training the MLP's backward over every position too. None where it does not apply: a map that is not
        affine, no module for this width, or projections that are not plain Linear layers with their weights here
        (PEFT's LoRA layers while a LoRA trains; --lowvram keeps weights on the meta device between calls)."""
        if not (type(to_k) is type(to_v) is torch.nn.Linear) or to_k.weight.is_meta or to_v.weight.is_meta:
            return None
        cached = not torch.is_grad_enabled()
        key = (id(to_k), x.shape[-1], x.dtype, to_k.weight.data_ptr(), to_k.weight._version)
        key += (to_v.weight.data_ptr(), to_v.weight._version)
        hit = self._folds.get(key) if cached else None
        if hit is None:
            maps = self.affine_maps(x.shape[-1])
            if maps is None:
                return None
            hit = []
            for proj, (a, c) in zip((to_k, to_v), maps, strict=True):
                weight = proj.weight.float()
                bias = weight @ c + (proj.bias.float() if proj.bias is not None else 0)
                hit.append(((weight @ a).to(x.dtype), bias.to(x.dtype)))
            if cached:
                if len(self._folds) >= 256:  # one per attention layer; more means weights were swapped meanwhile
                    self._folds.clear()
                self._folds[key] = hit
        return tuple(F.linear(x, w, b) for w, b in hit)

    def _apply(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k_in = v_in = context
        for hn, multiplier in self.active:
            pair = hn.layers.get(context.shape[-1])
            if pair is not None:
                k_in = pair[0](k_in, multiplier)
                v_in = pair[1](v_in, multiplier)
        return k_in, v_in


class HypernetworkAttnProcessor:
    """SDPA attention with hypernetwork-transformed k/v inputs; `slice_size` heads at a time when set."""

    def __init__(self, stack: HypernetworkStack, slice_size: int | None = None, fold: bool = True):
        self.stack = stack
        self.slice_size = slice_size
        self.fold = fold  # off: every hypernetwork runs as its MLP (benchmarks/hypernetwork_fold.py compares the two)

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args,
        **kwargs,
    ):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        four_d = hidden_states.ndim == 4
        if four_d:
            batch, channels, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channels, height * width).transpose(1, 2)
        batch, _, _ = hidden_states.shape
        context_length = (encoder_hidden_states if encoder_hidden_states is not None else hidden_states).shape[1]
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, context_length, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            context = hidden_states
        elif attn.norm_cross:
            context = attn.norm_encoder_hidden_states(encoder_hidden_states)
        else:
            context = encoder_hidden_states
        folded = None
        # Self-attention only: the prompt's 77-token context has its k/v inputs cached instead (`apply`). Without
        # autograd the fold is made once per generation (cached), so it always pays; with autograd it is remade on
        # every call and pays where positions outnumber the width (4096 positions at width 320 at 512 px).
        if (
            self.stack.active
            and self.fold
            and encoder_hidden_states is None
            and (not torch.is_grad_enabled() or context.shape[1] >= context.shape[2])
        ):
            folded = self.stack.folded(attn.to_k, attn.to_v, context)
        if folded is not None:
            key, value = folded
        elif self.stack.active:
            k_in, v_in = self.stack.apply(context, cross_attention=encoder_hidden_states is not None)
            key, value = attn.to_k(k_in), attn.to_v(v_in)
        else:
            key, value = attn.to_k(context), attn.to_v(context)

        head_dim = key.shape[-1] // attn.heads
        query, key, value = (t.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        out = self._attention(query, key, value, attention_mask)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if four_d:
            out = out.transpose(-1, -2).reshape(batch, channels, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

    # diffusers' Attention.forward reads the processor's signature on every call (to warn about unused kwargs):
    # 32 inspect.signature calls per SD 1.x UNet call, 1.4 ms of Python that a GPU waiting for it waits through
    # (benchmarks/step_overhead.py). Stored, the lookup takes 0.4 ms.
    __call__.__signature__ = inspect.signature(__call__)

    def _attention(self, q, k, v, mask):
        if xformers_ops is not None and q.is_cuda and mask is None and not self.slice_size:
            # xformers takes [batch, tokens, heads, dim]; ours are [batch, heads, tokens, dim]
            out = xformers_ops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
            return out.transpose(1, 2)
        if not self.slice_size or self.slice_size >= q.shape[1]:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=False)
        parts = []
        for start in range(0, q.shape[1], self.slice_size):
            heads = slice(start, start + self.slice_size)
            part_mask = mask[:, heads] if mask is not None and mask.shape[1] > 1 else mask
            parts.append(F.scaled_dot_product_attention(q[:, heads], k[:, heads], v[:, heads], attn_mask=part_mask))
        return torch.cat(parts, dim=1)


def attention_widths(unet: torch.nn.Module) -> set[int]:
    """The k/v input widths of the UNet's attention layers (context width for cross-attention, hidden width for
    self-attention): the widths a hypernetwork needs modules for."""
    return {int(m.to_k.in_features) for m in unet.modules() if hasattr(m, "to_k") and hasattr(m, "processor")}


def install(unet: torch.nn.Module, stack: HypernetworkStack, slice_size: int | None = None, fold: bool = True) -> None:
    unet.set_attn_processor(HypernetworkAttnProcessor(stack, slice_size, fold))
