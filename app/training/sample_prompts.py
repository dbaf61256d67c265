"""kohya's sample prompts (`--sample_prompts`): previews of several prompts at each preview step, one per line, each
with its own settings written after the prompt as kohya writes them:

    a photo of sks dog on a beach --n blurry, lowres --w 512 --h 768 --d 42 --l 7.5 --s 28 --ss euler_a

`--n` negative prompt, `--w`/`--h` size, `--d` seed, `--l` CFG scale, `--s` steps, `--ss` sampler (an A1111 name
such as `DPM++ 2M`, or kohya's: `euler_a`, `euler`, `ddim`, `dpmsolver++`, ...). What a line leaves out comes from the
run's preview settings. Empty lines and lines starting with `#` are skipped, as kohya skips them."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace

from app.errors import UserError
from app.generation.samplers import find_sampler, sampler_names
from app.generation.txt2img import Txt2ImgParams

MAX_SAMPLE_PROMPTS = 16  # each one is a whole generation at every preview step
# kohya's sampler names (its `--ss` choices) -> A1111's
KOHYA_SAMPLERS = {
    "ddim": "DDIM",
    "pndm": "PLMS",
    "lms": "LMS",
    "k_lms": "LMS",
    "euler": "Euler",
    "k_euler": "Euler",
    "euler_a": "Euler a",
    "k_euler_a": "Euler a",
    "heun": "Heun",
    "k_heun": "Heun",
    "dpm_2": "DPM2",
    "k_dpm_2": "DPM2",
    "dpm_2_a": "DPM2 a",
    "k_dpm_2_a": "DPM2 a",
    "dpmsolver": "DPM++ 2M",
    "dpmsolver++": "DPM++ 2M",
    "dpmsingle": "DPM++ SDE",
}
_OPTION = re.compile(r"^(ss|n|w|h|d|l|s)(?:\s+(.*))?$", re.DOTALL)


@dataclass(frozen=True)
class SamplePrompt:
    prompt: str
    negative_prompt: str | None = None
    width: int | None = None
    height: int | None = None
    seed: int | None = None
    cfg_scale: float | None = None
    steps: int | None = None
    sampler_name: str | None = None

    def params(self, base: Txt2ImgParams) -> Txt2ImgParams:
        """`base` (the run's preview settings) with this line's prompt and the settings it gives."""
        given = {k: v for k, v in vars(self).items() if v is not None}
        return replace(base, **given)


def _sampler(value: str, where: str) -> str:
    """An A1111 sampler name (or alias, or `... Karras`), or kohya's name for one."""
    if value.lower() in KOHYA_SAMPLERS:
        return KOHYA_SAMPLERS[value.lower()]
    try:
        find_sampler(value)
    except UserError:
        raise UserError(
            f"{where}: unknown sampler '{value}'; use an A1111 name ({', '.join(sampler_names()[:4])}, ...) or "
            f"one of kohya's ({', '.join(KOHYA_SAMPLERS)}).",
            "sample_prompts",
        ) from None
    return value


def _number(kind: type, value: str, what: str, where: str) -> int | float:
    try:
        number = kind(value)
    except ValueError:
        raise UserError(f"{where}: {what} must be a number, got '{value}'.", "sample_prompts") from None
    if not math.isfinite(number):
        raise UserError(f"{where}: {what} must be a finite number, got '{value}'.", "sample_prompts")
    return number


def parse_line(line: str, number: int) -> SamplePrompt:
    """One line: the prompt, then ` --x value` options (kohya splits at ` --`)."""
    where = f"Sample prompt line {number}"
    prompt, *options = line.strip().split(" --")
    if not prompt.strip() or prompt.startswith("--"):
        raise UserError(f"{where} has options but no prompt before them.", "sample_prompts")
    fields: dict[str, object] = {"prompt": prompt.strip()}
    for option in options:
        match = _OPTION.match(option.strip())
        if match is None:
            name = option.strip().split(" ")[0]
            raise UserError(
                f"{where}: unknown option '--{name}'; use --n (negative prompt), --w, --h, --d (seed), --l (CFG "
                "scale), --s (steps) or --ss (sampler).",
                "sample_prompts",
            )
        key, value = match.group(1), (match.group(2) or "").strip()
        if not value and key != "n":
            raise UserError(f"{where}: --{key} needs a value.", "sample_prompts")
        if key == "n":
            fields["negative_prompt"] = value
        elif key == "ss":
            fields["sampler_name"] = _sampler(value, where)
        elif key in ("w", "h", "d", "s"):
            name = {"w": "width", "h": "height", "d": "seed", "s": "steps"}[key]
            fields[name] = int(_number(int, value, f"--{key} ({name})", where))
        else:
            fields["cfg_scale"] = float(_number(float, value, "--l (CFG scale)", where))
    return SamplePrompt(**fields)


def parse_sample_prompts(text: str) -> list[SamplePrompt]:
    """Every prompt line of `text`; at most MAX_SAMPLE_PROMPTS."""
    lines = [(i, line) for i, line in enumerate((text or "").splitlines(), 1)]
    prompts = [parse_line(line, i) for i, line in lines if line.strip() and not line.strip().startswith("#")]
    if len(prompts) > MAX_SAMPLE_PROMPTS:
        raise UserError(
            f"{len(prompts)} sample prompts; at most {MAX_SAMPLE_PROMPTS} (each is a whole image at every preview).",
            "sample_prompts",
        )
    return prompts
