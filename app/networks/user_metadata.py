"""A1111's user metadata for an extra-network file: `<name>.json` beside it (written by A1111's card editor and by
extensions such as Civitai Helper), with `description`, `activation text` (trigger words), `preferred weight`,
`negative text`, `sd version` and `notes`; or a plain `<name>.txt` / `<name>.description.txt` description. Read
defensively: these files come from anywhere, so a damaged or odd one is a reason, never an exception."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from app.errors import UserError
from app.fileio import atomic_write, atomic_write_text

MAX_BYTES = 256 * 1024  # a sidecar is a few hundred bytes; anything this large is not one
PREVIEW_EXTENSIONS = ("png", "jpg", "jpeg", "webp", "gif")  # A1111's allowed preview extensions, in its order
SD_VERSIONS = ("SD1", "SD2", "SDXL", "Unknown")  # A1111's SdVersion names


@dataclass(frozen=True)
class UserMetadata:
    description: str = ""
    activation_text: str = ""
    preferred_weight: float | None = None  # None (or A1111's 0): the default multiplier
    negative_text: str = ""
    sd_version: str = ""
    notes: str = ""
    problem: str = ""  # why the .json was not used, if it was not

    def card_prompt(self, tag: str, name: str, default_weight: float = 1.0) -> str:
        """What a click on the card adds to the prompt, as A1111: `<tag:name:weight>` and the activation text."""
        weight = self.preferred_weight if self.preferred_weight else default_weight
        text = f"<{tag}:{name}:{weight:g}>"
        return f"{text} {self.activation_text}" if self.activation_text else text

    def card_negative(self) -> str:
        """What a click adds to the negative prompt: A1111 wraps the negative text as `(text:1)`."""
        return f"({self.negative_text}:1)" if self.negative_text else ""


def _read_text(path: Path) -> str | None:
    try:
        if not path.is_file() or path.stat().st_size > MAX_BYTES:
            return None
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None


def _text(data: dict, key: str) -> str:
    value = data.get(key)
    return value.strip() if isinstance(value, str) else ""


def _weight(value: object) -> float | None:
    """A number or a numeric string (A1111's editor stores a number; hand-written files hold either)."""
    if isinstance(value, bool):
        return None
    try:
        weight = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return weight if math.isfinite(weight) and weight != 0 else None


def read_user_metadata(network_file: Path) -> UserMetadata:
    """The user metadata beside `network_file` (e.g. models/Lora/x.safetensors -> models/Lora/x.json)."""
    base = network_file.with_suffix("")
    description = ""
    for candidate in (base.with_name(base.name + ".txt"), base.with_name(base.name + ".description.txt")):
        text = _read_text(candidate)
        if text is not None:
            description = text.strip()
            break
    sidecar = sidecar_path(network_file)
    if not sidecar.exists():
        return UserMetadata(description=description)
    raw = _read_text(sidecar)
    if raw is None:
        return UserMetadata(description=description, problem=f"{sidecar.name} is not a readable file of at most 256 KB")
    try:
        data = json.loads(raw)
    except ValueError as e:
        return UserMetadata(description=description, problem=f"{sidecar.name} is not valid JSON ({e})")
    if not isinstance(data, dict):
        return UserMetadata(description=description, problem=f"{sidecar.name} does not hold a JSON object")
    sd_version = _text(data, "sd version")
    return UserMetadata(
        description=_text(data, "description") or description,
        activation_text=_text(data, "activation text"),
        preferred_weight=_weight(data.get("preferred weight")),
        negative_text=_text(data, "negative text"),
        sd_version=sd_version if sd_version in SD_VERSIONS else "",
        notes=_text(data, "notes"),
    )


def sidecar_path(network_file: Path) -> Path:
    base = network_file.with_suffix("")
    return base.with_name(base.name + ".json")


def write_user_metadata(
    network_file: Path,
    description: str,
    activation_text: str,
    preferred_weight: float | None,
    negative_text: str,
    notes: str,
) -> Path:
    """Write the fields into `<name>.json` as A1111's card editor does, keeping every other key the file already
    has (an extension's, `sd version`); atomically, so a crash leaves the old file or the new one. A damaged
    existing file is not overwritten: its content would be lost."""
    sidecar = sidecar_path(network_file)
    data: dict = {}
    if sidecar.exists():
        raw = _read_text(sidecar)
        try:
            data = json.loads(raw) if raw is not None else None
        except ValueError:
            data = None
        if not isinstance(data, dict):
            raise UserError(
                f"{sidecar} exists but is not a JSON object that can be read; it is left as it is. Fix or remove it, "
                "then save again."
            )
    if preferred_weight is not None and not math.isfinite(float(preferred_weight)):
        raise UserError(f"The preferred weight must be a number, got {preferred_weight}.", "preferred_weight")
    data.update(
        {
            "description": description.strip(),
            "activation text": activation_text.strip(),
            "preferred weight": float(preferred_weight or 0),  # A1111: 0 = the default multiplier
            "negative text": negative_text.strip(),
            "notes": notes.strip(),
        }
    )
    atomic_write_text(sidecar, json.dumps(data, indent=4, ensure_ascii=False))
    return sidecar


def find_preview(network_file: Path) -> Path | None:
    """The card image beside a network file, as A1111 looks for it: `<name>.<ext>`, then `<name>.preview.<ext>`,
    for each extension in A1111's order."""
    base = network_file.with_suffix("")
    for ext in PREVIEW_EXTENSIONS:
        for candidate in (base.with_name(f"{base.name}.{ext}"), base.with_name(f"{base.name}.preview.{ext}")):
            if candidate.is_file():
                return candidate
    return None


def save_preview(network_file: Path, image: Image.Image) -> Path:
    """Write `image` as the file's card image, `<name>.png` (where A1111's "replace preview" writes it), atomically;
    an image there before is replaced, which is what the user asked for."""
    base = network_file.with_suffix("")
    target = base.with_name(base.name + ".png")
    atomic_write(target, lambda tmp: image.convert("RGB").save(tmp, format="PNG"))
    return target
