"""Applying LoRAs for one generation, and taking them out again, exactly.

Every layer a file touches gets, for the generation, a new weight tensor `W + sum of m * update` (a LoRA's update is
(alpha/rank) up @ down; the other kinds', layers.py; full-difference and norm layers change the bias as well),
computed in fp32 and stored in the layer's dtype, in place of its weight; the original tensor is kept aside, never
written to, and put back on exit, so the model afterwards holds the very same tensors as before and the next
generation without LoRAs is bit-identical to one that never had them.
Sampling runs at the base model's speed: no extra work per step. (PEFT's unfused LoRA layers, the first version, made
a whole generation 2.2x slower on the tiny model, where per-layer overhead dominates as it does on fast GPUs.) The
cost is the touched layers' size in memory while the generation runs.

Where accelerate's offload hooks own the weights, the swap happens where the weights live: under --lowvram
(sequential offload) a layer's weight is `meta` and the hook loads it from its weights map before each call, so the
merged tensor goes into that map; under --medvram the model hook moves the whole module, merged weights included.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace

import torch

from app.lora.files import BoundLayer
from app.lora.layers import LoraLayer, truncated


@dataclass
class Application:
    """One file to apply: its layers bound to the model, and the multipliers for text encoders and UNet."""

    bound: list[BoundLayer]
    te_multiplier: float
    unet_multiplier: float
    # A1111's `dyn` (DyLoRA): only the first `dyn` ranks of each LoRA layer, at the file's alpha / full rank;
    # other kinds are applied whole, as A1111 does
    dyn: int | None = None
    # block weights (block_weights.py): each bound layer's share of its multiplier, in `bound`'s order
    scales: list[float] | None = None


def _multiplier(app: Application, component: str) -> float:
    return app.unet_multiplier if component == "unet" else app.te_multiplier


def _weighted(applications: list[Application]) -> Iterator[tuple[Application, BoundLayer, float]]:
    """(application, bound layer, its multiplier) of every layer that applies: the tag's text-encoder or UNet
    multiplier times its block weight, layers at 0 left out."""
    for app in applications:
        for i, b in enumerate(app.bound):
            m = _multiplier(app, b.target.component) * (app.scales[i] if app.scales is not None else 1.0)
            if m != 0:
                yield app, b, m


@contextmanager
def lora_applied(applications: list[Application]) -> Iterator[None]:
    """Apply `applications` to the modules they are bound to for the body of the `with`; always restore."""
    live = [a for a in applications if a.bound and (a.te_multiplier != 0 or a.unet_multiplier != 0)]
    if not live:
        yield
        return
    with _merged(live):
        yield


@dataclass(frozen=True)
class StepRange:
    """The LoRA Block Weight extension's `start=`/`stop=`/`step=A-B`: the sampling steps (counted from 1) at which a
    LoRA's UNet part applies, from `start` up to, not including, `stop` (None: from the first, to the last)."""

    start: int | None = None
    stop: int | None = None

    def covers(self, index: int) -> bool:
        """Whether the step of 0-based `index` is in the range."""
        step = index + 1
        return (self.start is None or step >= self.start) and (self.stop is None or step < self.stop)


class StepSwitch:
    """LoRAs some of which apply their UNet part only in a step range (the extension's syntax, as it does it in
    A1111): their text-encoder part applies throughout (the prompt is encoded before sampling), their UNet part is
    merged in at the first step of its range and taken out at its stop. Each change merges the set that applies from
    the original weights again (a weight-dependent kind's update, DoRA or OFT, depends on the original weight, not
    on another LoRA's), so a change costs one merge; the other steps run at the base model's speed.

    `at_step(index)` before each step of a first pass; a second (hires) pass keeps the state the first left, as the
    extension's does."""

    def __init__(self, always: list[Application], ranged: list[tuple[Application, StepRange]]):
        self.always = list(always)
        # the text-encoder part of a ranged file applies throughout; its UNet part only in its range
        self.always += [replace(app, unet_multiplier=0.0) for app, _ in ranged]
        self.ranged = [(replace(app, te_multiplier=0.0), steps) for app, steps in ranged]
        self._stack: ExitStack | None = None
        self._active: tuple[int, ...] | None = None

    @contextmanager
    def applied(self) -> Iterator[None]:
        """The LoRAs as they apply at the first step, for the body of the `with`; always restored."""
        self._stack = ExitStack()
        try:
            self.at_step(0)
            yield
        finally:
            self._stack.close()
            self._stack, self._active = None, None

    def at_step(self, index: int) -> None:
        """Merge what applies at the step of 0-based `index`, if that differs from what is merged now."""
        active = tuple(k for k, (_, steps) in enumerate(self.ranged) if steps.covers(index))
        if self._stack is None or active == self._active:
            return
        self._stack.close()
        self._stack = ExitStack()
        self._active = active
        self._stack.enter_context(lora_applied(self.always + [self.ranged[k][0] for k in active]))


def delta_weight(bound: BoundLayer, weight: torch.Tensor, dyn: int | None = None) -> torch.Tensor:
    """The layer's update (LoRA: (alpha/rank) up @ down; the other kinds: layers.py) in the shape of `weight` (the
    layer's original weight, which (IA)³, OFT, GLoRA and DoRA updates depend on), fp32 on its device; with `dyn`,
    a LoRA's first `dyn` ranks only."""
    layer = bound.layer if dyn is None else truncated(bound.layer, dyn)
    return layer.delta(weight.device, weight).reshape(weight.shape)


def low_rank_terms(applications: list[Application]) -> dict[torch.nn.Module, list[tuple[torch.Tensor, torch.Tensor]]]:
    """{layer: its update's terms (m * scale * up [out, r], down [r, in * kernel])} for each layer that only plain
    LoRA layers change, so that its summed update is one product of the terms' halves put side by side (rank at
    most the sum of their ranks); layers another kind (LoHa, LoKr, DoRA, Tucker, full, ...) changes are left out."""
    terms: dict[torch.nn.Module, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    other: set[torch.nn.Module] = set()
    for app, b, m in _weighted(applications):
        module = b.target.module
        layer = b.layer if app.dyn is None else truncated(b.layer, app.dyn)
        if type(layer) is not LoraLayer:
            other.add(module)
            continue
        up = layer.up.reshape(layer.up.shape[0], -1).float() * (m * layer.scale)
        terms.setdefault(module, []).append((up, layer.down.reshape(layer.rank, -1).float()))
    return {module: parts for module, parts in terms.items() if module not in other}


class _Slot:
    """Where a layer's weight (or bias) lives: the module's Parameter, or an offload hook's weights map
    (--lowvram)."""

    def __init__(self, module: torch.nn.Module, name: str = "weight"):
        self.module, self.name = module, name
        weights_map = getattr(getattr(module, "_hf_hook", None), "weights_map", None)
        self.mapped = weights_map is not None and getattr(module, name).device.type == "meta"
        if self.mapped:
            self.store, self.key = weights_map.dataset, weights_map.prefix + name

    def get(self) -> torch.Tensor:
        return self.store[self.key] if self.mapped else getattr(self.module, self.name)

    def set(self, value: torch.Tensor) -> None:
        if self.mapped:
            self.store[self.key] = value
        else:
            setattr(
                self.module,
                self.name,
                value if isinstance(value, torch.nn.Parameter) else torch.nn.Parameter(value, False),
            )


@contextmanager
def _merged(applications: list[Application]) -> Iterator[None]:
    deltas: dict[tuple[torch.nn.Module, str], torch.Tensor] = {}
    slots: dict[tuple[torch.nn.Module, str], _Slot] = {}

    def current(module: torch.nn.Module, name: str) -> torch.Tensor:
        """The module's `name` tensor (weight or bias) as it is now, wherever it lives."""
        return slots.setdefault((module, name), _Slot(module, name)).get()

    def add(module: torch.nn.Module, name: str, d: torch.Tensor) -> None:
        key = (module, name)
        deltas[key] = deltas[key] + d if key in deltas else d

    for app, b, m in _weighted(applications):
        module = b.target.module
        add(module, "weight", m * delta_weight(b, current(module, "weight"), app.dyn))
        if b.layer.bias_shape is not None:  # full-difference and norm layers change the bias too
            bias = current(module, "bias")
            add(module, "bias", m * b.layer.bias_delta(bias.device).reshape(bias.shape))
    originals: list[tuple[_Slot, torch.Tensor]] = []
    try:
        with torch.no_grad():
            for key, d in deltas.items():
                slot = slots[key]
                original = slot.get()
                originals.append((slot, original))
                slot.set((original.float() + d).to(original.dtype))
            deltas.clear()  # each merged tensor is held once, in its slot
        yield
    finally:
        for slot, original in reversed(originals):
            slot.set(original)
