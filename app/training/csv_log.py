"""The run's CSV logs (`<kind>_loss.csv`, `validation_loss.csv`): one row per entry, appended as the run goes; rows
past the resume point (left by a kill after the last checkpoint) are dropped when a run starts, so a resumed run's
log reads as one run's."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from app.fileio import atomic_write_text


class CsvLog:
    def __init__(self, path: Path, fields: tuple[str, ...], resume_step: int):
        self.path = path
        rows = []
        if path.is_file():
            with open(path, newline="", encoding="utf-8") as f:
                rows = [r for r in csv.DictReader(f) if r.get("step", "").isdigit() and int(r["step"]) <= resume_step]
        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(path, text.getvalue())  # a kill or a full disk here keeps the old log whole

    def append(self, values: list) -> None:
        with open(self.path, "a", newline="", encoding="utf-8") as f:
            csv.writer(f).writerow(values)
