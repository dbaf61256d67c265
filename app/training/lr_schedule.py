"""A1111's learning-rate schedule syntax: `0.005` or `0.005:100, 1e-3:1000, 1e-5` (also used for clip values)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from app.errors import UserError

_EXAMPLE = "e.g. 0.005:100, 1e-3:1000, 1e-5"


@dataclass(frozen=True)
class ScheduleEntry:
    rate: float
    end_step: int  # exclusive; -1 = until max steps


class LearnRateSchedule:
    """Rate per step. Steps are global: a resumed run at step 500 continues the schedule at 500."""

    def __init__(self, text: str | float, max_steps: int, what: str = "Learning rate"):
        self.text = str(text)
        self.entries = parse_schedule(self.text, what)
        self.max_steps = int(max_steps)

    @property
    def end_step(self) -> int:
        """Training ends at min(max steps, the last entry's step when it has one)."""
        last = self.entries[-1].end_step
        return self.max_steps if last < 0 else min(last, self.max_steps)

    def rate_at(self, step: int) -> float:
        for entry in self.entries:
            if entry.end_step < 0 or step < entry.end_step:
                return entry.rate
        return self.entries[-1].rate


def parse_schedule(text: str, what: str = "Learning rate") -> list[ScheduleEntry]:
    """Parse and validate; the error quotes the bad part and shows the expected form."""
    entries: list[ScheduleEntry] = []
    for raw in str(text).split(","):
        part = raw.strip()
        if not part:
            continue
        rate_text, sep, step_text = part.partition(":")
        try:
            rate = float(rate_text.strip())
        except ValueError:
            raise UserError(
                f"{what} schedule '{text}' is invalid: '{part}' does not start with a number. Expected RATE or "
                f"RATE:STEP, separated by commas, {_EXAMPLE}"
            ) from None
        if rate != rate or rate in (float("inf"), float("-inf")) or rate < 0:
            raise UserError(f"{what} schedule '{text}' is invalid: '{part}' must be a finite rate >= 0.")
        step = -1
        if sep:
            try:
                step = int(step_text.strip())
            except ValueError:
                raise UserError(
                    f"{what} schedule '{text}' is invalid: the step in '{part}' must be a whole number (like "
                    f"1000, not 1e3) or -1. Expected RATE or RATE:STEP, separated by commas, {_EXAMPLE}"
                ) from None
            if step < -1 or step == 0:
                raise UserError(f"{what} schedule '{text}' is invalid: the step in '{part}' must be > 0 or -1.")
        if entries and entries[-1].end_step < 0:
            raise UserError(
                f"{what} schedule '{text}' is invalid: '{part}' comes after an entry that already runs to the end."
            )
        if entries and 0 <= step <= entries[-1].end_step:
            raise UserError(f"{what} schedule '{text}' is invalid: steps must increase, but '{part}' does not.")
        entries.append(ScheduleEntry(rate, step))
    if not entries:
        raise UserError(f"{what} schedule is empty. Expected RATE or RATE:STEP, separated by commas, {_EXAMPLE}")
    return entries


# kohya's (transformers') scheduler names; each shapes the A1111 schedule's rate over the run
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts")


def rate_factor(scheduler: str, step: int, end_step: int, warmup: int = 0, cycles: int = 1) -> float:
    """What the rate of `step` (0-based) is multiplied by: a linear warmup over the first `warmup` steps (reaching
    the full rate at step `warmup`), then constant, falling linearly to 0 at `end_step`, a half cosine to 0, or
    `cycles` half cosines each starting again from the full rate. A pure function of the step, so a resumed run
    continues the curve exactly (raising max steps stretches what is left of it)."""
    if scheduler not in LR_SCHEDULERS:
        raise UserError(f"LR scheduler must be one of {', '.join(LR_SCHEDULERS)}, got {scheduler!r}.", "lr_scheduler")
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if scheduler in ("constant", "constant_with_warmup"):
        return 1.0
    progress = (step - warmup) / max(1, end_step - warmup)
    if scheduler == "linear":
        return max(0.0, 1.0 - progress)
    if scheduler == "cosine":
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))
    return 0.5 * (1.0 + math.cos(math.pi * ((max(1, cycles) * min(progress, 1.0 - 1e-12)) % 1.0)))
