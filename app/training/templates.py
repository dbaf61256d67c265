"""Prompt templates (`textual_inversion_templates/*.txt`): one prompt per line with `[name]` and `[filewords]`."""

from __future__ import annotations

from pathlib import Path

from app.errors import UserError


def list_templates(folder: Path) -> list[str]:
    """Template file names (what the UI dropdown and the API's `template_filename` use)."""
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.rglob("*.txt") if p.is_file())


def read_template(folder: Path, filename: str, require_name: bool = True) -> list[str]:
    """The template's non-empty lines; refuses a missing file, an empty one, or (for TI) one without [name]."""
    try:
        path = (folder / filename).resolve()
        found = folder.resolve() in path.parents and path.is_file()
    except (OSError, ValueError):  # a NUL byte or an impossible path is a name no file has
        found = False
    if not found:
        available = ", ".join(list_templates(folder)) or "none"
        raise UserError(f"Prompt template '{filename}' not found in {folder}. Available: {available}.")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(
            f"Prompt template '{filename}' is not UTF-8 text (byte {e.start}); save it as UTF-8, one prompt per line."
        ) from None
    except OSError as e:
        raise UserError(f"Prompt template '{filename}' cannot be read: {e.strerror or e}.") from None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise UserError(f"Prompt template '{filename}' has no lines; put one prompt per line.")
    if require_name and not any("[name]" in line for line in lines):
        raise UserError(
            f"Prompt template '{filename}' never uses [name], so the embedding would not be in any training "
            "prompt. Pick a template with [name] (e.g. subject.txt or style.txt)."
        )
    return lines


def fill(template: str, name: str, filewords: str) -> str:
    """`[filewords]` first, then `[name]` (A1111's order)."""
    return template.replace("[filewords]", filewords).replace("[name]", name)
