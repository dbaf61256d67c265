"""The one interface the generation loop uses for extra networks written as prompt tags (`<hypernet:...>`,
`<lora:...>`): each kind turns its tags into an Activation, a context that applies the networks for one generation
and restores the model after, plus notes for tags it could not use and its infotext fields."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, ExitStack, nullcontext
from dataclasses import dataclass, field
from typing import Any, Protocol

from app.prompts.extra_networks import ExtraNetworkTag


@dataclass
class Activation:
    context: AbstractContextManager[Any] = field(default_factory=nullcontext)
    notes: list[str] = field(default_factory=list)  # one sentence per tag that was not (fully) used
    infotext: dict[str, str] = field(default_factory=dict)  # e.g. {"Lora hashes": "name: 0123456789ab"}
    # called with the 0-based index of each step of a first sampling pass, before its model call (a LoRA that
    # applies in a step range switches there); None: nothing changes during sampling
    before_step: Callable[[int], None] | None = None
    # what the kind applies, for tools that take it apart (a LoRA's Applications: merging LoRAs into one uses their
    # factors where it can)
    parts: list[Any] = field(default_factory=list)


class NetworkKind(Protocol):
    tag: str  # the word in `<tag:name:...>`
    aliases: tuple[str, ...]  # other words for the same kind, e.g. A1111's `<lyco:...>` for `<lora:...>`

    def activate(self, model: Any, tags: list[ExtraNetworkTag]) -> Activation: ...


def parse_multipliers(tag: ExtraNetworkTag, names: tuple[str, ...]) -> tuple[list[str], dict[str, str]]:
    """A1111's tag arguments after the name: positional values and `key=value` ones (`<lora:x:0.5:unet=1>`)."""
    positional: list[str] = []
    named: dict[str, str] = {}
    for arg in tag.args[1:]:
        key, sep, value = arg.partition("=")
        if sep and key.strip() in names:
            named[key.strip()] = value.strip()
        else:
            positional.append(arg.strip())
    return positional, named


def activate_all(
    kinds: list[NetworkKind], model: Any, tags: list[ExtraNetworkTag], stack: ExitStack
) -> tuple[list[str], dict[str, str], Callable[[int], None] | None]:
    """Activate every kind for its tags inside `stack` (exiting the stack restores the model); tags of unknown
    kinds become notes. Returns (notes, infotext fields, what to call before each sampling step or None)."""
    notes: list[str] = []
    infotext: dict[str, str] = {}
    hooks: list[Callable[[int], None]] = []
    words = {kind: {kind.tag, *kind.aliases} for kind in kinds}
    known = set().union(*words.values())
    notes += [
        f"{t.text}: extra network type '{t.kind}' is not supported here; removed from the prompt"
        for t in tags
        if t.kind not in known
    ]
    for kind in kinds:
        # As A1111, an alias's tags join the kind's own, in prompt order, in one activation.
        activation = kind.activate(model, [t for t in tags if t.kind in words[kind]])
        stack.enter_context(activation.context)
        notes += activation.notes
        infotext.update(activation.infotext)
        if activation.before_step is not None:
            hooks.append(activation.before_step)
    if not hooks:
        return notes, infotext, None

    def before_step(index: int) -> None:
        for hook in hooks:
            hook(index)

    return notes, infotext, before_step
