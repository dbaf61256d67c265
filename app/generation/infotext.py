"""A1111 "infotext": the generation parameters stored in a PNG's `parameters` text chunk, written and read back."""

from __future__ import annotations

import json
import re
from typing import Any

from PIL import Image, PngImagePlugin

_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_SIZE = re.compile(r"^(\d+)x(\d+)$")


def quote(value: Any) -> str:
    """A value as infotext writes it: JSON-quoted when it holds a comma, colon or newline (A1111), and also when it
    starts with a quote or has spaces at either end, which would not read back unchanged otherwise."""
    text = str(value)
    if any(c in text for c in ",:\n") or text != text.strip() or text.startswith('"'):
        return json.dumps(text, ensure_ascii=False)
    return text


def unquote(text: str) -> str:
    if len(text) >= 2 and text[0] == '"' and text[-1] == '"':
        try:
            return json.loads(text)
        except ValueError:
            return text
    return text


def build_infotext(prompt: str, negative_prompt: str, params: dict[str, Any]) -> str:
    """`params` in A1111's field order; None values are left out."""
    fields = ", ".join(f"{k}: {quote(v)}" for k, v in params.items() if v is not None)
    lines = [prompt]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    lines.append(fields)
    return "\n".join(lines)


def parse_infotext(text: str) -> dict[str, Any]:
    """Infotext -> {"Prompt", "Negative prompt", field: value, "Size-1", "Size-2", ...} (A1111's shape)."""
    *lines, last = (text or "").strip().split("\n")
    if len(_PARAM.findall(last)) < 3:
        lines.append(last)
        last = ""
    prompt_lines: list[str] = []
    negative_lines: list[str] = []
    in_negative = False
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:") :].strip()
        (negative_lines if in_negative else prompt_lines).append(line)
    result: dict[str, Any] = {"Prompt": "\n".join(prompt_lines), "Negative prompt": "\n".join(negative_lines)}
    for key, value in _PARAM.findall(last):
        value = unquote(value)
        size = _SIZE.match(value)
        if size:
            result[f"{key}-1"], result[f"{key}-2"] = size.group(1), size.group(2)
        else:
            result[key] = value
    result.setdefault("Clip skip", "1")
    return result


def png_text_chunks(image: Image.Image) -> dict[str, str]:
    """All text chunks of a PNG (tEXt, zTXt and iTXt all land in `info`)."""
    return {k: v for k, v in image.info.items() if isinstance(v, str)}


def pnginfo_for(infotext: str, extra: dict[str, str] | None = None) -> PngImagePlugin.PngInfo:
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", infotext)
    for key, value in (extra or {}).items():
        info.add_text(key, value)
    return info
