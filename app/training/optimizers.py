"""The optimizer of a training run, by kohya's `optimizer_type` names, with kohya's `optimizer_args` ("key=value").

AdamW is A1111's and stays the default. The others are what LoRA trainers reach for: Prodigy (prodigyopt) estimates
the step size itself, so its learning rate is a multiplier, 1 as a rule; Lion (lion-pytorch) keeps one moment instead
of two (half AdamW's state) and wants a rate 3-10x smaller; Adafactor (torch's) keeps factored second moments.
Each state round-trips through `state_dict`, so `.optim` resume stays exact with any of them.
"""

from __future__ import annotations

import ast
import math
import re
from collections.abc import Callable
from typing import Any

import torch

from app.errors import UserError

OptimizerFactory = Callable[..., torch.optim.Optimizer]


def _adamw(groups, **kw) -> torch.optim.Optimizer:
    return torch.optim.AdamW(groups, **kw)


def _prodigy(groups, **kw) -> torch.optim.Optimizer:
    from prodigyopt import Prodigy  # imported when chosen: most runs use AdamW

    return Prodigy(groups, **kw)


def _lion(groups, **kw) -> torch.optim.Optimizer:
    from lion_pytorch import Lion

    return Lion(groups, **kw)


def _adafactor(groups, **kw) -> torch.optim.Optimizer:
    return torch.optim.Adafactor(groups, **kw)


OPTIMIZERS: dict[str, OptimizerFactory] = {
    "AdamW": _adamw,
    "Prodigy": _prodigy,
    "Lion": _lion,
    "Adafactor": _adafactor,
}
DEFAULT_OPTIMIZER = "AdamW"
_ARG = re.compile(r"^([A-Za-z_]\w*)=(.+)$")


def optimizer_name(value: str | None) -> str:
    """The canonical name of `value` (case does not matter; empty means AdamW), or a UserError listing them."""
    text = (value or "").strip() or DEFAULT_OPTIMIZER
    for name in OPTIMIZERS:
        if name.lower() == text.lower():
            return name
    raise UserError(f"Optimizer must be one of {', '.join(OPTIMIZERS)}, got {value!r}.", "optimizer_type")


def parse_optimizer_args(text: str | None) -> dict[str, Any]:
    """kohya's `optimizer_args`: `key=value` pairs split by spaces or commas outside brackets (`betas=(0.9,0.99)
    d_coef=2 safeguard_warmup=True`); values are Python literals (numbers, True/False, tuples), else text."""
    args: dict[str, Any] = {}
    for part in _split(text or ""):
        match = _ARG.match(part)
        if match is None:
            raise UserError(
                f"Optimizer arguments are key=value pairs (e.g. d_coef=2 weight_decay=0.01); {part!r} is not one.",
                "optimizer_args",
            )
        key, raw = match.groups()
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            try:
                value = float(raw)  # nan and inf are no Python literals, but are numbers
            except ValueError:
                value = raw
        if isinstance(value, float) and not math.isfinite(value) and key != "growth_rate":
            raise UserError(f"Optimizer argument {key} must be a finite number, got {raw}.", "optimizer_args")
        args[key] = value
    return args


def _split(text: str) -> list[str]:
    parts, current, depth = [], "", 0
    for char in text:
        depth += {"(": 1, "[": 1, ")": -1, "]": -1}.get(char, 0)
        if char in " ,\t\n" and depth <= 0:
            if current:
                parts.append(current)
            current = ""
        else:
            current += char
    return parts + ([current] if current else [])


def make_optimizer(
    name: str, groups: list[dict[str, Any]], lr: float, weight_decay: float, args_text: str = ""
) -> torch.optim.Optimizer:
    """The optimizer `name` over `groups`, at `lr`, with the target's weight decay unless the arguments set one.
    A wrong argument is a UserError naming it, raised here, before any step."""
    factory = OPTIMIZERS[optimizer_name(name)]
    given = parse_optimizer_args(args_text)
    for key in ("lr", "params"):
        if key in given:
            raise UserError(
                f"Optimizer arguments cannot set {key}: the learning rate is its own field (its schedule sets it each "
                "step).",
                "optimizer_args",
            )
    kwargs = {"lr": lr, "weight_decay": weight_decay, **given}
    try:
        return factory(groups, **kwargs)
    # Whatever an optimizer raises for an argument it does not take or a value it cannot use (TypeError, ValueError,
    # IndexError for a short `betas`, AssertionError, OverflowError for a huge int): the argument is at fault.
    except Exception as e:
        raise refused(name, e) from None


def refused(name: str, error: Exception) -> UserError:
    """The message for arguments an optimizer would not take (when made or at its first step)."""
    reason = str(error).rstrip(".")
    return UserError(f"{optimizer_name(name)} refused the optimizer arguments: {reason}.", "optimizer_args")


def check_optimizer(name: str, args_text: str, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """The optimizer built on a throwaway tensor and stepped once, so a bad name or argument (some are only read by
    `step`: Prodigy's `d_coef=abc`) is refused before the run starts, not at its first step."""
    probe = torch.nn.Parameter(torch.ones(2, 2))
    optimizer = make_optimizer(name, [{"params": [probe]}], 1e-4, weight_decay, args_text)
    probe.grad = torch.full_like(probe, 0.5)
    try:
        optimizer.step()
    except Exception as e:  # as above: a value only `step` reads (Prodigy's d_coef as text or a huge int)
        raise refused(name, e) from None
    if not torch.isfinite(probe).all():
        raise UserError(
            f"{optimizer_name(name)} with these arguments turns a plain step into NaN or infinity: {args_text}.",
            "optimizer_args",
        )
    return optimizer


def describe(name: str, args_text: str) -> str:
    """kohya's `ss_optimizer`: the class's module and name, with the arguments given (`prodigyopt.prodigy.Prodigy(
    d_coef=2)`)."""
    kind = type(check_optimizer(name, args_text))
    args = ",".join(f"{k}={v}" for k, v in parse_optimizer_args(args_text).items())
    return f"{kind.__module__}.{kind.__name__}" + (f"({args})" if args else "")
