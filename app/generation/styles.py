"""Prompt styles (A1111's `styles.csv`: name, prompt, negative_prompt): saved snippets merged into prompts.

A style text with `{prompt}` wraps the prompt (the placeholder becomes the prompt); otherwise it is appended after
a comma. The file is re-read when it changes.
"""

from __future__ import annotations

import csv
import logging
import threading
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Style:
    name: str
    prompt: str
    negative_prompt: str


def merge(style_text: str, prompt: str) -> str:
    if "{prompt}" in style_text:
        return style_text.replace("{prompt}", prompt)
    return ", ".join(part for part in (prompt.strip(), style_text.strip()) if part)


class StyleDatabase:
    def __init__(self, path: Path):
        self.path = path
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._styles: dict[str, Style] = {}

    def styles(self) -> dict[str, Style]:
        with self._lock:
            try:
                stat = self.path.stat()
                stamp = (stat.st_size, stat.st_mtime_ns)
            except FileNotFoundError:
                self._styles, self._stamp = {}, None
                return {}
            if stamp != self._stamp:
                self._styles = self._read()
                self._stamp = stamp
            return dict(self._styles)

    def _read(self) -> dict[str, Style]:
        found: dict[str, Style] = {}
        try:
            with open(self.path, newline="", encoding="utf-8-sig") as f:
                for row in csv.DictReader(f, skipinitialspace=True):
                    name = (row.get("name") or "").strip()
                    if name:
                        found[name] = Style(name, row.get("prompt") or "", row.get("negative_prompt") or "")
        except (OSError, csv.Error, UnicodeDecodeError) as e:
            log.warning("Could not read prompt styles from %s: %s", self.path, e)
        return found

    def apply(self, prompt: str, negative: str, names: list[str]) -> tuple[str, str, list[str]]:
        """(prompt, negative prompt, names not found) with the styles merged in, in the order given."""
        styles = self.styles()
        missing = []
        for name in names or []:
            style = styles.get(name)
            if style is None:
                missing.append(name)
                continue
            prompt = merge(style.prompt, prompt)
            negative = merge(style.negative_prompt, negative)
        return prompt, negative, missing
