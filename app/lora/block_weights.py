"""LoRA block weights, as the "LoRA Block Weight" extension for A1111 (hako-mikan's) writes them in the prompt:
`<lora:NAME:1:lbw=OUTALL>` or `<lora:NAME:1:lbw=1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1>` scales the LoRA's change per block
of the model: BASE (the text encoders), IN00-IN11 (the UNet's input blocks), M00 (its middle block), OUT00-OUT11
(its output blocks), in the original (LDM) numbering that SDXL reads as IN00-IN08 and OUT00-OUT08.

A list holds 17 values (BASE and the blocks with attention in SD 1.x/2.x: what a LoRA of attention layers has),
26 (every block), 12 (SDXL's BASE and blocks with attention) or 20 (all of SDXL's); a block a shorter list does not
name gets 0, as the extension's `to26` does. Layers outside every block (the time embedding, conv_out) keep the
multiplier. A name is a preset: the extension's ten defaults, and any `NAME:values` line of `lbwpresets.txt` in
the data folder (the extension's own file, copied over, works). The extension's random (`R`, `U`) and inherited
(`X`) values are not supported: the tag gets a note and the LoRA is not applied, rather than applied otherwise
than asked."""

from __future__ import annotations

from pathlib import Path

from app.lora.layers import LoraFormatError
from app.lora.names import TEXT_ENCODER, TEXT_ENCODER_2, Target, ldm_unet_path

BLOCKS = ["BASE", *(f"IN{i:02}" for i in range(12)), "M00", *(f"OUT{i:02}" for i in range(12))]
LISTS = {
    26: BLOCKS,
    17: ["BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00", *(f"OUT{i:02}" for i in range(3, 12))],
    20: ["BASE", *(f"IN{i:02}" for i in range(9)), "M00", *(f"OUT{i:02}" for i in range(9))],
    12: ["BASE", "IN04", "IN05", "IN07", "IN08", "M00", *(f"OUT{i:02}" for i in range(6))],
}
# the extension's default presets (17 values: BASE, IN01-IN08 with attention, M00, OUT03-OUT11)
DEFAULT_PRESETS = {
    "NONE": "0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0",
    "ALL": "1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1",
    "INS": "1,1,1,1,0,0,0,0,0,0,0,0,0,0,0,0,0",
    "IND": "1,0,0,0,1,1,1,0,0,0,0,0,0,0,0,0,0",
    "INALL": "1,1,1,1,1,1,1,0,0,0,0,0,0,0,0,0,0",
    "MIDD": "1,0,0,0,1,1,1,1,1,1,1,1,0,0,0,0,0",
    "OUTD": "1,0,0,0,0,0,0,0,1,1,1,1,0,0,0,0,0",
    "OUTS": "1,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1",
    "OUTALL": "1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1",
    "ALL0.5": "0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5",
}
PRESETS_FILE = "lbwpresets.txt"


def read_presets(path: Path) -> dict[str, str]:
    """The default presets, then each `NAME:values` line of the file (if there) with a known number of values; other
    lines are comments, as the extension reads them. A file that cannot be read adds nothing."""
    presets = dict(DEFAULT_PRESETS)
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return presets
    for line in text.splitlines():
        name, sep, values = line.partition(":")
        if sep and name.strip() and values.count(",") + 1 in LISTS:
            presets[name.strip()] = values.strip()
    return presets


def block_weights(spec: str, presets: dict[str, str]) -> dict[str, float]:
    """Each block's share of the multiplier, from a preset name or a list of values; LoraFormatError (the reason)
    for anything else."""
    text = presets.get(spec.strip(), spec)
    values = [v.strip() for v in text.split(",")]
    if len(values) not in LISTS:
        known = ", ".join(sorted(presets))
        raise LoraFormatError(
            f"block weights '{spec}' are neither a preset ({known}; yours go in {PRESETS_FILE}) nor 12, 17, 20 or 26 "
            "values"
        )
    weights = dict.fromkeys(BLOCKS, 0.0)
    for block, value in zip(LISTS[len(values)], values, strict=True):
        try:
            weights[block] = float(value)
        except ValueError:
            raise LoraFormatError(
                f"block weight '{value}' for {block} is not a number (the extension's random and inherited values "
                "R, U and X are not supported)"
            ) from None
        if weights[block] != weights[block] or abs(weights[block]) == float("inf"):
            raise LoraFormatError(f"block weight '{value}' for {block} is not a finite number")
    return weights


def block_of(target: Target, unet_config) -> str | None:
    """The block a layer belongs to (BASE for the text encoders), or None for UNet layers outside every block."""
    if target.component in (TEXT_ENCODER, TEXT_ENCODER_2):
        return "BASE"
    ldm = ldm_unet_path(target.path, unet_config)
    if ldm is None:
        return None
    parts = ldm.split(".")
    if parts[0] == "input_blocks":
        return f"IN{int(parts[1]):02}"
    if parts[0] == "middle_block":
        return "M00"
    if parts[0] == "output_blocks":
        return f"OUT{int(parts[1]):02}"
    return None
