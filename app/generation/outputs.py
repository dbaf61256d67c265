"""Saving generated images as A1111 does: `<outdir>/<date>/NNNNN-<seed>-<prompt words>.png` with infotext."""

from __future__ import annotations

import datetime as dt
import re
import threading
from pathlib import Path

from PIL import Image

from app.fileio import atomic_write
from app.generation.infotext import pnginfo_for

_UNSAFE = re.compile(r'[\\/:*?"<>|\x00-\x1f]+')
_EXTRA_NETWORK = re.compile(r"<\w+:[^>]+>")
MAX_PROMPT_CHARS = 128


def filename_prompt_part(prompt: str) -> str:
    """The prompt as a file-name fragment: no extra-network tags, no path characters, at most 128 chars."""
    text = _EXTRA_NETWORK.sub("", prompt)
    text = _UNSAFE.sub(" ", text)
    text = " ".join(text.split())[:MAX_PROMPT_CHARS].rstrip(" .")
    return text


def next_sequence_number(folder: Path) -> int:
    """One more than the highest `NNNNN-` prefix in `folder` (0 for an empty or missing folder)."""
    highest = -1
    if folder.is_dir():
        for entry in folder.iterdir():
            head = entry.name.split("-", 1)[0]
            if head.isdigit():
                highest = max(highest, int(head))
    return highest + 1


class ImageSaver:
    """Writes images into a dated folder; numbering is serialized so parallel saves never collide."""

    def __init__(self, base_dir: Path):
        self.base_dir = base_dir
        self._lock = threading.Lock()

    def save(self, image: Image.Image, seed: int, prompt: str, infotext: str, when: dt.date | None = None) -> Path:
        folder = self.base_dir / (when or dt.date.today()).isoformat()
        folder.mkdir(parents=True, exist_ok=True)
        words = filename_prompt_part(prompt)
        with self._lock:
            number = next_sequence_number(folder)
            name = f"{number:05d}-{seed}" + (f"-{words}" if words else "") + ".png"
            path = folder / name
            atomic_write(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=pnginfo_for(infotext)))
        return path
