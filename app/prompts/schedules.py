"""Prompt editing `[from:to:when]` and alternation `[a|b]`: which prompt text applies at which sampling step.

A prompt becomes a schedule: a list of `(end_step, text)` pairs. Step numbers follow current A1111: a `when`
written with a decimal point is a fraction of the steps (`0.5` = half way), one without is a step number; the
schedule always ends at `steps`. A prompt the grammar cannot parse is used as it is for every step (A1111).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache

import lark

_GRAMMAR = r"""
!start: (prompt | /[][():]/+)*
prompt: (emphasized | scheduled | alternate | plain | WHITESPACE)*
!emphasized: "(" prompt ")"
        | "(" prompt ":" prompt ")"
        | "[" prompt "]"
scheduled: "[" [prompt ":"] prompt ":" [WHITESPACE] NUMBER [WHITESPACE] "]"
alternate: "[" prompt ("|" [prompt])+ "]"
WHITESPACE: /\s+/
plain: /([^\\\[\]():|]|\\.)+/
%import common.SIGNED_NUMBER -> NUMBER
"""

_parser = lark.Lark(_GRAMMAR)


@dataclass(frozen=True)
class ScheduledPrompt:
    """`text` is the prompt for sampling steps up to and including `end_at_step`."""

    end_at_step: int
    text: str


def _resolve_when(tree: lark.Tree, steps: int) -> None:
    """Replace each `scheduled` node's NUMBER token by the integer step it means."""
    for node in tree.iter_subtrees():
        if node.data == "scheduled":
            raw = str(node.children[-2])
            value = float(raw)
            value = value * steps if "." in raw else value
            node.children[-2] = min(steps, int(value))


def _switch_steps(tree: lark.Tree, steps: int) -> list[int]:
    points = {steps}
    for node in tree.iter_subtrees():
        if node.data == "scheduled" and node.children[-2] >= 1:
            points.add(node.children[-2])
        elif node.data == "alternate":
            points.update(range(1, steps + 1))
    return sorted(points)


def _flatten(value) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif value is not None:
        for item in value:
            yield from _flatten(item)


class _TextAtStep(lark.Transformer):
    def __init__(self, step: int):
        super().__init__()
        self.step = step

    def scheduled(self, args):
        before, after, _, when, _ = args
        return (before or ()) if self.step <= when else after

    def alternate(self, args):
        options = [arg if arg else "" for arg in args]
        return options[(self.step - 1) % len(options)]

    def start(self, args):
        return "".join(_flatten(args))

    def plain(self, args):
        return args[0]

    def __default__(self, data, children, meta):
        return children

    def __default_token__(self, token):
        return token.value


@lru_cache(maxsize=256)
def prompt_schedule(prompt: str, steps: int) -> tuple[ScheduledPrompt, ...]:
    """The schedule of one prompt for `steps` sampling steps."""
    try:
        tree = _parser.parse(prompt)
    except lark.exceptions.LarkError:
        return (ScheduledPrompt(steps, prompt),)
    _resolve_when(tree, steps)
    return tuple(ScheduledPrompt(step, _TextAtStep(step).transform(tree)) for step in _switch_steps(tree, steps))


def text_at_step(schedule: tuple[ScheduledPrompt, ...], step_index: int) -> str:
    """The text that applies at 0-based sampling step `step_index` (A1111's `reconstruct_cond_batch` rule)."""
    for entry in schedule:
        if step_index <= entry.end_at_step:
            return entry.text
    return schedule[-1].text
